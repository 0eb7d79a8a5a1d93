"""Benchmark: one controller watching N simulated agents at a 5 s heartbeat interval.

    .venv/bin/python bench/watchers_bench.py [--nodes 100 1000] [--interval 5] [--duration 60]

For each N, a separate process (this script with ``--serve``) listens on N loopback addresses
(127.10.x.y, one port) and answers like an agent: it checks each request's signature and answers
``/agent/v1/status`` and ``/agent/v1/facts`` with realistic documents and the proof header.  The
controller is the real one (core, SQLite store, nodes plugin, watchers, agent client) with N node
records; after one warm-up interval it is measured for ``--duration`` seconds.

Printed per N: heartbeats completed, the controller process's CPU seconds per node-heartbeat and as a
share of one core, the worst scheduling lag of a heartbeat (time past its due time when it started)
and the slowest heartbeat round.  Target: N=1000 at 5 s under half a core, no heartbeat late by more
than one interval.
"""
from __future__ import annotations

import argparse
import hashlib
import hmac
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MASTER = "watchers-bench-master-secret"


def address(i: int) -> str:
    return f"127.10.{i // 250}.{i % 250 + 1}"


def node_secret(ip: str) -> str:
    return hmac.new(MASTER.encode(), ip.encode(), hashlib.sha256).hexdigest()


# -- the simulated agents (separate process) ------------------------------------------------------------


def serve(count: int, port: int) -> None:
    from twisted.internet import reactor
    from twisted.web import resource as web_resource
    from twisted.web import server

    from kvmdesk.core import agentauth

    boot_id = os.urandom(8).hex()
    started = time.time()

    def status_doc() -> dict:
        return {
            "agent": {"version": "0.1.0", "agent_id": "sim", "boot_id": boot_id, "uptime": time.time() - started,
                      "allow_power_actions": False},
            "hypervisor": {"uri": "qemu:///system", "connected": True, "error": None, "demo": False,
                           "node": {"hostname": "sim", "cpus": 32, "memory_kib": 134217728},
                           "domains_total": 40, "domains_running": 30, "vcpus_running": 60,
                           "memory_running_kib": 62914560},
            "metrics": {"interval": 5.0, "cpu": {"percent": 23.5},
                        "memory": {"percent": 48.1, "used": 64 << 30, "total": 128 << 30, "available": 64 << 30},
                        "disks": [{"name": f"sd{c}", "read_bytes_per_sec": 1234.5, "write_bytes_per_sec": 5678.9}
                                  for c in "abcd"],
                        "nics": [{"name": f"eth{n}", "sent_bytes_per_sec": 12345.0, "recv_bytes_per_sec": 23456.0}
                                 for n in range(4)]},
        }

    facts = {
        "hostname": "sim", "cpu": {"model": "Sim CPU", "logical_count": 32, "physical_count": 16},
        "memory": {"total": 128 << 30, "available": 64 << 30}, "gpus": [],
        "os": {"pretty_name": "Debian GNU/Linux 12", "kernel": "6.1", "arch": "x86_64"},
        "virtualization": {"supported": True, "cpu_flag": "vmx", "kvm_device": True, "kvm_usable": True,
                           "reason": None},
        "network_interfaces": [{"name": f"eth{n}", "mac": f"52:54:00:00:00:0{n}", "speed_mbps": 10000, "up": True,
                                "mtu": 1500, "loopback": False,
                                "ipv4": [{"address": f"10.0.{n}.1", "netmask": "255.255.255.0", "prefix": 24}]}
                               for n in range(4)],
        "storage": [{"role": role, "path": "/opt/slow", "total": 1 << 40, "used": 1 << 38, "free": 3 << 38,
                     "usage": 25.0, "error": None}
                    for role in ("template_sys", "template_data", "instance_sys", "instance_data")],
    }
    verifier = agentauth.Verifier(reactor)

    class Sim(web_resource.Resource):
        isLeaf = True

        def render(self, request):
            ip = request.getHost().host
            secret = node_secret(ip)
            headers = {k.decode("latin-1").lower(): v[-1] for k, v in request.requestHeaders.getAllRawHeaders()}
            try:
                signature = verifier.verify(secret, request.method.decode(), request.uri.decode(), headers,
                                            request.content.read())
            except agentauth.SignatureError as exc:
                request.setResponseCode(401)
                return orjson.dumps({"code": 2101, "msg": str(exc), "data": None})
            path = request.path
            if path.endswith(b"/status"):
                data = status_doc()
            elif path.endswith(b"/facts"):
                data = {**facts, "hypervisor": status_doc()["hypervisor"], "agent": status_doc()["agent"]}
            else:
                request.setResponseCode(404)
                data = None
            request.setHeader(b"content-type", b"application/json")
            request.setHeader(agentauth.H_PROOF.encode(), agentauth.proof(secret, signature, request.code).encode())
            return orjson.dumps({"code": 0 if data is not None else 1006, "msg": "ok", "data": data})

    site = server.Site(Sim())
    site.log = lambda request: None
    for i in range(count):
        reactor.listenTCP(port, site, interface=address(i), backlog=128)
    print("ready", flush=True)
    reactor.run()


# -- the controller -------------------------------------------------------------------------------------


async def run_controller(count: int, port: int, interval: float, duration: float) -> dict[str, Any]:
    from twisted.internet import defer, reactor, task

    from kvmdesk.core.records import new_record
    from kvmdesk.testing.api import make_core

    tmp = tempfile.mkdtemp(prefix="kvmdesk-bench-")
    config = {
        "agent": {"local": False},
        "nodes": {"agent_port": port, "heartbeat_interval": interval, "heartbeat_timeout": interval * 0.8,
                  "facts_interval": 300.0, "metrics_store_interval": 60.0},
    }
    core = await make_core(Path(tmp), config=config)
    nodes = core.store.collection("nodes")
    pool = await core.store.collection("resource_pools").find_one({"default": 1})
    for i in range(count):
        ip = address(i)
        await nodes.insert_one(new_record(core.clock, name=f"sim-{i}", ip=ip, type=5,
                                          resource_pool_uuid=pool["uuid"], agent_secret=node_secret(ip),
                                          agent_id=f"sim-{i}", state="online", status=0))
    manager = core.extensions["nodes"]
    core.services.startService()
    await manager.watchers.loaded
    watchers = list(manager.watchers)
    # Warm-up: every watcher has had its jittered first round (connections open, facts fetched).
    await task.deferLater(reactor, interval * 1.5, lambda: None)
    durations: list[float] = []
    failed = [0]
    for watcher in watchers:
        watcher.max_lag = 0.0
        original = watcher.poll

        async def timed(original=original, watcher=watcher):
            started = time.monotonic()
            try:
                return await original()
            finally:
                durations.append(time.monotonic() - started)
                if watcher.failures:
                    failed[0] += 1

        watcher.poll = timed
    rounds_before = sum(w.rounds for w in watchers)
    cpu_before = resource.getrusage(resource.RUSAGE_SELF)
    wall_before = time.monotonic()
    await task.deferLater(reactor, duration, lambda: None)
    cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    wall = time.monotonic() - wall_before
    heartbeats = sum(w.rounds for w in watchers) - rounds_before
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    result = {
        "nodes": count,
        "heartbeats": heartbeats,
        "expected": int(count * duration / interval),
        "cpu_seconds": cpu,
        "cpu_per_heartbeat_ms": cpu / heartbeats * 1000 if heartbeats else float("nan"),
        "core_share": cpu / wall,
        "worst_lag": max(w.max_lag for w in watchers),
        "slowest_round": max(durations) if durations else float("nan"),
        "failed": failed[0],
        "offline": sum(1 for w in watchers if w.state != "online"),
    }
    await defer.maybeDeferred(core.services.stopService)
    await core.store.close()
    return result


def controller_main(count: int, port: int, interval: float, duration: float) -> None:
    from twisted.internet import defer, reactor

    outcome: dict[str, Any] = {}

    async def main() -> None:
        outcome.update(await run_controller(count, port, interval, duration))

    d = defer.ensureDeferred(main())
    d.addErrback(lambda f: (f.printTraceback(), outcome.update(error=str(f.value))))
    d.addBoth(lambda _: reactor.stop())
    reactor.run()
    print(orjson.dumps(outcome).decode(), flush=True)


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.10.0.1", 0))
        return probe.getsockname()[1]


def bench(count: int, interval: float, duration: float) -> dict[str, Any]:
    port = free_port()
    sim = subprocess.Popen([sys.executable, __file__, "--serve", str(count), "--port", str(port)],
                           stdout=subprocess.PIPE, text=True)
    try:
        line = sim.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"simulated agents did not start: {line!r}")
        controller = subprocess.run(
            [sys.executable, __file__, "--controller", str(count), "--port", str(port), "--interval", str(interval),
             "--duration", str(duration)], capture_output=True, text=True, timeout=duration * 3 + 300,
            env={**os.environ, "KVMDESK_ADMIN_PASSWORD": "bench"})
        last = controller.stdout.strip().splitlines()[-1] if controller.stdout.strip() else "{}"
        result = orjson.loads(last)
        if "error" in result or not result:
            raise RuntimeError(f"controller failed: {controller.stderr[-3000:]}")
        return result
    finally:
        sim.terminate()
        sim.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--interval", type=float, default=5.0)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--controller", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port)
        return
    if args.controller:
        controller_main(args.controller, args.port, args.interval, args.duration)
        return
    print(f"interval {args.interval:g} s, measured for {args.duration:g} s after a warm-up of 1.5 intervals")
    print(f"{'nodes':>6} {'heartbeats':>10} {'expected':>8} {'CPU ms/hb':>9} {'cores':>6} {'worst lag s':>11} "
          f"{'slowest s':>9} {'failed':>6} {'not online':>10}")
    for count in args.nodes:
        r = bench(count, args.interval, args.duration)
        print(f"{r['nodes']:>6} {r['heartbeats']:>10} {r['expected']:>8} {r['cpu_per_heartbeat_ms']:>9.3f} "
              f"{r['core_share']:>6.3f} {r['worst_lag']:>11.3f} {r['slowest_round']:>9.3f} {r['failed']:>6} "
              f"{r['offline']:>10}",
              flush=True)
    print("target: 1000 nodes at 5 s under 0.5 cores, no heartbeat late by more than one interval")


if __name__ == "__main__":
    main()
