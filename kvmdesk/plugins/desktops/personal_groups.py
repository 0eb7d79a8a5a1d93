"""Personal desktop groups: create (#113), start, stop, reboot, delete (batches, #114-#116, #118), edit
(#117), maintenance on/off (#119-#120), paged query (#121).

Desktops are made, powered and removed by the teaching desktops' modules (:mod:`.creation`,
:mod:`.power`, :func:`.desktop_groups.on_every_desktop`); what is personal is the group record
(``desktop_type`` 1 random / 2 static, ``allocate_type`` 1 system / 2 fixed from ``allocate_start``,
``maintenance``, a static group's user group ``group_uuid``), the random bindings and the static
users.  Maintenance is a flag: while it is on the portal gives none of the group's desktops to anyone
(409, 6502); the administrators' endpoints work as usual.  Entering maintenance does not take desktops
from users who hold them.
"""
from __future__ import annotations

import ipaddress
from typing import Any, Optional, Sequence

from kvmdesk.api.router import Action, ApiRequest, Router
from kvmdesk.core import errors
from kvmdesk.core.errors import ApiError
from kvmdesk.core.jobs import run_batch
from kvmdesk.core.paging import paged_search
from kvmdesk.core.records import new_record, now_text
from kvmdesk.core.store import DuplicateKeyError
from kvmdesk.plugins.desktops import codes as teaching_codes
from kvmdesk.plugins.desktops import creation, personal_codes as codes, planner, provisioning, schema
from kvmdesk.plugins.desktops.broker import EXTENSION as BROKER
from kvmdesk.plugins.desktops.desktop_groups import check_subnet, devices_of, group_refs, on_every_desktop, redefine_all
from kvmdesk.plugins.desktops.domain_ops import restores
from kvmdesk.plugins.desktops.lookups import names_of, record_or_404
from kvmdesk.plugins.desktops.models import DesktopGroupEdit
from kvmdesk.plugins.desktops.personal_models import PersonalGroupCreate, PersonalGroups, inconsistency
from kvmdesk.plugins.desktops.personal_schema import PERSONAL_GROUPS, RANDOM_BINDINGS, STATIC, USER_GROUPS, USERS

BASE = "/personal/desktop"
TAGS = ("personal_desktop_groups",)
SEARCH_FIELDS = {"uuid": str, "name": str, "template": str, "pool": str, "network": str, "subnet": str,
                 "desktop_type": int, "maintenance": bool, "sys_restore": int, "data_restore": int, "owner": str,
                 "group_uuid": str, "order_num": int}
HIDDEN = ("postfix_next",)


async def personal_group(core: Any, uuid: str, *, name: Optional[str] = None) -> dict:
    """The group, or 404; refused while its template is updating (as teaching groups)."""
    group = await core.store.collection(PERSONAL_GROUPS).find_one({"uuid": uuid})
    if group is None:
        raise ApiError(errors.NOT_FOUND, resource=codes.PERSONAL_GROUP, key=name or uuid)
    template = await core.store.collection(schema.TEMPLATES).find_one({"uuid": group["template"]}) or {}
    if template.get("status") == "updating":
        raise ApiError(teaching_codes.TEMPLATE_UPDATING, name=template.get("name"), group=group["name"])
    return group


async def user_group_or_404(core: Any, uuid: str) -> dict:
    found = await core.store.collection(USER_GROUPS).find_one({"uuid": uuid})
    if found is None:
        raise ApiError(errors.NOT_FOUND, resource=codes.USER_GROUP, key=uuid)
    return found


def fixed_allocator(start: str) -> Any:
    """Addresses ``start``, ``start+1``... for the desktops, all or none (#113 ``allocate_type`` 2)."""

    async def allocate(core: Any, subnet: dict, desktop_uuids: Sequence[str]) -> list[str]:
        first = ipaddress.IPv4Address(start)
        wanted = [str(first + i) for i in range(len(desktop_uuids))]
        low, high = ipaddress.IPv4Address(subnet["start_ip"]), ipaddress.IPv4Address(subnet["end_ip"])
        if not (low <= first and first + len(desktop_uuids) - 1 <= high):
            raise ApiError(codes.FIXED_OUTSIDE_SUBNET, start=wanted[0], end=str(first + len(desktop_uuids) - 1),
                           subnet=subnet.get("name"), first=str(low), last=str(high))
        ipam = core.extensions["ipam"]
        taken = {a["ip"] for a in await ipam.allocations(subnet["uuid"])}
        clash = next((ip for ip in wanted if ip in taken), None)
        if clash is not None:
            raise ApiError(codes.FIXED_TAKEN, ip=clash)
        done: list[str] = []
        try:
            for ip, uuid in zip(wanted, desktop_uuids):
                try:
                    await ipam.allocate(subnet["uuid"], ip, owner=provisioning.owner_of(uuid))
                except ApiError as exc:
                    if exc.error.status == 409:
                        raise ApiError(codes.FIXED_TAKEN, ip=ip) from None
                    raise
                done.append(uuid)
        except BaseException:
            await provisioning.release_addresses(core, done)
            raise
        return wanted

    return allocate


async def no_addresses(core: Any, subnet: Any, desktop_uuids: Sequence[str]) -> list[None]:
    """Without a network the environment's DHCP gives the addresses (#113 ``allocate_type`` 1)."""
    return [None] * len(desktop_uuids)


async def check_allocates(core: Any, body: PersonalGroupCreate, names: list[str]) -> tuple[Optional[str], dict[str, dict]]:
    """A static group's users: one user group, known desktop names, each user and name once.

    :returns: the user group's uuid and ``{desktop name: user}``.
    """
    group_uuid = body.group_uuid
    if group_uuid is not None:
        await user_group_or_404(core, group_uuid)
    pairs = body.allocates or []
    seen_users: set[str] = set()
    seen_names: set[str] = set()
    for pair in pairs:
        for value, seen, what in ((pair.user_uuid, seen_users, ("用户", "user")), (pair.name, seen_names, ("桌面", "desktop"))):
            if value in seen:
                raise ApiError(codes.DUPLICATE_ALLOCATION, what=what[0], what_en=what[1], value=value)
            seen.add(value)
        if pair.name not in names:
            raise ApiError(codes.UNKNOWN_DESKTOP_NAME, name=pair.name)
    users = {u["uuid"]: u for u in await core.store.collection(USERS).find({"uuid": {"$in": sorted(seen_users)}})} if pairs else {}
    bound: dict[str, dict] = {}
    for pair in pairs:
        user = users.get(pair.user_uuid)
        if user is None:
            raise ApiError(errors.NOT_FOUND, resource=errors.Resource("用户", "user"), key=pair.user_uuid)
        group_uuid = group_uuid or user.get("group")
        if user.get("group") != group_uuid:
            group = await core.store.collection(USER_GROUPS).find_one({"uuid": group_uuid}) or {}
            raise ApiError(codes.USER_OTHER_GROUP, field="allocates", user=user["user_name"], group=group.get("name", group_uuid))
        bound[pair.name] = user
    return group_uuid, bound


async def create(req: ApiRequest) -> dict:
    body: PersonalGroupCreate = req.body
    problem = inconsistency(body)
    if problem:
        raise ApiError(errors.INVALID_PARAM, field=problem[0], reason=problem[1])
    core = req.core
    req.oplog_detail = f"{body.name} ({body.instance_num})"
    template = await record_or_404(core, schema.TEMPLATES, body.template_uuid)
    pool = await record_or_404(core, schema.POOLS, body.pool_uuid)
    if template.get("pool_uuid") not in (None, pool["uuid"]):
        raise ApiError(teaching_codes.POOL_MISMATCH, name=template.get("name"))
    subnet = await check_subnet(core, body.network_uuid, body.subnet_uuid) if body.network_uuid else None
    creation.check_template(template, body.name)
    names = planner.desktop_names(body.prefix, body.postfix, body.postfix_start, body.instance_num)
    user_group, bound = await check_allocates(core, body, names) if body.desktop_type == STATIC else (None, {})
    user_groups = sorted(set(body.groups or []))
    for uuid in user_groups:
        await user_group_or_404(core, uuid)
    record = new_record(
        core.clock, name=body.name, owner=(req.admin or {}).get("username") or "", group=None, template=template["uuid"],
        pool=pool["uuid"], network=body.network_uuid, subnet=body.subnet_uuid, allocate_type=body.allocate_type,
        allocate_start=body.allocate_start, vcpu=body.vcpu, ram=body.ram, sys_restore=body.sys_restore,
        data_restore=body.data_restore, desktop_type=body.desktop_type, group_uuid=user_group, prefix=body.prefix,
        postfix=body.postfix, postfix_start=body.postfix_start, postfix_next=body.postfix_start + body.instance_num,
        order_num=0, maintenance=False, os_type=template.get("os_type"), devices=devices_of(template),
        create_info=dict(body.create_info))
    groups = core.store.collection(PERSONAL_GROUPS)
    try:
        await groups.insert_one(record)
    except DuplicateKeyError:
        raise ApiError(errors.ALREADY_EXISTS, resource=codes.PERSONAL_GROUP, key=body.name) from None
    allocate = fixed_allocator(body.allocate_start) if body.allocate_type == 2 else (None if subnet else no_addresses)
    try:
        made = await creation.make_desktops(core, record, template, subnet, body.create_info, body.instance_num,
                                            body.postfix_start, allocate=allocate)
    except BaseException:
        await groups.delete_one({"uuid": record["uuid"]})
        raise
    desktops = core.store.collection(schema.DESKTOPS)
    for desktop in made:
        user = bound.get(desktop["name"])
        await desktops.update_one({"uuid": desktop["uuid"]}, {"$set": {
            "user_uuid": user["uuid"] if user else None, "user_name": user["user_name"] if user else "",
            "bind_uuid": new_record(core.clock)["uuid"] if user else None, "holder": None, "holder_session": None}})
    bindings = core.store.collection(RANDOM_BINDINGS)
    for uuid in user_groups:
        found = await core.store.collection(USER_GROUPS).find_one({"uuid": uuid}) or {}
        await bindings.insert_one(new_record(core.clock, desktop=record["uuid"], group_uuid=uuid, group_name=found.get("name")))
    core.extensions[BROKER].forget()
    return (await with_counts(core, [record]))[0]


def power_action(operation: str) -> Any:
    async def handler(req: ApiRequest) -> dict:
        async def one(ref: dict) -> None:
            group = await personal_group(req.core, ref["uuid"], name=ref["name"])
            await on_every_desktop(req.core, group, operation, req.lang)

        return await req.core.jobs.run_items(req, f"personal_groups.{operation}", group_refs(req), one)

    handler.__name__ = f"{operation}_personal_groups"
    return handler


async def delete(req: ApiRequest) -> dict:
    """Every desktop goes (running ones stopped first), then the bindings and the group."""
    core = req.core

    async def one(ref: dict) -> None:
        group = await personal_group(core, ref["uuid"], name=ref["name"])
        await on_every_desktop(core, group, "delete", req.lang)
        await core.store.collection(RANDOM_BINDINGS).delete_many({"desktop": group["uuid"]})
        await core.store.collection(PERSONAL_GROUPS).delete_one({"uuid": group["uuid"]})

    try:
        return await req.core.jobs.run_items(req, "personal_groups.delete", group_refs(req), one)
    finally:
        core.extensions[BROKER].forget()


async def edit(req: ApiRequest) -> dict:
    body: DesktopGroupEdit = req.body
    core = req.core
    group = await personal_group(core, body.uuid, name=body.name)
    changes = {k: v for k, v in body.value.model_dump().items() if v is not None}
    req.oplog_detail = group["name"] + (f" -> {changes['name']}" if changes.get("name", group["name"]) != group["name"] else "")
    changes["updated_at"] = now_text(core.clock)
    try:
        updated = await core.store.collection(PERSONAL_GROUPS).find_one_and_update({"uuid": group["uuid"]}, {"$set": changes})
    except DuplicateKeyError:
        raise ApiError(errors.ALREADY_EXISTS, resource=codes.PERSONAL_GROUP, key=changes.get("name")) from None
    if updated is None:
        raise ApiError(errors.NOT_FOUND, resource=codes.PERSONAL_GROUP, key=group["uuid"])
    core.extensions[BROKER].forget()
    if restores(updated) != restores(group):
        await redefine_all(req, updated)
    return (await with_counts(core, [updated]))[0]


def set_maintenance(on: bool) -> Any:
    async def handler(req: ApiRequest) -> dict:
        groups = req.core.store.collection(PERSONAL_GROUPS)

        async def one(ref: dict) -> None:
            changed = await groups.update_one({"uuid": ref["uuid"]}, {"$set": {"maintenance": on,
                                                                               "updated_at": now_text(req.core.clock)}})
            if not changed and await groups.find_one({"uuid": ref["uuid"]}) is None:
                raise ApiError(errors.NOT_FOUND, resource=codes.PERSONAL_GROUP, key=ref["name"] or ref["uuid"])

        try:
            return await run_batch(req, group_refs(req), one)
        finally:
            req.core.extensions[BROKER].forget()

    handler.__name__ = "enter_maintenance" if on else "exit_maintenance"
    return handler


async def with_counts(core: Any, groups: list[dict]) -> list[dict]:
    """The contract's counts and names: desktops, running ones, held (random), bound user groups; the
    template's, pool's, network's and (static) user group's names."""
    uuids = [g["uuid"] for g in groups]
    desktops = core.store.collection(schema.DESKTOPS)
    totals = await desktops.count_by("desktop_uuid", {"desktop_uuid": {"$in": uuids}})
    active = await desktops.count_by("desktop_uuid", {"desktop_uuid": {"$in": uuids}, "status": "active"})
    held = await desktops.count_by("desktop_uuid", {"desktop_uuid": {"$in": uuids}, "holder": {"$ne": None}})
    bound = await core.store.collection(RANDOM_BINDINGS).count_by("desktop", {"desktop": {"$in": uuids}})
    templates = await names_of(core, schema.TEMPLATES, {g["template"] for g in groups if g.get("template")})
    pools = await names_of(core, schema.POOLS, {g["pool"] for g in groups if g.get("pool")})
    networks = await names_of(core, schema.NETWORKS, {g["network"] for g in groups if g.get("network")})
    user_groups = await names_of(core, USER_GROUPS, {g["group_uuid"] for g in groups if g.get("group_uuid")})
    return [{**{k: v for k, v in g.items() if k not in HIDDEN}, "template_name": templates.get(g["template"]),
             "pool_name": pools.get(g["pool"]), "network_name": networks.get(g.get("network")),
             "group_name": user_groups.get(g.get("group_uuid")), "instance_num": totals.get(g["uuid"], 0),
             "active_count": active.get(g["uuid"], 0), "inactive_count": totals.get(g["uuid"], 0) - active.get(g["uuid"], 0),
             "held_count": held.get(g["uuid"], 0), "group_count": bound.get(g["uuid"], 0)} for g in groups]


ACTIONS = {
    "create": Action(create, "Create a personal desktop group: random (user groups) or static (a desktop per user), "
                     "addresses by the system or fixed from allocate_start", PersonalGroupCreate, "新增个人桌面组"),
    "start": Action(power_action("start"), "Start personal desktop groups (batch)", PersonalGroups, "个人桌面组开机"),
    "stop": Action(power_action("stop"), "Stop personal desktop groups (batch)", PersonalGroups, "个人桌面组关机"),
    "reboot": Action(power_action("reboot"), "Reboot personal desktop groups (batch)", PersonalGroups, "个人桌面组重启"),
    "enter_maintenance": Action(set_maintenance(True), "Personal groups enter maintenance: users get no desktop of them "
                                "(batch)", PersonalGroups, "个人桌面组开启维护模式"),
    "exit_maintenance": Action(set_maintenance(False), "Personal groups leave maintenance (batch)", PersonalGroups,
                               "个人桌面组关闭维护模式"),
}


def register_routes(router: Router) -> None:
    router.actions(BASE + "/", ACTIONS, tags=TAGS)
    router.endpoint("DELETE", BASE + "/", summary="Delete personal desktop groups (batch): desktops, bindings, group",
                    body=PersonalGroups, tags=TAGS, oplog="删除个人桌面组")(delete)
    router.endpoint("PUT", BASE + "/", summary="Edit a personal desktop group (name, restore flags, order)",
                    body=DesktopGroupEdit, tags=TAGS, oplog="修改个人桌面组")(edit)

    @router.endpoint("GET", BASE + "/", summary="Query personal desktop groups, paged, with counts", tags=TAGS,
                     search_fields=SEARCH_FIELDS)
    async def list_groups(req: ApiRequest) -> Any:
        return await paged_search(req, req.core.store.collection(PERSONAL_GROUPS), SEARCH_FIELDS,
                                  sort=[("order_num", 1), ("id", 1)], decorate=lambda gs: with_counts(req.core, gs),
                                  resource=codes.PERSONAL_GROUP)


async def usage(core: Any, kind: str, uuid: str) -> Optional[str]:
    """``kvmdesk_usage``: personal groups hold templates, subnets and user groups (random bindings, a
    static group's user group); static desktops hold their users."""
    groups = core.store.collection(PERSONAL_GROUPS)
    found: list[dict] = []
    if kind in ("template", "subnet"):
        found = await groups.find({kind: uuid}, projection=["name"], limit=3)
    elif kind == "user_group":
        bound = await core.store.collection(RANDOM_BINDINGS).find({"group_uuid": uuid}, projection=["desktop"], limit=3)
        found = await groups.find({"$or": [{"group_uuid": uuid}, {"uuid": {"$in": [b["desktop"] for b in bound]}}]},
                                  projection=["name"], limit=3)
    elif kind == "user":
        desktops = await core.store.collection(schema.DESKTOPS).find({"user_uuid": uuid}, projection=["name"], limit=3)
        names = ", ".join(d["name"] for d in desktops)
        return f"绑定了静态桌面 {names} (bound to static desktops {names})" if desktops else None
    names = ", ".join(g["name"] for g in found)
    return f"个人桌面组 {names} 正在使用 (used by personal desktop groups {names})" if found else None
