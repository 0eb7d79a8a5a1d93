"""The embedded SQLite backend (the default store).

- WAL journal, one writer connection on a single dedicated thread (SQLite allows one writer at a
  time anyway) and a small pool of reader threads with a connection each.
- A read first runs on the reactor thread under a time budget (``inline_read_ms``, 1 ms by default)
  that SQLite's progress handler enforces: most reads (a page, a count, one document) take tens of
  microseconds, and handing them to a thread cost more than the read itself (the thread hop, the
  wake-up and the GIL hand-over halved the throughput of a paged list; bench/api_bench.py).  A read
  that exceeds the budget is interrupted and rerun on a reader thread, so the reactor never waits
  longer than the budget; one that finds the database busy goes to a reader thread at once.
- Writes that read before they write (updates, find-one-and-update) run in one ``BEGIN IMMEDIATE``
  transaction on the writer: atomic against other writers in this and any other process.
- Unique and compound indexes are SQLite expression indexes over ``json_extract``.
"""
from __future__ import annotations

import functools
import os
import queue
import re
import sqlite3
import threading
import time
from typing import Any, Callable, Iterable, Sequence, TypeVar

import orjson
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from . import (
    Document,
    DuplicateKeyError,
    Filter,
    Index,
    Sort,
    StoreError,
    StoreUnavailable,
    Update,
    check_collection,
    check_field,
    page_plan,
)
from .filters import check_filter
from .projection import project
from .sqlite_sql import compile_filter, compile_sort, field_expr
from .sqlite_stats import IdAnchors, keep_counts, read_counts
from .updates import apply_update, check_update, check_upserts, upsert_seed

T = TypeVar("T")

_INDEX_NAME = re.compile(r"index '([^']+)'")


@functools.lru_cache(maxsize=256)
def _compiled(pattern: str, options: str) -> re.Pattern:
    flags = re.IGNORECASE if "i" in options else 0
    if "m" in options:
        flags |= re.MULTILINE
    if "s" in options:
        flags |= re.DOTALL
    return re.compile(pattern, flags)


def _regexp(pattern: str, options: str, value: Any) -> int:
    if not isinstance(value, str):
        return 0
    return 1 if _compiled(pattern, options or "").search(value) else 0


def _where(filter: Filter | None, params: list) -> str:
    """`` WHERE ...`` for ``filter``, or nothing for an empty one.

    "WHERE 1" would defeat SQLite's count(*) fast path (it counts the cells of the smallest b-tree
    instead of visiting rows: 260 -> 12 microseconds for 10,000 documents).
    """
    clause = compile_filter(filter, params)
    return "" if clause == "1" else f" WHERE {clause}"


def _id_order(sort: Sort) -> int | None:
    """1 or -1 when ``sort`` is by id alone, else ``None``."""
    keys = list(sort)
    return keys[0][1] if len(keys) == 1 and keys[0][0] == "id" and keys[0][1] in (1, -1) else None


def _dump(doc: Document) -> str:
    return orjson.dumps(doc).decode()


def _load(row: tuple[int, str]) -> Document:
    doc = orjson.loads(row[1])
    doc["id"] = row[0]
    return doc


class _Readers:
    """Reader threads fed from one queue; each call's result comes back through ``callFromThread``.

    twisted's ThreadPool hands every call through a coordinator, a Python-level ``Queue`` and context
    propagation: for a store that answers thousands of small reads a second that cost 10-20% of the
    CPU of a paged list request (three reads; bench/api_bench.py).  ``SimpleQueue`` is implemented in C.
    """

    def __init__(self, reactor: Any, count: int, name: str):
        self._reactor = reactor
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(count)]
        for thread in self._threads:
            thread.start()

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            deferred, fn = item
            try:
                result = fn()
            except BaseException:
                self._reactor.callFromThread(deferred.errback, Failure())
            else:
                self._reactor.callFromThread(deferred.callback, result)

    def submit(self, fn: Callable[[], T]) -> defer.Deferred:
        deferred: defer.Deferred = defer.Deferred()
        self._queue.put((deferred, fn))
        return deferred

    def stop(self) -> None:
        """Run what is queued, then end and join the threads (call it off the reactor thread)."""
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join()


class _Connections(threading.local):
    conn: sqlite3.Connection | None = None


class SQLiteStore:
    """A :class:`~kvmdesk.core.store.Store` in one SQLite file.

    :param path: database file (``:memory:`` is refused: readers need a shared file).
    :param readers: number of reader threads.
    :param inline_read_ms: how long a read may run on the calling (reactor) thread before it is
        interrupted and rerun on a reader thread; 0 sends every read to a reader thread.
    """

    def __init__(self, path: str, *, reactor: Any = None, readers: int = 4, inline_read_ms: float = 1.0):
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        if not path or path == ":memory:":
            raise ValueError("the SQLite store needs a file path")
        self.path = os.path.abspath(path)
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self._reactor = reactor
        self._local = _Connections()
        self._all_connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._tables: set[str] = set()
        self._collections: dict[str, SQLiteCollection] = {}
        #: SQLite names the index, not the fields, when a UNIQUE constraint fails.
        self.index_fields: dict[str, tuple[str, ...]] = {}
        self._writer = ThreadPool(1, 1, name="kvmdesk-sqlite-writer")
        self._readers = _Readers(reactor, readers, name="kvmdesk-sqlite-reader")
        self._writer.start()
        self._closed = False
        self._inline_budget = max(0.0, inline_read_ms) / 1000.0
        self._inline: _InlineReader | None = None
        # WAL is a property of the file: set it once, synchronously, before any thread uses it.
        conn = self._connect()
        conn.execute("PRAGMA journal_mode=WAL")

    # -- threads and connections -------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        conn = self._local.conn
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=30000")
            conn.create_function("kvmdesk_regexp", 3, _regexp, deterministic=True)
            self._local.conn = conn
            with self._lock:
                self._all_connections.append(conn)
        return conn

    def _run(self, pool: ThreadPool | _Readers, fn: Callable[[sqlite3.Connection], T]):
        if self._closed:
            raise StoreUnavailable("the store is closed")

        def call() -> T:
            try:
                return fn(self._connect())
            except sqlite3.OperationalError as exc:
                if "no such table" in str(exc):
                    raise _MissingTable() from exc
                raise StoreUnavailable(str(exc)) from exc

        if isinstance(pool, _Readers):
            return pool.submit(call)
        return deferToThreadPool(self._reactor, pool, call)

    async def read(self, fn: Callable[[sqlite3.Connection], T], empty: T) -> T:
        """Run a read, inline within the budget or on a reader thread; a collection never written to
        reads as ``empty``."""
        if self._closed:
            raise StoreUnavailable("the store is closed")
        inline = self._inline_reader()
        try:
            if inline is not None:
                done, result = inline.run(fn)
                if done:
                    return result
            return await self._run(self._readers, fn)
        except _MissingTable:
            return empty

    def _inline_reader(self) -> "_InlineReader | None":
        """The reader of the thread that opened the store first (the reactor's), or ``None``."""
        if not self._inline_budget:
            return None
        if self._inline is None:
            # Closed by close() from a thread of its own: the thread check is _inline_reader's.
            conn = sqlite3.connect(self.path, timeout=0, isolation_level=None, check_same_thread=False)
            conn.create_function("kvmdesk_regexp", 3, _regexp, deterministic=True)
            with self._lock:
                self._all_connections.append(conn)
            self._inline = _InlineReader(conn, self._inline_budget)
        return self._inline if self._inline.thread == threading.get_ident() else None

    async def write(self, table: str, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` on the writer thread inside ``BEGIN IMMEDIATE`` ... ``COMMIT``."""

        def transaction(conn: sqlite3.Connection) -> T:
            self._ensure_table(conn, table)
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn(conn)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return result

        return await self._run(self._writer, transaction)

    def _ensure_table(self, conn: sqlite3.Connection, table: str) -> None:
        if table in self._tables:
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(f'CREATE TABLE IF NOT EXISTS "{table}" (id INTEGER PRIMARY KEY AUTOINCREMENT, doc TEXT NOT NULL)')
            # The ids alone, in a b-tree a few pages long: the rows an OFFSET skips are read from it
            # instead of from the documents (see SQLiteCollection._select).
            conn.execute(f'CREATE INDEX IF NOT EXISTS "{table}__ix_id" ON "{table}" (id)')
            keep_counts(conn, table)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        self._tables.add(table)

    # -- Store -------------------------------------------------------------------------------

    def collection(self, name: str) -> "SQLiteCollection":
        coll = self._collections.get(name)
        if coll is None:
            coll = self._collections[name] = SQLiteCollection(self, check_collection(name))
        return coll

    async def ensure_indexes(self, indexes: Iterable[Index]) -> None:
        for index in indexes:
            table = check_collection(index.collection)
            columns = ", ".join(
                f"{field_expr(path)} {'DESC' if direction < 0 else 'ASC'}" for path, direction in index.keys()
            )
            sql_name = f"{table}__{index.name}"
            self.index_fields[sql_name] = tuple(path for path, _ in index.keys())
            sql = f'CREATE {"UNIQUE " if index.unique else ""}INDEX IF NOT EXISTS "{sql_name}" ON "{table}" ({columns})'

            def create(conn: sqlite3.Connection, sql: str = sql, index: Index = index) -> None:
                try:
                    conn.execute(sql)
                except sqlite3.IntegrityError as exc:
                    raise DuplicateKeyError(index.collection, [p for p, _ in index.keys()]) from exc

            await self.write(table, create)

    async def ping(self) -> None:
        await self._run(self._readers, lambda conn: conn.execute("SELECT 1").fetchone())

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # ThreadPool.stop joins its threads: do it off the reactor thread.
        from twisted.internet.threads import deferToThread

        def stop() -> None:
            self._writer.stop()
            self._readers.stop()
            with self._lock:
                for conn in self._all_connections:
                    conn.close()
                self._all_connections.clear()

        await deferToThread(stop)


class _MissingTable(Exception):
    pass


class _InlineReader:
    """Runs reads on its own thread's connection, interrupting any that outlives the budget.

    The connection never waits for a lock (``timeout=0``): a busy database sends the read to a
    reader thread, whose connection waits.
    """

    #: SQLite virtual-machine instructions between two looks at the clock (about 10-50 microseconds).
    CHECK_EVERY = 20000

    def __init__(self, conn: sqlite3.Connection, budget: float):
        self.conn = conn
        self.budget = budget
        self.thread = threading.get_ident()
        self._deadline = 0.0
        self._interrupted = False
        conn.set_progress_handler(self._over_budget, self.CHECK_EVERY)

    def _over_budget(self) -> int:
        if time.perf_counter() > self._deadline:
            self._interrupted = True
            return 1
        return 0

    def run(self, fn: Callable[[sqlite3.Connection], T]) -> tuple[bool, T | None]:
        """``(True, result)``, or ``(False, None)`` when the read should go to a reader thread."""
        self._interrupted = False
        self._deadline = time.perf_counter() + self.budget
        try:
            return True, fn(self.conn)
        except sqlite3.OperationalError as exc:
            if self._interrupted or "locked" in str(exc) or "busy" in str(exc):
                return False, None
            if "no such table" in str(exc):
                raise _MissingTable() from exc
            raise StoreUnavailable(str(exc)) from exc


class SQLiteCollection:
    """One table of JSON documents; see :class:`~kvmdesk.core.store.Collection`."""

    def __init__(self, store: SQLiteStore, name: str):
        self.store = store
        self.name = name
        self._anchors = IdAnchors(name)

    # -- helpers run on the writer thread ----------------------------------------------------

    def _insert(self, conn: sqlite3.Connection, doc: Document) -> Document:
        body = {k: v for k, v in doc.items() if k not in ("id", "_id")}
        try:
            (row_id,) = conn.execute(f'INSERT INTO "{self.name}" (doc) VALUES (?) RETURNING id', (_dump(body),)).fetchone()
        except sqlite3.IntegrityError as exc:
            raise self._duplicate(conn, exc) from exc
        body["id"] = row_id
        return body

    def _duplicate(self, conn: sqlite3.Connection, exc: sqlite3.IntegrityError) -> DuplicateKeyError:
        match = _INDEX_NAME.search(str(exc))
        fields = self.store.index_fields.get(match.group(1), ()) if match else ()
        return DuplicateKeyError(self.name, fields)

    def _select(self, conn, filter: Filter | None, sort: Sort | None, skip: int, limit: int) -> list[tuple]:
        params: list = []
        return self._select_where(conn, _where(filter, params), params, sort, skip, limit)

    def _select_where(self, conn, where: str, params: list, sort: Sort | None, skip: int, limit: int) -> list[tuple]:
        """:meth:`_select` with the filter already compiled (``params`` is extended)."""
        order = compile_sort(sort)
        if skip > 0:
            # OFFSET steps over every skipped row: pick the page's ids first (over the id index when
            # the filter allows), then read only those documents: 2-3x faster on deep pages.
            params.extend([limit if limit > 0 else -1, skip])
            sql = (f'SELECT id, doc FROM "{self.name}" WHERE id IN '
                   f'(SELECT id FROM "{self.name}"{where}{order} LIMIT ? OFFSET ?){order}')
            return conn.execute(sql, params).fetchall()
        sql = f'SELECT id, doc FROM "{self.name}"{where}{order}'
        if limit:
            sql += " LIMIT ?"
            params.append(limit)
        return conn.execute(sql, params).fetchall()

    def _update_rows(self, conn, rows: list[tuple], update: Update) -> list[tuple[Document, Document]]:
        changed = []
        for row in rows:
            before = _load(row)
            after = apply_update(before, update)
            after["id"] = before["id"]
            body = {k: v for k, v in after.items() if k != "id"}
            try:
                conn.execute(f'UPDATE "{self.name}" SET doc = ? WHERE id = ?', (_dump(body), row[0]))
            except sqlite3.IntegrityError as exc:
                raise self._duplicate(conn, exc) from exc
            changed.append((before, after))
        return changed

    def _upsert(self, conn, filter: Filter, update: Update) -> Document:
        return self._insert(conn, apply_update(upsert_seed(filter), update))

    # -- Collection ----------------------------------------------------------------------------

    async def insert_one(self, doc: Document) -> Document:
        return await self.store.write(self.name, lambda conn: self._insert(conn, doc))

    async def insert_many(self, docs: Sequence[Document]) -> list[Document | DuplicateKeyError]:
        def insert_all(conn) -> list:
            results: list = []
            for doc in docs:
                try:
                    results.append(self._insert(conn, doc))
                except DuplicateKeyError as exc:
                    results.append(exc)
            return results

        return await self.store.write(self.name, insert_all)

    async def find(
        self,
        filter: Filter | None = None,
        *,
        sort: Sort | None = None,
        skip: int = 0,
        limit: int = 0,
        projection: Sequence[str] | None = None,
    ) -> list[Document]:
        check_filter(filter)  # reject a bad filter here, not as a thread failure
        for path in projection or ():
            check_field(path)

        def read(conn: sqlite3.Connection) -> list[Document]:
            # Decoded where the rows were read: a large result moved to a reader thread is decoded
            # there too, and the interpreter's thread switching keeps the reactor turning meanwhile.
            return [project(_load(row), projection) for row in self._select(conn, filter, sort, skip, limit)]

        return await self.store.read(read, [])

    async def find_one(self, filter: Filter | None = None, *, sort: Sort | None = None) -> Document | None:
        found = await self.find(filter, sort=sort, limit=1)
        return found[0] if found else None

    async def find_page(self, filter: Filter | None, *, sort: Sort, skip: int, limit: int) -> tuple[int, list[Document]]:
        check_filter(filter)
        params: list = []
        where = _where(filter, params)
        direction = _id_order(sort) if not where else None

        def read(conn: sqlite3.Connection) -> tuple[int, list[Document]]:
            # One read transaction: the count and the page agree, and one lock round instead of two.
            conn.execute("BEGIN")
            try:
                total, deletes = self._total(conn, where, params)
                plan = page_plan(sort, skip, limit, total)
                if plan is None:
                    return total, []
                if direction is not None and deletes is not None:
                    # Whole collection in id order: from a remembered id (see IdAnchors).
                    first = skip if direction > 0 else total - skip - plan.limit
                    docs = [_load(row) for row in self._id_range(conn, first, plan.limit, deletes)]
                    return total, docs if direction > 0 else docs[::-1]
                rows = self._select_where(conn, where, list(params), plan.sort, plan.skip, plan.limit)
                docs = [_load(row) for row in rows]
                return total, docs[::-1] if plan.backwards else docs
            finally:
                if conn.in_transaction:
                    conn.execute("COMMIT")

        return await self.store.read(read, (0, []))

    def _id_range(self, conn, first: int, rows: int, deletes: int) -> list[tuple]:
        """The rows at ascending id positions ``first .. first+rows-1``, stepping from a remembered id."""
        start = self._anchors.start(conn, deletes, first)
        if start is None:
            return self._select_where(conn, "", [], [("id", 1)], first, rows)
        # Fewer than EVERY rows to step over: straight through the table beats the id-index detour
        # of _select (a third cheaper for a page of ten).
        return conn.execute(f'SELECT id, doc FROM "{self.name}" WHERE id >= ? ORDER BY id LIMIT ? OFFSET ?',
                            (start[0], rows, start[1])).fetchall()

    async def count(self, filter: Filter | None = None) -> int:
        params: list = []
        where = _where(filter, params)
        return await self.store.read(lambda conn: self._total(conn, where, params)[0], 0)

    def _total(self, conn: sqlite3.Connection, where: str, params: list) -> tuple[int, int | None]:
        """``(documents matching, deletes so far or None)``: the whole collection's count is the kept
        one (with its delete count); a filtered count, or a table with none kept, is counted."""
        if not where:
            kept = read_counts(conn, self.name)
            if kept is not None:
                return kept
        return conn.execute(f'SELECT count(*) FROM "{self.name}"{where}', params).fetchone()[0], None

    async def count_by(self, field: str, filter: Filter | None = None) -> dict[Any, int]:
        params: list = []
        expr = field_expr(field)
        sql = f'SELECT {expr}, count(*) FROM "{self.name}"{_where(filter, params)} GROUP BY {expr}'
        rows = await self.store.read(lambda conn: conn.execute(sql, params).fetchall(), [])
        return {value: count for value, count in rows}

    async def update_one(self, filter: Filter, update: Update, *, upsert: bool = False) -> int:
        result = await self.find_one_and_update(filter, update, upsert=upsert)
        return 0 if result is None else 1

    async def update_many(self, filter: Filter, update: Update) -> int:
        check_update(update)
        check_filter(filter)
        return await self.store.write(
            self.name, lambda conn: len(self._update_rows(conn, self._select(conn, filter, None, 0, 0), update))
        )

    async def find_one_and_update(
        self,
        filter: Filter,
        update: Update,
        *,
        sort: Sort | None = None,
        upsert: bool = False,
        return_new: bool = True,
    ) -> Document | None:
        check_update(update)
        check_filter(filter)

        def run(conn) -> Document | None:
            rows = self._select(conn, filter, sort, 0, 1)
            if not rows:
                if not upsert:
                    return None
                created = self._upsert(conn, filter, update)
                return created if return_new else None
            ((before, after),) = self._update_rows(conn, rows, update)
            return after if return_new else before

        return await self.store.write(self.name, run)

    async def find_one_and_update_each(self, operations: Sequence[tuple[Filter, Update, Sort | None]]) -> list[Document | None]:
        for filter, update, _ in operations:
            check_update(update)
            check_filter(filter)

        def run(conn) -> list[Document | None]:
            found: list[Document | None] = []
            for filter, update, sort in operations:
                rows = self._select(conn, filter, sort, 0, 1)
                found.append(self._update_rows(conn, rows, update)[0][1] if rows else None)
            return found

        return await self.store.write(self.name, run) if operations else []

    async def upsert_each(self, operations: Sequence[tuple[Filter, Update]]) -> list[str | StoreError]:
        checked = check_upserts(operations)

        def run(conn) -> list[str | StoreError]:
            outcomes: list[str | StoreError] = []
            for filter, update in checked:
                try:
                    rows = self._select(conn, filter, None, 0, 1)
                    if rows:
                        self._update_rows(conn, rows, update)
                        outcomes.append("updated")
                    else:
                        self._upsert(conn, filter, update)
                        outcomes.append("created")
                except DuplicateKeyError as exc:
                    # Only the one statement failed (SQLite aborts a statement, not the transaction).
                    outcomes.append(exc)
            return outcomes

        return await self.store.write(self.name, run)

    async def delete_one(self, filter: Filter) -> int:
        return await self._delete(filter, 1)

    async def delete_many(self, filter: Filter) -> int:
        return await self._delete(filter, 0)

    async def _delete(self, filter: Filter, limit: int) -> int:
        params: list = []
        where = compile_filter(filter, params)
        sql = f'DELETE FROM "{self.name}" WHERE id IN (SELECT id FROM "{self.name}" WHERE {where} ORDER BY id'
        sql += " LIMIT 1)" if limit else ")"
        return await self.store.write(self.name, lambda conn: conn.execute(sql, params).rowcount)
