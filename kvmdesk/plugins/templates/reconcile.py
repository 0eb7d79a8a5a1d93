"""Reconciling what the nodes have with what the store says about templates.

Every ``[templates] reconcile_interval`` seconds (and at start), for each reachable node: the domains
libvirt has are compared with the templates hosted there.  A template whose domain is gone but whose
disk files are all there gets its domain defined again from its record (``inactive``); one that lacks
a disk file is marked ``error``; a state that differs is corrected (lifecycle events do that at
once; this catches missed ones); a ``tpl-`` domain no template knows is reported, never removed (it may be an administrator's).
A node lacking (a file of) the latest version of a template of its pool is sent it again; version
files of deleted templates the node kept while it was unreachable are removed (:mod:`.leftovers`).
What was found is kept in :attr:`TemplateReconciler.drift` (node uuid -> list of findings) and logged.
"""
from __future__ import annotations

from typing import Any, Mapping

import attrs
from twisted.logger import Logger

from kvmdesk.core.errors import ApiError
from kvmdesk.core.periodic import PeriodicService
from kvmdesk.plugins.templates import leftovers, nodes, publish, schema
from kvmdesk.plugins.templates.service import STATES, domain_name, spec_of, templates

log = Logger(namespace="kvmdesk.templates.reconcile")
EXTENSION = "templates.reconciler"


@attrs.define(eq=False)
class TemplateReconciler(PeriodicService):
    what = "a template reconcile round"

    drift: dict[str, list[dict]] = attrs.field(factory=dict)

    async def reconcile_node(self, node: Mapping[str, Any]) -> list[dict]:
        """One node: findings ``{"kind", "template", "detail"}``; the store is corrected on the way."""
        findings: list[dict] = []
        try:
            domains = await nodes.call(self.core, node, "GET", "/domains")
        except ApiError as exc:
            log.info("node {node} not reconciled now: {why}", node=node.get("ip"), why=exc.message("en"))
            return findings
        by_uuid = {d["uuid"]: d for d in domains}
        hosted = await templates(self.core).find({"host_uuid": node["uuid"]})
        for template in hosted:
            domain = by_uuid.get(template["uuid"])
            if template.get("status") == schema.UPDATING:
                continue
            missing = await self._missing_disks(node, template)
            if domain is None and not missing:
                findings.append(await self._redefine(node, template))
                continue
            if domain is None:
                findings.append({"kind": "domain_missing", "template": template["uuid"],
                                 "detail": f"template {template['name']} has no domain on its node, nor its disk "
                                           f"file(s) {', '.join(missing)}"})
                await self._set_status(template, schema.ERROR)
                continue
            if missing:
                findings.append({"kind": "disk_missing", "template": template["uuid"],
                                 "detail": f"template {template['name']} lacks its disk file(s) "
                                           f"{', '.join(missing)} on its node"})
                await self._set_status(template, schema.ERROR)
                continue
            status = STATES.get(domain["state"], schema.ERROR)
            if status != template.get("status"):
                findings.append({"kind": "state_differs", "template": template["uuid"],
                                 "detail": f"{template.get('status')} in the store, {domain['state']} on the node"})
                await self._set_status(template, status)
        known = {domain_name(t["uuid"]) for t in hosted}
        for domain in domains:
            if domain["name"].startswith("tpl-") and domain["name"] not in known:
                findings.append({"kind": "unknown_domain", "template": domain["uuid"],
                                 "detail": f"domain {domain['name']} belongs to no template of this node"})
        await self._check_versions(node, findings)
        findings.extend(await leftovers.clean_node(self.core, node))
        for finding in findings:
            log.warn("node {node}: {detail}", node=node.get("ip"), detail=finding["detail"])
        self.drift[node["uuid"]] = findings
        return findings

    async def _redefine(self, node: Mapping[str, Any], template: Mapping[str, Any]) -> dict:
        """Define the domain of a template whose disks are all there again (the store is the truth);
        the template is ``inactive`` then, or ``error`` if the node refuses the definition."""
        try:
            await nodes.call(self.core, node, "PUT", f"/domains/{template['uuid']}/spec",
                             spec_of(self.core, template, iso=template.get("iso_uuid")), template_name=template["name"])
        except ApiError as exc:
            await self._set_status(template, schema.ERROR)
            return {"kind": "domain_missing", "template": template["uuid"],
                    "detail": f"template {template['name']} has no domain on its node and defining it again failed: "
                              f"{exc.message('en')}"}
        await self._set_status(template, schema.INACTIVE)
        return {"kind": "domain_redefined", "template": template["uuid"],
                "detail": f"template {template['name']} had no domain on its node: defined again from its record"}

    async def _missing_disks(self, node: Mapping[str, Any], template: Mapping[str, Any]) -> list[str]:
        """The device names of the template's working disks its node does not have (asked of the agent)."""
        missing = []
        for device in template["devices"]:
            info = await nodes.call(self.core, node, "GET", f"/disks/template/{device['file_id']}",
                                    params={"role": device["role"]}, template_name=template["name"], missing_ok=True)
            if info is None:
                missing.append(device.get("device_name") or device["file_id"])
        return missing

    async def _check_versions(self, node: Mapping[str, Any], findings: list[dict]) -> None:
        """The latest version of each template of the node's pool must be on it (asked of the agent, not
        taken from the store); a missing one is sent again from the template's host."""
        for template in await templates(self.core).find({"pool_uuid": node.get("resource_pool_uuid"),
                                                         "version": {"$gte": 1}}):
            if template.get("status") == schema.UPDATING or template.get("host_uuid") == node["uuid"]:
                continue
            files = template["versions"][-1]["files"]
            try:
                progress = await publish.progress_of(self.core, node, files)
            except ApiError:
                return  # the node stopped answering: the next round
            if all(p == 100 for p in progress.values()):
                continue
            findings.append({"kind": "version_missing", "template": template["uuid"],
                             "detail": f"version {template['version']} of template {template['name']} is not "
                                       f"(all) on the node: sending it"})
            host = await self.core.store.collection(schema.NODES).find_one({"uuid": template.get("host_uuid")})
            if host is not None:
                result = await publish.send_to(self.core, template, host, node, files, template["version"])
                current = await templates(self.core).find_one({"uuid": template["uuid"]}) or template
                await templates(self.core).update_one({"uuid": template["uuid"]}, {"$set": {
                    "publish": {**(current.get("publish") or {}), node["uuid"]: result}}})

    async def _set_status(self, template: Mapping[str, Any], status: str) -> None:
        await templates(self.core).update_one({"uuid": template["uuid"], "status": {"$ne": schema.UPDATING}},
                                              {"$set": {"status": status}})

    async def sweep(self) -> None:
        for node in await self.core.store.collection(schema.NODES).find(
                {"state": {"$in": list(nodes.USABLE_STATES)}}, sort=[("id", 1)]):
            if node.get("agent_secret"):
                await self.reconcile_node(node)
