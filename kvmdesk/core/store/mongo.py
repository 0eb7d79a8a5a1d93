"""The MongoDB backend, over txmongo.

Why txmongo: it is the MongoDB driver written for Twisted.  Its calls return Deferreds and run on the
reactor, so no call needs a thread.  PyMongo blocks, and its asynchronous client (like motor) needs
asyncio.

How the store contract maps onto MongoDB:

- **ids**: the integer ``id`` comes from a ``_counters`` collection (one document per collection,
  ``{"_id": name, "n": last id}``) that is moved on with one atomic ``findAndModify`` ``$inc``.
  ``insert_many`` takes a block of ``len(docs)`` ids with one ``$inc``.  Each collection gets a unique
  index on ``id`` before its first write.  Mongo's ``_id`` is never returned.
- **unique indexes** are partial: they only hold documents in which every indexed field is present and
  not null.  SQLite's UNIQUE indexes treat NULL (a missing field or JSON null) as distinct from everything,
  and MongoDB would otherwise count two missing values as a clash.
- **upserts** run as "update, and if nothing matched, insert the seed".  This is how the SQLite backend
  builds the new document (:func:`.updates.upsert_seed`), and the new document needs an ``id`` from the
  counter anyway.  A native upsert would also need ``$setOnInsert``, which briskdb lacks.
- **values** go through a JSON round trip (orjson, as the SQLite backend stores them), so both backends
  return the same types.  Filters, sorts and updates are checked by the same code as SQLite's, so bad
  input raises the same ``ValueError``.
- **deadlines**: txmongo waits for a lost connection and retries forever.  Every call here has a
  Deferred timeout on the injected reactor and fails with :class:`StoreUnavailable` when it runs out.
- **sessions**: txmongo 26 attaches an implicit logical session id (``lsid``) to every command, and
  briskdb (the MongoDB-wire server the tests use) has no sessions.  ``implicit_session=False`` (or
  ``?implicit_session=false`` in the URI) switches this off for one connection only.  txmongo has no
  public switch for it: see :class:`_SessionlessConnectionPool`.
"""
from __future__ import annotations

import re
from typing import Any, Awaitable, Callable, Iterable, Mapping, Sequence, TypeVar
from urllib.parse import urlsplit, urlunsplit

import bson
import orjson
from pymongo import ReturnDocument, UpdateOne
from pymongo.errors import BulkWriteError, ConnectionFailure, OperationFailure, PyMongoError
from twisted.internet import defer
from twisted.internet.error import ConnectError, ConnectionDone, ConnectionLost
from txmongo import filter as qf
from txmongo.connection import ConnectionPool
from txmongo.errors import TimeExceeded

from ..together import both
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
from .projection import project
from .sqlite_sql import compile_filter, compile_sort
from .updates import apply_update, check_update, check_upserts, upsert_seed

T = TypeVar("T")

DEFAULT_DATABASE = "kvmdesk"
COUNTERS = "_counters"
_DUPLICATE_KEY = 11000
#: One write command of a batch (``upsert_each``) holds at most this many operations and BSON bytes:
#: briskdb refuses a command past its decoded-memory budget (1,000 one-minute rollup seeds, 170 kB, are
#: too many) and charges 40-50 ms per update in a batch, so a command of 100 updates takes ~4 s and
#: each command gets its own deadline.
WRITE_BATCH_OPS = 100
WRITE_BATCH_BYTES = 64 * 1024
_PARTIAL_REFUSED = frozenset({2, 9, 67})  # BadValue, FailedToParse, CannotCreateIndex
_URI_OPTION = "implicit_session"
_FALSE = ("false", "0", "no", "off")

# The BSON types a JSON value can take.  A field of any of these types is "present and not null".
_PRESENT = {"$type": ["string", "number", "bool", "object", "array"]}
# The standard fallback if a server refuses a ``$type`` list in a partial index.
_PRESENT_FALLBACK = {"$exists": True}

# Server errors caused by the request, not by the server: the SQLite backend raises ValueError for these.
_BAD_INPUT_CODES = frozenset({2, 9, 14, 28, 40, 52, 10334, 17419, 31249, 31250, 51091})
_BAD_INPUT_NAMES = frozenset(
    {"BadValue", "FailedToParse", "TypeMismatch", "PathNotViable", "ConflictingUpdateOperators",
     "DollarPrefixedFieldName", "BSONObjectTooLarge"}
)
_UNAVAILABLE = (
    ConnectionFailure,  # AutoReconnect, NotPrimaryError, NetworkTimeout, ServerSelectionTimeoutError
    ConnectionLost,
    ConnectionDone,
    ConnectError,
    TimeExceeded,
    defer.TimeoutError,
    defer.CancelledError,
)
_INDEX_IN_MESSAGE = re.compile(r"index: (\S+) dup key")


class _SessionlessConnectionPool(ConnectionPool):
    """A txmongo connection pool that attaches no implicit session to its commands.

    txmongo 26 gets every implicit session from ``ConnectionPool._get_implicit_session()``: for
    commands and writes (``_using_session``) and for cursors (``Cursor.__init__``).  When it returns
    ``None``, txmongo adds no ``lsid`` and ends no session.  (txmongo does the same by itself when more
    than one user is authenticated.)  Explicit sessions from ``start_session()`` still work.
    """

    def _get_implicit_session(self) -> None:
        return None


def split_uri(uri: str) -> tuple[str, bool | None]:
    """Remove our own ``implicit_session`` option from a MongoDB URI.

    PyMongo's URI parser, which txmongo uses, refuses options it does not know.

    :returns: the URI for txmongo, and the option's value (``None`` if the URI does not set it).
    """
    parts = urlsplit(uri)
    if not parts.query:
        return uri, None
    separator = ";" if ";" in parts.query and "&" not in parts.query else "&"
    kept, flag = [], None
    for option in parts.query.split(separator):
        key, _, value = option.partition("=")
        if key.lower() in (_URI_OPTION, "implicitsession"):
            flag = value.lower() not in _FALSE
        else:
            kept.append(option)
    return urlunsplit(parts._replace(query=separator.join(kept))), flag


def _json_copy(value: Any) -> Any:
    """Return ``value`` as the SQLite backend would store it (orjson round trip)."""
    return orjson.loads(orjson.dumps(value))


def _without_ids(doc: Document) -> Document:
    return {k: v for k, v in doc.items() if k not in ("id", "_id")}


def _strip(doc: Document | None) -> Document | None:
    if doc is not None:
        doc.pop("_id", None)
    return doc


def _get_path(doc: Any, path: str) -> Any:
    for key in path.split("."):
        if not isinstance(doc, dict) or key not in doc:
            return None
        doc = doc[key]
    return doc


def _server_projection(projection: Sequence[str] | None) -> dict[str, int]:
    """The projection sent to the server: never ``_id``, and no path below another one (a clash there)."""
    if not projection:
        return {"_id": 0}
    paths = {check_field(p) for p in projection if p != "_id" and not p.startswith("_id.")}
    kept = [p for p in paths if not any(p.startswith(other + ".") for other in paths)]
    return {**{p: 1 for p in sorted(kept)}, "_id": 0}


def _check_filter(filter: Filter | None) -> dict:
    # The SQLite compiler is the one definition of the filter subset: it raises ValueError for anything
    # outside it (unknown operators, unsafe field names, non-scalar values).  Its SQL is discarded.
    compile_filter(filter, [])
    return dict(filter or {})


def _sort_spec(sort: Sort | None) -> qf.sort:
    """Validate ``sort`` like the SQLite backend; add ``id`` as the final tie-break."""
    compile_sort(sort)
    keys = [(path, direction) for path, direction in sort or ()]
    if not any(path == "id" for path, _ in keys):
        keys.append(("id", 1))
    return qf.sort(keys)


def _group_key(value: Any) -> Any:
    """A ``count_by`` key as SQLite's ``json_extract`` gives it: JSON text for containers, 0/1 for booleans."""
    if isinstance(value, (list, dict)):
        return orjson.dumps(value).decode()
    if isinstance(value, bool):
        return int(value)
    return value


def _index_keys(index: Index) -> dict[str, int]:
    return dict(index.keys())


def _index_spec(index: Index, present: Mapping[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = {"name": index.name, "key": _index_keys(index)}
    if index.unique:
        spec["unique"] = True
        spec["partialFilterExpression"] = {path: dict(present) for path, _ in index.keys()}
    return spec


def _filter_key(filter: Mapping[str, Any]) -> tuple:
    """A hashable name of the document an equality filter names (JSON values, so 1 and 1.0 agree)."""
    return tuple(sorted((field, orjson.dumps(_number(value))) for field, value in filter.items()))


def _number(value: Any) -> Any:
    # MongoDB finds 3600.0 by 3600 (and JSON keeps the int): one key for both.
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _distinct(values: list[Any]) -> list[Any]:
    return list({orjson.dumps(_number(value)): value for value in values}.values())


def _write_batches(sized: list[Any], items: list[Any]) -> list[list[Any]]:
    """``items`` cut into runs of at most :data:`WRITE_BATCH_OPS`, whose ``sized`` counterparts (what
    goes on the wire) take at most :data:`WRITE_BATCH_BYTES` of BSON (a run holds one item at least)."""
    batches: list[list[Any]] = []
    size = 0
    for item, wire in zip(items, sized):
        length = len(bson.encode(wire))
        if not batches or len(batches[-1]) >= WRITE_BATCH_OPS or size + length > WRITE_BATCH_BYTES:
            batches.append([])
            size = 0
        batches[-1].append(item)
        size += length
    return batches


def _is_duplicate(exc: BaseException) -> bool:
    return isinstance(exc, OperationFailure) and exc.code == _DUPLICATE_KEY


def _error_details(exc: OperationFailure) -> Mapping[str, Any]:
    return exc.details if isinstance(exc.details, Mapping) else {}


def _translate(exc: BaseException) -> BaseException:
    """Map a driver or network failure to the store's errors; leave other exceptions alone."""
    if isinstance(exc, _UNAVAILABLE):
        return StoreUnavailable(f"MongoDB unavailable: {exc!r}")
    if isinstance(exc, OperationFailure):
        name = _error_details(exc).get("codeName")
        if exc.code in _BAD_INPUT_CODES or name in _BAD_INPUT_NAMES:
            return ValueError(f"refused by MongoDB: {exc}")
        return StoreError(f"MongoDB error: {exc}")
    return exc


class MongoStore:
    """A :class:`~kvmdesk.core.store.Store` in one MongoDB database.

    :param uri: ``mongodb://host[:port][,host...]/dbname[?options]``; the database defaults to
        ``kvmdesk``.  ``implicit_session=false`` among the options is the same as the keyword below.
    :param reactor: the clock for the deadlines (the global reactor by default).  txmongo's own
        connections always use the global reactor.
    :param timeout: seconds any one operation may take before :class:`StoreUnavailable`.
    :param implicit_session: ``False`` sends no logical session id (for servers without sessions).
    """

    def __init__(self, uri: str, *, reactor: Any = None, timeout: float = 10.0, implicit_session: bool = True):
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        driver_uri, uri_flag = split_uri(uri)
        self.implicit_session = implicit_session and uri_flag is not False
        pool_class = ConnectionPool if self.implicit_session else _SessionlessConnectionPool
        # max_delay caps txmongo's reconnect backoff (60 s by default): a restarted server is found again quickly.
        try:
            self._pool = pool_class(driver_uri, max_delay=5.0)
        except PyMongoError as exc:
            raise ValueError(f"invalid MongoDB URI {uri!r}: {exc}") from exc
        self.database_name: str = self._pool.uri.get("database") or DEFAULT_DATABASE
        self._reactor = reactor
        self._timeout = timeout
        self._collections: dict[str, MongoCollection] = {}
        self._id_indexed: set[str] = set()
        self._closed = False

    @property
    def database(self) -> Any:
        """The txmongo database (for this package only)."""
        return self._pool[self.database_name]

    # -- deadlines and errors ----------------------------------------------------------------

    async def run(self, work: Callable[[], Awaitable[T]]) -> T:
        """Run one operation within the deadline, with driver errors mapped to the store's errors.

        :raises StoreUnavailable: the store is closed, the server cannot be reached, or it did not
            answer within ``timeout`` seconds.
        """
        if self._closed:
            raise StoreUnavailable("the store is closed")
        call = defer.ensureDeferred(work())
        call.addTimeout(self._timeout, self._reactor)
        try:
            return await call
        except (StoreError, ValueError):
            raise
        except Exception as exc:
            translated = _translate(exc)
            if translated is exc:
                raise
            raise translated from exc

    # -- ids ---------------------------------------------------------------------------------

    async def allocate_ids(self, collection: str, count: int) -> range:
        """Take ``count`` consecutive new ids for ``collection`` with one atomic ``$inc``."""
        counters = self.database[COUNTERS]
        for attempt in range(2):
            try:
                row = await counters.find_one_and_update(
                    {"_id": collection},
                    {"$inc": {"n": count}},
                    upsert=True,
                    return_document=ReturnDocument.AFTER,
                )
                break
            except OperationFailure as exc:
                # Two first-ever upserts of the same counter race on its _id: the loser retries.
                if not _is_duplicate(exc) or attempt:
                    raise
        last = int(row["n"])
        return range(last - count + 1, last + 1)

    async def ensure_id_index(self, collection: str) -> None:
        """Create the unique ``id`` index of ``collection`` once (before its first write)."""
        if collection not in self._id_indexed:
            await self._create_index(Index(collection, ("id",), unique=True))
            self._id_indexed.add(collection)

    async def _create_index(self, index: Index) -> None:
        database = self.database
        try:
            await database.command({"createIndexes": index.collection, "indexes": [_index_spec(index, _PRESENT)]})
        except OperationFailure as exc:
            if _is_duplicate(exc):
                raise DuplicateKeyError(index.collection, [path for path, _ in index.keys()]) from exc
            if not index.unique or exc.code not in _PARTIAL_REFUSED:
                raise
            # This server refuses a $type list in a partial index: fall back to the standard $exists.
            await database.command(
                {"createIndexes": index.collection, "indexes": [_index_spec(index, _PRESENT_FALLBACK)]}
            )

    async def unique_indexes(self, collection: str) -> list[tuple[str, ...]]:
        """The field lists of the unique indexes a plugin declared on ``collection`` (not ``id``'s)."""
        try:
            info = await self.database[collection].index_information()
        except OperationFailure:
            return []
        found = []
        for spec in info.values():
            fields = tuple(spec["key"].keys())
            if spec.get("unique") and fields not in (("id",), ("_id",)):
                found.append(fields)
        return found

    # -- Store -------------------------------------------------------------------------------

    def collection(self, name: str) -> "MongoCollection":
        coll = self._collections.get(name)
        if coll is None:
            if check_collection(name) == COUNTERS:
                raise ValueError(f"{COUNTERS} is reserved by the MongoDB store for its id counters")
            coll = self._collections[name] = MongoCollection(self, name)
        return coll

    async def ensure_indexes(self, indexes: Iterable[Index]) -> None:
        for index in indexes:
            check_collection(index.collection)
            for path, _ in index.keys():
                check_field(path)
            await self.run(lambda index=index: self._create_index(index))

    async def ping(self) -> None:
        await self.run(lambda: self.database.command("ping"))

    async def drop_database(self) -> None:
        """Drop the whole database (tests use a fresh one each)."""
        await self.run(lambda: self._pool.drop_database(self.database_name))
        self._id_indexed.clear()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._pool.disconnect()


class MongoCollection:
    """One MongoDB collection; see :class:`~kvmdesk.core.store.Collection`."""

    def __init__(self, store: MongoStore, name: str):
        self.store = store
        self.name = name

    @property
    def _coll(self) -> Any:
        return self.store.database[self.name]

    # -- helpers run inside MongoStore.run ----------------------------------------------------

    async def _check_sizes(self, rows: Sequence[Document]) -> None:
        # A document over the server's limit makes briskdb drop the connection (StoreUnavailable would
        # be wrong): refuse it here, as the bad input it is.
        protocol = await self.store._pool.getprotocol()
        limit = protocol.max_bson_size
        for row in rows:
            if limit and len(bson.encode(row)) > limit:
                raise ValueError(f"document larger than the server's {limit}-byte limit")

    async def _insert(self, body: Document) -> Document:
        """Insert ``body`` (no ``id``) with a new id; return it with the id."""
        await self.store.ensure_id_index(self.name)
        (new_id,) = await self.store.allocate_ids(self.name, 1)
        row = {**_json_copy(body), "id": new_id}
        await self._check_sizes([row])
        try:
            await self._coll.insert_one(row)
        except OperationFailure as exc:
            if _is_duplicate(exc):
                raise await self._duplicate(exc, [row]) from exc
            raise
        return {**body, "id": new_id}

    async def _duplicate(self, exc: OperationFailure, candidates: Sequence[Document]) -> DuplicateKeyError:
        return DuplicateKeyError(self.name, await self._clashing_fields(_error_details(exc), candidates))

    async def _clashing_fields(self, details: Mapping[str, Any], candidates: Sequence[Document]) -> tuple[str, ...]:
        """Which unique index refused a write: from the server's error, else by looking.

        MongoDB names the index (``keyPattern``, or the index name in the message); briskdb does not.
        Then the only unique index is the one, or the first whose values one of ``candidates`` (the
        documents as they would have been written) shares with another document.
        """
        pattern = details.get("keyPattern")
        if isinstance(pattern, Mapping) and pattern:
            return tuple(pattern)
        indexes = await self.store.unique_indexes(self.name)
        named = _INDEX_IN_MESSAGE.search(str(details.get("errmsg", "")))
        if named:
            by_name = {Index(self.name, fields, unique=True).name: fields for fields in indexes}
            if named.group(1) in by_name:
                return by_name[named.group(1)]
        if len(indexes) == 1:
            return indexes[0]
        for fields in indexes:
            for doc in candidates:
                if await self._clashes(fields, doc):
                    return fields
        return ()

    async def _clashes(self, fields: tuple[str, ...], doc: Document) -> bool:
        values = {path: _get_path(doc, path) for path in fields}
        if any(value is None or isinstance(value, (list, dict)) for value in values.values()):
            return False
        others = await self._coll.count_documents({**values, "id": {"$ne": doc.get("id")}})
        return others > 0

    async def _preimage(self, filter: dict, update: Update, sort: qf.sort) -> list[Document]:
        current = await self._coll.find_one(filter, {"_id": 0}, sort=sort)
        return [apply_update(current, update)] if current else []

    # -- Collection ----------------------------------------------------------------------------

    async def insert_one(self, doc: Document) -> Document:
        body = _without_ids(doc)
        return await self.store.run(lambda: self._insert(body))

    async def insert_many(self, docs: Sequence[Document]) -> list[Document | DuplicateKeyError]:
        bodies = [_without_ids(doc) for doc in docs]
        if not bodies:
            return []
        return await self.store.run(lambda: self._insert_many(bodies))

    async def _insert_many(self, bodies: list[Document]) -> list[Document | DuplicateKeyError]:
        await self.store.ensure_id_index(self.name)
        ids = await self.store.allocate_ids(self.name, len(bodies))
        rows = [{**_json_copy(body), "id": new_id} for body, new_id in zip(bodies, ids)]
        await self._check_sizes(rows)
        failed: dict[int, Mapping[str, Any]] = {}
        try:
            # Unordered: every document is tried; each failure is reported with its index.
            await self._coll.insert_many(rows, ordered=False)
        except BulkWriteError as exc:
            for error in exc.details.get("writeErrors", []):
                if error.get("code") != _DUPLICATE_KEY:
                    raise OperationFailure(error.get("errmsg"), error.get("code"), error) from exc
                failed[error["index"]] = error
        results: list[Document | DuplicateKeyError] = []
        for index, (body, row) in enumerate(zip(bodies, rows)):
            if index in failed:
                results.append(DuplicateKeyError(self.name, await self._clashing_fields(failed[index], [row])))
            else:
                results.append({**body, "id": row["id"]})
        return results

    async def find(
        self,
        filter: Filter | None = None,
        *,
        sort: Sort | None = None,
        skip: int = 0,
        limit: int = 0,
        projection: Sequence[str] | None = None,
    ) -> list[Document]:
        query = _check_filter(filter)
        order = _sort_spec(sort)
        fields = _server_projection(projection)

        async def work() -> list[Document]:
            return await self._coll.find(query, fields, skip=max(skip, 0), limit=max(limit, 0), sort=order)

        docs = await self.store.run(work)
        return [project(_strip(doc), projection) for doc in docs]

    async def find_one(self, filter: Filter | None = None, *, sort: Sort | None = None) -> Document | None:
        found = await self.find(filter, sort=sort, limit=1)
        return found[0] if found else None

    async def find_page(self, filter: Filter | None, *, sort: Sort, skip: int, limit: int) -> tuple[int, list[Document]]:
        count = await self.count(filter)
        plan = page_plan(sort, skip, limit, count)
        if plan is None:
            return count, []
        docs = await self.find(filter, sort=plan.sort, skip=plan.skip, limit=plan.limit)
        return count, docs[::-1] if plan.backwards else docs

    async def count(self, filter: Filter | None = None) -> int:
        query = _check_filter(filter)
        return await self.store.run(lambda: self._coll.count_documents(query))

    async def count_by(self, field: str, filter: Filter | None = None) -> dict[Any, int]:
        check_field(field)
        query = _check_filter(filter)
        pipeline = [{"$match": query}, {"$group": {"_id": f"${field}", "n": {"$sum": 1}}}]
        rows = await self.store.run(lambda: self._coll.aggregate(pipeline))
        counts: dict[Any, int] = {}
        for row in rows:
            key = _group_key(row["_id"])
            counts[key] = counts.get(key, 0) + int(row["n"])
        return counts

    async def update_one(self, filter: Filter, update: Update, *, upsert: bool = False) -> int:
        result = await self.find_one_and_update(filter, update, upsert=upsert)
        return 0 if result is None else 1

    async def update_many(self, filter: Filter, update: Update) -> int:
        check_update(update)
        query = _check_filter(filter)
        change = _json_copy(update)

        async def work() -> int:
            try:
                result = await self._coll.update_many(query, change)
            except OperationFailure as exc:
                if _is_duplicate(exc):
                    raise await self._duplicate(exc, []) from exc
                raise
            return result.matched_count

        return await self.store.run(work)

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
        query = _check_filter(filter)
        order = _sort_spec(sort)

        async def work() -> Document | None:
            found = await self._update_first(query, update, order, return_new)
            if found is None and upsert:
                created = await self._insert(apply_update(upsert_seed(query), update))
                return created if return_new else None
            return found

        return await self.store.run(work)

    async def _update_first(self, query: dict, update: Update, order: qf.sort, return_new: bool) -> Document | None:
        try:
            found = await self._coll.find_one_and_update(
                query,
                _json_copy(update),
                projection={"_id": 0},
                sort=order,
                return_document=ReturnDocument.AFTER if return_new else ReturnDocument.BEFORE,
            )
        except OperationFailure as exc:
            if _is_duplicate(exc):
                raise await self._duplicate(exc, await self._preimage(query, update, order)) from exc
            raise
        return _strip(found)

    async def find_one_and_update_each(self, operations: Sequence[tuple[Filter, Update, Sort | None]]) -> list[Document | None]:
        # No multi-document transaction here (briskdb has no sessions): one atomic update after another.
        return [await self.find_one_and_update(filter, update, sort=sort) for filter, update, sort in operations]

    async def upsert_each(self, operations: Sequence[tuple[Filter, Update]]) -> list[str | StoreError]:
        checked = [(_json_copy(dict(filter)), update) for filter, update in check_upserts(operations)]
        outcomes: list[str | StoreError | None] = [None] * len(checked)
        # Unordered writes may run in any order: a document named twice gets its later operations in
        # later rounds, so they apply in the order given.
        rounds: list[list[int]] = []
        seen: dict[tuple, int] = {}
        for index, (filter, _) in enumerate(checked):
            key = _filter_key(filter)
            seen[key] = seen.get(key, -1) + 1
            if seen[key] == len(rounds):
                rounds.append([])
            rounds[seen[key]].append(index)
        for indexes in rounds:
            done = await self._upsert_round([checked[i] for i in indexes])
            for index, outcome in zip(indexes, done):
                outcomes[index] = outcome
        return outcomes  # type: ignore[return-value]

    async def _upsert_round(self, operations: list[tuple[dict, Update]]) -> list[str | StoreError]:
        """Upsert operations that name different documents: which exist (one query), then the updates
        (unordered bulk writes) beside the inserts (``insert_many``), each write command within
        :data:`WRITE_BATCH_OPS` / :data:`WRITE_BATCH_BYTES` and its own deadline."""
        present = await self.store.run(lambda: self._present_keys([filter for filter, _ in operations]))
        updating = [i for i, (filter, _) in enumerate(operations) if _filter_key(filter) in present]
        creating = [i for i, (filter, _) in enumerate(operations) if _filter_key(filter) not in present]
        # Built before anything is written: an update the seed cannot take fails the batch here.
        seeds = [apply_update(upsert_seed(operations[i][0]), operations[i][1]) for i in creating]
        outcomes: list[str | StoreError] = ["updated"] * len(operations)
        update_errors, inserted = await both(self._bulk_update([operations[i] for i in updating]),
                                             self._insert_chunks(seeds))
        for position, error in update_errors.items():
            outcomes[updating[position]] = error
        for index, result in zip(creating, inserted):
            if not isinstance(result, DuplicateKeyError):
                outcomes[index] = "created"
                continue
            # Created meanwhile by another writer (or a clash on another unique index): update it.
            filter, update = operations[index]
            found = await self.store.run(lambda: self._update_first(filter, update, _sort_spec(None), True))
            outcomes[index] = "updated" if found is not None else result
        return outcomes

    async def _insert_chunks(self, bodies: list[Document]) -> list[Document | DuplicateKeyError]:
        results: list[Document | DuplicateKeyError] = []
        for chunk in _write_batches(bodies, [(body, None) for body in bodies]):
            results.extend(await self.store.run(lambda: self._insert_many([body for body, _ in chunk])))
        return results

    async def _present_keys(self, filters: list[dict]) -> set[tuple]:
        """The keys (:func:`_filter_key`) of ``filters`` that name an existing document: one query per
        set of filter fields, ``$in`` on each field (a superset, matched exactly here)."""
        by_fields: dict[tuple[str, ...], list[dict]] = {}
        for filter in filters:
            by_fields.setdefault(tuple(sorted(filter)), []).append(filter)
        wanted = {_filter_key(filter) for filter in filters}
        present: set[tuple] = set()
        for fields, group in by_fields.items():
            query = {field: {"$in": _distinct([f[field] for f in group])} for field in fields}
            for doc in await self._coll.find(query, {field: 1 for field in fields} | {"_id": 0}):
                key = _filter_key({field: doc.get(field) for field in fields})
                if key in wanted:
                    present.add(key)
        return present

    async def _bulk_update(self, operations: list[tuple[dict, Update]]) -> dict[int, StoreError]:
        """Apply each update to its one document, unordered; return the failures by position."""
        failures: dict[int, StoreError] = {}
        offset = 0
        for chunk in _write_batches([update for _, update in operations], operations):
            requests = [UpdateOne(filter, _json_copy(update), upsert=False) for filter, update in chunk]
            errors = await self.store.run(lambda: self._bulk_write(requests))
            failures.update({offset + index: error for index, error in errors.items()})
            offset += len(chunk)
        return failures

    async def _bulk_write(self, requests: list[UpdateOne]) -> dict[int, StoreError]:
        try:
            await self._coll.bulk_write(requests, ordered=False)
        except BulkWriteError as exc:
            failures: dict[int, StoreError] = {}
            for error in exc.details.get("writeErrors", []):
                if error.get("code") == _DUPLICATE_KEY:
                    failures[error["index"]] = DuplicateKeyError(self.name, await self._clashing_fields(error, []))
                else:
                    failures[error["index"]] = StoreError(f"MongoDB error: {error.get('errmsg')}")
            return failures
        return {}

    async def delete_one(self, filter: Filter) -> int:
        query = _check_filter(filter)

        async def work() -> int:
            # Like SQLite, delete the match with the lowest id.
            gone = await self._coll.find_one_and_delete(query, {"_id": 1}, sort=qf.sort([("id", 1)]))
            return 0 if gone is None else 1

        return await self.store.run(work)

    async def delete_many(self, filter: Filter) -> int:
        query = _check_filter(filter)

        async def work() -> int:
            return (await self._coll.delete_many(query)).deleted_count

        return await self.store.run(work)
