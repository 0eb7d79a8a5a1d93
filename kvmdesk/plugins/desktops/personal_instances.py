"""Personal desktops: start, stop, hard stop, reboot, add, delete (batches) and the paged query with the
bound user (contract #128-#134), through the teaching desktops' power and creation modules."""
from __future__ import annotations

import ipaddress
from typing import Any

from kvmdesk.api.router import Action, ApiRequest, Router
from kvmdesk.core import errors
from kvmdesk.core.errors import ApiError
from kvmdesk.core.paging import paged_search
from kvmdesk.core.records import now_text
from kvmdesk.plugins.desktops import creation, personal_codes as codes, schema
from kvmdesk.plugins.desktops.desktop_groups import check_subnet
from kvmdesk.plugins.desktops.instances import GROUP_NUMBERS, SEARCH_FIELDS, on_members, public
from kvmdesk.plugins.desktops.lookups import record_or_404
from kvmdesk.plugins.desktops.personal_groups import fixed_allocator, no_addresses, personal_group
from kvmdesk.plugins.desktops.personal_models import PersonalDesktops, PersonalDesktopsAdd
from kvmdesk.plugins.desktops.personal_schema import PERSONAL_GROUPS

BASE = "/personal/instance"
TAGS = ("personal_desktops",)


def power_action(operation: str) -> Any:
    async def handler(req: ApiRequest) -> dict:
        body: PersonalDesktops = req.body
        group = await personal_group(req.core, body.desktop_uuid, name=body.desktop_name)
        return await on_members(req, group, body.instances, operation)

    handler.__name__ = f"{operation}_personal_desktops"
    return handler


async def add(req: ApiRequest) -> dict:
    """#131: more desktops in a group (after its highest number; ``prefix`` names them if given).  A
    fixed-address group continues after its last address."""
    body: PersonalDesktopsAdd = req.body
    core = req.core
    group = await personal_group(core, body.desktop_uuid, name=body.desktop_name)
    req.oplog_detail = f"{group['name']} +{body.instance_num}"
    template = await record_or_404(core, schema.TEMPLATES, group["template"])
    creation.check_template(template, group["name"])
    subnet = await check_subnet(core, group["network"], group["subnet"]) if group.get("network") else None
    first = creation.next_number(group)
    claimed = await core.store.collection(PERSONAL_GROUPS).find_one_and_update(
        {"uuid": group["uuid"], "postfix_next": group.get("postfix_next")},
        {"$set": {"postfix_next": first + body.instance_num, "updated_at": now_text(core.clock)}})
    if claimed is None:
        raise ApiError(errors.ALREADY_EXISTS, resource=GROUP_NUMBERS, key=group["name"])
    allocate = None if subnet else no_addresses
    if group.get("allocate_type") == 2 and subnet:
        taken = await core.store.collection(schema.DESKTOPS).find({"desktop_uuid": group["uuid"], "ipaddr": {"$ne": None}},
                                                                  projection=["ipaddr"])
        last = max((ipaddress.IPv4Address(d["ipaddr"]) for d in taken), default=None)
        allocate = fixed_allocator(str(last + 1) if last else group["allocate_start"])
    shaped = {**group, "prefix": body.prefix or group["prefix"]}
    try:
        made = await creation.make_desktops(core, shaped, template, subnet, body.create_info, body.instance_num, first,
                                            allocate=allocate)
    except BaseException:
        await core.store.collection(PERSONAL_GROUPS).update_one(
            {"uuid": group["uuid"], "postfix_next": first + body.instance_num}, {"$set": {"postfix_next": first}})
        raise
    await core.store.collection(schema.DESKTOPS).update_many({"uuid": {"$in": [d["uuid"] for d in made]}}, {"$set": {
        "user_uuid": None, "bind_uuid": None, "holder": None, "holder_session": None}})
    return {"success_num": len(made), "failed_num": 0, "failures": [], "instances": [public(core, d) for d in made]}


async def delete(req: ApiRequest) -> dict:
    body: PersonalDesktops = req.body
    group = await personal_group(req.core, body.desktop_uuid, name=body.desktop_name)
    return await on_members(req, group, body.instances, "delete")


ACTIONS = {
    "start": Action(power_action("start"), "Start personal desktops (batch)", PersonalDesktops, "个人桌面开机"),
    "stop": Action(power_action("stop"), "Stop personal desktops (batch)", PersonalDesktops, "个人桌面关机"),
    "hard_stop": Action(power_action("hard_stop"), "Power personal desktops off at once (batch)", PersonalDesktops,
                        "个人桌面强制关机"),
    "reboot": Action(power_action("reboot"), "Reboot personal desktops (batch)", PersonalDesktops, "个人桌面重启"),
    "create": Action(add, "Add desktops to a personal group with per-node placement", PersonalDesktopsAdd, "添加个人桌面"),
}


def register_routes(router: Router) -> None:
    router.actions(BASE + "/", ACTIONS, tags=TAGS)
    router.endpoint("DELETE", BASE + "/", summary="Delete personal desktops (batch): a running desktop is stopped first",
                    body=PersonalDesktops, tags=TAGS, oplog="删除个人桌面")(delete)

    @router.endpoint("GET", BASE + "/", summary="Query a personal group's desktops, paged, with the bound user "
                     "(?desktop_uuid=<group>)", tags=TAGS, search_fields=SEARCH_FIELDS)
    async def list_personal_desktops(req: ApiRequest) -> Any:
        # ?desktop_uuid=<group>: one group's desktops (the contract's use); without it, every personal desktop.
        groups = await req.core.store.collection(PERSONAL_GROUPS).find({}, projection=["uuid"])
        return await paged_search(req, req.core.store.collection(schema.DESKTOPS), SEARCH_FIELDS,
                                  fixed={"desktop_uuid": {"$in": [g["uuid"] for g in groups]}}, sort=[("name", 1)],
                                  decorate=lambda ds: _shown(req.core, ds), resource=codes.PERSONAL_DESKTOP)


async def _shown(core: Any, desktops: list[dict]) -> list[dict]:
    return [public(core, d) for d in desktops]
