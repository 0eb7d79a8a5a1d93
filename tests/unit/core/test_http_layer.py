"""Issue 14 defects 3 and 7: whatever bytes a client sends, the API port answers with the JSON envelope
(catalogue code), logs no traceback, and drops clients that are too slow.

Raw sockets against a real listening port (twisted.web's own parsing is what is under test); the
timeouts are driven by an injected clock where twisted.web allows it (``Site(reactor=clock)``).
"""
from __future__ import annotations

import socket

import orjson
import pytest_twisted
from twisted.internet import threads
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.internet.testing import StringTransport

from kvmdesk.api.streaming import make_site
from kvmdesk.core import errors
from kvmdesk.testing.api import listening_api

BAD_REQUESTS = {
    "multipart without boundary (login)": (
        b"POST /api/v1.0/auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data\r\n"
        b"Content-Length: 4\r\n\r\nabcd"),
    "multipart without boundary (pools)": (
        b"POST /api/v1.0/resource_mgr/resource_pools HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: multipart/form-data; charset=utf-8\r\nContent-Length: 4\r\n\r\nabcd"),
    "malformed content-length": (
        b"POST /api/v1.0/auth/login HTTP/1.1\r\nHost: x\r\nContent-Length: 12abc\r\n\r\n{}"),
    "negative content-length": (
        b"POST /api/v1.0/auth/login HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n{}"),
    "content-length with chunked": (
        b"POST /api/v1.0/auth/login HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"),
    "non-UTF-8 path": b"GET /api/v1.0/resource_mgr/\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n",
    "non-UTF-8 path parameter": b"GET /api/v1.0/resource_mgr/resource_pools/\xc3\x28 HTTP/1.1\r\nHost: x\r\n\r\n",
    "non-UTF-8 query": b"GET /api/v1.0/resource_mgr/resource_pools?name=\xff HTTP/1.1\r\nHost: x\r\n\r\n",
    "non-UTF-8 host": b"GET /api/v1.0/resource_mgr/resource_pools HTTP/1.1\r\nHost: \xff\xfe\r\n\r\n",
    "non-UTF-8 host, login": (
        b"POST /api/v1.0/auth/login HTTP/1.1\r\nHost: \xc3\x28\r\nContent-Length: 2\r\n\r\n{}"),
    "garbage request line": b"\x00\x01\x02 nonsense\r\n\r\n",
    "header without colon": b"GET /api/v1.0/openapi.json HTTP/1.1\r\nHost: x\r\nnot a header\r\n\r\n",
}


def exchange(port: int, raw: bytes) -> bytes:
    """Send ``raw`` and read one whole answer (in a thread: blocking sockets).

    The socket is not half-closed: twisted.web drops an answer still in its buffers when the peer's
    end of stream arrives first.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(raw)
        return read_answer(sock)


def read_answer(sock: socket.socket) -> bytes:
    """One HTTP answer: up to the end of its headers plus ``Content-Length`` bytes, or to the close."""
    answer = b""
    while True:
        head, found, body = answer.partition(b"\r\n\r\n")
        if found:
            lengths = [line.split(b":", 1)[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")]
            if lengths and len(body) >= int(lengths[0]):
                return answer
        data = sock.recv(65536)
        if not data:
            return answer
        answer += data


def envelope_of(answer: bytes) -> tuple[int, dict]:
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    assert b"application/json" in head.lower(), answer
    envelope = orjson.loads(body)
    assert set(envelope) == {"code", "msg", "data"} and envelope["code"] != 0, envelope
    return status, envelope


@pytest_twisted.ensureDeferred
async def test_every_malformed_request_gets_an_envelope_and_no_traceback(api):
    events: list = []
    globalLogPublisher.addObserver(events.append)
    try:
        async with listening_api(api.core) as base:
            port = int(base.split(":")[2].split("/")[0])
            answers = {}
            for name, raw in BAD_REQUESTS.items():
                answers[name] = await threads.deferToThread(exchange, port, raw)
    finally:
        globalLogPublisher.removeObserver(events.append)
    wrong = {}
    for name, answer in answers.items():
        try:
            status, envelope = envelope_of(answer)
            assert 400 <= status < 500, (status, envelope)
        except Exception:
            wrong[name] = answer[:160]
    assert wrong == {}
    failures = [e for e in events if e.get("log_failure") is not None or e.get("isError")]
    assert failures == [], [str(e.get("log_failure")) for e in failures]


def connect(site):
    """A channel of ``site`` on an in-memory transport (the site's reactor is a Clock)."""
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    return channel, transport


def answered(transport) -> tuple[int, dict]:
    status, envelope = envelope_of(transport.value())
    assert transport.disconnecting
    return status, envelope


def test_slow_headers_are_cut_off_even_when_bytes_keep_coming(api):
    clock = Clock()
    site = make_site(api.core.router, reactor=clock)
    channel, transport = connect(site)
    for _ in range(19):  # a byte a second: the idle timeout never fires, the header deadline does
        channel.dataReceived(b"G")
        clock.advance(1)
    assert not transport.disconnecting and transport.value() == b""
    clock.advance(1)
    status, envelope = answered(transport)
    assert status == 408 and envelope["code"] == errors.REQUEST_TIMEOUT.code
    channel.connectionLost(None)
    assert clock.getDelayedCalls() == []


def test_a_slow_json_body_is_cut_off_and_a_quiet_connection_closed(api):
    clock = Clock()
    site = make_site(api.core.router, reactor=clock)
    channel, transport = connect(site)
    channel.dataReceived(b"POST /api/v1.0/auth/login HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
    for _ in range(59):
        clock.advance(1)
        channel.dataReceived(b" ")
    assert not transport.disconnecting
    clock.advance(1)
    status, envelope = answered(transport)
    assert status == 408 and envelope["code"] == errors.REQUEST_TIMEOUT.code and "body" in envelope["msg"]
    channel.connectionLost(None)

    quiet, transport = connect(site)
    clock.advance(119)
    assert not transport.disconnecting
    clock.advance(1)
    assert transport.disconnecting and transport.value() == b""
    quiet.connectionLost(None)
    assert clock.getDelayedCalls() == []


def test_a_request_in_time_is_served_and_the_deadline_starts_again(api):
    clock = Clock()
    site = make_site(api.core.router, reactor=clock)
    channel, transport = connect(site)
    channel.dataReceived(b"GET /api/v1.0/nope HTTP/1.1\r\nHost: x\r\n\r\n")
    status, envelope = envelope_of(transport.value())
    assert status == 404 and not transport.disconnecting
    transport.clear()
    clock.advance(100)  # idle between requests: no header deadline runs yet
    channel.dataReceived(b"GET /api/v1.0/nope HTTP/1.1\r\n")
    clock.advance(20)
    status, envelope = answered(transport)
    assert status == 408
    channel.connectionLost(None)
    assert clock.getDelayedCalls() == []


def test_timeouts_come_from_the_configuration():
    from kvmdesk.api.streaming import site_timeouts
    from kvmdesk.core.config import Config

    assert site_timeouts(Config([{"api": {"header_timeout": 5, "body_timeout": 0, "idle_timeout": 30}}])) == \
        {"header_timeout": 5.0, "body_timeout": None, "idle_timeout": 30.0}


@pytest_twisted.ensureDeferred
async def test_hundreds_of_slow_sockets_are_dropped_and_the_api_keeps_answering(tmp_path):
    from twisted.internet.task import Clock as CoreClock

    from core_testlib import running_api

    async with running_api(tmp_path, CoreClock(), login=False, config={"api": {"header_timeout": 0.5}}) as api:
        async with listening_api(api.core) as base:
            port = int(base.split(":")[2].split("/")[0])

            def slow_clients() -> list[bytes]:
                sockets = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(300)]
                for sock in sockets:
                    sock.sendall(b"GET /api/v1.0/openapi.json HTTP/1.1\r\nHo")
                with socket.create_connection(("127.0.0.1", port), timeout=10) as fresh:
                    fresh.sendall(b"GET /api/v1.0/nope HTTP/1.1\r\nHost: x\r\n\r\n")
                    normal = read_answer(fresh)
                answers = [read_answer(sock) for sock in sockets]  # returns once the server closes
                for sock in sockets:
                    sock.close()
                return [normal, *answers]

            normal, *answers = await threads.deferToThread(slow_clients)
    assert envelope_of(normal)[0] == 404
    assert len(answers) == 300
    assert all(envelope_of(answer)[1]["code"] == errors.REQUEST_TIMEOUT.code for answer in answers)
