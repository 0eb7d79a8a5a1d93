"""A cheaper read path for a TCP transport whose bytes only pass through to another one (console hops).

Twisted's read path allocates a new ``bytes`` per read (``recv(bufferSize)``), queues it in the
other transport and sends it from the next reactor iteration in 128 KiB slices.  On a busy
machine that CPU per byte is what limits a console relay's throughput (bench/console_bench.py).
:func:`pass_through` replaces the source transport's ``doRead``: it reads into one reused buffer
(one per process: the reactor runs one read at a time) and sends straight to the sink's socket.
Only what the kernel does not take at once is handed to the sink's ``write`` (copied), so the
sink's write buffer and the producer registrations keep doing the back-pressure as before; while
the sink has bytes queued, or it is not a plain TCP socket (TLS), or ``ready()`` says no, every
read takes the ordinary way (``protocol.dataReceived``), so the order of bytes never changes.

``header`` frames each read (the relay's websocket frames): it gets the byte count and returns the
bytes to send before them (at most :data:`HEADROOM`), written into the buffer in front of the data
so header and data leave in one ``send``.
"""
from __future__ import annotations

import errno
from typing import Any, Callable, Optional

from twisted.internet import main, tcp

#: Bytes kept free in front of each read for a frame header (a websocket header is at most 10).
HEADROOM = 16
_buffers: dict[int, memoryview] = {}


def _buffer(size: int) -> memoryview:
    """This process's read buffer of ``size`` bytes (after the headroom), made on first use."""
    view = _buffers.get(size)
    if view is None:
        view = _buffers[size] = memoryview(bytearray(HEADROOM + size))
    return view


def _plain_tcp(transport: Any) -> bool:
    return isinstance(transport, tcp.Connection) and not getattr(transport, "TLS", False)


def _idle(sink: Any) -> bool:
    """The sink has nothing queued and is open: a direct ``send`` keeps the byte order."""
    return (sink.connected and not sink.disconnecting and not sink._tempDataLen
            and sink.offset >= len(sink.dataBuffer))


def pass_through(source: Any, sink: Any, size: int, *, header: Optional[Callable[[int], bytes]] = None,
                 ready: Callable[[], bool] = lambda: True) -> bool:
    """Make ``source``'s reads go straight to ``sink`` (both TCP transports); ``False`` if not possible.

    ``source.protocol.dataReceived`` still gets every read that cannot take the direct way, so it
    must do the same as the direct way (write the bytes, framed by ``header``, to ``sink``).
    """
    if not (_plain_tcp(source) and _plain_tcp(sink)):
        return False
    view = _buffer(size)
    recv_into, send = source.socket.recv_into, sink.socket.send

    def doRead() -> Any:
        try:
            n = recv_into(view[HEADROOM:], size)
        except OSError as exc:
            return None if exc.args[0] == errno.EWOULDBLOCK else main.CONNECTION_LOST
        if not n:
            return main.CONNECTION_DONE
        if not (_idle(sink) and ready()):
            source.protocol.dataReceived(bytes(view[HEADROOM:HEADROOM + n]))
            return None
        start = HEADROOM
        if header is not None:
            head = header(n)
            start -= len(head)
            view[start:HEADROOM] = head
        end = HEADROOM + n
        try:
            sent = send(view[start:end])
        except OSError:
            sent = 0  # full, or broken: twisted's own send of the queued bytes finds out which
        if sent < end - start:
            sink.write(bytes(view[start + sent:end]))  # queued: back-pressure as for any write
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
