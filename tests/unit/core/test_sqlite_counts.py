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
from kvmdesk.core.store.sqlite import ROW_COUNTS, SQLiteStore


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
        row = conn.execute(f'SELECT n FROM "{ROW_COUNTS}" WHERE name = ?', (table,)).fetchone()
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
