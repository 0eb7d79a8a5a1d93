"""Files sent to HTTP clients: streamed by a :class:`FileRangeProducer` (read off the reactor), with a
single byte range (206, :mod:`kvmdesk.protocol.ranges`) so a client can resume.  The controller's
downloads (ISOs, template versions) and a node agent's image content for its peers send with it.

twisted.web's static file resource, used before, reads the file on the reactor thread: a download of
an image the page cache does not hold stopped everything else for each disk read.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import datetimeToString
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from kvmdesk.core.producers import CHUNK, FileRangeProducer, SharedReads
from kvmdesk.protocol.ranges import content_range

log = Logger(namespace="kvmdesk.api.downloads")


class FileDownload(Resource):
    """Sends ``path`` (``size`` bytes, or the ``wanted`` range of them) with its headers.

    :param wanted: ``(first, last)`` byte, from :func:`~kvmdesk.protocol.ranges.byte_range` (answered 206).
    :param direct: read with ``O_DIRECT`` (``[storage] direct_io``).
    :param shared: reads shared with the other downloads of the same file running at the same time.
    """

    isLeaf = True

    def __init__(self, path: Path, size: int, content_type: bytes, *, wanted: Optional[tuple[int, int]] = None,
                 reactor: Any = None, direct: bool = False, modified: Optional[float] = None,
                 shared: Optional[SharedReads] = None):
        super().__init__()
        self.path = path
        self.size = size
        self.content_type = content_type
        self.wanted = wanted
        self.reactor = reactor
        self.direct = direct
        self.modified = modified
        self.shared = shared

    def render_GET(self, request: Any) -> Any:
        request.setHeader(b"content-type", self.content_type)
        request.setHeader(b"accept-ranges", b"bytes")
        if self.modified is not None:
            request.setHeader(b"last-modified", datetimeToString(self.modified))
        first, last = self.wanted if self.wanted is not None else (0, self.size - 1)
        if self.wanted is not None:
            request.setResponseCode(206)
            request.setHeader(b"content-range", content_range(first, last, self.size))
        length = last - first + 1
        request.setHeader(b"content-length", b"%d" % length)
        if length == 0:
            return b""
        if hasattr(request.transport, "SEND_LIMIT"):
            # Twisted sends at most 128 KiB a call; a producer's chunks are 1 MiB: send them whole.
            request.transport.SEND_LIMIT = max(request.transport.SEND_LIMIT, CHUNK)
        producer = FileRangeProducer(self.path, first, length, reactor=self.reactor, direct=self.direct,
                                     shared=self.shared)
        gone = []

        def lost(_: Any) -> None:
            gone.append(True)
            producer.stopProducing()

        def sent(_: Any) -> None:
            request.unregisterProducer()
            if not gone:
                request.finish()

        def failed(failure: Failure) -> None:
            # The headers are out: all the client can be told is that the body is cut short.
            log.failure("sending {path} failed", failure, path=str(self.path))
            request.unregisterProducer()
            if not gone:
                request.loseConnection()

        request.notifyFinish().addErrback(lost)
        request.registerProducer(producer, True)
        producer.startProducing(request).addCallbacks(sent, failed)
        return NOT_DONE_YET
