"""Template work that touches nodes runs as persisted jobs: create, copy, save, the power batches and
delete answer the contract's shape plus ``job_id``, and ``GET /jobs/{id}`` (and the paged list) show
the job's state, progress and per-item results."""
from __future__ import annotations

import pytest_twisted

from kvmdesk.core import errors as core_errors
from kvmdesk.plugins.templates import errors, schema
from templates_testlib import T, assert_error


async def job_of(world, body: dict) -> dict:
    status, answer = await world.api.call("GET", f"/jobs/{body['data']['job_id']}")
    assert status == 200, answer
    return answer["data"]


@pytest_twisted.ensureDeferred
async def test_create_copy_save_power_and_delete_are_jobs_with_per_item_results(world):
    status, body = await world.api.call("POST", T, {"action": "create", "param": world.body()})
    assert status == 200, body
    template = body["data"]
    assert template["name"] == "template1" and template["devices"] and "vnc_password" not in template
    job = await job_of(world, body)
    assert (job["kind"], job["state"], job["progress"]) == ("templates.create", "succeeded", 100)
    assert job["items"][0]["result"]["uuid"] == template["uuid"]

    ref = {"name": template["name"], "uuid": template["uuid"]}
    status, body = await world.api.call("POST", T, {"action": "save", "param": ref})
    assert status == 200 and body["data"]["version"] == 1 and set(body["data"]) == {
        "uuid", "name", "version", "publish", "job_id"}, body
    job = await job_of(world, body)
    assert (job["kind"], job["state"]) == ("templates.save", "succeeded")
    assert job["items"][0]["result"]["publish"] == body["data"]["publish"]

    status, body = await world.api.call("POST", T, {"action": "copy", "param": {
        "template_uuid": template["uuid"], "name": "copy1", "pool_uuid": world.pool,
        "network_uuid": world.network["uuid"], "subnet_uuid": world.subnet["uuid"]}})
    assert status == 200 and body["data"]["name"] == "copy1" and body["data"]["uuid"] != template["uuid"], body
    copied = body["data"]
    assert (await job_of(world, body))["kind"] == "templates.copy"

    # a batch: per-item results in the answer and in the job
    status, body = await world.act("start", template, copied, {"name": "ghost", "uuid": "no-such-template"})
    assert status == 200 and (body["data"]["success_num"], body["data"]["failed_num"]) == (2, 1), body
    job = await job_of(world, body)
    assert (job["kind"], job["state"], job["done"], job["progress"]) == ("templates.start", "partial", 3, 100)
    assert [(i["uuid"], i["state"], i["code"]) for i in job["items"]] == [
        (template["uuid"], "succeeded", 0), (copied["uuid"], "succeeded", 0),
        ("no-such-template", "failed", core_errors.NOT_FOUND.code)]

    # one item that fails: its error is the answer; the job keeps it
    status, body = await world.act("start", template)
    assert_error(status, body, 409, errors.TEMPLATE_STATE.code, "template1")
    status, body = await world.api.call("GET", "/jobs", params={"searchtype": "all", "kind": "templates.start"})
    assert status == 200, body
    found = body["data"]["results"]
    assert {j["state"] for j in found} == {"partial", "failed"} and len(found) == 2, found

    await world.act("hard_stop", template, copied)
    status, body = await world.api.call("POST", T, {"action": "save", "param": {**ref, "run_date": "2099-1-1 08:00:00"}})
    assert status == 200, body
    assert await world.core.scheduler.get(schema.save_key(template["uuid"])) is not None
    status, body = await world.api.call("DELETE", T, {"templates": [ref, {"name": "copy1", "uuid": copied["uuid"]}]})
    assert status == 200 and body["data"]["success_num"] == 2, body
    job = await job_of(world, body)
    assert (job["kind"], job["state"]) == ("templates.delete", "succeeded")
    assert await world.core.store.collection("templates").count({}) == 0
    assert await world.core.scheduler.get(schema.save_key(template["uuid"])) is None  # its pending save went too


@pytest_twisted.ensureDeferred
async def test_a_save_job_follows_the_nodes_fetching_its_version(world, monkeypatch):
    from kvmdesk.core import jobqueue

    heard, real = [], jobqueue.Job.set_progress

    def set_progress(job, percent):
        heard.append((job.record["kind"], percent))
        real(job, percent)

    monkeypatch.setattr(jobqueue.Job, "set_progress", set_progress)
    template = await world.create()
    status, body = await world.api.call("POST", T, {"action": "save", "param": {"name": template["name"],
                                                                                "uuid": template["uuid"]}})
    assert status == 200, body
    # the first report comes as the fetches begin (the test driver's files are small: one report)
    assert heard and all(kind == "templates.save" and 0 <= p <= 99 for kind, p in heard)
    assert (await job_of(world, body))["progress"] == 100
