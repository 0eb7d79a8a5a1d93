"""The SQLite store's count of a whole collection comes from a row kept by triggers: it must follow
every kind of write, survive a reopen, and start correctly on a table written before counts existed.

Each expected figure is checked against ``count(*)`` over the table itself.
"""
from __future__ import annotations

import sqlite3

import pytest
import pytest_twisted
from twisted.internet import defer

from kvmdesk.core.store import DuplicateKeyError, Index
from kvmdesk.core.store.sqlite import SQLiteStore
from kvmdesk.core.store.sqlite_stats import COUNTS


@pytest.fixture
def open_store(tmp_path):
    opened: list[SQLiteStore] = []

    def make() -> SQLiteStore:
        store = SQLiteStore(str(tmp_path / "store.db"))
        opened.append(store)
        return store

    yield make
    for store in opened:
        pytest_twisted.blockon(defer.ensureDeferred(store.close()))


def _rows(path: str, table: str) -> int:
    with sqlite3.connect(path) as conn:
        return conn.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0]


def _kept(path: str, table: str):
    with sqlite3.connect(path) as conn:
        row = conn.execute(f'SELECT n FROM "{COUNTS}" WHERE name = ?', (table,)).fetchone()
    return row and row[0]


@pytest_twisted.ensureDeferred
async def test_the_kept_count_follows_every_kind_of_write(open_store):
    store = open_store()
    await store.ensure_indexes([Index("things", ["name"], unique=True)])
    things = store.collection("things")
    await things.insert_one({"name": "a"})
    outcomes = await things.insert_many([{"name": "b"}, {"name": "a"}, {"name": "c"}])  # one duplicate
    assert isinstance(outcomes[1], DuplicateKeyError)
    with pytest.raises(DuplicateKeyError):
        await things.insert_one({"name": "b"})
    await things.update_one({"name": "zz"}, {"$set": {"n": 1}}, upsert=True)
    await things.update_many({}, {"$set": {"seen": True}})
    await things.find_one_and_update({"name": "c"}, {"$set": {"n": 2}})
    assert await things.count() == _rows(store.path, "things") == _kept(store.path, "things") == 4
    assert await things.delete_one({"name": "a"}) == 1
    assert await things.delete_many({"seen": True}) == 3
    assert await things.count() == _rows(store.path, "things") == _kept(store.path, "things") == 0
    await things.insert_one({"name": "again"})
    assert await things.count() == 1
    assert await things.count({"name": "again"}) == 1  # a filtered count still counts rows


@pytest_twisted.ensureDeferred
async def test_the_count_survives_a_reopen(open_store):
    store = open_store()
    await store.collection("things").insert_many([{"n": i} for i in range(7)])
    await store.close()
    again = open_store()
    assert await again.collection("things").count() == 7
    await again.collection("things").insert_one({"n": 7})
    assert await again.collection("things").count() == 8 == _rows(again.path, "things")


@pytest_twisted.ensureDeferred
async def test_a_table_written_before_counts_existed_is_counted_and_then_kept(tmp_path, open_store):
    path = tmp_path / "store.db"
    with sqlite3.connect(path) as conn:  # as an earlier version left it: no counts, no triggers
        conn.execute('CREATE TABLE "things" (id INTEGER PRIMARY KEY AUTOINCREMENT, doc TEXT NOT NULL)')
        conn.executemany('INSERT INTO "things" (doc) VALUES (?)', [('{"n": %d}' % i,) for i in range(5)])
    store = open_store()
    things = store.collection("things")
    assert await things.count() == 5  # no count kept yet: counted from the table
    assert await store.collection("never_written").count() == 0
    await things.insert_one({"n": 5})
    assert _kept(store.path, "things") == 6
    await things.delete_one({"n": 0})
    assert await things.count() == 5 == _kept(store.path, "things") == _rows(store.path, "things")


# -- id anchors: unfiltered, id-ordered pages step from remembered ids --------------------------


async def _all_pages(coll, direction: int, size: int) -> list[int]:
    ids, skip = [], 0
    while True:
        total, page = await coll.find_page({}, sort=[("id", direction)], skip=skip, limit=size)
        ids += [d["id"] for d in page]
        skip += size
        if skip >= total:
            return ids


@pytest_twisted.ensureDeferred
async def test_anchored_pages_match_plain_offsets_through_inserts_and_deletes(open_store, monkeypatch):
    from kvmdesk.core.store import sqlite_stats

    monkeypatch.setattr(sqlite_stats, "EVERY", 7)  # many anchors from few documents
    store = open_store()
    things = store.collection("things")
    await things.insert_many([{"n": i} for i in range(100)])

    async def check() -> None:
        everything = [d["id"] for d in await things.find({}, sort=[("id", 1)])]
        for size in (1, 3, 10, 7, 500):
            assert await _all_pages(things, 1, size) == everything, size
            assert await _all_pages(things, -1, size) == everything[::-1], size
        # A page read on its own (no earlier page built the anchors up to it) agrees too.
        assert [d["id"] for d in (await things.find_page({}, sort=[("id", -1)], skip=37, limit=5))[1]] \
            == everything[::-1][37:42]

    await check()
    assert len(things._anchors.ids) == 15  # positions 0, 7, ..., 98: the anchors were used
    await things.insert_many([{"n": i} for i in range(100, 130)])  # appended: anchors stay valid
    await check()
    assert len(things._anchors.ids) == 19
    await things.delete_many({"n": {"$in": [0, 3, 50, 51, 52, 129]}})  # positions move: anchors restart
    await check()
    assert things._anchors.deletes == 6
    await things.delete_many({})
    assert await things.find_page({}, sort=[("id", 1)], skip=0, limit=10) == (0, [])
    await things.insert_one({"n": "alone"})
    assert [d["n"] for d in (await things.find_page({}, sort=[("id", -1)], skip=0, limit=10))[1]] == ["alone"]


@pytest_twisted.ensureDeferred
async def test_anchors_are_not_used_for_other_sorts_or_filters(open_store):
    store = open_store()
    things = store.collection("things")
    await things.insert_many([{"n": i % 4} for i in range(40)])
    count, page = await things.find_page({"n": 1}, sort=[("id", 1)], skip=2, limit=3)
    assert (count, [d["n"] for d in page]) == (10, [1, 1, 1])
    count, page = await things.find_page({}, sort=[("n", 1), ("id", 1)], skip=35, limit=10)
    assert (count, [d["n"] for d in page]) == (40, [3] * 5)
    assert things._anchors.ids == []


@pytest_twisted.ensureDeferred
async def test_a_reader_that_finds_the_anchors_busy_reads_with_an_offset(open_store):
    store = open_store()
    things = store.collection("things")
    await things.insert_many([{"n": i} for i in range(30)])
    things._anchors._lock.acquire()  # as if a reader thread were extending them
    try:
        count, page = await things.find_page({}, sort=[("id", 1)], skip=20, limit=3)
    finally:
        things._anchors._lock.release()
    assert (count, [d["n"] for d in page]) == (30, [20, 21, 22])
    assert things._anchors.ids == []
