"""Timetables: weekly lessons become persisted scheduler entries whose firings run the group
operation as a job (start lead_minutes before, stop at the end); an injected clock drives it."""
from __future__ import annotations

import time
from datetime import datetime

import pytest
import pytest_twisted
from twisted.internet.task import Clock

from kvmdesk.plugins.desktops import schema

from .conftest import DESKTOP_GROUPS, failed, ok
from .test_desktop_groups import stored_group, world

PATH = DESKTOP_GROUPS + "/timetable"


@pytest.fixture
def utc(monkeypatch):
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.fixture
def clock(utc) -> Clock:
    """The controller's clock on a Monday, 07:00 (UTC), before anyone logs in."""
    clock = Clock()
    clock.advance(datetime(2030, 4, 1, 7, 0).timestamp())
    return clock


@pytest_twisted.ensureDeferred
async def test_lessons_start_and_stop_the_group_as_jobs(api, clock):
    w = await world(api)
    group, _ = await stored_group(api, w)
    core = api.core
    core.scheduler.startService()
    try:
        body = {"uuid": group["uuid"], "lead_minutes": 15,
                "lessons": [{"weekday": 0, "start": "08:00", "end": "08:45"}, {"weekday": 0, "start": "00:05", "end": "01:00"}]}
        shown = ok(*await api.call("PUT", PATH, body))
        assert shown["start"]["slots"] == [{"weekday": 0, "time": "07:45"}, {"weekday": 6, "time": "23:50"}]
        assert shown["stop"]["slots"] == [{"weekday": 0, "time": "01:00"}, {"weekday": 0, "time": "08:45"}]
        assert (shown["start"]["next_run"], shown["stop"]["next_run"]) == ("2030-04-01 07:45:00", "2030-04-01 08:45:00")
        assert ok(*await api.call("GET", PATH, params={"uuid": group["uuid"]})) == shown

        # n1 went offline (nothing here reaches a node): the group's desktops fail at once, each said
        await core.store.collection("nodes").update_one({"uuid": w["n1"]["uuid"]}, {"$set": {"state": "offline"}})
        clock.advance(45 * 60)  # 07:45: the start fires and runs a job over the group's desktops
        await core.scheduler.idle()
        (entry,) = await core.scheduler.history(schema.lesson_keys(group["uuid"])[0])
        job = await core.jobs.wait(entry["result"])
        assert (job["kind"], job["params"], [i["uuid"] for i in job["items"]]) == (
            "desktop_groups.lesson", {"operation": "start"}, [group["uuid"]])
        assert job["state"] == "failed" and job["items"][0]["code"] == 6045 and "2/2" in job["items"][0]["msg"]

        # deactivated: the next start does not run; the stop still does
        await core.store.collection(schema.DESKTOP_GROUPS).update_one({"uuid": group["uuid"]}, {"$set": {"active": False}})
        clock.advance(60 * 60)  # 08:45
        await core.scheduler.idle()
        (stop,) = await core.scheduler.history(schema.lesson_keys(group["uuid"])[1])
        assert (await core.jobs.wait(stop["result"]))["params"] == {"operation": "stop"}

        # bad lessons change nothing; no lessons clear the timetable
        for lessons, field in [([{"weekday": 7, "start": "08:00", "end": "09:00"}], "lessons.0.weekday"),
                               ([{"weekday": 1, "start": "9:00", "end": "10:00"}], "lessons.0.start"),
                               ([{"weekday": 1, "start": "10:00", "end": "09:00"}], "lessons[0].end")]:
            status, answer = await api.call("PUT", PATH, {"uuid": group["uuid"], "lessons": lessons})
            failed(status, answer, 400, 1002)
            assert answer["msg"] and field in answer["msg"] + str(answer["data"])
        assert (await core.scheduler.get(schema.lesson_keys(group["uuid"])[0]))["slots"] == shown["start"]["slots"]
        cleared = ok(*await api.call("PUT", PATH, {"uuid": group["uuid"], "lessons": []}))
        assert (cleared["lessons"], cleared["start"], cleared["stop"]) == ([], None, None)
        status, answer = await api.call("PUT", PATH, {"uuid": "nope", "lessons": []})
        failed(status, answer, 404, 1012)
    finally:
        await core.scheduler.stopService()


@pytest_twisted.ensureDeferred
async def test_a_timetable_survives_a_controller_restart(tmp_path, clock):
    from kvmdesk.testing.api import api_client

    async with api_client(tmp_path, clock=clock) as api:
        w = await world(api)
        group, _ = await stored_group(api, w)
        body = {"uuid": group["uuid"], "lead_minutes": 10, "lessons": [{"weekday": 0, "start": "08:00", "end": "08:45"}]}
        shown = ok(*await api.call("PUT", PATH, body))
    assert clock.getDelayedCalls() == []

    async with api_client(tmp_path, clock=clock) as again:  # the same store, a new controller
        assert ok(*await again.call("GET", PATH, params={"uuid": group["uuid"]})) == shown
        core = again.core
        core.scheduler.startService()
        try:
            clock.advance(50 * 60)  # 07:50: the start fires in the new controller
            await core.scheduler.idle()
            (entry,) = await core.scheduler.history(schema.lesson_keys(group["uuid"])[0])
            job = await core.jobs.wait(entry["result"])
            assert (job["kind"], job["params"], [i["uuid"] for i in job["items"]]) == (
                "desktop_groups.lesson", {"operation": "start"}, [group["uuid"]])
        finally:
            await core.scheduler.stopService()
    assert clock.getDelayedCalls() == []
