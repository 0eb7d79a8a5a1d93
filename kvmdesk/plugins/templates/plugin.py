"""Hook implementations of the ``templates`` plugin."""
from __future__ import annotations

from typing import Any, Mapping, Optional

from kvmdesk import hookimpl
from kvmdesk.core.errors import ApiError, Resource
from twisted.internet import defer
from twisted.logger import Logger

from kvmdesk.plugins.templates import intents, leftovers, publish, reconcile, routes, schedule, schema, service, views

__all__ = [
    "kvmdesk_config_defaults",
    "kvmdesk_configure",
    "kvmdesk_domain_event",
    "kvmdesk_node_removed",
    "kvmdesk_node_status_changed",
    "kvmdesk_services",
    "kvmdesk_startup",
    "kvmdesk_routes",
    "kvmdesk_store_indexes",
    "kvmdesk_usage",
]

log = Logger(namespace="kvmdesk.templates")

#: ``[templates] nic_kind``: ``ovs`` (the data network's bridge and VLAN) or ``user`` (QEMU user-mode
#: networking, for hosts without Open vSwitch: demos and the real-QEMU tests).
#: ``[templates] reconcile_interval``: seconds between comparisons of the nodes' domains with the store.
#: ``progress_interval``: seconds between the per-node, per-disk progress reports of a publish.
DEFAULTS = {"templates": {"nic_kind": "ovs", "reconcile_interval": 60.0, "progress_interval": 2.0}}

#: What a resource kind is called in a template record.
USAGE_FIELDS = {"base_image": "base_image_uuid", "iso": "iso_uuid", "data_network": "network_uuid",
                "subnet": "subnet_uuid", "resource_pool": "pool_uuid", "node": "host_uuid"}

#: The extension the storage plugin asks for a node's published template versions (#34).
NODE_IMAGES = "templates.node_images"
#: ...and the one it asks to send one of them to the node again (#34's resync).
RESYNC_IMAGE = "templates.resync_image"

#: Lifecycle events that change a template's status.
STATE_EVENTS = ("started", "resumed", "suspended", "stopped", "shutdown", "crashed")


@hookimpl
def kvmdesk_config_defaults():
    return DEFAULTS


@hookimpl
def kvmdesk_store_indexes():
    return schema.INDEXES


@hookimpl
def kvmdesk_routes(router, core) -> None:
    routes.register_routes(router)


@hookimpl
def kvmdesk_usage(core: Any, kind: str, uuid: str):
    field = USAGE_FIELDS.get(kind)
    if field is None:
        return None

    async def templates_using() -> Optional[Resource]:
        found = await core.store.collection(schema.TEMPLATES).find({field: uuid}, projection=["name"], limit=3)
        if not found:
            return None
        names = ", ".join(t["name"] for t in found)
        return Resource(f"模板 {names} 正在使用", f"used by templates {names}")

    return templates_using()


@hookimpl
def kvmdesk_domain_event(core: Any, node: Mapping[str, Any], event: Mapping[str, Any]):
    if event.get("event") not in STATE_EVENTS:
        return None

    async def refresh() -> None:
        # The domain's state now, not the event's: events arrive after the action's own answer (a hard
        # reboot's "stopped" comes in once it runs again), so the last one always leaves the truth.
        template = await core.store.collection(schema.TEMPLATES).find_one({"uuid": event["uuid"]})
        if template is None or template.get("host_uuid") != node.get("uuid"):
            return
        try:
            status = await service.domain_state(core, template)  # the hook's node has no agent secret
        except ApiError as exc:
            log.info("template {name}: state after an event unknown: {why}", name=template["name"],
                     why=exc.message("en"))
            return
        await service.set_status(core, template["uuid"], status)

    return refresh()


@hookimpl
def kvmdesk_configure(core: Any) -> None:
    schedule.register(core)  # the save job and its run_date entries


@hookimpl
def kvmdesk_services(core):
    reconciler = reconcile.TemplateReconciler(core, float(core.config.get("templates.reconcile_interval", 60.0)))
    core.extensions[reconcile.EXTENSION] = reconciler
    # What the storage plugin's list of a node's template images (#34) adds for published versions.
    core.extensions[NODE_IMAGES] = lambda node: views.node_images(core, node)
    core.extensions[RESYNC_IMAGE] = lambda node, image_id, version, role: routes.resync_image(
        core, node, image_id, version, role)
    return [reconciler]


@hookimpl
def kvmdesk_startup(core):
    return startup(core)


async def startup(core: Any) -> None:
    # before the job service starts: the save jobs it resumes find their templates usable again
    await publish.recover_interrupted(core)
    await intents.recover(core)  # creates and copies cut short: their leftovers go with the reconciler's first round
    await schedule.take_over_saved_schedules(core)


@hookimpl
def kvmdesk_node_status_changed(core: Any, node: Mapping[str, Any], old: Optional[str], new: str) -> None:
    # A node back online (or new) gets the latest version of its pool's templates it lacks.
    if new != "online" or old == "online":
        return
    d = defer.ensureDeferred(node_returned(core, node))
    d.addErrback(lambda f: log.failure("cleaning or catching up node {node} failed", f, node=node.get("uuid")))


async def node_returned(core: Any, node: Mapping[str, Any]) -> None:
    """What deleted templates left on the node goes; the versions it lacks come.

    ``node`` is what the hook hands plugins (no agent secret): both talk to the stored record."""
    enrolled = await core.store.collection(schema.NODES).find_one({"uuid": node["uuid"]})  # with its secret
    if enrolled is None or not enrolled.get("agent_secret"):
        return
    await leftovers.clean_node(core, enrolled)
    await publish.catch_up(core, enrolled)


@hookimpl
def kvmdesk_node_removed(core: Any, node: Mapping[str, Any]):
    return leftovers.forget_node(core, node["uuid"])
