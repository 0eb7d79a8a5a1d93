"""The rollup layout on every store backend: upserted minutes, reads by node and hour, chunked expiry."""
from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import defer

from kvmdesk.plugins.monitoring import days
from kvmdesk.plugins.monitoring.columns import HourCache, series
from kvmdesk.plugins.monitoring.rollups import INDEXES, Rollups
from kvmdesk.plugins.monitoring.samples import Sample
from kvmdesk.testing.stores import open_test_store

HOUR = 1_700_002_800  # a whole hour


@pytest.fixture(params=["sqlite", "briskdb", "mongo"])
def store(request, tmp_path):
    store, cleanup = pytest_twisted.blockon(open_test_store(request.param, tmp_path))
    pytest_twisted.blockon(defer.ensureDeferred(store.ensure_indexes(INDEXES)))
    yield store
    pytest_twisted.blockon(cleanup())


def sample(at: float, cpu: float) -> Sample:
    return Sample(at=at, weight=5.0, cpu=cpu, mem_percent=50.0, mem_used=1000, disks={"vda": (1.0, 2.0)},
                  nics={"eth0": (10.0, None)})


@pytest_twisted.ensureDeferred
async def test_minutes_upsert_into_hour_documents_read_back_and_expire(store):
    rollups = Rollups(store)
    for node in ("n1", "n2"):
        for minute in range(3):
            rollups.add(node, sample(HOUR + minute * 60 + 5, 10.0 * (minute + 1)))
            rollups.add(node, sample(HOUR + minute * 60 + 10, 10.0 * (minute + 1) + 5))
    # The last minute is still under way: only the first two are written.
    assert await rollups.flush(before=HOUR + 2 * 60 + 30) == 4
    assert len(rollups.pending) == 2
    rollups.add("n1", sample(HOUR + 3600 + 5, 70.0))  # the next hour: a second document
    assert await rollups.flush() == 3 and not rollups.pending
    docs = await store.collection("monitor_rollups").find({"node": "n1"}, sort=[("hour", 1)])
    assert [d["hour"] for d in docs] == [HOUR, HOUR + 3600] and sorted(docs[0]["m"]) == ["0", "1", "2"]
    assert docs[0]["m"]["1"] == {"c": 22.5, "mp": 50.0, "mu": 1000, "d": {"vda": [1, 2]}, "n": {"eth0": [10, None]}}

    columns = await rollups.columns("n1", HOUR, 61, now=HOUR + 7200)
    assert [i for i, v in enumerate(columns["c"]) if v is not None] == [0, 1, 2, 60]
    answer = series(columns, 4, 1)  # the first four minutes
    assert answer["cpu_util"][:4] == [12.5, 22.5, 32.5, None]
    answer = series({k: v[:4] for k, v in columns.items()}, 4, 1)
    assert answer["nic_util"]["eth0"] == {"read_bytes_avg": [10, 10, 10, None], "write_bytes_avg": [None] * 4}
    assert series(columns, 60, 2)["cpu_util"][:3] == [17.5, 32.5, None]  # steps of two minutes: means

    # Expiry: hours that ended before the cutoff go, two documents per statement.
    assert await rollups.prune(HOUR + 3600, chunk=2) == 2
    assert await store.collection("monitor_rollups").count() == 1
    assert await rollups.prune(HOUR + 7200, chunk=2) == 1
    assert await store.collection("monitor_rollups").count() == 0


@pytest_twisted.ensureDeferred
async def test_finished_hours_are_cached_within_the_bound_and_dropped_when_written_or_expired(store):
    rollups = Rollups(store, HourCache(capacity=3))
    coll = store.collection("monitor_rollups")
    for hour in range(4):  # minute 5 of four hours, and minute 0 of the hour under way
        rollups.add("n1", sample(HOUR + hour * 3600 + 300, 10.0 + hour))
    rollups.add("n1", sample(HOUR + 4 * 3600 + 5, 99.0))
    await rollups.flush(before=HOUR + 4 * 3600)
    now = HOUR + 4 * 3600 + 30  # minute 0 of hour 4 is still in memory

    columns = await rollups.columns("n1", HOUR, 5 * 60, now)
    assert [columns["c"][h * 60 + 5] for h in range(4)] == [10.0, 11.0, 12.0, 13.0] and columns["c"][240] == 99.0
    # Four finished hours, three kept (the least recently used went); the hour under way is not kept.
    assert list(rollups.cache.entries) == [("n1", HOUR + h * 3600) for h in (1, 2, 3)]

    # A kept hour is answered from memory: its document may go, the answer stays.
    await coll.delete_many({"hour": HOUR + 3600})
    assert (await rollups.columns("n1", HOUR + 3600, 60, now))["c"][5] == 11.0
    # A minute written late into a kept hour drops it: the next answer reads the store again.
    rollups.add("n1", sample(HOUR + 2 * 3600 + 600, 50.0))
    await rollups.flush(before=HOUR + 4 * 3600)
    again = await rollups.columns("n1", HOUR + 2 * 3600, 60, now)
    assert again["c"][5] == 12.0 and again["c"][10] == 50.0

    # An hour with a minute still in memory is answered but not kept until that minute is written.
    rollups.add("n1", sample(HOUR + 3 * 3600 + 900, 70.0))  # (a clock set back): the kept hour goes at once
    assert ("n1", HOUR + 3 * 3600) not in rollups.cache.entries
    assert (await rollups.columns("n1", HOUR + 3 * 3600, 60, now))["c"][15] == 70.0
    assert ("n1", HOUR + 3 * 3600) not in rollups.cache.entries
    # An hour without any document (a node offline) is kept as such.
    assert series(await rollups.columns("n2", HOUR, 60, now), 60, 1)["cpu_util"] == [None] * 60
    assert rollups.cache.get("n2", HOUR) == (True, None)

    # Expiry drops the kept hours it deletes; a removed node's hours go too.
    await rollups.prune(HOUR + 3 * 3600, chunk=10)
    assert all(hour >= HOUR + 2 * 3600 for _, hour in rollups.cache.entries)
    rollups.forget("n1")
    assert all(node != "n1" for node, _ in rollups.cache.entries)


@pytest_twisted.ensureDeferred
async def test_finished_hours_are_sealed_into_day_documents_merged_and_expired(store):
    """The stored shape of past hours: one day document per node, migrated from hour documents."""
    day = HOUR - HOUR % 86400
    rollups = Rollups(store, HourCache(capacity=0))  # no cache: every answer reads the store
    for hour in (day + 22 * 3600, day + 23 * 3600, day + 86400):  # two hours of one day, one of the next
        rollups.add("n1", sample(hour + 60, 10.0))
    await rollups.flush()
    rollups.add("n1", sample(day + 86400 + 120, 20.0))  # still in memory: its hour is not sealed
    now = day + 86400 + 3600 + 30

    assert await rollups.seal(now, chunk=2) == 2
    hour_docs = await store.collection("monitor_rollups").find({})
    assert [d["hour"] for d in hour_docs] == [day + 86400]
    (sealed,) = await store.collection(days.DAYS).find({"node": "n1"})
    assert sealed["day"] == day and sorted(k for k in sealed if k.startswith("h")) == ["h22", "h23"]
    columns = await rollups.columns("n1", day + 22 * 3600, 3 * 60 + 3, now)  # both shapes and memory
    assert [columns["c"][i] for i in (0, 1, 61, 121, 122)] == [None, 10.0, 10.0, 10.0, 20.0]
    columns = await rollups.columns("n1", day + 86400, 60, now)
    assert columns["c"][1:3] == [10.0, 20.0]

    # A minute that comes late into a sealed hour is merged when that hour is sealed again.
    rollups.add("n1", sample(day + 23 * 3600 + 300, 40.0))
    await rollups.flush()
    assert await rollups.seal(now, chunk=2) == 2  # that hour and the next day's first
    late = (await days.read_hours(store, "n1", [day + 23 * 3600]))[day + 23 * 3600]
    assert late["c"][1] == 10.0 and late["c"][5] == 40.0
    assert (await rollups.columns("n1", day + 86400, 60, now))["c"][1:3] == [10.0, 20.0]

    # Expiry: the whole first day goes; of the second, the slots up to the cutoff's last hour.
    await rollups.prune(day + 86400 + 3600, chunk=10)
    assert [d["day"] for d in await store.collection(days.DAYS).find({})] == [day + 86400]
    assert await days.read_hours(store, "n1", [day + 86400]) == {}
    assert series(await rollups.columns("n1", day + 23 * 3600, 120, now), 120, 1)["cpu_util"] == [None] * 120


@pytest_twisted.ensureDeferred
async def test_a_flush_is_one_batch_and_a_refused_hour_keeps_its_minutes_pending(store):
    """The store refuses one node's hour document (a unique index on minute 0's cpu, so the second node
    with the same value clashes): the others are written and leave memory, the refused one stays."""
    from kvmdesk.core.store import DuplicateKeyError, Index

    await store.ensure_indexes([Index("monitor_rollups", ("m.0.c",), unique=True)])
    rollups = Rollups(store)
    for node, cpu in (("n1", 10.0), ("n2", 10.0), ("n3", 30.0)):
        rollups.add(node, sample(HOUR + 5, cpu))
    calls = []
    original = store.collection("monitor_rollups").upsert_each

    async def counted(operations):
        calls.append(len(operations))
        return await original(operations)

    store.collection("monitor_rollups").upsert_each = counted
    with pytest.raises(DuplicateKeyError):
        await rollups.flush()
    assert calls == [3]  # one round trip for the three nodes
    assert [node for node, _ in rollups.pending] == ["n2"]
    written = await store.collection("monitor_rollups").find({}, sort=[("node", 1)])
    assert [(d["node"], d["m"]["0"]["c"]) for d in written] == [("n1", 10.0), ("n3", 30.0)]
