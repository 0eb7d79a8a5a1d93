"""The console relay end to end on loopback: a real controller and agent, a test-driver domain whose VNC
display is a small VNC server with a password, and a websocket viewer."""
from __future__ import annotations

import contextlib
from typing import Any, AsyncIterator

import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.task import Clock

from kvmdesk.agent.rfb import vnc_auth_response
from kvmdesk.core import console
from kvmdesk.testing.agents import added_node, free_port, nodes_controller, running_agent
from kvmdesk.core.passthrough import websocket_header
from kvmdesk.testing.vnc import BULK, CHUNK, HEIGHT, PING, WIDTH, FakeVncServer, Viewer, domain_with_vnc

PASSWORD = "vnc-pass"


class Setup:
    def __init__(self, api: Any, agent: Any, node: dict, vnc: FakeVncServer, vnc_port: int, clock: Clock):
        self.api, self.agent, self.node, self.vnc, self.vnc_port, self.clock = api, agent, node, vnc, vnc_port, clock
        self.core = api.core
        self.relay = api.core.extensions["console"]
        self.agents = api.core.extensions["agents"]

    async def domain(self, name: str, *, start: bool = True, password: str = PASSWORD) -> str:
        defined = await self.agents.call(self.node, "POST", "/domains",
                                         {"xml": domain_with_vnc(name, self.vnc_port, password)})
        if start:
            await self.agents.call(self.node, "POST", f"/domains/{name}", {"action": "start"})
        return defined["uuid"]

    def url(self, token: str, **extra: str) -> str:
        base = f"http://127.0.0.1:{self.core.config.get('controller.port')}"
        url = console.console_url(base, token, self.core.config)
        return url + "".join(f"&{k}={v}" for k, v in extra.items())

    async def token(self, domain_uuid: str, **kwargs: Any) -> str:
        status, body = await self.api.call("POST", "/console/tokens",
                                           {"node_uuid": self.node["uuid"], "domain_uuid": domain_uuid, **kwargs})
        assert status == 200, body
        return body["data"]["token"]

    async def refused(self, url: str) -> tuple[int, str]:
        viewer = await Viewer.connect(url)
        return await viewer.closed


@contextlib.asynccontextmanager
async def setup(tmp_path) -> AsyncIterator[Setup]:
    clock = Clock()
    clock.advance(1_000_000)
    vnc = FakeVncServer(PASSWORD)
    listening = reactor.listenTCP(0, vnc, interface="127.0.0.1")
    port = free_port("127.0.0.2")
    try:
        async with running_agent(tmp_path / "agent", "127.0.0.2", port) as agent, \
                nodes_controller(tmp_path / "controller", port, clock=clock,
                                 config={"console": {"stall_timeout": 30}}) as api:
            node = await added_node(api, "127.0.0.2")
            yield Setup(api, agent, node, vnc, listening.getHost().port, clock)
            api.core.extensions["console"].close_all()
            await vnc.all_closed()
    finally:
        await listening.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_viewer_reaches_the_domains_display_through_the_relay(tmp_path):
    async with setup(tmp_path) as s:
        uuid = await s.domain("vm-1")
        status, body = await s.api.call("POST", "/console/tokens", {"node_uuid": s.node["uuid"], "domain_uuid": uuid})
        assert body["data"]["websockify_url"].startswith("ws://kvmdesk.test/websockify/?token=v1.")
        assert body["data"]["console_url"].startswith("http://kvmdesk.test/console?token=v1.")
        viewer = await Viewer.connect(s.url(body["data"]["token"]))
        assert viewer.protocol.websocket_protocol_in_use == "binary"
        width, height, bpp, name = await viewer.handshake()
        assert (width, height, bpp, name) == (WIDTH, HEIGHT, 32, "fake")
        pixels = await viewer.framebuffer(width, height, bpp)
        assert len(pixels) == WIDTH * HEIGHT * 4 and any(pixels)
        assert s.relay.open_count(s.node["uuid"], uuid) == 1
        viewer.write(bytes([PING]) + b"12345678")
        assert await viewer.read(9) == bytes([PING]) + b"12345678"
        viewer.close()
        code, _ = await viewer.closed
        assert code == 1000
        await s.vnc.all_closed()  # closing the viewer closed the tunnel and the VNC connection
        assert s.relay.open_count() == 0 and not s.agent.console_tunnels.open


@pytest_twisted.ensureDeferred
async def test_bad_tokens_and_unreachable_consoles_are_refused_with_a_reason_and_others_stay_open(tmp_path):
    async with setup(tmp_path) as s:
        uuid = await s.domain("vm-1")
        off = await s.domain("vm-off", start=False)
        wrong = await s.domain("vm-wrong-password", password="other")
        good = await Viewer.connect(s.url(await s.token(uuid)))
        await good.handshake()

        assert await s.refused(s.url("not-a-token")) == (4080, console.TOKEN_MALFORMED.en)
        expiring = await s.token(uuid, ttl=10)
        s.clock.advance(10)
        assert await s.refused(s.url(expiring)) == (4081, console.TOKEN_EXPIRED.en)
        once = await s.token(uuid, single_use=True)
        first = await Viewer.connect(s.url(once))
        await first.handshake()
        assert await s.refused(s.url(once)) == (4082, console.TOKEN_USED.en)
        code, reason = await s.refused(s.url(await s.token(uuid), domain=off))
        assert (code, reason) == (4083, "the console token is for another desktop")
        assert await s.refused(s.url(await s.token(off))) == (4085, console.DOMAIN_OFF.en)
        code, reason = await s.refused(s.url(await s.token(wrong)))
        assert code == 4087 and "VNC login failed" in reason, reason
        missing = await s.token("00000000-0000-0000-0000-000000000000")
        assert (await s.refused(s.url(missing)))[0] == 4085

        nodes = s.core.store.collection("nodes")
        await nodes.update_one({"uuid": s.node["uuid"]}, {"$set": {"state": "offline"}})
        code, reason = await s.refused(s.url(await s.token(uuid)))
        assert code == 4086 and "offline" in reason
        await nodes.update_one({"uuid": s.node["uuid"]}, {"$set": {"state": "online", "ip": "127.0.0.9"}})
        code, reason = await s.refused(s.url(await s.token(uuid)))
        assert code == 4086, reason
        await nodes.update_one({"uuid": s.node["uuid"]}, {"$set": {"ip": "127.0.0.2"}})

        # A text message is not the websockify binary protocol.
        text = await Viewer.connect(s.url(await s.token(uuid)))
        await text.read(12)
        text.protocol.sendMessage(b"RFB 003.008\n", isBinary=False)
        assert await text.closed == (4096, "binary messages only (websockify binary protocol)")

        # Nothing of that touched the consoles that were open.
        good.write(bytes([PING]) + b"still-ok")
        assert await good.read(9) == bytes([PING]) + b"still-ok"
        assert s.relay.open_count(s.node["uuid"], uuid) == 2
        assert len(s.vnc.connections) == 2


@pytest_twisted.ensureDeferred
async def test_a_domain_that_stops_closes_its_consoles_and_revokes_its_tokens(tmp_path):
    async with setup(tmp_path) as s:
        uuid = await s.domain("vm-1")
        other = await s.domain("vm-2")
        token = await s.token(uuid)
        viewer = await Viewer.connect(s.url(token))
        await viewer.handshake()
        bystander = await Viewer.connect(s.url(await s.token(other)))
        await bystander.handshake()
        await s.agents.call(s.node, "POST", "/domains/vm-1", {"action": "destroy"})
        code, reason = await viewer.closed  # the agent's "stopped" event reached the controller
        assert code == 4088 and reason == "the console was closed: the desktop stopped"
        assert s.relay.open_count(s.node["uuid"], uuid) == 0
        await s.agents.call(s.node, "POST", "/domains/vm-1", {"action": "start"})
        assert (await s.refused(s.url(token)))[0] == 4084  # issued before the stop
        bystander.write(bytes([PING]) + b"bystand!")
        assert await bystander.read(9) == bytes([PING]) + b"bystand!"


def first_pause(consoles) -> defer.Deferred:
    """Fires when the relay first pauses reading the tunnel of the one console in ``consoles``."""
    (server_side,) = consoles
    paused: defer.Deferred = defer.Deferred()
    pause = server_side.watch.pauseProducing

    def observed_pause() -> None:
        pause()
        if not paused.called:
            paused.callback(None)

    server_side.watch.pauseProducing = observed_pause
    return paused


@pytest_twisted.ensureDeferred
async def test_a_viewer_that_stops_reading_is_closed_after_the_stall_timeout(tmp_path):
    async with setup(tmp_path) as s:
        uuid = await s.domain("vm-1")
        viewer = await Viewer.connect(s.url(await s.token(uuid)))
        await viewer.handshake()
        paused = first_pause(s.relay.consoles[(s.node["uuid"], uuid)])
        viewer.protocol.transport.pauseProducing()  # the viewer stops reading
        viewer.write(bytes([BULK]) + (256 << 20).to_bytes(4, "big"))
        await paused
        received = viewer.received
        s.clock.advance(29)
        assert s.relay.open_count() == 1
        s.clock.advance(1)
        assert s.relay.open_count() == 0
        viewer.protocol.transport.resumeProducing()
        code, _ = await viewer.closed
        assert code != 1000
        await s.vnc.all_closed()
        # Far less than the 256 MiB asked for was ever in flight: the tunnel was paused.
        assert viewer.received - received < 64 << 20


@pytest_twisted.ensureDeferred
async def test_bulk_bytes_arrive_whole_and_in_order_through_a_pause_and_resume(tmp_path):
    # The relay's reads go straight from socket to socket (kvmdesk.core.passthrough) until the
    # viewer's socket is full, then through twisted's write queue: no byte may be lost, doubled or
    # reordered on the switch, and the frames must stay valid websocket (autobahn's client checks).
    async with setup(tmp_path) as s:
        uuid = await s.domain("vm-1")
        viewer = await Viewer.connect(s.url(await s.token(uuid)))
        await viewer.handshake()
        paused = first_pause(s.relay.consoles[(s.node["uuid"], uuid)])
        size = (32 << 20) + 12345  # not a multiple of anything on the way
        viewer.protocol.transport.pauseProducing()
        viewer.write(bytes([BULK]) + size.to_bytes(4, "big"))
        await paused
        viewer.protocol.transport.resumeProducing()
        data = await viewer.read(size)
        # The server sends one random 64 KiB chunk over and over: a lost, doubled or moved byte breaks the period.
        assert data[CHUNK:] == data[:-CHUNK] and len(set(data[:CHUNK])) > 200
        viewer.write(bytes([PING]) + b"in order")
        assert await viewer.read(9) == bytes([PING]) + b"in order"
        viewer.close()
        await viewer.closed


def test_websocket_frame_headers_for_each_length_form():
    assert websocket_header(125) == bytes((0x82, 125))
    assert websocket_header(126) == bytes((0x82, 126, 0, 126))
    assert websocket_header(65535) == bytes((0x82, 126, 255, 255))
    assert websocket_header(65536) == bytes((0x82, 127)) + (65536).to_bytes(8, "big")


def test_the_vnc_password_becomes_a_des_key_with_its_bits_reversed():
    # Checked against a real QEMU in tests/integration/test_console_qemu.py; here the key rules.
    from kvmdesk.agent.rfb import _reverse_bits

    assert [_reverse_bits(b) for b in (0x01, 0x80, 0x0F, 0xAA)] == [0x80, 0x01, 0xF0, 0x55]
    challenge = bytes(range(16))
    answer = vnc_auth_response("password", challenge)
    assert len(answer) == 16 and answer != challenge
    assert vnc_auth_response("password" + "ignored", challenge) == answer  # only 8 characters count
    assert vnc_auth_response("pass", challenge) == vnc_auth_response("pass\0\0\0\0", challenge)


@pytest_twisted.ensureDeferred
async def test_removing_the_node_closes_its_consoles(tmp_path):
    async with setup(tmp_path) as s:
        uuid = await s.domain("vm-1")
        token = await s.token(uuid)
        viewer = await Viewer.connect(s.url(token))
        await viewer.handshake()
        status, body = await s.api.call("DELETE", "/resource_mgr/nodes", {"uuids": [s.node["uuid"]]})
        assert status == 200, body
        assert await viewer.closed == (4088, "the console was closed: the desktop's node was removed")
        assert s.relay.open_count() == 0
        code, reason = await s.refused(s.url(token))
        assert code == 4084  # its tokens went with it
        await s.vnc.all_closed()
