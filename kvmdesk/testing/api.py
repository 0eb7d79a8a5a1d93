"""Test helpers for plugin authors: a real core on a temporary SQLite store, driven through StubTreq.

Usage (pytest-twisted)::

    @pytest_twisted.ensureDeferred
    async def test_something(tmp_path):
        async with api_client(tmp_path) as api:
            status, body = await api.call("GET", "/resource_mgr/resource_pools")
"""
from __future__ import annotations

import contextlib
import uuid as uuidlib
from pathlib import Path
from typing import Any, AsyncIterator, Mapping, Optional

import orjson
import pluggy
from treq.testing import StubTreq
from twisted.internet import defer
from twisted.web.resource import IResource, Resource

from kvmdesk.api.app import make_router
from kvmdesk.api.router import API_PREFIX
from kvmdesk.api.streaming import StreamingRequest, install_streaming, make_site
from kvmdesk.core.app import Core, build_core
from kvmdesk.core.config import Config

ADMIN_PASSWORD = "test-admin-password"


class _FlushOnFinish(Resource):
    """Wraps the router's resource so StubTreq delivers a response as soon as the handler finishes.

    StubTreq moves bytes only when flushed; our handlers finish later (store calls run in threads),
    so each finished request schedules the flush itself: no polling, no sleeping.
    """

    isLeaf = True

    def __init__(self, inner: IResource, reactor: Any):
        super().__init__()
        self.inner = inner
        self.reactor = reactor
        self.stub: Optional[StubTreq] = None

    def render(self, request: Any) -> Any:
        request.notifyFinish().addBoth(lambda _: self.reactor.callLater(0, self.stub.flush))
        return self.inner.render(request)


def multipart_body(
    fields: Mapping[str, str] = {}, files: Mapping[str, tuple[str, bytes]] = {}, boundary: Optional[str] = None
) -> tuple[bytes, str]:
    """A ``multipart/form-data`` body: ``(body, content_type)``; ``files`` maps a field to (file name, bytes)."""
    boundary = boundary or "kvmdesk-" + uuidlib.uuid4().hex
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode() + value.encode() + b"\r\n")
    for name, (filename, content) in files.items():
        head = (f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n")
        parts.append(head.encode() + content + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


class ApiClient:
    """Calls the API of ``core`` in memory and decodes the envelope.

    The in-memory site streams upload bodies like the real one (:mod:`kvmdesk.api.streaming`); StubTreq
    hands each body over in one piece, so chunking and cut-off cases need a real port (:func:`listening_api`).
    """

    def __init__(self, core: Core):
        self.core = core
        wrapper = _FlushOnFinish(core.router.resource(), core.reactor)
        self.stub = StubTreq(wrapper)
        wrapper.stub = self.stub
        self.token: Optional[str] = None
        stub, reactor = self.stub, core.reactor

        class _StubStreamingRequest(StreamingRequest):
            def answered_early(self) -> None:
                # A refusal written outside any render: nothing else would flush it to the client.
                reactor.callLater(0, stub.flush)

        # treq.testing keeps its in-memory Site private; this is the one place that reaches for it.
        site = self.stub._agent._serverFactory
        install_streaming(site, core.router)
        site.requestFactory = _StubStreamingRequest

    async def login(self, username: str = "admin", password: str = ADMIN_PASSWORD) -> str:
        status, body = await self.call("POST", "/auth/login", {"username": username, "password": password}, auth=False)
        assert status == 200, body
        self.token = body["data"]["token"]
        return self.token

    async def call(
        self,
        method: str,
        path: str,
        json: Any = None,
        *,
        auth: bool = True,
        headers: Optional[dict[str, str]] = None,
        data: Optional[bytes] = None,
        params: Optional[dict[str, Any]] = None,
    ) -> tuple[int, Any]:
        """Send a request to ``/api/v1.0<path>``; returns ``(status, decoded JSON body)``."""
        sent_headers = {"Host": "kvmdesk.test"}
        sent_headers.update(headers or {})
        if auth and self.token:
            sent_headers["Authorization"] = f"Bearer {self.token}"
        if json is not None:
            data = orjson.dumps(json)
            sent_headers.setdefault("Content-Type", "application/json")
        response = await self.stub.request(
            method, "http://kvmdesk.test" + API_PREFIX + path, data=data, headers=sent_headers, params=params
        )
        content = await response.content()
        try:
            return response.code, orjson.loads(content)
        except orjson.JSONDecodeError:
            return response.code, content

    async def upload(
        self,
        path: str,
        fields: Mapping[str, str] = {},
        files: Mapping[str, tuple[str, bytes]] = {},
        *,
        method: str = "POST",
        headers: Optional[dict[str, str]] = None,
    ) -> tuple[int, Any]:
        """Send a ``multipart/form-data`` form (small files only: StubTreq holds bodies in memory)."""
        body, content_type = multipart_body(fields, files)
        return await self.call(method, path, data=body, headers={"Content-Type": content_type, **(headers or {})})

    async def raw(self, method: str, path: str, **kwargs: Any) -> Any:
        """The treq response itself (headers, streamed bodies)."""
        headers = {"Host": "kvmdesk.test", **kwargs.pop("headers", {})}
        if self.token:
            headers.setdefault("Authorization", f"Bearer {self.token}")
        return await self.stub.request(method, "http://kvmdesk.test" + API_PREFIX + path, headers=headers, **kwargs)


async def make_core(
    tmp_path: Path,
    *,
    config: Optional[dict[str, Any]] = None,
    plugins: Optional[pluggy.PluginManager] = None,
    clock: Any = None,
) -> Core:
    """A real core on a fresh SQLite store under ``tmp_path`` (``admin`` / :data:`ADMIN_PASSWORD`).

    :param plugins: a plugin manager with the plugins to run (:func:`kvmdesk.testing.plugins.plugin_manager`);
        default: every installed plugin, as in production.
    """
    from twisted.internet import reactor

    # Through the configuration, not the process environment: tests stay independent of each other.
    layers = [{"controller": {"data_dir": str(tmp_path / "data")}, "auth": {"first_admin_password": ADMIN_PASSWORD}}]
    if config:
        layers.append(config)
    return await build_core(Config(layers), reactor, plugins=plugins, clock=clock, make_router=make_router)


@contextlib.asynccontextmanager
async def running_jobs(core: Core) -> AsyncIterator[Core]:
    """Run the core's job service and scheduler (test cores do not start their services); stopped after."""
    core.jobs.startService()
    core.scheduler.startService()
    try:
        yield core
    finally:
        await core.scheduler.stopService()
        await core.jobs.stopService()


@contextlib.asynccontextmanager
async def listening_api(core: Core, interface: str = "127.0.0.1") -> AsyncIterator[str]:
    """Serve ``core``'s API on a real loopback port (the production site); yields ``http://host:port/api/v1.0``."""
    port = core.reactor.listenTCP(0, make_site(core.router), interface=interface)
    try:
        yield f"http://{interface}:{port.getHost().port}{API_PREFIX}"
    finally:
        await port.stopListening()


@contextlib.asynccontextmanager
async def api_client(tmp_path: Path, *, login: bool = True, **kwargs: Any) -> AsyncIterator[ApiClient]:
    """A logged-in :class:`ApiClient` on a fresh core; closes the store afterwards."""
    core = await make_core(tmp_path, **kwargs)
    try:
        client = ApiClient(core)
        if login:
            await client.login()
        yield client
    finally:
        if core.services.running:
            await defer.maybeDeferred(core.services.stopService)
        await core.store.close()
