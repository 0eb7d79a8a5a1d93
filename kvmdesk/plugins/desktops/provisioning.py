"""What creating desktops needs before any domain exists: the plan checked against the stored nodes,
free names, and addresses from the subnet (taken all or none).

The checks read the node records the node watchers keep (facts, metrics, state) and the desktops
already placed on each node; the addresses come from the IPAM (``core.extensions["ipam"]``), which is
atomic per address, so this module only has to give back what it took when a later one fails.
"""
from __future__ import annotations

import ipaddress
from typing import Any, Iterable, Mapping, Sequence

from twisted.internet import defer

from kvmdesk.core.errors import ApiError
from kvmdesk.plugins.desktops import codes, planner, schema

#: Bound of the ``$in`` lists sent to the store in one query.
CHUNK = 500


def _chunks(items: Sequence[Any]) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), CHUNK):
        yield items[start : start + CHUNK]


async def node_views(core: Any, ips: Iterable[str]) -> list[planner.NodeView]:
    """The planner's view of the nodes at ``ips``, with what their desktops already commit."""
    nodes = await core.store.collection(schema.NODES).find({"ip": {"$in": sorted(set(ips))}})
    uuids = [n["uuid"] for n in nodes]
    vcpu = {u: 0 for u in uuids}
    ram = {u: 0 for u in uuids}
    if uuids:
        for desktop in await core.store.collection(schema.DESKTOPS).find({"node": {"$in": uuids}},
                                                                         projection=["node", "vcpu", "ram"]):
            vcpu[desktop["node"]] += int(desktop.get("vcpu") or 0)
            ram[desktop["node"]] += int(float(desktop.get("ram") or 0) * planner.GIB)
    return [planner.NodeView.of(n, vcpu[n["uuid"]], ram[n["uuid"]]) for n in nodes]


async def plan_placement(core: Any, create_info: Mapping[str, Any], instance_num: int, pool: Mapping[str, Any],
                         demand: planner.Demand) -> list[planner.Placement]:
    """:func:`planner.plan` against the stored nodes named by ``create_info``."""
    views = await node_views(core, list(create_info))
    return planner.plan(create_info, instance_num, pool, views, demand, planner.Limits.from_config(core.config))


async def check_names_free(core: Any, names: Sequence[str]) -> None:
    """:raises ApiError: some of ``names`` are desktops already (409, the first few named)."""
    taken: list[str] = []
    desktops = core.store.collection(schema.DESKTOPS)
    for part in _chunks(list(names)):
        taken += [d["name"] for d in await desktops.find({"name": {"$in": list(part)}}, projection=["name"])]
    if taken:
        shown = ", ".join(sorted(taken)[:5]) + (f" ... ({len(taken)})" if len(taken) > 5 else "")
        raise ApiError(codes.NAME_COLLISION, data={"names": sorted(taken)}, names=shown)


def owner_of(desktop_uuid: str) -> str:
    """How an address held by a desktop is labelled in the IPAM."""
    return f"desktop:{desktop_uuid}"


async def allocate_addresses(core: Any, subnet: Mapping[str, Any], desktop_uuids: Sequence[str]) -> list[str]:
    """One address of ``subnet`` per desktop, in order; all of them or none.

    :raises ApiError: the subnet has fewer free addresses than desktops (409, before taking any), or
        an allocation failed meanwhile (its error; every address taken so far is given back).
    """
    ipam = core.extensions["ipam"]
    size = int(ipaddress.IPv4Address(subnet["end_ip"])) - int(ipaddress.IPv4Address(subnet["start_ip"])) + 1
    free = size - len(await ipam.allocations(subnet["uuid"]))
    if free < len(desktop_uuids):
        raise ApiError(codes.SUBNET_TOO_SMALL, subnet=subnet.get("name"), free=free, count=len(desktop_uuids))
    taken: list[str] = []
    try:
        for uuid in desktop_uuids:
            taken.append((await ipam.allocate(subnet["uuid"], owner=owner_of(uuid)))["ip"])
    except BaseException:
        await release_addresses(core, desktop_uuids[: len(taken)])
        raise
    return taken


async def release_addresses(core: Any, desktop_uuids: Sequence[str]) -> None:
    """Give back every address the desktops hold."""
    ipam = core.extensions["ipam"]
    await defer.gatherResults([defer.ensureDeferred(ipam.release_owner(owner_of(u))) for u in desktop_uuids],
                              consumeErrors=True)
