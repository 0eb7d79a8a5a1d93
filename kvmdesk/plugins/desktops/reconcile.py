"""Reconciling what the nodes have with what the store says about desktops.

Lifecycle events set a desktop's status at once (:mod:`.events`); this loop catches what they missed.
Every ``[desktops] reconcile_interval`` seconds, for each reachable node that has desktops, the
domains libvirt has are compared with the desktops placed there: a differing status is corrected, a
desktop whose domain is gone is marked ``error`` (saying so in ``message``).  Desktops under an
operation of this controller are left alone.  What was found is kept in :attr:`drift`.
"""
from __future__ import annotations

from typing import Any, Mapping

import attrs
from twisted.logger import Logger

from kvmdesk.core.errors import ApiError
from kvmdesk.core.records import now_text
from kvmdesk.core.periodic import PeriodicService
from kvmdesk.plugins.desktops import power, schema
from kvmdesk.plugins.desktops.domain_ops import STATES, DomainOps

log = Logger(namespace="kvmdesk.desktops.reconcile")
EXTENSION = "desktops.reconciler"
MISSING = "the desktop's domain is missing on its node"


@attrs.define(eq=False)
class DesktopReconciler(PeriodicService):
    what = "a desktop reconcile round"

    drift: dict[str, list[dict]] = attrs.field(factory=dict)

    async def reconcile_node(self, node: Mapping[str, Any]) -> list[dict]:
        """One node: findings ``{"kind", "desktop", "detail"}``; the store is corrected on the way."""
        findings: list[dict] = []
        desktops = await self.core.store.collection(schema.DESKTOPS).find({"node": node["uuid"]})
        if not desktops:
            return findings
        try:
            domains = await DomainOps(self.core).call(node, {"name": "*"}, "GET", "/domains")
        except ApiError as exc:
            log.info("node {node} not reconciled now: {why}", node=node.get("ip"), why=exc.message("en"))
            return findings
        by_uuid = {d["uuid"]: d for d in domains or []}
        busy = power.busy(self.core)
        for desktop in desktops:
            if desktop["uuid"] in busy:
                continue
            domain = by_uuid.get(desktop["uuid"])
            if domain is None:
                status, message = "error", MISSING
            else:
                status, message = STATES.get(domain["state"], "error"), ""
            if (status, message) == (desktop.get("status"), desktop.get("message") or ""):
                continue
            findings.append({"kind": "domain_missing" if domain is None else "state_differs", "desktop": desktop["uuid"],
                             "detail": f"desktop {desktop['name']}: {desktop.get('status')} in the store, "
                                       f"{domain['state'] if domain else 'no domain'} on the node"})
            changes: dict[str, Any] = {"status": status, "message": message, "updated_at": now_text(self.core.clock)}
            if status == "active" and desktop.get("status") != "active":
                changes.update(up_time=now_text(self.core.clock), up_at=self.core.clock.seconds())
            if status != "active":
                changes["up_time"] = None
            await self.core.store.collection(schema.DESKTOPS).update_one({"uuid": desktop["uuid"]}, {"$set": changes})
        for finding in findings:
            log.warn("node {node}: {detail}", node=node.get("ip"), detail=finding["detail"])
        self.drift[node["uuid"]] = findings
        return findings

    async def sweep(self) -> None:
        for node in await self.core.store.collection(schema.NODES).find(
                {"state": {"$in": list(power.USABLE_STATES)}}, sort=[("id", 1)]):
            if node.get("agent_secret"):
                await self.reconcile_node(node)
