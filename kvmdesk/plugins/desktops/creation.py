"""Making desktops (a new group's, or more in a group, #83 and #94): everything is checked before
anything is made, and a failure on any node removes what was made on every node.

Order: the plan (nodes of the pool, their state and capacity), the template's version on each chosen
node, the names, the addresses (all or none), the records; then every desktop's overlays and domain
on its node.  If one of them fails, every domain and overlay already made is removed, the
addresses released and the records deleted, and the answer is that desktop's error.
"""
from __future__ import annotations

from typing import Any, Awaitable, Callable, Mapping, Optional

from twisted.internet import defer
from twisted.logger import Logger

from kvmdesk.core.errors import ApiError
from kvmdesk.core.records import new_record, without
from kvmdesk.plugins.desktops import codes, planner, provisioning, schema
from kvmdesk.plugins.desktops.domain_ops import DomainOps, network_nic, random_mac, vnc_password
from kvmdesk.plugins.desktops.power import busy

log = Logger(namespace="kvmdesk.desktops")
#: Desktops made at once on one node (overlay + define each); nodes work in parallel.
PER_NODE = 8


def check_template(template: Mapping[str, Any], group_name: str) -> None:
    if template.get("status") == "updating":
        raise ApiError(codes.TEMPLATE_UPDATING, name=template.get("name"), group=group_name)
    if not template.get("version"):
        raise ApiError(codes.TEMPLATE_NOT_SAVED, name=template.get("name"))


def check_published(template: Mapping[str, Any], placements: list[planner.Placement]) -> None:
    """Every chosen node has the template's current version (overlays are made on it there)."""
    publish = template.get("publish") or {}
    problems = []
    for placement in placements:
        state = publish.get(placement.node.uuid) or {}
        if state.get("version") != template["version"] or state.get("status", 0) != 0:
            problems.append(planner.Problem(codes.TEMPLATE_NOT_ON_NODE, {"ip": placement.node.ip, "name": template.get("name"),
                                                                       "version": template["version"]}))
    if problems:
        raise planner.refusal(problems)


async def make_desktops(core: Any, group: Mapping[str, Any], template: Mapping[str, Any], subnet: Mapping[str, Any],
                        create_info: Mapping[str, Any], count: int, first_number: int,
                        allocate: Optional[Callable[..., Awaitable[list]]] = None) -> list[dict]:
    """Plan, name, address and make ``count`` desktops of ``group``; all of them or none.

    :param allocate: ``(core, subnet, desktop_uuids) -> addresses``, all or none (default: the next free
        addresses of the subnet; personal groups pass fixed addresses, or none without a network).
    :returns: the desktop records made.
    :raises ApiError: the first problem (placement problems all listed in its ``data``).
    """
    pool = await core.store.collection(schema.POOLS).find_one({"uuid": group["pool"]}) or {"uuid": group["pool"]}
    demand = planner.Demand(vcpu=int(group["vcpu"]), ram_gib=float(group["ram"]))
    placements = await provisioning.plan_placement(core, create_info, count, pool, demand)
    check_published(template, placements)
    names = planner.desktop_names(group["prefix"], int(group["postfix"]), first_number, count)
    await provisioning.check_names_free(core, names)
    records = [new_record(core.clock, name=name, desktop_uuid=group["uuid"], group=group["group"], node=node.uuid,
                          node_ip=node.ip, hostname=node.name, vcpu=group["vcpu"], ram=group["ram"], status="inactive",
                          power="off", up_time=None, message="", user_name="", mac=random_mac(), vnc_password=vnc_password(),
                          template=template["uuid"], template_version=template["version"], ipaddr=None)
               for name, node in planner.spread(placements, names)]
    uuids = [r["uuid"] for r in records]
    addresses = await (allocate or provisioning.allocate_addresses)(core, subnet, uuids)
    for record, address in zip(records, addresses):
        record["ipaddr"] = address
    desktops = core.store.collection(schema.DESKTOPS)
    try:
        inserted = await desktops.insert_many(records)
        refused = [r for r in inserted if isinstance(r, Exception)]
        if refused:
            raise ApiError(codes.NAME_COLLISION, names=", ".join(names[:5]))
        await _make_domains(core, group, template, placements, records)
    except BaseException:
        await desktops.delete_many({"uuid": {"$in": uuids}})
        await provisioning.release_addresses(core, uuids)
        raise
    for record in records:
        await core.created(schema.DESKTOP_KIND, without(record, schema.HIDDEN_FIELDS))
    return records


async def _make_domains(core: Any, group: Mapping[str, Any], template: Mapping[str, Any],
                        placements: list[planner.Placement], records: list[dict]) -> None:
    ops = DomainOps(core)
    nic = await network_nic(core, group["network"])
    nodes = {n["uuid"]: n for n in await core.store.collection(schema.NODES).find(
        {"uuid": {"$in": [p.node.uuid for p in placements]}})}
    made: list[dict] = []
    failures: list[ApiError] = []
    marks = busy(core)

    async def on_node(node_uuid: str, desktops: list[dict]) -> None:
        semaphore = defer.DeferredSemaphore(PER_NODE)

        async def one(desktop: dict) -> None:
            if failures:
                return  # another desktop failed: make nothing more
            made.append(desktop)
            marks.add(desktop["uuid"])
            try:
                await ops.create(nodes[node_uuid], desktop, group, template, nic)
            except ApiError as exc:
                failures.append(exc)
            finally:
                marks.discard(desktop["uuid"])

        await defer.gatherResults([semaphore.run(lambda d=d: defer.ensureDeferred(one(d))) for d in desktops],
                                  consumeErrors=True)

    by_node: dict[str, list[dict]] = {}
    for record in records:
        by_node.setdefault(record["node"], []).append(record)
    await defer.gatherResults([defer.ensureDeferred(on_node(n, ds)) for n, ds in by_node.items()], consumeErrors=True)
    if failures:
        await _unmake(core, ops, nodes, template, made)
        raise failures[0]


async def _unmake(core: Any, ops: DomainOps, nodes: Mapping[str, dict], template: Mapping[str, Any],
                  made: list[dict]) -> None:
    """Remove what a failed create made, on every node (a node that fails this too is logged)."""
    async def one(desktop: dict) -> None:
        try:
            await ops.remove(nodes[desktop["node"]], desktop, template)
        except ApiError as exc:
            log.warn("could not remove desktop {name} from node {ip} after a failed create: {why}",
                     name=desktop["name"], ip=desktop.get("node_ip"), why=exc.message("en"))

    await defer.gatherResults([defer.ensureDeferred(one(d)) for d in made], consumeErrors=True)


def next_number(group: Mapping[str, Any]) -> int:
    """The number of the group's next desktop name (after the highest ever given)."""
    return int(group.get("postfix_next") or group.get("postfix_start") or 1)
