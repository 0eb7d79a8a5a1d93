"""The API router: one Klein subclass that owns routing, authentication, validation and every error.

Handlers are registered with :meth:`Router.endpoint` (or :meth:`Router.actions` for the contract's
``{"action", "param"}`` endpoints).  They receive an :class:`ApiRequest` whose body is already
validated, and return the envelope's ``data``; anything they raise becomes an error envelope.
"""
from __future__ import annotations

import itertools
import re
import secrets
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Mapping, Optional
from urllib.parse import quote_plus, unquote

import attrs
import orjson
from klein import Klein
from pydantic import BaseModel
from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from werkzeug.exceptions import MethodNotAllowed, NotFound

from kvmdesk.api.models import validate
from kvmdesk.core import errors
from kvmdesk.core.errors import ApiError
from kvmdesk.core.store import StoreUnavailable

if TYPE_CHECKING:  # pragma: no cover
    from kvmdesk.core.app import Core

API_PREFIX = "/api/v1.0"
JSON_TYPE = b"application/json; charset=utf-8"
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")

log = Logger(namespace="kvmdesk.api")

Handler = Callable[["ApiRequest"], Awaitable[Any]]


@attrs.define
class ApiRequest:
    """What a handler sees: the validated body, the path and query parameters, the administrator."""

    http: IRequest
    core: "Core"
    path: dict[str, str]
    args: dict[str, str]
    lang: str
    request_id: str
    body: Any = None
    admin: Optional[dict] = None
    #: Set by handlers to describe the operation in the operation log (overrides the default).
    oplog_detail: Optional[str] = None
    #: The dispatched entry of an action table, once known.
    action: Optional["Action"] = None
    #: What a ``stream=`` endpoint's sink made of the body (e.g. an uploaded file), once complete.
    stream: Any = None
    #: The query string validated into the endpoint's ``query=`` model (``None`` without one).
    query: Any = None
    #: The endpoint being served (the operation log's label and module).
    endpoint: Optional["Endpoint"] = None
    #: The operation-log entry written when a long operation began (:meth:`OperationLog.begin`).
    oplog_uuid: Optional[str] = None
    #: ``scheme://host/path?`` of this request, once :meth:`url_with` needed it (a page links twice).
    _base_url: Optional[str] = attrs.field(default=None, init=False, repr=False)
    #: ``{name: "name=value"}`` of this request's query, quoted once for all the links of a page.
    _quoted_args: Optional[dict[str, str]] = attrs.field(default=None, init=False, repr=False)

    @property
    def client_ip(self) -> str:
        peer = self.http.getClientAddress()
        return getattr(peer, "host", "") or ""

    def url_with(self, **params: Any) -> str:
        """The full URL of this request with some query parameters replaced."""
        base = self._base_url
        if base is None:
            host = (self.http.getHeader(b"host") or b"").decode("latin-1")
            if not host:
                addr = self.http.getHost()
                host = f"{addr.host}:{addr.port}"
            scheme = "https" if self.http.isSecure() else "http"
            base = self._base_url = f"{scheme}://{host}{self.http.path.decode('utf-8', 'replace')}?"
        pairs = self._quoted_args
        if pairs is None:
            pairs = self._quoted_args = {k: f"{_quoted(k)}={_quoted(v)}" for k, v in self.args.items()}
        if params:
            pairs = {**pairs, **{k: f"{_quoted(k)}={_quoted(str(v))}" for k, v in params.items()}}
        return base + "&".join(pairs.values())


@attrs.frozen
class Endpoint:
    """One registered operation; also the source of the OpenAPI document."""

    method: str
    path: str
    handler: Handler
    summary: str
    body: Optional[type[BaseModel]] = None
    query: Optional[type[BaseModel]] = None
    auth: bool = True
    tags: tuple[str, ...] = ()
    oplog: Optional[str] = None
    raw_body: bool = False
    actions: Optional[Mapping[str, "Action"]] = None
    search_fields: Optional[Mapping[str, type]] = None
    paged: bool = False
    #: Streams the body into a sink (see :mod:`kvmdesk.api.streaming`); the handler gets ``req.stream``.
    stream: Optional[Callable[..., Any]] = None
    #: Media types of a success answer that is a file rather than the JSON envelope (OpenAPI says so).
    produces: tuple[str, ...] = ()
    #: The success answer is only the file (never the envelope), e.g. a download path.
    file_only: bool = False

    @property
    def records_operation(self) -> bool:
        return self.method != "GET" and self.oplog != ""


@attrs.frozen
class Action:
    """One entry of an ``action`` dispatch table."""

    handler: Handler
    summary: str
    param: Optional[type[BaseModel]] = None
    oplog: Optional[str] = None


class _ActionBody(BaseModel):
    action: str
    param: Any = None
    model_config = {"extra": "forbid", "strict": True}


_URL_SAFE = re.compile(r"[A-Za-z0-9_.~-]*")


def _quoted(text: str) -> str:
    """``text`` as in a query string (``urlencode``'s quoting; page numbers pass through untouched)."""
    return text if _URL_SAFE.fullmatch(text) else quote_plus(text)


#: Request ids: unique within the process and across restarts (a random prefix), without a call to
#: the kernel's random source per request (uuid4 was 5% of a paged list's CPU).
_REQUEST_IDS = itertools.count(1)
_REQUEST_ID_PREFIX = secrets.token_hex(3)


def _next_request_id() -> str:
    return f"{_REQUEST_ID_PREFIX}{next(_REQUEST_IDS):06x}"


def _language(request: IRequest) -> str:
    header = (request.getHeader(b"accept-language") or b"").decode("latin-1").strip().lower()
    return "en" if header.startswith("en") else "zh"


def _path_pattern(path: str) -> re.Pattern:
    """A regular expression matching ``path`` (``{name}`` placeholders) with or without its trailing slash."""
    parts = _PLACEHOLDER.split(path.rstrip("/"))
    # split() alternates literal text and placeholder names.
    regex = "".join(re.escape(part) if i % 2 == 0 else f"(?P<{part}>[^/]+)" for i, part in enumerate(parts))
    return re.compile(regex + "/?")


def _variants(path: str) -> list[str]:
    """The path with and without its trailing slash, in werkzeug's ``<name>`` syntax."""
    path = _PLACEHOLDER.sub(r"<\1>", path.rstrip("/") or "/")
    return [path] if path == "/" else [path, path + "/"]


class Router(Klein):
    """The Klein application of the controller (and of the agent, which shares the conventions).

    :param core: gives handlers the store, configuration and the authenticator.
    :param prefix: path prefix of every endpoint.
    """

    def __init__(self, core: "Core", prefix: str = API_PREFIX, max_body: int = 1 << 20):
        super().__init__()
        self.core = core
        self.prefix = prefix
        self.max_body = max_body
        self.registry: list[Endpoint] = []
        self.handle_errors(NotFound)(self._not_found)
        self.handle_errors(MethodNotAllowed)(self._not_allowed)
        #: Called after each state-changing request with (request, endpoint, code, msg).
        self.recorders: list[Callable[..., Awaitable[None]]] = []
        #: Every endpoint as (method, compiled full path, endpoint), matched when the headers are in
        #: (before twisted.web reads the body): streamed bodies, early size refusals.
        self.patterns: list[tuple[str, re.Pattern, Endpoint]] = []
        #: Checks a streamed request from its headers before its body is stored (e.g. the agent's
        #: signature check); default: the bearer token of ``core.auth`` for ``auth=True`` endpoints.
        self.stream_guard: Optional[Callable[[IRequest], Awaitable[None]]] = None

    # -- registration -------------------------------------------------------------------------

    def endpoint(
        self,
        method: str,
        path: str,
        *,
        summary: str,
        body: Optional[type[BaseModel]] = None,
        query: Optional[type[BaseModel]] = None,
        auth: bool = True,
        tags: tuple[str, ...] = (),
        oplog: Optional[str] = None,
        raw_body: bool = False,
        search_fields: Optional[Mapping[str, type]] = None,
        paged: bool = False,
        stream: Optional[Callable[..., Any]] = None,
        produces: tuple[str, ...] = (),
        file_only: bool = False,
    ) -> Callable[[Handler], Handler]:
        """Register ``handler`` for ``method path`` (``{name}`` marks path parameters).

        :param summary: one line for the OpenAPI document.
        :param body: request model; the body is validated into it before the handler runs.
        :param query: query-string model: the parameters are validated into it (text converted to the
            fields' types; an unknown parameter is refused) and the handler gets it in ``req.query``;
            documented in OpenAPI as the operation's query parameters.  Not for list endpoints, whose
            query is the generic search (``search_fields``).
        :param auth: require a valid token (every endpoint but login does).
        :param oplog: zh-CN label for the operation log ("" to not record a state change).
        :param raw_body: the handler reads the body itself (uploads); no size check or parsing.
        :param tags: OpenAPI tags (the group the operation is listed under).
        :param search_fields: filterable fields of a list endpoint (documented in OpenAPI).
        :param paged: a list answered with ``page``/``page_size`` but no search fields (documented in OpenAPI).
        :param stream: a factory ``(StreamContext) -> BodySink``: the body is streamed into the sink as
            it arrives, never buffered (uploads); the handler gets what the sink made of it in
            ``req.stream``.  Implies ``raw_body``; ``body`` may then describe the form for OpenAPI.
        :param produces: media types of files the handler may answer with instead of the envelope.
        :param file_only: a success is always one of ``produces`` (errors are still envelopes).
        """

        def register(handler: Handler) -> Handler:
            self._add(Endpoint(method.upper(), path, handler, summary, body, query, auth, tuple(tags), oplog,
                               raw_body or stream is not None, None, search_fields, paged, stream=stream,
                               produces=tuple(produces), file_only=file_only))
            return handler

        return register

    def actions(
        self, path: str, table: Mapping[str, Action], *, tags: tuple[str, ...] = (), summary: str = "", auth: bool = True
    ) -> None:
        """Register a ``POST path`` that dispatches on the body's ``action`` through ``table``.

        :param auth: require a valid token (the agent's router authenticates requests before routing).
        """
        table = dict(table)

        async def dispatch(req: ApiRequest) -> Any:
            action = table.get(req.body.action)
            if action is None:
                raise ApiError(errors.UNKNOWN_ACTION, data={"actions": sorted(table)}, action=req.body.action)
            req.action = action
            param = req.body.param if req.body.param is not None else {}
            req.body = validate(action.param, param, ("param",)) if action.param is not None else param
            return await action.handler(req)

        self._add(Endpoint("POST", path, dispatch, summary or "actions: " + ", ".join(table),
                           _ActionBody, None, auth, tuple(tags), None, False, table))

    def _add(self, spec: Endpoint) -> None:
        self.registry.append(spec)
        self.patterns.append((spec.method, _path_pattern(self.prefix + spec.path), spec))
        for variant in _variants(self.prefix + spec.path):
            view = self._view(spec)
            self.route(variant, methods=[spec.method], endpoint=f"{spec.method} {variant}")(view)

    def _view(self, spec: Endpoint) -> Callable[..., defer.Deferred]:
        def view(request: IRequest, **path: str) -> defer.Deferred:
            return defer.ensureDeferred(self._serve(spec, request, path))

        return view

    def match(self, method: str, path: bytes) -> Optional[tuple[Endpoint, dict[str, str]]]:
        """The endpoint for ``method path`` (raw request path), with its path parameters, or ``None``."""
        text = path.decode("utf-8", "replace")
        for endpoint_method, pattern, spec in self.patterns:
            if endpoint_method == method:
                found = pattern.fullmatch(text)
                if found is not None:
                    return spec, {k: unquote(v) for k, v in found.groupdict().items()}
        return None

    def match_stream(self, method: str, path: bytes) -> Optional[tuple[Endpoint, dict[str, str]]]:
        """The ``stream=`` endpoint for ``method path``, with its path parameters, or ``None``."""
        matched = self.match(method, path)
        return matched if matched is not None and matched[0].stream is not None else None

    async def authenticate_stream(self, request: IRequest) -> None:
        """Check a streamed request before its body is stored.

        :raises ApiError: refused (the answer is sent while the client is still sending).
        """
        if self.stream_guard is not None:
            await self.stream_guard(request)
        else:
            await self.core.auth.authenticate(request.getHeader(b"authorization"))

    async def _streamed_body(self, spec: Endpoint, request: IRequest, req: ApiRequest) -> Any:
        from kvmdesk.api.streaming import StreamContext, feed_buffered

        stream = getattr(request, "body_stream", None)
        if stream is not None:
            return await stream.result()
        # A site without the streaming request factory buffered the body: feed it through the sink.
        declared = request.getHeader(b"content-length")
        context = StreamContext(request=request, path=req.path, args=req.args,
                                length=int(declared) if declared and declared.isdigit() else None, core=self.core)
        req.stream = await feed_buffered(request, spec.stream(context), getattr(self.core, "reactor", None))
        return req.stream

    @staticmethod
    def _release_stream(request: IRequest, req: ApiRequest) -> None:
        """After the handler: whatever it did not commit of a streamed body (a temporary file) goes."""
        stream = getattr(request, "body_stream", None)
        if stream is not None:
            stream.release()
        elif req.stream is not None and hasattr(req.stream, "release"):
            req.stream.release()

    # -- the request pipeline -------------------------------------------------------------------

    async def _serve(self, spec: Endpoint, request: IRequest, path: dict[str, str]) -> Any:
        req = ApiRequest(
            http=request,
            core=self.core,
            path=path,
            args={k.decode("utf-8", "replace"): v[-1].decode("utf-8", "replace") for k, v in request.args.items()},
            lang=_language(request),
            request_id=_next_request_id(),
            endpoint=spec,
        )
        try:
            if spec.auth:
                req.admin = await self.core.auth.authenticate(request.getHeader(b"authorization"))
            if spec.query is not None:
                req.query = validate(spec.query, req.args, strict=False)
            if spec.body is not None and not spec.raw_body:
                req.body = validate(spec.body, self._json_body(request))
            if spec.stream is not None:
                req.stream = await self._streamed_body(spec, request, req)
            result = await spec.handler(req)
            if IResource.providedBy(result) or isinstance(result, bytes):
                await self._record(req, spec, errors.SUCCESS.code, errors.SUCCESS.message(req.lang))
                return result
            envelope = {"code": 0, "msg": errors.SUCCESS.message(req.lang), "data": result}
        except ApiError as exc:
            request.setResponseCode(exc.error.status)
            envelope = {"code": exc.error.code, "msg": exc.message(req.lang), "data": exc.data}
        except StoreUnavailable as exc:
            log.error("request {rid}: store unavailable: {reason}", rid=req.request_id, reason=str(exc))
            request.setResponseCode(errors.STORE_UNAVAILABLE.status)
            envelope = self._error(errors.STORE_UNAVAILABLE, req.lang, reason=str(exc))
        except defer.CancelledError:
            raise
        except Exception:
            log.failure("request {rid} {method} {path} failed", rid=req.request_id, method=spec.method, path=spec.path)
            request.setResponseCode(500)
            envelope = self._error(errors.INTERNAL_ERROR, req.lang, request_id=req.request_id)
        finally:
            if spec.stream is not None:
                self._release_stream(request, req)
        await self._record(req, spec, envelope["code"], envelope["msg"])
        return self.render_json(request, envelope)

    def _json_body(self, request: IRequest) -> Any:
        content_length = request.getHeader(b"content-length")
        declared = int(content_length) if content_length and content_length.isdigit() else 0
        if declared > self.max_body:
            raise ApiError(errors.BODY_TOO_LARGE, limit=self.max_body)
        raw = request.content.read(self.max_body + 1) if request.content is not None else b""
        if len(raw) > self.max_body:
            raise ApiError(errors.BODY_TOO_LARGE, limit=self.max_body)
        if not raw.strip():
            raw = b"{}"
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise ApiError(errors.INVALID_JSON, reason=str(exc).split(":")[0]) from None

    async def _record(self, req: ApiRequest, spec: Endpoint, code: int, msg: str) -> None:
        if not spec.records_operation:
            return
        if spec.auth and req.admin is None:
            return  # unauthenticated attempts are not operations (failed logins are logged by auth)
        for recorder in self.recorders:
            try:
                await recorder(req, spec, code, msg)
            except Exception:
                log.failure("request {rid}: could not write the operation log", rid=req.request_id)

    # -- responses ---------------------------------------------------------------------------------

    @staticmethod
    def _error(error: errors.ErrorCode, lang: str, **params: Any) -> dict:
        return {"code": error.code, "msg": error.message(lang, params), "data": None}

    @staticmethod
    def render_json(request: IRequest, envelope: Any) -> bytes:
        body = orjson.dumps(envelope, option=orjson.OPT_NON_STR_KEYS)
        request.setHeader(b"content-type", JSON_TYPE)
        # A known length spares the chunked framing (and tells the client the size up front).
        request.setHeader(b"content-length", b"%d" % len(body))
        return body

    def _not_found(self, request: IRequest, failure: Any) -> bytes:
        request.setResponseCode(404)
        path = request.path.decode("utf-8", "replace")
        return self.render_json(request, self._error(errors.ROUTE_NOT_FOUND, _language(request), path=path))

    def _not_allowed(self, request: IRequest, failure: Any) -> bytes:
        request.setResponseCode(405)
        allowed = ", ".join(getattr(failure.value, "valid_methods", None) or [])
        if allowed:
            request.setHeader(b"allow", allowed.encode())
        return self.render_json(request, self._error(errors.METHOD_NOT_ALLOWED, _language(request),
                                                    method=request.method.decode("latin-1")))
