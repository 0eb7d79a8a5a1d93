"""The job service and the scheduler on every store backend: the store features they rely on
(upsert with ``$set``, find-one-and-update on a float, ``$regex`` prefixes, ``$lt``/``$lte`` on
numbers, ``$ne: None``, unique keys) behave the same on SQLite, briskdb and MongoDB."""
from types import SimpleNamespace

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.internet.task import Clock

from kvmdesk.core import errors, jobqueue, scheduler
from kvmdesk.core.config import Config
from kvmdesk.core.errors import ApiError
from kvmdesk.testing.stores import open_test_store

BACKENDS = ["sqlite", "briskdb", "mongo"]


@pytest.fixture(params=BACKENDS)
def core(request, tmp_path):
    store, cleanup = pytest_twisted.blockon(open_test_store(request.param, tmp_path))
    pytest_twisted.blockon(defer.ensureDeferred(store.ensure_indexes([*jobqueue.INDEXES, *scheduler.INDEXES])))
    clock = Clock()
    clock.advance(1_900_000_000)
    core = SimpleNamespace(store=store, clock=clock, config=Config())
    core.jobs = jobqueue.JobService(core)
    core.scheduler = scheduler.Scheduler(core)
    yield core
    pytest_twisted.blockon(cleanup())
    assert clock.getDelayedCalls() == []


@pytest_twisted.ensureDeferred
async def test_jobs_run_recover_and_prune(core):
    async def operation(item):
        if item["uuid"] == "bad":
            raise ApiError(errors.NOT_FOUND, resource="node", key="bad")

    core.jobs.register("k", lambda core, job: job.for_each(operation))
    finished = await core.jobs.run("k", title="t", items=["a", {"uuid": "bad", "name": "B"}], lang="en")
    assert (finished["state"], finished["success_num"], finished["failed_num"]) == ("partial", 1, 1)
    assert finished["items"][1] == {"uuid": "bad", "name": "B", "state": "failed", "code": errors.NOT_FOUND.code,
                                    "msg": "node not found: bad"}
    assert await core.jobs.get(finished["uuid"]) == finished

    # left running by a controller that stopped: interrupted at the next start
    left = await core.jobs.collection.insert_one(
        {**{k: v for k, v in finished.items() if k not in ("id",)}, "uuid": "left", "state": "running",
         "done": 1, "success_num": 1, "failed_num": 0, "finished_at": None, "finished_time": None,
         "items": [{**finished["items"][0]}, {"uuid": "x", "name": None, "state": "pending", "code": None, "msg": None}]})
    core.jobs.startService()
    await core.jobs.recovered
    await core.jobs.pruning
    record = await core.jobs.get(left["uuid"])
    assert record["state"] == "interrupted" and [i["state"] for i in record["items"]] == ["succeeded", "interrupted"]
    core.clock.advance(31 * 86400)
    await core.jobs.pruning  # the sweep the clock started
    assert await core.jobs.collection.count({}) == 0
    await core.jobs.stopService()


@pytest_twisted.ensureDeferred
async def test_schedules_replace_fire_and_rearm(core):
    calls = []

    async def handler(core, entry):
        calls.append(entry["payload"]["n"])
        return "ok"

    core.scheduler.register("s", handler)
    core.scheduler.startService()
    try:
        now = core.clock.seconds()
        await core.scheduler.schedule("save:a", now + 50.5, "s", {"n": 1})
        await core.scheduler.schedule("save:a", now + 100.25, "s", {"n": 2})
        await core.scheduler.schedule("other", now + 10 * 86400, "s", {"n": 9})
        weekly = await core.scheduler.schedule_weekly("save:w", "s", {"n": 3}, [{"weekday": 1, "time": "06:00"}])
        assert [e["key"] for e in await core.scheduler.list("save:")] == ["save:a", "save:w"]
        assert await core.scheduler.collection.count({"key": "save:a"}) == 1
        core.clock.advance(100.25)
        await core.scheduler.idle()
        assert calls == [2] and await core.scheduler.get("save:a") is None
        assert [r["result"] for r in await core.scheduler.history("save:a")] == ["ok"]
        core.clock.advance(weekly["next_time"] - core.clock.seconds())
        await core.scheduler.idle()
        assert calls == [2, 3]
        assert (await core.scheduler.get("save:w"))["next_time"] == weekly["next_time"] + 7 * 86400
    finally:
        await core.scheduler.stopService()
