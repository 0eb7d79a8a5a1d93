"""Distributed virtual switches and their uplinks (contract #50-#55).

A switch is realised on every node that has an uplink in it as an Open vSwitch bridge; the bridges
are driven through the node agents by :mod:`.dataplane`, and the store changes only once the
reachable agents confirmed.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

from twisted.logger import Logger

from kvmdesk.api.models import Uuids
from kvmdesk.api.router import ApiRequest, Router
from kvmdesk.core import errors
from kvmdesk.core.errors import ApiError, Resource
from kvmdesk.core.jobs import run_batch
from kvmdesk.core.paging import paged_search
from kvmdesk.core.records import new_record, now_text
from kvmdesk.core.store import DuplicateKeyError
from kvmdesk.plugins.network import dataplane, schema
from kvmdesk.plugins.network.agents import node_label
from kvmdesk.plugins.network import errors as net_errors
from kvmdesk.plugins.network.models import SwitchCreate, SwitchEdit, Uplink

log = Logger(namespace="kvmdesk.network.switches")

RESOURCE = Resource("虚拟交换机", "virtual switch")
#: The kind other plugins see in the lifecycle hooks.
KIND = "vswitch"
SEARCH_FIELDS = {"uuid": str, "name": str, "type": str, "desc": str, "default": int}
DEFAULT_NAME = "default"


def bridge_name(switch_uuid: str) -> str:
    """The OVS bridge of a switch on every node: short enough for an interface name (15 chars)."""
    return "kvs-" + switch_uuid.replace("-", "")[:8]


def new_switch(clock: Any, *, name: str, type: str, desc: Optional[str], default: int = 0) -> dict:
    record = new_record(clock, name=name, type=type, desc=desc, default=default)
    record["bridge"] = bridge_name(record["uuid"])
    return record


async def ensure_default_switch(core: Any) -> None:
    """The ``default`` flat switch exists from the first start on (nodes are added with uplinks to it)."""
    switches = core.store.collection(schema.SWITCHES)
    if await switches.find_one({"default": 1}) is None:
        try:
            await switches.insert_one(new_switch(core.clock, name=DEFAULT_NAME, type="flat",
                                                 desc="默认分布式虚拟交换机", default=1))
        except DuplicateKeyError:
            # A switch the administrator named "default" becomes the default one.
            await switches.update_one({"name": DEFAULT_NAME}, {"$set": {"default": 1}})


async def default_switch_view(core: Any) -> Optional[dict]:
    """The default switch as ``check_node_virt`` shows it (``core.extensions["default_switch"]``)."""
    switch = await core.store.collection(schema.SWITCHES).find_one({"default": 1})
    if switch is None:
        return None
    return {"uuid": switch["uuid"], "name": switch["name"], "type": switch["type"], "desc": switch.get("desc")}


async def adopt_node_uplinks(core: Any, node: dict) -> list[dict]:
    """Turn the uplinks a node was added with (``node["uplinks"]``: ``{"switch_uuid", "interface"}``, the
    interface by name or uuid) into uplink records, where the switch still exists and neither the node
    nor the NIC has one there yet; what cannot be adopted is logged and skipped."""
    adopted = []
    store = core.store
    for wanted in node.get("uplinks") or []:
        switch = await store.collection(schema.SWITCHES).find_one({"uuid": wanted.get("switch_uuid")})
        name = wanted.get("interface")
        nic = await store.collection(schema.NICS).find_one(
            {"node_uuid": node["uuid"], "$or": [{"nic": name}, {"uuid": name}]}) if name else None
        if switch is None or nic is None:
            log.warn("node {node}: uplink {wanted!r} not adopted (no such switch or NIC)", node=node_label(node),
                     wanted=wanted)
            continue
        if await store.collection(schema.UPLINKS).find_one(
                {"$or": [{"vswitch_uuid": switch["uuid"], "node_uuid": node["uuid"]}, {"nic_uuid": nic["uuid"]}]}):
            continue
        try:
            adopted.append(await store.collection(schema.UPLINKS).insert_one(
                uplink_record(core.clock, switch["uuid"], node, nic)))
        except DuplicateKeyError:
            continue
    return adopted


async def switch_or_404(core: Any, uuid: str) -> dict:
    switch = await core.store.collection(schema.SWITCHES).find_one({"uuid": uuid})
    if switch is None:
        raise ApiError(errors.NOT_FOUND, resource=RESOURCE, key=uuid)
    return switch


async def uplinks_of(core: Any, switch_uuid: str) -> list[dict]:
    return await core.store.collection(schema.UPLINKS).find({"vswitch_uuid": switch_uuid}, sort=[("id", 1)])


async def resolve_uplinks(core: Any, uplinks: Sequence[Uplink], switch_uuid: Optional[str], *,
                          field: str = "uplinks", check_pools: bool = True) -> list[dict]:
    """Check the uplinks of a request; return ``{"node", "nic"}`` records in request order.

    Each node appears once, its NIC is its own, is not enslaved to a bond and is not the uplink of
    another switch; every node of a resource pool the switch reaches gets an uplink.

    :param field: how the request names the list (``""``: the body is one uplink, #55).
    """
    seen: set[str] = set()
    resolved = []
    for i, uplink in enumerate(uplinks):
        prefix = f"{field}.{i}." if field else ""
        item = await _resolve_one(core, uplink, switch_uuid, prefix)
        if uplink.node_uuid in seen:
            raise ApiError(net_errors.UPLINK_NODE_TWICE, field=prefix + "node_uuid", node=node_label(item["node"]))
        seen.add(uplink.node_uuid)
        resolved.append(item)
    if check_pools:
        await _check_pool_coverage(core, resolved)
    return resolved


async def _resolve_one(core: Any, uplink: Uplink, switch_uuid: Optional[str], prefix: str) -> dict:
    store = core.store
    node = await store.collection(schema.NODES).find_one({"uuid": uplink.node_uuid})
    if node is None:
        raise ApiError(errors.INVALID_PARAM, field=prefix + "node_uuid", reason=f"no such node: {uplink.node_uuid}")
    nic = await store.collection(schema.NICS).find_one({"uuid": uplink.nic_uuid})
    if nic is None or nic["node_uuid"] != node["uuid"]:
        raise ApiError(net_errors.UPLINK_NIC_NOT_ON_NODE, field=prefix + "nic_uuid",
                       nic=nic["nic"] if nic else uplink.nic_uuid, node=node_label(node))
    if nic.get("master"):
        bond = await store.collection(schema.NICS).find_one({"uuid": nic["master"]})
        raise ApiError(net_errors.NIC_NOT_UPLINKABLE, nic=nic["nic"], bond=bond["nic"] if bond else nic["master"])
    taken = await store.collection(schema.UPLINKS).find_one({"nic_uuid": nic["uuid"]})
    if taken is not None and taken["vswitch_uuid"] != switch_uuid:
        other = await store.collection(schema.SWITCHES).find_one({"uuid": taken["vswitch_uuid"]})
        raise ApiError(net_errors.NIC_IS_UPLINK, nic=f"{node_label(node)}/{nic['nic']}",
                       switch=other["name"] if other else taken["vswitch_uuid"])
    return {"node": node, "nic": nic}


async def _current_resolved(core: Any, uplinks: list[dict]) -> list[dict]:
    """The stored uplinks as ``{"node", "nic"}`` records (those whose node and NIC still exist)."""
    nodes = {n["uuid"]: n for n in await core.store.collection(schema.NODES).find(
        {"uuid": {"$in": [u["node_uuid"] for u in uplinks]}})}
    nics = {n["uuid"]: n for n in await core.store.collection(schema.NICS).find(
        {"uuid": {"$in": [u["nic_uuid"] for u in uplinks]}})}
    return [{"node": nodes[u["node_uuid"]], "nic": nics[u["nic_uuid"]]} for u in uplinks
            if u["node_uuid"] in nodes and u["nic_uuid"] in nics]


async def _check_pool_coverage(core: Any, resolved: list[dict]) -> None:
    """A desktop of a pool may land on any node of it: every node of a reached pool needs an uplink."""
    pool_uuids = sorted({r["node"].get("resource_pool_uuid") for r in resolved} - {None})
    if not pool_uuids:
        return
    covered = {r["node"]["uuid"] for r in resolved}
    members = await core.store.collection(schema.NODES).find({"resource_pool_uuid": {"$in": pool_uuids}}, sort=[("id", 1)])
    for pool_uuid in pool_uuids:
        missing = [n for n in members if n["resource_pool_uuid"] == pool_uuid and n["uuid"] not in covered]
        if missing:
            pool = await core.store.collection(schema.POOLS).find_one({"uuid": pool_uuid})
            raise ApiError(net_errors.POOL_WITHOUT_UPLINK, pool=pool["name"] if pool else pool_uuid,
                           nodes=", ".join(node_label(n) for n in missing))


def uplink_record(clock: Any, switch_uuid: str, node: dict, nic: dict) -> dict:
    return new_record(clock, vswitch_uuid=switch_uuid, node_uuid=node["uuid"], nic_uuid=nic["uuid"], nic_name=nic["nic"],
                      synced=0)


async def describe_uplinks(core: Any, uplinks: list[dict]) -> list[dict]:
    """The node-map view of uplink records: node, NIC and pool names (#54)."""
    store = core.store
    nodes = {n["uuid"]: n for n in await store.collection(schema.NODES).find({"uuid": {"$in": [u["node_uuid"] for u in uplinks]}})}
    pools = {p["uuid"]: p for p in await store.collection(schema.POOLS).find(
        {"uuid": {"$in": sorted({n.get("resource_pool_uuid") for n in nodes.values()} - {None})}})}
    nics = {n["uuid"]: n for n in await store.collection(schema.NICS).find({"uuid": {"$in": [u["nic_uuid"] for u in uplinks]}})}
    result = []
    for uplink in uplinks:
        if uplink["node_uuid"] not in nodes:
            continue  # a deleted node whose records were not forgotten (see NodeNetworks.forget_node)
        node = nodes[uplink["node_uuid"]]
        pool = pools.get(node.get("resource_pool_uuid"), {})
        nic = nics.get(uplink["nic_uuid"], {})
        result.append({
            "uuid": uplink["uuid"],
            "vswitch_uuid": uplink["vswitch_uuid"],
            "node_uuid": uplink["node_uuid"],
            "node_name": node.get("name") or node.get("hostname"),
            "nic_uuid": uplink["nic_uuid"],
            "nic_name": nic.get("nic", uplink.get("nic_name")),
            "nic": nic.get("nic", uplink.get("nic_name")),
            "resource_pool_uuid": node.get("resource_pool_uuid"),
            "resource_pool_name": pool.get("name"),
            "synced": uplink.get("synced", 0),
        })
    return result


async def with_details(core: Any, switches: list[dict]) -> list[dict]:
    """Add ``network_count`` and ``uplinks`` to each switch."""
    uuids = [s["uuid"] for s in switches]
    counts = await core.store.collection(schema.NETWORKS).count_by("switch_uuid", {"switch_uuid": {"$in": uuids}})
    uplinks = await core.store.collection(schema.UPLINKS).find({"vswitch_uuid": {"$in": uuids}}, sort=[("id", 1)])
    described = await describe_uplinks(core, uplinks)
    for switch in switches:
        switch["network_count"] = counts.get(switch["uuid"], 0)
        switch["uplinks"] = [d for d in described if d["vswitch_uuid"] == switch["uuid"]]
    return switches


async def replace_uplinks(core: Any, switch_uuid: str, resolved: list[dict]) -> None:
    """Make the stored uplinks of a switch exactly ``resolved`` (one per node)."""
    coll = core.store.collection(schema.UPLINKS)
    keep = [r["node"]["uuid"] for r in resolved]
    await coll.delete_many({"vswitch_uuid": switch_uuid, "node_uuid": {"$nin": keep}})
    for r in resolved:
        changed = await coll.find_one_and_update(
            {"vswitch_uuid": switch_uuid, "node_uuid": r["node"]["uuid"]},
            {"$set": {"nic_uuid": r["nic"]["uuid"], "nic_name": r["nic"]["nic"], "updated_at": now_text(core.clock)}},
        )
        if changed is None:
            await coll.insert_one(uplink_record(core.clock, switch_uuid, r["node"], r["nic"]))


def register_routes(router: Router) -> None:
    base = "/resource_mgr/vswitchs"
    tags = ("vswitchs",)

    @router.endpoint("GET", base, summary="List virtual switches, paged", tags=tags, search_fields=SEARCH_FIELDS)
    async def list_switches(req: ApiRequest) -> Any:
        return await paged_search(req, req.core.store.collection(schema.SWITCHES), SEARCH_FIELDS, sort=[("id", 1)],
                                  decorate=lambda s: with_details(req.core, s), resource=RESOURCE)

    @router.endpoint("POST", base, summary="Create a virtual switch (flat or vlan) with uplinks", body=SwitchCreate,
                     tags=tags, oplog="新增虚拟交换机")
    @dataplane.exclusive
    async def create_switch(req: ApiRequest) -> dict:
        core, body = req.core, req.body
        req.oplog_detail = body.name
        switches = core.store.collection(schema.SWITCHES)
        if await switches.find_one({"name": body.name}) is not None:
            raise ApiError(errors.ALREADY_EXISTS, resource=RESOURCE, key=body.name)
        record = new_switch(core.clock, name=body.name, type=body.type, desc=body.desc)
        resolved = await resolve_uplinks(core, body.uplinks, record["uuid"])
        plan = dataplane.Plan(core)
        for r in resolved:
            plan.ensure(r["node"], dataplane.switch_state(record, r["nic"]["nic"], {}), None)
        await plan.apply()
        try:
            created = await switches.insert_one(record)
        except DuplicateKeyError:
            await plan.undo()
            raise ApiError(errors.ALREADY_EXISTS, resource=RESOURCE, key=body.name) from None
        await replace_uplinks(core, created["uuid"], resolved)
        await plan.record_sync(created["uuid"])
        await core.created(KIND, created)
        return (await with_details(core, [created]))[0]

    @router.endpoint("PUT", base + "/{vswitch_uuid}", summary="Edit a virtual switch and its uplinks", body=SwitchEdit,
                     tags=tags, oplog="编辑虚拟交换机")
    @dataplane.exclusive
    async def edit_switch(req: ApiRequest) -> dict:
        core, body = req.core, req.body
        switch = await switch_or_404(core, req.path["vswitch_uuid"])
        req.oplog_detail = switch["name"]
        changes = body.model_dump(exclude_unset=True, exclude={"uplinks"})
        for key in ("name", "type"):
            if key in changes and changes[key] is None:
                raise ApiError(errors.INVALID_PARAM, field=key, reason="must not be null")
        if changes.get("type", switch["type"]) != switch["type"]:
            if await core.store.collection(schema.NETWORKS).count({"switch_uuid": switch["uuid"]}):
                raise ApiError(net_errors.SWITCH_TYPE_LOCKED, switch=switch["name"])
        if changes.get("name", switch["name"]) != switch["name"]:
            if await core.store.collection(schema.SWITCHES).find_one({"name": changes["name"]}) is not None:
                raise ApiError(errors.ALREADY_EXISTS, resource=RESOURCE, key=changes["name"])
        plan = dataplane.Plan(core)
        resolved = None
        current = await uplinks_of(core, switch["uuid"])
        type_changed = changes.get("type", switch["type"]) != switch["type"]
        if body.uplinks is not None:
            resolved = await resolve_uplinks(core, body.uplinks, switch["uuid"])
        if resolved is not None or type_changed:
            await dataplane.plan_uplinks(plan, {**switch, **changes}, current,
                                         resolved if resolved is not None else await _current_resolved(core, current),
                                         force=type_changed)
        await plan.apply()
        updated = switch
        if changes:
            changes["updated_at"] = now_text(core.clock)
            try:
                updated = await core.store.collection(schema.SWITCHES).find_one_and_update(
                    {"uuid": switch["uuid"]}, {"$set": changes})
            except DuplicateKeyError:
                await plan.undo()
                raise ApiError(errors.ALREADY_EXISTS, resource=RESOURCE, key=changes["name"]) from None
        if resolved is not None:
            await replace_uplinks(core, switch["uuid"], resolved)
        await plan.record_sync(switch["uuid"])
        if resolved is not None:
            changes["uplinks"] = [uplink.model_dump() for uplink in body.uplinks]
        if changes:
            await core.updated(KIND, updated, changes)
        return (await with_details(core, [updated]))[0]

    @router.endpoint("DELETE", base, summary="Delete virtual switches (batch)", body=Uuids, tags=tags,
                     oplog="删除虚拟交换机")
    @dataplane.exclusive
    async def delete_switches(req: ApiRequest) -> dict:
        core = req.core

        async def delete_one(uuid: str) -> None:
            switch = await switch_or_404(core, uuid)
            if switch.get("default"):
                raise ApiError(net_errors.DEFAULT_SWITCH, switch=switch["name"])
            networks = await core.store.collection(schema.NETWORKS).find({"switch_uuid": uuid}, sort=[("id", 1)])
            if networks:
                raise ApiError(net_errors.SWITCH_IN_USE, switch=switch["name"],
                               networks=", ".join(n["name"] for n in networks))
            plan = dataplane.Plan(core)
            for uplink in await uplinks_of(core, uuid):
                node = await core.store.collection(schema.NODES).find_one({"uuid": uplink["node_uuid"]})
                if node is not None:
                    plan.remove(node, switch, await dataplane.current_state(core, switch, uplink))
            await plan.apply()
            await core.store.collection(schema.UPLINKS).delete_many({"vswitch_uuid": uuid})
            await core.store.collection(schema.SWITCHES).delete_one({"uuid": uuid})
            await core.deleted(KIND, switch)

        return await run_batch(req, list(dict.fromkeys(req.body.uuids)), delete_one)

    @router.endpoint("GET", base + "/{vswitch_uuid}/node_map", summary="A switch's node/NIC map", tags=tags)
    async def node_map(req: ApiRequest) -> dict:
        switch = await switch_or_404(req.core, req.path["vswitch_uuid"])
        uplinks = await describe_uplinks(req.core, await uplinks_of(req.core, switch["uuid"]))
        return {"uuid": switch["uuid"], "name": switch["name"], "type": switch["type"], "desc": switch.get("desc"),
                "uplinks": uplinks}

    @router.endpoint("PUT", base + "/{vswitch_uuid}/node_map", summary="Change (or add) one node's uplink NIC",
                     body=Uplink, tags=tags, oplog="修改虚拟交换机上行网卡")
    @dataplane.exclusive
    async def change_node_map(req: ApiRequest) -> dict:
        core = req.core
        switch = await switch_or_404(core, req.path["vswitch_uuid"])
        req.oplog_detail = switch["name"]
        (resolved,) = await resolve_uplinks(core, [req.body], switch["uuid"], field="", check_pools=False)
        current = await uplinks_of(core, switch["uuid"])
        plan = dataplane.Plan(core)
        await dataplane.plan_uplinks(plan, switch, current, [resolved], keep_others=True)
        await plan.apply()
        coll = core.store.collection(schema.UPLINKS)
        changed = await coll.find_one_and_update(
            {"vswitch_uuid": switch["uuid"], "node_uuid": resolved["node"]["uuid"]},
            {"$set": {"nic_uuid": resolved["nic"]["uuid"], "nic_name": resolved["nic"]["nic"],
                      "updated_at": now_text(core.clock)}})
        if changed is None:
            await coll.insert_one(uplink_record(core.clock, switch["uuid"], resolved["node"], resolved["nic"]))
        await plan.record_sync(switch["uuid"])
        return await node_map(req)


