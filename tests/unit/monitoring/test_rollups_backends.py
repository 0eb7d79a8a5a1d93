"""The rollup layout on every store backend: fragments and the head, sealed days, reads, expiry, restart."""
from __future__ import annotations

import orjson
import pytest
import pytest_twisted
from twisted.internet import defer

from kvmdesk.plugins.monitoring import days
from kvmdesk.plugins.monitoring.columns import HourCache, series
from kvmdesk.plugins.monitoring.rollups import INDEXES, LEGACY_HOURS, MINUTES, Rollups
from kvmdesk.plugins.monitoring.samples import Sample
from kvmdesk.testing.stores import open_test_store

DAY = 1_699_920_000  # a whole UTC day
HOUR = DAY + 10 * 3600


@pytest.fixture(params=["sqlite", "briskdb", "mongo"])
def store(request, tmp_path):
    store, cleanup = pytest_twisted.blockon(open_test_store(request.param, tmp_path))
    pytest_twisted.blockon(defer.ensureDeferred(store.ensure_indexes(INDEXES)))
    yield store
    pytest_twisted.blockon(cleanup())


def sample(at: float, cpu: float) -> Sample:
    return Sample(at=at, weight=5.0, cpu=cpu, mem_percent=50.0, mem_used=1000, disks={"vda": (1.0, 2.0)},
                  nics={"eth0": (10.0, None)})


class CountingStore:
    """The store, counting the reads (``find``) each collection gets."""

    def __init__(self, store):
        self.store, self.reads = store, []

    def collection(self, name):
        real = self.store.collection(name)
        outer = self

        class Counted:
            def __getattr__(self, attr):
                return getattr(real, attr)

            async def find(self, *args, **kwargs):
                outer.reads.append(name)
                return await real.find(*args, **kwargs)

        return Counted()


@pytest_twisted.ensureDeferred
async def test_a_flush_inserts_fragments_the_head_answers_and_a_restart_reads_it_back(store):
    rollups = Rollups(store)
    for node in ("n1", "n2", "n3"):
        for minute in range(3):
            rollups.add(node, sample(HOUR + minute * 60 + 5, 10.0 * (minute + 1)))
            rollups.add(node, sample(HOUR + minute * 60 + 10, 10.0 * (minute + 1) + 5))
    # The last minute is still under way: only the first two are written, every node's in one fragment.
    assert await rollups.flush(before=HOUR + 2 * 60 + 30) == 6
    assert sorted(rollups.pending) == [(n, HOUR + 120) for n in ("n1", "n2", "n3")]
    (fragment,) = await store.collection(MINUTES).find({})
    assert fragment["hour"] == HOUR and len(orjson.loads(fragment["points"])) == 6
    rollups.add("n1", sample(HOUR + 3600 + 5, 70.0))  # the next hour: a fragment of its own
    assert await rollups.flush() == 4 and not rollups.pending
    assert [d["hour"] for d in await store.collection(MINUTES).find({}, sort=[("id", 1)])] == [HOUR, HOUR, HOUR + 3600]

    counting = CountingStore(store)
    rollups.store = counting
    columns = await rollups.columns("n1", HOUR, 61)
    assert counting.reads == []  # hours never sealed: the head holds them, the store is not asked
    assert [i for i, v in enumerate(columns["c"]) if v is not None] == [0, 1, 2, 60]
    assert series(columns, 4, 1)["cpu_util"][:4] == [12.5, 22.5, 32.5, None]
    answer = series({k: v[:4] for k, v in columns.items()}, 4, 1)
    assert answer["nic_util"]["eth0"] == {"read_bytes_avg": [10, 10, 10, None], "write_bytes_avg": [None] * 4}
    assert series(columns, 60, 2)["cpu_util"][:3] == [17.5, 32.5, None]  # steps of two minutes: means

    # A controller started again on the same store answers the same from the fragments.
    again = Rollups(store)
    assert await again.load() == 10
    assert await again.columns("n1", HOUR, 61) == columns
    assert (await again.columns("n3", HOUR, 3))["c"] == [12.5, 22.5, 32.5]


@pytest_twisted.ensureDeferred
async def test_hours_older_than_the_head_are_sealed_into_day_documents_merged_and_expired(store):
    rollups = Rollups(store, HourCache(capacity=0))  # no cache: every answer reads the store
    for hour in (DAY + 22 * 3600, DAY + 23 * 3600, DAY + 86400, DAY + 86400 + 3600):
        rollups.add("n1", sample(hour + 60, 10.0))
    await rollups.flush()
    rollups.add("n1", sample(DAY + 86400 + 3600 + 120, 20.0))  # still being summed
    now = DAY + 86400 + 3600 + 150  # hour 1 of the second day: hours 0 and 1 stay in the head
    before = await rollups.columns("n1", DAY + 22 * 3600, 4 * 60)

    assert await rollups.seal(now, chunk=1) == 2  # one node-day a write: two writes
    assert sorted({d["hour"] for d in await store.collection(MINUTES).find({})}) == [DAY + 86400, DAY + 86400 + 3600]
    assert sorted(hour for _, hour in rollups.head) == [DAY + 86400, DAY + 86400 + 3600]
    (sealed,) = await store.collection(days.DAYS).find({"node": "n1"})
    assert sealed["day"] == DAY and sorted(k for k in sealed if k.startswith("h")) == ["h22", "h23"]
    assert rollups.sealed_through == DAY + 23 * 3600
    assert await rollups.columns("n1", DAY + 22 * 3600, 4 * 60) == before
    assert [before["c"][i] for i in (0, 1, 61, 121, 181, 182)] == [None, 10.0, 10.0, 10.0, 10.0, 20.0]
    assert await days.latest_hour(store) == DAY + 23 * 3600
    assert await rollups.seal(now, chunk=1) == 0  # nothing left to seal

    # A minute that comes late into a sealed hour is laid over its day until that hour is sealed again.
    rollups.add("n1", sample(DAY + 23 * 3600 + 300, 40.0))
    await rollups.flush()
    late = await rollups.columns("n1", DAY + 23 * 3600, 60)
    assert late["c"][1] == 10.0 and late["c"][5] == 40.0
    assert await rollups.seal(now, chunk=1) == 1
    merged = (await days.read_hours(store, "n1", [DAY + 23 * 3600]))[DAY + 23 * 3600]
    assert merged["c"][1] == 10.0 and merged["c"][5] == 40.0
    assert await rollups.columns("n1", DAY + 23 * 3600, 60) == late

    # Expiry: the whole first day goes; of the second, the slots up to the cutoff's last hour, and
    # the fragments of the hours that ended before it.
    await rollups.prune(DAY + 86400 + 3600, chunk=10)
    assert [d["day"] for d in await store.collection(days.DAYS).find({})] == []
    assert {d["hour"] for d in await store.collection(MINUTES).find({})} == {DAY + 86400 + 3600}
    assert series(await rollups.columns("n1", DAY + 23 * 3600, 120), 120, 1)["cpu_util"] == [None] * 120
    assert sorted(rollups.head) == [("n1", DAY + 86400 + 3600)]


@pytest_twisted.ensureDeferred
async def test_sealed_hours_are_cached_within_the_bound_and_dropped_when_sealed_again_expired_or_forgotten(store):
    rollups = Rollups(store, HourCache(capacity=3))
    for hour in range(4):  # minute 5 of four hours
        rollups.add("n1", sample(HOUR + hour * 3600 + 300, 10.0 + hour))
    await rollups.flush()
    await rollups.seal(HOUR + 6 * 3600, chunk=10)
    counting = CountingStore(store)
    rollups.store = counting

    columns = await rollups.columns("n1", HOUR, 4 * 60)
    assert [columns["c"][h * 60 + 5] for h in range(4)] == [10.0, 11.0, 12.0, 13.0]
    assert counting.reads == [days.DAYS]  # one read for the four hours
    # Four sealed hours, three kept (the least recently used went).
    assert list(rollups.cache.entries) == [("n1", HOUR + h * 3600) for h in (1, 2, 3)]
    # A kept hour is answered from memory.
    assert (await rollups.columns("n1", HOUR + 3600, 60))["c"][5] == 11.0 and counting.reads == [days.DAYS]
    # An hour without any point (a node offline) is kept as such.
    assert series(await rollups.columns("n2", HOUR + 2 * 3600, 60), 60, 1)["cpu_util"] == [None] * 60
    assert rollups.cache.get("n2", HOUR + 2 * 3600) == (True, None)

    # A late minute is laid over the kept hour at once; sealing it again drops the kept hour.
    rollups.add("n1", sample(HOUR + 2 * 3600 + 600, 50.0))
    await rollups.flush()
    again = await rollups.columns("n1", HOUR + 2 * 3600, 60)
    assert again["c"][5] == 12.0 and again["c"][10] == 50.0
    await rollups.seal(HOUR + 6 * 3600, chunk=10)
    assert ("n1", HOUR + 2 * 3600) not in rollups.cache.entries
    assert (await rollups.columns("n1", HOUR + 2 * 3600, 60)) == again

    # Expiry drops the kept hours it deletes; a removed node's hours go too.
    await rollups.prune(HOUR + 3 * 3600, chunk=10)
    assert all(hour >= HOUR + 2 * 3600 for _, hour in rollups.cache.entries)
    rollups.forget("n1")
    assert all(node != "n1" for node, _ in rollups.cache.entries)


@pytest_twisted.ensureDeferred
async def test_a_refused_fragment_keeps_its_minutes_pending_and_a_failed_seal_keeps_the_head(store, monkeypatch):
    """The store refuses a second fragment of one hour (a unique index on ``hour``): the first hour's
    minutes are written, the refused ones stay pending and are written once the store takes them."""
    from kvmdesk.core.store import DuplicateKeyError, Index

    await store.ensure_indexes([Index(MINUTES, ("hour",), unique=True)])
    rollups = Rollups(store)
    for node in ("n1", "n2"):
        rollups.add(node, sample(HOUR + 5, 10.0))
    assert await rollups.flush() == 2
    rollups.add("n3", sample(HOUR + 65, 30.0))  # the same hour again: refused
    rollups.add("n3", sample(HOUR + 3600 + 5, 40.0))
    with pytest.raises(DuplicateKeyError):
        await rollups.flush()
    assert list(rollups.pending) == [("n3", HOUR + 60)]
    assert (await rollups.columns("n3", HOUR + 60, 1))["c"] == [30.0]  # still answered from memory
    assert sorted(hour for _, hour in rollups.head) == [HOUR, HOUR, HOUR + 3600]

    # A seal whose day write fails keeps the hour's fragments and head; the next one succeeds.
    async def refused(store_, groups):
        return [RuntimeError("refused")] * len(groups)

    with monkeypatch.context() as patch:
        patch.setattr(days, "seal", refused)
        with pytest.raises(RuntimeError):
            await rollups.seal(HOUR + 3 * 3600, chunk=10)
    assert await store.collection(MINUTES).count({"hour": HOUR}) == 1 and ("n1", HOUR) in rollups.head
    assert (await rollups.columns("n1", HOUR, 1))["c"] == [10.0]
    assert await rollups.seal(HOUR + 3 * 3600, chunk=10) == 3
    assert await store.collection(MINUTES).count({"hour": HOUR}) == 0 and ("n1", HOUR) not in rollups.head
    assert (await rollups.columns("n1", HOUR, 1))["c"] == [10.0]


@pytest_twisted.ensureDeferred
async def test_hour_documents_of_an_older_version_are_taken_into_the_head_at_start(store):
    legacy = [{"node": "n1", "hour": HOUR + h * 3600, "m": {"0": {"c": float(h), "n": {"eth0": [h, 1]}}, "7": {"c": 7.0}}}
              for h in range(3)]
    await store.collection(LEGACY_HOURS).insert_many(legacy)
    rollups = Rollups(store)
    assert await rollups.load(chunk=2) == 6
    assert await store.collection(LEGACY_HOURS).count() == 0
    columns = await rollups.columns("n1", HOUR, 3 * 60)
    assert [columns["c"][i] for i in (0, 7, 60, 67, 120)] == [0.0, 7.0, 1.0, 7.0, 2.0]
    assert columns[("n", "eth0", 0)][120] == 2 and columns[("n", "eth0", 1)][60] == 1
    # A second start finds them in the fragments.
    assert await Rollups(store).load() == 6


@pytest_twisted.ensureDeferred
async def test_a_sample_that_comes_while_its_minute_is_written_is_kept_for_the_next_flush(store):
    rollups = Rollups(store)
    rollups.add("n1", sample(HOUR + 5, 10.0))
    real = store.collection(MINUTES).insert_many

    async def late_heartbeat(docs):
        rollups.add("n1", sample(HOUR + 55, 30.0))  # a heartbeat of that minute, late, while it is written
        return await real(docs)

    store.collection(MINUTES).insert_many = late_heartbeat
    assert await rollups.flush() == 1
    assert (await rollups.columns("n1", HOUR, 1))["c"] == [20.0]  # the pending minute, both samples
    store.collection(MINUTES).insert_many = real
    assert await rollups.flush() == 1 and not rollups.pending
    assert (await Rollups(store).load()) == 2  # the minute twice: the later point wins at load
    again = Rollups(store)
    await again.load()
    assert (await again.columns("n1", HOUR, 1))["c"] == [20.0]
