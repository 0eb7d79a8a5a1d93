"""Open a fresh store of each backend for tests (the store contract suite uses this).

- ``sqlite``: a database file under the test's ``tmp_path``.
- ``briskdb``: txmongo against one briskdb MongoDB-wire server for the whole test session (started
  on first use, stopped at interpreter exit), with a fresh database per test, dropped afterwards.
- ``mongo``: txmongo against the real MongoDB named by ``KVMDESK_TEST_MONGO_URI``, with a fresh
  database per test, dropped afterwards; skipped when the variable is not set.
"""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import uuid
from typing import Any, Callable
from urllib.parse import urlsplit, urlunsplit

import pytest
from twisted.internet import defer

from kvmdesk.core.store import Store, open_store

from .briskdb import start_briskdb

MONGO_URI_VARIABLE = "KVMDESK_TEST_MONGO_URI"
KINDS = ("sqlite", "briskdb", "mongo")
TIMEOUT = 10.0

Cleanup = Callable[[], defer.Deferred]
_shared_briskdb: dict[str, Any] = {}


def open_test_store(kind: str, tmp_path: Any) -> defer.Deferred:
    """Open an empty store of backend ``kind``.

    Returns a Deferred (await it, or pass it to ``pytest_twisted.blockon``) that fires with
    ``(store, cleanup)``.  ``cleanup()`` returns a Deferred: it drops a test database and closes the
    store.

    :raises pytest.skip.Exception: ``kind`` is ``mongo`` and ``KVMDESK_TEST_MONGO_URI`` is not set.
    """
    if kind == "sqlite":
        return defer.succeed(_with_cleanup(open_store(f"sqlite://{os.path.abspath(tmp_path)}/store.db"), drop=False))
    if kind == "briskdb":
        # briskdb has no sessions: txmongo's implicit session id is switched off, for this connection only.
        uri = database_uri(shared_briskdb_uri(), _fresh_name()) + "?implicit_session=false"
        return defer.succeed(_with_cleanup(open_store(uri, timeout=TIMEOUT), drop=True))
    if kind == "mongo":
        base = os.environ.get(MONGO_URI_VARIABLE)
        if not base:
            pytest.skip(f"{MONGO_URI_VARIABLE} is not set")
        return defer.succeed(_with_cleanup(open_store(database_uri(base, _fresh_name()), timeout=TIMEOUT), drop=True))
    raise ValueError(f"unknown store kind {kind!r} (one of {', '.join(KINDS)})")


def shared_briskdb_uri() -> str:
    """The URI (no database) of this process's briskdb server, started on first call."""
    if "uri" not in _shared_briskdb:
        data_dir = tempfile.mkdtemp(prefix="kvmdesk-briskdb-")
        try:
            uri, stop = start_briskdb(data_dir)
        except BaseException:
            shutil.rmtree(data_dir, ignore_errors=True)
            raise
        _shared_briskdb.update(uri=uri, stop=stop, data_dir=data_dir)
        atexit.register(stop_shared_briskdb)
    return _shared_briskdb["uri"]


def stop_shared_briskdb() -> None:
    """Stop the shared briskdb server, if started, and remove its data."""
    if "uri" in _shared_briskdb:
        _shared_briskdb.pop("stop")()
        shutil.rmtree(_shared_briskdb.pop("data_dir"), ignore_errors=True)
        del _shared_briskdb["uri"]


def database_uri(uri: str, database: str) -> str:
    """``uri`` with its database path replaced by ``database`` (options kept)."""
    parts = urlsplit(uri)
    return urlunsplit(parts._replace(path="/" + database))


def _fresh_name() -> str:
    return f"kvmdesk_test_{uuid.uuid4().hex[:16]}"


def _with_cleanup(store: Store, *, drop: bool) -> tuple[Store, Cleanup]:
    async def cleanup() -> None:
        try:
            if drop:
                await store.drop_database()
        finally:
            await store.close()

    return store, lambda: defer.ensureDeferred(cleanup())
