"""Benchmark of the users plugin on the embedded SQLite store; prints figures, asserts nothing.

    .venv/bin/python bench/users_bench.py [--users 10000] [--queries 200]

A real controller core (every built-in plugin, a fresh SQLite store in a temporary directory) serves
its API on 127.0.0.1:<free port> through the production site (streamed uploads); the benchmark drives it with treq over a persistent connection,
in the same process and reactor.  It measures:

- the cost of one password hash (Argon2id, the parameters of ``kvmdesk.core.passwords``);
- ``multi_create`` of N users (one shared password: one hash);
- a paged query of the N-user group (``page_size=10`` at random pages): p50, p99, max;
- ``export`` of the N users (the .xlsx is written in a thread), and the download of the file;
- import of N users with N distinct passwords: total time, and the phases the plugin logs
  (reading the workbook, checks, hashing, store writes), so "everything but hashing" is measured,
  not estimated.

During each bulk operation two probes watch the reactor: a LoopingCall every 10 ms that records how
late it fires (max lag), and a loop of lightweight API requests (``GET /resource_mgr/resource_pools``)
whose latency is recorded (max and p50).

Targets: multi_create and export < 10 s each, paged query p99 < 50 ms, import without hashing < 10 s,
reactor lag < 100 ms.  The figures depend on the machine and on what else runs on it: the load
average is printed at the start and the end.
"""
from __future__ import annotations

import argparse
import gc
import io
import os
import random
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Optional

import orjson
from twisted.internet import defer, task
from twisted.internet.task import LoopingCall
from twisted.logger import globalLogPublisher
from twisted.web.client import Agent, HTTPConnectionPool
from treq.client import HTTPClient

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kvmdesk.api.streaming import make_site  # noqa: E402
from kvmdesk.core.passwords import HASHER, hash_password_now  # noqa: E402
from kvmdesk.core.app import freeze_startup_heap  # noqa: E402
from kvmdesk.core.config import Config  # noqa: E402
from kvmdesk.plugins.users.imports import hash_concurrency  # noqa: E402
from kvmdesk.plugins.users.plugin import DEFAULTS  # noqa: E402
from kvmdesk.testing.api import ADMIN_PASSWORD, make_core  # noqa: E402


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


class GcPauses:
    """The longest garbage-collector pause (it holds the GIL: the reactor waits for it too)."""

    def __init__(self) -> None:
        self.longest = 0.0
        self._started = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.longest = max(self.longest, time.perf_counter() - self._started)

    def take(self) -> float:
        longest, self.longest = self.longest, 0.0
        return longest


GC = GcPauses()


class LagProbe:
    """A LoopingCall every ``interval`` seconds; ``max_lag`` is how late it fired at worst."""

    def __init__(self, reactor: Any, interval: float = 0.01):
        self.reactor = reactor
        self.interval = interval
        self.max_lag = 0.0
        self.worst_at = 0.0
        self.lags: list[float] = []
        self._started = 0.0
        self._last = 0.0
        self._loop = LoopingCall(self._tick)
        self._loop.clock = reactor

    def _tick(self) -> None:
        now = time.monotonic()
        if self._last:
            self.lags.append(max(0.0, now - self._last - self.interval))
        if self._last and now - self._last - self.interval > self.max_lag:
            self.max_lag = now - self._last - self.interval
            self.worst_at = self._last - self._started
        self._last = now

    def start(self) -> None:
        self.max_lag, self._last, self._started, self.lags = 0.0, 0.0, time.monotonic(), []
        self._loop.start(self.interval, now=True)

    def stop(self) -> float:
        self._loop.stop()
        return self.max_lag

    def summary(self) -> str:
        if not self.lags:
            return "no samples"
        late = sum(1 for lag in self.lags if lag > 0.1)
        return (f"max {ms(self.max_lag)} (at +{self.worst_at:.2f} s), p99 {ms(percentile(self.lags, 0.99))}, "
                f"{late} of {len(self.lags)} ticks over 100 ms")


def latency_summary(latencies: list[float]) -> str:
    if not latencies:
        return "none"
    slow = sum(1 for latency in latencies if latency > 0.1)
    return (f"max {ms(max(latencies))}, p99 {ms(percentile(latencies, 0.99))}, p50 {ms(statistics.median(latencies))}, "
            f"{slow} of {len(latencies)} over 100 ms")


class Api:
    """JSON calls to the listening API over one persistent connection pool."""

    def __init__(self, reactor: Any, base: str):
        self.base = base
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = 4
        self.http = HTTPClient(Agent(reactor, pool=self.pool))
        self.token = ""

    async def call(self, method: str, path: str, body: Any = None, *, params: Optional[dict] = None,
                   data: Optional[bytes] = None, headers: Optional[dict] = None) -> Any:
        sent = {"Authorization": f"Bearer {self.token}", **(headers or {})}
        if body is not None:
            data = orjson.dumps(body)
            sent["Content-Type"] = "application/json"
        response = await self.http.request(method, self.base + path, data=data, headers=sent, params=params)
        content = await response.content()
        envelope = orjson.loads(content)
        if envelope["code"] != 0:
            raise RuntimeError(f"{method} {path}: {response.code} {envelope}")
        return envelope["data"]

    async def raw(self, url: str) -> bytes:
        response = await self.http.get(url)
        return await response.content()


async def watched(reactor: Any, api: Api, operation: Callable[[], Awaitable[Any]]) -> tuple[Any, float, LagProbe, list[float]]:
    """Run ``operation`` while both probes run: (result, seconds, the lag probe, probe latencies)."""
    probe = LagProbe(reactor)
    latencies: list[float] = []
    done = False

    async def light_requests() -> None:
        while not done:
            started = time.monotonic()
            await api.call("GET", "/resource_mgr/resource_pools", params={"page_size": 1})
            latencies.append(time.monotonic() - started)
            await task.deferLater(reactor, 0.05, lambda: None)

    GC.take()
    probe.start()
    prober = defer.ensureDeferred(light_requests())
    started = time.monotonic()
    try:
        result = await operation()
    finally:
        elapsed = time.monotonic() - started
        done = True
        await prober
        probe.stop()
    return result, elapsed, probe, latencies


def report(label: str, elapsed: float, probe: LagProbe, latencies: list[float]) -> None:
    print(f"  {label}: {elapsed:.2f} s")
    print(f"      reactor lag: {probe.summary()}; longest GC pause {ms(GC.take())}")
    print(f"      concurrent light request: {latency_summary(latencies)}")


def import_workbook(count: int, group: str) -> bytes:
    from openpyxl import Workbook

    book = Workbook(write_only=True)
    sheet = book.create_sheet("users")
    sheet.append(["用户名", "密码", "姓名", "用户组", "电话", "邮箱", "状态"])
    for n in range(1, count + 1):
        sheet.append([f"imp{n:05d}", secrets.token_urlsafe(12), f"Student {n}", group, f"1380000{n:04d}",
                      f"imp{n}@example.com", "启用"])
    out = io.BytesIO()
    book.save(out)
    return out.getvalue()


def multipart(fields: dict[str, str], filename: str, content: bytes) -> tuple[bytes, str]:
    boundary = "bench-" + secrets.token_hex(8)
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
                 "Content-Type: application/octet-stream\r\n\r\n".encode() + content + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


async def main(reactor: Any, users: int, queries: int) -> None:
    print(f"users benchmark: {users} users, {queries} paged queries; {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f} at start (other work on the machine shares the cores)")
    samples = 10
    core_stub = type("CoreStub", (), {"config": Config([DEFAULTS])})()
    started = time.perf_counter()
    for n in range(samples):
        hash_password_now(f"sample-{n}")
    per_hash = (time.perf_counter() - started) / samples
    print(f"  one password hash (Argon2id m={HASHER.memory_cost} KiB, t={HASHER.time_cost}, p={HASHER.parallelism}): "
          f"{ms(per_hash)}; hashing pool: {os.cpu_count()} threads, of which an import uses "
          f"{hash_concurrency(core_stub)}")

    import_timings: dict[str, float] = {}

    def observe(event: dict) -> None:
        if event.get("log_namespace") == "kvmdesk.users.imports" and "timings" in event:
            import_timings.update(event["timings"])

    globalLogPublisher.addObserver(observe)
    with tempfile.TemporaryDirectory(prefix="kvmdesk-users-bench-") as directory:
        core = await make_core(Path(directory))
        freeze_startup_heap()  # as the twistd service does once its core is built
        port = reactor.listenTCP(0, make_site(core.router), interface="127.0.0.1")  # the production site
        api = Api(reactor, f"http://127.0.0.1:{port.getHost().port}/api/v1.0")
        try:
            api.token = (await api.call("POST", "/auth/login", {"username": "admin", "password": ADMIN_PASSWORD}))["token"]
            _, elapsed, idle, latencies = await watched(reactor, api, lambda: task.deferLater(reactor, 10, lambda: None))
            report("idle baseline (nothing but the probes, the machine's noise floor)", elapsed, idle, latencies)
            group = await api.call("POST", "/personal/group", {"name": "bench", "group_type": 2})
            target = await api.call("POST", "/personal/group", {"name": "bench-import", "group_type": 2})

            param = {"group_uuid": group["uuid"], "prefix": "bench", "postfix": 5, "postfix_start": 1,
                     "user_num": users, "passwd": "bench-password", "enabled": 1}
            result, elapsed, lag, latencies = await watched(
                reactor, api, lambda: api.call("POST", "/personal/user/", {"action": "multi_create", "param": param}))
            report(f"multi_create of {result['success_num']} users", elapsed, lag, latencies)

            pages = max(1, users // 10)
            times = []
            probe = LagProbe(reactor)
            GC.take()
            probe.start()
            for _ in range(queries):
                started = time.monotonic()
                page = await api.call("GET", "/personal/user/", params={
                    "searchtype": "all", "group": group["uuid"], "page": random.randint(1, pages), "page_size": 10})
                times.append(time.monotonic() - started)
            probe.stop()
            print(f"  paged query of the {page['count']}-user group ({queries} requests, page_size 10): "
                  f"p50 {ms(statistics.median(times))}, p99 {ms(percentile(times, 0.99))}, max {ms(max(times))}")
            print(f"      reactor lag: {probe.summary()}; longest GC pause {ms(GC.take())}")

            refs = []
            for number in range(1, users // 1000 + 2):
                found = await api.call("GET", "/personal/user/", params={"group": group["uuid"], "page": number, "page_size": 1000})
                refs.extend({"uuid": u["uuid"], "user_name": u["user_name"]} for u in found["results"])
                if not found["next"]:
                    break
            result, elapsed, lag, latencies = await watched(
                reactor, api, lambda: api.call("POST", "/personal/user/", {"action": "export", "param": {"filename": "bench", "users": refs}}))
            report(f"export of {result['success_num']} users", elapsed, lag, latencies)
            started = time.monotonic()
            workbook = await api.raw(result["url"])
            print(f"  download of the export ({len(workbook) / 1024:.0f} KiB): {ms(time.monotonic() - started)}")

            content = await defer_to_thread(reactor, import_workbook, users, target["name"])
            body, content_type = multipart({"enable": "1"}, "import.xlsx", content)
            result, elapsed, lag, latencies = await watched(
                reactor, api, lambda: api.call("POST", "/personal/user/upload", data=body, headers={"Content-Type": content_type}))
            report(f"import of {result['success_num']} users with distinct passwords ({len(content) / 1024:.0f} KiB)",
                   elapsed, lag, latencies)
            if import_timings:
                rest = elapsed - import_timings["hashing"]
                print(f"      phases: read {import_timings['read']:.2f} s, checks {import_timings['checks']:.2f} s, "
                      f"hashing {import_timings['hashing']:.2f} s ({int(import_timings['hashes'])} hashes, "
                      f"{ms(import_timings['hashing'] / max(1, import_timings['hashes']))} each on average), "
                      f"store {import_timings['store']:.2f} s; everything but hashing {rest:.2f} s")
        finally:
            await port.stopListening()
            await api.pool.closeCachedConnections()
            await core.store.close()
    globalLogPublisher.removeObserver(observe)
    print(f"  load average at the end: {os.getloadavg()[0]:.2f}")


def defer_to_thread(reactor: Any, fn: Callable, *args: Any) -> defer.Deferred:
    from twisted.internet.threads import deferToThreadPool

    return deferToThreadPool(reactor, reactor.getThreadPool(), fn, *args)


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=10000)
    parser.add_argument("--queries", type=int, default=200)
    options = parser.parse_args()
    task.react(lambda reactor: defer.ensureDeferred(main(reactor, options.users, options.queries)))


if __name__ == "__main__":
    run()
