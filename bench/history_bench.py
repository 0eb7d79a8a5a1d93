"""Benchmark of the monitoring history; prints figures, asserts nothing.

    .venv/bin/python bench/history_bench.py [--store sqlite|briskdb|both] [--nodes 100] [--days 30]
                                            [--queries 200] [--ingest-nodes 1000]

For each store backend, a real controller core (every built-in plugin, no local agent) on a fresh
store (SQLite in a temporary directory; or txmongo against a briskdb MongoDB-wire server started and
stopped by the run) is filled with ``--nodes`` nodes x ``--days`` days of one-minute rollup points, in
the plugin's own layout (hours older than the head's two sealed into one document per node and day;
the head's two hours as fragments, one per minute with every node's point, as the flushes write
them), in batches; the load time is printed.  Then a controller is started again on the filled store
(the head is read back from the fragments, the node uuids from their records): its start time and
what the head holds in memory are printed.  Then:

- the store's floor: an empty round trip (``ping``) and a one-document indexed read;
- where a cold 24-hour answer's time goes: store read of the day documents (with its JSON/BSON
  decode), the decode alone, minute columns (the read again, the head laid over), series, axis, JSON
  encoding of the answer (medians);
- history latency: ``GET /monitor_mgr/node/history/`` of a random node through the API (token check,
  parameters, store read, the aligned axis, JSON), 1 hour at a 1-minute step and 24 hours at a
  1-minute step (1,440 points): p50, p99, max over ``--queries`` requests each, twice: ``cold`` with
  the hour cache and the axis emptied before every request (a node's first view since the start), and
  ``mixed`` with the caches on (random nodes: a node's first view is cold, a later one warm).  The
  head is not a cache: it is where the controller, the only writer, keeps the recent hours it wrote,
  read back at every start;
- ingest rate: ``--ingest-nodes`` nodes send one minute of heartbeats at the watchers' interval
  (5 s: 12 samples each) through ``kvmdesk_node_metrics``, then the minute is flushed to the filled
  store; samples per second over both, for two minutes in a row.  Target: 10x what 1,000 nodes
  produce (200 samples/s), i.e. >= 2,000 samples/s;
- the hourly seal: the previous hour of every filled node packed into its day document.

Targets: 1 h < 20 ms, 24 h < 100 ms (p99).  ``os.getloadavg()`` is printed at the start, after each
fill and at the end: the figures are wall-clock times on a possibly shared machine.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import orjson
from twisted.internet import defer, task

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kvmdesk.core.app import freeze_startup_heap  # noqa: E402
from kvmdesk.core.records import new_record  # noqa: E402
from kvmdesk.plugins.monitoring.columns import Columns, put_point, series  # noqa: E402
from kvmdesk.plugins.monitoring.days import DAYS, day_of, pack, slot_of  # noqa: E402
from kvmdesk.plugins.monitoring.perf import axis_times, clear_axis_cache  # noqa: E402
from kvmdesk.plugins.monitoring.rollups import HEAD_HOURS, MINUTES, fragments  # noqa: E402
from kvmdesk.testing.api import ApiClient, make_core  # noqa: E402
from kvmdesk.testing.briskdb import start_briskdb  # noqa: E402

HEARTBEAT = 5.0


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100.0 * (len(ordered) - 1))))]


def point(rng: random.Random) -> dict[str, Any]:
    """A minute point like the plugin writes: CPU, memory, two disks, two NICs."""
    return {"c": round(rng.uniform(0, 100), 2), "mp": round(rng.uniform(10, 90), 2), "mu": rng.randrange(1 << 30, 1 << 34),
            "d": {"sda": [rng.randrange(0, 1 << 20), rng.randrange(0, 1 << 22)], "sdb": [0, rng.randrange(0, 4096)]},
            "n": {"eth0": [rng.randrange(0, 1 << 20), rng.randrange(0, 1 << 20)], "eth1": [rng.randrange(0, 512), 0]}}


def metrics(rng: random.Random) -> dict[str, Any]:
    """A heartbeat's metrics as an agent sends them (no processes)."""
    return {"interval": HEARTBEAT, "cpu": {"percent": rng.uniform(0, 100)},
            "memory": {"percent": rng.uniform(10, 90), "used": rng.randrange(1 << 30, 1 << 34), "total": 1 << 35,
                       "available": 1 << 33},
            "disks": [{"name": n, "read_bytes_per_sec": rng.uniform(0, 1e6), "write_bytes_per_sec": rng.uniform(0, 1e6)}
                      for n in ("sda", "sdb")],
            "nics": [{"name": n, "recv_bytes_per_sec": rng.uniform(0, 1e6), "sent_bytes_per_sec": rng.uniform(0, 1e6)}
                     for n in ("eth0", "eth1")]}


def hour_of_points(minutes: dict[str, Any]) -> Columns:
    """An hour's columns from its points by minute slot."""
    columns: Columns = {}
    for slot, minute_point in minutes.items():
        put_point(columns, int(slot), 60, minute_point)
    return columns


async def fill(core: Any, nodes: list[dict], days: int, rng: random.Random, batch_size: int,
               concurrency: int) -> tuple[int, float]:
    """``days`` of hours per node, ending with the current minute, as the plugin keeps them: the hours
    older than the head's two sealed into day documents, the head's hours as fragments (one per minute
    with every node's point, as the flushes write them); returns (documents, seconds)."""
    now = time.time()
    last_hour = int(now // 3600 * 3600)
    first_hour = last_hour - (days * 24 - 1) * 3600
    head_from = last_hour - (HEAD_HOURS - 1) * 3600
    # 64 different hours of points, reused: generating 4 million random points would dominate the fill.
    minutes = [{str(m): point(rng) for m in range(60)} for _ in range(64)]
    packed = [pack(hour_of_points(m)) for m in minutes]
    day_docs = []
    for node in nodes:
        for day in range(day_of(first_hour), head_from, 86400):
            doc = {"node": node["uuid"], "day": day}
            for hour in range(max(day, first_hour), min(day + 86400, head_from), 3600):
                doc[slot_of(hour)] = packed[(hour // 3600) % 64]
            day_docs.append(doc)
    fragment_docs = [doc for minute in range(head_from, int(now // 60 * 60), 60)
                     for doc in fragments([(node["uuid"], minute, minutes[(minute // 3600) % 64][str(minute % 3600 // 60)])
                                           for node in nodes])]
    semaphore = defer.DeferredSemaphore(concurrency)
    started = time.perf_counter()
    written = 0

    async def insert(collection: str, batch: list[dict]) -> None:
        nonlocal written
        outcomes = await core.store.collection(collection).insert_many(batch)
        if any(isinstance(o, Exception) for o in outcomes):
            raise RuntimeError(f"insert failed: {outcomes}")
        written += len(batch)

    for collection, docs in ((DAYS, day_docs), (MINUTES, fragment_docs)):
        pending = []
        for at in range(0, len(docs), batch_size):
            batch = docs[at:at + batch_size]
            pending.append(semaphore.run(lambda c=collection, b=batch: defer.ensureDeferred(insert(c, b))))
        await defer.gatherResults(pending, consumeErrors=True)
    return written, time.perf_counter() - started


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


async def latency(api: ApiClient, nodes: list[dict], hours: int, queries: int, rng: random.Random,
                  cpu: Optional[list[float]] = None, cold: bool = False) -> list[float]:
    """Wall-clock seconds of each request; ``cpu`` gets the process's CPU seconds of each (all threads:
    what a request costs, apart from waiting for a core on a busy machine).  ``cold``: the hour cache
    and the cached axes are emptied before each request."""
    times = []
    cache = api.core.extensions["monitoring"].rollups.cache
    for _ in range(queries):
        node = rng.choice(nodes)
        if cold:
            cache.entries.clear()
            clear_axis_cache()
        started, cpu_started = time.perf_counter(), time.process_time()
        status, body = await api.call("GET", "/monitor_mgr/node/history/",
                                      params={"node_uuid": node["uuid"], "statis_hours": hours, "step_minutes": 1})
        times.append(time.perf_counter() - started)
        if cpu is not None:
            cpu.append(time.process_time() - cpu_started)
        if status != 200 or len(body["data"]["time"]) != hours * 60:
            raise RuntimeError(f"unexpected answer: {status} {str(body)[:300]}")
    return times


async def floor(core: Any, nodes: list[dict], rounds: int = 50) -> str:
    """The store's own cost: an empty round trip, and one node record by an indexed field."""
    ping, one = [], []
    for i in range(rounds):
        started = time.perf_counter()
        await core.store.ping()
        ping.append(time.perf_counter() - started)
        started = time.perf_counter()
        await core.store.collection("nodes").find_one({"uuid": nodes[i % len(nodes)]["uuid"]})
        one.append(time.perf_counter() - started)
    return (f"empty round trip (ping) p50 {ms(statistics.median(ping))}, p99 {ms(percentile(ping, 99))}; "
            f"one node record by uuid p50 {ms(statistics.median(one))}, p99 {ms(percentile(one, 99))}")


async def phases(core: Any, nodes: list[dict], rounds: int = 20) -> str:
    """Medians of the parts of a cold 24-hour answer at a 1-minute step, timed one by one."""
    rollups = core.extensions["monitoring"].rollups
    now = core.clock.seconds()
    last = int(now // 60 * 60) - 60
    first = last - 1439 * 60
    hours = list(range(first - first % 3600, last - last % 3600 + 3600, 3600))
    parts: dict[str, list[float]] = {k: [] for k in ("store read", "decode alone", "columns (with the read)",
                                                     "series", "axis", "encode")}
    for node in nodes[:rounds]:
        started = time.perf_counter()
        docs = await core.store.collection(DAYS).find({"node": node["uuid"], "day": {"$in": sorted({day_of(h) for h in hours})}})
        parts["store read"].append(time.perf_counter() - started)
        texts = [orjson.dumps(doc) for doc in docs]
        started = time.perf_counter()
        for text in texts:
            orjson.loads(text)
        parts["decode alone"].append(time.perf_counter() - started)
        rollups.cache.entries.clear()
        started = time.perf_counter()
        columns = await rollups.columns(node["uuid"], first, 1440)
        parts["columns (with the read)"].append(time.perf_counter() - started)
        started = time.perf_counter()
        answer = series(columns, 1440, 1)
        parts["series"].append(time.perf_counter() - started)
        started = time.perf_counter()
        clear_axis_cache()
        answer["time"] = axis_times(first, 60, 1440)
        parts["axis"].append(time.perf_counter() - started)
        started = time.perf_counter()
        orjson.dumps({"code": 0, "msg": "ok", "data": answer})
        parts["encode"].append(time.perf_counter() - started)
    return ", ".join(f"{name} {ms(statistics.median(values))}" for name, values in parts.items()) + \
        f" ({len(docs)} day documents; {sum(1 for h in hours if (nodes[0]['uuid'], h) in rollups.head)} hours from the head)"


async def head_memory(store: Any) -> tuple[int, int]:
    """The head rebuilt from the store once more: (node-hours, bytes it holds, by tracemalloc)."""
    import tracemalloc

    from kvmdesk.plugins.monitoring.rollups import Rollups

    fresh = Rollups(store)
    tracemalloc.start()
    try:
        await fresh.load()
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return len(fresh.head), held


async def ingest(core: Any, count: int, rng: random.Random, minutes_ago: int) -> tuple[int, float, float]:
    """One minute of heartbeats of ``count`` nodes, then its flush: (samples, receive s, flush s)."""
    nodes = [{"uuid": f"ingest-{i:05d}", "name": f"ingest-{i}", "ip": f"10.9.{i // 250}.{i % 250}"} for i in range(count)]
    hook = core.plugins.hook.kvmdesk_node_metrics
    start = time.time() // 60 * 60 - 60 * minutes_ago
    bodies = [metrics(rng) for _ in range(64)]
    samples = 0
    began = time.perf_counter()
    for round_ in range(int(60 / HEARTBEAT)):
        at = start + round_ * HEARTBEAT
        for node in nodes:
            hook(core=core, node=node, sample={"at": at, "metrics": bodies[samples % 64]})
            samples += 1
    received = time.perf_counter() - began
    began = time.perf_counter()
    await core.extensions["monitoring"].rollups.flush()
    return samples, received, time.perf_counter() - began


async def run_backend(backend: str, args: argparse.Namespace, workdir: Path) -> None:
    rng = random.Random(7)
    stop = None
    config: dict[str, Any] = {"agent": {"local": False}}
    if backend == "briskdb":
        uri, stop = start_briskdb(workdir / "briskdb")
        config["store"] = {"uri": uri + "kvmdesk_bench?implicit_session=false", "timeout": 120}
    core = await make_core(workdir / backend, config=config)
    try:
        api = ApiClient(core)
        await api.login()
        nodes = []
        for i in range(args.nodes):
            record = new_record(core.clock, name=f"bench-{i}", ip=f"10.8.{i // 250}.{i % 250}", type=5, state="online")
            nodes.append(await core.store.collection("nodes").insert_one(record))
        # briskdb refuses a write batch past its decoded-memory budget (some 16-30 of these documents);
        # several batches in flight keep its fill time bearable.
        batch, concurrency = (100, 1) if backend == "sqlite" else (4, 4)
        docs, seconds = await fill(core, nodes, args.days, rng, batch, concurrency)
        points = args.nodes * args.days * 24 * 60
        print(f"[{backend}] filled {args.nodes} nodes x {args.days} days: {docs} day documents and fragments, "
              f"{points:,} minute points in {seconds:.1f} s ({points / seconds:,.0f} points/s bulk); "
              f"load average {loadavg()}", flush=True)
        # A controller started on the filled store: what it reads back at start is part of the design.
        await core.store.close()
        started = time.perf_counter()
        core = await make_core(workdir / backend, config=config)
        restart = time.perf_counter() - started
        freeze_startup_heap()  # as the twistd service does once its core is built
        api = ApiClient(core)
        await api.login()
        node_hours, held = await head_memory(core.store)
        print(f"[{backend}] controller restarted on it in {restart:.2f} s; its head: {node_hours} node-hours "
              f"({held / node_hours / 1024:.1f} KiB each by tracemalloc, {held / 2**20:.1f} MiB in all; "
              f"1,000 nodes' two hours: about {2000 * held / node_hours / 2**20:.0f} MiB)", flush=True)
        print(f"[{backend}] store floor: {await floor(core, nodes)}", flush=True)
        print(f"[{backend}] cold 24 h answer, medians: {await phases(core, nodes)}", flush=True)
        for hours, target in ((1, 0.020), (24, 0.100)):
            await latency(api, nodes, hours, 5, rng)  # warm-up
            for cold in (True, False):
                cpu: list[float] = []
                times = await latency(api, nodes, hours, args.queries, rng, cpu, cold=cold)
                p99 = percentile(times, 99)
                print(f"[{backend}] history {hours:>2} h at 1 min ({hours * 60} points), {'cold ' if cold else 'mixed'}: "
                      f"p50 {ms(statistics.median(times))}, p99 {ms(p99)}, max {ms(max(times))}  "
                      f"(target p99 < {ms(target)}: {'met' if p99 < target else 'NOT met'}); "
                      f"CPU per request p50 {ms(statistics.median(cpu))}, p99 {ms(percentile(cpu, 99))}", flush=True)
        # Two minutes in a row (the second one adds to the head's hours the first one made).
        for minutes_ago, kind in ((2, "a minute"), (1, "the next minute")):
            samples, received, flushed = await ingest(core, args.ingest_nodes, rng, minutes_ago)
            rate = samples / (received + flushed)
            need = 10 * 1000 / HEARTBEAT
            print(f"[{backend}] ingest into {kind}: {samples:,} samples of {args.ingest_nodes} nodes: hook "
                  f"{ms(received)}, flush of {args.ingest_nodes} node-minutes {ms(flushed)}; {rate:,.0f} samples/s "
                  f"(target >= {need:,.0f}: {'met' if rate >= need else 'NOT met'}); load average {loadavg()}",
                  flush=True)
        # The hourly seal: an hour later, the previous hour of every filled node leaves the head.
        rollups = core.extensions["monitoring"].rollups
        began = time.perf_counter()
        sealed = await rollups.seal(time.time() + 3600, core.extensions["monitoring"].settings.prune_chunk)
        print(f"[{backend}] hourly seal: {sealed} node-hours into day documents in {time.perf_counter() - began:.2f} s "
              f"(in the background, once an hour); load average {loadavg()}", flush=True)
    finally:
        await core.store.close()
        if stop is not None:
            stop()


async def main(reactor: Any, args: argparse.Namespace) -> None:
    print(f"load average at start: {loadavg()}", flush=True)
    backends = ["sqlite", "briskdb"] if args.store == "both" else [args.store]
    with tempfile.TemporaryDirectory(prefix="kvmdesk-history-bench-") as tmp:
        for backend in backends:
            await run_backend(backend, args, Path(tmp))
    print(f"load average at end: {loadavg()}")


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", "--backend", dest="store", choices=["sqlite", "briskdb", "both"], default="both")
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--ingest-nodes", type=int, default=1000)
    return parser.parse_args()


if __name__ == "__main__":
    arguments = parse()
    task.react(lambda reactor: defer.ensureDeferred(main(reactor, arguments)))
