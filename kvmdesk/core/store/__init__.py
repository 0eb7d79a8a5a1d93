"""The asynchronous document store every plugin uses.

A store holds named collections of JSON documents (dicts).  Queries use the subset of MongoDB's
filter language the product needs; updates use ``$set``, ``$unset``, ``$inc``, ``$push`` and ``$pull``.
Every document gets an integer ``id`` from the store on insert (the contract's records carry one).

Two backends implement :class:`Store`: :mod:`.sqlite` (the embedded default) and :mod:`.mongo`
(txmongo).  Nothing outside this package imports either driver; :func:`open_store` picks one from a URI.
"""
from __future__ import annotations

import re
from typing import Any, Iterable, Mapping, Protocol, Sequence, runtime_checkable

import attrs

Document = dict[str, Any]
Filter = Mapping[str, Any]
Update = Mapping[str, Mapping[str, Any]]
Sort = Sequence[tuple[str, int]]

ASCENDING = 1
DESCENDING = -1

_FIELD = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$")
_COLLECTION = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


class StoreError(Exception):
    """Base of the errors a store raises on purpose."""


class DuplicateKeyError(StoreError):
    """A unique index refused the write.

    :param collection: the collection written to.
    :param fields: the fields of the unique index that clashed, when the backend says which.
    """

    def __init__(self, collection: str, fields: Sequence[str] = ()):
        self.collection = collection
        self.fields = tuple(fields)
        super().__init__(f"duplicate key in {collection} on {', '.join(self.fields) or 'a unique index'}")


class StoreUnavailable(StoreError):
    """The backend cannot be reached (or did not answer in time)."""


@attrs.frozen
class Index:
    """An index a plugin declares through ``kvmdesk_store_indexes``.

    :param collection: collection name.
    :param fields: the indexed fields, in order (compound when more than one); ``-field`` sorts descending.
    :param unique: enforce uniqueness of the combination.
    """

    collection: str
    fields: tuple[str, ...] = attrs.field(converter=tuple)
    unique: bool = False

    @property
    def name(self) -> str:
        return "ix_" + "__".join(f.lstrip("-").replace(".", "_") for f in self.fields) + ("_u" if self.unique else "")

    def keys(self) -> list[tuple[str, int]]:
        return [(f.lstrip("-"), DESCENDING if f.startswith("-") else ASCENDING) for f in self.fields]


def check_field(path: str) -> str:
    """Return ``path`` if it is a safe dotted field name, else raise ``ValueError``."""
    if not isinstance(path, str) or not _FIELD.match(path):
        raise ValueError(f"invalid field name {path!r}")
    return path


@attrs.frozen
class PagePlan:
    """How to read one page of ``count`` documents: ``limit`` from ``skip`` in ``sort`` order, then
    turned round when ``backwards``."""

    sort: Sort
    skip: int
    limit: int
    backwards: bool


def page_plan(sort: Sort, skip: int, limit: int, count: int) -> PagePlan | None:
    """The cheaper way to read positions ``skip .. skip+limit`` of ``count`` sorted documents, or
    ``None`` when there is nothing there.

    Both backends step over every skipped document (SQLite ~15 ns each, MongoDB likewise), so a page
    in the back half is read in reverse order from the end: half the skipping of an average page.
    ``id`` completes the sort so that the reverse order is exactly the forward one backwards.
    """
    if skip < 0 or limit < 1 or skip >= count:
        return None
    rows = min(limit, count - skip)
    from_end = count - skip - rows
    if from_end >= skip:
        return PagePlan(list(sort), skip, rows, False)
    order = list(sort)
    if not any(path == "id" for path, _ in order):
        order.append(("id", 1))
    return PagePlan([(path, -direction) for path, direction in order], from_end, rows, True)


def check_collection(name: str) -> str:
    """Return ``name`` if it is a valid collection name, else raise ``ValueError``."""
    if not isinstance(name, str) or not _COLLECTION.match(name):
        raise ValueError(f"invalid collection name {name!r}")
    return name


@runtime_checkable
class Collection(Protocol):
    """One collection of documents.  Every method returns an awaitable."""

    name: str

    async def insert_one(self, doc: Document) -> Document:
        """Insert a copy of ``doc``; return it with the ``id`` the store assigned.

        :raises DuplicateKeyError: a unique index refused it.
        """

    async def insert_many(self, docs: Sequence[Document]) -> list[Document | DuplicateKeyError]:
        """Insert each document independently; one outcome per input, in order."""

    async def find(
        self,
        filter: Filter | None = None,
        *,
        sort: Sort | None = None,
        skip: int = 0,
        limit: int = 0,
        projection: Sequence[str] | None = None,
    ) -> list[Document]:
        """Return the matching documents (``limit=0``: no limit); ``projection`` keeps only those fields."""

    async def find_one(self, filter: Filter | None = None, *, sort: Sort | None = None) -> Document | None:
        """Return the first matching document, or ``None``."""

    async def find_page(self, filter: Filter | None, *, sort: Sort, skip: int, limit: int) -> tuple[int, list[Document]]:
        """Return ``(count, documents)``: how many documents match, and up to ``limit`` of them from
        position ``skip`` in ``sort`` order (read from the nearer end: see :func:`page_plan`)."""

    async def count(self, filter: Filter | None = None) -> int:
        """Return how many documents match."""

    async def count_by(self, field: str, filter: Filter | None = None) -> dict[Any, int]:
        """Return ``{value of field: number of matching documents}``."""

    async def update_one(self, filter: Filter, update: Update, *, upsert: bool = False) -> int:
        """Apply ``update`` to the first match (or insert on ``upsert``); return 1 if a document changed."""

    async def update_many(self, filter: Filter, update: Update) -> int:
        """Apply ``update`` to every match; return how many matched."""

    async def find_one_and_update(
        self,
        filter: Filter,
        update: Update,
        *,
        sort: Sort | None = None,
        upsert: bool = False,
        return_new: bool = True,
    ) -> Document | None:
        """Atomically update the first match; return it after (``return_new``) or before the update."""

    async def find_one_and_update_each(self, operations: Sequence[tuple[Filter, Update, Sort | None]]) -> list[Document | None]:
        """:meth:`find_one_and_update` (no upsert, the document after) of each ``(filter, update, sort)`` in
        order, each atomic and seeing those before it; one round trip where the backend allows it (SQLite:
        one writer transaction, so a burst of claims does not queue one by one on the writer thread).
        An error fails the call (on SQLite nothing of it is written)."""

    async def upsert_each(self, operations: Sequence[tuple[Filter, Update]]) -> list[str | StoreError]:
        """Upsert each ``(filter, update)``: apply ``update`` to the document the filter names, or create
        it from the filter's fields; in one round trip where the backend allows it (SQLite: one writer
        transaction; MongoDB: one query for which exist, then unordered ``bulk_write`` updates beside
        ``insert_many`` inserts, in commands of at most 100 operations).

        Each filter names one document by plain top-level fields (see :func:`.updates.check_upserts`);
        operations on the same document apply in order.  Per operation, in order: ``"created"``,
        ``"updated"``, or the error that refused it (:class:`DuplicateKeyError` on both backends; on
        MongoDB, which writes each operation on its own, any other server refusal as a
        :class:`StoreError`).  On SQLite any other failure rolls the whole batch back and is raised.

        :raises ValueError: an empty batch or a bad operation (the message names its index); nothing
            is written.
        :raises StoreUnavailable: MongoDB lost (the commands before the loss stay written).
        """

    async def delete_one(self, filter: Filter) -> int:
        """Delete the first match; return 1 or 0."""

    async def delete_many(self, filter: Filter) -> int:
        """Delete every match; return how many."""


@runtime_checkable
class Store(Protocol):
    """A set of collections, with their indexes."""

    def collection(self, name: str) -> Collection:
        """Return the collection called ``name`` (created on first write)."""

    async def ensure_indexes(self, indexes: Iterable[Index]) -> None:
        """Create the given indexes if missing.

        :raises DuplicateKeyError: existing data already violates a new unique index.
        """

    async def ping(self) -> None:
        """Raise :class:`StoreUnavailable` if the backend cannot be reached."""

    async def close(self) -> None:
        """Release connections and threads."""


def open_store(uri: str, *, reactor: Any = None, timeout: float = 10.0, inline_read_ms: float = 1.0) -> Store:
    """Open a store from a URI: ``sqlite:///abs/path.db`` or ``mongodb://host:port/dbname``.

    :param timeout: seconds a MongoDB operation may take before :class:`StoreUnavailable`.
    :param inline_read_ms: SQLite: how long a read may run on the reactor thread before it moves to a
        reader thread (see :mod:`.sqlite`).
    """
    if uri.startswith("sqlite://"):
        from .sqlite import SQLiteStore

        return SQLiteStore(uri[len("sqlite://") :], reactor=reactor, inline_read_ms=inline_read_ms)
    if uri.startswith(("mongodb://", "mongodb+srv://")):
        from .mongo import MongoStore

        return MongoStore(uri, reactor=reactor, timeout=timeout)
    raise ValueError(f"unsupported store URI {uri!r} (use sqlite:///path or mongodb://host/db)")


__all__ = [
    "ASCENDING",
    "DESCENDING",
    "Collection",
    "Document",
    "DuplicateKeyError",
    "Filter",
    "Index",
    "PagePlan",
    "Sort",
    "Store",
    "StoreError",
    "StoreUnavailable",
    "Update",
    "check_collection",
    "check_field",
    "open_store",
    "page_plan",
]
