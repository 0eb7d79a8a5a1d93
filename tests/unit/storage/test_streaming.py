"""The API site's request factory: bodies of stream endpoints arrive chunk by chunk; other bodies are
never buffered past the router's limit; ordinary requests behave as before."""
from __future__ import annotations

from types import SimpleNamespace

import pytest_twisted
from twisted.internet import defer, reactor

from kvmdesk.api.router import ApiRequest, Router
from kvmdesk.api.streaming import make_site
from kvmdesk.core import errors as core_errors
from kvmdesk.core.errors import ApiError
from kvmdesk.testing.api import listening_api
from storage_testlib import RawHTTP, controller, decode, http_client, parse_response, request_head, with_timeout

MiB = 1 << 20


class RecordingSink:
    """Remembers the size of each chunk it was given; refuses a body containing b"STOP"."""

    def __init__(self, context):
        self.context = context
        self.chunks: list[int] = []
        self.first_mib: defer.Deferred = defer.Deferred()

    def write(self, data: bytes) -> None:
        if b"STOP" in data:
            raise ApiError(core_errors.INVALID_PARAM, field="body", reason="STOP")
        self.chunks.append(len(data))
        if sum(self.chunks) >= MiB and not self.first_mib.called:
            self.first_mib.callback(None)

    def finish(self):
        return {"chunks": self.chunks, "args": self.context.args, "path": self.context.path}

    def abort(self, reason) -> None:
        self.chunks.append(-1)


class Sinks(list):
    """The sinks created so far; ``created`` fires with the first."""

    def __init__(self):
        super().__init__()
        self.created: defer.Deferred = defer.Deferred()


def small_router() -> tuple[Router, Sinks]:
    router = Router(SimpleNamespace(reactor=reactor), prefix="/x", max_body=1000)
    sinks = Sinks()

    def factory(context):
        sinks.append(RecordingSink(context))
        if not sinks.created.called:
            sinks.created.callback(sinks[-1])
        return sinks[-1]

    @router.endpoint("PUT", "/blobs/{name}", summary="stream", auth=False, stream=factory)
    async def put_blob(req: ApiRequest) -> dict:
        return req.stream

    @router.endpoint("POST", "/json", summary="json", auth=False, body=None)
    async def post_json(req: ApiRequest) -> dict:
        return {"length": len(req.http.content.read())}

    return router, sinks


@pytest_twisted.ensureDeferred
async def test_a_stream_endpoint_sees_the_body_as_it_arrives():
    router, sinks = small_router()
    port = reactor.listenTCP(0, make_site(router), interface="127.0.0.1")
    try:
        client = await RawHTTP().connect("127.0.0.1", port.getHost().port)
        client.send(request_head("PUT", "/x/blobs/a%20b?k=v", {"Content-Length": str(3 * MiB), "Connection": "close"}))
        client.send(b"a" * MiB)
        # The first megabyte reaches the sink before the rest is even sent.
        sink = await with_timeout(sinks.created, what="the sink")
        await with_timeout(sink.first_mib, what="the first MiB in the sink")
        assert sum(sinks[0].chunks) == MiB
        client.send(b"b" * 2 * MiB)
        status, _, body = parse_response(await with_timeout(client.closed, what="answer"))
        assert status == 200
        assert sum(body["data"]["chunks"]) == 3 * MiB and len(body["data"]["chunks"]) > 1
        assert body["data"]["args"] == {"k": "v"} and body["data"]["path"] == {"name": "a b"}
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_sink_refusal_answers_while_the_client_is_still_sending():
    router, sinks = small_router()
    port = reactor.listenTCP(0, make_site(router), interface="127.0.0.1")
    try:
        client = await RawHTTP().connect("127.0.0.1", port.getHost().port)
        client.send(request_head("PUT", "/x/blobs/a", {"Content-Length": str(10 * MiB)}) + b"x" * 1000 + b"STOP")
        status, headers, body = parse_response(await with_timeout(client.first_bytes, what="refusal"))
        assert status == 400 and body["code"] == 1002 and headers["connection"] == "close"
        client.send(b"y" * MiB)  # still accepted (and thrown away): no reset
        client.abort()
        await with_timeout(client.closed, what="close")
        assert sinks[0].chunks[-1] == -1, "the refused body's sink was not aborted"
        assert sum(c for c in sinks[0].chunks if c > 0) <= 1000
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_json_bodies_are_refused_before_twisted_buffers_them():
    router, _ = small_router()
    port = reactor.listenTCP(0, make_site(router), interface="127.0.0.1")
    try:
        client = await RawHTTP().connect("127.0.0.1", port.getHost().port)
        client.send(request_head("POST", "/x/json", {"Content-Length": str(50 * MiB), "Content-Type": "application/json"}))
        status, _, body = parse_response(await with_timeout(client.closed, what="413"))
        assert status == 413 and body["code"] == 1005

        client = await RawHTTP().connect("127.0.0.1", port.getHost().port)
        client.send(request_head("POST", "/x/json", {"Transfer-Encoding": "chunked", "Content-Type": "application/json"}))
        client.send(b"400\r\n" + b" " * 0x400 + b"\r\n")  # 1024 bytes > 1000, and more would follow
        status, _, body = parse_response(await with_timeout(client.first_bytes, what="413"))
        assert status == 413 and body["code"] == 1005
        client.abort()

        response = await http_client().post(f"http://127.0.0.1:{port.getHost().port}/x/json", data=b"{}" + b" " * 500)
        status, body = await decode(response)
        assert status == 200 and body["data"] == {"length": 502}
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_ordinary_api_calls_work_on_the_streaming_site(tmp_path, clock):
    async with controller(tmp_path, clock) as api:
        async with listening_api(api.core) as base_url:
            response = await http_client().post(f"{base_url}/auth/login",
                                                json={"username": "admin", "password": "test-admin-password"})
            status, body = await decode(response)
            assert status == 200 and body["data"]["token"]
            response = await http_client().get(f"{base_url}/no/such/path")
            assert response.code == 404 and (await response.json())["code"] == 1006
