"""Data networks on a virtual switch, and their subnets (contract #42-#49).

A data network is a VLAN tag on its switch's bridges (tag 0 for the one network of a flat switch);
creating, retagging or deleting one changes the bridges on the switch's nodes first (see
:mod:`.dataplane`).  Subnets are validated with :mod:`.addressing`; their addresses are handed out
by :mod:`.ipam`.
"""
from __future__ import annotations

from typing import Any, Optional

from kvmdesk.api.models import Uuids
from kvmdesk.api.router import ApiRequest, Router
from kvmdesk.core import errors
from kvmdesk.core.errors import ApiError, Resource
from kvmdesk.core.jobs import run_batch
from kvmdesk.core.paging import paged_search
from kvmdesk.core.records import new_record, now_text
from kvmdesk.core.store import DuplicateKeyError
from kvmdesk.plugins.network import addressing, dataplane, schema
from kvmdesk.plugins.network import errors as net_errors
from kvmdesk.plugins.network.models import NetworkCreate, NetworkEdit, SubnetCreate, SubnetEdit

NETWORK = Resource("数据网络", "data network")
SUBNET = Resource("子网", "subnet")
#: The kinds other plugins see in kvmdesk_usage and the lifecycle hooks.
NETWORK_KIND, SUBNET_KIND = "data_network", "subnet"
NETWORK_FIELDS = {"uuid": str, "name": str, "desc": str, "switch_uuid": str, "vlan_id": int, "default": int}
SUBNET_FIELDS = {"uuid": str, "name": str, "cidr": str, "start_ip": str, "end_ip": str, "gateway": str,
                 "netmask": str, "dns1": str, "dns2": str}
VLAN_MIN, VLAN_MAX = 1, 4094


async def network_or_404(core: Any, uuid: str) -> dict:
    network = await core.store.collection(schema.NETWORKS).find_one({"uuid": uuid})
    if network is None:
        raise ApiError(errors.NOT_FOUND, resource=NETWORK, key=uuid)
    return network


def check_vlan(switch: dict, vlan_id: Optional[int]) -> int:
    """The tag a network gets on ``switch``: its VLAN id on a vlan switch, 0 on a flat one."""
    if switch["type"] == "vlan":
        if vlan_id is None or not VLAN_MIN <= vlan_id <= VLAN_MAX:
            raise ApiError(net_errors.VLAN_REQUIRED, switch=switch["name"])
        return vlan_id
    if vlan_id is not None:
        raise ApiError(net_errors.VLAN_FORBIDDEN, switch=switch["name"])
    return 0


async def check_tag_free(core: Any, switch: dict, tag: int, exclude: Optional[str] = None) -> None:
    taken = await core.store.collection(schema.NETWORKS).find_one({"switch_uuid": switch["uuid"], "tag": tag})
    if taken is not None and taken["uuid"] != exclude:
        if tag == 0:
            raise ApiError(net_errors.FLAT_TAKEN, switch=switch["name"], network=taken["name"])
        raise ApiError(net_errors.VLAN_TAKEN, switch=switch["name"], vlan_id=tag, network=taken["name"])


async def with_network_details(core: Any, networks: list[dict]) -> list[dict]:
    """Add ``subnet_count``, ``switch`` (uuid), ``switch_name`` and ``switch_type`` to each network."""
    counts = await core.store.collection(schema.SUBNETS).count_by(
        "network_uuid", {"network_uuid": {"$in": [n["uuid"] for n in networks]}})
    switches = {s["uuid"]: s for s in await core.store.collection(schema.SWITCHES).find(
        {"uuid": {"$in": sorted({n["switch_uuid"] for n in networks})}})}
    for network in networks:
        switch = switches.get(network["switch_uuid"], {})
        network["subnet_count"] = counts.get(network["uuid"], 0)
        network["switch"] = network["switch_uuid"]
        network["switch_name"] = switch.get("name")
        network["switch_type"] = switch.get("type")
        network.pop("tag", None)
    return networks


async def with_subnet_details(core: Any, subnets: list[dict]) -> list[dict]:
    """Add ``network`` (uuid) and the address counts ``ip_count`` / ``used_count`` to each subnet."""
    used = await core.store.collection(schema.ALLOCATIONS).count_by(
        "subnet_uuid", {"subnet_uuid": {"$in": [s["uuid"] for s in subnets]}})
    for subnet in subnets:
        subnet["network"] = subnet["network_uuid"]
        subnet["ip_count"] = addressing.subnet_spec(subnet).size
        subnet["used_count"] = used.get(subnet["uuid"], 0)
    return subnets


async def check_subnet(core: Any, network_uuid: str, spec: addressing.SubnetSpec, exclude: Optional[str] = None) -> None:
    """No overlap with the other subnets of the network, and a name of its own there."""
    others = [s for s in await core.store.collection(schema.SUBNETS).find({"network_uuid": network_uuid}, sort=[("id", 1)])
              if s["uuid"] != exclude]
    if any(s["name"] == spec.name for s in others):
        raise ApiError(errors.ALREADY_EXISTS, resource=SUBNET, key=spec.name)
    addressing.check_no_overlap(spec, others)


async def subnet_in_use(core: Any, subnet: dict) -> None:
    """Refuse to delete a subnet that still has addresses handed out or a user of its own."""
    count = await core.store.collection(schema.ALLOCATIONS).count({"subnet_uuid": subnet["uuid"]})
    if count:
        sample = await core.store.collection(schema.ALLOCATIONS).find({"subnet_uuid": subnet["uuid"]}, sort=[("id", 1)], limit=3)
        detail = ": " + ", ".join(a["ip"] for a in sample) + (" ..." if count > len(sample) else "")
        raise ApiError(net_errors.SUBNET_IN_USE, name=subnet["name"], count=count, detail=detail)
    await core.refuse_if_used(SUBNET_KIND, subnet["uuid"], SUBNET.named(subnet['name']))


def new_subnet(clock: Any, network_uuid: str, spec: addressing.SubnetSpec, desc: Optional[str] = None) -> dict:
    return new_record(clock, network_uuid=network_uuid, desc=desc, **spec.fields())


async def delete_subnet_records(core: Any, subnets: list[dict]) -> None:
    """Delete subnets and their allocation cursors; plugins hear ``kvmdesk_deleted("subnet")`` for each."""
    subnet_uuids = [s["uuid"] for s in subnets]
    await core.store.collection(schema.CURSORS).delete_many({"subnet_uuid": {"$in": subnet_uuids}})
    await core.store.collection(schema.SUBNETS).delete_many({"uuid": {"$in": subnet_uuids}})
    for subnet in subnets:
        await core.deleted(SUBNET_KIND, subnet)


def register_routes(router: Router) -> None:
    base = "/resource_mgr/data_networks"
    tags = ("data_networks",)

    @router.endpoint("GET", base, summary="List data networks, paged, with subnet counts", tags=tags,
                     search_fields=NETWORK_FIELDS)
    async def list_networks(req: ApiRequest) -> Any:
        return await paged_search(req, req.core.store.collection(schema.NETWORKS), NETWORK_FIELDS, sort=[("id", 1)],
                                  decorate=lambda n: with_network_details(req.core, n), resource=NETWORK)

    @router.endpoint("POST", base, summary="Create a data network on a switch, optionally with a first subnet",
                     body=NetworkCreate, tags=tags, oplog="新增数据网络")
    @dataplane.exclusive
    async def create_network(req: ApiRequest) -> dict:
        core, body = req.core, req.body
        req.oplog_detail = body.name
        switch = await core.store.collection(schema.SWITCHES).find_one({"uuid": body.switch_uuid})
        if switch is None:
            raise ApiError(errors.INVALID_PARAM, field="switch_uuid", reason=f"no such switch: {body.switch_uuid}")
        tag = check_vlan(switch, body.vlan_id)
        networks = core.store.collection(schema.NETWORKS)
        if await networks.find_one({"name": body.name}) is not None:
            raise ApiError(errors.ALREADY_EXISTS, resource=NETWORK, key=body.name)
        await check_tag_free(core, switch, tag)
        spec = addressing.subnet_spec(body.subnet_info.model_dump(), prefix="subnet_info.") if body.subnet_info else None
        record = new_record(core.clock, name=body.name, desc=body.desc, switch_uuid=switch["uuid"], vlan_id=body.vlan_id,
                            tag=tag, default=0)
        old = await dataplane.networks_of(core, switch["uuid"])
        plan = dataplane.Plan(core)
        await dataplane.plan_networks(plan, switch, old, {**old, record["uuid"]: tag})
        await plan.apply()
        try:
            created = await networks.insert_one(record)
        except DuplicateKeyError:
            await plan.undo()
            raise ApiError(errors.ALREADY_EXISTS, resource=NETWORK, key=body.name) from None
        await plan.record_sync(switch["uuid"])
        await core.created(NETWORK_KIND, created)
        if spec is not None:
            subnet = await core.store.collection(schema.SUBNETS).insert_one(
                new_subnet(core.clock, created["uuid"], spec, body.subnet_info.desc))
            await core.created(SUBNET_KIND, subnet)
        return (await with_network_details(core, [created]))[0]

    @router.endpoint("PUT", base + "/{network_uuid}", summary="Edit a data network's name / VLAN id", body=NetworkEdit,
                     tags=tags, oplog="编辑数据网络")
    @dataplane.exclusive
    async def edit_network(req: ApiRequest) -> dict:
        core = req.core
        network = await network_or_404(core, req.path["network_uuid"])
        req.oplog_detail = network["name"]
        changes = req.body.model_dump(exclude_unset=True)
        if "name" in changes and changes["name"] is None:
            raise ApiError(errors.INVALID_PARAM, field="name", reason="must not be null")
        networks = core.store.collection(schema.NETWORKS)
        if changes.get("name", network["name"]) != network["name"]:
            if await networks.find_one({"name": changes["name"]}) is not None:
                raise ApiError(errors.ALREADY_EXISTS, resource=NETWORK, key=changes["name"])
        plan = dataplane.Plan(core)
        switch = None
        if "vlan_id" in changes:
            switch = await core.store.collection(schema.SWITCHES).find_one({"uuid": network["switch_uuid"]})
            tag = check_vlan(switch, changes["vlan_id"])
            changes["tag"] = tag
            if tag != network["tag"]:
                await check_tag_free(core, switch, tag, exclude=network["uuid"])
                old = await dataplane.networks_of(core, switch["uuid"])
                await dataplane.plan_networks(plan, switch, old, {**old, network["uuid"]: tag})
        if not changes:
            return (await with_network_details(core, [network]))[0]
        await plan.apply()
        changes["updated_at"] = now_text(core.clock)
        try:
            updated = await networks.find_one_and_update({"uuid": network["uuid"]}, {"$set": changes})
        except DuplicateKeyError:
            await plan.undo()
            raise ApiError(errors.ALREADY_EXISTS, resource=NETWORK, key=changes.get("name", network["name"])) from None
        if switch is not None:
            await plan.record_sync(switch["uuid"])
        await core.updated(NETWORK_KIND, updated, changes)
        return (await with_network_details(core, [updated]))[0]

    @router.endpoint("DELETE", base, summary="Delete data networks (batch)", body=Uuids, tags=tags, oplog="删除数据网络")
    @dataplane.exclusive
    async def delete_networks(req: ApiRequest) -> dict:
        core = req.core

        async def delete_one(uuid: str) -> None:
            network = await network_or_404(core, uuid)
            await core.refuse_if_used(NETWORK_KIND, uuid, NETWORK.named(network['name']))
            subnets = await core.store.collection(schema.SUBNETS).find({"network_uuid": uuid}, sort=[("id", 1)])
            for subnet in subnets:
                await subnet_in_use(core, subnet)
            switch = await core.store.collection(schema.SWITCHES).find_one({"uuid": network["switch_uuid"]})
            plan = dataplane.Plan(core)
            if switch is not None:
                old = await dataplane.networks_of(core, switch["uuid"])
                await dataplane.plan_networks(plan, switch, old, {k: v for k, v in old.items() if k != uuid})
            await plan.apply()
            await delete_subnet_records(core, subnets)
            await core.store.collection(schema.NETWORKS).delete_one({"uuid": uuid})
            if switch is not None:
                await plan.record_sync(switch["uuid"])
            await core.deleted(NETWORK_KIND, network)

        return await run_batch(req, list(dict.fromkeys(req.body.uuids)), delete_one)

    sub = base + "/{network_uuid}/sub_networks"
    stags = ("sub_networks",)

    @router.endpoint("GET", sub, summary="List a data network's subnets, paged", tags=stags, search_fields=SUBNET_FIELDS)
    async def list_subnets(req: ApiRequest) -> Any:
        network = await network_or_404(req.core, req.path["network_uuid"])
        return await paged_search(req, req.core.store.collection(schema.SUBNETS), SUBNET_FIELDS,
                                  fixed={"network_uuid": network["uuid"]}, sort=[("id", 1)],
                                  decorate=lambda s: with_subnet_details(req.core, s), resource=SUBNET)

    @router.endpoint("POST", sub, summary="Create a subnet (start/end IP, netmask, gateway, DNS)", body=SubnetCreate,
                     tags=stags, oplog="新增子网")
    async def create_subnet(req: ApiRequest) -> dict:
        core = req.core
        network = await network_or_404(core, req.path["network_uuid"])
        req.oplog_detail = f"{network['name']}/{req.body.name}"
        spec = addressing.subnet_spec(req.body.model_dump())
        await check_subnet(core, network["uuid"], spec)
        try:
            created = await core.store.collection(schema.SUBNETS).insert_one(
                new_subnet(core.clock, network["uuid"], spec, req.body.desc))
        except DuplicateKeyError:
            raise ApiError(errors.ALREADY_EXISTS, resource=SUBNET, key=spec.name) from None
        await core.created(SUBNET_KIND, created)
        return (await with_subnet_details(core, [created]))[0]

    @router.endpoint("PUT", sub + "/{subnet_uuid}", summary="Edit a subnet", body=SubnetEdit, tags=stags,
                     oplog="编辑子网")
    async def edit_subnet(req: ApiRequest) -> dict:
        core = req.core
        network = await network_or_404(core, req.path["network_uuid"])
        subnets = core.store.collection(schema.SUBNETS)
        subnet = await subnets.find_one({"uuid": req.path["subnet_uuid"], "network_uuid": network["uuid"]})
        if subnet is None:
            raise ApiError(errors.NOT_FOUND, resource=SUBNET, key=req.path["subnet_uuid"])
        req.oplog_detail = f"{network['name']}/{subnet['name']}"
        changes = {k: v for k, v in req.body.model_dump(exclude_unset=True).items()}
        for key in ("name", "start_ip", "end_ip", "netmask", "gateway", "dns1"):
            if key in changes and changes[key] is None:
                raise ApiError(errors.INVALID_PARAM, field=key, reason="must not be null")
        if not changes:
            return (await with_subnet_details(core, [subnet]))[0]
        spec = addressing.subnet_spec({**subnet, **changes})
        await check_subnet(core, network["uuid"], spec, exclude=subnet["uuid"])
        await check_allocations_inside(core, subnet, spec)
        fields = {**spec.fields(), "updated_at": now_text(core.clock)}
        if "desc" in changes:
            fields["desc"] = changes["desc"]
        try:
            updated = await subnets.find_one_and_update({"uuid": subnet["uuid"]}, {"$set": fields})
        except DuplicateKeyError:
            raise ApiError(errors.ALREADY_EXISTS, resource=SUBNET, key=spec.name) from None
        await core.updated(SUBNET_KIND, updated, fields)
        return (await with_subnet_details(core, [updated]))[0]

    @router.endpoint("DELETE", sub, summary="Delete subnets (batch)", body=Uuids, tags=stags, oplog="删除子网")
    async def delete_subnets(req: ApiRequest) -> dict:
        core = req.core
        network = await network_or_404(core, req.path["network_uuid"])

        async def delete_one(uuid: str) -> None:
            subnet = await core.store.collection(schema.SUBNETS).find_one({"uuid": uuid, "network_uuid": network["uuid"]})
            if subnet is None:
                raise ApiError(errors.NOT_FOUND, resource=SUBNET, key=uuid)
            await subnet_in_use(core, subnet)
            await delete_subnet_records(core, [subnet])

        return await run_batch(req, list(dict.fromkeys(req.body.uuids)), delete_one)


async def check_allocations_inside(core: Any, subnet: dict, spec: addressing.SubnetSpec) -> None:
    """An edit may not strand an address already handed out outside the new range."""
    for allocation in await core.store.collection(schema.ALLOCATIONS).find({"subnet_uuid": subnet["uuid"]}):
        if not spec.contains(addressing.parse_ip("ip", allocation["ip"])):
            raise ApiError(net_errors.ALLOCATION_OUTSIDE, ip=allocation["ip"], start_ip=str(spec.start),
                           end_ip=str(spec.end))
