"""Files sent to HTTP clients: streamed by a :class:`FileRangeProducer` (read off the reactor), with a
single byte range (206) so a client can resume.

twisted.web's static file resource, used before, reads the file on the reactor thread: a download of
an image the page cache does not hold stopped everything else for each disk read.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import datetimeToString
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from kvmdesk.core.errors import ApiError
from kvmdesk.plugins.storage import errors
from kvmdesk.plugins.storage.producers import FileRangeProducer

log = Logger(namespace="kvmdesk.storage.downloads")

_BYTES = re.compile(r"^bytes=(.+)$")
_SPEC = re.compile(r"^(\d*)-(\d*)$")


def byte_range(header: Optional[bytes], size: int) -> Optional[tuple[int, int]]:
    """The first and last byte a ``Range`` header asks for, or ``None`` for the whole file.

    A header that is absent, not a byte range, malformed, or asks for several ranges is answered with
    the whole file (RFC 9110 allows ignoring Range; one range is what a resuming client sends).

    :raises ApiError: :data:`~kvmdesk.plugins.storage.errors.RANGE_NOT_SATISFIABLE`: no byte of the
        range is in the file.
    """
    if not header:
        return None
    found = _BYTES.match(header.decode("latin-1").strip())
    if not found:
        return None
    specs = [_SPEC.match(spec.strip()) for spec in found.group(1).split(",")]
    if any(spec is None or spec.group(0) == "-" for spec in specs):
        return None
    ranges = []
    for spec in specs:
        first, last = spec.group(1), spec.group(2)
        if first == "":  # the last N bytes
            if int(last) > 0 and size > 0:
                ranges.append((max(0, size - int(last)), size - 1))
        elif int(first) < size and (last == "" or int(last) >= int(first)):
            ranges.append((int(first), size - 1 if last == "" else min(int(last), size - 1)))
    if not ranges:
        raise ApiError(errors.RANGE_NOT_SATISFIABLE, size=size)
    return ranges[0] if len(specs) == 1 else None


class FileDownload(Resource):
    """Sends ``path`` (``size`` bytes, or the ``wanted`` range of them) with its headers.

    :param direct: read with ``O_DIRECT`` (``[storage] direct_io``).
    """

    isLeaf = True

    def __init__(self, path: Path, size: int, content_type: bytes, *, wanted: Optional[tuple[int, int]] = None,
                 reactor: Any = None, direct: bool = False, modified: Optional[float] = None):
        super().__init__()
        self.path = path
        self.size = size
        self.content_type = content_type
        self.wanted = wanted
        self.reactor = reactor
        self.direct = direct
        self.modified = modified

    def render_GET(self, request: Any) -> Any:
        request.setHeader(b"content-type", self.content_type)
        request.setHeader(b"accept-ranges", b"bytes")
        if self.modified is not None:
            request.setHeader(b"last-modified", datetimeToString(self.modified))
        first, last = self.wanted if self.wanted is not None else (0, self.size - 1)
        if self.wanted is not None:
            request.setResponseCode(206)
            request.setHeader(b"content-range", b"bytes %d-%d/%d" % (first, last, self.size))
        length = last - first + 1
        request.setHeader(b"content-length", b"%d" % length)
        if length == 0:
            return b""
        producer = FileRangeProducer(self.path, first, length, reactor=self.reactor, direct=self.direct)
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
