"""Request bodies that stream into a handler's sink instead of being buffered by twisted.web.

twisted.web reads every request body whole into ``request.content`` (a temporary file above 100 KB,
and a POST ``multipart/form-data`` body is then parsed into memory) before any resource renders.  For
uploads of many gigabytes that is neither acceptable nor necessary: an endpoint registered with
``stream=`` (see :meth:`kvmdesk.api.router.Router.endpoint`) receives its body chunk by chunk, as it
arrives from the network, in a :class:`BodySink` it creates when the request headers are in.

- :class:`StreamingRequest` is the request factory of the API's :class:`~twisted.web.server.Site`
  (:func:`make_site`, or :func:`install_streaming` on a site built elsewhere).  Requests to other
  endpoints are ordinary twisted.web requests, except that a body over the router's ``max_body``
  (for endpoints that parse their body) is refused with a 413 from its declared length, or as soon as
  a chunked body passes it, instead of being buffered to disk first.
- The request is authenticated from its headers (the router's token check, or ``router.stream_guard``)
  before one byte of the body reaches the sink: reading pauses until the check is done.
- A sink may refuse a body at once (too large, wrong type, malformed): the error envelope is sent
  while the client is still sending (through the request's own ``write``, so subclasses add their
  headers), the rest of the body is read and thrown away (up to :data:`DRAIN_LIMIT` bytes, so the
  client sees the answer rather than a reset connection), and the connection is closed.  A refusal
  decided from the headers alone goes out before twisted.web's ``100 Continue``, so such clients never
  send the body at all.
- When the whole body is in, :meth:`BodySink.finish` gives the handler its result (``req.stream``);
  whatever the handler did not keep is released after it (``release()`` on the result).
- A connection lost before the body is complete calls :meth:`BodySink.abort`; the handler never runs.

On a site without the streaming request factory (StubTreq, another application's site) the router
feeds the buffered ``request.content`` through the same sink, so handlers see one interface either way.
"""
from __future__ import annotations

import io
import os
import re
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Optional, Protocol, Union
from urllib.parse import parse_qs

import attrs
import orjson
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import combinedLogFormatter
from twisted.web.server import Request, Site

from kvmdesk.api.channel import ApiChannel
from kvmdesk.core import errors
from kvmdesk.core.errors import ApiError
from kvmdesk.core.store import StoreUnavailable
from kvmdesk.core.threadpools import in_reactor_pool

if TYPE_CHECKING:  # pragma: no cover
    from kvmdesk.api.router import Endpoint, Router

log = Logger(namespace="kvmdesk.api.streaming")

#: Bytes of a refused body read and discarded before the connection is cut.  Enough for a client that
#: only reads the answer once it has written its body (most HTTP libraries) to see it for bodies of a
#: few megabytes; beyond that a reset is the lesser evil.
DRAIN_LIMIT = 64 << 20
#: Chunk size used when a buffered body (non-streaming site) is fed to a sink.
FEED_CHUNK = 1 << 20
#: Bytes read from the socket at a time while a streamed body arrives.
READ_SIZE = 1 << 20


class BodySink(Protocol):
    """Receives one request body.  Created by an endpoint's ``stream`` factory.

    ``write`` runs on the reactor thread for every chunk and must not block for long; it raises
    :class:`~kvmdesk.core.errors.ApiError` to refuse the body at once.
    """

    def write(self, data: bytes) -> None:
        """Take the next chunk of the body."""

    def finish(self) -> Union[Awaitable[Any], Any]:
        """The body is complete: return (or resolve to) what the handler sees as ``req.stream``.

        :raises ApiError: the body as a whole is not acceptable (missing field, bad format...).
        """

    def abort(self, reason: Failure) -> None:
        """The body will never be complete (connection lost, refused): release what was written."""

    # Optional: ``precheck() -> Awaitable[None]``, run while the body arrives; an ApiError refuses it.


@attrs.define
class StreamContext:
    """What a stream factory knows when the headers are in (the body has not been read yet).

    :ivar request: the twisted.web request (headers only: ``getHeader`` works).
    :ivar path: path parameters of the endpoint.
    :ivar args: query parameters (last value of each).
    :ivar length: the declared Content-Length, ``None`` for a chunked body.
    :ivar core: the router's core.
    """

    request: Any
    path: dict[str, str]
    args: dict[str, str]
    length: Optional[int]
    core: Any

    def pause(self) -> None:
        """Stop reading the body from the network (back-pressure for slow sinks)."""
        transport = getattr(getattr(self.request, "channel", None), "transport", None)
        if transport is not None and hasattr(transport, "pauseProducing"):
            transport.pauseProducing()

    def resume(self) -> None:
        """Read the body again after :meth:`pause`."""
        transport = getattr(getattr(self.request, "channel", None), "transport", None)
        if transport is not None and hasattr(transport, "resumeProducing"):
            transport.resumeProducing()


StreamFactory = Callable[[StreamContext], BodySink]


def _language(headers: Any) -> str:
    raw = headers.getRawHeaders(b"accept-language") or [b""]
    return "en" if raw[0].decode("latin-1").strip().lower().startswith("en") else "zh"


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _release(value: Any) -> None:
    release = getattr(value, "release", None)
    if release is not None:
        try:
            release()
        except Exception:
            log.failure("could not release a streamed body")


class BodyStream:
    """The state of one streamed body: its sink, its result, its refusal.

    Order of events: the request is authenticated from its headers; then the endpoint's factory
    validates the headers and creates the sink (no file is
    written yet: a 413 for a declared length goes out at once, before any ``100 Continue``); while the
    request is being authenticated the network is paused and the few bytes already read are held, so
    not one byte of an unauthenticated body reaches the sink; then the body flows into the sink.
    """

    def __init__(self, request: "StreamingRequest", router: "Router", spec: "Endpoint", context: StreamContext):
        self.request = request
        self.router = router
        self.spec = spec
        self.context = context
        self.sink: Optional[BodySink] = None
        self.received = 0
        self.refused: Optional[ApiError] = None
        self.complete = False
        self._checking = False
        self._held: list[bytes] = []
        self._complete_pending = False
        self._drained = 0
        self._result: defer.Deferred = defer.Deferred()
        self._value: Any = None
        self._released = False

    # -- lifecycle, driven by StreamingRequest -------------------------------------------------------

    def start(self) -> None:
        if self.spec.auth or self.router.stream_guard is not None:
            # Authenticate first: an anonymous caller learns nothing about the endpoint (not even its
            # size limit or content types) and none of its bytes reach a sink.
            self._checking = True
            self.context.pause()
            d = defer.ensureDeferred(self.router.authenticate_stream(self.request))
            d.addCallbacks(self._authenticated, self._check_failed)
        else:
            self._open_sink()

    def _open_sink(self) -> bool:
        try:
            self.sink = self.spec.stream(self.context)
        except ApiError as exc:
            self.refuse(exc)
            return False
        except Exception:
            log.failure("stream factory of {path} failed", path=self.spec.path)
            self.refuse(ApiError(errors.INTERNAL_ERROR, request_id="stream"))
            return False
        precheck = getattr(self.sink, "precheck", None)
        if precheck is not None:
            # Checks that need the store (e.g. the target exists) run while the body is arriving.
            defer.maybeDeferred(precheck).addErrback(self._check_failed)
        return True

    def _authenticated(self, _: Any) -> None:
        self._checking = False
        if self.refused is not None:
            return
        if not self._open_sink():
            self._held = []
            self.context.resume()
            return
        self.context.resume()
        held, self._held = self._held, []
        for chunk in held:
            self._deliver(chunk)
        if self._complete_pending:
            self.body_complete()

    def _check_failed(self, failure: Failure) -> None:
        self._checking = False
        if failure.check(ApiError):
            error = failure.value
        elif failure.check(StoreUnavailable):
            error = ApiError(errors.STORE_UNAVAILABLE, reason=str(failure.value))
        else:
            log.failure("checking a streamed request failed", failure)
            error = ApiError(errors.INTERNAL_ERROR, request_id="stream")
        self._held = []
        self.context.resume()
        self.refuse(error)

    def data(self, data: bytes) -> None:
        self.received += len(data)
        if self.refused is not None:
            self._drained += len(data)
            if self._drained > DRAIN_LIMIT:
                transport = getattr(self.request.channel, "transport", None)
                if transport is not None:
                    transport.abortConnection()
            return
        if self._checking:
            self._held.append(data)
            return
        self._deliver(data)

    def _deliver(self, data: bytes) -> None:
        if self.refused is not None or self.sink is None:
            return
        try:
            self.sink.write(data)
        except ApiError as exc:
            self.refuse(exc)
        except Exception:
            log.failure("streamed body of {path}: the sink failed", path=self.spec.path)
            self.refuse(ApiError(errors.INTERNAL_ERROR, request_id="stream"))

    def body_complete(self) -> None:
        """Every byte of the body was received: ask the sink for the handler's value."""
        if self._checking:
            self._complete_pending = True
            return
        if self.refused is not None or self.sink is None:
            return
        self.complete = True
        d = defer.maybeDeferred(self.sink.finish)
        d.addCallback(self._keep)
        d.chainDeferred(self._result)

    def _keep(self, value: Any) -> Any:
        self._value = value
        if self._released:
            _release(value)
        return value

    def lost(self, reason: Failure) -> None:
        if not self.complete and self.refused is None and self.sink is not None:
            self._abort(reason)

    def _abort(self, reason: Failure) -> None:
        sink, self.sink = self.sink, None
        if sink is not None:
            try:
                sink.abort(reason)
            except Exception:
                log.failure("aborting a streamed body failed")

    # -- what the router sees ------------------------------------------------------------------------

    async def result(self) -> Any:
        """The sink's value once the body is complete.

        :raises ApiError: the sink refused the body at the end.
        """
        return await self._result

    def release(self) -> None:
        """Called after the handler: whatever it did not commit is released."""
        self._released = True
        self._result.addErrback(lambda _: None)  # a refusal nobody awaited is not an "unhandled error"
        if self._value is not None:
            _release(self._value)

    # -- refusals --------------------------------------------------------------------------------------

    def refuse(self, error: ApiError) -> None:
        """Answer now with ``error`` and stop storing the body (it is read and discarded)."""
        if self.refused is not None or self.complete:
            return
        self.refused = error
        self._abort(Failure(error))
        if self._complete_pending:
            # The whole body is in and the request is being processed: the handler's answer says it.
            self._result.errback(Failure(error))
            return
        answer_early(self.request, error, finished=self.context.length == 0)

    def refused_body_complete(self) -> None:
        transport = getattr(self.request.channel, "transport", None)
        if transport is not None:
            transport.loseConnection()


def answer_early(request: "StreamingRequest", error: ApiError, *, finished: bool = False) -> None:
    """Send ``error``'s envelope now, while the body may still be arriving, and close the connection.

    The answer goes out through the request's own ``write`` (so subclasses add their headers, e.g.
    the agent's proof), but the request is never finished or processed.  The rest of the body is read
    and thrown away (the connection's write side is closed once the answer is out), so the client
    sees the answer rather than a reset.
    """
    # twisted.web would otherwise answer "100 Continue" right after these headers.
    request.requestHeaders.removeHeader(b"expect")
    channel = request.channel
    transport = getattr(channel, "transport", None)
    if transport is None or request.startedWriting:
        return
    # Before requestReceived twisted.web keeps the request line in the channel only.
    request.method = getattr(channel, "_command", None) or request.method
    request.clientproto = getattr(channel, "_version", None) or b"HTTP/1.1"
    lang = _language(request.requestHeaders)
    body = orjson.dumps({"code": error.error.code, "msg": error.message(lang), "data": error.data})
    request.setResponseCode(error.error.status)
    request.setHeader(b"content-type", b"application/json; charset=utf-8")
    request.setHeader(b"content-length", b"%d" % len(body))
    request.setHeader(b"connection", b"close")
    request.write(body)
    half_close = getattr(transport, "loseWriteConnection", None)
    if finished or half_close is None:
        transport.loseConnection()
    else:
        half_close()
    request.answered_early()


class StreamingRequest(Request):
    """A twisted.web request that streams the bodies of ``stream=`` endpoints into their sinks.

    Other requests are buffered by twisted.web as usual, but no further than the router's
    ``max_body`` (for endpoints that parse their body): a larger declared length is answered 413 at
    once, and a chunked body is cut off with a 413 as soon as it passes the limit.
    """

    body_stream: Optional[BodyStream] = None
    #: twisted.web would parse every POST's Content-Type with the stdlib's email package (a third of
    #: the server's CPU per request in bench/broker_bench.py) to merge form bodies into ``args``; the
    #: API takes JSON bodies and streams its multipart uploads, so no form is ever merged.
    _parsePOSTFormSubmission = False
    _body_limit: Optional[int] = None
    _body_size = 0
    _refused = False

    def gotLength(self, length: Optional[int]) -> None:
        stream = self._match(length)
        if stream is None:
            if self._body_limit is not None and length is not None and length > self._body_limit:
                self._refuse_oversize()
            else:
                super().gotLength(length)
            return
        # Nothing is buffered: ``content`` stays an empty file, and twisted.web's own form parsing
        # finds nothing to parse.
        self.content = io.BytesIO()
        self.body_stream = stream
        transport = getattr(self.channel, "transport", None)
        if transport is not None and getattr(transport, "bufferSize", READ_SIZE) < READ_SIZE:
            # Large bodies: read up to 1 MiB per system call instead of 64 KiB (a quarter of the
            # per-chunk work: parsing, hashing calls, writes).
            transport.bufferSize = READ_SIZE
        stream.start()

    def _refuse_oversize(self) -> None:
        self._refused = True
        self.content = io.BytesIO()
        answer_early(self, ApiError(errors.BODY_TOO_LARGE, limit=self._body_limit),
                     finished=getattr(self.channel, "length", None) == 0)

    def _match(self, length: Optional[int]) -> Optional[BodyStream]:
        channel = self.channel
        command = getattr(channel, "_command", None)
        if length == 0 and command in (b"GET", b"HEAD"):
            # No body and no streamed endpoint: no route to look up (a paged list is such a request).
            return None
        router = getattr(getattr(channel, "site", None), "api_router", None)
        target = getattr(channel, "_path", None)
        if router is None or command is None or target is None:
            return None
        raw_path, _, query = target.partition(b"?")
        matched = router.match(command.decode("latin-1").upper(), raw_path)
        if matched is None or matched[0].stream is None:
            if matched is None or not matched[0].raw_body:
                self._body_limit = getattr(router, "max_body", None)
            return None
        spec, path = matched
        args = {k.decode("utf-8", "replace"): v[-1].decode("utf-8", "replace")
                for k, v in parse_qs(query, keep_blank_values=True).items()}
        context = StreamContext(request=self, path=path, args=args, length=length, core=router.core)
        return BodyStream(self, router, spec, context)

    def handleContentChunk(self, data: bytes) -> None:
        if self.body_stream is not None:
            self.body_stream.data(data)
            return
        self._body_size += len(data)
        if self._refused:
            if self._body_size > DRAIN_LIMIT:
                self.channel.transport.abortConnection()
            return
        if self._body_limit is not None and self._body_size > self._body_limit:
            self._refuse_oversize()
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._refused:
            transport = getattr(self.channel, "transport", None)
            if transport is not None:
                transport.loseConnection()
            return
        stream = self.body_stream
        if stream is not None:
            if stream.refused is not None:
                # The answer is already out; the request is never processed.
                stream.refused_body_complete()
                return
            stream.body_complete()
        super().requestReceived(command, path, version)

    def process(self) -> None:
        # Klein cannot route a request whose path or Host is not UTF-8 (it logs a traceback and
        # answers plain text): such a request is answered here, with the envelope.
        if not (_is_utf8(self.path) and _is_utf8(self.getHeader(b"host") or b"")):
            error = errors.BAD_HTTP_REQUEST
            body = orjson.dumps({"code": error.code, "msg": error.message(_language(self.requestHeaders)), "data": None})
            self.setResponseCode(error.status)
            self.setHeader(b"content-type", b"application/json; charset=utf-8")
            self.setHeader(b"content-length", b"%d" % len(body))
            self.write(body)
            self.finish()
            return
        super().process()

    def answered_early(self) -> None:
        """Called once a refusal was written while the body was still coming (a hook for test doubles)."""

    def connectionLost(self, reason: Failure) -> None:
        if self.body_stream is not None:
            self.body_stream.lost(reason)
        super().connectionLost(reason)


def install_streaming(site: Site, router: "Router") -> Site:
    """Make ``site`` stream the bodies of ``router``'s ``stream=`` endpoints; returns the site."""
    site.requestFactory = StreamingRequest
    site.api_router = router
    return site


class ApiSite(Site):
    """twisted.web's site with an access log file rotated at ``rotate_bytes``, keeping ``keep`` old
    files (``access.log.1`` the newest; twisted's own default keeps every 1 MB file forever), and
    :class:`~kvmdesk.api.channel.ApiChannel` connections (envelopes for malformed requests, deadlines)."""

    protocol = ApiChannel

    def __init__(self, resource: Any, *, rotate_bytes: int = 10_000_000, keep: int = 9,
                 header_timeout: Optional[float] = None, body_timeout: Optional[float] = None, **kwargs: Any):
        super().__init__(resource, **kwargs)
        self.rotate_bytes = rotate_bytes
        self.keep = keep
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout

    def buildProtocol(self, addr: Any) -> Any:
        channel = super().buildProtocol(addr)
        channel.header_timeout = self.header_timeout
        channel.body_timeout = self.body_timeout
        return channel

    def _openLogFile(self, path: str) -> Any:
        from twisted.python.logfile import LogFile

        return LogFile(os.path.basename(path), os.path.dirname(path), rotateLength=self.rotate_bytes,
                       maxRotatedFiles=self.keep)


#: Query parameters whose values never reach the access log (signed download links, tokens).
_SECRET_PARAMS = re.compile(rb"([?&](?:sig|signature|token|access_token|password|passwd)=)[^&#]*", re.IGNORECASE)


def redacted_uri(uri: bytes) -> bytes:
    """``uri`` with the values of secret query parameters replaced by ``-``."""
    return _SECRET_PARAMS.sub(rb"\1-", uri)


def access_log_line(timestamp: str, request: Any) -> str:
    """twisted.web's combined log format, without secrets in the logged URI."""
    uri = request.uri
    request.uri = redacted_uri(uri)
    try:
        return combinedLogFormatter(timestamp, request)
    finally:
        request.uri = uri


#: Timeouts of the API port when the configuration gives none (``[api]`` in defaults.toml).
DEFAULT_TIMEOUTS = {"header_timeout": 20.0, "body_timeout": 60.0, "idle_timeout": 120.0}


def site_timeouts(config: Any) -> dict[str, Optional[float]]:
    """``{header_timeout, body_timeout, idle_timeout}`` from ``[api]`` (0 turns one off)."""
    values = {}
    for key, default in DEFAULT_TIMEOUTS.items():
        value = float(config.get(f"api.{key}", default)) if config is not None else default
        values[key] = value if value > 0 else None
    return values


def make_site(router: "Router", *, reactor: Any = None, access_log: Optional[str] = "-",
              rotate_bytes: int = 10_000_000, keep: int = 9) -> Site:
    """The twisted.web site of an API router (the controller's or an agent's), with streaming bodies.

    :param reactor: time source of the connections' timeouts (and the access log's timestamps).
    :param access_log: file the access log is written to (rotated at ``rotate_bytes``, ``keep`` old
        files kept); ``"-"``: the main log; ``None`` or ``""``: none.

    The request timeouts come from the router's core configuration (:func:`site_timeouts`).
    """
    timeouts = site_timeouts(getattr(getattr(router, "core", None), "config", None))
    kwargs: dict[str, Any] = {"reactor": reactor} if reactor is not None else {}
    kwargs["logFormatter"] = access_log_line
    if access_log and access_log != "-":
        kwargs["logPath"] = access_log
    site = ApiSite(router.resource(), rotate_bytes=rotate_bytes, keep=keep, timeout=timeouts["idle_timeout"],
                   header_timeout=timeouts["header_timeout"], body_timeout=timeouts["body_timeout"], **kwargs)
    site.displayTracebacks = False
    if not access_log:
        site.log = lambda request: None
    return install_streaming(site, router)


async def feed_buffered(request: Any, sink: BodySink, reactor: Any = None) -> Any:
    """Feed a body twisted.web already buffered (``request.content``) through ``sink``.

    The reads run in a thread: the buffer is a temporary file once the body is over 100 KB.
    """
    from twisted.internet import reactor as default_reactor

    reactor = reactor or default_reactor
    content = getattr(request, "content", None)
    try:
        if content is not None:
            content.seek(0)
            while True:
                chunk = await in_reactor_pool(reactor, content.read, FEED_CHUNK)
                if not chunk:
                    break
                sink.write(chunk)
        return await defer.maybeDeferred(sink.finish)
    except BaseException as exc:
        sink.abort(Failure(exc))
        raise
