"""The agent's console tunnel, reached with the controller's tunnel client; the RFB handshake machines."""
from __future__ import annotations

import struct
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from kvmdesk.agent import rfb
from kvmdesk.agent.testdriver import DomainSpec
from kvmdesk.core import console
from kvmdesk.core.errors import ApiError
from kvmdesk.nodeaccess.tunnel import open_tunnel
from kvmdesk.nodeaccess.client import AgentCallError, AgentClient
from kvmdesk.testing.agents import AGENT_PASSWORD, free_port, running_agent
from kvmdesk.testing.vnc import FakeVncServer

IP = "127.0.0.2"
PASSWORD = "tunnelpw"


class Bytes:
    """Collects a tunnel's bytes; ``read(n)`` fires with exactly n of them."""

    def __init__(self, tunnel: Any):
        self.buffer = bytearray(tunnel.take_early())
        self.waiting: list = []
        tunnel.sink = self.feed

    def feed(self, data: bytes) -> None:
        self.buffer += data
        while self.waiting and len(self.buffer) >= self.waiting[0][0]:
            n, d = self.waiting.pop(0)
            out = bytes(self.buffer[:n])
            del self.buffer[:n]
            d.callback(out)

    def read(self, n: int) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.waiting.append((n, d))
        self.feed(b"")
        return d


@pytest_twisted.async_yield_fixture
async def tunnel_setup(tmp_path):
    vnc = FakeVncServer(PASSWORD)
    listening = reactor.listenTCP(0, vnc, interface="127.0.0.1")
    vnc_port = listening.getHost().port
    closed_port = free_port("127.0.0.1")
    port = free_port(IP)
    domains = [DomainSpec("with-vnc", state="running", vnc_port=vnc_port, vnc_password=PASSWORD),
               DomainSpec("no-vnc", state="running"),
               DomainSpec("nobody-listens", state="running", vnc_port=closed_port, vnc_password=PASSWORD),
               DomainSpec("off", state="shutoff", vnc_port=vnc_port, vnc_password=PASSWORD)]
    client = AgentClient(reactor, port, timeout=10)
    try:
        async with running_agent(tmp_path / "agent", IP, port, domains=domains) as agent:
            answer = await client.enrol(IP, AGENT_PASSWORD, "controller-1", "http://127.0.0.1:1/api/v1.0")
            node = {"ip": IP, "agent_secret": answer["secret"]}
            uuids = {d["name"]: d["uuid"] for d in await client.call(node, "GET", "/domains")}
            yield agent, client, node, port, uuids, vnc
            agent.console_tunnels.close_all()
            await vnc.all_closed()
    finally:
        await client.close()
        await listening.stopListening()


async def refusal(d) -> ApiError:
    with pytest.raises(ApiError) as caught:
        await d
    return caught.value


@pytest_twisted.ensureDeferred
async def test_the_tunnel_refuses_what_it_cannot_open_with_the_agents_reason(tunnel_setup):
    agent, client, node, port, uuids, vnc = tunnel_setup
    with pytest.raises(AgentCallError) as caught:
        await client.call(node, "GET", f"/domains/{uuids['with-vnc']}/vnc")  # signed, but no Upgrade header
    assert (caught.value.status, caught.value.code) == (426, 1095)

    def tunnel(uuid: str, the_node: Any = node) -> Any:
        return open_tunnel(reactor, the_node, port, uuid, now=client.wallclock(), timeout=10)

    error = await refusal(tunnel(uuids["no-vnc"]))
    assert error.error is console.CONSOLE_UNAVAILABLE and error.params["reason"] == "the domain has no VNC display"
    error = await refusal(tunnel(uuids["nobody-listens"]))
    assert error.error is console.CONSOLE_UNAVAILABLE
    assert error.params["reason"].startswith("cannot connect to the domain's VNC")
    assert (await refusal(tunnel(uuids["off"]))).error is console.DOMAIN_OFF
    assert (await refusal(tunnel("00000000-0000-0000-0000-000000000001"))).error is console.DOMAIN_OFF
    error = await refusal(tunnel(uuids["with-vnc"], {"ip": IP, "agent_secret": "not-the-secret"}))
    assert error.params["reason"] == "the agent refused the controller's signature"
    error = await refusal(tunnel(uuids["with-vnc"], {"ip": "127.0.0.9", "agent_secret": "x"}))
    assert error.error is console.NODE_OFFLINE
    assert not vnc.connections and not agent.console_tunnels.open


@pytest_twisted.ensureDeferred
async def test_an_rfb_3_3_viewer_gets_no_authentication_from_the_tunnel(tunnel_setup):
    agent, client, node, port, uuids, vnc = tunnel_setup
    tunnel = await open_tunnel(reactor, node, port, uuids["with-vnc"], now=client.wallclock())
    stream = Bytes(tunnel)
    assert await stream.read(12) == rfb.VERSION_3_8
    tunnel.transport.write(rfb.VERSION_3_3)
    assert struct.unpack(">I", await stream.read(4)) == (rfb.SEC_NONE,)  # 3.3: the server decides
    tunnel.transport.write(b"\x01")  # ClientInit reaches the VNC server the agent logged in to
    width, height = struct.unpack(">HH", await stream.read(4))
    assert (width, height) == (64, 48)
    assert len(agent.console_tunnels.open) == 1 and len(vnc.connections) == 1
    # The HTTP connection it came on is no longer the site's to track (or to leak).
    assert all(getattr(p, "_channel", p).transport is not None for p in agent.site.protocols)
    tunnel.transport.loseConnection()
    await vnc.all_closed()  # the agent closed the VNC side with the tunnel


def test_the_viewer_side_handshake_for_each_rfb_version():
    for version, answer, needs_choice in ((rfb.VERSION_3_3, struct.pack(">I", 1), False),
                                          (rfb.VERSION_3_7, bytes([1, 1]), True),
                                          (rfb.VERSION_3_8, bytes([1, 1]), True),
                                          (b"RFB 003.889\n", bytes([1, 1]), True)):
        greeting = rfb.NoAuthGreeting()
        assert greeting.feed(version) == answer
        if needs_choice:
            assert not greeting.done
            result = greeting.feed(b"\x01\x01")  # the choice, and ClientInit right behind it
            assert result == (struct.pack(">I", 0) if version >= rfb.VERSION_3_8 else b"")
        assert greeting.done
    with pytest.raises(rfb.RfbError):
        rfb.NoAuthGreeting().feed(b"GET / HTTP/1.1\r\n")
    greeting = rfb.NoAuthGreeting()
    greeting.feed(rfb.VERSION_3_8)
    with pytest.raises(rfb.RfbError):
        greeting.feed(bytes([rfb.SEC_VNC_AUTH]))


def test_the_vnc_login_handles_old_servers_and_says_why_a_server_refused():
    login = rfb.VncLogin("pw")
    assert login.feed(rfb.VERSION_3_3) == rfb.VERSION_3_3
    challenge = bytes(range(16))
    assert login.feed(struct.pack(">I", rfb.SEC_VNC_AUTH) + challenge) == rfb.vnc_auth_response("pw", challenge)
    assert login.feed(struct.pack(">I", 0)) == b"" and login.done

    login = rfb.VncLogin("pw")
    login.feed(rfb.VERSION_3_8)
    with pytest.raises(rfb.RfbError, match="too many connections"):
        login.feed(b"\x00" + struct.pack(">I", 20) + b"too many connections")

    login = rfb.VncLogin("pw")
    login.feed(rfb.VERSION_3_8)
    login.feed(bytes([1, rfb.SEC_VNC_AUTH]) + challenge)
    with pytest.raises(rfb.AuthenticationFailed, match="bad password"):
        login.feed(struct.pack(">II", 1, 12) + b"bad password")

    with pytest.raises(rfb.RfbError, match="no supported VNC security type"):
        login = rfb.VncLogin(None)
        login.feed(rfb.VERSION_3_8 + bytes([1, rfb.SEC_VNC_AUTH]))
    with pytest.raises(rfb.RfbError, match="not a VNC server"):
        rfb.VncLogin("pw").feed(b"SSH-2.0-Open")
