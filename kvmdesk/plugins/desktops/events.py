"""Desktop state from the agents' libvirt lifecycle events, and restore on a guest-initiated reboot.

A restore desktop's domain is defined with ``on_reboot="destroy"``: when its guest reboots, the domain
stops and the agent reports it.  If nobody here stopped it (the desktop is not under an operation of
this controller) and it is meant to be on (``power == "on"``), it is a guest reboot, or a guest
shutdown: either way the desktop comes back on fresh overlays of its template's current version,
through its node's admission slot.  Other desktops just take the state the event says.
"""
from __future__ import annotations

from typing import Any, Mapping

from twisted.logger import Logger

from kvmdesk.core.errors import ApiError
from kvmdesk.core.records import now_text
from kvmdesk.plugins.desktops import power, schema
from kvmdesk.plugins.desktops.domain_ops import restores
from kvmdesk.plugins.desktops.personal_schema import PERSONAL_GROUPS

log = Logger(namespace="kvmdesk.desktops.events")
STOPPED, STARTED = "stopped", "started"


async def on_domain_event(core: Any, node: Mapping[str, Any], event: Mapping[str, Any]) -> None:
    if event.get("event") not in (STOPPED, STARTED):
        return
    desktop = await core.store.collection(schema.DESKTOPS).find_one({"uuid": event.get("uuid")})
    if desktop is None or desktop.get("node") != node.get("uuid") or desktop["uuid"] in power.busy(core):
        return
    stamp = now_text(core.clock)
    if event["event"] == STARTED:
        if desktop.get("status") != "active":
            await core.store.collection(schema.DESKTOPS).update_one({"uuid": desktop["uuid"]}, {"$set": {
                "status": "active", "up_time": stamp, "up_at": core.clock.seconds(), "updated_at": stamp}})
        return
    group = await core.store.collection(schema.DESKTOP_GROUPS).find_one({"uuid": desktop.get("desktop_uuid")})
    if group is None:  # a personal desktop (its group is always active)
        group = await core.store.collection(PERSONAL_GROUPS).find_one({"uuid": desktop.get("desktop_uuid")})
        group = {**group, "active": True} if group is not None else None
    if group is not None and restores(group) and desktop.get("power") == "on" and group.get("active"):
        await power.locks(core).run(desktop["uuid"], lambda: restart(core, group, desktop["uuid"]))
        return
    await core.store.collection(schema.DESKTOPS).update_one({"uuid": desktop["uuid"]}, {"$set": {
        "status": "inactive", "power": "off", "up_time": None, "updated_at": stamp}})


async def restart(core: Any, group: Mapping[str, Any], uuid: str) -> None:
    """Restore and start a desktop its guest stopped, unless it was stopped or deleted meanwhile."""
    desktop = await core.store.collection(schema.DESKTOPS).find_one({"uuid": uuid})
    if desktop is None or desktop.get("power") != "on":
        return
    ctx = await power.Context.load(core, group, [desktop["node"]])
    marks = power.busy(core)
    marks.add(uuid)
    try:
        node = ctx.node_of(desktop)
        if await ctx.ops.state(node, desktop) != "active":
            await power.boot(ctx, node, desktop)
    except ApiError as exc:
        await ctx.update(desktop, status="error", message=exc.message("en"))
        log.warn("desktop {name} stopped by its guest could not be restored and started: {why}",
                 name=desktop["name"], why=exc.message("en"))
    finally:
        marks.discard(uuid)
