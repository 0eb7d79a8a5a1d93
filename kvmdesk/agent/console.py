"""The agent's console tunnel: ``GET /agent/v1/domains/{ident}/vnc`` with ``Upgrade: kvmdesk-vnc``.

The controller's relay sends this signed request; the agent reads the domain's VNC port and password
from its live XML (``VIR_DOMAIN_XML_SECURE``), connects to that port on the node itself, logs in
with the password (:class:`~kvmdesk.agent.rfb.VncLogin`) and only then answers
``101 Switching Protocols`` (with its proof header) and turns the HTTP connection into a byte stream
on which it offers the console without authentication (:class:`~kvmdesk.agent.rfb.NoAuthGreeting`).
So the VNC password never leaves the node, VNC itself only needs to listen on the node's loopback
address, and a failure before the switch is an ordinary signed error envelope.

Both directions are passed through with TCP back-pressure: each transport is the other's push
producer, so a slow reader pauses the other side's reads instead of filling memory.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING, Any, Optional

import libvirt
from twisted.internet import defer, protocol
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from kvmdesk.agent import hypervisor as hv
from kvmdesk.agent.rfb import AuthenticationFailed, NoAuthGreeting, RfbError, VncLogin
from kvmdesk.core import agentauth
from kvmdesk.core.console import DOMAIN_OFF, relay_buffers
from kvmdesk.core.errors import ApiError, define
from kvmdesk.core.passthrough import pass_through

if TYPE_CHECKING:  # pragma: no cover
    from kvmdesk.agent.service import Agent

log = Logger(namespace="kvmdesk.agent.console")

UPGRADE = b"kvmdesk-vnc"
NO_VNC = define(1091, 409, "虚拟机没有 VNC 图形设备", "the domain has no VNC display")
VNC_LOGIN_FAILED = define(1092, 502, "VNC 登录失败: {reason}", "the VNC login failed: {reason}")
VNC_UNREACHABLE = define(1093, 502, "无法连接虚拟机的 VNC: {reason}", "cannot connect to the domain's VNC: {reason}")
UPGRADE_REQUIRED = define(1095, 426, "此接口需要 Upgrade: kvmdesk-vnc", "this endpoint needs Upgrade: kvmdesk-vnc")

#: Seconds for the TCP connection and the login to the domain's VNC server.
LOGIN_TIMEOUT = 10.0
#: Seconds the controller side has to finish the (no-authentication) handshake.
GREETING_TIMEOUT = 30.0
#: Bytes read at once, and left unsent before the other side is paused, per direction (see
#: :func:`~kvmdesk.core.console.relay_buffers`).
SPLICE_BUFFER = 1024 * 1024
_LOOPBACK = {"", "0.0.0.0", "::", "127.0.0.1", "::1", "localhost"}


def vnc_display(xml: str) -> Optional[dict[str, Any]]:
    """``{"host", "port", "password"}`` of a domain's first VNC display (from its secure XML), or ``None``."""
    root = ET.fromstring(xml)
    for graphics in root.iterfind("./devices/graphics"):
        if graphics.get("type") != "vnc":
            continue
        port = int(graphics.get("port") or -1)
        listen = graphics.get("listen") or ""
        # A display bound to every address is reached on loopback; one bound elsewhere, there.
        host = "127.0.0.1" if listen in _LOOPBACK else listen
        return {"host": host, "port": port, "password": graphics.get("passwd")}
    return None


def _running_display(conn: libvirt.virConnect, ident: str) -> dict[str, Any]:
    dom = hv._lookup(conn, ident)
    state, _ = dom.state()
    display = vnc_display(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_SECURE))
    return {"running": state in (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_PAUSED,
                                 libvirt.VIR_DOMAIN_BLOCKED), "display": display}


class _VncSide(protocol.Protocol):
    """The agent's connection to the domain's VNC server: logs in, then passes bytes to the peer."""

    def __init__(self, password: Optional[str], clock: Any):
        self.login = VncLogin(password)
        self.clock = clock
        self.ready: defer.Deferred = defer.Deferred()
        self.peer: Optional["_ControllerSide"] = None
        self._timeout: Any = None

    def connectionMade(self) -> None:
        self._timeout = self.clock.callLater(LOGIN_TIMEOUT, self._fail, RfbError("the VNC login timed out"))

    def _fail(self, exc: Exception) -> None:
        if not self.ready.called:
            self.ready.errback(exc)
        self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        if self.peer is not None:
            self.peer.transport.write(data)
            return
        if self.ready.called:
            return
        try:
            answer = self.login.feed(data)
        except RfbError as exc:
            self._cancel_timeout()
            self._fail(exc)
            return
        if answer:
            self.transport.write(answer)
        if self.login.done:
            self._cancel_timeout()
            self.ready.callback(self)

    def _cancel_timeout(self) -> None:
        if self._timeout is not None and self._timeout.active():
            self._timeout.cancel()
        self._timeout = None

    def connectionLost(self, reason: Any = None) -> None:
        self._cancel_timeout()
        if not self.ready.called:
            self.ready.errback(RfbError("the VNC server closed the connection"))
        if self.peer is not None:
            self.peer.transport.loseConnection()


class _ControllerSide(protocol.Protocol):
    """The upgraded HTTP connection: greets without authentication, then passes bytes to the VNC side."""

    def __init__(self, vnc: _VncSide, tunnels: set, clock: Any):
        self.vnc = vnc
        self.tunnels = tunnels
        self.clock = clock
        self.greeting = NoAuthGreeting()
        self._timeout: Any = None

    def start(self, head: bytes) -> None:
        self.tunnels.add(self)
        self.vnc.peer = self  # from now on either side closing closes the other
        self.transport.write(head + self.greeting.greeting)
        self._timeout = self.clock.callLater(GREETING_TIMEOUT, self.transport.abortConnection)

    def dataReceived(self, data: bytes) -> None:
        if self.greeting.done:
            self.vnc.transport.write(data)
            return
        try:
            answer = self.greeting.feed(data)
        except RfbError as exc:
            log.info("console tunnel closed: {reason}", reason=str(exc))
            self.transport.abortConnection()
            return
        if answer:
            self.transport.write(answer)
        if self.greeting.done:
            if self._timeout is not None and self._timeout.active():
                self._timeout.cancel()
            self._splice()
            early = bytes(self.greeting.reader.buffer)
            if early:
                self.vnc.transport.write(early)

    def _splice(self) -> None:
        for transport in (self.transport, self.vnc.transport):
            relay_buffers(transport, SPLICE_BUFFER)
        self.transport.registerProducer(self.vnc.transport, True)
        self.vnc.transport.registerProducer(self.transport, True)
        # Reads go straight to the other socket (dataReceived above stays the way for the rest).
        pass_through(self.vnc.transport, self.transport, SPLICE_BUFFER)
        pass_through(self.transport, self.vnc.transport, SPLICE_BUFFER)

    def connectionLost(self, reason: Any = None) -> None:
        self.tunnels.discard(self)
        if self._timeout is not None and self._timeout.active():
            self._timeout.cancel()
        self.vnc.peer = None
        self.vnc.transport.loseConnection()


def hijack(request: Any, proto: protocol.Protocol) -> Any:
    """Take the TCP connection of ``request`` away from twisted.web and give it to ``proto``.

    The same steps as autobahn's ``WebSocketResource``: twisted.web has no API for an upgrade.
    """
    channel = request.channel
    transport, channel.transport = channel.transport, None
    channel.setTimeout(None)  # the HTTP idle timeout must not end a console
    # A site that tracks its connections (the agent's, to drop them at stop) will never hear of this
    # one again: the tunnel's own registry closes it.
    tracked = getattr(getattr(channel, "site", None), "protocols", None)
    if tracked is not None:
        for http_protocol in [p for p in tracked if getattr(p, "_channel", p) is channel]:
            tracked.discard(http_protocol)
    if getattr(transport, "producer", None) is not None:
        transport.unregisterProducer()  # the HTTP channel registered itself; the tunnel will
    transport.protocol = proto
    proto.makeConnection(transport)
    transport.resumeProducing()  # twisted.web paused reading while the request was served
    return transport


class TunnelResource(Resource):
    """Answers 101 (proved) and hands the connection to the tunnel; the VNC side is already logged in."""

    isLeaf = True

    def __init__(self, vnc: _VncSide, tunnels: set, clock: Any):
        super().__init__()
        self.vnc = vnc
        self.tunnels = tunnels
        self.clock = clock

    def render(self, request: Any) -> Any:
        if request.channel is None or request.channel.transport is None or getattr(request, "_disconnected", False):
            self.vnc.transport.loseConnection()  # the controller hung up while we logged in
            return NOT_DONE_YET
        secret, signature = request.kvmdesk_proof
        head = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: " + UPGRADE + b"\r\nConnection: Upgrade\r\n"
                + agentauth.H_PROOF.encode() + b": " + agentauth.proof(secret, signature, 101).encode() + b"\r\n\r\n")
        side = _ControllerSide(self.vnc, self.tunnels, self.clock)
        try:
            hijack(request, side)
            side.start(head)
        except Exception:
            self.vnc.transport.abortConnection()  # never leave the VNC login open behind a failure
            raise
        return NOT_DONE_YET


class ConsoleTunnels:
    """The agent's open console tunnels; :meth:`close_all` ends them when the agent stops."""

    def __init__(self, agent: "Agent"):
        self.agent = agent
        self.open: set = set()

    async def open_tunnel(self, request: Any, ident: str) -> TunnelResource:
        """Log in to the domain's VNC and return the resource that switches the request to it.

        :raises ApiError: not an upgrade request (426), domain not found (404) or not running (409),
            no VNC display (409), VNC unreachable or login refused (502).
        """
        if (request.getHeader(b"upgrade") or b"").lower() != UPGRADE:
            raise ApiError(UPGRADE_REQUIRED)
        from kvmdesk.agent.api import translated

        found = await translated(self.agent.hypervisor.run(_running_display, ident))
        if not found["running"]:
            raise ApiError(DOMAIN_OFF)
        display = found["display"]
        if display is None or display["port"] <= 0:
            raise ApiError(NO_VNC)
        creator = protocol.ClientCreator(self.agent.reactor, _VncSide, display["password"], self.agent.clock)
        try:
            vnc = await creator.connectTCP(display["host"], display["port"], timeout=LOGIN_TIMEOUT)
        except Exception as exc:
            raise ApiError(VNC_UNREACHABLE, reason=str(exc) or exc.__class__.__name__) from None
        try:
            await vnc.ready
        except AuthenticationFailed as exc:
            raise ApiError(VNC_LOGIN_FAILED, reason=str(exc)) from None
        except RfbError as exc:
            raise ApiError(VNC_UNREACHABLE, reason=str(exc)) from None
        return TunnelResource(vnc, self.open, self.agent.clock)

    def close_all(self) -> None:
        for side in list(self.open):
            side.transport.loseConnection()


def register_routes(router: Any, agent: "Agent") -> None:
    """Add the tunnel endpoint to the agent's router (signed like every agent endpoint)."""
    tunnels = agent.console_tunnels = ConsoleTunnels(agent)
    agent.drains.append(tunnels.close_all)

    @router.endpoint("GET", "/domains/{ident}/vnc", auth=False, tags=("agent",),
                     summary="Open the domain's console: Upgrade: kvmdesk-vnc switches to RFB without authentication")
    async def vnc(req: Any) -> Any:
        return await tunnels.open_tunnel(req.http, req.path["ident"])
