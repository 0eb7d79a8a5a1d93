"""Console tokens: issued here, checked here, and turned into the ``websockify_url`` of the contract.

A console token lets its bearer open the console (VNC, through the controller's websocket relay) of
one domain for a short while.  It is bound to the domain (node uuid + domain uuid) and to one kind
of holder (``admin``: an administrator, ``user``: that desktop's user) and holder id, and is signed
with HMAC-SHA256 under a key kept in ``<data_dir>/console.key`` (mode 0600), so nothing secret is
stored per token::

    v1.<base64url JSON payload>.<base64url HMAC of "v1." + payload>

Two things are stored, both small: the ids of single-use tokens once used (until they expire) and a
per-domain generation number: :func:`revoke_domain` raises it, and every token issued before is then
refused (a desktop that stops or moves takes its tokens with it).

Every plugin that hands out consoles (templates, desktops) calls :func:`issue` and
:func:`console_url`; the relay calls :func:`check`.  Failures raise :class:`ApiError` with the codes
below (1080-1099); :func:`close_code` maps them to the websocket close code the relay sends.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import socket
from pathlib import Path
from typing import Any, Optional
from urllib.parse import quote, urlsplit

import attrs
import orjson

from kvmdesk.core.errors import ApiError, ErrorCode, define
from kvmdesk.core.store import DuplicateKeyError, Index
from kvmdesk.core.threadpools import in_reactor_pool

TOKEN_MALFORMED = define(1080, 400, "控制台令牌无效", "the console token is malformed or not signed by this controller")
TOKEN_EXPIRED = define(1081, 401, "控制台令牌已过期, 请重新打开控制台", "the console token has expired; open the console again")
TOKEN_USED = define(1082, 401, "控制台令牌只能使用一次, 已被使用", "the console token was for one use and has been used")
TOKEN_FOREIGN = define(1083, 403, "控制台令牌不属于此{what}", "the console token is for another {what}")
TOKEN_REVOKED = define(1084, 401, "控制台令牌已被撤销 (桌面已关闭或迁移)",
                       "the console token was revoked (the desktop stopped or moved)")
DOMAIN_OFF = define(1085, 409, "桌面未运行, 无法打开控制台", "the desktop is not running")
NODE_OFFLINE = define(1086, 503, "桌面所在节点离线: {reason}", "the desktop's node is offline: {reason}")
CONSOLE_UNAVAILABLE = define(1087, 502, "无法连接桌面的控制台: {reason}", "cannot reach the desktop's console: {reason}")
CONSOLE_CLOSED = define(1088, 410, "控制台已关闭: {reason}", "the console was closed: {reason}")
CLIENT_STALLED = define(1089, 408, "客户端长时间未读取数据, 控制台已关闭",
                        "the client stopped reading; the console was closed")
RELAY_STOPPING = define(1090, 503, "控制台服务正在停止", "the console relay is stopping")
BAD_HOLDER = define(1094, 400, "控制台持有者类型无效: {kind}", "invalid console holder kind: {kind}")

#: Who may hold a console token.
HOLDER_KINDS = frozenset({"admin", "user"})
VERSION = "v1"
KEY_FILE = "console.key"
USED = "console_tokens_used"
GENERATIONS = "console_generations"
INDEXES = [Index(USED, ["jti"], unique=True), Index(USED, ["expires"]), Index(GENERATIONS, ["key"], unique=True)]
#: Websocket close codes: 4000 + the last three digits of the error code (4080-4099: private use).
CLOSE_BASE = 4000


def close_code(error: ErrorCode) -> int:
    """The websocket close code for one of this module's errors (e.g. 1081 -> 4081)."""
    return CLOSE_BASE + error.code % 1000


@attrs.frozen
class Grant:
    """What a valid token allows: one domain's console, for one holder, until ``expires``."""

    node_uuid: str
    domain_uuid: str
    holder_kind: str
    holder_id: str
    expires: float
    single_use: bool
    jti: str


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _domain_key(node_uuid: str, domain_uuid: str) -> str:
    return f"{node_uuid}/{domain_uuid}"


def _read_or_create_key(path: Path) -> bytes:
    """The signing key, created (32 random bytes, mode 0600) on first use; a concurrent creator wins."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_bytes()
    with os.fdopen(fd, "wb") as handle:
        handle.write(key)
        handle.flush()
        os.fsync(handle.fileno())
    return key


@attrs.define(eq=False)
class ConsoleTokens:
    """Issues and checks tokens with one key, one clock and the store (one per core: :func:`tokens`)."""

    key: bytes = attrs.field(repr=False)
    store: Any
    clock: Any
    default_ttl: float = 60.0
    default_single_use: bool = False
    #: Every this many checks, used single-use ids that have expired are deleted.
    purge_every: int = 256
    _checks: int = attrs.field(default=0, init=False)

    def _sign(self, payload: str) -> str:
        return _b64(hmac.new(self.key, f"{VERSION}.{payload}".encode("ascii"), hashlib.sha256).digest())

    async def _generation(self, node_uuid: str, domain_uuid: str) -> int:
        found = await self.store.collection(GENERATIONS).find_one({"key": _domain_key(node_uuid, domain_uuid)})
        return int(found["generation"]) if found else 0

    async def issue(self, node_uuid: str, domain_uuid: str, holder_kind: str, holder_id: str, *,
                    ttl: Optional[float] = None, single_use: Optional[bool] = None) -> str:
        """A token for one domain's console.

        :param holder_kind: ``admin`` or ``user``.
        :param ttl: seconds the token may be used to open the console (default ``[console] token_ttl``);
            a console already open is not closed when its token expires.
        :param single_use: refuse a second use (default ``[console] single_use``).
        :raises ApiError: :data:`BAD_HOLDER`.
        """
        if holder_kind not in HOLDER_KINDS:
            raise ApiError(BAD_HOLDER, kind=holder_kind)
        ttl = self.default_ttl if ttl is None else float(ttl)
        single = self.default_single_use if single_use is None else bool(single_use)
        payload = {
            "n": node_uuid, "d": domain_uuid, "k": holder_kind, "h": str(holder_id),
            "e": self.clock.seconds() + ttl, "s": int(single), "i": secrets.token_hex(12),
            "g": await self._generation(node_uuid, domain_uuid),
        }
        body = _b64(orjson.dumps(payload))
        return f"{VERSION}.{body}.{self._sign(body)}"

    def decode(self, token: str) -> dict[str, Any]:
        """The verified payload of ``token`` (signature only: no expiry or store checks).

        :raises ApiError: :data:`TOKEN_MALFORMED`.
        """
        parts = token.split(".") if isinstance(token, str) and len(token) <= 2048 else []
        if len(parts) != 3 or parts[0] != VERSION:
            raise ApiError(TOKEN_MALFORMED)
        try:
            good = hmac.compare_digest(self._sign(parts[1]), parts[2])
        except (TypeError, ValueError, UnicodeEncodeError):
            good = False
        if not good:
            raise ApiError(TOKEN_MALFORMED)
        try:
            payload = orjson.loads(_unb64(parts[1]))
            for field, kind in (("n", str), ("d", str), ("k", str), ("h", str), ("i", str), ("e", (int, float)),
                                ("s", int), ("g", int)):
                if not isinstance(payload[field], kind):
                    raise TypeError(field)
        except (ValueError, KeyError, TypeError, orjson.JSONDecodeError):
            raise ApiError(TOKEN_MALFORMED) from None
        return payload

    async def check(self, token: str, *, node_uuid: Optional[str] = None, domain_uuid: Optional[str] = None,
                    holder_kind: Optional[str] = None, holder_id: Optional[str] = None,
                    consume: bool = True) -> Grant:
        """Check ``token`` and, if single-use and ``consume``, use it up.

        The optional expectations say what the caller is opening: a token for another domain, node
        or holder is refused as foreign.

        :raises ApiError: :data:`TOKEN_MALFORMED`, :data:`TOKEN_EXPIRED`, :data:`TOKEN_FOREIGN`,
            :data:`TOKEN_REVOKED`, :data:`TOKEN_USED`.
        """
        payload = self.decode(token)
        now = self.clock.seconds()
        if now >= payload["e"]:
            raise ApiError(TOKEN_EXPIRED)
        for expected, field, what in ((domain_uuid, "d", "desktop"), (node_uuid, "n", "node"),
                                      (holder_kind, "k", "holder"), (holder_id, "h", "holder")):
            if expected is not None and payload[field] != expected:
                raise ApiError(TOKEN_FOREIGN, what=what)
        if payload["g"] != await self._generation(payload["n"], payload["d"]):
            raise ApiError(TOKEN_REVOKED)
        if payload["s"] and consume:
            used = self.store.collection(USED)
            try:
                await used.insert_one({"jti": payload["i"], "expires": payload["e"]})
            except DuplicateKeyError:
                raise ApiError(TOKEN_USED) from None
            self._checks += 1
            if self._checks % self.purge_every == 0:
                await used.delete_many({"expires": {"$lt": now}})
        elif payload["s"] and await self.store.collection(USED).find_one({"jti": payload["i"]}) is not None:
            raise ApiError(TOKEN_USED)
        return Grant(payload["n"], payload["d"], payload["k"], payload["h"], float(payload["e"]),
                     bool(payload["s"]), payload["i"])

    async def revoke_domain(self, node_uuid: str, domain_uuid: str) -> int:
        """Refuse every token issued so far for this domain; returns the new generation."""
        updated = await self.store.collection(GENERATIONS).find_one_and_update(
            {"key": _domain_key(node_uuid, domain_uuid)}, {"$inc": {"generation": 1}}, upsert=True)
        return int(updated["generation"])


async def tokens(core: Any) -> ConsoleTokens:
    """The core's :class:`ConsoleTokens` (its key read, or created, off the reactor on first use)."""
    found = core.extensions.get("console_tokens")
    if found is None:
        key = await in_reactor_pool(core.reactor, _read_or_create_key, Path(core.data_dir) / KEY_FILE)
        found = core.extensions.setdefault("console_tokens", ConsoleTokens(
            key, core.store, core.clock,
            default_ttl=float(core.config.number("console.token_ttl", 60.0, minimum=1)),
            default_single_use=bool(core.config.get("console.single_use", False)),
        ))
    return found


async def issue(core: Any, node_uuid: str, domain_uuid: str, holder_kind: str, holder_id: str, *,
                ttl: Optional[float] = None, single_use: Optional[bool] = None) -> str:
    """Issue a console token (see :meth:`ConsoleTokens.issue`)."""
    return await (await tokens(core)).issue(node_uuid, domain_uuid, holder_kind, holder_id, ttl=ttl,
                                            single_use=single_use)


async def check(core: Any, token: str, **expected: Any) -> Grant:
    """Check (and use up, if single-use) a console token (see :meth:`ConsoleTokens.check`)."""
    return await (await tokens(core)).check(token, **expected)


async def revoke_domain(core: Any, node_uuid: str, domain_uuid: str) -> int:
    """Refuse every console token issued so far for one domain."""
    return await (await tokens(core)).revoke_domain(node_uuid, domain_uuid)


def _request_origin(http: Any) -> tuple[bool, str]:
    """``(secure, host[:port])`` of an HTTP request as the client addressed it."""
    forwarded = (http.getHeader(b"x-forwarded-proto") or b"").decode("latin-1").strip().lower()
    secure = forwarded == "https" if forwarded else bool(http.isSecure())
    host = (http.getHeader(b"host") or b"").decode("latin-1").strip()
    if not host:
        address = http.getHost()
        host = f"{address.host}:{address.port}"
    return secure, host


def _with_port(host: str, port: int) -> str:
    """``host`` (``name``, ``name:port``, ``[v6]:port``) with its port replaced."""
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 or host.startswith("[") and "]:" in host else host
    return f"{name}:{port}"


def console_url(req_or_base_url: Any, token: str, config: Any = None) -> str:
    """The ``websockify_url`` for ``token``: ``ws(s)://HOST:PORT/<path>/?token=...``.

    :param req_or_base_url: the API request being answered (an ``ApiRequest``: its Host header and
        scheme are used, and its core's configuration), or a base URL (``http(s)://host:port``).
    :param config: the configuration, when a base URL is given (``[console] path``, ``port``,
        ``public_url``).  ``[console] public_url`` (e.g. ``wss://vdi.example.org/websockify``), when set,
        is used as it is: behind a reverse proxy only the operator knows the outside address.
    """
    if config is None:
        config = getattr(getattr(req_or_base_url, "core", None), "config", None)
    public = (config.get("console.public_url", "") if config is not None else "") or ""
    quoted = quote(token, safe="")
    if public:
        return f"{public.rstrip('/')}/?token={quoted}"
    path = "/" + ((config.get("console.path", "websockify") if config is not None else "websockify").strip("/"))
    port = int(config.get("console.port", 0) or 0) if config is not None else 0
    if isinstance(req_or_base_url, str):
        parts = urlsplit(req_or_base_url)
        secure, host = parts.scheme in ("https", "wss"), parts.netloc
    else:
        secure, host = _request_origin(getattr(req_or_base_url, "http", req_or_base_url))
    if port:
        host = _with_port(host, port)
    return f"{'wss' if secure else 'ws'}://{host}{path}/?token={quoted}"


def relay_buffers(transport: Any, size: int) -> None:
    """Tune a TCP transport that passes console bytes through (the controller's relay, the agent's tunnel).

    ``size`` bytes are read at once and may wait unsent before the other side is paused (twisted's
    64 KiB made every hop wait for the next one after each chunk: half the throughput), and the
    kernel's send buffer is made 4x that, so a chunk leaves in one or two ``send`` calls, not ten.
    An idle console costs none of it: buffers fill only while bytes flow.
    """
    transport.bufferSize = size
    sock = getattr(transport, "socket", None)
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * size)


def page_url(ws_url: str) -> str:
    """The console page (noVNC) for a ``websockify_url``: same host, ``/console?token=...``."""
    parts = urlsplit(ws_url)
    scheme = "https" if parts.scheme == "wss" else "http"
    return f"{scheme}://{parts.netloc}/console?{parts.query}"
