"""#72 download: the template's current version as one qcow2, streamed from its node's agent.

``save`` makes versions; the download is the system disk of the latest one (a standalone qcow2: the
version files are flattened).  The bytes pass through the controller, paced by the client: while the
client's socket is full, the agent's answer is not read (:class:`Relay`).
"""
from __future__ import annotations

from typing import Any, Mapping, Optional
from urllib.parse import quote

import treq
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from kvmdesk.core.errors import ApiError
from kvmdesk.plugins.templates import errors, nodes, schema
from kvmdesk.plugins.templates.service import refuse_if_updating, template_or_404
from kvmdesk.protocol.images import recorded_digest

log = Logger(namespace="kvmdesk.templates.download")


def latest_system_file(template: Mapping[str, Any]) -> dict:
    versions = template.get("versions") or []
    if not versions:
        raise ApiError(errors.TEMPLATE_STATE, name=template["name"], reason="no saved version yet: save it first")
    return next(f for f in versions[-1]["files"] if f["role"] == schema.ROLE_SYSTEM)


async def prepare(core: Any, uuid: str) -> dict:
    """The action's answer: where to GET the file, its name, size and digest (``sha256:<hex>``; ``md5:<hex>``
    for a version saved before versions were sealed with SHA-256)."""
    template = await template_or_404(core, uuid)
    refuse_if_updating(template)
    file = latest_system_file(template)
    return {"uuid": uuid, "name": f"{template['name']}.qcow2", "version": template["version"], "size": file["size"],
            "digest": recorded_digest(file), "url": f"/api/v1.0/education/template/{uuid}/download"}


@implementer(IPushProducer)
class Relay(Resource):
    """Sends the agent's streamed answer to the client; the client's back-pressure pauses the agent's."""

    isLeaf = True

    def __init__(self, response: Any, name: str, size: int):
        super().__init__()
        self.response = response
        self.name = name
        self.size = size
        # treq's response wraps twisted's, whose transport can be paused (reading stops, TCP pushes back)
        self.transport: Optional[Any] = getattr(getattr(response, "original", None), "_transport", None)

    def pauseProducing(self) -> None:
        if self.transport is not None:
            self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        if self.transport is not None:
            self.transport.resumeProducing()

    def stopProducing(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()

    def render_GET(self, request: Any) -> Any:
        request.setHeader(b"content-type", b"application/octet-stream")
        request.setHeader(b"content-length", b"%d" % self.size)
        request.setHeader(b"content-disposition", f"attachment; filename*=UTF-8''{quote(self.name)}".encode())
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: (gone.append(True), self.stopProducing()))
        request.registerProducer(self, True)

        def done(_: Any) -> None:
            request.unregisterProducer()
            if not gone:
                request.finish()

        def failed(failure: Any) -> None:
            log.failure("relaying a template download failed", failure)
            request.unregisterProducer()
            if not gone:
                request.loseConnection()

        treq.collect(self.response, request.write).addCallbacks(done, failed)
        return NOT_DONE_YET


async def relay(core: Any, uuid: str) -> Relay:
    template = await template_or_404(core, uuid)
    refuse_if_updating(template)
    file = latest_system_file(template)
    host = await nodes.host_of(core, template)
    try:
        response = await core.extensions["agents"].request(
            host, "GET", f"/images/template/{file['file_id']}/content", params={"role": file["role"]}, stream=True)
    except Exception as exc:
        raise nodes.node_error(exc, template["name"]) from None
    if response.code != 200:
        await response.content()
        raise ApiError(errors.NODE_UNAVAILABLE, name=template["name"], reason=f"its agent answered HTTP {response.code}")
    return Relay(response, f"{template['name']}.qcow2", file["size"])
