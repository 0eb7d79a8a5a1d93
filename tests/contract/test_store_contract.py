"""The store contract: every backend must pass every test here.

Backends: SQLite always; txmongo against the briskdb MongoDB-wire server; txmongo against a real
MongoDB when ``KVMDESK_TEST_MONGO_URI`` is set.
"""
import pytest
import pytest_twisted

from kvmdesk.core.store import DuplicateKeyError, Index
from kvmdesk.testing.stores import open_test_store

BACKENDS = ["sqlite", "briskdb", "mongo"]


@pytest.fixture(params=BACKENDS)
def store(request, tmp_path):
    store, cleanup = pytest_twisted.blockon(open_test_store(request.param, tmp_path))
    yield store
    pytest_twisted.blockon(cleanup())


async def seed(coll, n=5):
    docs = [{"uuid": f"u{i}", "name": f"name{i}", "n": i, "tags": ["even" if i % 2 == 0 else "odd"], "group": i % 2}
            for i in range(n)]
    return [await coll.insert_one(d) for d in docs]


@pytest_twisted.ensureDeferred
async def test_insert_assigns_increasing_ids(store):
    coll = store.collection("things")
    a = await coll.insert_one({"name": "a"})
    b = await coll.insert_one({"name": "b"})
    assert isinstance(a["id"], int) and b["id"] > a["id"]
    found = await coll.find_one({"name": "b"})
    assert found == {"name": "b", "id": b["id"]}


@pytest_twisted.ensureDeferred
async def test_insert_does_not_mutate_input(store):
    doc = {"name": "x"}
    await store.collection("things").insert_one(doc)
    assert doc == {"name": "x"}


@pytest_twisted.ensureDeferred
async def test_empty_collection_reads(store):
    coll = store.collection("never_written")
    assert await coll.find() == []
    assert await coll.count() == 0
    assert await coll.find_one({"a": 1}) is None
    assert await coll.count_by("a") == {}
    assert await coll.delete_many({}) == 0


@pytest_twisted.ensureDeferred
async def test_equality_and_operators(store):
    coll = store.collection("things")
    await seed(coll)
    names = lambda docs: sorted(d["name"] for d in docs)
    assert names(await coll.find({"n": 3})) == ["name3"]
    assert names(await coll.find({"n": {"$in": [1, 4]}})) == ["name1", "name4"]
    assert names(await coll.find({"n": {"$nin": [0, 1, 2]}})) == ["name3", "name4"]
    assert names(await coll.find({"n": {"$ne": 0}})) == ["name1", "name2", "name3", "name4"]
    assert names(await coll.find({"n": {"$gte": 2, "$lt": 4}})) == ["name2", "name3"]
    assert names(await coll.find({"n": {"$gt": 3}})) == ["name4"]
    assert names(await coll.find({"n": {"$lte": 0}})) == ["name0"]
    assert names(await coll.find({"$or": [{"n": 0}, {"name": "name4"}]})) == ["name0", "name4"]
    assert names(await coll.find({"$and": [{"group": 1}, {"n": {"$gt": 1}}]})) == ["name3"]
    assert names(await coll.find({"$nor": [{"group": 1}, {"n": 0}]})) == ["name2", "name4"]


@pytest_twisted.ensureDeferred
async def test_exists_and_null(store):
    coll = store.collection("things")
    await coll.insert_one({"name": "with", "desc": "d"})
    await coll.insert_one({"name": "null", "desc": None})
    await coll.insert_one({"name": "without"})
    names = lambda docs: sorted(d["name"] for d in docs)
    assert names(await coll.find({"desc": {"$exists": True}})) == ["null", "with"]
    assert names(await coll.find({"desc": {"$exists": False}})) == ["without"]
    assert names(await coll.find({"desc": None})) == ["null", "without"]
    assert names(await coll.find({"desc": {"$ne": None}})) == ["with"]
    assert names(await coll.find({"desc": {"$ne": "d"}})) == ["null", "without"]


@pytest_twisted.ensureDeferred
async def test_regex_contain_search(store):
    coll = store.collection("things")
    await coll.insert_one({"name": "Alpha-Room"})
    await coll.insert_one({"name": "beta"})
    await coll.insert_one({"name": 5})
    found = await coll.find({"name": {"$regex": "room", "$options": "i"}})
    assert [d["name"] for d in found] == ["Alpha-Room"]
    assert await coll.find({"name": {"$regex": "room"}}) == []
    assert [d["name"] for d in await coll.find({"name": {"$regex": "^be"}})] == ["beta"]


@pytest_twisted.ensureDeferred
async def test_nested_fields_and_elem_match(store):
    coll = store.collection("things")
    await coll.insert_one({"name": "a", "spec": {"cpu": 2}, "nics": [{"name": "eth0", "ip": "10.0.0.1"}], "ids": [1, 2]})
    await coll.insert_one({"name": "b", "spec": {"cpu": 4}, "nics": [{"name": "eth1", "ip": "10.0.0.2"}], "ids": [3]})
    assert [d["name"] for d in await coll.find({"spec.cpu": {"$gte": 3}})] == ["b"]
    assert [d["name"] for d in await coll.find({"nics": {"$elemMatch": {"name": "eth0"}}})] == ["a"]
    assert [d["name"] for d in await coll.find({"ids": {"$elemMatch": {"$eq": 3}}})] == ["b"]


@pytest_twisted.ensureDeferred
async def test_sort_skip_limit_projection(store):
    coll = store.collection("things")
    await seed(coll, 6)
    docs = await coll.find({}, sort=[("group", 1), ("n", -1)])
    assert [d["n"] for d in docs] == [4, 2, 0, 5, 3, 1]
    page = await coll.find({}, sort=[("n", 1)], skip=2, limit=2)
    assert [d["n"] for d in page] == [2, 3]
    by_id_desc = await coll.find({}, sort=[("id", -1)], limit=1)
    assert by_id_desc[0]["n"] == 5
    projected = await coll.find({"n": 1}, projection=["name", "tags"])
    assert projected == [{"name": "name1", "tags": ["odd"]}]


@pytest_twisted.ensureDeferred
async def test_count_and_count_by(store):
    coll = store.collection("things")
    await seed(coll, 5)
    assert await coll.count() == 5
    assert await coll.count({"group": 0}) == 3
    assert await coll.count_by("group") == {0: 3, 1: 2}
    assert await coll.count_by("group", {"n": {"$gt": 2}}) == {0: 1, 1: 1}


@pytest_twisted.ensureDeferred
async def test_update_operators(store):
    coll = store.collection("things")
    (doc,) = await seed(coll, 1)
    assert await coll.update_one({"uuid": "u0"}, {
        "$set": {"name": "renamed", "spec.cpu": 2}, "$inc": {"n": 5}, "$push": {"tags": "new"}}) == 1
    after = await coll.find_one({"uuid": "u0"})
    assert after["name"] == "renamed" and after["spec"] == {"cpu": 2} and after["n"] == 5
    assert after["tags"] == ["even", "new"] and after["id"] == doc["id"]
    await coll.update_one({"uuid": "u0"}, {"$pull": {"tags": "even"}, "$unset": {"group": ""}})
    after = await coll.find_one({"uuid": "u0"})
    assert after["tags"] == ["new"] and "group" not in after
    assert await coll.update_one({"uuid": "missing"}, {"$set": {"a": 1}}) == 0


@pytest_twisted.ensureDeferred
async def test_update_many_and_upsert(store):
    coll = store.collection("things")
    await seed(coll, 4)
    assert await coll.update_many({"group": 0}, {"$set": {"flag": True}}) == 2
    assert await coll.count({"flag": True}) == 2
    assert await coll.update_one({"uuid": "new"}, {"$set": {"name": "fresh"}}, upsert=True) == 1
    created = await coll.find_one({"uuid": "new"})
    assert created["name"] == "fresh" and isinstance(created["id"], int)


@pytest_twisted.ensureDeferred
async def test_find_one_and_update_returns_before_or_after(store):
    coll = store.collection("counters")
    await coll.insert_one({"key": "k", "value": 1})
    before = await coll.find_one_and_update({"key": "k"}, {"$inc": {"value": 1}}, return_new=False)
    assert before["value"] == 1
    after = await coll.find_one_and_update({"key": "k"}, {"$inc": {"value": 1}})
    assert after["value"] == 3
    assert await coll.find_one_and_update({"key": "none"}, {"$inc": {"value": 1}}) is None
    created = await coll.find_one_and_update({"key": "up"}, {"$inc": {"value": 7}}, upsert=True)
    assert created["key"] == "up" and created["value"] == 7


@pytest_twisted.ensureDeferred
async def test_find_one_and_update_each_applies_in_order_each_seeing_the_last(store):
    coll = store.collection("slots")
    await coll.insert_many([{"name": n, "holder": None} for n in ("b", "a", "c")])
    claim = [({"holder": None}, {"$set": {"holder": f"u{i}"}}, [("name", 1)]) for i in range(4)]
    found = await coll.find_one_and_update_each(claim + [({"name": "a"}, {"$set": {"seen": 1}}, None)])
    assert [(d["name"], d["holder"]) for d in found[:3]] == [("a", "u0"), ("b", "u1"), ("c", "u2")]
    assert found[3] is None and (found[4]["holder"], found[4]["seen"]) == ("u0", 1)
    assert await coll.find_one_and_update_each([]) == []
    assert {d["name"]: d["holder"] for d in await coll.find({})} == {"a": "u0", "b": "u1", "c": "u2"}


@pytest_twisted.ensureDeferred
async def test_find_one_and_update_is_atomic_under_concurrency(store):
    """Many concurrent claims of free slots: no slot is handed out twice."""
    from twisted.internet import defer

    coll = store.collection("slots")
    for i in range(20):
        await coll.insert_one({"slot": i, "owner": None})

    async def claim(owner):
        return await coll.find_one_and_update({"owner": None}, {"$set": {"owner": owner}}, sort=[("slot", 1)])

    results = await defer.gatherResults([defer.ensureDeferred(claim(i)) for i in range(30)])
    won = [r for r in results if r is not None]
    assert len(won) == 20
    assert sorted(r["slot"] for r in won) == list(range(20))
    assert len({r["owner"] for r in won}) == 20


@pytest_twisted.ensureDeferred
async def test_unique_index_enforced_on_insert_and_update(store):
    await store.ensure_indexes([Index("pools", ["name"], unique=True)])
    coll = store.collection("pools")
    await coll.insert_one({"name": "a"})
    b = await coll.insert_one({"name": "b"})
    with pytest.raises(DuplicateKeyError) as info:
        await coll.insert_one({"name": "a"})
    assert info.value.collection == "pools"
    with pytest.raises(DuplicateKeyError):
        await coll.update_one({"id": b["id"]}, {"$set": {"name": "a"}})
    assert sorted(d["name"] for d in await coll.find()) == ["a", "b"]


@pytest_twisted.ensureDeferred
async def test_compound_unique_index(store):
    await store.ensure_indexes([Index("ips", ["subnet", "ip"], unique=True), Index("ips", ["-ip"])])
    coll = store.collection("ips")
    await coll.insert_one({"subnet": "s1", "ip": "10.0.0.1"})
    await coll.insert_one({"subnet": "s2", "ip": "10.0.0.1"})
    with pytest.raises(DuplicateKeyError):
        await coll.insert_one({"subnet": "s1", "ip": "10.0.0.1"})
    assert await coll.count() == 2


@pytest_twisted.ensureDeferred
async def test_unique_index_over_existing_duplicates_is_refused(store):
    coll = store.collection("dups")
    await coll.insert_one({"name": "x"})
    await coll.insert_one({"name": "x"})
    with pytest.raises(DuplicateKeyError):
        await store.ensure_indexes([Index("dups", ["name"], unique=True)])


@pytest_twisted.ensureDeferred
async def test_insert_many_reports_each_item(store):
    await store.ensure_indexes([Index("users", ["name"], unique=True)])
    coll = store.collection("users")
    await coll.insert_one({"name": "u2"})
    results = await coll.insert_many([{"name": "u1"}, {"name": "u2"}, {"name": "u3"}])
    assert isinstance(results[0], dict) and isinstance(results[2], dict)
    assert isinstance(results[1], DuplicateKeyError)
    assert results[0]["id"] != results[2]["id"]
    assert sorted(d["name"] for d in await coll.find()) == ["u1", "u2", "u3"]


@pytest_twisted.ensureDeferred
async def test_delete(store):
    coll = store.collection("things")
    await seed(coll, 5)
    assert await coll.delete_one({"group": 1}) == 1
    assert await coll.count() == 4
    assert await coll.delete_many({"group": 0}) == 3
    assert [d["name"] for d in await coll.find()] == ["name3"]


@pytest_twisted.ensureDeferred
async def test_filter_by_id(store):
    coll = store.collection("things")
    docs = await seed(coll, 3)
    assert (await coll.find_one({"id": docs[1]["id"]}))["name"] == "name1"
    assert await coll.count({"id": {"$in": [docs[0]["id"], docs[2]["id"]]}}) == 2


@pytest_twisted.ensureDeferred
async def test_bad_filters_are_refused(store):
    coll = store.collection("things")
    with pytest.raises(ValueError):
        await coll.find({"name; DROP TABLE things": 1})
    with pytest.raises(ValueError):
        await coll.find({"n": {"$where": "1"}})
    with pytest.raises(ValueError):
        await coll.update_one({"n": 1}, {"$rename": {"a": "b"}})


@pytest_twisted.ensureDeferred
async def test_ping(store):
    await store.ping()


@pytest_twisted.ensureDeferred
async def test_find_page_counts_and_slices(store):
    coll = store.collection("things")
    assert await coll.find_page({}, sort=[("id", 1)], skip=0, limit=10) == (0, [])
    docs = await seed(coll, 9)
    ids = [d["id"] for d in docs]
    count, page = await coll.find_page({}, sort=[("id", 1)], skip=2, limit=3)
    assert (count, [d["id"] for d in page]) == (9, ids[2:5])
    count, page = await coll.find_page({"group": 1}, sort=[("n", -1)], skip=1, limit=10)
    assert (count, [d["n"] for d in page]) == (4, [5, 3, 1])
    assert await coll.find_page({}, sort=[("id", 1)], skip=9, limit=5) == (9, [])
    assert await coll.find_page({}, sort=[("id", 1)], skip=2**70, limit=5) == (9, [])
    with pytest.raises(ValueError):
        await coll.find_page({"$bogus": 1}, sort=[("id", 1)], skip=0, limit=5)


@pytest_twisted.ensureDeferred
async def test_pages_read_from_the_far_end_match_the_forward_order(store):
    # find_page reads back-half pages in reverse from the end: with ties in the sort (group) the
    # reverse order must still be exactly the forward one backwards (id breaks ties in both).
    from types import SimpleNamespace

    from kvmdesk.core.config import Config
    from kvmdesk.core.paging import paginate

    coll = store.collection("things")
    for i in range(23):
        await coll.insert_one({"name": f"name{i % 7}", "group": i % 3})
    for sort in ([("group", 1)], [("name", -1), ("group", 1)], [("id", -1)]):
        everything = await coll.find({}, sort=sort)
        for size in (5, 23, 4):
            pages, page = [], 1
            while True:
                req = SimpleNamespace(args={"page": str(page), "page_size": str(size)},
                                      core=SimpleNamespace(config=Config()), url_with=lambda **p: "u")
                body = await paginate(req, coll, {}, sort=sort)
                pages.append(body["results"])
                if body["next"] is None:
                    break
                page += 1
            assert [d["id"] for d in sum(pages, [])] == [d["id"] for d in everything], (sort, size)
            assert all(len(p) == size for p in pages[:-1]) and 0 < len(pages[-1]) <= size


@pytest_twisted.ensureDeferred
async def test_upsert_each_creates_and_updates_in_order_with_one_outcome_each(store):
    coll = store.collection("hours")
    await store.ensure_indexes([Index("hours", ["node", "hour"], unique=True)])
    await coll.insert_one({"node": "a", "hour": 0, "m": {"0": 1}})
    outcomes = await coll.upsert_each([
        ({"node": "a", "hour": 0}, {"$set": {"m.1": 2}}),
        ({"node": "b", "hour": 0}, {"$set": {"m.5": 3}, "$inc": {"n": 1}}),
        ({"node": "b", "hour": 0}, {"$inc": {"n": 10}, "$set": {"m.5": 4}}),  # the same document again: after
        ({"node": "a", "hour": 3600.0}, {"$set": {"m.0": 5}}),
    ])
    assert outcomes == ["updated", "created", "updated", "created"]
    docs = {(d["node"], d["hour"]): d for d in await coll.find({})}
    assert docs[("a", 0)]["m"] == {"0": 1, "1": 2}
    assert (docs[("b", 0)]["m"], docs[("b", 0)]["n"]) == ({"5": 4}, 11)
    assert docs[("a", 3600)]["m"] == {"0": 5} and isinstance(docs[("a", 3600)]["id"], int)
    assert len({d["id"] for d in docs.values()}) == 3
    assert await coll.upsert_each([({"node": "a", "hour": 3600}, {"$set": {"m.1": 6}})]) == ["updated"]
    assert (await coll.find_one({"node": "a", "hour": 3600}))["m"] == {"0": 5, "1": 6}
    assert await coll.count() == 3


@pytest_twisted.ensureDeferred
async def test_upsert_each_reports_a_duplicate_key_in_its_place_and_writes_the_others(store):
    coll = store.collection("pools")
    await store.ensure_indexes([Index("pools", ["name"], unique=True)])
    await coll.insert_many([{"key": 1, "name": "taken"}, {"key": 2, "name": "mine"}])
    outcomes = await coll.upsert_each([
        ({"key": 2}, {"$set": {"name": "taken"}}),  # an update that clashes
        ({"key": 3}, {"$set": {"name": "taken"}}),  # a new document that clashes
        ({"key": 4}, {"$set": {"name": "free"}}),
        ({"key": 1}, {"$set": {"size": 9}}),
    ])
    assert [type(o) for o in outcomes[:2]] == [DuplicateKeyError, DuplicateKeyError]
    assert outcomes[0].fields == ("name",) and outcomes[2:] == ["created", "updated"]
    assert {d["key"]: d["name"] for d in await coll.find({})} == {1: "taken", 2: "mine", 4: "free"}
    assert (await coll.find_one({"key": 1}))["size"] == 9


@pytest.mark.parametrize("operations, message", [
    ([], "empty"),
    ({"key": 1}, "list of"),
    ([({"key": 1}, {"$set": {"a": 1}}), ({"key": 2},)], r"operations\[1\]: not a \(filter, update\) pair"),
    ([({"key": {"$gt": 1}}, {"$set": {"a": 1}})], r"operations\[0\]: filter field 'key'"),
    ([({"a.b": 1}, {"$set": {"a": 1}})], r"operations\[0\]: filter field 'a.b'"),
    ([({}, {"$set": {"a": 1}})], r"operations\[0\]: the filter must be"),
    ([({"key": 1}, {"$set": {"a": 1}}), ({"key": 2}, {"$rename": {"a": "b"}})], r"operations\[1\]: unsupported update"),
])
@pytest_twisted.ensureDeferred
async def test_upsert_each_refuses_bad_input_and_writes_nothing(store, operations, message):
    coll = store.collection("things")
    with pytest.raises(ValueError, match=message):
        await coll.upsert_each(operations)
    assert await coll.count() == 0


@pytest_twisted.ensureDeferred
async def test_upsert_each_that_fails_midway_writes_nothing_new(store):
    """A seed the update cannot take fails before anything is written, on both backends; on SQLite
    an update that fails inside the batch rolls the whole batch back."""
    coll = store.collection("things")
    await coll.insert_one({"key": 1, "label": "text"})
    with pytest.raises(ValueError):
        await coll.upsert_each([({"key": 2}, {"$set": {"a": 1}}), ({"key": 3, "label": "x"}, {"$inc": {"label": 1}})])
    assert await coll.count() == 1
    if type(store).__name__ == "SQLiteStore":
        with pytest.raises(ValueError):
            await coll.upsert_each([({"key": 2}, {"$set": {"a": 1}}), ({"key": 1}, {"$inc": {"label": 1}})])
        assert [d["key"] for d in await coll.find({})] == [1]


@pytest_twisted.ensureDeferred
async def test_upsert_each_of_more_than_one_write_command(store):
    """Past a backend's per-command bounds (MongoDB: 100 operations or 64 kB) a batch still has one
    outcome per operation, in order."""
    coll = store.collection("hours")
    await store.ensure_indexes([Index("hours", ["node", "hour"], unique=True)])
    await coll.insert_many([{"node": f"n{i:03d}", "hour": 0} for i in range(0, 150, 10)])
    outcomes = await coll.upsert_each([({"node": f"n{i:03d}", "hour": 0}, {"$set": {"v": i, "pad": "x" * 600}})
                                       for i in range(150)])
    assert outcomes == ["updated" if i % 10 == 0 else "created" for i in range(150)]
    assert sorted(d["v"] for d in await coll.find({}, projection=["v"])) == list(range(150))
