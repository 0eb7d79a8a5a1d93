"""What happens to one desktop: start (admitted per node, restored first in restore groups), stop,
reboot, delete; and the batch over many desktops that reports each failure and lets the rest go on.

A desktop record keeps what the administrator wants (``power``: ``on``/``off``) apart from what the
domain is (``status``: ``active``/``inactive``/``error``): a restore desktop that stops while it is
meant to be on was rebooted by its guest, so it comes back on a fresh overlay (:mod:`.events`).
"""
from __future__ import annotations

from typing import Any, Awaitable, Callable, Mapping, Optional

import attrs
from twisted.internet import defer
from twisted.logger import Logger

from kvmdesk.core import errors
from kvmdesk.core.errors import ApiError
from kvmdesk.core.records import now_text, without
from kvmdesk.plugins.desktops import codes, planner, schema
from kvmdesk.plugins.desktops.domain_ops import DomainOps, network_nic, restores
from kvmdesk.plugins.desktops.provisioning import release_addresses

log = Logger(namespace="kvmdesk.desktops")
ADMISSION = "start_admission"
#: Desktops this controller is acting on now: their lifecycle events are its own doing.
BUSY = "desktops.busy"
USABLE_STATES = ("online", "warning")


LOCKS = "desktops.locks"


def busy(core: Any) -> set[str]:
    return core.extensions.setdefault(BUSY, set())


class DesktopLocks:
    """One lock per desktop: its operations (an administrator's, a restart after a guest reboot) never
    overlap; the entry goes when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[str, defer.DeferredLock] = {}

    async def run(self, uuid: str, work: Callable[[], Awaitable[Any]]) -> Any:
        lock = self._locks.setdefault(uuid, defer.DeferredLock())
        await lock.acquire()
        try:
            return await work()
        finally:
            lock.release()
            if not lock.locked and not lock.waiting:
                self._locks.pop(uuid, None)


def locks(core: Any) -> DesktopLocks:
    return core.extensions.setdefault(LOCKS, DesktopLocks())


@attrs.define(eq=False)
class Context:
    """What the operations on the desktops of one group share: the group, its template, the nodes."""

    core: Any
    group: dict
    template: dict
    nodes: dict[str, dict]
    nic: Optional[dict] = None

    @classmethod
    async def load(cls, core: Any, group: Mapping[str, Any], node_uuids: Optional[list[str]] = None) -> "Context":
        store = core.store
        template = await store.collection(schema.TEMPLATES).find_one({"uuid": group["template"]}) or {}
        filter = {"uuid": {"$in": node_uuids}} if node_uuids is not None else {}
        nodes = {n["uuid"]: n for n in await store.collection(schema.NODES).find(filter)}
        return cls(core, dict(group), template, nodes, await network_nic(core, group["network"]))

    @property
    def ops(self) -> DomainOps:
        return DomainOps(self.core)

    def node_of(self, desktop: Mapping[str, Any]) -> dict:
        node = self.nodes.get(desktop.get("node"))
        if node is None or node.get("state") not in USABLE_STATES:
            raise ApiError(codes.DESKTOP_OFFLINE_NODE, name=desktop["name"], ip=desktop.get("node_ip"),
                           state=(node or {}).get("state") or "removed")
        return node

    def current_version_on(self, node: Mapping[str, Any]) -> Optional[int]:
        """The template's current version if ``node`` has it (published), else ``None``."""
        state = (self.template.get("publish") or {}).get(node["uuid"]) or {}
        version = self.template.get("version")
        return version if version and state.get("version") == version and state.get("status", 0) == 0 else None

    async def update(self, desktop: dict, **changes: Any) -> None:
        changes["updated_at"] = now_text(self.core.clock)
        desktop.update(changes)
        await self.core.store.collection(schema.DESKTOPS).update_one({"uuid": desktop["uuid"]}, {"$set": changes})


async def _guarded(ctx: Context, desktop: dict, work: Callable[[], Awaitable[None]]) -> None:
    """Run ``work`` under the desktop's lock, marked busy (its lifecycle events are then our own doing);
    a failure leaves the desktop in ``error`` saying why."""
    async def locked() -> None:
        marks = busy(ctx.core)
        marks.add(desktop["uuid"])
        try:
            await work()
        except ApiError as exc:
            await ctx.update(desktop, status="error", message=exc.message("en"))
            raise
        finally:
            marks.discard(desktop["uuid"])

    await locks(ctx.core).run(desktop["uuid"], locked)


async def boot(ctx: Context, node: dict, desktop: dict) -> None:
    """Start a stopped domain through its node's admission slot, restoring its overlays first."""
    admission = ctx.core.extensions[ADMISSION]
    ctx.core.extensions[ADMISSION + ".loads"].remember(node)
    slot = await admission.acquire(node["uuid"], int(float(ctx.group["ram"]) * planner.GIB), label=node.get("ip", ""))
    try:
        if restores(ctx.group):
            newer = ctx.current_version_on(node)
            if newer is not None and newer != desktop.get("template_version"):
                await ctx.update(desktop, template_version=newer)  # restore groups follow the template
            await ctx.ops.restore(node, desktop, ctx.group, ctx.template)
        await ctx.ops.power(node, desktop, "start")
    finally:
        admission.release(slot)
    await ctx.update(desktop, status="active", up_time=now_text(ctx.core.clock), up_at=ctx.core.clock.seconds(), message="")


async def start(ctx: Context, desktop: dict) -> None:
    node = ctx.node_of(desktop)

    async def work() -> None:
        await ctx.update(desktop, power="on")
        if await ctx.ops.state(node, desktop) == "active":
            return await ctx.update(desktop, status="active", message="")
        await boot(ctx, node, desktop)

    await _guarded(ctx, desktop, work)


async def stop(ctx: Context, desktop: dict) -> None:
    """Restore desktops are destroyed (their disks are thrown away anyway); others shut down cleanly."""
    node = ctx.node_of(desktop)
    await ctx.update(desktop, power="off")  # before the lock: a restart waiting for it gives up

    async def work() -> None:
        if await ctx.ops.state(node, desktop) != "active":
            return await ctx.update(desktop, status="inactive", up_time=None, message="")
        info = await ctx.ops.power(node, desktop, "destroy" if restores(ctx.group) else "shutdown")
        still_up = (info or {}).get("state") in ("running", "blocked", "paused")
        await ctx.update(desktop, status="active" if still_up else "inactive", up_time=desktop.get("up_time") if still_up else None,
                         message="")

    await _guarded(ctx, desktop, work)


async def reboot(ctx: Context, desktop: dict) -> None:
    """Restore desktops: off, fresh overlays, on (admitted); others: the guest's reboot."""
    node = ctx.node_of(desktop)

    async def work() -> None:
        await ctx.update(desktop, power="on")
        running = await ctx.ops.state(node, desktop) == "active"
        if not restores(ctx.group) and running:
            await ctx.ops.power(node, desktop, "reboot")
            return await ctx.update(desktop, status="active", up_time=now_text(ctx.core.clock), up_at=ctx.core.clock.seconds(),
                                  message="")
        if running:
            await ctx.ops.power(node, desktop, "destroy")
        await boot(ctx, node, desktop)

    await _guarded(ctx, desktop, work)


async def delete(ctx: Context, desktop: dict) -> None:
    """Deleting a running desktop stops it first (not refused: a class's desktops are disposable);
    its domain, overlays, address and record go."""
    node = ctx.nodes.get(desktop.get("node"))
    if node is not None and node.get("state") not in USABLE_STATES:
        raise ApiError(codes.DESKTOP_OFFLINE_NODE, name=desktop["name"], ip=desktop.get("node_ip"), state=node.get("state"))
    await ctx.update(desktop, power="off")  # before the lock: a restart waiting for it gives up

    async def work() -> None:
        if node is not None:
            busy(ctx.core).add(desktop["uuid"])
            try:
                await ctx.ops.remove(node, desktop, ctx.template)
            finally:
                busy(ctx.core).discard(desktop["uuid"])
        await release_addresses(ctx.core, [desktop["uuid"]])
        await ctx.core.store.collection(schema.DESKTOPS).delete_one({"uuid": desktop["uuid"]})
        await ctx.core.deleted(schema.DESKTOP_KIND, without(desktop, schema.HIDDEN_FIELDS))

    await locks(ctx.core).run(desktop["uuid"], work)


async def hard_stop(ctx: Context, desktop: dict) -> None:
    """Power off at once (destroy), whatever the guest is doing (personal desktops' #130)."""
    node = ctx.node_of(desktop)

    async def work() -> None:
        await ctx.update(desktop, power="off")
        if await ctx.ops.state(node, desktop) == "active":
            await ctx.ops.power(node, desktop, "destroy")
        await ctx.update(desktop, status="inactive", up_time=None, message="")

    await _guarded(ctx, desktop, work)


OPERATIONS: dict[str, Callable[[Context, dict], Awaitable[None]]] = {
    "start": start, "stop": stop, "reboot": reboot, "delete": delete, "hard_stop": hard_stop,
}


async def each(ctx: Context, desktops: list[dict], operation: str) -> list[tuple[dict, ApiError]]:
    """Apply ``operation`` to every desktop at once (starts queue per node in the admission control);
    returns the failures, the others having succeeded."""
    failures: list[tuple[dict, ApiError]] = []
    run = OPERATIONS[operation]

    async def one(desktop: dict) -> None:
        try:
            await run(ctx, desktop)
        except ApiError as exc:
            failures.append((desktop, exc))
        except Exception:
            log.failure("desktop {name}: {operation} failed", name=desktop.get("name"), operation=operation)
            failures.append((desktop, ApiError(errors.INTERNAL_ERROR, request_id="-")))

    await defer.gatherResults([defer.ensureDeferred(one(d)) for d in desktops], consumeErrors=True)
    return failures
