"""Test fixtures for the agent's network side: network namespaces, veth pairs and a private Open vSwitch.

Everything happens inside namespaces and a temporary directory that the test owns, so the host's own
network is never touched; everything started is stopped by its pid.  Setup runs commands (``ip``,
``ovsdb-tool``...) synchronously: it is test setup, not agent code.
"""
from __future__ import annotations

import itertools
import sys
import os
import select
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Optional

import orjson
import pytest
from treq.testing import StubTreq

from kvmdesk.agent.net.routes import register_net_routes
from kvmdesk.api.router import Router
from kvmdesk.core import errors
from kvmdesk.core.config import Config
from kvmdesk.core.errors import ApiError
from kvmdesk.testing.api import _FlushOnFinish

OVS_SCHEMA = "/usr/share/openvswitch/vswitch.ovsschema"
_counter = itertools.count()


class Unavailable(Exception):
    """The machine cannot provide what the test needs; the message says why (use it to skip)."""


def _run(*argv: str, env: Optional[dict] = None, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")
    return done


def in_netns(ns: str, *argv: str) -> list[str]:
    """``argv`` run inside network namespace ``ns``.

    ``nsenter --net`` enters only the network namespace; ``ip -n``/``ip netns exec`` also remount
    ``/sys``, which needs ``/`` to be a mount point and so fails in a chroot (as on a fresh-machine check).
    """
    return ["nsenter", f"--net=/run/netns/{ns}", *argv]


class Namespaces:
    """Named network namespaces (``ip netns add``) and veth pairs between them, removed by :meth:`close`."""

    def __init__(self) -> None:
        self.names: list[str] = []
        if shutil.which("ip") is None:
            raise Unavailable("the ip command (iproute2) is not installed")

    def add(self, hint: str = "ns") -> str:
        name = f"kvt{os.getpid() % 100000}-{hint}{next(_counter)}"[:30]
        done = _run("ip", "netns", "add", name, check=False)
        if done.returncode != 0:
            raise Unavailable(f"cannot create network namespaces here (ip netns add: {done.stderr.strip()})")
        self.names.append(name)
        return name

    def veth(self, ns: str, name: str, peer_ns: str, peer: str, *, up: bool = True) -> None:
        """A veth pair ``name`` (in ``ns``) <-> ``peer`` (in ``peer_ns``), both up unless told otherwise."""
        _run(*in_netns(ns, "ip", "link", "add", name, "type", "veth", "peer", "name", peer, "netns", peer_ns))
        if up:
            _run(*in_netns(ns, "ip", "link", "set", name, "up"))
            _run(*in_netns(peer_ns, "ip", "link", "set", peer, "up"))

    def run(self, ns: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        """Run a command inside ``ns``."""
        return _run(*in_netns(ns, *argv), check=check)

    def close(self) -> None:
        for name in reversed(self.names):
            _run("ip", "netns", "del", name, check=False)
        self.names.clear()


def _wait_exit(pid: int, timeout: float = 10.0) -> None:
    """Wait for a process that is not our child to exit (a pidfd becomes readable), without polling."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        select.select([fd], [], [], timeout)
    finally:
        os.close(fd)


class PrivateOvs:
    """A private Open vSwitch (ovsdb-server + ovs-vswitchd) under a temporary directory.

    :param netns: run ovs-vswitchd inside this namespace, so its ports are that namespace's devices.
    """

    def __init__(self, netns: Optional[str] = None):
        for tool in ("ovsdb-tool", "ovsdb-server", "ovs-vswitchd", "ovs-vsctl"):
            if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists():
                raise Unavailable(f"{tool} is not installed (Debian package openvswitch-switch)")
        if not Path(OVS_SCHEMA).exists():
            raise Unavailable(f"{OVS_SCHEMA} is missing")
        self.netns = netns
        # a short path: a unix socket path must fit in 108 bytes
        self.dir = Path(tempfile.mkdtemp(prefix="kvovs-"))
        self.env = {**os.environ, "OVS_RUNDIR": str(self.dir), "OVS_DBDIR": str(self.dir), "OVS_LOGDIR": str(self.dir),
                    "OVS_PKGDATADIR": str(Path(OVS_SCHEMA).parent), "OVS_SYSCONFDIR": str(self.dir)}
        self.db = f"unix:{self.dir / 'db.sock'}"
        self.pidfiles: list[Path] = []

    def _tool(self, name: str) -> str:
        return shutil.which(name) or str(Path("/usr/sbin", name))

    def vsctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return _run(self._tool("ovs-vsctl"), f"--db={self.db}", "--timeout=10", *args, env=self.env, check=check)

    def start(self) -> "PrivateOvs":
        d = self.dir
        _run(self._tool("ovsdb-tool"), "create", str(d / "conf.db"), OVS_SCHEMA, env=self.env)
        server_pid = d / "ovsdb-server.pid"
        _run(self._tool("ovsdb-server"), str(d / "conf.db"), f"--remote=punix:{d / 'db.sock'}",
             f"--pidfile={server_pid}", "--detach", f"--log-file={d / 'ovsdb-server.log'}", env=self.env)
        self.pidfiles.append(server_pid)
        self.vsctl("--no-wait", "init")
        # The userspace datapath drops TCP whose checksum the veth left to "hardware" unless it does TSO.
        self.vsctl("--no-wait", "set", "Open_vSwitch", ".", "other_config:userspace-tso-enable=true")
        switchd_pid = d / "ovs-vswitchd.pid"
        argv = [self._tool("ovs-vswitchd"), self.db, f"--pidfile={switchd_pid}", "--detach",
                f"--log-file={d / 'ovs-vswitchd.log'}"]
        if self.netns:
            argv = in_netns(self.netns, *argv)
        try:
            _run(*argv, env=self.env)
        finally:
            if switchd_pid.exists():
                self.pidfiles.append(switchd_pid)
        return self

    def stop(self) -> None:
        if (self.dir / "db.sock").exists():
            bridges = self.vsctl("list-br", check=False).stdout.split()
            for bridge in bridges:
                self.vsctl("--if-exists", "del-br", bridge, check=False)
        for pidfile in reversed(self.pidfiles):
            try:
                pid = int(pidfile.read_text().strip())
            except (OSError, ValueError):
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            _wait_exit(pid)
        self.pidfiles.clear()
        shutil.rmtree(self.dir, ignore_errors=True)

    def log(self) -> str:
        """The ovs-vswitchd log (for assertion messages)."""
        path = self.dir / "ovs-vswitchd.log"
        return path.read_text(errors="replace") if path.exists() else ""


AGENT_PREFIX = "/agent/v1"
AGENT_TOKEN = "test-node-secret"


class _TokenAuth:
    """Stands in for the agent's authenticator: one bearer token is accepted, nothing else."""

    def __init__(self, token: str):
        self.token = token

    async def authenticate(self, header: Optional[bytes]) -> dict:
        if header != f"Bearer {self.token}".encode():
            raise ApiError(errors.UNAUTHENTICATED)
        return {"name": "controller"}


class AgentHarness:
    """The agent's network API on its own router, called in memory through StubTreq.

    :param net: the drivers (:class:`~kvmdesk.agent.net.routes.NetAgent`), real or in-memory.
    """

    def __init__(self, net: Any, reactor: Any = None):
        if reactor is None:
            from twisted.internet import reactor
        self.net = net
        self.core = type("AgentCore", (), {"auth": _TokenAuth(AGENT_TOKEN), "config": Config()})()
        self.router = Router(self.core, prefix=AGENT_PREFIX)
        # the real agent checks signatures before its router; here the router checks a token
        register_net_routes(self.router, net, auth=True)
        wrapper = _FlushOnFinish(self.router.resource(), reactor)
        self.stub = StubTreq(wrapper)
        wrapper.stub = self.stub

    async def call(self, method: str, path: str, json: Any = None, *, token: Optional[str] = AGENT_TOKEN,
                   lang: str = "en") -> tuple[int, dict]:
        """``(status, envelope)`` of ``method /agent/v1<path>``."""
        headers = {"Host": "agent.test", "Accept-Language": lang}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        data = None
        if json is not None:
            data = orjson.dumps(json)
            headers["Content-Type"] = "application/json"
        response = await self.stub.request(method, "http://agent.test" + AGENT_PREFIX + path, data=data, headers=headers)
        return response.code, orjson.loads(await response.content())


# -- traffic between namespaces (this machine has no ping: a raw ICMP socket does the same) -----------

_PING = r'''
import os, select, socket, struct, sys, time
dst, timeout = sys.argv[1], float(sys.argv[2])
def checksum(data):
    data += b"\0" * (len(data) % 2)
    total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    total = (total >> 16) + (total & 0xFFFF)
    return ~(total + (total >> 16)) & 0xFFFF
ident = os.getpid() & 0xFFFF
body = b"kvmdesk-ping"
header = struct.pack("!BBHHH", 8, 0, 0, ident, 1)
packet = struct.pack("!BBHHH", 8, 0, checksum(header + body), ident, 1) + body
sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
sock.sendto(packet, (dst, 0))
deadline = time.monotonic() + timeout
while True:
    left = deadline - time.monotonic()
    if left <= 0 or not select.select([sock], [], [], left)[0]:
        sys.exit(1)
    data, (source, _) = sock.recvfrom(2048)
    start = (data[0] & 0x0F) * 4
    kind, _, _, rid, _ = struct.unpack("!BBHHH", data[start:start + 8])
    if kind == 0 and rid == ident and source == dst:
        sys.exit(0)
'''

_TCP_SERVER = r'''
import socket, sys
server = socket.socket()
server.bind((sys.argv[1], 0))
server.listen(1)
print(server.getsockname()[1], flush=True)
server.settimeout(float(sys.argv[2]))
conn, _ = server.accept()
data = b""
while len(data) < int(sys.argv[3]):
    chunk = conn.recv(65536)
    if not chunk:
        break
    data += chunk
conn.sendall(str(len(data)).encode())
conn.close()
'''

_TCP_CLIENT = r'''
import socket, sys
conn = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
conn.sendall(b"x" * int(sys.argv[4]))
conn.shutdown(socket.SHUT_WR)
print(conn.recv(100).decode())
'''


def ping(namespaces: Namespaces, ns: str, address: str, *, timeout: float = 2.0, attempts: int = 1) -> bool:
    """Whether an ICMP echo from ``ns`` to ``address`` is answered (each attempt waits ``timeout``)."""
    for _ in range(attempts):
        if namespaces.run(ns, sys.executable, "-c", _PING, address, str(timeout), check=False).returncode == 0:
            return True
    return False


def tcp_exchange(namespaces: Namespaces, server_ns: str, server_ip: str, client_ns: str, *, size: int = 200_000,
                 timeout: float = 5.0) -> int:
    """Send ``size`` bytes over TCP from ``client_ns`` to a server in ``server_ns``; returns the bytes the
    server says it received (``-1`` if the exchange failed)."""
    server = subprocess.Popen(in_netns(server_ns, sys.executable, "-c", _TCP_SERVER, server_ip, str(timeout), str(size)),
                              stdout=subprocess.PIPE, text=True)
    try:
        port = server.stdout.readline().strip()
        done = namespaces.run(client_ns, sys.executable, "-c", _TCP_CLIENT, server_ip, port, str(timeout), str(size),
                              check=False)
        return int(done.stdout.strip()) if done.returncode == 0 and done.stdout.strip().isdigit() else -1
    finally:
        server.kill()
        server.wait()


# -- pytest fixtures (import them into a conftest.py) ------------------------------------------------------


@pytest.fixture
def namespaces() -> Any:
    """A :class:`Namespaces` that removes its namespaces afterwards; skips where none can be created."""
    try:
        spaces = Namespaces()
        spaces.add("probe")  # can this machine (this user) create namespaces at all?
        spaces.close()
    except Unavailable as exc:
        pytest.skip(str(exc))
    try:
        yield spaces
    finally:
        spaces.close()


@pytest.fixture
def private_ovs(namespaces: Namespaces) -> Any:
    """A running :class:`PrivateOvs` whose ovs-vswitchd lives in a namespace of its own (``.netns``),
    stopped (bridges deleted, daemons stopped by pid) afterwards; skips where it cannot run."""
    try:
        netns = namespaces.add("ovs")
        ovs = PrivateOvs(netns=netns)
    except Unavailable as exc:
        pytest.skip(str(exc))
    try:
        ovs.start()
        yield ovs
    finally:
        ovs.stop()
