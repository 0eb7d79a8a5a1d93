"""The controller's end of the agent's console tunnel (see :mod:`kvmdesk.agent.console`).

:func:`open_tunnel` connects to the node's agent, sends the signed ``GET /agent/v1/domains/{uuid}/vnc``
with ``Upgrade: kvmdesk-vnc`` and checks the agent's proof on the answer.  On ``101`` the connection
is a byte stream to the domain's console (an RFB server that asks for no authentication: the agent
logged in to VNC with the domain's password); any other answer is the agent's error envelope.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import orjson
from twisted.internet import defer, protocol

from kvmdesk.core import agentauth
from kvmdesk.core.console import CONSOLE_UNAVAILABLE, DOMAIN_OFF, NODE_OFFLINE
from kvmdesk.core.errors import ApiError

AGENT_PATH = "/agent/v1/domains/{uuid}/vnc"
#: The agent's error codes that mean "the domain is not running" (its own 409 and "no such domain").
_AGENT_DOMAIN_OFF = {DOMAIN_OFF.code, 2110}
#: Longest answer head (status line and headers) or error body read from an agent.
MAX_HEAD = 64 * 1024


class TunnelProtocol(protocol.Protocol):
    """Reads the agent's answer; on 101 hands every further byte to :attr:`sink`.

    :ivar ready: fires with the protocol once the tunnel is open, or fails with an :class:`ApiError`.
    :ivar sink: called with each chunk from the console (set by the relay before it is needed).
    :ivar on_lost: called once when the connection ends (after ``ready`` fired).
    """

    def __init__(self, request: bytes, secret: str, signature: str, ip: str):
        self.request = request
        self.secret = secret
        self.signature = signature
        self.ip = ip
        self.ready: defer.Deferred = defer.Deferred()
        self.sink: Optional[Callable[[bytes], None]] = None
        self.on_lost: Optional[Callable[[Any], None]] = None
        self._head = bytearray()
        self._status = 0
        self._length = 0
        self._early = b""

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        if self.ready.called:
            if self.sink is not None:
                self.sink(data)
            else:
                self._early += data
            return
        self._head += data
        if not self._status:
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                if len(self._head) > MAX_HEAD:
                    self._fail("the agent's answer has no end of headers")
                return
            head, rest = bytes(self._head[:end]), bytes(self._head[end + 4:])
            if not self._parse_head(head):
                return
            self._head = bytearray(rest)
            if self._status == 101:
                self._early = rest
                self.ready.callback(self)
                return
        if len(self._head) >= self._length or len(self._head) > MAX_HEAD:
            self._refused(bytes(self._head[:self._length]))

    def _parse_head(self, head: bytes) -> bool:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        try:
            self._status = int(parts[1])
        except (IndexError, ValueError):
            self._fail("the agent's answer is not HTTP")
            return False
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        proof = headers.get(agentauth.H_PROOF.lower().encode(), b"").decode("latin-1")
        if not agentauth.check_proof(self.secret, self.signature, self._status, proof):
            reason = "the agent refused the controller's signature" if self._status == 401 else \
                "the agent could not prove its identity"
            self._fail(reason)
            return False
        length = headers.get(b"content-length", b"0")
        self._length = int(length) if length.isdigit() else MAX_HEAD
        return True

    def _refused(self, body: bytes) -> None:
        try:
            envelope = orjson.loads(body)
            code, msg = int(envelope["code"]), str(envelope["msg"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            code, msg = 0, f"HTTP {self._status}"
        if code in _AGENT_DOMAIN_OFF:
            self._settle(ApiError(DOMAIN_OFF))
        else:
            self._settle(ApiError(CONSOLE_UNAVAILABLE, reason=msg))

    def _fail(self, reason: str) -> None:
        self._settle(ApiError(CONSOLE_UNAVAILABLE, reason=reason))

    def _settle(self, error: ApiError) -> None:
        if not self.ready.called:
            self.ready.errback(error)
        self.transport.abortConnection()

    def take_early(self) -> bytes:
        """Bytes that came with the 101 answer, before the sink was set."""
        early, self._early = self._early, b""
        return early

    def connectionLost(self, reason: Any = None) -> None:
        if not self.ready.called:
            self.ready.errback(ApiError(NODE_OFFLINE, reason=f"the agent of {self.ip} closed the connection"))
            return
        if self.on_lost is not None:
            on_lost, self.on_lost = self.on_lost, None
            on_lost(reason)


def upgrade_request(ip: str, port: int, secret: str, domain_uuid: str, now: float) -> tuple[bytes, str]:
    """The signed upgrade request and its signature (for the proof check)."""
    target = AGENT_PATH.format(uuid=domain_uuid)
    signed = agentauth.sign(secret, "GET", target, None, now=now)
    host = f"[{ip}]" if ":" in ip else ip
    lines = [f"GET {target} HTTP/1.1", f"Host: {host}:{port}", "Upgrade: kvmdesk-vnc", "Connection: Upgrade",
             "Accept-Language: en",  # the reason ends up in an English websocket close reason
             *(f"{name}: {value}" for name, value in signed.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"), signed[agentauth.H_SIGNATURE]


async def open_tunnel(reactor: Any, node: Mapping[str, Any], port: int, domain_uuid: str, *,
                      now: float, timeout: float = 15.0) -> TunnelProtocol:
    """Open the console tunnel to ``domain_uuid`` on ``node`` (a record with ``ip`` and ``agent_secret``).

    :raises ApiError: :data:`NODE_OFFLINE` (no connection), :data:`DOMAIN_OFF`, :data:`CONSOLE_UNAVAILABLE`.
    """
    ip, secret = node["ip"], node.get("agent_secret")
    if not secret:
        raise ApiError(NODE_OFFLINE, reason=f"node {ip} has no enrolled agent")
    request, signature = upgrade_request(ip, port, secret, domain_uuid, now)
    creator = protocol.ClientCreator(reactor, TunnelProtocol, request, secret, signature, ip)
    try:
        tunnel = await creator.connectTCP(ip, port, timeout=timeout)
    except Exception as exc:
        raise ApiError(NODE_OFFLINE, reason=str(exc) or exc.__class__.__name__) from None
    answer = tunnel.ready
    call = reactor.callLater(timeout, answer.cancel)
    try:
        return await answer
    except defer.CancelledError:
        tunnel.transport.abortConnection()
        raise ApiError(NODE_OFFLINE, reason=f"the agent of {ip} did not answer within {timeout:g} s") from None
    finally:
        if call.active():
            call.cancel()
