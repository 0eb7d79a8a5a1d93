#!/usr/bin/env python3
"""The console relay against a direct VNC connection: throughput, added latency, idle consoles' memory.

    .venv/bin/python bench/console_bench.py [--size-mb 256] [--rounds 3] [--pings 2000] [--idle 200]

What runs (all on loopback, in one run, each as its own process):

- a VNC server with a password (:class:`kvmdesk.testing.vnc.FakeVncServer`: RFB 3.8, real VNC
  authentication; private messages stream N bytes at full speed or echo a ping), standing in for a
  domain's display: a real QEMU cannot produce frames at a rate that measures the relay;
- a node agent (``kvmdesk.agent.service.Agent`` on 127.0.0.2) whose test-driver domain has its VNC
  display on that server's port: the console tunnel logs in to it like to a real domain's;
- the controller (``ControllerService`` from ``kvmdesk.tap``, the production site) with the node added
  through its API, and console tokens from ``POST /api/v1.0/console/tokens``.

The bench process is the viewer: the direct path is a TCP client that logs in with the password
(:class:`~kvmdesk.testing.vnc.DirectViewer`); the relayed path is a websocket client
(:class:`~kvmdesk.testing.vnc.Viewer`) through controller and agent.  Printed:

- throughput of a bulk transfer (``--size-mb``) both ways, median of ``--rounds``, and their ratio
  (target: relay >= 0.5x direct);
- round-trip latency of ``--pings`` sequential 9-byte pings, p50 and p99 both ways, and the p50 the
  relay adds (target: < 2 ms on loopback);
- ``--idle`` consoles opened at once (each through the RFB handshake, then idle): the controller's
  RSS (``/proc/<pid>/status`` VmRSS) before and after, per console (target: < 100 KiB), and the
  agent's for scale.

It prints figures and asserts nothing.  ``KVMDESK_BENCH_PROFILE=DIR`` writes cProfile statistics of
the agent and the controller to ``DIR``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
ADMIN_PASSWORD = "bench-admin-password"
VNC_PASSWORD = "bench-pw"
DOMAIN_UUID = "6b0f3a56-6a3b-4d0e-9d39-4d9a5e3c2b10"
MiB = 1 << 20

sys.path.insert(0, str(Path(__file__).parent))
from transfer_bench import profiled  # noqa: E402  (the same cProfile switch for every bench)


# -- the processes under test ----------------------------------------------------------------------


def serve_agent(directory: str, port: int, vnc_port: int) -> None:
    from twisted.internet import defer, reactor

    from kvmdesk.agent.config import AgentConfig
    from kvmdesk.agent.service import Agent
    from kvmdesk.agent.testdriver import DomainSpec
    from kvmdesk.testing.agents import AGENT_PASSWORD, agent_layers

    domain = DomainSpec("bench-vm", state="running", uuid=DOMAIN_UUID, vnc_port=vnc_port, vnc_password=VNC_PASSWORD)
    layers = agent_layers(Path(directory), "127.0.0.2", port, password=AGENT_PASSWORD, domains=[domain])
    agent = Agent(AgentConfig([layers], environ={}))

    def started() -> None:
        agent.startService()
        agent.hypervisor.wait_connected().addCallback(lambda _: print("READY", flush=True))

    reactor.callWhenRunning(started)
    reactor.addSystemEventTrigger("before", "shutdown", lambda: defer.maybeDeferred(agent.stopService))
    profiled(reactor.run, "agent")


def serve_bare_hop(port: int, target: int) -> None:
    """A byte relay with no framework: accept, connect on, two threads of recv_into/sendall (1 MiB)."""
    import socket
    import threading

    def pump(source: socket.socket, sink: socket.socket) -> None:
        buffer = memoryview(bytearray(MiB))
        try:
            while True:
                n = source.recv_into(buffer)
                if not n:
                    break
                sink.sendall(buffer[:n])
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    server = socket.create_server(("127.0.0.1", port))
    print("READY", flush=True)
    while True:
        client, _ = server.accept()
        upstream = socket.create_connection(("127.0.0.1", target))
        for pair in ((client, upstream), (upstream, client)):
            threading.Thread(target=pump, args=pair, daemon=True).start()


def serve_controller(directory: str, api_port: int, agent_port: int) -> None:
    from twisted.internet import reactor

    from kvmdesk.core.config import Config
    from kvmdesk.tap import ControllerService

    os.environ["KVMDESK_ADMIN_PASSWORD"] = ADMIN_PASSWORD
    config = Config([{
        "controller": {"data_dir": directory, "port": api_port, "listen": "127.0.0.1", "access_log": ""},
        "agent": {"local": False},
        "nodes": {"agent_port": agent_port, "controller_url": f"http://127.0.0.1:{api_port}/api/v1.0"},
    }])
    service = ControllerService(config, reactor)
    service.ready.addCallback(lambda core: print("READY", flush=True))
    service.ready.addErrback(lambda f: (f.printTraceback(), reactor.stop()))
    reactor.callWhenRunning(service.startService)
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    profiled(reactor.run, "controller")


def start(args: list[str], log: Path) -> subprocess.Popen:
    """Start a process and wait for its READY line; its stderr goes to ``log`` (a pipe nobody reads fills)."""
    with open(log, "w") as errors:
        process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=errors, cwd=ROOT, text=True)
    line = process.stdout.readline()
    if not line.startswith("READY"):
        process.kill()
        raise RuntimeError(f"{args[1:3]} did not start: {line}{log.read_text()[-3000:]}")
    return process


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


# -- the viewer side ---------------------------------------------------------------------------------


def raw_viewer_class():
    """A lean websocket viewer (the bench's, not the tests'): frames parsed by hand, bulk payloads only
    counted, so the viewer's own websocket parsing in Python is not what is measured (a browser parses
    frames natively).  The tests use autobahn's client (:class:`kvmdesk.testing.vnc.Viewer`)."""
    import base64
    import secrets
    import struct
    from urllib.parse import urlsplit

    from twisted.internet import defer, protocol, reactor

    from kvmdesk.testing.vnc import ByteStream

    class RawWs(protocol.Protocol):
        def __init__(self, stream: "RawViewer", request: bytes):
            self.stream = stream
            self.request = request
            self.head = b""
            self.upgraded = False
            self.pending = bytearray()
            self.left = 0  # payload bytes of the current frame still to come
            self.opcode = 0

        def connectionMade(self) -> None:
            self.stream.transport = self.transport
            self.transport.bufferSize = MiB
            self.transport.write(self.request)

        def dataReceived(self, data: bytes) -> None:
            if not self.upgraded:
                self.head += data
                end = self.head.find(b"\r\n\r\n")
                if end < 0:
                    return
                assert self.head.startswith(b"HTTP/1.1 101"), self.head[:200]
                self.upgraded = True
                data, self.head = self.head[end + 4:], b""
                self.stream.opened.callback(self.stream)
            view = memoryview(data)
            while view:
                if self.left:
                    take = view[:self.left]
                    self.left -= len(take)
                    view = view[len(take):]
                    if self.opcode == 2 or self.opcode == 0:
                        self.stream._received(take if self.stream._drain is not None else bytes(take))
                    continue
                self.pending += view
                view = memoryview(b"")
                if len(self.pending) < 2:
                    return
                first, second = self.pending[0], self.pending[1]
                length, offset = second & 0x7F, 2
                if length == 126:
                    if len(self.pending) < 4:
                        return
                    length, offset = struct.unpack(">H", self.pending[2:4])[0], 4
                elif length == 127:
                    if len(self.pending) < 10:
                        return
                    length, offset = struct.unpack(">Q", self.pending[2:10])[0], 10
                self.opcode = first & 0x0F or self.opcode
                rest = bytes(self.pending[offset:])
                self.pending = bytearray()
                if self.opcode == 8:
                    self.transport.loseConnection()
                    return
                self.left = length
                view = memoryview(rest)

        def connectionLost(self, reason=None) -> None:
            self.stream._ended("closed")
            if not self.stream.closed.called:
                self.stream.closed.callback(None)

    class RawViewer(ByteStream):
        def __init__(self) -> None:
            super().__init__()
            self.opened: defer.Deferred = defer.Deferred()
            self.transport = None

        @classmethod
        async def connect(cls, url: str) -> "RawViewer":
            parts = urlsplit(url)
            key = base64.b64encode(secrets.token_bytes(16)).decode()
            request = (f"GET {parts.path}?{parts.query} HTTP/1.1\r\nHost: {parts.netloc}\r\nUpgrade: websocket\r\n"
                       f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                       "Sec-WebSocket-Protocol: binary\r\n\r\n").encode()
            stream = cls()
            await protocol.ClientCreator(reactor, RawWs, stream, request).connectTCP(parts.hostname, parts.port)
            await stream.opened
            return stream

        def write(self, data: bytes) -> None:
            mask = secrets.token_bytes(4)
            n = len(data)
            header = bytes([0x82]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack(">H", n))
            masked = (int.from_bytes(data, "big") ^ int.from_bytes((mask * (n // 4 + 1))[:n], "big")).to_bytes(n, "big")
            self.transport.write(header + mask + masked)

        def close(self) -> None:
            self.transport.loseConnection()

        async def handshake(self):
            assert (await self.read(12)).startswith(b"RFB 003.")
            self.write(b"RFB 003.008\n")
            count = (await self.read(1))[0]
            await self.read(count)
            self.write(b"\x01")
            await self.read(4)
            return await self.server_init()

    return RawViewer


async def measure(options: argparse.Namespace, api_port: int, vnc_port: int, bare_port: int,
                  pids: dict[str, int]) -> None:
    import treq
    from twisted.internet import defer

    from kvmdesk.core.console import console_url
    from kvmdesk.testing.agents import AGENT_PASSWORD
    from kvmdesk.testing.vnc import BULK, PING, DirectViewer, Viewer

    base = f"http://127.0.0.1:{api_port}/api/v1.0"

    async def call(method: str, path: str, body: dict | None = None, token: str | None = None) -> dict:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        response = await treq.request(method, base + path, json=body, headers=headers)
        answer = json.loads(await response.content())
        if answer["code"] != 0:
            raise RuntimeError(f"{method} {path}: {answer}")
        return answer["data"]

    admin = (await call("POST", "/auth/login", {"username": "admin", "password": ADMIN_PASSWORD}))["token"]
    pools = await call("GET", "/resource_mgr/resource_pools", token=admin)
    node = await call("POST", f"/resource_mgr/resource_pools/{pools['results'][0]['uuid']}/nodes",
                      {"ip": "127.0.0.2", "password": AGENT_PASSWORD}, token=admin)

    async def relay_url() -> str:
        issued = await call("POST", "/console/tokens", {"node_uuid": node["uuid"], "domain_uuid": DOMAIN_UUID,
                                                        "ttl": 600}, token=admin)
        return console_url(f"http://127.0.0.1:{api_port}", issued["token"])

    async def direct() -> DirectViewer:
        viewer = await DirectViewer.connect("127.0.0.1", vnc_port, VNC_PASSWORD)
        await viewer.server_init()
        return viewer

    raw_viewer = raw_viewer_class()

    async def relayed():
        viewer = await raw_viewer.connect(await relay_url())
        await viewer.handshake()
        return viewer

    async def bulk(viewer) -> float:
        size = options.size_mb * MiB
        done = viewer.drain(size)
        started = time.perf_counter()
        viewer.write(bytes([BULK]) + size.to_bytes(4, "big"))
        await done
        return size / (time.perf_counter() - started) / MiB

    async def pings(viewer) -> list[float]:
        times = []
        for i in range(options.pings):
            message = bytes([PING]) + i.to_bytes(8, "big")
            started = time.perf_counter()
            viewer.write(message)
            echoed = await viewer.read(9)
            times.append((time.perf_counter() - started) * 1000)
            assert echoed == message
        return times

    async def bare() -> DirectViewer:
        viewer = await DirectViewer.connect("127.0.0.1", bare_port, VNC_PASSWORD)
        await viewer.server_init()
        return viewer

    both = {"direct": direct, "relay": relayed, "bare two-hop relay": bare}
    throughput: dict[str, list[float]] = {name: [] for name in both}
    latency: dict[str, list[float]] = {}
    cpu = {name: {process: 0.0 for process in pids} for name in both}
    for _ in range(options.rounds):
        for name, opener in both.items():
            viewer = await opener()
            before = {process: cpu_seconds(pid) for process, pid in pids.items()}
            throughput[name].append(await bulk(viewer))
            for process, pid in pids.items():
                cpu[name][process] += cpu_seconds(pid) - before[process]
            viewer.close()
            await viewer.closed
    for name, opener in list(both.items())[:2]:
        viewer = await opener()
        await pings(viewer)  # warm-up
        latency[name] = sorted(await pings(viewer))
        viewer.close()
        await viewer.closed

    def pct(values: list[float], q: float) -> float:
        return values[min(len(values) - 1, int(q * len(values)))]

    direct_mb, relay_mb = statistics.median(throughput["direct"]), statistics.median(throughput["relay"])
    print(f"throughput ({options.size_mb} MiB, median of {options.rounds}): direct {direct_mb:.0f} MiB/s, "
          f"relay {relay_mb:.0f} MiB/s = {relay_mb / direct_mb:.2f}x direct (target >= 0.5x)")
    print("  rounds: " + "; ".join(f"{name} " + ", ".join(f"{v:.0f}" for v in values)
                                   for name, values in throughput.items()))
    bare_mb = statistics.median(throughput["bare two-hop relay"])
    print(f"  for scale, the same two hops with no framework (threads doing recv_into/sendall, no websocket, "
          f"no tunnel): {bare_mb:.0f} MiB/s = {bare_mb / direct_mb:.2f}x direct; the relay reaches "
          f"{relay_mb / bare_mb:.2f}x of that")
    for name in both:
        print(f"  CPU seconds during the {name} transfers: " + ", ".join(f"{p} {v:.2f}" for p, v in cpu[name].items()))
    added = pct(latency["relay"], 0.5) - pct(latency["direct"], 0.5)
    print(f"latency ({options.pings} pings): direct p50 {pct(latency['direct'], .5):.3f} ms, "
          f"p99 {pct(latency['direct'], .99):.3f} ms; relay p50 {pct(latency['relay'], .5):.3f} ms, "
          f"p99 {pct(latency['relay'], .99):.3f} ms; added p50 {added:.3f} ms (target < 2 ms)")

    urls = [await relay_url() for _ in range(options.idle)]
    controller_before, agent_before = rss(pids['controller']), rss(pids['agent'])
    viewers = []
    for url in urls:
        viewer = await Viewer.connect(url)
        viewers.append(viewer)
    await defer.gatherResults([defer.ensureDeferred(v.handshake()) for v in viewers])
    controller_after, agent_after = rss(pids['controller']), rss(pids['agent'])
    per_console = (controller_after - controller_before) / options.idle / 1024
    print(f"{options.idle} idle consoles: controller RSS {controller_before / MiB:.1f} -> "
          f"{controller_after / MiB:.1f} MiB = {per_console:.1f} KiB per console (target < 100 KiB); "
          f"agent {(agent_after - agent_before) / options.idle / 1024:.1f} KiB per tunnel")
    for viewer in viewers:
        viewer.close()
    await defer.gatherResults([v.closed for v in viewers])


def run(options: argparse.Namespace) -> None:
    from twisted.internet import defer, task

    from kvmdesk.testing.agents import free_port

    workdir = Path(tempfile.mkdtemp(prefix="kvmdesk-console-bench-"))
    vnc_port, agent_port, api_port = free_port("127.0.0.1"), free_port("127.0.0.2"), free_port("127.0.0.1")
    bare_ports = free_port("127.0.0.1"), free_port("127.0.0.1")
    processes = []
    try:
        processes.append(start([PYTHON, "-m", "kvmdesk.testing.vnc", str(vnc_port), VNC_PASSWORD],
                               workdir / "vnc.log"))
        processes.append(start([PYTHON, __file__, "serve-agent", str(workdir / "agent"), str(agent_port),
                                str(vnc_port)], workdir / "agent.log"))
        processes.append(start([PYTHON, __file__, "serve-controller", str(workdir / "controller"), str(api_port),
                                str(agent_port)], workdir / "controller.log"))
        processes.append(start([PYTHON, __file__, "serve-bare-hop", str(bare_ports[1]), str(vnc_port)],
                               workdir / "bare-agent.log"))
        processes.append(start([PYTHON, __file__, "serve-bare-hop", str(bare_ports[0]), str(bare_ports[1])],
                               workdir / "bare-controller.log"))
        pids = {"vnc server": processes[0].pid, "agent": processes[1].pid, "controller": processes[2].pid,
                "bare hops": processes[3].pid, "bare hop 2": processes[4].pid, "viewer (this process)": os.getpid()}
        task.react(lambda _reactor: defer.ensureDeferred(measure(options, api_port, vnc_port, bare_ports[0], pids)))
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "serve-agent":
        serve_agent(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "serve-bare-hop":
        serve_bare_hop(int(sys.argv[2]), int(sys.argv[3]))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "serve-controller":
        serve_controller(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mb", type=int, default=256, help="bytes of one bulk transfer, in MiB")
    parser.add_argument("--rounds", type=int, default=3, help="bulk transfers each way")
    parser.add_argument("--pings", type=int, default=2000, help="sequential pings each way")
    parser.add_argument("--idle", type=int, default=200, help="idle consoles opened at once")
    run(parser.parse_args())


if __name__ == "__main__":
    main()
