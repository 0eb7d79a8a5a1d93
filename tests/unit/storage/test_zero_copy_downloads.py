"""File downloads on a plain TCP connection go out with sendfile from a thread of their own: the whole
file, a resumed range, a persistent connection's next request, and a client that leaves midway."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import pytest_twisted
import treq
from twisted.internet import defer, reactor
from twisted.web.resource import Resource
from twisted.web.server import Site

from kvmdesk.api import downloads
from kvmdesk.api.downloads import FileDownload
from kvmdesk.protocol.ranges import byte_range
from storage_testlib import RawHTTP, request_head, with_timeout

SIZE = 24 << 20


class _Files(Resource):
    isLeaf = True

    def __init__(self, path: Path):
        super().__init__()
        self.path = path

    def render_GET(self, request):
        wanted = byte_range(request.getHeader(b"range"), SIZE)
        return FileDownload(self.path, SIZE, b"application/octet-stream", wanted=wanted,
                            reactor=reactor).render_GET(request)


@pytest.fixture
def served(tmp_path, monkeypatch):
    """``(port, content, outcomes)``: a site sending one file; each ``send_file`` run's outcome, in order."""
    path = tmp_path / "image"
    content = os.urandom(1 << 20) * (SIZE >> 20)
    path.write_bytes(content)
    outcomes: list[defer.Deferred] = []
    real = downloads.send_file

    def spy(sock, source, offset, count, stop):
        outcome: defer.Deferred = defer.Deferred()
        reactor.callFromThread(outcomes.append, outcome)
        try:
            sent = real(sock, source, offset, count, stop)
        except BaseException as exc:
            reactor.callFromThread(outcome.callback, exc)
            raise
        reactor.callFromThread(outcome.callback, sent)
        return sent

    monkeypatch.setattr(downloads, "send_file", spy)
    port = reactor.listenTCP(0, Site(_Files(path)), interface="127.0.0.1")
    yield port.getHost().port, content, outcomes
    port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_file_and_a_range_go_out_whole_with_sendfile(served):
    port, content, outcomes = served
    response = await treq.get(f"http://127.0.0.1:{port}/f")
    assert response.code == 200 and await treq.content(response) == content
    offset = SIZE - 3_000_001
    response = await treq.get(f"http://127.0.0.1:{port}/f", headers={"Range": f"bytes={offset}-"})
    assert response.code == 206 and await treq.content(response) == content[offset:]
    assert [await o for o in outcomes] == [SIZE, SIZE - offset]


@pytest_twisted.ensureDeferred
async def test_a_persistent_connection_serves_its_next_request_after_a_sendfile_body(served):
    port, content, outcomes = served
    client = await RawHTTP().connect("127.0.0.1", port)
    client.send(request_head("GET", "/f", {"Range": f"bytes={SIZE - 10}-"}))
    client.send(request_head("GET", "/f", {"Range": f"bytes={SIZE - 20}-", "Connection": "close"}))
    raw = await with_timeout(client.closed, what="two answers")
    first, _, rest = raw.partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 206") and rest[:10] == content[-10:]
    second, _, body = rest[10:].partition(b"\r\n\r\n")
    assert second.startswith(b"HTTP/1.1 206") and body == content[-20:]
    assert [await o for o in outcomes] == [10, 20]


@pytest_twisted.ensureDeferred
async def test_a_client_that_leaves_midway_ends_the_sending_thread(served):
    port, _, outcomes = served
    client = await RawHTTP().connect("127.0.0.1", port)
    client.protocol.transport.pauseProducing()  # reads nothing: the server's socket fills up
    client.send(request_head("GET", "/f", {}))
    while not outcomes:  # the thread has started sending
        await with_timeout(_turn(), what="a reactor turn")
    client.abort()
    outcome = await with_timeout(outcomes[0], what="the sending thread's end")
    assert isinstance(outcome, OSError) or outcome < SIZE, outcome  # cut short: broken pipe, or told to stop
    # the site goes on serving
    response = await treq.get(f"http://127.0.0.1:{port}/f", headers={"Range": "bytes=0-99"})
    assert response.code == 206 and len(await treq.content(response)) == 100


def _turn() -> defer.Deferred:
    d: defer.Deferred = defer.Deferred()
    reactor.callLater(0, d.callback, None)
    return d
