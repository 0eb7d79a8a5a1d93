"""Keeping the nodes' Open vSwitch bridges in step with the switches and data networks in the store.

The agent is given the whole desired state of one switch on its node (``PUT /net/switches/{uuid}``:
bridge, type, uplink NIC, and the VLAN tag of every data network of the switch), so pushing is
idempotent and bringing a returning node in step is the same push again.

A :class:`Plan` collects the pushes one request needs, sends them to every node at once, and only
then lets the handler change the store:

- a node whose agent refuses makes the whole request fail (the pushes that did succeed are undone,
  the store is untouched);
- a node whose agent cannot be reached is left out of step (its uplink is marked ``synced: 0``) and
  is brought in step when its watcher sees it come back (:func:`reconcile_node`).
"""
from __future__ import annotations

import functools
from typing import Any, Awaitable, Callable, Mapping, Optional

import attrs
from twisted.internet import defer
from twisted.logger import Logger

from kvmdesk.core.errors import ApiError
from kvmdesk.plugins.network import agents, schema

log = Logger(namespace="kvmdesk.network.dataplane")

State = dict[str, Any]


LOCK = "network.dataplane_lock"


def lock_of(core: Any) -> defer.DeferredLock:
    """One lock for every change of switches and data networks (and node catch-ups): each computes the
    whole desired state of a switch from the store, so two must not interleave."""
    return core.extensions.setdefault(LOCK, defer.DeferredLock())


def exclusive(handler: Callable[[Any], Awaitable[Any]]) -> Callable[[Any], Awaitable[Any]]:
    """Run an API handler that changes switches or data networks under :func:`lock_of`."""

    @functools.wraps(handler)
    async def run(req: Any) -> Any:
        return await lock_of(req.core).run(lambda: defer.ensureDeferred(handler(req)))

    return run


def switch_state(switch: Mapping[str, Any], uplink: str, networks: Mapping[str, int]) -> State:
    """What a node's agent is asked to realise for one switch."""
    return {
        "switch_uuid": switch["uuid"],
        "bridge": switch["bridge"],
        "type": switch["type"],
        "uplink": uplink,
        "networks": dict(networks),
    }


async def networks_of(core: Any, switch_uuid: str) -> dict[str, int]:
    """``{data network uuid: VLAN tag}`` of a switch (tag 0 for a flat switch's network)."""
    found = await core.store.collection(schema.NETWORKS).find({"switch_uuid": switch_uuid}, projection=["uuid", "tag"])
    return {n["uuid"]: n["tag"] for n in found}


async def current_state(core: Any, switch: Mapping[str, Any], uplink: Mapping[str, Any]) -> State:
    """The state the store says a node should have for ``switch`` (uplink ``uplink``)."""
    return switch_state(switch, uplink["nic_name"], await networks_of(core, switch["uuid"]))


@attrs.define
class _Push:
    node: Mapping[str, Any]
    switch_uuid: str
    #: the state to realise, ``None`` to remove the bridge.
    state: Optional[State]
    #: the state to return to on undo, ``None`` if the bridge did not exist.
    previous: Optional[State]
    done: bool = False
    reached: bool = True


async def _send(core: Any, node: Mapping[str, Any], switch_uuid: str, state: Optional[State]) -> Any:
    client = agents.client(core)
    if client is None:
        raise agents.AgentUnreachable(node.get("ip", "?"), "the controller has no node-agent client")
    if state is None:
        return await client.call(node, "DELETE", f"/net/switches/{switch_uuid}")
    return await client.call(node, "PUT", f"/net/switches/{switch_uuid}", state)


class Plan:
    """The bridge changes of one request, applied on the nodes before the store changes."""

    def __init__(self, core: Any):
        self.core = core
        self.pushes: list[_Push] = []

    def ensure(self, node: Mapping[str, Any], state: State, previous: Optional[State]) -> None:
        """Realise ``state`` on ``node``; undo returns to ``previous`` (``None``: remove the bridge)."""
        self.pushes.append(_Push(node, state["switch_uuid"], state, previous))

    def remove(self, node: Mapping[str, Any], switch: Mapping[str, Any], previous: Optional[State]) -> None:
        """Remove the bridge of ``switch`` from ``node``; undo re-creates ``previous``."""
        self.pushes.append(_Push(node, switch["uuid"], None, previous))

    async def apply(self) -> None:
        """Push every change at once.

        :raises ApiError: an agent refused; every change that had been made is undone first.
        """
        if not self.pushes:
            return
        failures: list[ApiError] = []

        async def one(push: _Push) -> None:
            try:
                await _send(self.core, push.node, push.switch_uuid, push.state)
            except agents.AgentUnreachable as exc:
                push.reached = False
                log.warn("node {node} is unreachable ({reason}); switch {switch} is brought in step when it returns",
                         node=agents.node_label(push.node), reason=exc.reason, switch=push.switch_uuid)
            except agents.AgentError as exc:
                failures.append(agents.refused(push.node, exc))
            else:
                push.done = True

        await defer.gatherResults([defer.ensureDeferred(one(p)) for p in self.pushes], consumeErrors=True)
        if failures:
            await self.undo()
            raise failures[0]

    async def undo(self) -> None:
        """Return every node changed so far to its previous state (best effort, logged)."""

        async def one(push: _Push) -> None:
            try:
                await _send(self.core, push.node, push.switch_uuid, push.previous)
                push.done = False
            except (agents.AgentUnreachable, agents.AgentError) as exc:
                log.error("could not undo switch {switch} on node {node}: {exc}; the node is reconciled later",
                          switch=push.switch_uuid, node=agents.node_label(push.node), exc=exc)
                push.reached = False

        await defer.gatherResults([defer.ensureDeferred(one(p)) for p in self.pushes if p.done], consumeErrors=True)

    async def record_sync(self, switch_uuid: str) -> None:
        """Mark each pushed node's uplink in ``switch_uuid`` as in step (1) or not (0)."""
        uplinks = self.core.store.collection(schema.UPLINKS)
        for push in self.pushes:
            if push.switch_uuid == switch_uuid and push.state is not None:
                await uplinks.update_one({"vswitch_uuid": switch_uuid, "node_uuid": push.node["uuid"]},
                                         {"$set": {"synced": 1 if push.reached else 0}})


async def plan_uplinks(plan: Plan, switch: Mapping[str, Any], current: list[dict], resolved: list[dict], *,
                       keep_others: bool = False, force: bool = False) -> None:
    """Add to ``plan`` what a new set of uplinks changes on the nodes.

    :param current: the stored uplink records of the switch.
    :param resolved: the new uplinks (``{"node", "nic"}``).
    :param keep_others: nodes absent from ``resolved`` keep their uplink (one node's change, #55).
    :param force: push to every node, also those whose uplink is unchanged and in step.
    """
    networks = await networks_of(plan.core, switch["uuid"])
    by_node = {u["node_uuid"]: u for u in current}
    for r in resolved:
        old = by_node.get(r["node"]["uuid"])
        if not force and old is not None and old["nic_uuid"] == r["nic"]["uuid"] and old.get("synced"):
            continue
        previous = switch_state(switch, old["nic_name"], networks) if old else None
        plan.ensure(r["node"], switch_state(switch, r["nic"]["nic"], networks), previous)
    if keep_others:
        return
    wanted = {r["node"]["uuid"] for r in resolved}
    gone = [u for u in current if u["node_uuid"] not in wanted]
    nodes = await _nodes(plan.core, [u["node_uuid"] for u in gone])
    for uplink in gone:
        if uplink["node_uuid"] in nodes:
            plan.remove(nodes[uplink["node_uuid"]], switch, switch_state(switch, uplink["nic_name"], networks))


async def plan_networks(plan: Plan, switch: Mapping[str, Any], old: Mapping[str, int], new: Mapping[str, int]) -> None:
    """Add to ``plan`` a change of a switch's data networks (created, retagged or deleted)."""
    uplinks = await plan.core.store.collection(schema.UPLINKS).find({"vswitch_uuid": switch["uuid"]})
    nodes = await _nodes(plan.core, [u["node_uuid"] for u in uplinks])
    for uplink in uplinks:
        node = nodes.get(uplink["node_uuid"])
        if node is not None:
            plan.ensure(node, switch_state(switch, uplink["nic_name"], new), switch_state(switch, uplink["nic_name"], old))


async def _nodes(core: Any, uuids: list[str]) -> dict[str, dict]:
    if not uuids:
        return {}
    return {n["uuid"]: n for n in await core.store.collection(schema.NODES).find({"uuid": {"$in": uuids}})}


async def reconcile_node(core: Any, node: Mapping[str, Any]) -> bool:
    """Bring one node's bridges in step with the store (under :func:`lock_of`); see :func:`_reconcile`."""
    return await lock_of(core).run(lambda: defer.ensureDeferred(_reconcile(core, node)))


async def _reconcile(core: Any, node: Mapping[str, Any]) -> bool:
    """Bring one node's bridges in step with the store: push every switch it has an uplink in and
    remove the kvmdesk bridges the store no longer knows.

    :returns: ``True`` when the node is now in step, ``False`` when it could not be reached.
    :raises agents.AgentError: the agent refused (logged by the caller).
    """
    client = agents.client(core)
    if client is None:
        return False
    store = core.store
    uplinks = await store.collection(schema.UPLINKS).find({"node_uuid": node["uuid"]})
    switches = {s["uuid"]: s for s in await store.collection(schema.SWITCHES).find(
        {"uuid": {"$in": [u["vswitch_uuid"] for u in uplinks]}})}
    try:
        try:
            present = await client.call(node, "GET", "/net/switches")
        except agents.AgentError:
            if not uplinks:
                return True  # a node in no switch needs no Open vSwitch (it may have none running)
            raise
        for uplink in uplinks:
            switch = switches.get(uplink["vswitch_uuid"])
            if switch is not None:
                await client.call(node, "PUT", f"/net/switches/{switch['uuid']}", await current_state(core, switch, uplink))
                await store.collection(schema.UPLINKS).update_one({"uuid": uplink["uuid"]}, {"$set": {"synced": 1}})
        for bridge in present or []:
            if bridge.get("switch_uuid") not in switches:
                await client.call(node, "DELETE", f"/net/switches/{bridge['switch_uuid']}")
    except agents.AgentUnreachable:
        return False
    return True


async def remove_node_bridges(core: Any, node: Mapping[str, Any]) -> list[dict]:
    """Remove every kvmdesk bridge (and with it its ports) from a node that is being deleted.

    The bridges are the ones the node's agent reports as kvmdesk's (``GET /net/switches``); where the
    agent cannot be asked, the ones the store says the node has (its uplinks).

    :param node: the node record (read again from the store: the agent secret signs the calls).
    :returns: what could not be removed: ``[{"bridge", "switch_uuid", "reason"}]``.
    """
    return await lock_of(core).run(lambda: defer.ensureDeferred(_remove_node_bridges(core, node)))


async def _remove_node_bridges(core: Any, node: Mapping[str, Any]) -> list[dict]:
    store = core.store
    record = await store.collection(schema.NODES).find_one({"uuid": node["uuid"]}) or node
    client = agents.client(core)
    uplinks = await store.collection(schema.UPLINKS).find({"node_uuid": node["uuid"]})
    known = {s["uuid"]: s["bridge"] for s in await store.collection(schema.SWITCHES).find(
        {"uuid": {"$in": [u["vswitch_uuid"] for u in uplinks]}})}

    def stored(reason: str) -> list[dict]:
        return [{"bridge": bridge, "switch_uuid": uuid, "reason": reason} for uuid, bridge in known.items()]

    if client is None:
        return stored("no agent client")
    try:
        present = await client.call(record, "GET", "/net/switches") or []
    except agents.AgentUnreachable as exc:
        return stored(f"the node's agent cannot be reached: {exc.reason}")
    except agents.AgentError as exc:
        # an agent without Open vSwitch has no bridge of ours, unless the store says it should
        return stored(f"the node's agent could not list its bridges: {exc.msg}")
    left = []
    for bridge in present:
        try:
            await client.call(record, "DELETE", f"/net/switches/{bridge['switch_uuid']}")
        except agents.AgentUnreachable as exc:
            left.append({"bridge": bridge.get("bridge"), "switch_uuid": bridge["switch_uuid"], "reason": exc.reason})
        except agents.AgentError as exc:
            left.append({"bridge": bridge.get("bridge"), "switch_uuid": bridge["switch_uuid"], "reason": exc.msg})
        else:
            log.info("node {node}: removed bridge {bridge}", node=agents.node_label(record), bridge=bridge.get("bridge"))
    return left
