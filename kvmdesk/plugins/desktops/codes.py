"""Error codes of the desktops plugin (6000-6499), with their HTTP status and zh-CN/en messages.

Every message names the field or the object at fault, so a 4xx answer says what to change.
"""
from __future__ import annotations

from kvmdesk.core.errors import define

# -- teaching groups -------------------------------------------------------------------------------
GROUP_NAME_TAKEN = define(
    6001, 409, "分组名称已被{holder}使用: {name}", "the group name is already used by a {holder_en}: {name}"
)
SUBNET_NOT_IN_NETWORK = define(
    6002, 400, "subnet_uuid: 子网 {subnet} 不属于数据网络 {network}", "subnet_uuid: subnet {subnet} does not belong to data network {network}"
)
TERMINAL_RANGE_ORDER = define(
    6003, 400, "终端开始IP {start_ip} 大于结束IP {end_ip}", "terminal start_ip {start_ip} is after end_ip {end_ip}"
)
TERMINAL_RANGE_OVERLAP = define(
    6004, 409, "终端IP范围 {start_ip}-{end_ip} 与子网 {subnet} 分配给桌面的地址范围 {subnet_start}-{subnet_end} 重叠",
    "the terminal range {start_ip}-{end_ip} overlaps the desktop addresses {subnet_start}-{subnet_end} of subnet {subnet}",
)
GROUP_HAS_DESKTOPS = define(
    6005, 409, "教学分组 {name} 中还有 {count} 个桌面组, 请先删除它们",
    "teaching group {name} still has {count} desktop groups: delete them first",
)
TERMINAL_RANGE_TOO_LARGE = define(
    6006, 400, "终端IP范围 {start_ip}-{end_ip} 过大 (最多 {limit} 个地址)",
    "the terminal range {start_ip}-{end_ip} is too large (at most {limit} addresses)",
)

# -- placement and capacity --------------------------------------------------------------------------
UNKNOWN_NODE = define(6010, 400, "create_info: 节点 {ip} 不存在", "create_info: there is no node {ip}")
NODE_OUTSIDE_POOL = define(
    6011, 400, "create_info: 节点 {ip} 不在资源池 {pool} 中", "create_info: node {ip} is not in resource pool {pool}"
)
NODE_OFFLINE = define(
    6012, 409, "create_info: 节点 {ip} 当前状态为 {state}, 不能创建或启动桌面",
    "create_info: node {ip} is {state} and cannot take desktops",
)
COUNT_MISMATCH = define(
    6013, 400, "create_info: 各节点桌面数之和 {total} 与 instance_num {count} 不一致",
    "create_info: the counts add up to {total}, not instance_num {count}",
)
NODE_CAPACITY = define(
    6014, 409, "create_info: 节点 {ip} 的{resource}不足: 需要 {needed}, 可用 {free}",
    "create_info: node {ip} has not enough {resource_en}: {needed} needed, {free} free",
)
NODE_UNMEASURED = define(
    6015, 409, "create_info: 节点 {ip} 尚未上报资源信息, 请稍后再试",
    "create_info: node {ip} has not reported its resources yet, try again shortly",
)
POSTFIX_TOO_SHORT = define(
    6016, 400, "postfix: {postfix} 位数字不足以表示到 {last}", "postfix: {postfix} digits cannot hold the number {last}"
)
NAME_COLLISION = define(
    6017, 409, "prefix: 桌面名称 {names} 已存在", "prefix: the desktop names {names} already exist"
)
SUBNET_TOO_SMALL = define(
    6018, 409, "子网 {subnet} 只有 {free} 个空闲地址, 不够 {count} 个桌面",
    "subnet {subnet} has {free} free addresses, not enough for {count} desktops",
)
BAD_COUNT = define(6019, 400, "create_info: 节点 {ip} 的桌面数 {count} 必须是正整数", "create_info: the count {count} of node {ip} must be a positive integer")

# -- boot-storm admission ------------------------------------------------------------------------------
START_QUEUE_TIMEOUT = define(
    6030, 503, "节点 {ip} 启动排队超时 ({seconds} 秒)", "node {ip}: waited {seconds} s for a start slot, giving up"
)

# -- desktop groups and desktops ---------------------------------------------------------------------
DESKTOP_NODE_FAILED = define(
    6040, 502, "桌面 {name}: 节点 {ip} 操作失败: {reason}", "desktop {name}: the operation failed on node {ip}: {reason}"
)
TEMPLATE_UPDATING = define(
    6041, 409, "模板 {name} 正在更新, 桌面组 {group} 的操作暂时不可用",
    "template {name} is updating: the operations of desktop group {group} are disabled until it is done",
)
TEMPLATE_NOT_SAVED = define(
    6042, 409, "template_uuid: 模板 {name} 还没有保存的版本", "template_uuid: template {name} has no saved version yet"
)
TEMPLATE_NOT_ON_NODE = define(
    6043, 409, "create_info: 节点 {ip} 上还没有模板 {name} 的版本 {version}",
    "create_info: node {ip} does not have version {version} of template {name} yet",
)
GROUP_INACTIVE = define(
    6044, 409, "桌面组 {name} 未激活, 不能开机", "desktop group {name} is inactive and cannot be started"
)
DESKTOPS_FAILED = define(
    6045, 502, "桌面组 {name}: {failed}/{total} 个桌面操作失败, 例如 {example}",
    "desktop group {name}: {failed} of {total} desktops failed, e.g. {example}",
)
NOT_IN_GROUP = define(
    6046, 400, "桌面 {name} 不属于桌面组 {group}", "desktop {name} does not belong to desktop group {group}"
)
POOL_MISMATCH = define(
    6047, 400, "pool_uuid: 模板 {name} 属于另一个资源池", "pool_uuid: template {name} belongs to another resource pool"
)
DESKTOP_OFFLINE_NODE = define(
    6048, 409, "桌面 {name}: 节点 {ip} 当前状态为 {state}", "desktop {name}: node {ip} is {state}"
)
NO_CONSOLE = define(
    6049, 409, "桌面 {name} 未运行, 没有控制台", "desktop {name} is not running and has no console"
)
CONSOLE_MISSING = define(
    6050, 501, "此控制器没有安装控制台服务", "this controller has no console relay installed"
)
