"""The MongoDB backend beyond the shared contract: deadlines, sessions, and the places where MongoDB
would differ from SQLite unless the backend takes care (checked against every backend)."""
import socket
import time

import pytest
import pytest_twisted
from twisted.internet import defer, task

from kvmdesk.core.store import DuplicateKeyError, Index, StoreError, StoreUnavailable
from kvmdesk.core.store.mongo import MongoStore, split_uri
from kvmdesk.testing.briskdb import start_briskdb
from kvmdesk.testing.stores import database_uri, open_test_store, shared_briskdb_uri

BACKENDS = ["sqlite", "briskdb", "mongo"]


@pytest.fixture(params=BACKENDS)
def store(request, tmp_path):
    store, cleanup = pytest_twisted.blockon(open_test_store(request.param, tmp_path))
    store.kind = request.param
    yield store
    pytest_twisted.blockon(cleanup())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- deadlines ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kill", [False, True], ids=["stopped", "killed"])
@pytest_twisted.ensureDeferred
async def test_lost_server_gives_store_unavailable_within_timeout(tmp_path, kill):
    uri, stop = start_briskdb(tmp_path / "briskdb")
    store = MongoStore(uri + "lost", timeout=1.0, implicit_session=False)
    try:
        coll = store.collection("things")
        # Set-up, not what is tested: a briskdb just started on a loaded machine may take longer than the
        # 1 s deadline for its first answer, so the connection is established with a few tries.
        for attempt in range(10):
            try:
                await coll.insert_one({"name": "a"})
                break
            except StoreUnavailable:
                if attempt == 9:
                    raise
        stop(kill=kill)
        for operation in (coll.find, coll.count, lambda: coll.insert_one({"name": "b"}), store.ping):
            started = time.monotonic()
            with pytest.raises(StoreUnavailable):
                await operation()
            assert time.monotonic() - started < 3.0
    finally:
        stop()
        await store.close()


@pytest_twisted.ensureDeferred
async def test_deadline_uses_the_injected_clock():
    clock = task.Clock()
    store = MongoStore(f"mongodb://127.0.0.1:{free_port()}/nothing", reactor=clock, timeout=5.0)
    try:
        pinging = defer.ensureDeferred(store.ping())
        clock.advance(4.9)
        assert not pinging.called
        clock.advance(0.1)
        with pytest.raises(StoreUnavailable):
            await pinging
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_closed_store_is_unavailable():
    store = MongoStore(f"mongodb://127.0.0.1:{free_port()}/nothing", timeout=1.0)
    await store.close()
    with pytest.raises(StoreUnavailable):
        await store.collection("things").find()


# -- sessions and URIs --------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_briskdb_needs_implicit_sessions_switched_off():
    uri = database_uri(shared_briskdb_uri(), "sessions")
    with_sessions = MongoStore(uri, timeout=5.0)
    without = MongoStore(uri + "?implicit_session=false", timeout=5.0)
    try:
        with pytest.raises(StoreError) as refused:
            await with_sessions.ping()
        assert not isinstance(refused.value, StoreUnavailable)
        await without.ping()
    finally:
        await with_sessions.close()
        await without.close()


def test_uri_option_is_removed_before_txmongo_sees_it():
    assert split_uri("mongodb://h:1/db?implicit_session=false&w=1") == ("mongodb://h:1/db?w=1", False)
    assert split_uri("mongodb://h:1,h:2/db?implicitSession=true") == ("mongodb://h:1,h:2/db", True)
    assert split_uri("mongodb://h/db?replicaSet=rs") == ("mongodb://h/db?replicaSet=rs", None)


@pytest_twisted.ensureDeferred
async def test_database_name_from_uri_with_default():
    named = MongoStore(f"mongodb://127.0.0.1:{free_port()}/inventory?implicit_session=false")
    default = MongoStore(f"mongodb://127.0.0.1:{free_port()}")
    try:
        assert (named.database_name, named.implicit_session) == ("inventory", False)
        assert (default.database_name, default.implicit_session) == ("kvmdesk", True)
    finally:
        await named.close()
        await default.close()


# -- parity with SQLite, on every backend --------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_duplicate_key_names_the_index_fields(store):
    await store.ensure_indexes([Index("nets", ["name"], unique=True), Index("nets", ["vlan", "node"], unique=True)])
    coll = store.collection("nets")
    first = await coll.insert_one({"name": "a", "vlan": 1, "node": "n1"})
    await coll.insert_one({"name": "b", "vlan": 2, "node": "n1"})
    with pytest.raises(DuplicateKeyError) as by_name:
        await coll.insert_one({"name": "a", "vlan": 3, "node": "n1"})
    assert by_name.value.fields == ("name",)
    with pytest.raises(DuplicateKeyError) as by_pair:
        await coll.insert_one({"name": "c", "vlan": 1, "node": "n1"})
    assert by_pair.value.fields == ("vlan", "node")
    with pytest.raises(DuplicateKeyError) as on_update:
        await coll.update_one({"id": first["id"]}, {"$set": {"vlan": 2}})
    assert on_update.value.fields == ("vlan", "node")
    (result,) = await coll.insert_many([{"name": "b", "vlan": 9, "node": "n9"}])
    assert isinstance(result, DuplicateKeyError) and result.fields == ("name",)


@pytest_twisted.ensureDeferred
async def test_missing_or_null_values_never_clash_in_unique_indexes(store):
    await store.ensure_indexes([Index("macs", ["mac"], unique=True), Index("macs", ["a", "b"], unique=True)])
    coll = store.collection("macs")
    for doc in ({}, {}, {"mac": None}, {"mac": None}, {"a": 1}, {"a": 1}, {"a": 1, "b": None}):
        await coll.insert_one(doc)
    await coll.insert_one({"mac": "m1", "a": 1, "b": 1})
    with pytest.raises(DuplicateKeyError):
        await coll.insert_one({"mac": "m1"})
    with pytest.raises(DuplicateKeyError):
        await coll.insert_one({"a": 1, "b": 1})
    assert await coll.count() == 8


@pytest_twisted.ensureDeferred
async def test_ensure_indexes_is_idempotent(store):
    indexes = [Index("idem", ["name"], unique=True), Index("idem", ["-created", "name"])]
    await store.ensure_indexes(indexes)
    await store.ensure_indexes(indexes)
    await store.collection("idem").insert_one({"name": "x", "created": 1})


@pytest_twisted.ensureDeferred
async def test_no_driver_id_leaks(store):
    coll = store.collection("things")
    inserted = await coll.insert_one({"name": "a", "_id": "mine", "id": 999})
    assert set(inserted) == {"name", "id"} and inserted["id"] != 999
    (many,) = await coll.insert_many([{"name": "b"}])
    changed = await coll.find_one_and_update({"name": "a"}, {"$set": {"x": 1}}, return_new=False)
    upserted = await coll.find_one_and_update({"name": "c"}, {"$set": {"x": 1}}, upsert=True)
    for doc in [many, changed, upserted, *await coll.find(), *await coll.find(projection=["name", "_id"])]:
        assert "_id" not in doc


@pytest_twisted.ensureDeferred
async def test_insert_many_ids_are_consecutive_and_follow_earlier_ids(store):
    coll = store.collection("batch")
    first = await coll.insert_one({"n": 0})
    results = await coll.insert_many([{"n": i} for i in range(1, 6)])
    ids = [first["id"], *(doc["id"] for doc in results)]
    assert ids == sorted(set(ids))
    assert await coll.insert_many([]) == []


@pytest_twisted.ensureDeferred
async def test_delete_one_and_update_one_take_the_lowest_id(store):
    coll = store.collection("order")
    docs = await coll.insert_many([{"k": 1, "i": i} for i in range(3)])
    assert await coll.update_one({"k": 1}, {"$set": {"hit": True}}) == 1
    assert (await coll.find_one({"hit": True}))["id"] == docs[0]["id"]
    assert await coll.delete_one({"k": 1}) == 1
    assert [d["id"] for d in await coll.find()] == [docs[1]["id"], docs[2]["id"]]


@pytest_twisted.ensureDeferred
async def test_upsert_seeds_from_plain_equalities_only(store):
    coll = store.collection("up")
    created = await coll.find_one_and_update(
        {"name": "n", "size": {"$gt": 1}, "spec.cpu": 2, "$or": [{"a": 1}]}, {"$set": {"x": 1}, "$inc": {"count": 2}},
        upsert=True,
    )
    assert {k: v for k, v in created.items() if k != "id"} == {"name": "n", "x": 1, "count": 2}
    assert await coll.find_one_and_update({"name": "m"}, {"$set": {"x": 1}}, upsert=True, return_new=False) is None
    assert await coll.count({"name": "m"}) == 1


@pytest_twisted.ensureDeferred
async def test_count_by_keys_match_sqlite(store):
    coll = store.collection("groups")
    for doc in ({"g": "a"}, {"g": "a"}, {"g": None}, {}, {"g": [1, 2]}, {"g": {"k": 1}}, {"g": 2}):
        await coll.insert_one(doc)
    assert await coll.count_by("g") == {"a": 2, None: 2, "[1,2]": 1, '{"k":1}': 1, 2: 1}


@pytest_twisted.ensureDeferred
async def test_values_come_back_as_json(store):
    import datetime

    coll = store.collection("types")
    when = datetime.datetime(2024, 5, 1, 12, 0, tzinfo=datetime.timezone.utc)
    await coll.insert_one({"when": when, "pair": (1, 2)})
    await coll.update_many({}, {"$set": {"later": when}})
    doc = await coll.find_one()
    assert doc["when"] == doc["later"] == "2024-05-01T12:00:00+00:00" and doc["pair"] == [1, 2]


@pytest_twisted.ensureDeferred
async def test_projection_of_a_path_and_its_parent(store):
    coll = store.collection("proj")
    await coll.insert_one({"spec": {"cpu": 2, "mem": 4}, "name": "a"})
    assert await coll.find(projection=["spec", "spec.cpu"]) == [{"spec": {"cpu": 2, "mem": 4}}]
    assert await coll.find(projection=["spec.cpu"]) == [{"spec": {"cpu": 2}}]


@pytest_twisted.ensureDeferred
async def test_bad_updates_raise_value_error(store):
    coll = store.collection("bad")
    await coll.insert_one({"name": "x", "n": "text", "items": 1})
    with pytest.raises(ValueError):
        await coll.update_one({"name": "x"}, {"$inc": {"n": 1}})
    with pytest.raises(ValueError):
        await coll.update_one({"name": "x"}, {"$push": {"items": 2}})
    with pytest.raises(ValueError):
        await coll.update_one({"name": "x"}, {"$set": {"id": 5}})
    with pytest.raises(ValueError):
        await coll.find(sort=[("name", 2)])


@pytest_twisted.ensureDeferred
async def test_oversized_document_is_refused_not_unavailable(store):
    if store.kind != "briskdb":
        pytest.skip("only briskdb has a small document limit (512 KiB)")
    coll = store.collection("big")
    with pytest.raises(ValueError):
        await coll.insert_one({"blob": "x" * 600_000})
    await store.ping()


@pytest_twisted.ensureDeferred
async def test_counters_collection_is_reserved(store):
    if store.kind == "sqlite":
        pytest.skip("only the MongoDB store keeps id counters in a collection")
    with pytest.raises(ValueError):
        store.collection("_counters")


def test_invalid_uri_is_a_value_error():
    with pytest.raises(ValueError):
        MongoStore("mongodb://127.0.0.1:1/db?noSuchOption=1")
