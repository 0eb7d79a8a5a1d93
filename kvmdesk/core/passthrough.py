"""A cheaper read path for a TCP transport whose bytes only pass through to another one (console hops).

Twisted's read path allocates a new ``bytes`` per read (``recv(bufferSize)``), queues it in the
other transport and sends it from later reactor iterations in 128 KiB slices.  On a busy machine
that CPU per byte is what limits a console relay's throughput (bench/console_bench.py: the agent
and the controller each spent more CPU per byte than the VNC server and the viewer together).
:func:`pass_through` replaces the source transport's ``doRead``: ``splice(2)`` moves what the
socket holds into a pipe (one per process, always left empty: the reactor runs one read at a time)
and from there into the sink's socket, so the bytes are never copied into Python.  Only what the
kernel does not take at once is read out and handed to the sink's ``write``, so the sink's write
buffer and the producer registrations keep doing the back-pressure as before; while the sink has
bytes queued, or it is not a plain TCP socket (TLS), or ``ready()`` says no, every read takes the
ordinary way (``protocol.dataReceived``), so the order of bytes never changes.

``header`` frames each read (the relay's websocket frames): it gets the byte count and returns the
bytes sent (``MSG_MORE``: in the same segment) before them.
"""
from __future__ import annotations

import errno
import fcntl
import os
import socket
from typing import Any, Callable, Optional

from twisted.internet import main, tcp

#: The largest pipe an unprivileged process may make (/proc/sys/fs/pipe-max-size's default).
_PIPE_MAX = 1 << 20

_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
_pipes: dict[int, tuple[int, int]] = {}


def _pipe(size: int) -> tuple[int, int]:
    """This process's pipe of ``size`` bytes (read end, write end), made on first use; always left empty."""
    ends = _pipes.get(size)
    if ends is None:
        ends = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            fcntl.fcntl(ends[1], fcntl.F_SETPIPE_SZ, size)
        except OSError:
            pass  # over the user's pipe quota: the default 64 KiB pipe moves less per read
        _pipes[size] = ends
    return ends


def _plain_tcp(transport: Any) -> bool:
    return isinstance(transport, tcp.Connection) and not getattr(transport, "TLS", False)


def _idle(sink: Any) -> bool:
    """The sink has nothing queued and is open: a direct ``send`` keeps the byte order."""
    return (sink.connected and not sink.disconnecting and not sink._tempDataLen
            and sink.offset >= len(sink.dataBuffer))


def _drain(read_end: int, n: int) -> bytes:
    """The ``n`` bytes left in the pipe, as bytes."""
    parts = []
    while n:
        part = os.read(read_end, n)
        parts.append(part)
        n -= len(part)
    return b"".join(parts)


def pass_through(source: Any, sink: Any, size: int, *, header: Optional[Callable[[int], bytes]] = None,
                 ready: Callable[[], bool] = lambda: True) -> bool:
    """Make ``source``'s reads go straight to ``sink`` (both TCP transports); ``False`` if not possible.

    ``source.protocol.dataReceived`` still gets every read that cannot take the direct way, so it
    must do the same as the direct way (write the bytes, framed by ``header``, to ``sink``).
    """
    if not (_plain_tcp(source) and _plain_tcp(sink)):
        return False
    size = min(size, _PIPE_MAX)
    read_end, write_end = _pipe(size)
    source_fd, sink_fd, send = source.socket.fileno(), sink.socket.fileno(), sink.socket.send

    def doRead() -> Any:
        try:
            n = os.splice(source_fd, write_end, size, flags=_FLAGS)
        except OSError as exc:
            return None if exc.errno == errno.EAGAIN else main.CONNECTION_LOST
        if not n:
            return main.CONNECTION_DONE
        if not (_idle(sink) and ready()):
            source.protocol.dataReceived(_drain(read_end, n))
            return None
        left, head = n, (header(n) if header is not None else b"")
        try:
            if head:
                sent = send(head, socket.MSG_MORE)
                head = head[sent:]  # what is left of it goes first into the queue below
            while left and not head:
                left -= os.splice(read_end, sink_fd, left, flags=_FLAGS)
        except OSError:
            pass  # full, or broken: twisted's own send of the queued rest finds out which
        if left:
            sink.write(head + _drain(read_end, left))  # queued: back-pressure as for any write
        return None

    source.doRead = doRead
    return True


def websocket_header(n: int) -> bytes:
    """The header of an unmasked, final, binary websocket frame of ``n`` bytes (RFC 6455 5.2)."""
    if n < 126:
        return bytes((0x82, n))
    if n < 65536:
        return bytes((0x82, 126)) + n.to_bytes(2, "big")
    return bytes((0x82, 127)) + n.to_bytes(8, "big")
