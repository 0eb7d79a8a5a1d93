"""Error codes of the agent's network API (3500-3999; the controller's network codes are 3000-3499).

The agent's error envelopes carry the message parameters in ``data.params``, so the controller can
render the same message again in the language of its own caller.
"""
from __future__ import annotations

from typing import Any

from kvmdesk.core.errors import ApiError, ErrorCode, define

NO_SUCH_NIC = define(3501, 404, "网卡 {nic} 不存在", "there is no network interface {nic}")
BOND_DRIVER_MISSING = define(
    3502, 501,
    "无法创建bond {bond}: 本节点缺少Linux bonding驱动 (内核回复: {reason}); 请加载bonding模块 (modprobe bonding) 后重试",
    "cannot create bond {bond}: the Linux bonding driver is missing on this node (the kernel answered: {reason}); "
    "load the bonding module (modprobe bonding) and try again",
)
NETLINK_FAILED = define(3503, 500, "网络配置失败 ({step}): {reason}", "network configuration failed ({step}): {reason}")
ADDRESS_EXISTS = define(3504, 409, "地址 {ip} 已配置在 {nic} 上", "address {ip} is already configured on {nic}")
ADDRESS_MISSING = define(3505, 404, "{nic} 上没有地址 {ip}", "address {ip} is not configured on {nic}")
NOT_A_BOND = define(3506, 404, "{nic} 不是bond", "{nic} is not a bond")
BOND_EXISTS = define(3507, 409, "网络接口 {nic} 已存在", "a network interface named {nic} already exists")
SLAVE_UNAVAILABLE = define(3508, 409, "网卡 {nic} 不能加入bond: {reason}", "NIC {nic} cannot join the bond: {reason}")
BOND_MODE = define(3509, 400, "不支持的bond模式 {mode} (只支持0, 1, 6)", "bond mode {mode} is not supported (only 0, 1 and 6)")
NETNS_MISSING = define(
    3510, 503, "网络命名空间 {netns} 不存在", "the network namespace {netns} configured for the agent does not exist"
)
OVS_UNAVAILABLE = define(
    3520, 503, "无法连接Open vSwitch ({db}): {reason}", "Open vSwitch cannot be reached ({db}): {reason}"
)
OVS_FAILED = define(3521, 500, "ovs-vsctl 执行失败 ({what}): {reason}", "ovs-vsctl failed ({what}): {reason}")
OVS_PORT_FAILED = define(
    3522, 500, "网桥 {bridge} 上的端口 {port} 无法工作: {reason}", "port {port} on bridge {bridge} does not work: {reason}"
)
NO_SUCH_NETWORK = define(
    3523, 404, "本节点没有数据网络 {network}", "data network {network} is not realised on this node"
)
UPLINK_HAS_ADDRESSES = define(
    3524, 409,
    "网卡 {nic} 上配置了地址 {addresses}; 在system数据路径下加入网桥会使这些地址失效, 请先迁移地址或选择其它网卡",
    "NIC {nic} carries the addresses {addresses}; on the system datapath a bridge port loses them: move them off "
    "or choose another NIC",
)
BAD_BRIDGE = define(3525, 400, "{field}: {reason}", "{field}: {reason}")


def net_error(error: ErrorCode, **params: Any) -> ApiError:
    """An error whose envelope carries its parameters (``data.params``) for the controller."""
    return ApiError(error, data={"params": {k: str(v) for k, v in params.items()}}, **params)
