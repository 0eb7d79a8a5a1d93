"""Files sent to HTTP clients, with a single byte range (206, :mod:`kvmdesk.protocol.ranges`) so a client
can resume.  The controller's downloads (ISOs, template versions) and a node agent's image content for
its peers send with it.

On a plain TCP connection the body goes out with ``sendfile`` from a thread of its own (:func:`send_file`):
the kernel moves the pages from the page cache to the socket, with no copy through Python and no
reactor turn per chunk (publishing a 2 GiB template version to two nodes cost the source agent
5.9-6.1 s of CPU with the producer, 3.9-4.2 s with ``sendfile``: bench/template_bench.py).  Transfers
of the same file at the same time share its pages in the page cache.  Elsewhere (TLS, direct I/O, a
test transport) a :class:`FileRangeProducer` streams it (read off the reactor, shared reads).

twisted.web's static file resource, used before, reads the file on the reactor thread: a download of
an image the page cache does not hold stopped everything else for each disk read.
"""
from __future__ import annotations

import os
import select
import socket
import threading
import time
from pathlib import Path
from typing import Any, Optional

from twisted.internet import tcp
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import datetimeToString
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from kvmdesk.core.producers import CHUNK, FileRangeProducer, SharedReads, SourceChanged
from kvmdesk.core.threadpools import in_own_thread
from kvmdesk.protocol.ranges import content_range

log = Logger(namespace="kvmdesk.api.downloads")
#: Bytes one ``sendfile`` call may send before the sending thread looks whether it should stop.
SENDFILE_STEP = 8 << 20
#: Seconds a client may take nothing before a ``sendfile`` transfer gives up on it.
SEND_STALL = 300.0


class ClientStalled(Exception):
    """The client took no bytes for :data:`SEND_STALL` seconds."""


def send_file(sock: socket.socket, path: Path, offset: int, count: int, stop: threading.Event) -> int:
    """Send ``count`` bytes of ``path`` from ``offset`` on ``sock`` (non-blocking) with ``sendfile``;
    blocking: its own thread.  Returns the bytes sent (fewer once ``stop`` is set).  Closes ``sock``."""
    sent = 0
    try:
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLOUT)
        with open(path, "rb") as source:
            waiting_since = None
            while sent < count and not stop.is_set():
                try:
                    step = os.sendfile(sock.fileno(), source.fileno(), offset + sent, min(count - sent, SENDFILE_STEP))
                except BlockingIOError:
                    waiting_since = waiting_since or time.monotonic()
                    if time.monotonic() - waiting_since > SEND_STALL:
                        raise ClientStalled(f"the client took nothing for {SEND_STALL:g} s") from None
                    poller.poll(1000)  # (a second at most: then ``stop`` is looked at again)
                    continue
                if step == 0:
                    raise SourceChanged(f"{path} ended at {offset + sent} bytes")
                sent += step
                waiting_since = None
    finally:
        sock.close()
    return sent


def _zero_copy_socket(request: Any) -> Optional[socket.socket]:
    """A socket of its own (a duplicate) for sending the body of ``request`` with ``sendfile``, once its
    headers are on the wire; ``None`` where that cannot be (not plain TCP, or the headers did not all go)."""
    transport = getattr(getattr(request, "channel", None), "transport", None)
    if not isinstance(transport, tcp.Connection) or getattr(transport, "TLS", False):
        return None
    if getattr(request, "_disconnected", False) or transport.disconnected or transport.disconnecting:
        return None
    request.write(b"")  # the headers, into the transport's buffer
    # A response starts on an empty buffer (the previous one is finished), so its few hundred bytes of
    # headers go at once; whatever did not stays with Twisted, and so does the body then.
    if transport.doWrite() is not None:
        return None
    # Twisted's own buffer and queue; a Twisted without them (renamed) streams instead.
    buffered, queued = getattr(transport, "dataBuffer", None), getattr(transport, "_tempDataLen", None)
    if buffered is None or queued is None or buffered or queued:
        return None
    # Twisted may close its descriptor when the connection is lost: the thread keeps a number of its own.
    return transport.getHandle().dup()


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
        sock = None if self.direct else _zero_copy_socket(request)
        if sock is not None:
            return self._send_zero_copy(request, sock, first, length)
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

    def _send_zero_copy(self, request: Any, sock: socket.socket, first: int, length: int) -> Any:
        stop = threading.Event()
        gone = []

        def lost(_: Any) -> None:
            gone.append(True)
            stop.set()

        def sent(count: int) -> None:
            request.sentLength = count  # (for the access log: Twisted did not see these bytes)
            if not gone:
                request.finish()

        def failed(failure: Failure) -> None:
            # The headers are out: all the client can be told is that the body is cut short.
            if not gone:
                log.warn("sending {path} failed: {why}", path=str(self.path), why=failure.getErrorMessage())
                request.loseConnection()

        if self.reactor is None:
            from twisted.internet import reactor as default_reactor

            self.reactor = default_reactor
        request.notifyFinish().addErrback(lost)
        in_own_thread(self.reactor, send_file, sock, self.path, first, length, stop,
                      name="kvmdesk-sendfile").addCallbacks(sent, failed)
        return NOT_DONE_YET
