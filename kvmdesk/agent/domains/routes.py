"""The agent's domain-layer endpoints (see :mod:`kvmdesk.protocol.domains` for the protocol).

Registered by the agent's router like its other optional route modules; the agent authenticates every
request before routing, so these are ``auth=False``.  Settings: ``agent.vnc_listen`` (default
``127.0.0.1``: the agent tunnels VNC to the controller's relay), ``agent.qemu_img``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Awaitable

from kvmdesk.agent.api import translated
from kvmdesk.agent.domains.disks import DiskError, Disks
from kvmdesk.agent.domains.lifecycle import Domains
from kvmdesk.agent.images.store import ImageStore
from kvmdesk.api.models import validate
from kvmdesk.api.router import ApiRequest, Router
from kvmdesk.core.errors import INVALID_PARAM, ApiError
from kvmdesk.protocol.domains import CdromChange, DiskCopy, DiskCreate, DiskResize, DisksGrow, DomainSpec, FileRef

TAGS = ("domains",)


async def disk_call(d: Awaitable[Any]) -> Any:
    """Await a disk or domain operation; disk errors become their envelopes, libvirt's the agent's."""
    try:
        return await translated(d)
    except DiskError as exc:
        raise ApiError(exc.error, **exc.params) from None


def make_domains(agent: Any, reactor: Any = None) -> Domains:
    """The domain layer of ``agent``, on the image store's storage places."""
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    store = ImageStore.for_agent(agent, reactor)

    def resolve(ref: FileRef) -> Path:
        return store.final_path(ref.kind, ref.role, ref.file_id)

    config = agent.config
    disks = Disks(resolve, reactor, qemu_img=config.get("agent.qemu_img") or "qemu-img")
    return Domains(agent.hypervisor, disks, resolve, sorted(set(store.roots.values())), reactor,
                   vnc_listen=config.get("agent.vnc_listen") or "127.0.0.1")


def _ref(req: ApiRequest, role: Any = None) -> FileRef:
    """The file named by the path (``{kind}/{file_id}``) and ``role`` (else the ``role`` query argument)."""
    if role is None:
        raw = req.args.get("role", "1")
        role = int(raw) if raw.isdigit() else raw
    return validate(FileRef, {"kind": req.path["kind"], "role": role, "file_id": req.path["file_id"]})


def register_routes(router: Router, agent: Any) -> Domains:
    domains = make_domains(agent, getattr(agent, "reactor", None))
    agent.domains = domains

    def endpoint(method: str, path: str, summary: str, **kwargs: Any) -> Any:
        return router.endpoint(method, path, summary=summary, auth=False, tags=TAGS, **kwargs)

    @endpoint("PUT", "/domains/{uuid}/spec", "Define (or redefine) a domain from its spec", body=DomainSpec)
    async def define(req: ApiRequest) -> dict:
        spec: DomainSpec = req.body
        if spec.uuid != req.path["uuid"]:
            raise ApiError(INVALID_PARAM, field="uuid", reason="differs from the path")
        return await disk_call(domains.define(spec))

    @endpoint("DELETE", "/domains/{ident}/definition", "Undefine a domain (stopping it), with its disks if asked")
    async def undefine(req: ApiRequest) -> dict:
        delete_disks = req.args.get("delete_disks", "0") in ("1", "true", "yes")
        return await disk_call(domains.undefine(req.path["ident"], delete_disks))

    @endpoint("PUT", "/domains/{ident}/cdrom", "Change the CD-ROM's media (live while running)", body=CdromChange)
    async def cdrom(req: ApiRequest) -> dict:
        return await disk_call(domains.change_media(req.path["ident"], req.body.media))

    @endpoint("GET", "/domains/{ident}/display", "VNC address, port and password (the console tunnel is /vnc)")
    async def vnc(req: ApiRequest) -> dict:
        return await disk_call(domains.vnc(req.path["ident"]))

    @endpoint("POST", "/disks", "Create a qcow2 disk (an overlay when backing is given)", body=DiskCreate)
    async def create_disk(req: ApiRequest) -> dict:
        body: DiskCreate = req.body
        ref = FileRef(kind=body.kind, role=body.role, file_id=body.file_id)  # already validated as DiskCreate
        return await disk_call(domains.disks.create(ref, body.size_gb, body.backing))

    @endpoint("GET", "/disks/{kind}/{file_id}", "A disk's format, sizes and backing file")
    async def disk_info(req: ApiRequest) -> dict:
        return await disk_call(domains.disks.info(_ref(req)))

    @endpoint("PUT", "/disks/{kind}/{file_id}/size", "Grow a disk (never shrinks)", body=DiskResize)
    async def resize_disk(req: ApiRequest) -> dict:
        return await disk_call(domains.disks.resize(_ref(req, req.body.role), req.body.size_gb))

    @endpoint("PUT", "/disks/sizes", "Grow several disks, all or none (sizes and space checked first)",
              body=DisksGrow)
    async def grow_disks(req: ApiRequest) -> list[dict]:
        sizes = [(FileRef(kind=d.kind, role=d.role, file_id=d.file_id), d.size_gb) for d in req.body.disks]
        return await disk_call(domains.disks.grow_all(sizes))

    @endpoint("POST", "/disks/{kind}/{file_id}/copy", "Flatten a disk into a new standalone qcow2", body=DiskCopy)
    async def copy_disk(req: ApiRequest) -> dict:
        return await disk_call(domains.disks.copy(_ref(req, req.body.role), req.body.to, req.body.version,
                                                  req.body.seal_later))

    @endpoint("POST", "/disks/{kind}/{file_id}/seal", "The digest and size of a version file (waits while it is "
              "being computed)")
    async def seal_disk(req: ApiRequest) -> dict:
        return await disk_call(domains.disks.seal(_ref(req)))

    @endpoint("DELETE", "/disks/{kind}/{file_id}", "Remove a disk file")
    async def remove_disk(req: ApiRequest) -> dict:
        return {"removed": await disk_call(domains.disks.remove(_ref(req)))}

    return domains
