"""Teaching desktop groups: create, start, stop, reboot, delete, activate, deactivate (batches), edit,
paged query with counts (contract #83-#91)."""
from __future__ import annotations

from typing import Any

from twisted.internet import defer

from kvmdesk.api.router import Action, ApiRequest, Router
from kvmdesk.core import errors
from kvmdesk.core.errors import ApiError
from kvmdesk.core.paging import paged_search
from kvmdesk.core.records import new_record, now_text
from kvmdesk.core.store import DuplicateKeyError
from kvmdesk.plugins.desktops import codes, creation, power, schema
from kvmdesk.plugins.desktops.domain_ops import DomainOps, restores
from kvmdesk.plugins.desktops.lookups import NAMES, names_of, record_or_404
from kvmdesk.plugins.desktops.models import DesktopGroupCreate, DesktopGroupEdit, DesktopGroups

BASE = "/education/desktop"
TAGS = ("teaching_desktop_groups",)
GROUP = NAMES[schema.DESKTOP_GROUPS]
SEARCH_FIELDS = {"uuid": str, "name": str, "group": str, "template": str, "pool": str, "network": str, "subnet": str,
                 "active": bool, "sys_restore": int, "data_restore": int, "prefix": str, "owner": str, "order_num": int}
#: Groups of one batch worked on at once (each group's desktops all go at once, starts queued per node).
GROUPS_AT_ONCE = 8
#: What the query shows of a group record (the rest is bookkeeping).
HIDDEN = ("postfix_next",)


async def check_subnet(core: Any, network_uuid: str, subnet_uuid: str) -> dict:
    await record_or_404(core, schema.NETWORKS, network_uuid)
    subnet = await record_or_404(core, schema.SUBNETS, subnet_uuid)
    if subnet.get("network_uuid") != network_uuid:
        raise ApiError(codes.SUBNET_NOT_IN_NETWORK, subnet=subnet.get("name"), network=network_uuid)
    return subnet


def devices_of(template: dict) -> list[dict]:
    return [{"type": d.get("type"), "boot_index": d.get("boot_index"), "size": d.get("size")}
            for d in sorted(template.get("devices") or [], key=lambda d: d.get("boot_index", 0))]


async def create(req: ApiRequest) -> dict:
    body: DesktopGroupCreate = req.body
    core = req.core
    req.oplog_detail = f"{body.name} ({body.instance_num})"
    await record_or_404(core, schema.TEACHING_GROUPS, body.group_uuid)
    template = await record_or_404(core, schema.TEMPLATES, body.template_uuid)
    pool = await record_or_404(core, schema.POOLS, body.pool_uuid)
    if template.get("pool_uuid") not in (None, pool["uuid"]):
        raise ApiError(codes.POOL_MISMATCH, name=template.get("name"))
    subnet = await check_subnet(core, body.network_uuid, body.subnet_uuid)
    creation.check_template(template, body.name)
    record = new_record(
        core.clock, name=body.name, owner=(req.admin or {}).get("username") or "", group=body.group_uuid,
        template=template["uuid"], pool=pool["uuid"], network=body.network_uuid, subnet=body.subnet_uuid,
        vcpu=body.vcpu, ram=body.ram, sys_restore=body.sys_restore, data_restore=body.data_restore,
        prefix=body.prefix, postfix=body.postfix, postfix_start=body.postfix_start,
        postfix_next=body.postfix_start + body.instance_num, order_num=0, active=True,
        os_type=template.get("os_type"), devices=devices_of(template), create_info=dict(body.create_info))
    groups = core.store.collection(schema.DESKTOP_GROUPS)
    try:
        await groups.insert_one(record)
    except DuplicateKeyError:
        raise ApiError(errors.ALREADY_EXISTS, resource=GROUP, key=body.name) from None
    try:
        await creation.make_desktops(core, record, template, subnet, body.create_info, body.instance_num,
                                     body.postfix_start)
    except BaseException:
        await groups.delete_one({"uuid": record["uuid"]})
        raise
    await core.created(schema.DESKTOP_GROUP_KIND, record)
    return (await with_counts(core, [record]))[0]


async def with_counts(core: Any, groups: list[dict]) -> list[dict]:
    """Add the contract's counts and names: instance_num, active/inactive counts, group, template,
    pool and network names, the template's status."""
    store = core.store
    uuids = [g["uuid"] for g in groups]
    totals, active = await defer.gatherResults([
        defer.ensureDeferred(store.collection(schema.DESKTOPS).count_by("desktop_uuid", {"desktop_uuid": {"$in": uuids}})),
        defer.ensureDeferred(store.collection(schema.DESKTOPS).count_by(
            "desktop_uuid", {"desktop_uuid": {"$in": uuids}, "status": "active"})),
    ])
    teaching = await names_of(core, schema.TEACHING_GROUPS, {g["group"] for g in groups})
    pools = await names_of(core, schema.POOLS, {g["pool"] for g in groups})
    networks = await names_of(core, schema.NETWORKS, {g["network"] for g in groups})
    templates = {t["uuid"]: t for t in await store.collection(schema.TEMPLATES).find(
        {"uuid": {"$in": sorted({g["template"] for g in groups})}}, projection=["uuid", "name", "status"])}
    shown = []
    for group in groups:
        total, on = totals.get(group["uuid"], 0), active.get(group["uuid"], 0)
        template = templates.get(group["template"], {})
        shown.append({
            **{k: v for k, v in group.items() if k not in HIDDEN},
            "group_name": teaching.get(group["group"]), "template_name": template.get("name"),
            "template_status": template.get("status"), "pool_name": pools.get(group["pool"]),
            "network_name": networks.get(group["network"]), "instance_num": total, "active_count": on,
            "inactive_count": total - on,
        })
    return shown


async def group_desktops(core: Any, group_uuid: str) -> list[dict]:
    return await core.store.collection(schema.DESKTOPS).find({"desktop_uuid": group_uuid}, sort=[("id", 1)])


async def on_every_desktop(core: Any, group: dict, operation: str, lang: str = "zh") -> None:
    """Run ``operation`` on every desktop of the group; the group fails if any desktop did (the others
    went on), with the count and the first reason."""
    desktops = await group_desktops(core, group["uuid"])
    if not desktops:
        return
    ctx = await power.Context.load(core, group, sorted({d["node"] for d in desktops}))
    failures = await power.each(ctx, desktops, operation)
    if failures:
        first, exc = failures[0]
        raise ApiError(codes.DESKTOPS_FAILED, data={"failures": [
            {"uuid": d["uuid"], "name": d["name"], "code": e.error.code, "msg": e.message(lang)} for d, e in failures]},
            name=group["name"], failed=len(failures), total=len(desktops), example=f"{first['name']}: {exc.message(lang)}")


async def usable_group(req: ApiRequest, uuid: str, *, starting: bool = False) -> dict:
    group = await record_or_404(req.core, schema.DESKTOP_GROUPS, uuid)
    template = await req.core.store.collection(schema.TEMPLATES).find_one({"uuid": group["template"]}) or {}
    if template.get("status") == "updating":
        raise ApiError(codes.TEMPLATE_UPDATING, name=template.get("name"), group=group["name"])
    if starting and not group.get("active"):
        raise ApiError(codes.GROUP_INACTIVE, name=group["name"])
    return group


def group_refs(req: ApiRequest) -> list[dict]:
    """The request's ``desktops`` references, each once, and the oplog's detail (the first ten names)."""
    refs = list({d.uuid: {"uuid": d.uuid, "name": d.name} for d in req.body.desktops}.values())
    req.oplog_detail = ", ".join(r["name"] or r["uuid"] for r in refs[:10])
    return refs


def power_action(operation: str) -> Any:
    async def handler(req: ApiRequest) -> dict:
        async def one(ref: dict) -> None:
            group = await usable_group(req, ref["uuid"], starting=operation in ("start", "reboot"))
            await on_every_desktop(req.core, group, operation, req.lang)

        return await req.core.jobs.run_items(req, f"desktop_groups.{operation}", group_refs(req), one,
                                             concurrency=GROUPS_AT_ONCE)

    handler.__name__ = f"{operation}_groups"
    return handler


def activation(active: bool) -> Any:
    async def handler(req: ApiRequest) -> dict:
        async def one(ref: dict) -> None:
            await record_or_404(req.core, schema.DESKTOP_GROUPS, ref["uuid"])
            changes = {"active": active, "updated_at": now_text(req.core.clock)}
            updated = await req.core.store.collection(schema.DESKTOP_GROUPS).find_one_and_update(
                {"uuid": ref["uuid"]}, {"$set": changes})
            if updated is not None:
                await req.core.updated(schema.DESKTOP_GROUP_KIND, updated, changes)

        return await req.core.jobs.run_items(req, "desktop_groups.active" if active else "desktop_groups.inactive",
                                             group_refs(req), one)

    return handler


async def delete(req: ApiRequest) -> dict:
    async def one(ref: dict) -> None:
        group = await usable_group(req, ref["uuid"])
        await on_every_desktop(req.core, group, "delete", req.lang)
        await req.core.refuse_if_used(schema.DESKTOP_GROUP_KIND, group["uuid"], GROUP.named(group["name"]))
        await req.core.store.collection(schema.DESKTOP_GROUPS).delete_one({"uuid": group["uuid"]})
        for key in schema.lesson_keys(group["uuid"]):
            await req.core.scheduler.cancel(key)  # its timetable
        await req.core.deleted(schema.DESKTOP_GROUP_KIND, group)

    return await req.core.jobs.run_items(req, "desktop_groups.delete", group_refs(req), one, concurrency=GROUPS_AT_ONCE)


async def edit(req: ApiRequest) -> dict:
    body: DesktopGroupEdit = req.body
    core = req.core
    group = await usable_group(req, body.uuid)
    changes = {k: v for k, v in body.value.model_dump().items() if v is not None}
    req.oplog_detail = group["name"] + (f" -> {changes['name']}" if changes.get("name", group["name"]) != group["name"] else "")
    changes["updated_at"] = now_text(core.clock)
    try:
        updated = await core.store.collection(schema.DESKTOP_GROUPS).find_one_and_update({"uuid": group["uuid"]},
                                                                                         {"$set": changes})
    except DuplicateKeyError:
        raise ApiError(errors.ALREADY_EXISTS, resource=GROUP, key=changes.get("name")) from None
    if updated is None:
        raise ApiError(errors.NOT_FOUND, resource=GROUP, key=group["uuid"])
    await core.updated(schema.DESKTOP_GROUP_KIND, updated, changes)
    if restores(updated) != restores(group):
        await redefine_all(req, updated)
    return (await with_counts(core, [updated]))[0]


async def redefine_all(req: ApiRequest, group: dict) -> None:
    """Restore flags turned on or off: every domain is defined again, so ``on_reboot`` follows them
    (a running domain takes it at its next start)."""
    desktops = await group_desktops(req.core, group["uuid"])
    if not desktops:
        return
    ctx = await power.Context.load(req.core, group, sorted({d["node"] for d in desktops}))
    ops = DomainOps(req.core)
    failures = []
    for desktop in desktops:
        try:
            await ops.redefine(ctx.node_of(desktop), desktop, group, ctx.template, ctx.nic)
        except ApiError as exc:
            failures.append((desktop, exc))
    if failures:
        first, exc = failures[0]
        raise ApiError(codes.DESKTOPS_FAILED, name=group["name"], failed=len(failures), total=len(desktops),
                       example=f"{first['name']}: {exc.message(req.lang)}")


ACTIONS = {
    "create": Action(create, "Create a teaching desktop group (placement per node, names, addresses)", DesktopGroupCreate,
                     "新增教学桌面组"),
    "start": Action(power_action("start"), "Start desktop groups (batch)", DesktopGroups, "教学桌面组开机"),
    "stop": Action(power_action("stop"), "Stop desktop groups (batch)", DesktopGroups, "教学桌面组关机"),
    "reboot": Action(power_action("reboot"), "Reboot desktop groups (batch)", DesktopGroups, "教学桌面组重启"),
    "active": Action(activation(True), "Activate desktop groups (batch)", DesktopGroups, "激活教学桌面组"),
    "inactive": Action(activation(False), "Deactivate desktop groups (batch)", DesktopGroups, "教学桌面组未激活"),
}


def register_routes(router: Router) -> None:
    router.actions(BASE + "/", ACTIONS, tags=TAGS)
    router.endpoint("DELETE", BASE + "/", summary="Delete desktop groups (batch): their desktops are stopped and removed",
                    body=DesktopGroups, tags=TAGS, oplog="删除教学桌面组")(delete)
    router.endpoint("PUT", BASE, summary="Edit a desktop group (name, restore flags, order)", body=DesktopGroupEdit,
                    tags=TAGS, oplog="修改教学桌面组")(edit)

    @router.endpoint("GET", BASE + "/", summary="Query teaching desktop groups, paged, with counts", tags=TAGS,
                     search_fields=SEARCH_FIELDS)
    async def list_desktop_groups(req: ApiRequest) -> Any:
        return await paged_search(req, req.core.store.collection(schema.DESKTOP_GROUPS), SEARCH_FIELDS,
                                  sort=[("order_num", 1), ("id", 1)], decorate=lambda gs: with_counts(req.core, gs),
                                  resource=GROUP)
