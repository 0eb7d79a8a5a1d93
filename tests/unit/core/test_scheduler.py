"""The persisted scheduler: run_date parsing, weekly rules, firing on the injected clock, restarts, the API."""
from __future__ import annotations

import contextlib
import time
from datetime import datetime
from typing import Any, AsyncIterator

import pytest
import pytest_twisted
from twisted.internet.task import Clock

from core_testlib import assert_error, running_api
from kvmdesk.core import errors, scheduler
from kvmdesk.core.errors import ApiError
from kvmdesk.core.scheduler import next_weekly, parse_run_date, shift_slot, validate_slots
from kvmdesk.testing.api import make_core


@pytest.fixture(params=["UTC", "Asia/Shanghai"])
def local_zone(request, monkeypatch):
    """The controller's local time zone, fixed for the test (both without daylight saving time)."""
    monkeypatch.setenv("TZ", request.param)
    time.tzset()
    yield request.param
    monkeypatch.undo()
    time.tzset()


def local(*fields: int) -> float:
    return datetime(*fields).timestamp()


class Recorder:
    """A handler that records what it was called with, and fails when told to."""

    def __init__(self, fail: Exception | None = None):
        self.calls: list[dict] = []
        self.fail = fail

    async def __call__(self, core: Any, entry: dict) -> Any:
        self.calls.append(entry)
        if self.fail is not None:
            raise self.fail
        return {"job": f"job-of-{entry['payload'].get('n')}"}


@contextlib.asynccontextmanager
async def scheduling(tmp_path: Any, clock: Clock, handlers: dict[str, Any]) -> AsyncIterator[tuple[Any, Any]]:
    """A core whose scheduler runs ``handlers`` (by kind): ``(api client, core)``; stopped afterwards."""
    async with running_api(tmp_path, clock) as api:
        for kind, handler in handlers.items():
            api.core.scheduler.register(kind, handler)
        api.core.scheduler.startService()
        try:
            yield api, api.core
        finally:
            await api.core.scheduler.stopService()


async def fire(core: Any, clock: Clock, seconds: float) -> None:
    """Advance the clock and wait until the scheduler has done what became due."""
    clock.advance(seconds)
    await core.scheduler.idle()


# -- helpers for API layers ---------------------------------------------------------------------------


def test_parse_run_date_reads_local_time_padded_or_not(local_zone):
    now = local(2030, 4, 1, 12, 0, 0)
    assert parse_run_date("2030-4-19 15:48:15", now=now) == local(2030, 4, 19, 15, 48, 15)
    assert parse_run_date("2030-04-19 05:08:09", now=now) == local(2030, 4, 19, 5, 8, 9)


@pytest.mark.parametrize("value", ["2030-13-01 00:00:00", "2030-02-30 10:00:00", "2030-04-19", "tomorrow",
                                   "2030-04-19 25:00:00", "", None, 20300419, "2030-04-19 10:00:00 extra"])
def test_parse_run_date_refuses_malformed_dates_naming_the_field(value):
    with pytest.raises(ApiError) as raised:
        parse_run_date(value, now=0, field="param.run_date")
    assert raised.value.error is scheduler.RUN_DATE_INVALID and raised.value.error.code == 1060
    assert raised.value.message("en").startswith("param.run_date is malformed")


def test_parse_run_date_refuses_a_past_date(local_zone):
    now = local(2030, 4, 19, 15, 48, 15)
    for value in ("2030-4-19 15:48:15", "2020-4-19 15:48:15"):
        with pytest.raises(ApiError) as raised:
            parse_run_date(value, now=now)
        assert raised.value.error is scheduler.RUN_DATE_PAST
        assert raised.value.message("en") == f"run_date is in the past: {value}"


@pytest.mark.parametrize("slots, field", [
    ([], "slots"), ("Monday", "slots"), ([{"weekday": 7, "time": "08:00"}], "slots[0].weekday"),
    ([{"weekday": 1, "time": "08:00"}, {"weekday": 1, "time": "24:00"}], "slots[1].time"),
    ([{"weekday": True, "time": "08:00"}], "slots[0].weekday"), ([{"weekday": 1}], "slots[0]"),
    ([{"weekday": 1, "time": "8:5"}], "slots[0].time"), ([{"weekday": 1, "time": "08:00", "x": 1}], "slots[0]"),
])
def test_validate_slots_names_the_bad_field(slots, field):
    with pytest.raises(ApiError) as raised:
        validate_slots(slots)
    assert raised.value.error is errors.INVALID_PARAM and raised.value.params["field"] == field


def test_validate_slots_normalises():
    slots = [{"weekday": 4, "time": "8:05"}, {"weekday": 0, "time": "13:30"}, {"weekday": 4, "time": "08:05"}]
    assert validate_slots(slots) == [{"weekday": 0, "time": "13:30"}, {"weekday": 4, "time": "08:05"}]


def test_next_weekly_crosses_the_week_boundary(local_zone):
    sunday_night = local(2030, 1, 6, 23, 0)  # 2030-01-06 is a Sunday
    assert datetime.fromtimestamp(sunday_night).weekday() == 6
    assert next_weekly([{"weekday": 0, "time": "08:00"}], sunday_night) == local(2030, 1, 7, 8, 0)
    assert next_weekly([{"weekday": 6, "time": "22:00"}], sunday_night) == local(2030, 1, 13, 22, 0)
    # strictly after: the slot of this very minute is next week's
    assert next_weekly([{"weekday": 6, "time": "23:00"}], sunday_night) == local(2030, 1, 13, 23, 0)
    # the earliest of several slots, across a month's and a year's end
    slots = [{"weekday": 2, "time": "09:30"}, {"weekday": 1, "time": "07:50"}]
    assert next_weekly(slots, local(2030, 12, 31, 8, 0)) == local(2031, 1, 1, 9, 30)  # a Tuesday, after 07:50


def test_shift_slot_moves_across_midnight_and_the_week_end():
    assert shift_slot({"weekday": 0, "time": "00:05"}, -10) == {"weekday": 6, "time": "23:55"}
    assert shift_slot({"weekday": 6, "time": "23:55"}, 10) == {"weekday": 0, "time": "00:05"}
    assert shift_slot({"weekday": 2, "time": "08:00"}, -15) == {"weekday": 2, "time": "07:45"}


# -- the service ------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_an_entry_fires_once_at_its_time_and_is_removed(tmp_path, clock):
    handler = Recorder()
    async with scheduling(tmp_path, clock, {"test.save": handler}) as (api, core):
        entry = await core.scheduler.schedule("save:t1", clock.seconds() + 600, "test.save", {"n": 1})
        assert (entry["key"], entry["type"], entry["payload"]) == ("save:t1", "once", {"n": 1})
        await core.scheduler.idle()
        assert len(clock.getDelayedCalls()) == 1  # one timer, for the earliest entry
        await fire(core, clock, 599)
        assert handler.calls == []
        await fire(core, clock, 1)
        assert [c["payload"] for c in handler.calls] == [{"n": 1}]
        assert await core.scheduler.get("save:t1") is None
        [run] = await core.scheduler.history("save:t1")
        assert (run["result"], run["error"], run["misfired"]) == ({"job": "job-of-1"}, None, False)
        await fire(core, clock, 3600)
        assert len(handler.calls) == 1


@pytest_twisted.ensureDeferred
async def test_a_new_entry_with_the_same_key_replaces_the_pending_one(tmp_path, clock):
    handler = Recorder()
    async with scheduling(tmp_path, clock, {"test.save": handler}) as (api, core):
        first = await core.scheduler.schedule("save:t1", clock.seconds() + 100, "test.save", {"n": 1})
        second = await core.scheduler.schedule("save:t1", clock.seconds() + 300, "test.save", {"n": 2})
        assert first["uuid"] != second["uuid"]
        assert [e["payload"] for e in await core.scheduler.list("save:")] == [{"n": 2}]
        await fire(core, clock, 200)
        assert handler.calls == []
        await fire(core, clock, 100)
        assert [c["payload"] for c in handler.calls] == [{"n": 2}]
        # an earlier replacement re-arms the timer earlier
        await core.scheduler.schedule("save:t2", clock.seconds() + 1000, "test.save", {"n": 3})
        await core.scheduler.schedule("save:t2", clock.seconds() + 10, "test.save", {"n": 4})
        await fire(core, clock, 10)
        assert [c["payload"] for c in handler.calls] == [{"n": 2}, {"n": 4}]
        assert await core.scheduler.cancel("save:t2") is False
        await core.scheduler.schedule("save:t3", clock.seconds() + 10, "test.save", {"n": 5})
        assert await core.scheduler.cancel("save:t3") is True
        await fire(core, clock, 20)
        assert len(handler.calls) == 2
        with pytest.raises(ValueError):
            await core.scheduler.schedule("x", clock.seconds() + 1, "not.registered", {})


@pytest_twisted.ensureDeferred
async def test_a_weekly_entry_fires_at_each_slot_and_is_rearmed(tmp_path, clock, local_zone):
    clock.advance(local(2030, 1, 6, 23, 0))  # a Sunday, 23:00
    handler = Recorder()
    async with scheduling(tmp_path, clock, {"test.start": handler}) as (api, core):
        slots = [{"weekday": 0, "time": "07:50"}, {"weekday": 2, "time": "13:20"}]
        entry = await core.scheduler.schedule_weekly("group:g1:start", "test.start", {"n": 7}, slots)
        assert entry["next_time"] == local(2030, 1, 7, 7, 50) and entry["next_run"] == "2030-01-07 07:50:00"
        await fire(core, clock, local(2030, 1, 7, 7, 50) - clock.seconds())
        entry = await core.scheduler.get("group:g1:start")
        assert len(handler.calls) == 1 and entry["runs"] == 1
        assert entry["next_time"] == local(2030, 1, 9, 13, 20)
        assert entry["last_run"]["fired_at"] == "2030-01-07 07:50:00" and not entry["last_run"]["misfired"]
        await fire(core, clock, local(2030, 1, 9, 13, 20) - clock.seconds())
        entry = await core.scheduler.get("group:g1:start")
        assert len(handler.calls) == 2 and entry["next_time"] == local(2030, 1, 14, 7, 50)
        with pytest.raises(ApiError):
            await core.scheduler.schedule_weekly("group:g1:start", "test.start", {}, [{"weekday": 9, "time": "1:00"}])
        assert (await core.scheduler.get("group:g1:start"))["runs"] == 2


@pytest_twisted.ensureDeferred
async def test_a_failing_handler_is_recorded_and_the_scheduler_goes_on(tmp_path, clock):
    refusing = Recorder(ApiError(errors.IN_USE, resource="template", reason="updating"))
    crashing = Recorder(RuntimeError("boom"))
    fine = Recorder()
    async with scheduling(tmp_path, clock, {"t.refuse": refusing, "t.crash": crashing, "t.fine": fine}) as (api, core):
        now = clock.seconds()
        await core.scheduler.schedule("a", now + 10, "t.refuse", {})
        await core.scheduler.schedule("b", now + 10, "t.crash", {})
        await core.scheduler.schedule("c", now + 20, "t.fine", {"n": 3})
        weekly = await core.scheduler.schedule_weekly("w", "t.crash", {}, [{"weekday": 0, "time": "00:00"}])
        await fire(core, clock, 10)
        [refused] = await core.scheduler.history("a")
        assert refused["error"] == {"code": errors.IN_USE.code,
                                    "msg": "template is in use and cannot be deleted: updating"}
        [crashed] = await core.scheduler.history("b")
        assert crashed["error"]["code"] == errors.INTERNAL_ERROR.code
        await fire(core, clock, 10)
        assert len(fine.calls) == 1
        await fire(core, clock, weekly["next_time"] - clock.seconds())
        entry = await core.scheduler.get("w")
        assert entry["last_run"]["error"]["code"] == errors.INTERNAL_ERROR.code
        assert entry["next_time"] == weekly["next_time"] + 7 * 86400


@pytest_twisted.ensureDeferred
async def test_entries_survive_a_restart_and_missed_ones_fire_once(tmp_path, local_zone):
    clock = Clock()
    clock.advance(local(2030, 1, 6, 12, 0))
    handler = Recorder()
    core = await make_core(tmp_path, clock=clock)
    try:
        core.scheduler.register("test.save", handler)
        core.scheduler.startService()
        await core.scheduler.schedule("save:t1", clock.seconds() + 600, "test.save", {"n": 1})
        await core.scheduler.schedule("save:t2", clock.seconds() + 30 * 86400, "test.save", {"n": 2})
        await core.scheduler.schedule_weekly("group:g1", "test.save", {"n": 3}, [{"weekday": 0, "time": "08:00"}])
        await core.scheduler.idle()
        await core.scheduler.stopService()
        assert clock.getDelayedCalls() == []
    finally:
        await core.store.close()

    clock.advance(21 * 86400)  # down for three weeks: t1 and three Mondays were missed
    second = await make_core(tmp_path, clock=clock)
    try:
        again = Recorder()
        second.scheduler.register("test.save", again)
        second.scheduler.startService()
        await second.scheduler.idle()
        assert sorted(c["payload"]["n"] for c in again.calls) == [1, 3]
        [run] = await second.scheduler.history("save:t1")
        assert run["misfired"] is True and run["due_at"] == "2030-01-06 12:10:00"
        weekly = await second.scheduler.get("group:g1")
        assert weekly["last_run"]["misfired"] is True and weekly["runs"] == 1
        assert weekly["next_time"] == local(2030, 1, 28, 8, 0)
        assert (await second.scheduler.get("save:t2"))["payload"] == {"n": 2}
        await second.scheduler.stopService()
    finally:
        await second.store.close()
    assert clock.getDelayedCalls() == []


@pytest_twisted.ensureDeferred
async def test_a_one_shot_entry_that_was_running_at_a_restart_is_closed_as_interrupted(tmp_path, clock):
    async with running_api(tmp_path, clock) as api:
        core = api.core
        # what a controller that died inside the handler leaves: the entry claimed, its run not recorded
        await core.store.collection(scheduler.COLLECTION).insert_one(
            {"uuid": "u-1", "key": "save:t9", "kind": "test.save", "payload": {}, "type": "once", "slots": None,
             "next_time": None, "next_run": None, "runs": 0, "last_run": None})
        core.scheduler.register("test.save", Recorder())
        core.scheduler.startService()
        try:
            await core.scheduler.idle()
            assert await core.scheduler.get("save:t9") is None
            [run] = await core.scheduler.history("save:t9")
            assert run["error"]["code"] == scheduler.RUN_INTERRUPTED.code
        finally:
            await core.scheduler.stopService()


@pytest_twisted.ensureDeferred
async def test_schedule_api_lists_and_shows_entries_with_their_history(tmp_path, clock):
    async with scheduling(tmp_path, clock, {"test.save": Recorder()}) as (api, core):
        await core.scheduler.schedule("save:t1", clock.seconds() + 100, "test.save", {"n": 1})
        await core.scheduler.schedule_weekly("group:g1", "test.save", {"n": 2}, [{"weekday": 3, "time": "10:00"}])
        status, body = await api.call("GET", "/schedules")
        assert status == 200 and [e["key"] for e in body["data"]["results"]] == ["save:t1", "group:g1"]
        status, body = await api.call("GET", "/schedules", params={"type": "weekly"})
        assert [e["key"] for e in body["data"]["results"]] == ["group:g1"]
        status, body = await api.call("GET", "/schedules/group:g1")
        assert status == 200 and body["data"]["slots"] == [{"weekday": 3, "time": "10:00"}]
        assert body["data"]["history"] == []
        status, body = await api.call("GET", "/schedules/nothing")
        assert_error(status, body, 404, errors.NOT_FOUND.code)
        status, body = await api.call("GET", "/schedules", auth=False)
        assert_error(status, body, 401, errors.UNAUTHENTICATED.code)
