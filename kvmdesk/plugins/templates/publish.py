"""#70 save: a template's disks become an immutable new version, sent to every node of its pool.

The host node flattens each disk into ``<disk>.v<N>`` (sealed with its SHA-256 digest, computed while
the others already fetch it: :func:`send_sealing`).  Every other node of the pool fetches those files
*from the host node's agent*, on a ticket the controller signed with the host's secret
(:mod:`kvmdesk.agent.images.peers`), and verifies their digest: the controller moves no bytes.  A
version's files record ``digest`` (``sha256:<hex>``); versions saved before hold an ``md5`` instead and
are still sent and verified by it (:func:`kvmdesk.protocol.images.recorded_digest`).  The template is
``updating`` meanwhile; a node that could not be reached gets the version when it comes back
(:func:`catch_up`).  Versions are kept per template (``versions``), with each node's state
(``publish``: node uuid -> ``{"version", "status", "error"}``; 0 done, 1 under way, 2 failed).
"""
from __future__ import annotations

import time
from typing import Any, Callable, Mapping, Optional

from twisted.internet import defer, task
from twisted.logger import Logger

from kvmdesk.core import agentauth
from kvmdesk.core import errors as core_errors
from kvmdesk.core.errors import ApiError
from kvmdesk.core.records import now_text
from kvmdesk.plugins.templates import errors, nodes, schema
from kvmdesk.plugins.templates.service import Undo, domain_state, refuse_if_updating, template_or_404, templates
from kvmdesk.protocol.images import recorded_digest

log = Logger(namespace="kvmdesk.templates.publish")
DONE, SYNCING, FAILED = 0, 1, 2
#: Seconds a fetch may take (a 2 GiB version over a slow link); the ticket itself is checked at once.
FETCH_TIMEOUT = 6 * 3600.0
#: Seconds a flatten, or the digest of what it made, may take (a 2 GiB version took 25 s on a busy host).
SEAL_TIMEOUT = 6 * 3600.0


def version_file(file_id: str, version: int) -> str:
    return f"{file_id}.v{version}"


def ticket(core: Any, source: Mapping[str, Any], role: int, file_id: str) -> tuple[str, dict[str, str]]:
    """``(url, signed headers)`` for one fetch of ``template/file_id`` from ``source``'s agent.

    Signed with the source's secret: the source accepts it within its clock skew, once (nonce)."""
    client = core.extensions["agents"]
    target = f"/agent/v1/images/template/{file_id}/content?role={role}"
    headers = agentauth.sign(source["agent_secret"], "GET", target, None, now=getattr(client, "wallclock", time.time)())
    return client.url(source["ip"], target), headers


async def send_to(core: Any, template: Mapping[str, Any], host: Mapping[str, Any], node: Mapping[str, Any],
                  files: list[dict], version: int) -> dict:
    """Have ``node`` fetch every file of a version from ``host``; returns the node's publish state."""
    try:
        for f in files:
            url, headers = ticket(core, host, f["role"], f["file_id"])
            await nodes.call(core, node, "POST", f"/images/template/{f['file_id']}/fetch",
                             {"role": f["role"], "digest": recorded_digest(f), "total": f["size"], "version": version,
                              "url": url, "ticket": headers}, template_name=template["name"], timeout=FETCH_TIMEOUT)
    except ApiError as exc:
        log.warn("node {node} did not get version {v} of template {t}: {why}", node=node.get("ip"), v=version,
                 t=template["name"], why=exc.message("en"))
        return {"version": version, "status": FAILED, "error": exc.message("en")}
    return {"version": version, "status": DONE, "error": None}


async def send_sealing(core: Any, template: Mapping[str, Any], host: Mapping[str, Any], targets: list[dict],
                       files: list[dict], version: int) -> list[dict]:
    """Send a version the host is still hashing (``seal_later``) to ``targets``; fills each file's ``digest``.

    The nodes fetch at once, without the digest (each hashes what it receives), while the host computes
    it: its hashing overlaps the transfers instead of delaying them.  Then each node fetches again
    with the digest, which only verifies and commits what it holds (nothing is sent again); a node whose
    copy does not match drops it and fetches it whole once more.  Returns each target's publish state.
    """
    receiving = [defer.ensureDeferred(send_to(core, template, host, n, files, version)) for n in targets]
    try:
        for f in files:
            sealed = await nodes.call(core, host, "POST", f"/disks/template/{f['file_id']}/seal",
                                      params={"role": f["role"]}, template_name=template["name"],
                                      timeout=SEAL_TIMEOUT)
            f["digest"] = sealed["digest"]
    finally:
        received = await defer.gatherResults(receiving, consumeErrors=True)
    return await defer.gatherResults([defer.ensureDeferred(verify_on(core, template, host, node, files, version, first))
                                      for node, first in zip(targets, received)], consumeErrors=True)


async def verify_on(core: Any, template: Mapping[str, Any], host: Mapping[str, Any], node: Mapping[str, Any],
                    files: list[dict], version: int, received: dict) -> dict:
    """After an unsealed fetch: have ``node`` verify and commit every file (once refetched if damaged)."""
    if received["status"] != DONE:
        return received
    result = await send_to(core, template, host, node, files, version)
    if result["status"] != DONE:  # a copy that failed its check was dropped: fetched whole, once
        result = await send_to(core, template, host, node, files, version)
    return result


async def progress_of(core: Any, node: Mapping[str, Any], files: list[dict]) -> dict[str, int]:
    """Per disk (device uuid), the percentage of its version file ``node`` holds (received and verified: 100)."""
    found = {}
    for f in files:
        digest = recorded_digest(f)
        params = {"role": f["role"], **({"digest": digest} if digest else {})}  # None: still being sealed
        state = await nodes.call(core, node, "GET", f"/images/template/{f['file_id']}", params=params)
        done = state.get("exists") and state.get("digest") == digest
        found[f["device_uuid"]] = 100 if done else int(100 * int(state.get("partial") or 0) / max(1, f["size"]))
    return found


def overall_progress(files: list[dict], by_node: list[dict[str, int]]) -> float:
    """The share (0-100) of a version's bytes that every target together holds: each node's per-disk
    percentages (device uuid -> 0..100) weighted by the disks' sizes."""
    sizes = {f["device_uuid"]: max(1, int(f["size"])) for f in files}
    total = sum(sizes.values()) * len(by_node)
    if not total:
        return 100.0
    return sum(sizes[device] * percent for found in by_node for device, percent in found.items()) / total


class ProgressReport:
    """While a version is being fetched: every ``interval`` seconds (on the core's clock) each target's
    per-disk progress is asked of its agent and kept in the template's ``publish`` (status 1), and the
    whole (:func:`overall_progress`) goes to ``on_progress`` (the save job's progress)."""

    def __init__(self, core: Any, template: Mapping[str, Any], host: Mapping[str, Any], targets: list[dict],
                 files: list[dict], version: int, on_progress: Optional[Callable[[float], None]] = None):
        self.core, self.template, self.host, self.targets = core, template, host, targets
        self.files, self.version, self.on_progress = files, version, on_progress
        self.loop: Optional[task.LoopingCall] = None
        self.current: Optional[defer.Deferred] = None

    def start(self, interval: float) -> None:
        self.loop = task.LoopingCall(self._round)
        self.loop.clock = self.core.clock
        self.loop.start(interval, now=True)

    def _round(self) -> None:
        if self.current is None:  # a slow agent: the next round waits for this one
            self.current = defer.ensureDeferred(self.report())
            self.current.addErrback(lambda f: log.failure("progress of template {t} unknown", f,
                                                          t=self.template["name"]))
            self.current.addBoth(lambda _: setattr(self, "current", None))

    async def report(self) -> None:
        publish = {}
        for node in self.targets:
            try:
                progress = await progress_of(self.core, node, self.files)
            except ApiError:
                progress = {}
            publish[node["uuid"]] = {"version": self.version, "status": SYNCING, "error": None, "progress": progress}
        publish[self.host["uuid"]] = {"version": self.version, "status": DONE, "error": None}
        if self.on_progress is not None:
            self.on_progress(overall_progress(self.files, [publish[n["uuid"]]["progress"] for n in self.targets]))
        await templates(self.core).update_one({"uuid": self.template["uuid"], "status": schema.UPDATING},
                                              {"$set": {"publish": publish}})

    async def stop(self) -> None:
        if self.loop is not None and self.loop.running:
            self.loop.stop()
        if self.current is not None:
            await self.current


async def pool_targets(core: Any, template: Mapping[str, Any]) -> list[dict]:
    """Every node of the template's pool but its host."""
    found = await core.store.collection(schema.NODES).find({"resource_pool_uuid": template["pool_uuid"]},
                                                            sort=[("id", 1)])
    return [n for n in found if n["uuid"] != template.get("host_uuid")]


async def save(core: Any, uuid: str, job_id: Optional[str] = None,
               on_progress: Optional[Callable[[float], None]] = None) -> dict:
    """Publish a new version now (the version remembers ``job_id``, the save job's uuid); answers the
    template's publish state per node.  ``on_progress`` hears the share (0-100) of the version's bytes
    the other nodes hold, every ``[templates] progress_interval`` seconds while they fetch."""
    template = await template_or_404(core, uuid)
    refuse_if_updating(template)
    host = await nodes.host_of(core, template)
    if await domain_state(core, template, host) != schema.INACTIVE:
        raise ApiError(errors.TEMPLATE_STATE, name=template["name"], reason="shut it down before saving")
    claimed = await templates(core).find_one_and_update({"uuid": uuid, "status": {"$ne": schema.UPDATING}},
                                                        {"$set": {"status": schema.UPDATING}})
    if claimed is None:
        raise ApiError(errors.UPDATING, name=template["name"])
    version = int(template.get("version") or 0) + 1
    undo = Undo()
    try:
        files = []
        for device in template["devices"]:
            name = version_file(device["file_id"], version)
            # What a save interrupted by a controller restart left of this version number goes first.
            await nodes.call(core, host, "DELETE", f"/disks/template/{name}", params={"role": device["role"]},
                             template_name=template["name"])
            made = await nodes.call(core, host, "POST", f"/disks/template/{device['file_id']}/copy",
                                    {"role": device["role"], "version": version, "seal_later": True,
                                     "to": {"kind": "template", "role": device["role"], "file_id": name}},
                                    template_name=template["name"], field="uuid", timeout=SEAL_TIMEOUT)
            undo.push(f"version file {name}", lambda n=name, r=device["role"]: nodes.call(
                core, host, "DELETE", f"/disks/template/{n}", params={"role": r}))
            files.append({"device_uuid": device["uuid"], "role": device["role"], "file_id": name,
                          "digest": made["digest"], "size": made["size"]})
        targets = [n for n in await pool_targets(core, template) if n.get("agent_secret")]
        progress = ProgressReport(core, template, host, targets, files, version, on_progress)
        progress.start(float(core.config.get("templates.progress_interval", 2.0)))
        try:
            states = await send_sealing(core, template, host, targets, files, version)
        finally:
            await progress.stop()
    except BaseException:
        await undo.run()
        await templates(core).update_one({"uuid": uuid}, {"$set": {"status": template["status"]}})
        raise
    publish = {host["uuid"]: {"version": version, "status": DONE, "error": None}}
    publish.update({n["uuid"]: s for n, s in zip(targets, states)})
    stamp = now_text(core.clock)
    entry = {"version": version, "files": files, "created_at": stamp, "job_id": job_id}
    changes = {"version": version, "publish": publish, "status": schema.INACTIVE, "updated_time": stamp,
               "updated_at": stamp, "save_error": None}
    saved = await templates(core).find_one_and_update({"uuid": uuid}, {"$set": changes, "$push": {"versions": entry}})
    await core.updated(schema.KIND, saved, changes)
    return saved


async def catch_up(core: Any, node: Mapping[str, Any]) -> int:
    """Send ``node`` the latest version of every template of its pool it lacks; returns how many it got."""
    sent = 0
    for template in await templates(core).find({"pool_uuid": node.get("resource_pool_uuid"),
                                                "version": {"$gte": 1}}):
        state = (template.get("publish") or {}).get(node["uuid"]) or {}
        if node["uuid"] == template.get("host_uuid") or (state.get("version") == template["version"]
                                                         and state.get("status") == DONE):
            continue
        host = await core.store.collection(schema.NODES).find_one({"uuid": template.get("host_uuid")})
        if host is None:
            continue
        files = template["versions"][-1]["files"]
        result = await send_to(core, template, host, node, files, template["version"])
        current = await templates(core).find_one({"uuid": template["uuid"]})
        if current is not None:
            publish = {**(current.get("publish") or {}), node["uuid"]: result}
            await templates(core).update_one({"uuid": template["uuid"]}, {"$set": {"publish": publish}})
        sent += result["status"] == DONE
    return sent


def published_state(template: Mapping[str, Any], node_uuid: str) -> Optional[dict]:
    return (template.get("publish") or {}).get(node_uuid)


async def resync(core: Any, ipaddr: str, image_id: str, version: Optional[int], role: Optional[int]) -> dict:
    """#76: send one disk's version (the latest by default) to the node at ``ipaddr`` again."""
    node = await core.store.collection(schema.NODES).find_one({"ip": ipaddr})
    if node is None:
        raise ApiError(core_errors.NOT_FOUND, resource=schema.NODE, key=ipaddr)
    # Disks live inside their template's record; a controller holds hundreds of templates, not millions.
    template = next((t for t in await templates(core).find({})
                     if any(d["uuid"] == image_id for d in t["devices"])), None)
    if template is None:
        raise ApiError(core_errors.NOT_FOUND, resource=schema.TEMPLATE_IMAGE, key=image_id)
    refuse_if_updating(template)
    if node.get("resource_pool_uuid") != template["pool_uuid"]:
        raise ApiError(core_errors.INVALID_PARAM, field="ipaddr", reason="the node is not in the template's pool")
    wanted = version or template.get("version")
    entry = next((v for v in template.get("versions") or [] if v["version"] == wanted), None)
    if entry is None:
        raise ApiError(core_errors.INVALID_PARAM, field="version", reason=f"template {template['name']} has no "
                                                                          f"saved version {wanted}")
    file = next(f for f in entry["files"] if f["device_uuid"] == image_id)
    if role is not None and int(role) != file["role"]:
        raise ApiError(core_errors.INVALID_PARAM, field="role", reason=f"this image has role {file['role']}")
    if node["uuid"] == template.get("host_uuid"):
        return {"image_id": image_id, "node_uuid": node["uuid"], "version": wanted, "status": DONE}
    host = await nodes.host_of(core, template)
    result = await send_to(core, template, host, node, [file], wanted)
    current = await templates(core).find_one({"uuid": template["uuid"]}) or template
    publish = {**(current.get("publish") or {}), node["uuid"]: result}
    await templates(core).update_one({"uuid": template["uuid"]}, {"$set": {"publish": publish}})
    if result["status"] != DONE:
        raise ApiError(errors.SEND_FAILED, name=template["name"], node=node.get("name") or ipaddr,
                       reason=result["error"])
    return {"image_id": image_id, "node_uuid": node["uuid"], "version": wanted, "status": DONE}


async def recover_interrupted(core: Any) -> int:
    """At start-up: a template left ``updating`` by a controller that stopped mid-save is ``inactive``
    again, with the reason kept in ``save_error``; its save job, resumed once the services start,
    redoes the unfinished version (and clears ``save_error``).  Returns how many were recovered."""
    stuck = await templates(core).find({"status": schema.UPDATING})
    for template in stuck:
        await templates(core).update_one({"uuid": template["uuid"], "status": schema.UPDATING}, {"$set": {
            "status": schema.INACTIVE, "save_error": "the controller stopped while this template was being saved"}})
        log.warn("template {name} was being saved when the controller stopped: marked inactive; its save job resumes",
                 name=template["name"])
    return len(stuck)
