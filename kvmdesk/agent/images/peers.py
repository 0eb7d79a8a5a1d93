"""Image files moved node to node: one agent serves a file, another fetches it on a controller ticket.

The controller never carries the bytes.  It hands the fetching agent a *ticket*: the signed headers of
one ``GET /agent/v1/images/{kind}/{file_id}/content?role=R`` request to the source agent, signed with
the source's own enrolment secret (so the source checks it like any controller request).  A ticket is
short-lived (the signature's timestamp must be within the source's clock skew) and single-use (its
nonce is remembered).  The fetching agent streams the answer into the same receiver an upload uses:
appended to the partial file, resumed from what is already there (``Range``), MD5-verified before it
appears.  The source reads the file off the reactor (:class:`~kvmdesk.core.producers.FileRangeProducer`),
and transfers of one file share their reads.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping, Optional

import attrs
import treq
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from kvmdesk.protocol import images as protocol
from kvmdesk.agent.images.store import ImageStore
from kvmdesk.core.errors import ApiError
from kvmdesk.core.producers import FileRangeProducer, SharedReads

log = Logger(namespace="kvmdesk.agent.images.peers")
_RANGE = re.compile(r"^bytes=(\d+)-$")


def start_offset(header: Optional[bytes], size: int) -> int:
    """Where a ``Range: bytes=N-`` header asks to start (0 without one; the one form a fetch sends)."""
    found = _RANGE.match((header or b"").decode("latin-1").strip())
    offset = int(found.group(1)) if found else 0
    if offset > size:
        raise ApiError(protocol.BAD_TRANSFER, reason=f"range starts at {offset}, beyond the {size} bytes")
    return offset


class FileSending(Resource):
    """The body of a ``content`` answer: bytes ``offset..`` of ``path``, read off the reactor."""

    isLeaf = True

    def __init__(self, path: Path, offset: int, size: int, reactor: Any, shared: SharedReads):
        super().__init__()
        self.path, self.offset, self.size, self.reactor, self.shared = path, offset, size, reactor, shared

    def render_GET(self, request: Any) -> Any:
        request.setHeader(b"content-type", b"application/octet-stream")
        request.setHeader(b"content-length", b"%d" % (self.size - self.offset))
        if self.offset:
            request.setResponseCode(206)
            request.setHeader(b"content-range", b"bytes %d-%d/%d" % (self.offset, self.size - 1, self.size))
        if self.offset == self.size:
            return b""
        producer = FileRangeProducer(self.path, self.offset, self.size - self.offset, reactor=self.reactor,
                                     shared=self.shared)
        gone: list[bool] = []

        def lost(_: Any) -> None:
            gone.append(True)
            producer.stopProducing()

        def sent(_: Any) -> None:
            request.unregisterProducer()
            if not gone:
                request.finish()

        def failed(failure: Failure) -> None:
            log.failure("sending {path} to a peer failed", failure, path=str(self.path))
            request.unregisterProducer()
            if not gone:
                request.loseConnection()

        request.notifyFinish().addErrback(lost)
        request.registerProducer(producer, True)
        producer.startProducing(request).addCallbacks(sent, failed)
        return NOT_DONE_YET


@attrs.define
class _FetchContext:
    """What the image receiver needs of its body's source: its length and back-pressure."""

    length: Optional[int]
    transport: Any = None

    def pause(self) -> None:
        if self.transport is not None:
            self.transport.pauseProducing()

    def resume(self) -> None:
        if self.transport is not None:
            self.transport.resumeProducing()


async def fetch(images: ImageStore, kind: str, role: int, file_id: str, *, md5: str, total: int,
                version: Optional[int], url: str, ticket: Mapping[str, str], reactor: Any,
                timeout: float = 3600.0) -> dict[str, Any]:
    """Fetch ``kind/file_id`` from a peer agent at ``url`` with ``ticket``; returns ``{"path", "size", "md5"}``.

    A file already here with that MD5 is kept; a partial one of the same content is resumed.
    """
    state = images.state(kind, role, file_id, md5)
    if state["exists"] and state["md5"] == md5 and state["size"] == total:
        return {"path": state["path"], "size": total, "md5": md5}
    offset = min(int(state["partial"]), total)
    headers = {k: [v] for k, v in ticket.items()}
    if offset:
        headers["Range"] = [f"bytes={offset}-"]
    response = await treq.get(url, headers=headers, unbuffered=True, reactor=reactor, timeout=timeout)
    if response.code not in (200, 206):
        body = await response.content()
        raise ApiError(protocol.BAD_TRANSFER, reason=f"the source agent answered HTTP {response.code}: "
                                                     f"{body[:300].decode('utf-8', 'replace')}")
    if response.code == 200:
        offset = 0  # the source sent the whole file: start again
    context = _FetchContext(total - offset, getattr(response.original, "_transport", None))
    receiver = images.receiver(context, kind, role, file_id, offset=offset, total=total, md5=md5, version=version)
    try:
        await treq.collect(response, receiver.write)
    except BaseException as exc:
        receiver.abort(Failure(exc))
        if isinstance(exc, ApiError):
            raise
        raise ApiError(protocol.TRANSFER_INCOMPLETE, received=offset + receiver.received, total=total) from None
    await receiver.finish()
    return await receiver.commit()


def content_target(kind: str, role: int, file_id: str) -> str:
    """The path and query a ticket signs (relative to the agent's root)."""
    return f"/agent/v1/images/{kind}/{file_id}/content?role={role}"

