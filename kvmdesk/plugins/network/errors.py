"""Error codes of the network plugin (controller side: 3000-3499; the agent's are 3500-3999).

Every message names the field or the object at fault, so a 4xx answer says what to change.
"""
from __future__ import annotations

from kvmdesk.core.errors import define

# -- addresses and subnets -------------------------------------------------------------------------
BAD_ADDRESS = define(3001, 400, "{field}: {value} 不是有效的IPv4地址", "{field}: {value} is not a valid IPv4 address")
BAD_NETMASK = define(3002, 400, "{field}: {value} 不是有效的子网掩码", "{field}: {value} is not a valid netmask")
OUTSIDE_NETWORK = define(
    3003, 400, "{field}: {value} 不在网段 {cidr} 内", "{field}: {value} is not inside the network {cidr}"
)
NOT_A_HOST = define(
    3004, 400, "{field}: {value} 是网段 {cidr} 的{what}, 不能使用", "{field}: {value} is the {what} of {cidr} and cannot be used"
)
RANGE_ORDER = define(
    3005, 400, "起始IP {start_ip} 大于结束IP {end_ip}", "start_ip {start_ip} is after end_ip {end_ip}"
)
GATEWAY_IN_RANGE = define(
    3006, 400, "网关 {gateway} 在地址范围 {start_ip}-{end_ip} 内", "gateway {gateway} is inside the range {start_ip}-{end_ip}"
)
SUBNET_OVERLAP = define(
    3007, 409, "子网与同一数据网络的子网 {name} ({detail}) 冲突",
    "the subnet overlaps subnet {name} of the same data network ({detail})",
)
SUBNET_IN_USE = define(
    3008, 409, "子网 {name} 中仍有 {count} 个已分配的IP地址{detail}",
    "subnet {name} still has {count} allocated addresses{detail}",
)
ALLOCATION_OUTSIDE = define(
    3009, 409, "已分配的地址 {ip} 将不在新的地址范围 {start_ip}-{end_ip} 内",
    "the allocated address {ip} would fall outside the new range {start_ip}-{end_ip}",
)

# -- IP allocation -----------------------------------------------------------------------------------
ADDRESS_EXHAUSTED = define(
    3010, 409, "子网 {name} 没有可分配的IP地址了 ({size} 个已全部分配)",
    "subnet {name} has no free address left (all {size} are allocated)",
)
ADDRESS_TAKEN = define(3011, 409, "IP地址 {ip} 在子网 {name} 中已被分配", "address {ip} is already allocated in subnet {name}")
OUTSIDE_RANGE = define(
    3012, 400, "IP地址 {ip} 不在子网 {name} 的地址范围 {start_ip}-{end_ip} 内",
    "address {ip} is outside the range {start_ip}-{end_ip} of subnet {name}",
)

# -- switches and data networks ---------------------------------------------------------------------
VLAN_REQUIRED = define(
    3020, 400, "vlan_id: vlan类型的交换机 {switch} 需要1-4094之间的VLAN ID",
    "vlan_id: switch {switch} is a vlan switch and needs a VLAN id from 1 to 4094",
)
VLAN_FORBIDDEN = define(
    3021, 400, "vlan_id: flat类型的交换机 {switch} 不能设置VLAN ID",
    "vlan_id: switch {switch} is a flat switch and takes no VLAN id",
)
VLAN_TAKEN = define(
    3022, 409, "交换机 {switch} 上的VLAN {vlan_id} 已被数据网络 {network} 使用",
    "VLAN {vlan_id} on switch {switch} is already used by data network {network}",
)
FLAT_TAKEN = define(
    3023, 409, "flat交换机 {switch} 已承载数据网络 {network}", "flat switch {switch} already carries data network {network}"
)
SWITCH_IN_USE = define(
    3024, 409, "交换机 {switch} 正被数据网络使用, 不能删除: {networks}",
    "switch {switch} is used by data networks and cannot be deleted: {networks}",
)
DEFAULT_SWITCH = define(3025, 409, "默认交换机 {switch} 不能删除", "the default switch {switch} cannot be deleted")
SWITCH_TYPE_LOCKED = define(
    3026, 409, "交换机 {switch} 上已有数据网络, 不能修改类型", "switch {switch} carries data networks; its type cannot change"
)
UPLINK_NIC_NOT_ON_NODE = define(
    3027, 400, "{field}: 网卡 {nic} 不属于节点 {node}", "{field}: NIC {nic} does not belong to node {node}"
)
UPLINK_NODE_TWICE = define(
    3028, 400, "{field}: 节点 {node} 出现了多次", "{field}: node {node} is listed more than once"
)
NIC_IS_UPLINK = define(
    3029, 409, "网卡 {nic} 已是交换机 {switch} 的上行网卡", "NIC {nic} is already the uplink of switch {switch}"
)
POOL_WITHOUT_UPLINK = define(
    3030, 400, "uplinks: 资源池 {pool} 的节点 {nodes} 没有上行网卡",
    "uplinks: nodes {nodes} of resource pool {pool} have no uplink in this switch",
)
NIC_NOT_UPLINKABLE = define(
    3031, 409, "网卡 {nic} 是bond {bond} 的成员, 不能作为上行网卡",
    "NIC {nic} is a slave of bond {bond} and cannot be an uplink",
)

# -- nodes' NICs, addresses, bonds -------------------------------------------------------------------
MANAGE_IP_CONFLICT = define(
    3040, 409, "IP地址 {ip} 已是节点 {node} 的管理网络地址", "address {ip} is already the management address of node {node}"
)
IP_ON_NODE = define(3041, 409, "IP地址 {ip} 已配置在节点 {node} 的网卡 {nic} 上", "address {ip} is already on NIC {nic} of node {node}")
BOND_SLAVE_TAKEN = define(
    3042, 409, "{field}: 网卡 {nic} 已是bond {bond} 的成员", "{field}: NIC {nic} is already a slave of bond {bond}"
)
NIC_IS_BOND = define(3043, 400, "{field}: {nic} 是bond, 不能作为成员网卡", "{field}: {nic} is a bond, not a NIC")
ROLE_WOULD_BE_LOST = define(
    3044, 409, "{nic} 上的 {ip} 承载{role}, 必须保留在 {field} 中",
    "{ip} on {nic} carries the {role}; keep it in {field}",
)
MANAGE_IP_LOCKED = define(
    3045, 409, "{ip} 是节点的{role}地址, 请先将{role}迁移到其它地址",
    "{ip} carries the node's {role}; move that role to another address first",
)
INHERIT_INVALID = define(3046, 400, "{field}: {reason}", "{field}: {reason}")
IP_NOT_ON_NODE = define(
    3047, 400, "{field}: IP {ip} 不属于节点 {node}", "{field}: address {ip} does not belong to node {node}"
)
UPLINK_IN_BOND = define(
    3048, 409, "网卡 {nic} 是交换机 {switch} 的上行网卡, 不能加入bond",
    "NIC {nic} is the uplink of switch {switch} and cannot join a bond",
)

# -- agents ------------------------------------------------------------------------------------------
AGENT_UNREACHABLE = define(
    3060, 503, "节点 {node} 不可达: {reason}", "node {node} cannot be reached: {reason}"
)
AGENT_FAILED = define(3061, 502, "节点 {node}: {reason}", "node {node}: {reason}")
NO_AGENT_CLIENT = define(
    3062, 503, "控制器没有配置节点代理客户端", "the controller has no node-agent client configured"
)
BOND_IS_UPLINK = define(
    3049, 409, "bond {nic} 是交换机 {switch} 的上行网卡, 请先更换上行网卡", "bond {nic} is the uplink of switch {switch}; change the uplink first"
)
SLAVE_HAS_NO_ADDRESS = define(
    3050, 409, "网卡 {nic} 是bond {bond} 的成员, 不能配置IP地址", "NIC {nic} is a slave of bond {bond} and cannot carry addresses"
)
UPLINK_NIC_UNKNOWN = define(
    3600, 400, "{field}: 节点 {node} 没有可作为上联的网卡 {nic}", "{field}: node {node} has no NIC {nic} to be an uplink"
)
UPLINK_SWITCH_UNKNOWN = define(3601, 400, "{field}: 虚拟交换机不存在: {switch}", "{field}: no such virtual switch: {switch}")
