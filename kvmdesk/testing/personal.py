"""Personal desktop groups and desktops as records, for tests and benches of the portal and broker.

Creating a group through the API (#113) makes domains on nodes; where that is not the point (who gets
which desktop), these helpers store the records the creation stores, in the same shape.
"""
from __future__ import annotations

from typing import Any, Optional

from kvmdesk.core.records import new_record

PERSONAL_GROUPS = "personal_groups"
DESKTOPS = "desktops"
RANDOM, STATIC = 1, 2


async def seed_personal_group(core: Any, name: str, count: int, *, desktop_type: int = RANDOM, node: Optional[dict] = None,
                              status: str = "active", template: str = "tpl", users: Optional[list[dict]] = None,
                              sys_restore: int = 0) -> tuple[dict, list[dict]]:
    """A personal group of ``count`` desktops on ``node`` (a node record), ``status`` each; a static
    group's desktops are bound to ``users`` in order.  Returns ``(group, desktops)``."""
    group = new_record(core.clock, name=name, desktop_type=desktop_type, template=template, pool=(node or {}).get("resource_pool_uuid"),
                       network=None, subnet=None, group=None, allocate_type=1, allocate_start=None, vcpu=1, ram=1,
                       sys_restore=sys_restore, data_restore=0, prefix=name, postfix=3, postfix_start=1,
                       postfix_next=count + 1, maintenance=False, owner="admin", order_num=0)
    await core.store.collection(PERSONAL_GROUPS).insert_one(group)
    desktops = []
    for number in range(1, count + 1):
        user = (users or [])[number - 1] if desktop_type == STATIC and users and number <= len(users) else None
        desktops.append(new_record(
            core.clock, name=f"{name}{number:03d}", desktop_uuid=group["uuid"], group=None, node=(node or {}).get("uuid"),
            node_ip=(node or {}).get("ip"), hostname=(node or {}).get("name"), vcpu=1, ram=1, status=status,
            power="on" if status == "active" else "off", up_time=None, message="", mac="52:54:00:00:00:00",
            vnc_password="x", template=template, template_version=1, ipaddr=None, holder=None, holder_session=None,
            held_at=None, user_uuid=user["uuid"] if user else None, user_name=user["user_name"] if user else ""))
    await core.store.collection(DESKTOPS).insert_many(desktops)
    return group, desktops
