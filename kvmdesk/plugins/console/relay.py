"""The websocket console relay: ``ws(s)://HOST:PORT/websockify/?token=...`` to a domain's console.

The websockify protocol: binary websocket messages carry the RFB byte stream as it is (subprotocol
``binary`` accepted; the old base64 one is not), so noVNC and other web VNC viewers connect as they
would to websockify.  Each connection checks its token (:func:`kvmdesk.core.console.check`), finds
the node, opens the agent's console tunnel (:mod:`kvmdesk.nodeaccess.tunnel`) and then passes bytes both ways:

- back-pressure both ways: the tunnel's TCP transport is the websocket transport's push producer
  and the other way round, so nothing is read faster than the other side takes it, and at most
  ``[console] buffer_kib`` is held per direction; console -> viewer bytes are spliced from socket
  to socket behind a frame header (:mod:`kvmdesk.core.passthrough`), not copied through autobahn;
- a viewer that stops reading pauses the tunnel; paused longer than ``[console] stall_timeout``
  seconds, the console is closed (:data:`~kvmdesk.core.console.CLIENT_STALLED`);
- either side closing closes the other; :meth:`ConsoleRelay.close_domain` closes every console of a
  domain (it stopped or moved) and revokes its tokens.

Refusals are websocket closes with a code (4080-4099, see :func:`kvmdesk.core.console.close_code`)
and an English reason, after the opening handshake, so that a browser can show why.
"""
from __future__ import annotations

from typing import Any, Optional

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.internet import defer
from twisted.logger import Logger

from kvmdesk.core import console
from kvmdesk.core.errors import ApiError, define
from kvmdesk.core.passthrough import pass_through, websocket_header
from kvmdesk.nodeaccess.tunnel import TunnelProtocol, open_tunnel

log = Logger(namespace="kvmdesk.console")

#: A viewer that sent a text message (websockify's old base64 mode is not offered).
TEXT_MESSAGE = define(1096, 400, "控制台只接受二进制消息", "binary messages only (websockify binary protocol)")
#: Bytes a viewer may send before the tunnel is open (an RFB viewer sends nothing before the greeting).
MAX_EARLY = 64 * 1024


class StallWatch:
    """The tunnel transport as the websocket transport's push producer, with a stall timer.

    While the viewer's socket is full the tunnel is paused; paused for ``timeout`` seconds, the
    console is closed as stalled.
    """

    def __init__(self, tunnel_transport: Any, clock: Any, timeout: float, on_stall: Any):
        self.tunnel_transport = tunnel_transport
        self.clock = clock
        self.timeout = timeout
        self.on_stall = on_stall
        self.timer: Any = None

    def pauseProducing(self) -> None:
        self.tunnel_transport.pauseProducing()
        if self.timer is None and self.timeout > 0:
            self.timer = self.clock.callLater(self.timeout, self._stalled)

    def resumeProducing(self) -> None:
        self.cancel()
        self.tunnel_transport.resumeProducing()

    def stopProducing(self) -> None:
        self.cancel()
        self.tunnel_transport.loseConnection()

    def cancel(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None

    def _stalled(self) -> None:
        self.timer = None
        self.on_stall()


class ConsoleProtocol(WebSocketServerProtocol):
    """One viewer's websocket; its factory is the :class:`ConsoleRelay`'s."""

    relay: "ConsoleRelay"
    token: str = ""
    expected_domain: Optional[str] = None
    grant: Optional[console.Grant] = None
    tunnel: Optional[TunnelProtocol] = None
    watch: Optional[StallWatch] = None
    opening: Optional[defer.Deferred] = None
    closed: bool = False

    def onConnect(self, request: Any) -> Optional[str]:
        self.relay = self.factory.relay
        if self.relay.stopping:
            raise ConnectionDeny(503, "the console relay is stopping")
        self.token = (request.params.get("token") or [""])[0]
        self.expected_domain = (request.params.get("domain") or [None])[0]
        self.early = bytearray()
        return "binary" if "binary" in request.protocols else None

    def onOpen(self) -> None:
        self.opening = defer.ensureDeferred(self.relay.open(self))
        self.opening.addErrback(self._open_failed)

    def _open_failed(self, failure: Any) -> None:
        if failure.check(defer.CancelledError):
            return
        if failure.check(ApiError):
            self.refuse(failure.value)
            return
        log.failure("console relay failed to open a console", failure)
        self.close_with(console.CONSOLE_UNAVAILABLE, reason="internal error")

    def refuse(self, exc: ApiError) -> None:
        self.close_with(exc.error, **exc.params)

    def close_with(self, error: Any, **params: Any) -> None:
        """Close with this module's code and reason for ``error``; the tunnel goes too."""
        if self.closed:
            return
        self.closed = True
        reason = error.message("en", params)
        code = console.close_code(error)
        # A close reason is at most 123 bytes.
        self.sendClose(code, reason.encode("utf-8")[:123].decode("utf-8", "ignore"))
        self._drop_tunnel()
        self.relay.forget(self)

    def attach(self, tunnel: TunnelProtocol) -> None:
        """Splice the open tunnel to this websocket (called by the relay)."""
        self.tunnel = tunnel
        tunnel.sink = self._from_console
        tunnel.on_lost = self._console_lost
        transport = self.transport
        if getattr(transport, "producer", None) is not None:
            transport.unregisterProducer()  # twisted.web's HTTP channel, when upgraded on the API port
        for spliced in (transport, tunnel.transport):
            console.relay_buffers(spliced, self.relay.buffer_size)
        self.watch = StallWatch(tunnel.transport, self.relay.clock, self.relay.stall_timeout, self._stalled)
        transport.registerProducer(self.watch, True)
        tunnel.transport.registerProducer(transport, True)
        # The console's bytes go from the tunnel's socket to the viewer's as websocket frames
        # without autobahn's copy per message (_from_console stays the way for the rest).
        pass_through(tunnel.transport, transport, self.relay.buffer_size, header=websocket_header,
                     ready=lambda: not self.closed and self.state == self.STATE_OPEN)
        early = tunnel.take_early()
        if early:
            self._from_console(early)
        if self.early:
            tunnel.transport.write(bytes(self.early))
            self.early = bytearray()

    def _from_console(self, data: bytes) -> None:
        if not self.closed:
            self.sendMessage(data, isBinary=True)

    def _console_lost(self, reason: Any) -> None:
        if self.closed:
            return
        self.close_with(console.CONSOLE_CLOSED, reason="the desktop's display ended")

    def _stalled(self) -> None:
        log.info("console of {domain} closed: the viewer stopped reading", domain=getattr(self.grant, "domain_uuid", "?"))
        self.close_with(console.CLIENT_STALLED)
        # The close frame cannot reach a viewer that does not read.
        self.transport.abortConnection()

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if not isBinary:
            self.close_with(TEXT_MESSAGE)
            return
        if self.tunnel is not None:
            self.tunnel.transport.write(payload)
            return
        self.early += payload
        if len(self.early) > MAX_EARLY:
            self.close_with(console.CONSOLE_UNAVAILABLE, reason="the viewer sent too much before the console opened")

    def _drop_tunnel(self) -> None:
        if self.watch is not None:
            self.watch.cancel()
        tunnel, self.tunnel = self.tunnel, None
        if tunnel is not None:
            tunnel.on_lost = None
            tunnel.transport.loseConnection()

    def onClose(self, wasClean: bool, code: Optional[int], reason: Optional[str]) -> None:
        self.closed = True
        if self.opening is not None and not self.opening.called:
            self.opening.cancel()
        self._drop_tunnel()
        self.relay.forget(self)


class ConsoleRelay:
    """The open consoles, by domain; opens new ones, closes a domain's.

    Reached by other plugins as ``core.extensions["console"]``.

    :param core: the controller core (store, configuration, clock, the nodes plugin's extensions).
    """

    def __init__(self, core: Any):
        self.core = core
        self.clock = core.clock
        self.stall_timeout = float(core.config.number("console.stall_timeout", 60.0, minimum=0))
        self.tunnel_timeout = float(core.config.number("console.tunnel_timeout", 15.0, minimum=0.1))
        #: Bytes read at once and left unsent before the other side is paused, per direction and hop.
        self.buffer_size = int(core.config.number("console.buffer_kib", 1024, minimum=16) * 1024)
        self.consoles: dict[tuple[str, str], set[ConsoleProtocol]] = {}
        self.stopping = False
        self.factory = WebSocketServerFactory()
        self.factory.protocol = ConsoleProtocol
        self.factory.relay = self
        max_message = int(core.config.number("console.max_message", 1 << 20, minimum=1024))
        self.factory.setProtocolOptions(maxFramePayloadSize=max_message, maxMessagePayloadSize=max_message,
                                        openHandshakeTimeout=30, closeHandshakeTimeout=5)

    def resource(self) -> WebSocketResource:
        """The twisted.web resource that upgrades to this relay's websocket."""
        return UpgradeResource(self.factory)

    async def open(self, viewer: ConsoleProtocol) -> None:
        """Check the viewer's token, open the tunnel and splice it (refusals raise ``ApiError``)."""
        grant = await console.check(self.core, viewer.token, domain_uuid=viewer.expected_domain)
        viewer.grant = grant
        nodes = self.core.extensions.get("nodes")
        agents = self.core.extensions.get("agents")
        if nodes is None or agents is None:
            raise ApiError(console.NODE_OFFLINE, reason="the nodes plugin is not loaded")
        try:
            node = await nodes.node_or_404(grant.node_uuid)
        except ApiError:
            raise ApiError(console.CONSOLE_CLOSED, reason="the desktop's node was removed") from None
        if node.get("state") == "offline":
            raise ApiError(console.NODE_OFFLINE, reason=f"node {node.get('ip')} does not answer")
        key = (grant.node_uuid, grant.domain_uuid)
        self.consoles.setdefault(key, set()).add(viewer)
        tunnel = await open_tunnel(self.core.reactor, node, agents.port, grant.domain_uuid,
                                   now=agents.wallclock(), timeout=self.tunnel_timeout)
        if viewer.closed or viewer not in self.consoles.get(key, ()):
            tunnel.transport.loseConnection()  # closed (viewer left, domain stopped) while it opened
            return
        viewer.attach(tunnel)
        log.info("console of {domain} on {ip} opened ({kind} {holder})", domain=grant.domain_uuid,
                 ip=node.get("ip"), kind=grant.holder_kind, holder=grant.holder_id)

    def forget(self, viewer: ConsoleProtocol) -> None:
        grant = viewer.grant
        if grant is None:
            return
        key = (grant.node_uuid, grant.domain_uuid)
        viewers = self.consoles.get(key)
        if viewers is not None:
            viewers.discard(viewer)
            if not viewers:
                del self.consoles[key]

    def open_count(self, node_uuid: Optional[str] = None, domain_uuid: Optional[str] = None) -> int:
        """How many consoles are open (of one domain, when given)."""
        if domain_uuid is not None:
            return len(self.consoles.get((node_uuid or "", domain_uuid), ()))
        return sum(len(v) for v in self.consoles.values())

    async def close_domain(self, node_uuid: str, domain_uuid: str, reason: str) -> int:
        """Revoke a domain's tokens and close its open consoles (it stopped, moved or was removed).

        :returns: how many consoles were closed.
        """
        await console.revoke_domain(self.core, node_uuid, domain_uuid)
        viewers = self.consoles.pop((node_uuid, domain_uuid), set())
        for viewer in list(viewers):
            viewer.close_with(console.CONSOLE_CLOSED, reason=reason)
        if viewers:
            log.info("closed {n} console(s) of {domain}: {reason}", n=len(viewers), domain=domain_uuid, reason=reason)
        return len(viewers)

    def close_all(self) -> None:
        """Close every console (the controller stops)."""
        self.stopping = True
        for viewers in list(self.consoles.values()):
            for viewer in list(viewers):
                viewer.close_with(console.RELAY_STOPPING)
        self.consoles.clear()


class UpgradeResource(WebSocketResource):
    """autobahn's upgrade resource, with twisted.web's idle timeout switched off for the console."""

    def render(self, request: Any) -> Any:
        channel = request.channel
        if channel is not None and hasattr(channel, "setTimeout"):
            channel.setTimeout(None)
        return super().render(request)
