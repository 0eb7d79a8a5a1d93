"""How the storage plugin reaches node agents: a small protocol, and a direct treq implementation.

The distributor only needs two operations (:class:`AgentLink`): a JSON call, and a call whose body is
streamed from an :class:`~twisted.web.iweb.IBodyProducer`.  The nodes plugin runs the authenticated
agent client of :mod:`kvmdesk.nodeaccess` (per-node secrets, signed requests, checked answers):
:class:`ClientAgentLink` adapts it, and :func:`agent_link` picks it whenever that plugin is loaded.  Without it (tests of this plugin
alone), :class:`DirectAgentLink` talks to ``http://<node ip>:<agent port>/agent/v1`` with treq.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Protocol
from urllib.parse import urlencode

import orjson
import treq
from treq.client import HTTPClient
from twisted.internet import defer
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IBodyProducer

AGENT_PREFIX = "/agent/v1"


class AgentError(Exception):
    """The agent answered with an error envelope.

    :ivar code: the envelope's code; :ivar status: the HTTP status; :ivar data: the envelope's data.
    """

    def __init__(self, code: int, status: int, msg: str, data: Any = None):
        super().__init__(f"{msg} (code {code}, HTTP {status})")
        self.code = code
        self.status = status
        self.msg = msg
        self.data = data


class AgentUnreachable(Exception):
    """The agent could not be reached, or the connection broke before an answer."""


class AgentLink(Protocol):
    """What the storage plugin needs from the controller's agent client."""

    def call(self, node: Mapping[str, Any], method: str, path: str, *, json: Any = None,
             params: Optional[Mapping[str, Any]] = None) -> "defer.Deferred[Any]":
        """A JSON request to ``/agent/v1<path>``; resolves to the envelope's ``data``.

        :raises AgentError: an error envelope.  :raises AgentUnreachable: no answer.
        """

    def send(self, node: Mapping[str, Any], method: str, path: str, body: IBodyProducer, *,
             params: Optional[Mapping[str, Any]] = None) -> "defer.Deferred[Any]":
        """A request whose body is streamed from ``body`` (never loaded in memory); as :meth:`call`."""


def _target(path: str, params: Optional[Mapping[str, Any]]) -> str:
    query = urlencode({k: v for k, v in (params or {}).items() if v is not None})
    return AGENT_PREFIX + path + (f"?{query}" if query else "")


class DirectAgentLink:
    """treq straight to the agent at the node's IP (bearer token from ``[storage] agent_token`` if set).

    :param port: the agents' port (``[nodes] agent_port``); a node record's ``agent_port`` overrides it.
    :param timeout: seconds for JSON calls (streamed calls have no overall timeout: files are large).
    """

    def __init__(self, reactor: Any, *, port: int = 50005, token: str = "", timeout: float = 30.0,
                 max_connections: int = 4):
        self.reactor = reactor
        self.port = port
        self.token = token
        self.timeout = timeout
        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = max_connections
        pool.cachedConnectionTimeout = 30
        self.pool = pool
        self.http = HTTPClient(Agent(reactor, pool=pool))

    def _url(self, node: Mapping[str, Any], path: str, params: Optional[Mapping[str, Any]]) -> str:
        port = node.get("agent_port") or self.port
        return f"http://{node['ip']}:{port}" + _target(path, params)

    def _headers(self, extra: Optional[dict] = None) -> dict:
        headers = {"Accept": ["application/json"]}
        if self.token:
            headers["Authorization"] = [f"Bearer {self.token}"]
        headers.update(extra or {})
        return headers

    async def _decode(self, response: Any) -> Any:
        raw = await treq.content(response)
        try:
            envelope = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise AgentError(-1, response.code, f"not a JSON answer: {raw[:200]!r}") from None
        if not isinstance(envelope, dict) or "code" not in envelope:
            raise AgentError(-1, response.code, "not an envelope")
        if envelope["code"] != 0:
            raise AgentError(envelope["code"], response.code, str(envelope.get("msg")), envelope.get("data"))
        return envelope.get("data")

    async def _request(self, method: str, url: str, **kwargs: Any) -> Any:
        try:
            response = await self.http.request(method, url, **kwargs)
        except defer.CancelledError:
            raise
        except Exception as exc:
            raise AgentUnreachable(f"{method} {url}: {exc.__class__.__name__}: {exc}") from exc
        try:
            return await self._decode(response)
        except AgentError:
            raise
        except defer.CancelledError:
            raise
        except Exception as exc:
            raise AgentUnreachable(f"{method} {url}: answer lost: {exc}") from exc

    def call(self, node: Mapping[str, Any], method: str, path: str, *, json: Any = None,
             params: Optional[Mapping[str, Any]] = None) -> defer.Deferred:
        kwargs: dict[str, Any] = {"headers": self._headers(), "timeout": self.timeout}
        if json is not None:
            kwargs["data"] = orjson.dumps(json)
            kwargs["headers"]["Content-Type"] = ["application/json"]
        return defer.ensureDeferred(self._request(method, self._url(node, path, params), **kwargs))

    def send(self, node: Mapping[str, Any], method: str, path: str, body: IBodyProducer, *,
             params: Optional[Mapping[str, Any]] = None) -> defer.Deferred:
        headers = self._headers({"Content-Type": ["application/octet-stream"]})
        return defer.ensureDeferred(self._request(method, self._url(node, path, params), data=body, headers=headers))

    async def close(self) -> None:
        await self.pool.closeCachedConnections()


class ClientAgentLink:
    """The signed :class:`~kvmdesk.nodeaccess.client.AgentClient` (run by the nodes plugin) as an :class:`AgentLink`.

    Its errors are translated (an error envelope keeps its code, status and data; anything else is
    "unreachable").  A streamed body's answer comes only once the whole file is in and verified, so
    streamed calls get ``stream_timeout`` (the distributor's stall watchdog cuts a stream that stops
    moving long before that).
    """

    def __init__(self, client: Any, *, stream_timeout: float = 24 * 3600.0):
        self.client = client
        self.stream_timeout = stream_timeout

    @staticmethod
    def _translated(exc: Exception) -> Exception:
        code, status = getattr(exc, "code", None), getattr(exc, "status", None)
        if isinstance(code, int) and isinstance(status, int):
            return AgentError(code, status, str(getattr(exc, "msg", exc)), getattr(exc, "data", None))
        return AgentUnreachable(str(exc))

    async def _call(self, node: Mapping[str, Any], method: str, path: str, **kwargs: Any) -> Any:
        try:
            return await self.client.call(node, method, path, **kwargs)
        except defer.CancelledError:
            raise
        except Exception as exc:
            raise self._translated(exc) from exc

    def call(self, node: Mapping[str, Any], method: str, path: str, *, json: Any = None,
             params: Optional[Mapping[str, Any]] = None) -> defer.Deferred:
        return defer.ensureDeferred(self._call(node, method, path, json=json, params=params))

    def send(self, node: Mapping[str, Any], method: str, path: str, body: IBodyProducer, *,
             params: Optional[Mapping[str, Any]] = None) -> defer.Deferred:
        return defer.ensureDeferred(self._call(node, method, path, body=body, params=params,
                                               timeout=self.stream_timeout))


def agent_link(core: Any) -> AgentLink:
    """The link the storage plugin uses.

    ``core.extensions["storage.agent_link"]`` if something set one (tests, benchmarks); else the nodes
    plugin's signed client (``core.extensions["agents"]``); else, without the nodes plugin, a
    :class:`DirectAgentLink` from the configuration.
    """
    configured = core.extensions.get("storage.agent_link")
    if configured is not None:
        return configured
    client = core.extensions.get("agents")
    if client is not None:
        link: Any = ClientAgentLink(client)
        core.extensions["storage.agent_link"] = link
        return link
    link = DirectAgentLink(
        core.reactor,
        port=int(core.config.get("nodes.agent_port", 50005)),
        token=str(core.config.get("storage.agent_token", "") or ""),
        timeout=float(core.config.get("storage.agent_timeout", 30.0)),
    )
    core.extensions["storage.agent_link"] = link
    return link
