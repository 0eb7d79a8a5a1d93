"""Where the SQLite store runs its reads: inline on the reactor thread within a time budget, or on a
reader thread when a read outlives the budget, finds the database busy, or comes from another thread.

Real SQLite files throughout; the slow read is a real query (a recursive count) that SQLite's
progress handler interrupts.
"""
from __future__ import annotations

import sqlite3
import threading

import pytest
import pytest_twisted
from twisted.internet import defer, threads

from kvmdesk.core.store.sqlite import SQLiteStore, _InlineReader

#: A read that takes far longer than any budget used here (tens of milliseconds or more).
SLOW_COUNT = ("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 3000000) "
              "SELECT count(*) FROM c")


@pytest.fixture
def open_store(tmp_path):
    opened: list[SQLiteStore] = []

    def make(**kwargs) -> SQLiteStore:
        store = SQLiteStore(str(tmp_path / "store.db"), **kwargs)
        opened.append(store)
        return store

    yield make
    for store in opened:
        pytest_twisted.blockon(defer.ensureDeferred(store.close()))


def _recording(sql: str, threads_seen: list[int]):
    def read(conn: sqlite3.Connection):
        threads_seen.append(threading.get_ident())
        return conn.execute(sql).fetchone()[0]

    return read


@pytest_twisted.ensureDeferred
async def test_a_quick_read_runs_inline_and_is_answered_at_once(open_store):
    store = open_store()
    await store.collection("things").insert_one({"name": "a"})
    seen: list[int] = []
    deferred = defer.ensureDeferred(store.read(_recording("SELECT count(*) FROM things", seen), 0))
    # No thread hop: the result is there before the reactor turns.
    assert deferred.called
    assert await deferred == 1
    assert seen == [threading.get_ident()]


@pytest_twisted.ensureDeferred
async def test_a_read_over_budget_is_interrupted_and_rerun_on_a_reader_thread(open_store):
    store = open_store(inline_read_ms=0.5)
    seen: list[int] = []
    assert await store.read(_recording(SLOW_COUNT, seen), 0) == 3000000
    reactor_thread = threading.get_ident()
    assert len(seen) == 2, seen
    assert seen[0] == reactor_thread and seen[1] != reactor_thread
    # The inline connection is usable afterwards, and quick reads stay inline.
    seen.clear()
    assert await store.read(_recording("SELECT 41 + 1", seen), 0) == 42
    assert seen == [reactor_thread]


@pytest_twisted.ensureDeferred
async def test_collection_reads_over_budget_still_answer_correctly(open_store):
    # Budget zero-ish: every query of any size goes the long way round and must still be right.
    store = open_store(inline_read_ms=1e-6)
    things = store.collection("things")
    await things.insert_many([{"name": f"n{i}", "n": i} for i in range(50)])
    assert await things.count({"n": {"$gte": 10}}) == 40
    page = await things.find({}, sort=[("n", -1)], skip=5, limit=3)
    assert [doc["n"] for doc in page] == [44, 43, 42]


@pytest_twisted.ensureDeferred
async def test_budget_zero_sends_every_read_to_a_reader_thread(open_store):
    store = open_store(inline_read_ms=0)
    seen: list[int] = []
    assert await store.read(_recording("SELECT 1", seen), 0) == 1
    assert seen and seen[0] != threading.get_ident()


@pytest_twisted.ensureDeferred
async def test_reads_from_another_thread_never_use_the_reactor_threads_connection(open_store):
    store = open_store()
    await store.collection("things").insert_one({"name": "a"})  # the inline reader now belongs to this thread
    assert store._inline_reader() is not None
    assert await threads.deferToThread(store._inline_reader) is None


@pytest_twisted.ensureDeferred
async def test_an_unwritten_collection_reads_empty_inline(open_store):
    store = open_store()
    assert await store.collection("never_written").find({}) == []
    assert await store.collection("never_written").count() == 0


def test_a_busy_database_sends_the_read_to_a_reader_thread(tmp_path):
    conn = sqlite3.connect(str(tmp_path / "x.db"), isolation_level=None, check_same_thread=False)
    reader = _InlineReader(conn, budget=1.0)

    def locked(conn):
        raise sqlite3.OperationalError("database is locked")

    assert reader.run(locked) == (False, None)
    conn.close()


def test_other_sqlite_errors_are_store_errors_not_retries(tmp_path):
    from kvmdesk.core.store import StoreUnavailable

    conn = sqlite3.connect(str(tmp_path / "x.db"), isolation_level=None, check_same_thread=False)
    reader = _InlineReader(conn, budget=1.0)
    with pytest.raises(StoreUnavailable):
        reader.run(lambda conn: conn.execute("SELECT * FROM missing_table WHERE nonsense syntax"))
    conn.close()
