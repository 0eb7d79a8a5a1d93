"""What running a batch as a persisted job costs, against the same batch in memory (``run_batch``).

A real core on a fresh SQLite store (in-process, the real reactor).  Each item's operation writes one
document to the store, like a batch item that changes a record.  For N items at concurrency C it runs:

1. ``run_batch`` (in memory: no job record);
2. ``core.jobs`` with the same items and operation: a job record with per-item results, saved as items
   finish (a write in progress takes every item that finishes meanwhile into the next one);

and prints the wall time of each, their ratio, and how many times the job record was written.

Target (issue 15): persisting progress does not serialise the batch: far fewer record writes than items,
and the job within 1.5x of the in-memory batch.  Figures depend on the machine and its load.

Usage::

    .venv/bin/python bench/jobs_bench.py [--items 500] [--concurrency 20] [--rounds 3]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from twisted.internet import defer, task

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvmdesk.core.jobs import run_batch  # noqa: E402
from kvmdesk.testing.api import make_core  # noqa: E402


async def main(reactor, options) -> None:
    with tempfile.TemporaryDirectory(prefix="kvmdesk-jobs-bench-") as tmp:
        core = await make_core(Path(tmp))
        try:
            things = core.store.collection("bench_things")

            async def operation(item):
                await things.insert_one({"uuid": item["uuid"] if isinstance(item, dict) else item})

            core.jobs.register("bench", lambda core, job: job.for_each(operation))
            req = SimpleNamespace(request_id="bench", lang="en", admin=None)
            items = [{"uuid": f"item-{n}", "name": f"item {n}"} for n in range(options.items)]
            memory, persisted, saves = [], [], []
            for _ in range(options.rounds):
                started = time.perf_counter()
                answer = await run_batch(req, items, operation, concurrency=options.concurrency)
                memory.append(time.perf_counter() - started)
                assert answer["success_num"] == options.items
                started = time.perf_counter()
                record = await core.jobs.submit("bench", title="bench", items=items, concurrency=options.concurrency)
                job = core.jobs.active[record["uuid"]]
                final = await job.done()
                persisted.append(time.perf_counter() - started)
                assert final["state"] == "succeeded" and final["success_num"] == options.items
                saves.append(job.saves)
            in_memory, as_job = statistics.median(memory), statistics.median(persisted)
            print(f"{options.items} items, concurrency {options.concurrency}, median of {options.rounds} rounds")
            print(f"  run_batch (in memory):  {as_time(in_memory)}  ({options.items / in_memory:,.0f} items/s)")
            print(f"  persisted job:          {as_time(as_job)}  ({options.items / as_job:,.0f} items/s)")
            print(f"  job / in memory:        {as_job / in_memory:.2f}x   (target <= 1.5x)")
            print(f"  job record writes:      {statistics.median(saves):.0f} for {options.items} items")
        finally:
            await core.store.close()


def as_time(seconds: float) -> str:
    return f"{seconds * 1000:8.1f} ms"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    options = parser.parse_args()
    task.react(lambda reactor: defer.ensureDeferred(main(reactor, options)))
