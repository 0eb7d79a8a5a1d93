"""Teaching groups: create, edit, delete (batch), paged query with counts (contract #79-#82).

A teaching group names the data network and subnet its desktops take addresses from, and the range
of addresses its classroom's terminals (thin clients) use.  Its name shares one namespace with the
user groups (:mod:`kvmdesk.core.group_names`).
"""
from __future__ import annotations

import ipaddress
from typing import Any, Optional

from twisted.internet import defer

from kvmdesk.api.router import ApiRequest, Router
from kvmdesk.core import errors, group_names
from kvmdesk.core.errors import ApiError, Resource
from kvmdesk.core.jobs import run_batch
from kvmdesk.core.paging import paged_search
from kvmdesk.core.records import new_record, now_text
from kvmdesk.core.store import DuplicateKeyError
from kvmdesk.plugins.desktops import codes, schema
from kvmdesk.plugins.desktops.lookups import NAMES, names_of, record_or_404
from kvmdesk.plugins.desktops.models import TeachingGroupCreate, TeachingGroupDelete, TeachingGroupEdit
from kvmdesk.plugins.desktops.terminals import count_in_groups

BASE = "/education/group"
TAGS = ("teaching_groups",)
GROUP = NAMES[schema.TEACHING_GROUPS]
SEARCH_FIELDS = {"uuid": str, "name": str, "desc": str, "group_type": int, "network": str, "subnet": str,
                 "start_ip": str, "end_ip": str}
#: A classroom, even a large one, has far fewer terminals; a bigger range is a typing mistake.
TERMINAL_RANGE_LIMIT = 4096
_HOLDERS = {schema.TEACHING_KIND: ("教学分组", "teaching group"), "user_group": ("用户分组", "user group")}


def name_taken(exc: group_names.NameTaken) -> ApiError:
    zh, en = _HOLDERS.get(exc.kind or "", ("其他分组", "group"))
    return ApiError(codes.GROUP_NAME_TAKEN, name=exc.name, holder=zh, holder_en=en)


def _address(field: str, value: str) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(value.strip())
    except ValueError:
        raise ApiError(errors.INVALID_PARAM, field=field, reason=f"{value!r} is not an IPv4 address") from None


async def check_addressing(core: Any, network_uuid: str, subnet_uuid: str, start_ip: str, end_ip: str,
                           prefix: str = "") -> dict[str, Any]:
    """Validate the network, subnet and terminal range of a teaching group.

    The document does not require the terminal range to lie inside the subnet (its own example
    shows a terminal range outside it): terminals are physical machines, often on another segment.
    What is refused is a terminal range that overlaps the subnet's range, since those addresses are
    handed to desktops by the IPAM.

    :returns: the stored fields ``network, subnet, start_ip, end_ip``.
    """
    await record_or_404(core, schema.NETWORKS, network_uuid)
    subnet = await record_or_404(core, schema.SUBNETS, subnet_uuid)
    if subnet.get("network_uuid") != network_uuid:
        raise ApiError(codes.SUBNET_NOT_IN_NETWORK, subnet=subnet.get("name"), network=network_uuid)
    start = _address(prefix + "start_ip", start_ip)
    end = _address(prefix + "end_ip", end_ip)
    if start > end:
        raise ApiError(codes.TERMINAL_RANGE_ORDER, start_ip=str(start), end_ip=str(end))
    if int(end) - int(start) + 1 > TERMINAL_RANGE_LIMIT:
        raise ApiError(codes.TERMINAL_RANGE_TOO_LARGE, start_ip=str(start), end_ip=str(end), limit=TERMINAL_RANGE_LIMIT)
    subnet_start, subnet_end = ipaddress.IPv4Address(subnet["start_ip"]), ipaddress.IPv4Address(subnet["end_ip"])
    if start <= subnet_end and subnet_start <= end:
        raise ApiError(codes.TERMINAL_RANGE_OVERLAP, start_ip=str(start), end_ip=str(end), subnet=subnet.get("name"),
                       subnet_start=str(subnet_start), subnet_end=str(subnet_end))
    return {"network": network_uuid, "subnet": subnet_uuid, "start_ip": str(start), "end_ip": str(end)}


async def with_counts(core: Any, groups: list[dict]) -> list[dict]:
    """Add the contract's derived fields: network and subnet names and ranges, and the three counts."""
    store = core.store
    uuids = [g["uuid"] for g in groups]
    desktops, instances, terminals = await defer.gatherResults([
        defer.ensureDeferred(store.collection(schema.DESKTOP_GROUPS).count_by("group", {"group": {"$in": uuids}})),
        defer.ensureDeferred(store.collection(schema.DESKTOPS).count_by("group", {"group": {"$in": uuids}})),
        defer.ensureDeferred(count_in_groups(core, groups)),
    ])
    networks = await names_of(core, schema.NETWORKS, {g["network"] for g in groups})
    subnets = {s["uuid"]: s for s in await store.collection(schema.SUBNETS).find(
        {"uuid": {"$in": sorted({g["subnet"] for g in groups})}}, projection=["uuid", "name", "start_ip", "end_ip"])}
    shown = []
    for group in groups:
        subnet = subnets.get(group["subnet"], {})
        shown.append({
            **group,
            "network_name": networks.get(group["network"]),
            "subnet_name": subnet.get("name"),
            "subnet_start_ip": subnet.get("start_ip"),
            "subnet_end_ip": subnet.get("end_ip"),
            "terminal_count": terminals.get(group["uuid"], 0),
            "desktop_count": desktops.get(group["uuid"], 0),
            "instance_count": instances.get(group["uuid"], 0),
        })
    return shown


async def create(req: ApiRequest) -> dict:
    body: TeachingGroupCreate = req.body
    store = req.core.store
    addressing = await check_addressing(req.core, body.network_uuid, body.subnet_uuid, body.start_ip, body.end_ip)
    record = new_record(req.core.clock, name=body.name, desc=body.desc, group_type=schema.TEACHING_TYPE, **addressing)
    try:
        await group_names.claim(store, body.name, schema.TEACHING_KIND, record["uuid"])
    except group_names.NameTaken as exc:
        raise name_taken(exc) from None
    try:
        created = await store.collection(schema.TEACHING_GROUPS).insert_one(record)
    except BaseException:
        await group_names.release(store, body.name, record["uuid"])
        raise
    await req.core.created(schema.TEACHING_KIND, created)
    return (await with_counts(req.core, [created]))[0]


async def edit(req: ApiRequest) -> dict:
    body: TeachingGroupEdit = req.body
    value = body.value
    store = req.core.store
    group = await record_or_404(req.core, schema.TEACHING_GROUPS, body.uuid)
    req.oplog_detail = group["name"] if group["name"] == value.name else f"{group['name']} -> {value.name}"
    changes: dict[str, Any] = {"name": value.name, "updated_at": now_text(req.core.clock)}
    if value.desc is not None:
        changes["desc"] = value.desc
    given = {k: getattr(value, k) for k in ("network_uuid", "subnet_uuid", "start_ip", "end_ip")}
    if any(v is not None for v in given.values()):
        changes.update(await check_addressing(
            req.core, given["network_uuid"] or group["network"], given["subnet_uuid"] or group["subnet"],
            given["start_ip"] or group["start_ip"], given["end_ip"] or group["end_ip"], prefix="value."))
    renamed = value.name != group["name"]
    if renamed:
        try:
            await group_names.claim(store, value.name, schema.TEACHING_KIND, group["uuid"])
        except group_names.NameTaken as exc:
            raise name_taken(exc) from None
    try:
        updated = await store.collection(schema.TEACHING_GROUPS).find_one_and_update(
            {"uuid": group["uuid"]}, {"$set": changes})
    except BaseException as exc:
        if renamed:
            await group_names.release(store, value.name, group["uuid"])
        if isinstance(exc, DuplicateKeyError):
            raise ApiError(errors.ALREADY_EXISTS, resource=GROUP, key=value.name) from None
        raise
    if updated is None:
        if renamed:
            await group_names.release(store, value.name, group["uuid"])
        raise ApiError(errors.NOT_FOUND, resource=GROUP, key=group["uuid"])
    if renamed:
        await group_names.release(store, group["name"], group["uuid"])
    await req.core.updated(schema.TEACHING_KIND, updated, changes)
    return (await with_counts(req.core, [updated]))[0]


async def delete(req: ApiRequest) -> dict:
    store = req.core.store

    async def delete_one(ref: dict) -> None:
        group = await record_or_404(req.core, schema.TEACHING_GROUPS, ref["uuid"])
        count = await store.collection(schema.DESKTOP_GROUPS).count({"group": group["uuid"]})
        if count:
            raise ApiError(codes.GROUP_HAS_DESKTOPS, name=group["name"], count=count)
        await req.core.refuse_if_used(schema.TEACHING_KIND, group["uuid"], GROUP.named(group["name"]))
        await store.collection(schema.TEACHING_GROUPS).delete_one({"uuid": group["uuid"]})
        await group_names.release(store, group["name"], group["uuid"])
        await req.core.deleted(schema.TEACHING_KIND, group)

    refs = list({g.uuid: {"uuid": g.uuid, "name": g.name} for g in req.body.groups}.values())
    req.oplog_detail = ", ".join(r["name"] or r["uuid"] for r in refs[:10])
    return await run_batch(req, refs, delete_one)


async def usage(core: Any, kind: str, uuid: str) -> Optional[Resource]:
    """``kvmdesk_usage`` for the data networks and subnets teaching groups name."""
    field = {"data_network": "network", "subnet": "subnet"}.get(kind)
    if field is None:
        return None
    count = await core.store.collection(schema.TEACHING_GROUPS).count({field: uuid})
    return Resource(f"还有 {count} 个教学分组使用", f"{count} teaching groups use it") if count else None


def register_routes(router: Router) -> None:
    router.endpoint("POST", BASE, summary="Create a teaching group (network, subnet, terminal IP range)",
                    body=TeachingGroupCreate, tags=TAGS, oplog="新增教学分组")(create)
    router.endpoint("PUT", BASE, summary="Edit a teaching group", body=TeachingGroupEdit, tags=TAGS,
                    oplog="修改教学分组")(edit)
    router.endpoint("DELETE", BASE, summary="Delete teaching groups (batch); a group with desktop groups is refused",
                    body=TeachingGroupDelete, tags=TAGS, oplog="删除教学分组")(delete)

    @router.endpoint("GET", BASE, summary="Query teaching groups, paged, with counts", tags=TAGS,
                     search_fields=SEARCH_FIELDS)
    async def list_groups(req: ApiRequest) -> Any:
        return await paged_search(req, req.core.store.collection(schema.TEACHING_GROUPS), SEARCH_FIELDS,
                                  sort=[("id", 1)], decorate=lambda groups: with_counts(req.core, groups),
                                  resource=GROUP)
