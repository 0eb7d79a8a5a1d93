"""Error codes of personal desktops and the desktop users' portal (6500-6999)."""
from __future__ import annotations

from kvmdesk.core.errors import Resource, define

PERSONAL_GROUP = Resource("个人桌面组", "personal desktop group")
PERSONAL_DESKTOP = Resource("个人桌面", "personal desktop")
USER_GROUP = Resource("用户分组", "user group")

# -- the desktop users' portal ------------------------------------------------------------------------
NO_DESKTOP_GROUP = define(
    6500, 404, "用户 {user} 没有可用的桌面 (未绑定任何个人桌面组)",
    "user {user} has no desktop to use (no personal desktop group is bound to them)",
)
NONE_FREE = define(
    6501, 409, "桌面组 {groups} 中没有空闲的桌面, 请稍后再试",
    "no free desktop in desktop group {groups}: try again later",
)
IN_MAINTENANCE = define(
    6502, 409, "桌面组 {groups} 正在维护, 暂时不能使用", "desktop group {groups} is under maintenance and cannot be used now"
)
GROUP_NOT_BOUND = define(
    6503, 403, "desktop_uuid: 桌面组 {group} 不属于用户 {user}", "desktop_uuid: desktop group {group} is not available to user {user}"
)
NOT_HELD = define(
    6504, 404, "用户 {user} 没有占用桌面 {desktop}", "user {user} does not hold desktop {desktop}"
)
DESKTOP_START_FAILED = define(
    6505, 502, "桌面 {name} 启动失败, 已释放: {reason}", "desktop {name} could not be started and was released: {reason}"
)

# -- personal desktop groups and bindings --------------------------------------------------------------
ALREADY_BOUND = define(
    6510, 409, "groups: 用户分组 {group} 已绑定到桌面组 {desktop}", "groups: user group {group} is already bound to desktop group {desktop}"
)
NOT_BOUND = define(
    6511, 404, "groups: 用户分组 {group} 没有绑定到桌面组 {desktop}", "groups: user group {group} is not bound to desktop group {desktop}"
)
NOT_RANDOM = define(
    6512, 400, "desktop_uuid: 桌面组 {name} 不是随机桌面组", "desktop_uuid: desktop group {name} is not a random desktop group"
)
FIXED_OUTSIDE_SUBNET = define(
    6513, 400, "allocate_start: 地址 {start}-{end} 不在子网 {subnet} 的范围 {first}-{last} 内",
    "allocate_start: the addresses {start}-{end} are not inside the range {first}-{last} of subnet {subnet}",
)
FIXED_TAKEN = define(
    6514, 409, "allocate_start: 地址 {ip} 已被占用", "allocate_start: the address {ip} is already taken"
)
USER_OTHER_GROUP = define(
    6515, 400, "{field}: 用户 {user} 不属于用户分组 {group}", "{field}: user {user} is not in user group {group}"
)
UNKNOWN_DESKTOP_NAME = define(
    6516, 400, "allocates: 桌面组中没有名为 {name} 的桌面", "allocates: the group has no desktop named {name}"
)
DUPLICATE_ALLOCATION = define(
    6517, 400, "allocates: {what} {value} 出现了两次", "allocates: {what_en} {value} appears twice"
)
NOT_STATIC = define(
    6518, 400, "桌面组 {name} 不是静态桌面组", "desktop group {name} is not a static desktop group"
)
NO_USER_GROUP = define(
    6519, 409, "静态桌面组 {name} 还没有绑定用户分组, 请先修改绑定的用户分组",
    "static desktop group {name} has no user group yet: set one with change_group first",
)
