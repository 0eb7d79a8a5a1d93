"""Persisted jobs: per-item results and progress, the batch answer with job_id, restarts, cancel, the API."""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.internet.task import Clock

from core_testlib import assert_error, running_api
from kvmdesk.core import errors, jobqueue
from kvmdesk.core.errors import ApiError
from kvmdesk.core.jobs import run_batch
from kvmdesk.testing.api import make_core
from kvmdesk.testing.api import running_jobs as started


def _req(lang: str = "zh") -> SimpleNamespace:
    return SimpleNamespace(request_id="abcdef012345", lang=lang, admin={"username": "admin"})


async def _operation(item: Any) -> str:
    name = item["name"] if isinstance(item, dict) else item
    if name.startswith("missing"):
        raise ApiError(errors.NOT_FOUND, resource="资源池", key=name)
    if name.startswith("crash"):
        raise RuntimeError("unexpected")
    return name


class Gates:
    """An operation whose items finish when the test says so (per uuid), and a log of what started."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.gates: dict[str, defer.Deferred] = {}
        self.starts: dict[str, defer.Deferred] = {}

    def when_started(self, uuid: str) -> defer.Deferred:
        return self.starts.setdefault(uuid, defer.Deferred())

    def release(self, uuid: str, error: ApiError | None = None) -> None:
        gate = self.gates.setdefault(uuid, defer.Deferred())
        gate.callback(error)

    async def __call__(self, item: dict | str) -> None:
        uuid = item if isinstance(item, str) else item["uuid"]
        self.started.append(uuid)
        self.when_started(uuid).callback(None)
        error = await self.gates.setdefault(uuid, defer.Deferred())
        if error is not None:
            raise error


async def stored(core: Any, uuid: str) -> dict:
    return await core.store.collection(jobqueue.COLLECTION).find_one({"uuid": uuid})


@pytest_twisted.ensureDeferred
async def test_run_items_answers_the_batch_shape_with_a_job_id(tmp_path, clock):
    items = ["a", "missing-1", {"uuid": "u-2", "name": "missing-2", "state": "running"}, "crash", "b"]
    async with running_api(tmp_path, clock) as api:
        core = api.core
        answer = await core.jobs.run_items(_req("en"), "test.batch", items, _operation, concurrency=2)
        expected = await run_batch(_req("en"), items, _operation, concurrency=2)
        assert {k: v for k, v in answer.items() if k != "job_id"} == expected
        record = await stored(core, answer["job_id"])
        assert (record["state"], record["total"], record["done"], record["progress"]) == ("partial", 5, 5, 100)
        assert (record["success_num"], record["failed_num"], record["admin"]) == (2, 3, "admin")
        assert [(i["uuid"], i["name"], i["state"], i["code"]) for i in record["items"]] == [
            ("a", None, "succeeded", 0),
            ("missing-1", None, "failed", errors.NOT_FOUND.code),
            ("u-2", "missing-2", "failed", errors.NOT_FOUND.code),
            ("crash", None, "failed", errors.INTERNAL_ERROR.code),
            ("b", None, "succeeded", 0),
        ]
        assert record["items"][1]["msg"] == "资源池 not found: missing-1"
        assert record["finished_at"] and record["started_at"] and record["error"] is None


@pytest_twisted.ensureDeferred
async def test_run_items_without_an_operation_runs_the_registered_kind_on_whole_items(tmp_path, clock):
    async def runner(core, job):
        await job.for_each(lambda item: _operation(item["name"]) if item["node"] else _operation("missing"))

    items = [{"uuid": "u-1", "name": "a", "node": "n1"}, {"uuid": "u-2", "name": "b", "node": None}]
    async with running_api(tmp_path, clock) as api:
        api.core.jobs.register("test.registered", runner, on_restart="resume")
        answer = await api.core.jobs.run_items(_req("en"), "test.registered", items)
        assert (answer["success_num"], answer["failed_num"]) == (1, 1)
        assert answer["failures"] == [{"uuid": "u-2", "name": "b", "code": errors.NOT_FOUND.code,
                                       "msg": "资源池 not found: missing"}]
        record = await stored(api.core, answer["job_id"])
        # kept whole, with the registered runner: a restart resumes such a job
        assert [i["node"] for i in record["items"]] == ["n1", None] and record["custom_runner"] is False


@pytest_twisted.ensureDeferred
async def test_run_items_lists_what_operations_said_like_run_batch(tmp_path, clock):
    async def reports(item):
        if item == "quiet":
            return None
        return {"left": [f"{item}-bridge"]}

    async with running_api(tmp_path, clock) as api:
        answer = await api.core.jobs.run_items(_req(), "test.said", ["n1", "quiet", "n2"], reports)
        assert answer["results"] == [{"uuid": "n1", "left": ["n1-bridge"]}, {"uuid": "n2", "left": ["n2-bridge"]}]
        assert {k: v for k, v in answer.items() if k != "job_id"} == await run_batch(_req(), ["n1", "quiet", "n2"], reports)
        record = await stored(api.core, answer["job_id"])
        assert [i.get("result") for i in record["items"]] == [{"left": ["n1-bridge"]}, None, {"left": ["n2-bridge"]}]


@pytest_twisted.ensureDeferred
async def test_run_items_with_one_failing_item_raises_its_error_and_keeps_the_job(tmp_path, clock):
    async with running_api(tmp_path, clock) as api:
        with pytest.raises(ApiError) as raised:
            await api.core.jobs.run_items(_req(), "test.batch", ["missing-9"], _operation)
        assert raised.value.error is errors.NOT_FOUND and raised.value.message() == "资源池不存在: missing-9"
        [record] = await api.core.store.collection(jobqueue.COLLECTION).find({})
        assert record["state"] == "failed" and record["items"][0]["msg"] == "资源池不存在: missing-9"
        with pytest.raises(ApiError) as raised:
            await api.core.jobs.run_items(_req(), "test.batch", [], _operation)
        assert raised.value.error is errors.BATCH_EMPTY


@pytest_twisted.ensureDeferred
async def test_progress_and_item_results_are_saved_as_items_finish(tmp_path, clock):
    gates = Gates()
    async with running_api(tmp_path, clock) as api:
        core = api.core
        core.jobs.register("test.gated", lambda core, job: job.for_each(gates))
        record = await core.jobs.submit("test.gated", title="five", items=[f"i{n}" for n in range(5)],
                                        concurrency=5, lang="en")
        assert record["state"] == "running" and record["progress"] == 0 and record["items"][0]["state"] == "pending"
        job = core.jobs.active[record["uuid"]]
        gates.release("i0")
        gates.release("i3", ApiError(errors.IN_USE, resource="node", reason="busy"))
        await job.flush()
        saved = await stored(core, record["uuid"])
        assert (saved["state"], saved["done"], saved["progress"], saved["failed_num"]) == ("running", 2, 40, 1)
        assert [i["state"] for i in saved["items"]] == ["succeeded", "pending", "pending", "failed", "pending"]
        assert saved["items"][3]["msg"] == "node is in use and cannot be deleted: busy"
        # saved at most once a [jobs] save_interval: the next change waits for the clock
        saves = job.saves
        gates.release("i1")
        assert job.saves == saves and len(clock.getDelayedCalls()) == 1
        clock.advance(1)
        assert job.saves == saves + 1 and clock.getDelayedCalls() == []
        await job.flush()
        assert (await stored(core, record["uuid"]))["items"][1]["state"] == "succeeded"
        for uuid in ("i2", "i4"):
            gates.release(uuid)
        final = await core.jobs.wait(record["uuid"])
        assert (final["state"], final["progress"], final["success_num"], final["failed_num"]) == ("partial", 100, 4, 1)
        assert await stored(core, record["uuid"]) == final
        assert await core.jobs.wait(record["uuid"]) == final


@pytest_twisted.ensureDeferred
async def test_runner_results_and_failures_are_recorded(tmp_path, clock):
    async def returns(core, job):
        job.set_progress(50)
        return {"version": 3}

    async def refuses(core, job):
        raise ApiError(errors.IN_USE, resource="template", reason="updating")

    async def crashes(core, job):
        raise RuntimeError("boom")

    async with running_api(tmp_path, clock) as api:
        jobs = api.core.jobs
        for kind, runner in (("t.ok", returns), ("t.refuse", refuses), ("t.crash", crashes)):
            jobs.register(kind, runner)
        ok = await jobs.run("t.ok", title="ok", lang="en")
        assert (ok["state"], ok["result"], ok["progress"], ok["total"]) == ("succeeded", {"version": 3}, 100, 0)
        refused = await jobs.run("t.refuse", title="refused", lang="en")
        assert refused["state"] == "failed"
        assert refused["error"] == {"code": errors.IN_USE.code, "msg": "template is in use and cannot be deleted: updating"}
        crashed = await jobs.run("t.crash", title="crashed", request_id="rid-1")
        assert crashed["state"] == "failed" and crashed["error"]["code"] == errors.INTERNAL_ERROR.code
        assert "rid-1" in crashed["error"]["msg"]
        with pytest.raises(ValueError):
            await jobs.submit("t.unknown", title="nobody runs this")
        with pytest.raises(ValueError):
            jobs.register("t.ok", crashes)


@pytest.mark.parametrize("on_restart", ["fail", "resume"])
@pytest_twisted.ensureDeferred
async def test_a_restart_fails_or_resumes_the_jobs_left_running(tmp_path, on_restart):
    clock = Clock()
    gates = Gates()
    core = await make_core(tmp_path, clock=clock)
    try:
        core.jobs.startService()
        core.jobs.register("test.nodes", lambda core, job: job.for_each(gates), on_restart=on_restart)
        record = await core.jobs.submit("test.nodes", title="nodes", items=[f"n{i}" for i in range(5)],
                                        concurrency=1, lang="en")
        gates.release("n0")
        assert gates.started == ["n0", "n1"]
        # the controller stops while n1 runs: stopping waits for n1, and no further item starts
        stopping = core.jobs.stopService()
        assert not stopping.called
        gates.release("n1")
        await stopping
        assert gates.started == ["n0", "n1"]
    finally:
        await core.store.close()

    again = Gates()
    second = await make_core(tmp_path, clock=clock)
    try:
        left = await stored(second, record["uuid"])
        assert (left["state"], left["done"], left["progress"]) == ("running", 2, 40)
        second.jobs.register("test.nodes", lambda core, job: job.for_each(again), on_restart=on_restart)
        async with started(second):
            await second.jobs.recovered
            if on_restart == "fail":
                final = await stored(second, record["uuid"])
                assert final["state"] == "interrupted"
                assert final["error"] == {"code": jobqueue.JOB_INTERRUPTED.code,
                                          "msg": "interrupted by a controller restart"}
                assert [i["state"] for i in final["items"]] == ["succeeded"] * 2 + ["interrupted"] * 3
                assert (final["success_num"], final["failed_num"]) == (2, 3) and final["finished_at"]
                assert again.started == []
            else:
                for uuid in ("n2", "n3", "n4"):
                    again.release(uuid)
                final = await second.jobs.wait(record["uuid"])
                assert again.started == ["n2", "n3", "n4"]
                assert (final["state"], final["success_num"], final["resumed"]) == ("succeeded", 5, 1)
                assert await stored(second, record["uuid"]) == final
    finally:
        await second.store.close()
    assert clock.getDelayedCalls() == []


@pytest_twisted.ensureDeferred
async def test_a_batch_of_a_one_off_runner_is_interrupted_by_a_restart_even_if_its_kind_resumes(tmp_path):
    clock = Clock()
    gates = Gates()
    core = await make_core(tmp_path, clock=clock)
    try:
        core.jobs.register("test.kind", lambda core, job: job.for_each(gates), on_restart="resume")
        batch = defer.ensureDeferred(core.jobs.run_items(_req(), "test.kind", ["x", "y"], gates))
        await gates.when_started("x")
        stopping = core.jobs.stopService()
        gates.release("x")
        await stopping
        with pytest.raises(ApiError) as raised:
            await batch
        assert raised.value.error is jobqueue.JOB_INTERRUPTED and gates.started == ["x"]
    finally:
        await core.store.close()
    second = await make_core(tmp_path, clock=clock)
    try:
        second.jobs.register("test.kind", lambda core, job: job.for_each(gates), on_restart="resume")
        async with started(second):
            await second.jobs.recovered
            [final] = await second.store.collection(jobqueue.COLLECTION).find({})
            assert final["state"] == "interrupted"
            assert [i["state"] for i in final["items"]] == ["succeeded", "interrupted"]
            assert gates.started == ["x"]
    finally:
        await second.store.close()
    assert clock.getDelayedCalls() == []


@pytest_twisted.ensureDeferred
async def test_cancel_stops_further_items_and_a_finished_job_cannot_be_cancelled(tmp_path, clock):
    gates = Gates()
    async with running_api(tmp_path, clock) as api:
        core = api.core
        core.jobs.register("test.gated", lambda core, job: job.for_each(gates))
        record = await core.jobs.submit("test.gated", title="three", items=["c0", "c1", "c2"], concurrency=1)
        status, body = await api.call("POST", f"/jobs/{record['uuid']}/cancel")
        assert status == 200 and body["data"]["cancel_requested"] is True, body
        gates.release("c0")
        final = await core.jobs.wait(record["uuid"])
        assert gates.started == ["c0"]
        assert final["state"] == "cancelled"
        assert [(i["state"], i["code"]) for i in final["items"]] == [
            ("succeeded", 0), ("cancelled", jobqueue.JOB_CANCELLED.code), ("cancelled", jobqueue.JOB_CANCELLED.code)]
        status, body = await api.call("POST", f"/jobs/{record['uuid']}/cancel")
        assert_error(status, body, 409, jobqueue.JOB_FINISHED.code)
        status, body = await api.call("POST", "/jobs/no-such-job/cancel")
        assert_error(status, body, 404, errors.NOT_FOUND.code)


@pytest_twisted.ensureDeferred
async def test_job_api_detail_paged_list_search_and_refusals(tmp_path, clock):
    async with running_api(tmp_path, clock) as api:
        core = api.core
        done = await core.jobs.run_items(_req(), "pool.delete", ["a", "b"], _operation, title="delete pools")
        await core.jobs.run_items(_req(), "node.start", ["missing-1", "c"], _operation, title="start nodes")
        await core.jobs.run_items(_req(), "node.start", ["d"], _operation, title="start one node")

        status, body = await api.call("GET", f"/jobs/{done['job_id']}")
        assert status == 200 and body["code"] == 0
        job = body["data"]
        assert (job["kind"], job["state"], job["title"]) == ("pool.delete", "succeeded", "delete pools")
        assert [i["uuid"] for i in job["items"]] == ["a", "b"]

        status, body = await api.call("GET", "/jobs", params={"page_size": 2})
        page = body["data"]
        assert status == 200 and page["count"] == 3 and page["next"] and page["previous"] is None
        assert [j["title"] for j in page["results"]] == ["start one node", "start nodes"]
        assert all("items" not in j for j in page["results"])

        status, body = await api.call("GET", "/jobs", params={"kind": "node.start", "state": "partial"})
        assert [j["title"] for j in body["data"]["results"]] == ["start nodes"]
        status, body = await api.call("GET", "/jobs", params={"searchtype": "contain", "title": "POOL"})
        assert [j["uuid"] for j in body["data"]["results"]] == [done["job_id"]]
        status, body = await api.call("GET", "/jobs", params={"color": "red"})
        assert_error(status, body, 400, errors.UNKNOWN_FILTER.code)

        status, body = await api.call("GET", "/jobs/no-such-job")
        assert_error(status, body, 404, errors.NOT_FOUND.code)
        for path in ("/jobs", f"/jobs/{done['job_id']}"):
            status, body = await api.call("GET", path, auth=False)
            assert_error(status, body, 401, errors.UNAUTHENTICATED.code)


@pytest_twisted.ensureDeferred
async def test_finished_jobs_are_pruned_after_the_retention_period(tmp_path, clock):
    config = {"jobs": {"retention_days": 2, "prune_interval": 3600}}
    async with running_api(tmp_path, clock, config=config) as api:
        core = api.core
        await core.jobs.run_items(_req(), "t", ["a"], _operation)  # finished 2 days + 1 s before the sweep
        clock.advance(86400)
        recent = await core.jobs.run_items(_req(), "t", ["b"], _operation)
        gates = Gates()
        core.jobs.register("t.open", lambda core, job: job.for_each(gates))
        running = await core.jobs.submit("t.open", title="never ends", items=["z"])
        clock.advance(86400 + 1)
        async with started(core):
            await core.jobs.recovered
            await core.jobs.pruning  # the first sweep runs at start-up
            left = {j["uuid"] for j in await core.store.collection(jobqueue.COLLECTION).find({})}
            assert left == {recent["job_id"], running["uuid"]}
            gates.release("z")
            await core.jobs.wait(running["uuid"])
            clock.advance(86400)
            first_sweep = core.jobs.pruning
            clock.advance(3600)  # the next sweep
            assert core.jobs.pruning is not first_sweep
            await core.jobs.pruning
            left = {j["uuid"] for j in await core.store.collection(jobqueue.COLLECTION).find({})}
            assert left == {running["uuid"]}


@pytest_twisted.ensureDeferred
async def test_the_core_runs_jobs_and_scheduler_as_its_last_services(tmp_path, clock):
    async with running_api(tmp_path, clock) as api:
        services = list(api.core.services)
        assert services[-2:] == [api.core.jobs, api.core.scheduler]
        assert api.core.services.getServiceNamed("jobs") is api.core.jobs


@pytest_twisted.ensureDeferred
async def test_a_runner_without_items_that_stops_with_the_controller_is_resumed(tmp_path):
    clock = Clock()
    step = defer.Deferred()
    runs = []

    async def publish(core, job):
        runs.append(job.record["resumed"])
        if job.record["resumed"] == 0:
            await step
            if not job.keep_going():
                raise ApiError(jobqueue.JOB_INTERRUPTED)
        job.set_progress(100)
        return {"version": 2}

    core = await make_core(tmp_path, clock=clock)
    try:
        core.jobs.register("test.publish", publish, on_restart="resume")
        record = await core.jobs.submit("test.publish", title="publish")
        stopping = core.jobs.stopService()
        step.callback(None)
        await stopping
        assert (await stored(core, record["uuid"]))["state"] == "running"
    finally:
        await core.store.close()
    second = await make_core(tmp_path, clock=clock)
    try:
        second.jobs.register("test.publish", publish, on_restart="resume")
        async with started(second):
            await second.jobs.recovered
            final = await second.jobs.wait(record["uuid"])
            assert (final["state"], final["result"], final["resumed"], runs) == ("succeeded", {"version": 2}, 1, [0, 1])
    finally:
        await second.store.close()
    assert clock.getDelayedCalls() == []
