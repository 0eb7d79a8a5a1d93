"""Bringing nodes in step: their NICs in the store, their bridges on the node.

Changes made while a node was unreachable were confirmed by the other nodes and stored; the node
itself is brought in step here:

- at once, from the hook ``kvmdesk_node_status_changed``, when a node becomes reachable (first seen,
  or back from offline);
- by a sweep every ``[network] sync_interval`` seconds (and at start), for reachable nodes the store
  says are not in step: never synced (a node just added, whose watcher starts out "online"), or with
  an uplink that missed a change.  A catch-up that failed is thus tried again.
"""
from __future__ import annotations

from typing import Any, Mapping

import attrs
from twisted.internet import defer
from twisted.logger import Logger

from kvmdesk.core.errors import ApiError
from kvmdesk.core.periodic import PeriodicService
from kvmdesk.plugins.network import agents, dataplane, schema, switches
from kvmdesk.plugins.network import errors as net_errors
from kvmdesk.plugins.network.nics import EXTENSION as NICS_EXTENSION

log = Logger(namespace="kvmdesk.network.sync")

EXTENSION = "network.sync"
REACHABLE = ("online", "warning")
DEFAULTS = {"network": {"sync_interval": 30.0}}


@attrs.define(eq=False)
class NodeSync(PeriodicService):
    """Runs one catch-up per node at a time; ``stopService`` waits for those in progress.

    :param core: the running core (its ``clock`` drives the sweep).
    :param interval: seconds between sweeps.
    """

    what = "a network sync sweep"

    running_syncs: dict = attrs.field(factory=dict)

    def node_changed(self, node: Mapping[str, Any], old: Any, new: str) -> None:
        """Called by the hook: a node that became reachable is brought in step (in the background)."""
        if new in REACHABLE and old not in REACHABLE:
            self.bring_in_step(node)

    def bring_in_step(self, node: Mapping[str, Any]) -> defer.Deferred:
        """Sync one node's NICs and bridges now; returns a Deferred that never fails (errors are logged)."""
        uuid = node["uuid"]
        if uuid in self.running_syncs:
            return self.running_syncs[uuid]
        d = defer.ensureDeferred(self._bring_in_step(dict(node)))
        self.running_syncs[uuid] = d

        def done(result: Any) -> Any:
            self.running_syncs.pop(uuid, None)
            return result

        return d.addBoth(done)

    async def _bring_in_step(self, node: dict) -> bool:
        label = agents.node_label(node)
        # Hooks hand out node records without their agent secret: the agent is called with the stored one.
        node = await self.core.store.collection(schema.NODES).find_one({"uuid": node["uuid"]})
        if node is None or not node.get("agent_secret"):
            # Deleted meanwhile, or not enrolled yet (the controller's own node at first start): its
            # enrolment announces it and brings it in step then.
            log.debug("node {node} is not enrolled: nothing to bring in step yet", node=label)
            return False
        nics = self.core.extensions[NICS_EXTENSION]
        try:
            await nics.serialized(node["uuid"], lambda: nics.sync_node(node))
            await switches.adopt_node_uplinks(self.core, node)
            in_step = await dataplane.reconcile_node(self.core, node)
        except ApiError as exc:
            # unreachable is routine (a node being enrolled, a flapping link): the next sweep retries
            emit = log.info if exc.error is net_errors.AGENT_UNREACHABLE else log.warn
            emit("node {node} not brought in step (retried by the next sweep): {reason}", node=label,
                 reason=exc.message("en"))
            return False
        except agents.AgentError as exc:
            log.warn("node {node} refused to be brought in step: {reason}", node=label, reason=exc.msg)
            return False
        except Exception:
            log.failure("bringing node {node} in step failed", node=label)
            return False
        if in_step:
            log.info("node {node} is in step with the virtual switches", node=label)
        return in_step

    async def out_of_step(self) -> list[dict]:
        """Reachable nodes that were never synced, or have an uplink that missed a change."""
        store = self.core.store
        nodes = [n for n in await store.collection(schema.NODES).find({"state": {"$in": list(REACHABLE)}}, sort=[("id", 1)])
                 if n.get("agent_secret")]  # one not enrolled yet has nothing to bring in step
        uuids = [n["uuid"] for n in nodes]
        synced = await store.collection(schema.NICS).count_by("node_uuid", {"node_uuid": {"$in": uuids}})
        behind = await store.collection(schema.UPLINKS).count_by("node_uuid", {"node_uuid": {"$in": uuids}, "synced": 0})
        return [n for n in nodes if not synced.get(n["uuid"]) or behind.get(n["uuid"])]

    async def sweep(self) -> None:
        """One round: bring every out-of-step node in step, and wait for it."""
        for node in await self.out_of_step():
            self.bring_in_step(node)
        await self.settled()

    def settled(self) -> defer.Deferred:
        """Fires once every catch-up in progress has finished."""
        return defer.gatherResults(list(self.running_syncs.values()), consumeErrors=True)

    def stopService(self) -> defer.Deferred:
        return defer.gatherResults([super().stopService(), self.settled()], consumeErrors=True)
