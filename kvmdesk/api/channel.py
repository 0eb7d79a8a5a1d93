"""The HTTP connection of the API port: envelopes for malformed requests, and timeouts for slow clients.

twisted.web answers a request it cannot parse (bad ``Content-Length``, ``Content-Length`` with chunked
encoding, a header without a colon, ``multipart/form-data`` without a boundary...) with a bare
``400 Bad Request`` and no body; here it is the API's JSON envelope (:data:`~kvmdesk.core.errors.BAD_HTTP_REQUEST`).

twisted.web's only timeout is an idle one that every received byte resets, so a client sending a byte
now and then holds its connection (and a request slot) forever.  :class:`ApiChannel` adds deadlines:

- ``header_timeout``: from the first byte of a request to the end of its headers;
- ``body_timeout``: from the end of the headers to the end of a buffered (JSON) body; streamed
  uploads have no total deadline (gigabytes take their time) and are left to the idle timeout;
- the idle timeout (twisted.web's ``timeOut``, set from the site) still closes quiet connections.

A request that misses a deadline is answered 408 (:data:`~kvmdesk.core.errors.REQUEST_TIMEOUT`) and the
connection is closed (aborted if the client does not read).
"""
from __future__ import annotations

from typing import Any, Optional

import orjson
from twisted.logger import Logger
from twisted.web.http import HTTPChannel

from kvmdesk.core import errors
from kvmdesk.core.errors import ErrorCode

log = Logger(namespace="kvmdesk.api.channel")


def _language(channel: HTTPChannel) -> str:
    request = channel.requests[-1] if channel.requests else None
    raw = request.requestHeaders.getRawHeaders(b"accept-language") if request is not None else None
    return "en" if raw and raw[0].decode("latin-1").strip().lower().startswith("en") else "zh"


def envelope_response(error: ErrorCode, lang: str, **params: Any) -> bytes:
    """A complete HTTP/1.1 response carrying ``error``'s envelope, closing the connection."""
    body = orjson.dumps({"code": error.code, "msg": error.message(lang, params), "data": None})
    head = (b"HTTP/1.1 %d %s\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n") % (error.status, _REASONS.get(error.status, b"Error"), len(body))
    return head + body


_REASONS = {400: b"Bad Request", 408: b"Request Timeout"}


class ApiChannel(HTTPChannel):
    """twisted.web's HTTP/1.1 channel with envelope answers and request deadlines (see the module)."""

    #: Seconds from a request's first byte to the end of its headers (``None``: no deadline).
    header_timeout: Optional[float] = None
    #: Seconds from the end of the headers to the end of a buffered body (``None``: no deadline).
    body_timeout: Optional[float] = None
    _deadline: Any = None
    _awaiting_request = True

    def dataReceived(self, data: bytes) -> None:
        if self._awaiting_request and self._deadline is None and self.header_timeout:
            self._deadline = self.callLater(self.header_timeout, self._too_slow, "headers", self.header_timeout)
        super().dataReceived(data)

    def allHeadersReceived(self) -> None:
        self._awaiting_request = False
        self._cancel_deadline()
        super().allHeadersReceived()
        request = self.requests[-1] if self.requests else None
        bounded = getattr(request, "_body_limit", None) is not None and getattr(request, "body_stream", None) is None
        if self.body_timeout and self.length != 0 and bounded and self.transport is not None:
            self._deadline = self.callLater(self.body_timeout, self._too_slow, "body", self.body_timeout)

    def allContentReceived(self) -> None:
        self._cancel_deadline()
        super().allContentReceived()

    def requestDone(self, request: Any) -> None:
        super().requestDone(request)
        self._awaiting_request = True

    def connectionLost(self, reason: Any) -> None:
        self._cancel_deadline()
        super().connectionLost(reason)

    def _cancel_deadline(self) -> None:
        deadline, self._deadline = self._deadline, None
        if deadline is not None and deadline.active():
            deadline.cancel()

    def _too_slow(self, what: str, seconds: float) -> None:
        self._deadline = None
        request = self.requests[-1] if self.requests else None
        log.info("closing a connection from {peer}: its request {what} did not arrive within {seconds:g} s",
                 peer=str(self.transport.getPeer()), what=what, seconds=seconds)
        if request is None or not request.startedWriting:
            self.transport.write(envelope_response(errors.REQUEST_TIMEOUT, _language(self), what=what,
                                                   seconds=f"{seconds:g}"))
        # Closes, and aborts after ``abortTimeout`` if the client does not read the answer.
        self.timeoutConnection()

    def _respondToBadRequestAndDisconnect(self) -> None:
        request = self.requests[-1] if self.requests else None
        if request is None or not request.startedWriting:
            self.transport.write(envelope_response(errors.BAD_HTTP_REQUEST, _language(self)))
        self.loseConnection()
