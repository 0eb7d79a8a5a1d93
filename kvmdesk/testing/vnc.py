"""Test helpers for consoles: a small VNC server with a password, and a websocket VNC viewer.

:class:`FakeVncServer` speaks RFB 3.8 with VNC authentication (the real DES check) and answers every
FramebufferUpdateRequest with one raw rectangle of a patterned screen.  Two private messages serve
the benchmark: ``250`` + u32 size streams that many bytes (with back-pressure), ``251`` + 8 bytes is
echoed back (a ping).  A test-driver domain whose ``<graphics type='vnc' port=...>`` names its port
makes the agent's console tunnel reach it like a real domain's display.

:class:`Viewer` is an autobahn websocket client for ``websockify_url``\\s: it reads exact byte counts,
does the viewer's side of the handshake, and records the close code and reason.
"""
from __future__ import annotations

import os
import struct
from typing import Any, Optional

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol, connectWS
from twisted.internet import defer, protocol
from zope.interface import implementer
from twisted.internet.interfaces import IPullProducer

from kvmdesk.agent.rfb import SEC_NONE, SEC_VNC_AUTH, VERSION_3_8, vnc_auth_response

BULK, PING = 250, 251
WIDTH, HEIGHT = 64, 48
#: 32 bits per pixel, depth 24, little endian, true colour, 8 bits per channel.
PIXEL_FORMAT = struct.pack(">BBBBHHHBBB3x", 32, 24, 0, 1, 255, 255, 255, 16, 8, 0)
CHUNK = 64 * 1024


def domain_with_vnc(name: str, port: int, password: str, uuid: Optional[str] = None) -> str:
    """A test-driver domain whose VNC display is ``127.0.0.1:port`` with ``password``."""
    uuid_line = f"<uuid>{uuid}</uuid>" if uuid else ""
    return (f"<domain type='test'><name>{name}</name>{uuid_line}<memory unit='KiB'>65536</memory>"
            "<os><type>hvm</type></os><devices>"
            f"<graphics type='vnc' port='{port}' autoport='no' listen='127.0.0.1' passwd='{password}'/>"
            "</devices></domain>")


@implementer(IPullProducer)
class _Bulk:
    def __init__(self, transport: Any, size: int, done: Any):
        self.transport = transport
        self.left = size
        self.done = done
        self.chunk = os.urandom(CHUNK)

    def resumeProducing(self) -> None:
        n = min(CHUNK, self.left)
        self.left -= n
        self.transport.write(self.chunk[:n])
        if self.left == 0:
            self.transport.unregisterProducer()
            self.done()

    def stopProducing(self) -> None:
        self.left = 0


class _FakeVnc(protocol.Protocol):
    def connectionMade(self) -> None:
        self.buffer = bytearray()
        self.state = "version"
        self.challenge = os.urandom(16)
        self.factory.connections.add(self)
        self.transport.write(VERSION_3_8)

    def connectionLost(self, reason: Any = None) -> None:
        self.factory.connections.discard(self)
        if not self.factory.connections:
            waiters, self.factory.idle_waiters = self.factory.idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def _take(self, n: int) -> Optional[bytes]:
        if len(self.buffer) < n:
            return None
        out = bytes(self.buffer[:n])
        del self.buffer[:n]
        return out

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while getattr(self, "_" + self.state)():
            pass

    def _version(self) -> bool:
        if self._take(12) is None:
            return False
        self.transport.write(bytes([1, SEC_VNC_AUTH]))
        self.state = "choice"
        return True

    def _choice(self) -> bool:
        if self._take(1) is None:
            return False
        self.transport.write(self.challenge)
        self.state = "response"
        return True

    def _response(self) -> bool:
        answer = self._take(16)
        if answer is None:
            return False
        if answer != vnc_auth_response(self.factory.password, self.challenge):
            reason = b"wrong password"
            self.transport.write(struct.pack(">II", 1, len(reason)) + reason)
            self.transport.loseConnection()
            self.state = "dead"
            return False
        self.transport.write(struct.pack(">I", 0))
        self.state = "init"
        return True

    def _init(self) -> bool:
        if self._take(1) is None:
            return False
        name = b"fake"
        self.transport.write(struct.pack(">HH", WIDTH, HEIGHT) + PIXEL_FORMAT + struct.pack(">I", len(name)) + name)
        self.state = "message"
        return True

    def _message(self) -> bool:
        if not self.buffer:
            return False
        kind = self.buffer[0]
        sizes = {0: 20, 3: 10, 4: 8, 5: 6, PING: 9, BULK: 5}
        if kind == 2:  # SetEncodings: 4 bytes + 4 per encoding
            if len(self.buffer) < 4:
                return False
            size = 4 + 4 * struct.unpack(">H", self.buffer[2:4])[0]
        elif kind == 6:  # ClientCutText
            if len(self.buffer) < 8:
                return False
            size = 8 + struct.unpack(">I", self.buffer[4:8])[0]
        else:
            size = sizes.get(kind, 1)
        message = self._take(size)
        if message is None:
            return False
        if kind == 3:
            self._update()
        elif kind == PING:
            self.transport.write(message)
        elif kind == BULK:
            self.state = "bulk"
            (length,) = struct.unpack(">I", message[1:5])
            self.transport.registerProducer(_Bulk(self.transport, length, self._bulk_done), False)
            return False
        return True

    def _bulk(self) -> bool:
        return False

    def _bulk_done(self) -> None:
        self.state = "message"
        if self.buffer:
            self.dataReceived(b"")

    def _update(self) -> None:
        pixels = bytes((x * 4 + y) % 251 for y in range(HEIGHT) for x in range(WIDTH * 4))
        self.transport.write(struct.pack(">BxH", 0, 1) + struct.pack(">HHHHi", 0, 0, WIDTH, HEIGHT, 0) + pixels)


class FakeVncServer(protocol.ServerFactory):
    """Listen with ``reactor.listenTCP(0, FakeVncServer("pw"), interface="127.0.0.1")``."""

    protocol = _FakeVnc

    def __init__(self, password: str):
        self.password = password
        self.connections: set = set()
        self.idle_waiters: list = []

    def all_closed(self) -> defer.Deferred:
        """Fires once no connection is open."""
        if not self.connections:
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        self.idle_waiters.append(d)
        return d


class _ViewerProtocol(WebSocketClientProtocol):
    def onConnect(self, response: Any) -> None:
        self.factory.viewer.protocol = self

    def onOpen(self) -> None:
        self.factory.viewer._opened(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.factory.viewer._received(payload)

    def onClose(self, wasClean: bool, code: Optional[int], reason: Optional[str]) -> None:
        self.factory.viewer._closed(code, reason)


class ByteStream:
    """Exact-length reads over a stream of chunks (a websocket's messages, a TCP connection's data)."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.received = 0
        self.closed: defer.Deferred = defer.Deferred()
        self._want: Optional[tuple[int, defer.Deferred]] = None
        self._drain: Optional[list] = None

    def _received(self, payload: bytes) -> None:
        self.received += len(payload)
        if self._drain is not None:
            self._drain[0] -= len(payload)
            if self._drain[0] <= 0:
                d, self._drain = self._drain[1], None
                d.callback(None)
            return
        self.buffer += payload
        self._check()

    def _check(self) -> None:
        if self._want is not None and len(self.buffer) >= self._want[0]:
            n, d = self._want
            self._want = None
            out = bytes(self.buffer[:n])
            del self.buffer[:n]
            d.callback(out)

    def _ended(self, why: str) -> None:
        for pending in (self._want, self._drain):
            if pending is not None:
                pending[1].errback(ConnectionError(why))
        self._want = self._drain = None

    def read(self, n: int) -> defer.Deferred:
        """Fires with exactly ``n`` bytes (fails if the stream closes first)."""
        d: defer.Deferred = defer.Deferred()
        if self.closed.called and len(self.buffer) < n:
            return defer.fail(ConnectionError(f"closed: {self.closed.result!r}"))
        self._want = (n, d)
        self._check()
        return d

    def drain(self, n: int) -> defer.Deferred:
        """Fires once ``n`` more bytes arrived, without keeping them (bulk transfers)."""
        assert not self.buffer, "drain() after everything read"
        d: defer.Deferred = defer.Deferred()
        self._drain = [n, d]
        return d

    def write(self, data: bytes) -> None:
        raise NotImplementedError

    async def server_init(self) -> tuple[int, int, int, str]:
        """Send ClientInit (shared) and read ServerInit: ``(width, height, bits_per_pixel, name)``."""
        self.write(b"\x01")
        width, height = struct.unpack(">HH", await self.read(4))
        pixel_format = await self.read(16)
        (name_length,) = struct.unpack(">I", await self.read(4))
        name = (await self.read(name_length)).decode("utf-8", "replace")
        return width, height, pixel_format[0], name


class Viewer(ByteStream):
    """A websocket VNC viewer for tests and the benchmark.

    ``viewer = await Viewer.connect(url)``; ``await viewer.read(12)``; ``viewer.write(b"...")``;
    ``code, reason = await viewer.closed``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.protocol: Optional[_ViewerProtocol] = None
        self.opened: defer.Deferred = defer.Deferred()

    @classmethod
    async def connect(cls, url: str, reactor: Any = None, protocols: tuple[str, ...] = ("binary",)) -> "Viewer":
        viewer = cls()
        factory = WebSocketClientFactory(url, protocols=list(protocols))
        factory.protocol = _ViewerProtocol
        factory.viewer = viewer
        factory.setProtocolOptions(maxFramePayloadSize=0, maxMessagePayloadSize=0)
        connectWS(factory)
        await defer.DeferredList([viewer.opened, viewer.closed], fireOnOneCallback=True, fireOnOneErrback=True)
        return viewer

    def _opened(self, proto: _ViewerProtocol) -> None:
        if not self.opened.called:
            self.opened.callback(proto)

    def _closed(self, code: Optional[int], reason: Optional[str]) -> None:
        if not self.opened.called:
            self.opened.callback(None)
        self._ended(f"closed ({code}): {reason}")
        if not self.closed.called:
            self.closed.callback((code, reason))

    def write(self, data: bytes) -> None:
        self.protocol.sendMessage(data, isBinary=True)

    def close(self) -> None:
        if self.protocol is not None:
            self.protocol.sendClose(1000)

    async def handshake(self) -> tuple[int, int, int, str]:
        """The viewer's side up to ServerInit: ``(width, height, bits_per_pixel, name)``."""
        version = await self.read(12)
        assert version.startswith(b"RFB 003."), version
        self.write(VERSION_3_8)
        count = (await self.read(1))[0]
        offered = await self.read(count)
        assert SEC_NONE in offered, offered
        self.write(bytes([SEC_NONE]))
        (result,) = struct.unpack(">I", await self.read(4))
        assert result == 0
        return await self.server_init()

    async def framebuffer(self, width: int, height: int, bpp: int) -> bytes:
        """Ask for the whole screen in raw encoding and return its first rectangle's pixels."""
        self.write(struct.pack(">BxHi", 2, 1, 0))  # SetEncodings: raw only
        self.write(struct.pack(">BBHHHH", 3, 0, 0, 0, width, height))
        while True:
            kind = (await self.read(1))[0]
            if kind == 0:
                break
            if kind == 2:  # Bell
                continue
            raise AssertionError(f"unexpected server message {kind}")
        (rects,) = struct.unpack(">xH", await self.read(3))
        assert rects >= 1
        x, y, w, h, encoding = struct.unpack(">HHHHi", await self.read(12))
        assert encoding == 0, encoding
        return await self.read(w * h * bpp // 8)


class _DirectProtocol(protocol.Protocol):
    def __init__(self, stream: "DirectViewer"):
        self.stream = stream

    def connectionMade(self) -> None:
        self.stream.transport = self.transport

    def dataReceived(self, data: bytes) -> None:
        stream = self.stream
        if not stream.login.done:
            answer = stream.login.feed(data)
            if answer:
                self.transport.write(answer)
            if stream.login.done and not stream.logged_in.called:
                stream.logged_in.callback(None)
            data = bytes(stream.login.reader.buffer) if stream.login.done else b""
            if not data:
                return
        stream._received(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.stream._ended("connection lost")
        if not self.stream.logged_in.called:
            self.stream.logged_in.errback(ConnectionError("connection lost during the VNC login"))
        if not self.stream.closed.called:
            self.stream.closed.callback(None)


class DirectViewer(ByteStream):
    """A plain TCP VNC client that logs in with the password itself (the benchmark's baseline)."""

    def __init__(self, password: str):
        super().__init__()
        from kvmdesk.agent.rfb import VncLogin

        self.login = VncLogin(password)
        self.logged_in: defer.Deferred = defer.Deferred()
        self.transport: Any = None

    @classmethod
    async def connect(cls, host: str, port: int, password: str, reactor: Any = None) -> "DirectViewer":
        if reactor is None:
            from twisted.internet import reactor
        stream = cls(password)
        await protocol.ClientCreator(reactor, _DirectProtocol, stream).connectTCP(host, port)
        await stream.logged_in
        return stream

    def write(self, data: bytes) -> None:
        self.transport.write(data)

    def close(self) -> None:
        self.transport.loseConnection()


def main() -> None:
    """``python -m kvmdesk.testing.vnc PORT PASSWORD``: serve :class:`FakeVncServer` on 127.0.0.1."""
    import sys

    from twisted.internet import reactor

    port = reactor.listenTCP(int(sys.argv[1]), FakeVncServer(sys.argv[2]), interface="127.0.0.1")
    print("READY", port.getHost().port, flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
