"""Throughput and latency of the paged pool list, side by side with a bare Klein endpoint.

What it does, all on loopback, every server in its own process:

1. seeds 10,000 resource pools straight into a fresh SQLite store through the store API;
2. starts the real controller on it (``twistd -n kvmdesk``, as an operator would) and, in another
   process, a bare Klein endpoint that returns a constant JSON body of the same size (one page of ten
   pools): the ceiling of the stack (Twisted + twisted.web + Klein, with an access log file written
   the way the controller writes its own, ``[controller] access_log``);
3. logs in, then loads each server in turn with ``GET /api/v1.0/resource_mgr/resource_pools?page=N
   &page_size=10`` (N random over the 1,000 pages, with the bearer token) at 50 concurrent keep-alive
   connections, for a bounded time (``--duration``) and, for the Python generator, a bounded number of
   requests (``--max-requests``), alternating bare/controller for ``--rounds`` rounds after a warm-up;
4. prints both throughputs, their ratio and p50/p99 latency of each (medians over the rounds).

Load generator: ``wrk`` when it is on the PATH (``apt install wrk``; this script installs nothing
itself), one thread, latencies from its ``--latency`` histogram; otherwise (or with
``--generator python``) a separate Python process using treq with a persistent
``HTTPConnectionPool(maxPersistentPerHost=50)``, which is slower than the servers it measures and so
understates both throughputs.

Targets (issue 2): the paged list reaches at least half the bare endpoint's throughput, and its p99 stays
under 50 ms, on SQLite.  Figures depend on the machine: on a shared 2-core box the load generator and the
server compete for the same cores, and other people's work shifts the numbers between runs.

Usage::

    .venv/bin/python bench/api_bench.py [--pools 10000] [--concurrency 50] [--duration 10] [--rounds 5]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Optional

PASSWORD = "bench-admin-password"
LIST_PATH = "/api/v1.0/resource_mgr/resource_pools"
PAGE_SIZE = 10
START_TIMEOUT = 120.0
STOP_TIMEOUT = 30.0
LISTENING = re.compile(r"listening on http://([0-9.]+):(\d+)/")


# -- the servers' processes ------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """A server subprocess logging to a file (no reader in this process competes for the cores)."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], cwd: str):
        self.name = name
        self.url: Optional[str] = None
        self.log_path = Path(cwd) / f"{name}.log"
        with open(self.log_path, "wb") as log_file:
            self.process = subprocess.Popen(command, env=env, cwd=cwd, stdout=log_file, stderr=subprocess.STDOUT)

    def _tail(self) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-40:])

    def wait_ready(self) -> str:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            found = LISTENING.search(self.log_path.read_text(errors="replace"))
            if found:
                self.url = f"http://{found.group(1)}:{found.group(2)}"
                return self.url
            if self.process.poll() is not None:
                break
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} did not start:\n" + self._tail())

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(STOP_TIMEOUT)


def _twistd() -> list[str]:
    script = Path(sys.executable).with_name("twistd")
    if script.exists():
        return [sys.executable, str(script)]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def _sample_page() -> dict[str, Any]:
    """One page of ten pools as the controller answers it: the bare endpoint's constant body."""
    results = [
        {"uuid": f"6f1c1d2e-0000-4000-8000-{i:012d}", "created_at": "2026-01-01 00:00:00",
         "updated_at": "2026-01-01 00:00:00", "deleted": 0, "deleted_at": None, "name": f"bench-pool-{i:05d}",
         "desc": f"benchmark pool {i}", "status": 0, "default": 0, "id": i + 1, "host_count": 0}
        for i in range(PAGE_SIZE)
    ]
    return {"code": 0, "msg": "成功", "data": {
        "count": 10001, "next": "http://127.0.0.1:50004" + LIST_PATH + "?page=2&page_size=10",
        "previous": None, "results": results}}


def serve_bare(port: int, access_log: str) -> None:
    """The bare Klein endpoint (runs in its own process): a constant JSON body, and an access log file
    written as the controller writes its own (twisted.web's, straight to a file)."""
    import orjson
    from klein import Klein
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver
    from twisted.web.server import Site

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])
    body = orjson.dumps(_sample_page())
    app = Klein()

    @app.route(LIST_PATH, methods=["GET"])
    def pools(request: Any) -> bytes:
        request.setHeader(b"content-type", b"application/json; charset=utf-8")
        return body

    site = Site(app.resource(), logPath=access_log)
    site.displayTracebacks = False
    listening = reactor.listenTCP(port, site, interface="127.0.0.1")
    address = listening.getHost()
    print(f"bare klein listening on http://{address.host}:{address.port}/", flush=True)
    reactor.run()


def seed(data_dir: str, count: int) -> None:
    """Insert ``count`` pools through the store API (runs in its own process, before the controller)."""
    from twisted.internet import defer, task

    from kvmdesk.core.records import new_record
    from kvmdesk.core.store import open_store
    from kvmdesk.plugins.nodes.pools import INDEXES, POOLS

    async def run(reactor: Any) -> None:
        store = open_store(f"sqlite://{Path(data_dir) / 'kvmdesk.db'}", reactor=reactor)
        try:
            await store.ensure_indexes(INDEXES)
            pools = store.collection(POOLS)
            for start in range(0, count, 2000):
                docs = [new_record(reactor, name=f"bench-pool-{i:05d}", desc=f"benchmark pool {i}", status=0, default=0)
                        for i in range(start, min(count, start + 2000))]
                outcomes = await pools.insert_many(docs)
                assert all(isinstance(doc, dict) for doc in outcomes), "seeding hit a duplicate"
            print(f"seeded {await pools.count()} pools", flush=True)
        finally:
            await store.close()

    task.react(lambda reactor: defer.ensureDeferred(run(reactor)))


# -- load generators ------------------------------------------------------------------------------

WRK_SCRIPT = """
math.randomseed(%(seed)d)
request = function()
  return wrk.format("GET", "%(path)s?page=" .. math.random(1, %(pages)d) .. "&page_size=%(size)d")
end
"""


def _wrk_duration(text: str) -> float:
    value, unit = re.fullmatch(r"([0-9.]+)(us|ms|s|m)", text).groups()
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}[unit]


def load_wrk(url: str, token: Optional[str], pages: int, args: argparse.Namespace, workdir: str) -> dict[str, Any]:
    script = Path(workdir) / "pages.lua"
    script.write_text(WRK_SCRIPT % {"seed": 4242, "path": LIST_PATH, "pages": pages, "size": PAGE_SIZE})
    command = ["wrk", "-t1", f"-c{args.concurrency}", f"-d{args.duration}s", "--latency", "--timeout", "5s",
               "-s", str(script)]
    if token:
        command += ["-H", f"Authorization: Bearer {token}"]
    run = subprocess.run(command + [url], capture_output=True, text=True, timeout=args.duration + 60)
    output = run.stdout
    found = {p: re.search(rf"^\s+{p}%\s+(\S+)\s*$", output, re.M) for p in ("50", "99")}
    total = re.search(r"(\d+) requests in", output)
    if run.returncode != 0 or total is None or None in found.values():
        raise RuntimeError(f"wrk failed (exit {run.returncode}):\n{output}\n{run.stderr}")
    requests = int(total.group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    socket_errors = re.search(r"Socket errors: (.*)", output)
    return {
        "throughput": float(re.search(r"Requests/sec:\s+([0-9.]+)", output).group(1)),
        "p50_ms": _wrk_duration(found["50"].group(1)),
        "p99_ms": _wrk_duration(found["99"].group(1)),
        "requests": requests,
        "errors": (int(errors.group(1)) if errors else 0),
        "socket_errors": socket_errors.group(1) if socket_errors else "",
    }


def load_python(url: str, token: Optional[str], pages: int, args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, __file__, "_loadgen", url, token or "", str(pages), str(args.concurrency),
               str(args.duration), str(args.max_requests)]
    output = subprocess.run(command, capture_output=True, text=True, timeout=args.duration + 120)
    if output.returncode != 0:
        raise RuntimeError("load generator failed:\n" + output.stderr[-3000:])
    return json.loads(output.stdout.strip().splitlines()[-1])


def python_loadgen(url: str, token: str, pages: int, concurrency: int, duration: float, max_requests: int) -> None:
    """The Python load generator (its own process): treq, one persistent pool of ``concurrency`` connections."""
    import random

    import treq
    from twisted.internet import defer, task
    from twisted.web.client import HTTPConnectionPool

    async def run(reactor: Any) -> None:
        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = concurrency
        pool.retryAutomatically = False
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        latencies: list[float] = []
        errors = [0]
        rng = random.Random(4242)
        deadline = time.monotonic() + duration

        async def worker() -> None:
            while time.monotonic() < deadline and len(latencies) < max_requests:
                target = f"{url}{LIST_PATH}?page={rng.randint(1, pages)}&page_size={PAGE_SIZE}"
                started = time.perf_counter()
                response = await treq.get(target, headers=headers, pool=pool, timeout=10)
                await response.content()
                latencies.append((time.perf_counter() - started) * 1000)
                if response.code != 200:
                    errors[0] += 1

        started = time.monotonic()
        await defer.gatherResults([defer.ensureDeferred(worker()) for _ in range(concurrency)], consumeErrors=True)
        elapsed = time.monotonic() - started
        await pool.closeCachedConnections()
        ordered = sorted(latencies)
        print(json.dumps({
            "throughput": len(ordered) / elapsed,
            "p50_ms": ordered[len(ordered) // 2],
            "p99_ms": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
            "requests": len(ordered),
            "errors": errors[0],
            "socket_errors": "",
        }), flush=True)

    task.react(lambda reactor: defer.ensureDeferred(run(reactor)))


# -- the run --------------------------------------------------------------------------------------


def _login(base: str) -> str:
    request = urllib.request.Request(base + "/api/v1.0/auth/login", method="POST",
                                     data=json.dumps({"username": "admin", "password": PASSWORD}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)["data"]["token"]


def _check_list(base: str, token: str, pools: int) -> None:
    request = urllib.request.Request(f"{base}{LIST_PATH}?page=2&page_size={PAGE_SIZE}",
                                     headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        page = json.load(response)["data"]
    assert page["count"] == pools + 1 and len(page["results"]) == PAGE_SIZE, page["count"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pools", type=int, default=10000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--duration", type=int, default=10, help="seconds of load per measurement")
    parser.add_argument("--rounds", type=int, default=5, help="alternating bare/controller measurements")
    parser.add_argument("--max-requests", type=int, default=200000, help="cap of the Python generator")
    parser.add_argument("--generator", choices=["auto", "wrk", "python"], default="auto")
    args = parser.parse_args()
    generator = args.generator
    if generator == "auto":
        generator = "wrk" if shutil.which("wrk") else "python"
    pages = max(1, args.pools // PAGE_SIZE)

    workdir = tempfile.mkdtemp(prefix="kvmdesk-bench-")
    data_dir = str(Path(workdir) / "data")
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVMDESK_")}
    env["KVMDESK_ADMIN_PASSWORD"] = PASSWORD
    servers: list[Server] = []
    try:
        print(f"seeding {args.pools} pools into {data_dir} ...", flush=True)
        subprocess.run([sys.executable, __file__, "_seed", data_dir, str(args.pools)], check=True, env=env, timeout=600)
        # The product's defaults, except the in-process node agent's port: free, so runs never clash.
        config = Path(workdir) / "kvmdesk.toml"
        config.write_text(f"[nodes]\nagent_port = {_free_port()}\n")
        controller = Server("controller", _twistd() + ["-n", "--pidfile=", "kvmdesk", "--config", str(config),
                                                       "--port", str(_free_port()), "--listen", "127.0.0.1",
                                                       "--data-dir", data_dir], env, workdir)
        servers.append(controller)
        bare_log = str(Path(workdir) / "bare-access.log")
        bare = Server("bare", [sys.executable, __file__, "_bare", str(_free_port()), bare_log], env, workdir)
        servers.append(bare)
        controller_url, bare_url = controller.wait_ready(), bare.wait_ready()
        token = _login(controller_url)
        _check_list(controller_url, token, args.pools)

        def measure(name: str, seconds: Optional[int] = None) -> dict[str, Any]:
            url, auth = (bare_url, None) if name == "bare" else (controller_url, token)
            run_args = argparse.Namespace(**{**vars(args), "duration": seconds or args.duration})
            if generator == "wrk":
                return load_wrk(url, auth, pages, run_args, workdir)
            return load_python(url, auth, pages, run_args)

        print(f"generator: {generator}; {args.concurrency} connections; {args.duration} s per run; "
              f"{args.rounds} rounds; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} before the run "
              "(a shared machine: figures vary between runs)", flush=True)
        for name in ("bare", "controller"):
            measure(name, seconds=2)  # warm-up: connections, caches, the JIT-less interpreter's first paths
        results: dict[str, list[dict[str, Any]]] = {"bare": [], "controller": []}
        for round_number in range(1, args.rounds + 1):
            for name in ("bare", "controller"):
                result = measure(name)
                results[name].append(result)
                print(f"  round {round_number} {name:10s} {result['throughput']:8.0f} req/s  "
                      f"p50 {result['p50_ms']:6.2f} ms  p99 {result['p99_ms']:6.2f} ms  "
                      f"({result['requests']} requests, {result['errors']} non-200"
                      f"{', socket errors: ' + result['socket_errors'] if result['socket_errors'] else ''})",
                      flush=True)

        def median(name: str, key: str) -> float:
            return statistics.median(r[key] for r in results[name])

        bare_rps, list_rps = median("bare", "throughput"), median("controller", "throughput")
        ratio = list_rps / bare_rps
        list_p99 = median("controller", "p99_ms")
        print()
        print(f"{'':28s} {'req/s':>9s} {'p50 ms':>8s} {'p99 ms':>8s}")
        print(f"{'bare Klein (constant JSON)':28s} {bare_rps:9.0f} {median('bare', 'p50_ms'):8.2f} "
              f"{median('bare', 'p99_ms'):8.2f}")
        print(f"{'controller paged list':28s} {list_rps:9.0f} {median('controller', 'p50_ms'):8.2f} {list_p99:8.2f}")
        print(f"ratio list/bare: {ratio:.2f} (target >= 0.5: {'met' if ratio >= 0.5 else 'MISSED'}); "
              f"list p99 {list_p99:.1f} ms (target < 50 ms: {'met' if list_p99 < 50 else 'MISSED'})")
        lines = {name: sum(sum(1 for _ in open(part, "rb")) for part in Path(path).parent.glob(Path(path).name + "*"))
                 for name, path in (("bare", bare_log), ("controller", Path(data_dir) / "access.log"))}
        print(f"access log lines (rotated files included): bare {lines['bare']}, controller {lines['controller']}")
        failed = sum(r["errors"] for rs in results.values() for r in rs)
        if failed:
            print(f"WARNING: {failed} responses were not 200")
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_seed":
        seed(sys.argv[2], int(sys.argv[3]))
    elif len(sys.argv) > 1 and sys.argv[1] == "_bare":
        serve_bare(int(sys.argv[2]), sys.argv[3])
    elif len(sys.argv) > 1 and sys.argv[1] == "_loadgen":
        python_loadgen(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6]),
                       int(sys.argv[7]))
    else:
        main()
