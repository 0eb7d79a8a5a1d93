"""The rollup layout on every store backend: upserted minutes, reads by node and hour, chunked expiry."""
from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import defer

from kvmdesk.plugins.monitoring.columns import series
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
