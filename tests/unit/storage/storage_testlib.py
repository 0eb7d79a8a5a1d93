"""Helpers of the storage tests: a controller core, in-process agents on loopback addresses, events.

Imported by name (conftest.py puts this directory on sys.path).  Nothing here sleeps: waits are on
events (distributor observers, Deferreds) bounded by a real-time timeout that only fails the test.
"""
from __future__ import annotations

import contextlib
import hashlib
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any, AsyncIterator, Callable, Iterable, Mapping, Optional

import orjson
import treq
from treq.client import HTTPClient
from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.server import Site

from kvmdesk import hookimpl
from kvmdesk.agent.images.routes import register_routes as register_agent_routes
from kvmdesk.api.router import Router
from kvmdesk.api.streaming import install_streaming
from kvmdesk.core.records import new_record
from kvmdesk.plugins.storage.producers import FileRangeProducer
from kvmdesk.testing.api import ApiClient, make_core
from kvmdesk.testing.plugins import plugin_manager as chosen_plugins

#: Real-time bound on any wait; reaching it fails the test (it is never slept).
TIMEOUT = 60.0
POOL_NAME = "pool-a"


class UsagePlugin:
    """Stands in for the templates plugin: answers ``kvmdesk_usage`` from a table the test fills."""

    def __init__(self) -> None:
        self.in_use: dict[tuple[str, str], str] = {}

    @hookimpl
    def kvmdesk_usage(self, core: Any, kind: str, uuid: str) -> Optional[str]:
        return self.in_use.get((kind, uuid))


def plugin_manager(usage: UsagePlugin) -> Any:
    """admin + storage + the usage stand-in (the nodes plugin is left out: nodes are inserted by hand)."""
    return chosen_plugins((usage, "usage"), only=["admin", "storage"])


def with_timeout(d: defer.Deferred, seconds: float = TIMEOUT, what: str = "event") -> defer.Deferred:
    """``d``, failed with ``TimeoutError`` if it has not fired within ``seconds`` of real time."""
    timer = reactor.callLater(seconds, lambda: d.called or d.errback(TimeoutError(f"no {what} within {seconds} s")))

    def done(result: Any) -> Any:
        if timer.active():
            timer.cancel()
        return result

    return d.addBoth(done)


def wait_for(distributor: Any, predicate: Callable[[str, Mapping], bool], what: str = "transfer event") -> defer.Deferred:
    """The first distributor event ``(name, record)`` matching ``predicate``; resolves to the record."""
    d: defer.Deferred = defer.Deferred()

    def observer(event: str, record: Mapping) -> None:
        if not d.called and predicate(event, record):
            d.callback(dict(record))

    distributor.observers.append(observer)
    d.addBoth(lambda r: (distributor.observers.remove(observer), r)[1])
    return with_timeout(d, what=what)


def wait_all(distributor: Any, event: str, node_uuids: Iterable[str], image_uuid: Optional[str] = None) -> defer.Deferred:
    """All of ``node_uuids`` reached ``event`` for ``image_uuid`` (any image: ``None``, for a wait that
    must be in place before the upload that names the image)."""
    remaining = set(node_uuids)
    d: defer.Deferred = defer.Deferred()

    def observer(name: str, record: Mapping) -> None:
        if name == event and image_uuid in (None, record["image_uuid"]):
            remaining.discard(record["node_uuid"])
            if not remaining and not d.called:
                d.callback(None)

    distributor.observers.append(observer)
    d.addBoth(lambda r: (distributor.observers.remove(observer), r)[1])
    return with_timeout(d, what=f"{event} on every node")


def md5_of(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def make_qcow2(path: Path, data_mb: int, virtual: str = "1G") -> Path:
    """A qcow2 image holding ``data_mb`` MiB of non-zero, non-repeating data (quick to generate)."""
    raw = path.with_suffix(".raw")
    with open(raw, "wb") as handle:
        for i in range(data_mb):
            seed = hashlib.sha256(f"{path.name}-{i}".encode()).digest()
            handle.write(seed * (1 << 15))
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(path)], check=True)
    subprocess.run(["qemu-img", "resize", "-q", str(path), virtual], check=True)
    raw.unlink()
    return path


def small_qcow2(path: Path) -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "16M"], check=True)
    return path


def iso_bytes(size: int = 0x9000, label: bytes = b"KVMDESK") -> bytes:
    """A minimal ISO 9660 image: the primary volume descriptor signature at 0x8001."""
    data = bytearray(size)
    data[0x8000] = 1
    data[0x8001:0x8006] = b"CD001"
    data[0x8028:0x8028 + len(label)] = label
    return bytes(data)


class TrackingSite(Site):
    """A site that remembers its connections, so a test can cut them like a killed process would."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.protocols: set = set()

    def buildProtocol(self, addr: Any) -> Any:
        protocol = super().buildProtocol(addr)
        self.protocols.add(protocol)
        return protocol


class InProcessAgent:
    """A node agent's image endpoints on ``host:port`` (a Router at /agent/v1 with the image routes).

    Stands in for ``twistd kvmdesk-agent`` until that process exists: same routes, same streaming site.
    """

    def __init__(self, host: str, data_dir: Path, port: int = 0):
        self.host = host
        self.data_dir = data_dir
        self.port = port
        self.listening: Any = None
        self.site: Optional[TrackingSite] = None
        self.images: Any = None

    @property
    def storage(self) -> Path:
        return self.data_dir / "storage"

    def base_image(self, uuid: str) -> Path:
        return self.storage / "instances" / "_base" / uuid

    def start(self) -> "InProcessAgent":
        config = SimpleNamespace(get=lambda key, default=None: default)
        agent = SimpleNamespace(config=config, data_dir=self.data_dir)
        router = Router(SimpleNamespace(reactor=reactor), prefix="/agent/v1")
        # A fresh store each start: what a restarted agent process knows (only what is on disk).
        self.images = register_agent_routes(router, agent, reactor=reactor)
        self.site = TrackingSite(router.resource())
        install_streaming(self.site, router)
        self.listening = reactor.listenTCP(self.port, self.site, interface=self.host)
        self.port = self.listening.getHost().port
        return self

    async def kill(self) -> None:
        """Stop listening and cut every open connection mid-stream."""
        for protocol in list(self.site.protocols):
            # twisted.web wraps each HTTPChannel in a proxy that does not expose the transport.
            channel = getattr(protocol, "_channel", protocol)
            transport = getattr(channel, "transport", None)
            if transport is not None:
                transport.abortConnection()
        await self.listening.stopListening()
        self.listening = None

    async def stop(self) -> None:
        if self.listening is not None:
            await self.kill()
        await self.images.drain()  # as the agent service does at stop


class Gate:
    """Holds transfer bodies once they have sent ``fraction`` of their bytes, until released.

    Used as the distributor's producer factory; ``offsets`` records where each body started (0: from
    the beginning, more: a resume).
    """

    def __init__(self, fraction: float):
        self.fraction = fraction
        self.armed = True
        self.offsets: list[tuple[int, int]] = []
        self.held: list[defer.Deferred] = []
        self._released = False

    def __call__(self, path: Path, offset: int, length: int, **kwargs: Any) -> Any:
        self.offsets.append((offset, length))
        gate = self
        hold_at = int((offset + length) * self.fraction) - offset if self.armed else None

        class Held(FileRangeProducer):
            holding = hold_at is not None and hold_at > 0

            def _after_chunk(self) -> Any:
                if self.holding and self.sent >= hold_at and not gate._released:
                    self.holding = False
                    wait: defer.Deferred = defer.Deferred()
                    gate.held.append(wait)
                    return wait
                return super()._after_chunk()

        return Held(path, offset, length, **kwargs)

    def release(self) -> None:
        self._released = True
        self.armed = False
        held, self.held = self.held, []
        for d in held:
            d.callback(None)


@contextlib.asynccontextmanager
async def controller(tmp_path: Path, clock: Clock, usage: Optional[UsagePlugin] = None, *,
                     config: Optional[dict] = None, start: bool = False) -> AsyncIterator[ApiClient]:
    """A logged-in client on a core with the storage plugin and one pool (``api.pool``).

    :param start: start the storage distributor (transfers run); it is stopped at the end and the
        clock must then hold no delayed call.
    """
    layers = {"storage": {"retry_initial": 5.0, "reconcile_interval": 600.0, **(config or {}).get("storage", {})}}
    layers.update({k: v for k, v in (config or {}).items() if k != "storage"})
    core = await make_core(tmp_path, plugins=plugin_manager(usage or UsagePlugin()), clock=clock, config=layers)
    distributor = core.extensions["storage.distributor"]
    try:
        pool = await core.store.collection("resource_pools").insert_one(
            new_record(clock, name=POOL_NAME, desc=None, status=0, default=0))
        api = ApiClient(core)
        await api.login()
        api.pool = pool["uuid"]
        api.distributor = distributor
        if start:
            distributor.startService()
        yield api
    finally:
        if distributor.running:
            await distributor.stopService()
        link = core.extensions.get("storage.agent_link")
        if link is not None and hasattr(link, "close"):
            await link.close()
        await core.store.close()
    assert clock.getDelayedCalls() == [], f"delayed calls left on the clock: {clock.getDelayedCalls()}"


async def add_node(core: Any, pool_uuid: str, host: str, name: str) -> dict:
    """A node record as the nodes plugin keeps it (that plugin is not loaded here)."""
    return await core.store.collection("nodes").insert_one(
        new_record(core.clock, name=name, hostname=name, ip=host, resource_pool_uuid=pool_uuid, status="online", type=2))


def http_client() -> HTTPClient:
    """treq over real sockets, without persistent connections (nothing left open after a test)."""
    return HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))


async def decode(response: Any) -> tuple[int, Any]:
    body = await treq.content(response)
    try:
        return response.code, orjson.loads(body)
    except orjson.JSONDecodeError:
        return response.code, body


def files_in(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []



class RawHTTP:
    """A bare TCP client: sends bytes as told and collects everything the server answers."""

    def __init__(self) -> None:
        from twisted.internet.protocol import Protocol

        outer = self
        self.received = bytearray()
        self.closed: defer.Deferred = defer.Deferred()
        self.first_bytes: defer.Deferred = defer.Deferred()

        class _Client(Protocol):
            def dataReceived(self, data: bytes) -> None:
                outer.received += data
                if not outer.first_bytes.called:
                    outer.first_bytes.callback(bytes(outer.received))

            def connectionLost(self, reason: Any) -> None:
                if not outer.closed.called:
                    outer.closed.callback(bytes(outer.received))

        self.protocol = _Client()

    async def connect(self, host: str, port: int) -> "RawHTTP":
        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

        await connectProtocol(TCP4ClientEndpoint(reactor, host, port), self.protocol)
        return self

    def send(self, data: bytes) -> None:
        self.protocol.transport.write(data)

    def abort(self) -> None:
        self.protocol.transport.abortConnection()


def parse_response(raw: bytes) -> tuple[int, dict, Any]:
    """Status, headers (lower-case names) and decoded JSON body of one raw HTTP/1.1 response."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    if headers.get("transfer-encoding") == "chunked":
        decoded = bytearray()
        while body:
            size_line, _, body = body.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            decoded += body[:size]
            body = body[size + 2:]
        body = bytes(decoded)
    length = int(headers.get("content-length", len(body)))
    return status, headers, orjson.loads(body[:length]) if length else None


def request_head(method: str, path: str, headers: Mapping[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: kvmdesk.test", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def multipart_parts(boundary: str, fields: Mapping[str, str], filename: str) -> tuple[bytes, bytes]:
    """The bytes before and after a file's content in a multipart form (to stream the content between)."""
    before = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in fields.items()
    )
    before += (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
               "Content-Type: application/octet-stream\r\n\r\n").encode()
    return before, f"\r\n--{boundary}--\r\n".encode()
