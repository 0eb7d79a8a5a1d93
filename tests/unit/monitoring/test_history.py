"""Samples arrive, roll up into minute points in the store, come back as history, and expire."""
from __future__ import annotations

from pathlib import Path

import orjson
import pytest_twisted

from kvmdesk.core.plugins import gather_hook
from kvmdesk.core.records import format_time
from kvmdesk.plugins.monitoring import days
from kvmdesk.plugins.monitoring.rollups import LEGACY_HOURS, MINUTES
from tests.unit.monitoring.monitoring_testlib import add_node, advance, heartbeat, make_clock, monitor, monitoring_api

HISTORY = "/monitor_mgr/node/history/"


async def beat_for(api, clock, node, seconds: int, every: int = 5, **kwargs) -> None:
    for _ in range(seconds // every):
        await advance(api, every)
        heartbeat(api, node, **kwargs)


@pytest_twisted.ensureDeferred
async def test_points_roll_up_into_minutes_and_an_offline_hour_is_null(tmp_path: Path):
    clock = make_clock()
    clock.advance(3600 - clock.seconds() % 3600)  # on an hour boundary
    hour0 = int(clock.seconds())
    async with monitoring_api(tmp_path, clock) as api:
        node = await add_node(api, "n1", "10.0.0.1")
        api.core.services.startService()
        # Hour 0: one minute at 10 %, the next at 30 % (12 heartbeats a minute), then one hour offline.
        await beat_for(api, clock, node, 55, cpu=10.0)   # :00:05 .. :00:55
        await beat_for(api, clock, node, 60, cpu=30.0)   # :01:00 .. :01:55 (the :01:00 one is minute 1)
        await advance(api, 60 * 60 - 175)                      # no heartbeats: the flush loop writes minutes 0 and 1
        written = [point for doc in await api.core.store.collection(MINUTES).find({"hour": hour0})
                   for point in orjson.loads(doc["points"])]
        assert [(n, m, p["c"]) for n, m, p in written] == [(node["uuid"], hour0, 10.0), (node["uuid"], hour0 + 60, 30.0)]
        assert written[0][2]["n"]["eth0"] == [1000, 500]
        await advance(api, 60)  # the hour is over
        # Back for ten minutes in the next hour.
        await beat_for(api, clock, node, 600, cpu=50.0)
        await advance(api, 60)

        status, body = await api.call("GET", HISTORY, params={"node_uuid": node["uuid"], "statis_hours": 2,
                                                              "step_minutes": 1})
        assert status == 200, body
        data = body["data"]
        assert len(data["time"]) == 120 and len(data["cpu_util"]) == 120
        # The axis ends with the last completed minute, aligned to the minute.
        now = clock.seconds()
        last = int(now // 60 * 60) - 60
        assert data["time"][-1] == format_time(last) and data["time"][0] == format_time(last - 119 * 60)
        by_time = dict(zip(data["time"], data["cpu_util"]))
        assert by_time[format_time(hour0)] == 10.0 and by_time[format_time(hour0 + 60)] == 30.0
        # The hour offline: nulls, not zeros.
        offline = [by_time[format_time(hour0 + m * 60)] for m in range(2, 60) if format_time(hour0 + m * 60) in by_time]
        assert offline and all(v is None for v in offline)
        assert by_time[format_time(hour0 + 3600 + 300)] == 50.0
        assert data["memory_util"]["percent"][-1] == 40.0 and data["memory_util"]["used"][-1] == 4 * 1024 ** 3
        assert data["nic_util"]["eth0"]["read_bytes_avg"][-1] == 1000
        assert data["nic_util"]["eth0"]["write_bytes_avg"][-1] == 500
        assert data["disk_io_util"]["sda"]["write_bytes_avg"][-1] == 2000
        assert data["node_uuid"] == node["uuid"]

        # A 10-minute step over the same two hours: 12 aligned points, means of the minutes present.
        status, body = await api.call("GET", "/monitor_mgr/node/history_perf/",
                                      json={"node_uuid": node["uuid"], "statis_hours": 2, "step_minutes": 10})
        assert status == 200, body
        steps = dict(zip(body["data"]["time"], body["data"]["cpu_util"]))
        assert len(steps) == 12 and all(int(t[-5:-3]) % 10 == 0 for t in steps)
        assert steps[format_time(hour0)] == 20.0  # minutes 0 and 1 only: (10 + 30) / 2
        assert steps[format_time(hour0 + 1200)] is None

        # Once hour 0 is older than the hour before the current one, a flush round seals it into the
        # node's day document and deletes its fragments; the answer stays the same.
        await advance(api, 3600)
        assert await api.core.store.collection(MINUTES).count({"hour": hour0}) == 0
        sealed = (await days.read_hours(api.core.store, node["uuid"], [hour0]))[hour0]
        assert sealed["c"][:3] == [10.0, 30.0, None] and sealed[("n", "eth0", 0)][0] == 1000
        assert sealed[("n", "eth0", 1)][0] == 500
        status, body = await api.call("GET", HISTORY, params={"node_uuid": node["uuid"], "statis_hours": 3,
                                                              "step_minutes": 1})
        later = dict(zip(body["data"]["time"], body["data"]["cpu_util"]))
        assert {t: later[t] for t in by_time} == by_time
        await api.core.services.stopService()


@pytest_twisted.ensureDeferred
async def test_pending_minutes_are_answered_before_their_flush_and_written_at_stop(tmp_path: Path):
    clock = make_clock()
    clock.advance(60 - clock.seconds() % 60)
    async with monitoring_api(tmp_path, clock, flush_interval=3600) as api:
        node = await add_node(api, "n1", "10.0.0.1")
        api.core.services.startService()
        await beat_for(api, clock, node, 180, cpu=20.0)
        assert await api.core.store.collection(MINUTES).count() == 0
        status, body = await api.call("GET", HISTORY, params={"node_uuid": node["uuid"], "statis_hours": 1})
        assert status == 200 and [v for v in body["data"]["cpu_util"] if v is not None] == [20.0] * 3
        await api.core.services.stopService()
        stored = await api.core.store.collection(MINUTES).find({})
        assert sum(len(orjson.loads(d["points"])) for d in stored) >= 3


@pytest_twisted.ensureDeferred
async def test_points_expire_after_the_retention_in_chunks(tmp_path: Path):
    clock = make_clock()
    async with monitoring_api(tmp_path, clock, retention_days=1, prune_interval=600, prune_chunk=2) as api:
        nodes = [await add_node(api, f"n{i}", f"10.0.0.{i}") for i in range(3)]
        mon = monitor(api)
        api.core.services.startService()
        # Four hours of one sample a minute per node: 3 nodes x 4 hours (5 with the partial first one).
        for _ in range(4 * 60):
            await advance(api, 60)
            for node in nodes:
                heartbeat(api, node, cpu=5.0)
        fragments = api.core.store.collection(MINUTES)
        # The hours before the last two were sealed into day documents; those two are in fragments.
        assert await stored_hours(api.core.store) >= 12
        assert {d["hour"] for d in await fragments.find({})} == {h for _, h in mon.rollups.head}
        assert len({d["hour"] for d in await fragments.find({})}) == 2
        # A day later (quiet): every hour of the first four has expired; deletes went in chunks of 2.
        deleted: list[tuple[str, int]] = []
        mon.rollups.store = _Spy(api.core.store, deleted)
        await advance(api, 86400 + 3600)
        assert await fragments.count() == 0 and await stored_hours(api.core.store) == 0
        assert deleted and max(n for _, n in deleted) <= 2
        assert {name for name, _ in deleted} == {MINUTES, "monitor_days"}
        await api.login()  # the token expired during that day
        status, body = await api.call("GET", HISTORY, params={"node_uuid": nodes[0]["uuid"], "statis_hours": 24,
                                                              "step_minutes": 60})
        assert status == 200, body
        assert all(v is None for v in body["data"]["cpu_util"])
        await api.core.services.stopService()


async def stored_hours(store) -> int:
    """Node-hours kept in either shape: in fragments, and the filled slots of day documents."""
    day_docs = await store.collection(days.DAYS).find({})
    in_fragments = {(node, doc["hour"]) for doc in await store.collection(MINUTES).find({})
                    for node, _, _ in orjson.loads(doc["points"])}
    return len(in_fragments) + sum(slot in d for d in day_docs for slot in days.SLOTS)


class _Spy:
    """The real store, with every ``delete_many`` by ids observed: ``(collection, ids)`` (chunk sizes)."""

    def __init__(self, store, deleted: list):
        self.store = store
        self.deleted = deleted

    def collection(self, name):
        real = self.store.collection(name)
        deleted = self.deleted

        class Observed:
            async def delete_many(self, filter):
                if "id" in filter:
                    deleted.append((name, len(filter["id"]["$in"])))
                return await real.delete_many(filter)

            def __getattr__(self, attr):
                return getattr(real, attr)

        return Observed()


def test_the_axis_is_formatted_like_every_other_time_across_a_daylight_saving_change(monkeypatch):
    import time as time_module

    from kvmdesk.plugins.monitoring.perf import axis_times

    try:
        for zone in ("Europe/Berlin", "Asia/Kolkata"):  # a half-hour offset: local hours are not UTC's
            monkeypatch.setenv("TZ", zone)
            time_module.tzset()
            # The second spans 2023-10-29 03:00 (Berlin); the third, 1,440 minutes, crosses a day.
            for first, step, count in ((1_700_000_000, 60, 40), (1_698_541_200, 600, 40), (1_700_001_000, 60, 1440)):
                starts = [first + i * step for i in range(count)]
                assert axis_times(first, step, count) == [format_time(t) for t in starts]
    finally:
        monkeypatch.undo()
        time_module.tzset()


@pytest_twisted.ensureDeferred
async def test_hour_documents_of_an_older_version_are_taken_in_at_start_sealed_and_answer_the_same(tmp_path: Path):
    """Migration: a store written before fragments existed holds hour documents (``monitor_rollups``)."""
    clock = make_clock()
    clock.advance(3600 - clock.seconds() % 3600 + 1800)  # half past an hour
    now_hour = int(clock.seconds()) - 1800
    async with monitoring_api(tmp_path, clock, prune_chunk=7) as api:
        node = await add_node(api, "n1", "10.0.0.1")
        old = [{"node": node["uuid"], "hour": now_hour - h * 3600,
                "m": {str(m): {"c": float(h), "mp": 50.0, "mu": 10, "n": {"eth0": [h, m]}} for m in range(0, 60, 7)}}
               for h in range(30)]
        await api.core.store.collection(LEGACY_HOURS).insert_many(old)
        await monitor(api).start()  # what the controller's start-up runs
        assert await api.core.store.collection(LEGACY_HOURS).count() == 0
        query = {"node_uuid": node["uuid"], "statis_hours": 24, "step_minutes": 1}
        status, before = await api.call("GET", HISTORY, params=query)
        assert status == 200, before
        by_time = dict(zip(before["data"]["time"], before["data"]["cpu_util"]))
        sent = dict(zip(before["data"]["time"], before["data"]["nic_util"]["eth0"]["write_bytes_avg"]))
        for h in range(1, 23):  # every stored minute of the hours the answer covers whole
            for m in range(60):
                at = format_time(now_hour - h * 3600 + m * 60)
                assert (by_time[at], sent[at]) == ((float(h), m) if m % 7 == 0 else (None, None))

        api.core.services.startService()
        await advance(api, 60)  # one flush round seals every hour older than the head's two, 7 at a time
        assert await stored_hours(api.core.store) == 30
        assert {h for _, h in monitor(api).rollups.head} == {now_hour, now_hour - 3600}
        monitor(api).rollups.cache.entries.clear()
        status, after = await api.call("GET", HISTORY, params=query)
        assert status == 200, after
        # The axis moved on by one minute: the answers agree on every minute both cover.
        assert after["data"]["time"][:-1] == before["data"]["time"][1:]
        assert after["data"]["cpu_util"][:-1] == before["data"]["cpu_util"][1:]
        for key in ("read_bytes_avg", "write_bytes_avg"):
            assert after["data"]["nic_util"]["eth0"][key][:-1] == before["data"]["nic_util"]["eth0"][key][1:]
        await api.core.services.stopService()


@pytest_twisted.ensureDeferred
async def test_a_known_node_is_answered_without_reading_its_record_and_a_removed_one_is_refused(tmp_path: Path):
    clock = make_clock()
    async with monitoring_api(tmp_path, clock) as api:
        first = await add_node(api, "n1", "10.0.0.1")  # added after the start: not known yet
        second = await add_node(api, "n2", "10.0.0.2")
        reads = CountingStore(api.core.store)
        api.core.store, real = reads, api.core.store
        try:
            query = {"node_uuid": first["uuid"], "statis_hours": 1}
            assert (await api.call("GET", HISTORY, params=query))[0] == 200
            assert reads.reads.count("nodes") == 1  # its record, once
            assert (await api.call("GET", HISTORY, params=query))[0] == 200
            heartbeat(api, second, cpu=5.0)  # a heartbeat makes a node known too
            assert (await api.call("GET", HISTORY, params={**query, "node_uuid": second["uuid"]}))[0] == 200
            assert reads.reads.count("nodes") == 1
        finally:
            api.core.store = real
        # A start learns every node record's uuid.
        monitor(api).known_nodes.clear()
        await monitor(api).start()
        records = {n["uuid"] for n in await api.core.store.collection("nodes").find({})}  # (the controller's too)
        assert monitor(api).known_nodes == records and {first["uuid"], second["uuid"]} <= records
        # A removed node is forgotten: its history is refused, as for any unknown uuid.
        await api.core.store.collection("nodes").delete_many({"uuid": first["uuid"]})
        await gather_hook(api.core.plugins.hook.kvmdesk_node_removed(core=api.core, node=first))
        status, body = await api.call("GET", HISTORY, params=query)
        assert (status, body["code"]) == (404, 8000) and "node_uuid" in body["msg"]


class CountingStore:
    """The store, recording the collection of every read (``find`` and ``find_one``)."""

    def __init__(self, store):
        self.store, self.reads = store, []

    def __getattr__(self, attr):
        return getattr(self.store, attr)

    def collection(self, name):
        real, reads = self.store.collection(name), self.reads

        class Counted:
            def __getattr__(self, attr):
                return getattr(real, attr)

            async def find(self, *args, **kwargs):
                reads.append(name)
                return await real.find(*args, **kwargs)

            async def find_one(self, *args, **kwargs):
                reads.append(name)
                return await real.find_one(*args, **kwargs)

        return Counted()
