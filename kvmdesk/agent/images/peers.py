"""Image files moved node to node: one agent serves a file, another fetches it on a controller ticket.

The controller never carries the bytes.  It hands the fetching agent a *ticket*: the signed headers of
one ``GET /agent/v1/images/{kind}/{file_id}/content?role=R`` request to the source agent, signed with
the source's own enrolment secret (so the source checks it like any controller request).  A ticket is
short-lived (the signature's timestamp must be within the source's clock skew) and single-use (its
nonce is remembered).  The fetching agent streams the answer into the same receiver an upload uses:
appended to the partial file, resumed from what is already there (``Range``), its digest verified
before it appears.  The source sends the file as the controller's downloads do
(:class:`~kvmdesk.api.downloads.FileDownload`: read off the reactor, ``Range`` answered with 206), and
transfers of one file share their reads.  A fetch may start before the source knows the file's
digest (a version it is still sealing, see :func:`fetch`).
"""
from __future__ import annotations

import time
from typing import Any, Mapping, Optional

import attrs
import treq
from twisted.logger import Logger
from twisted.python.failure import Failure

from kvmdesk.agent.images.store import ImageStore
from kvmdesk.core.errors import ApiError
from kvmdesk.core.producers import CHUNK
from kvmdesk.protocol import images as protocol
from kvmdesk.protocol import ranges

log = Logger(namespace="kvmdesk.agent.images.peers")
#: Bytes a fetch reads from its socket at a time.
RECEIVE_CHUNK = CHUNK


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


async def fetch(images: ImageStore, kind: str, role: int, file_id: str, *, digest: Optional[str], total: int,
                version: Optional[int], url: str, ticket: Mapping[str, str], reactor: Any,
                timeout: float = 3600.0) -> dict[str, Any]:
    """Fetch ``kind/file_id`` from a peer agent at ``url`` with ``ticket``; returns ``{"path", "size", "digest"}``.

    A file already here with that digest is kept; a partial one of the same content is resumed.  Without
    ``digest`` (the source is still sealing the file) the bytes are received and hashed, and the answer
    carries ``"digest": None`` and ``"received_digest"``: a second fetch with the digest verifies and
    commits what is here, sending nothing more when it is all in.
    """
    state = images.state(kind, role, file_id, digest)
    if state["exists"] and state["size"] == total and (digest is None or state["digest"] == digest):
        return {"path": state["path"], "size": total, "digest": state["digest"]}
    offset = min(int(state["partial"]), total)
    started = time.perf_counter()
    if offset < total:
        response = await treq.get(url, headers=ranges.resume_headers(ticket, offset), unbuffered=True,
                                  reactor=reactor, timeout=timeout)
        offset = await ranges.resumed_at(response, offset, protocol.BAD_TRANSFER)
        transport = getattr(response.original, "_transport", None)  # a proxy of the connection
        connection = getattr(transport, "_producer", None)
        if hasattr(connection, "bufferSize"):
            # Twisted reads 64 KiB a call: a 2 GiB version was 32768 trips through the HTTP parser and the
            # receiver's queues; the source sends 1 MiB chunks (core.producers.CHUNK), read them whole.
            connection.bufferSize = max(connection.bufferSize, RECEIVE_CHUNK)
        context = _FetchContext(total - offset, transport)
        receiver = images.receiver(context, kind, role, file_id, offset=offset, total=total, digest=digest,
                                   version=version)
        try:
            await treq.collect(response, receiver.write)
        except BaseException as exc:
            receiver.abort(Failure(exc))
            if isinstance(exc, ApiError):
                raise
            raise ApiError(protocol.TRANSFER_INCOMPLETE, received=offset + receiver.received, total=total) from None
        # bench/template_bench.py reads these figures from the agent's log.
        log.info("fetched {file}: {size} bytes from {offset} in {transfer:.3f} s", file=file_id,
                 size=total - offset, offset=offset, transfer=time.perf_counter() - started)
    else:  # every byte is here already (received before the digest was known): only the check is left
        receiver = images.receiver(_FetchContext(0), kind, role, file_id, offset=total, total=total, digest=digest,
                                   version=version)
    await receiver.finish()
    if digest is None:
        return {"path": str(receiver.final), "size": total, "digest": None,
                "received_digest": await receiver.received_digest()}
    verifying = time.perf_counter()
    committed = await receiver.commit()
    log.info("verified {file} in {verify:.3f} s", file=file_id, verify=time.perf_counter() - verifying)
    return committed


def content_target(kind: str, role: int, file_id: str) -> str:
    """The path and query a ticket signs (relative to the agent's root)."""
    return f"/agent/v1/images/{kind}/{file_id}/content?role={role}"

