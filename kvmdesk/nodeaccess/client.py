"""The controller's client for node agents: signed requests, checked answers, one connection pool.

Plugins reach the one instance (the nodes plugin creates it) as ``core.extensions["agents"]``::

    agents = core.extensions["agents"]
    data = await agents.call(node, "GET", "/domains")                 # the envelope's data
    response = await agents.request(node, "GET", "/images/x", stream=True)   # raw, for downloads
    await treq.collect(response, sink.write)
    await agents.call(node, "PUT", "/images/x", body=producer)        # streamed upload (UNSIGNED-PAYLOAD)

``node`` is a node record (``ip`` and ``agent_secret``) or any mapping with those keys.  Paths are
relative to ``/agent/v1``.  Every answer's proof header is checked before it is believed.  Failures
raise :class:`AgentError` subclasses, each convertible to the API error the controller answers with
(:meth:`AgentError.api_error`): :class:`AgentUnreachable` when the agent could not be asked or not be
trusted (:class:`AgentConnectionError` for a node that is down; a refused signature, a wrong proof or
a garbled answer are the others), :class:`AgentCallError` when it answered with an error envelope
(``code``, ``msg``, ``status``, ``data``).
"""
from __future__ import annotations

import time
from typing import Any, Mapping, Optional
from urllib.parse import urlencode

import orjson
from treq.client import HTTPClient
from twisted.internet import defer, error as neterror
from twisted.web.client import Agent, HTTPConnectionPool, ResponseFailed, _HTTP11ClientFactory
from twisted.web.iweb import IBodyProducer

from kvmdesk.core import agentauth
from kvmdesk.core.errors import ApiError, define

AGENT_PREFIX = "/agent/v1"

NODE_UNREACHABLE = define(2010, 502, "无法连接节点 {ip} 的代理: {reason}", "cannot reach the agent of node {ip}: {reason}")
NODE_SIGNATURE_REFUSED = define(2011, 502, "节点 {ip} 的代理拒绝了控制器的签名: {reason}",
                                "the agent of node {ip} refused the controller's signature: {reason}")
NODE_IDENTITY_FAILED = define(2012, 502, "节点 {ip} 的代理无法证明其身份, 已拒绝使用",
                              "the agent of node {ip} could not prove its identity and was refused")
NODE_PASSWORD_WRONG = define(2013, 400, "节点 {ip} 的密码错误", "wrong password for node {ip}")
NODE_ENROLLED_ELSEWHERE = define(2014, 409, "节点 {ip} 已注册到其他控制器: {reason}",
                                 "node {ip} is already enrolled with another controller: {reason}")
NODE_REFUSED = define(2016, 409, "节点 {ip} 拒绝了操作: {reason}", "node {ip} refused the operation: {reason}")
NODE_FAILED = define(2017, 502, "节点 {ip} 操作失败: {reason}", "the operation failed on node {ip}: {reason}")
NODE_BAD_ANSWER = define(2018, 502, "节点 {ip} 的代理返回了无效的应答: {reason}",
                         "the agent of node {ip} gave an invalid answer: {reason}")


class AgentError(Exception):
    """A call to an agent failed.

    :ivar ip: the node's address.
    :ivar reason: why, in English (never a secret).
    """

    error = NODE_FAILED

    def __init__(self, ip: str, reason: str):
        super().__init__(f"{ip}: {reason}")
        self.ip = ip
        self.reason = reason

    def api_error(self) -> ApiError:
        return ApiError(self.error, ip=self.ip, reason=self.reason)


class AgentUnreachable(AgentError):
    """The agent could not be asked, or its answer cannot be trusted (base of the four below)."""

    error = NODE_UNREACHABLE


class AgentConnectionError(AgentUnreachable):
    """No connection, or no answer in time: the node is down (or its agent is)."""


class AgentSignatureRefused(AgentUnreachable):
    """The agent answered 401 to a signed request: it holds another secret (or none)."""

    error = NODE_SIGNATURE_REFUSED


class AgentIdentityError(AgentUnreachable):
    """The answer's proof is missing or wrong: whoever answered does not hold the node's secret."""

    error = NODE_IDENTITY_FAILED


class AgentBadAnswer(AgentUnreachable):
    """The answer is not the agent's JSON envelope."""

    error = NODE_BAD_ANSWER


class AgentCallError(AgentError):
    """The agent answered with an error envelope.

    :ivar status: HTTP status; :ivar code: the agent's error code; :ivar msg: its message;
    :ivar data: its ``data``.
    """

    def __init__(self, ip: str, status: int, code: int, msg: str, data: Any = None):
        super().__init__(ip, msg)
        self.status = status
        self.code = code
        self.msg = msg
        self.data = data
        self.error = NODE_REFUSED if 400 <= status < 500 else NODE_FAILED


class _QuietFactory(_HTTP11ClientFactory):
    noisy = False  # one "Starting factory" line per connection to each of a thousand nodes is noise


class QuietPool(HTTPConnectionPool):
    """A persistent connection pool that does not log every connection it opens."""

    _factory = _QuietFactory

    def _putConnection(self, key: Any, connection: Any) -> None:
        # A streamed body that ends while the socket buffer is full is unregistered with the transport
        # still marked "producer paused" (twisted's FileDescriptor keeps the flag), and the next request
        # on this connection then has its body producer resumed unpaused: NotPaused, a failed request.
        transport = getattr(connection, "transport", None)
        if transport is not None and getattr(transport, "producer", None) is None:
            transport.producerPaused = False
        super()._putConnection(key, connection)


def _target(path: str, params: Optional[Mapping[str, Any]]) -> str:
    target = AGENT_PREFIX + (path if path.startswith("/") else "/" + path)
    if params:
        target += "?" + urlencode({k: str(v) for k, v in params.items()})
    return target


def _host(ip: str) -> str:
    return f"[{ip}]" if ":" in ip and not ip.startswith("[") else ip


class AgentClient:
    """Signed HTTP calls from the controller to node agents, over one persistent connection pool.

    :param reactor: the real reactor (network, timeouts).
    :param port: the agents' TCP port (``[nodes] agent_port``).
    :param timeout: seconds to wait for an answer's headers (per call overridable).
    :param connect_timeout: seconds to wait for a TCP connection.
    :param wallclock: Unix time for signatures.
    """

    def __init__(
        self,
        reactor: Any,
        port: int,
        *,
        timeout: float = 30.0,
        connect_timeout: float = 5.0,
        persistent_per_host: int = 2,
        wallclock: Any = time.time,
    ):
        self.reactor = reactor
        self.port = port
        self.timeout = timeout
        self.wallclock = wallclock
        self.pool = QuietPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = persistent_per_host
        self.pool.retryAutomatically = True
        self.http = HTTPClient(Agent(reactor, pool=self.pool, connectTimeout=connect_timeout))

    def url(self, ip: str, target: str) -> str:
        return f"http://{_host(ip)}:{self.port}{target}"

    async def _send(
        self,
        ip: str,
        secret: Optional[str],
        method: str,
        target: str,
        *,
        body: Any,
        unsigned_payload: bool,
        headers: Optional[Mapping[str, str]],
        timeout: Optional[float],
        stream: bool,
    ) -> tuple[Any, Optional[str]]:
        sent: dict[str, str] = dict(headers or {})
        signature = None
        if secret is not None:
            signed = agentauth.sign(secret, method, target, None if unsigned_payload else body, now=self.wallclock(),
                                    unsigned_payload=unsigned_payload)
            signature = signed[agentauth.H_SIGNATURE]
            sent.update(signed)
        try:
            response = await self.http.request(
                method, self.url(ip, target), data=body, headers=sent, timeout=timeout or self.timeout,
                allow_redirects=False, unbuffered=stream, reactor=self.reactor,
            )
        except defer.CancelledError:
            raise AgentConnectionError(ip, f"no answer within {timeout or self.timeout:g} s") from None
        except (neterror.ConnectError, neterror.TimeoutError, ResponseFailed, neterror.ConnectionLost) as exc:
            reason = exc.__class__.__name__
            if isinstance(exc, ResponseFailed) and exc.reasons:
                reason = exc.reasons[0].getErrorMessage()
            elif str(exc):
                reason = str(exc).strip()
            raise AgentConnectionError(ip, reason) from None
        return response, signature

    async def request(
        self,
        node: Mapping[str, Any],
        method: str,
        path: str,
        *,
        json: Any = None,
        body: Any = None,
        params: Optional[Mapping[str, Any]] = None,
        headers: Optional[Mapping[str, str]] = None,
        timeout: Optional[float] = None,
        stream: bool = False,
    ) -> Any:
        """Send a signed request and check the agent's proof; return the treq response unread.

        :param json: a JSON body (signed with its hash).
        :param body: bytes (signed with their hash) or an ``IBodyProducer`` (streamed, sent as
            ``UNSIGNED-PAYLOAD``; the caller checks its integrity, e.g. with an MD5).
        :param stream: don't buffer the answer (downloads: ``treq.collect(response, write)``).
        :raises AgentUnreachable, AgentSignatureRefused, AgentIdentityError:
        """
        ip = node["ip"]
        secret = node.get("agent_secret")
        if not secret:
            raise AgentSignatureRefused(ip, "the controller holds no secret for this node (not enrolled)")
        sent_headers = dict(headers or {})
        unsigned = IBodyProducer.providedBy(body)
        if json is not None:
            body = orjson.dumps(json)
            sent_headers.setdefault("Content-Type", "application/json")
        response, signature = await self._send(ip, secret, method, _target(path, params), body=body,
                                               unsigned_payload=unsigned, headers=sent_headers, timeout=timeout,
                                               stream=stream)
        proof = response.headers.getRawHeaders(agentauth.H_PROOF, [None])[-1]
        proof_text = proof.decode("latin-1") if isinstance(proof, bytes) else proof
        if not agentauth.check_proof(secret, signature, response.code, proof_text):
            if response.code == 401:
                reason = await self._error_message(response)
                raise AgentSignatureRefused(ip, reason)
            await self._discard(response)
            raise AgentIdentityError(ip, "missing or wrong proof header")
        return response

    @staticmethod
    async def _discard(response: Any) -> None:
        try:
            await response.content()
        except Exception:
            pass

    @staticmethod
    async def _error_message(response: Any) -> str:
        try:
            envelope = orjson.loads(await response.content())
            return str(envelope.get("msg") or f"HTTP {response.code}")
        except Exception:
            return f"HTTP {response.code}"

    async def decode(self, ip: str, response: Any) -> Any:
        """The ``data`` of an agent's envelope; :class:`AgentCallError` for an error envelope."""
        content = await response.content()
        try:
            envelope = orjson.loads(content)
            code = envelope["code"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            raise AgentBadAnswer(ip, f"HTTP {response.code}, not a JSON envelope") from None
        if code != 0 or response.code >= 400:
            raise AgentCallError(ip, response.code, code, str(envelope.get("msg")), envelope.get("data"))
        return envelope.get("data")

    async def call(
        self,
        node: Mapping[str, Any],
        method: str,
        path: str,
        json: Any = None,
        *,
        body: Any = None,
        params: Optional[Mapping[str, Any]] = None,
        headers: Optional[Mapping[str, str]] = None,
        timeout: Optional[float] = None,
    ) -> Any:
        """A signed call; returns the envelope's ``data`` (see :meth:`request` for the arguments)."""
        response = await self.request(node, method, path, json=json, body=body, params=params, headers=headers,
                                      timeout=timeout)
        return await self.decode(node["ip"], response)

    async def enrol(
        self,
        ip: str,
        password: str,
        controller_id: str,
        controller_url: str,
        *,
        current_secret: Optional[str] = None,
        timeout: Optional[float] = None,
    ) -> dict[str, Any]:
        """Enrol (or, with ``current_secret``, re-enrol) with the agent at ``ip``.

        The new secret is tried at once with a signed ``GET /status``, so that an agent that cannot
        use it is refused here.

        :returns: the agent's answer: ``{"agent_id", "secret", "hostname", "version", "rotated"}``.
        :raises AgentError: unreachable, wrong password (:attr:`AgentCallError.status` 401),
            enrolled elsewhere (409), or the proof check failed.
        """
        body = orjson.dumps({"password": password, "controller_id": controller_id, "controller_url": controller_url})
        response, _ = await self._send(ip, current_secret, "POST", _target("/enrol", None), body=body,
                                       unsigned_payload=False, headers={"Content-Type": "application/json"},
                                       timeout=timeout, stream=False)
        try:
            answer = await self.decode(ip, response)
        except AgentCallError as exc:
            if exc.status == 401:
                raise ApiError(NODE_PASSWORD_WRONG, ip=ip) from None
            if exc.status == 409:
                raise ApiError(NODE_ENROLLED_ELSEWHERE, ip=ip, reason=exc.reason) from None
            raise
        if not isinstance(answer, dict) or not answer.get("secret") or not answer.get("agent_id"):
            raise AgentBadAnswer(ip, "the enrolment answer has no secret")
        await self.call({"ip": ip, "agent_secret": answer["secret"]}, "GET", "/status", timeout=timeout)
        return answer

    async def close(self) -> None:
        await self.pool.closeCachedConnections()
