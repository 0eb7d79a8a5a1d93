"""Hook implementations of the ``desktops`` plugin."""
from __future__ import annotations

from typing import Any, Optional

from twisted.logger import Logger

from kvmdesk import hookimpl
from kvmdesk.core import group_names
from kvmdesk.core.errors import Resource
from kvmdesk.plugins.desktops import (admission, desktop_groups, events, instances, reconcile, schema, teaching_groups,
                                      terminals, timetables)
from kvmdesk.plugins.desktops.loads import NodeLoads
from kvmdesk.plugins.desktops import (broker, personal_groups, personal_instances, personal_schema, portal, portal_auth,
                                      random_bindings, static_bindings)

__all__ = ["kvmdesk_config_defaults", "kvmdesk_configure", "kvmdesk_domain_event", "kvmdesk_reconcile", "kvmdesk_resource_counts", "kvmdesk_routes", "kvmdesk_services", "kvmdesk_startup", "kvmdesk_store_indexes", "kvmdesk_usage"]

log = Logger(namespace="kvmdesk.desktops")

#: The start-admission service (boot-storm control) other parts of the plugin and the bench reach.
ADMISSION = "start_admission"

DEFAULTS = {
    "desktops": {
        # Placement (planner.py): vCPUs per logical CPU a node may commit to desktops.
        "cpu_overcommit": 8.0,
        # RAM a node may commit to desktops, as a share of its total (1.0: none overcommitted)...
        "ram_overcommit": 1.0,
        # ...less this much kept for the host, in GiB.
        "ram_reserve_gib": 2,
        # Free space a new desktop overlay needs on the node's desktop-disk storage, in GiB.
        "disk_per_desktop_gib": 1,
        # Desktops of one batch (a job) worked on at once; starts still queue per node (admission).
        "batch_concurrency": 1000,
        # Seconds between rounds comparing every node's domains with its desktops (missed events).
        "reconcile_interval": 60.0,
        # "ovs": desktops' NICs on their data network's bridge and VLAN; "user": QEMU user-mode
        # networking (hosts without Open vSwitch: demos, tests).
        "nic_kind": "ovs",
        # Seconds a terminal (thin client) counts as online after it last announced itself.
        "terminal_online_seconds": 180.0,
        "admission": {
            # Concurrent starts per logical CPU of a node (at least 1, at most max_starts)...
            "starts_per_cpu": 0.5,
            "max_starts": 16,
            # ...scaled down linearly as the node's CPU use goes from idle_cpu to busy_cpu percent.
            "idle_cpu": 50.0,
            "busy_cpu": 95.0,
            # Free memory (GiB) a node keeps beyond the RAM of the desktops starting on it.
            "memory_reserve_gib": 1,
            # Seconds between re-checks of a node whose queue waits for memory with nothing starting.
            "recheck": 1.0,
            # Seconds a start may wait for its slot before it fails.
            "queue_timeout": 600.0,
        },
        # The desktop users' portal (/portal): sessions and the random desktops they hold.
        "portal": {
            # Seconds a desktop user's token lives at most.
            "token_ttl": 43200,
            # Seconds without a request after which a session ends and its random desktop is freed.
            "idle_timeout": 1800,
            # Seconds between the rounds that end idle sessions.
            "sweep_interval": 60.0,
        },
    }
}


@hookimpl
def kvmdesk_config_defaults():
    return DEFAULTS


@hookimpl
def kvmdesk_configure(core: Any) -> None:
    loads = NodeLoads(core)
    core.extensions[ADMISSION] = admission.StartAdmission(core.clock, loads, admission.Settings.from_config(core.config))
    core.extensions[ADMISSION + ".loads"] = loads
    timetables.register(core)
    core.extensions[portal_auth.EXTENSION] = portal_auth.DesktopUserAuth.from_config(core)
    core.extensions[broker.EXTENSION] = broker.Broker(core)


@hookimpl
def kvmdesk_services(core: Any):
    reconciler = reconcile.DesktopReconciler(core, float(core.config.get("desktops.reconcile_interval", 60.0)))
    core.extensions[reconcile.EXTENSION] = reconciler
    releaser = broker.IdleReleaser(core, float(core.config.get("desktops.portal.sweep_interval", 60.0)))
    return [core.extensions[ADMISSION], reconciler, releaser]


@hookimpl
def kvmdesk_store_indexes():
    return schema.INDEXES + personal_schema.INDEXES


@hookimpl
def kvmdesk_routes(router, core) -> None:
    teaching_groups.register_routes(router)
    desktop_groups.register_routes(router)
    instances.register_routes(router)
    timetables.register_routes(router)
    personal_groups.register_routes(router)
    random_bindings.register_routes(router)
    static_bindings.register_routes(router)
    personal_instances.register_routes(router)
    portal.register_routes(router)
    terminals.register_routes(router)


@hookimpl
def kvmdesk_startup(core: Any):
    return startup(core)


async def startup(core: Any) -> None:
    """Make the group-name claims match the teaching groups (repairs a crash between two steps)."""
    found = await core.store.collection(schema.TEACHING_GROUPS).find({}, projection=["uuid", "name"])
    conflicts = await group_names.reconcile(core.store, schema.TEACHING_KIND, {g["uuid"]: g["name"] for g in found})
    for name in conflicts:
        log.warn("teaching group {name!r} shares its name with another kind of group; rename one of them", name=name)


#: What desktop groups and desktops refer to, by the kind other plugins ask about.
_GROUP_FIELDS = {"template": "template", "subnet": "subnet", "data_network": "network", "resource_pool": "pool",
                 schema.TEACHING_KIND: "group"}


@hookimpl
def kvmdesk_usage(core: Any, kind: str, uuid: str) -> Optional[Any]:
    return usage(core, kind, uuid)


async def usage(core: Any, kind: str, uuid: str) -> Optional[Resource]:
    """Teaching groups hold networks and subnets; desktop groups hold templates, subnets, networks,
    pools and teaching groups; desktops hold nodes."""
    reason = await teaching_groups.usage(core, kind, uuid) or await personal_groups.usage(core, kind, uuid)
    if reason:
        return reason
    if kind == "node":
        count = await core.store.collection(schema.DESKTOPS).count({"node": uuid})
        return Resource(f"还有 {count} 个教学桌面", f"{count} teaching desktops on it") if count else None
    field = _GROUP_FIELDS.get(kind)
    if field is None:
        return None
    found = await core.store.collection(schema.DESKTOP_GROUPS).find({field: uuid}, projection=["name"], limit=3)
    names = ", ".join(g["name"] for g in found)
    return Resource(f"教学桌面组 {names} 正在使用", f"used by teaching desktop groups {names}") if found else None


@hookimpl
def kvmdesk_reconcile(core: Any):
    return forget_missing_nodes(core)


async def forget_missing_nodes(core: Any) -> None:
    """Desktops whose node was deleted while this plugin was blocked are marked ``error`` (kept: their
    addresses and names stay taken until an administrator deletes them)."""
    placed = await core.store.collection(schema.DESKTOPS).find({}, projection=["uuid", "node"])
    nodes = {n["uuid"] for n in await core.store.collection(schema.NODES).find({}, projection=["uuid"])}
    lost = sorted({d["uuid"] for d in placed if d.get("node") not in nodes})
    for start in range(0, len(lost), 500):
        await core.store.collection(schema.DESKTOPS).update_many(
            {"uuid": {"$in": lost[start : start + 500]}}, {"$set": {"status": "error", "message": NODE_GONE}})
    if lost:
        log.warn("{n} teaching desktops are on nodes that no longer exist", n=len(lost))


NODE_GONE = "the desktop's node was deleted"


@hookimpl
def kvmdesk_domain_event(core: Any, node: Any, event: Any):
    return events.on_domain_event(core, node, event)


@hookimpl
def kvmdesk_resource_counts(core: Any):
    return terminals.resource_counts(core)
