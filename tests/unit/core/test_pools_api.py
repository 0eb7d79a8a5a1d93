"""Resource pools through the API (contract #17-#20), including bad input on every pool endpoint."""
from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from core_testlib import POOLS, assert_error, raw_call, running_api, snapshot
from kvmdesk.api.app import make_router
from kvmdesk.core import errors
from kvmdesk.core.app import build_core
from kvmdesk.core.config import Config
from kvmdesk.core.records import format_time
from kvmdesk.plugins.nodes.pools import DEFAULT_POOL_UNDELETABLE
from kvmdesk.testing.api import ApiClient

CONTRACT_FIELDS = {"id", "uuid", "name", "desc", "host_count", "status", "default", "deleted", "deleted_at",
                   "updated_at", "created_at"}
UNKNOWN = "5ea1aef4-3c26-11ea-b688-000c295dd728"


async def _create(api, name: str, desc: str | None = "d") -> dict:
    status, body = await api.call("POST", POOLS, {"name": name, "desc": desc})
    assert (status, body["code"]) == (200, 0), body
    return body["data"]


async def _add_node(api, pool_uuid: str, name: str = "node-1") -> None:
    await api.core.store.collection("nodes").insert_one({"uuid": f"{name}-uuid", "name": name,
                                                         "resource_pool_uuid": pool_uuid})


async def _default(api) -> dict:
    return await api.core.store.collection("resource_pools").find_one({"default": 1})


@pytest_twisted.ensureDeferred
async def test_default_pool_exists_after_first_start(api):
    status, body = await api.call("GET", POOLS)
    (pool,) = body["data"]["results"]
    assert set(pool) == CONTRACT_FIELDS
    assert (pool["name"], pool["default"], pool["status"], pool["host_count"], pool["deleted"]) == ("default", 1, 0, 0, 0)
    assert pool["desc"] is None and pool["deleted_at"] is None


@pytest_twisted.ensureDeferred
async def test_restart_keeps_exactly_one_default_pool(tmp_path, clock):
    async with running_api(tmp_path, clock) as api:
        before = await snapshot(api.core)
    config = Config([{"controller": {"data_dir": str(tmp_path / "data")}}])
    core = await build_core(config, reactor, clock=clock, make_router=make_router)
    try:
        assert await snapshot(core) == before
    finally:
        await core.store.close()


@pytest_twisted.ensureDeferred
async def test_create(api, clock):
    clock.advance(1000)
    created = await _create(api, "royin008", "royin008 测试")
    assert set(created) == CONTRACT_FIELDS
    assert (created["name"], created["desc"], created["default"], created["status"], created["host_count"]) == (
        "royin008", "royin008 测试", 0, 0, 0)
    assert created["created_at"] == created["updated_at"] == format_time(1000)
    _, body = await api.call("GET", POOLS)
    assert [p["name"] for p in body["data"]["results"]] == ["default", "royin008"]
    assert body["data"]["results"][1] == created


@pytest_twisted.ensureDeferred
async def test_create_with_null_desc(api):
    assert (await _create(api, "no-desc", None))["desc"] is None


@pytest_twisted.ensureDeferred
async def test_names_are_unique(api):
    await _create(api, "unique")
    before = await snapshot(api.core)
    for name in ("unique", "default"):
        status, body = await api.call("POST", POOLS, {"name": name, "desc": ""})
        assert_error(status, body, 409, errors.ALREADY_EXISTS.code)
        assert body["msg"] == f"资源池已存在: {name}"
    assert await snapshot(api.core) == before


@pytest_twisted.ensureDeferred
async def test_concurrent_creates_of_one_name_make_one_pool(api):
    results = await defer.gatherResults(
        [defer.ensureDeferred(api.call("POST", POOLS, {"name": "race", "desc": ""})) for _ in range(5)])
    assert sorted(status for status, _ in results) == [200, 409, 409, 409, 409]
    assert await api.core.store.collection("resource_pools").count({"name": "race"}) == 1


@pytest_twisted.ensureDeferred
async def test_edit(api, clock):
    pool = await _create(api, "old", "old desc")
    clock.advance(3600)
    status, body = await api.call("PUT", f"{POOLS}/{pool['uuid']}", {"name": "royin004 test", "desc": "royin004 test1222"})
    assert (status, body["code"]) == (200, 0)
    edited = body["data"]
    assert (edited["name"], edited["desc"], edited["uuid"], edited["created_at"]) == (
        "royin004 test", "royin004 test1222", pool["uuid"], pool["created_at"])
    assert edited["updated_at"] == format_time(clock.seconds()) != pool["updated_at"]
    _, body = await api.call("PUT", f"{POOLS}/{pool['uuid']}", {"desc": None})
    assert (body["data"]["name"], body["data"]["desc"]) == ("royin004 test", None)
    _, body = await api.call("PUT", f"{POOLS}/{pool['uuid']}", {})
    assert body["data"]["name"] == "royin004 test"
    stored = await api.core.store.collection("resource_pools").find_one({"uuid": pool["uuid"]})
    assert (stored["name"], stored["desc"]) == ("royin004 test", None)


@pytest_twisted.ensureDeferred
async def test_edit_the_default_pool(api):
    default = await _default(api)
    status, body = await api.call("PUT", f"{POOLS}/{default['uuid']}", {"desc": "the default one"})
    assert (status, body["data"]["desc"], body["data"]["default"]) == (200, "the default one", 1)


@pytest_twisted.ensureDeferred
async def test_edit_to_a_taken_name_is_409(api):
    pool = await _create(api, "mine")
    before = await snapshot(api.core)
    status, body = await api.call("PUT", f"{POOLS}/{pool['uuid']}", {"name": "default", "desc": "changed"})
    assert_error(status, body, 409, errors.ALREADY_EXISTS.code)
    assert await snapshot(api.core) == before
    status, body = await api.call("PUT", f"{POOLS}/{pool['uuid']}", {"name": "mine"})  # its own name is fine
    assert status == 200


@pytest_twisted.ensureDeferred
async def test_host_count(api):
    pool = await _create(api, "with-nodes")
    await _add_node(api, pool["uuid"], "n1")
    await _add_node(api, pool["uuid"], "n2")
    _, body = await api.call("GET", POOLS)
    assert {p["name"]: p["host_count"] for p in body["data"]["results"]} == {"default": 0, "with-nodes": 2}
    _, body = await api.call("PUT", f"{POOLS}/{pool['uuid']}", {"desc": "x"})
    assert body["data"]["host_count"] == 2


@pytest_twisted.ensureDeferred
async def test_delete_one(api):
    pool = await _create(api, "doomed")
    status, body = await api.call("DELETE", POOLS, {"uuids": [pool["uuid"]]})
    assert (status, body["code"], body["data"]) == (200, 0, {"success_num": 1, "failed_num": 0, "failures": []})
    assert await api.core.store.collection("resource_pools").find_one({"uuid": pool["uuid"]}) is None


@pytest_twisted.ensureDeferred
async def test_default_pool_cannot_be_deleted(api):
    before = await snapshot(api.core)
    status, body = await api.call("DELETE", POOLS, {"uuids": [(await _default(api))["uuid"]]})
    assert_error(status, body, 409, DEFAULT_POOL_UNDELETABLE.code)
    assert body["msg"] == "默认资源池不能删除"
    assert await snapshot(api.core) == before


@pytest_twisted.ensureDeferred
async def test_pool_with_nodes_cannot_be_deleted(api):
    pool = await _create(api, "busy")
    await _add_node(api, pool["uuid"])
    before = await snapshot(api.core)
    status, body = await api.call("DELETE", POOLS, {"uuids": [pool["uuid"]]}, headers={"Accept-Language": "en"})
    assert_error(status, body, 409, errors.IN_USE.code)
    assert "busy" in body["msg"] and "1 nodes" in body["msg"]
    assert await snapshot(api.core) == before
    await api.core.store.collection("nodes").delete_many({})
    status, body = await api.call("DELETE", POOLS, {"uuids": [pool["uuid"]]})
    assert (status, body["code"]) == (200, 0)


@pytest_twisted.ensureDeferred
async def test_batch_delete_with_mixed_results(api):
    ok_1, ok_2, busy = [await _create(api, name) for name in ("ok-1", "ok-2", "busy")]
    await _add_node(api, busy["uuid"])
    default = await _default(api)
    uuids = [ok_1["uuid"], default["uuid"], busy["uuid"], UNKNOWN, ok_2["uuid"], ok_1["uuid"]]
    status, body = await api.call("DELETE", POOLS, {"uuids": uuids})
    assert (status, body["code"]) == (200, 0)
    result = body["data"]
    assert (result["success_num"], result["failed_num"]) == (2, 3)  # the repeated uuid counts once
    assert [(f["uuid"], f["code"]) for f in result["failures"]] == [
        (default["uuid"], DEFAULT_POOL_UNDELETABLE.code),
        (busy["uuid"], errors.IN_USE.code),
        (UNKNOWN, errors.NOT_FOUND.code),
    ]
    assert all(f["msg"] for f in result["failures"])
    remaining = {p["name"] for p in await snapshot(api.core)}
    assert remaining == {"default", "busy"}


# -- bad input on every pool endpoint ------------------------------------------------------------

BIG = b'{"name": "big", "desc": "' + b"x" * (1 << 20) + b'"}'
BAD_BODIES = [
    (b"{", 400, errors.INVALID_JSON),
    (b'{"name": "x", "desc": "y"', 400, errors.INVALID_JSON),
    (b"\x00\x01\x02", 400, errors.INVALID_JSON),
    (b"[]", 400, errors.INVALID_PARAM),
    (b"42", 400, errors.INVALID_PARAM),
    (b'{"name": 1, "desc": "d", "uuids": 1}', 400, errors.INVALID_PARAM),
    (b'{"name": "p", "desc": "d", "uuids": ["u"], "surprise": 1}', 400, errors.INVALID_PARAM),
    (b'{"name": null, "desc": null, "uuids": null}', 400, errors.INVALID_PARAM),
    (b'{"name": {"$ne": 1}, "desc": "d", "uuids": [{"$ne": 1}]}', 400, errors.INVALID_PARAM),
    (BIG, 413, errors.BODY_TOO_LARGE),
]
NO_TOKEN = [{}, {"Authorization": "Bearer forged"}, {"Authorization": "Token abc"}]


def _cases():
    for index, (body, status, error) in enumerate(BAD_BODIES):
        yield pytest.param("POST", POOLS, body, status, error, id=f"create-body{index}")
        yield pytest.param("PUT", POOLS + "/{pool}", body, status, error, id=f"edit-body{index}")
        yield pytest.param("DELETE", POOLS, body, status, error, id=f"delete-body{index}")
    missing = [
        ("POST", POOLS, b'{"desc": "d"}', 400, errors.INVALID_PARAM),
        ("POST", POOLS, b"", 400, errors.INVALID_PARAM),
        ("DELETE", POOLS, b"{}", 400, errors.INVALID_PARAM),
        ("DELETE", POOLS, b"", 400, errors.INVALID_PARAM),
        ("DELETE", POOLS, b'{"uuids": []}', 400, errors.BATCH_EMPTY),
        ("PUT", POOLS + "/{pool}", b'{"name": null}', 400, errors.INVALID_PARAM),
        ("PUT", POOLS + "/{pool}", b'{"name": ""}', 400, errors.INVALID_PARAM),
        ("POST", POOLS, b'{"name": "' + b"n" * 65 + b'", "desc": ""}', 400, errors.INVALID_PARAM),
        ("PUT", POOLS + "/{pool}", b'{"desc": "' + b"d" * 1025 + b'"}', 400, errors.INVALID_PARAM),
        ("POST", POOLS, b'{"name": "default", "desc": ""}', 409, errors.ALREADY_EXISTS),
    ]
    for index, case in enumerate(missing):
        yield pytest.param(*case, id=f"invalid{index}")
    unknown = [
        ("PUT", f"{POOLS}/{UNKNOWN}", b'{"name": "x"}', 404, errors.NOT_FOUND),
        ("PUT", f"{POOLS}/{UNKNOWN}", b"{}", 404, errors.NOT_FOUND),
        ("PUT", f"{POOLS}/%27%20OR%201=1", b'{"desc": "x"}', 404, errors.NOT_FOUND),
        ("DELETE", POOLS, ('{"uuids": ["%s"]}' % UNKNOWN).encode(), 404, errors.NOT_FOUND),
        ("DELETE", POOLS, b'{"uuids": ["x", "y"]}', 200, None),  # several unknown: a batch report
    ]
    for index, case in enumerate(unknown):
        yield pytest.param(*case, id=f"unknown-uuid{index}")
    queries = [
        "?page=0", "?page=x", "?page_size=-5", "?page_size=100000", "?searchtype=bogus", "?searchtype=contain",
        "?searchtype=single", "?searchtype=single&name=nope", "?nonsense=1", "?status=abc", "?default=",
        "?status=1e400", "?host_count=1", "?id=1",
    ]
    for query in queries:
        status = 404 if query == "?searchtype=single&name=nope" else 400
        yield pytest.param("GET", POOLS + query, None, status, None, id=f"list{query}")


@pytest.mark.parametrize("method, path, body, status, error", list(_cases()))
@pytest_twisted.ensureDeferred
async def test_bad_input_is_a_4xx_envelope_and_changes_nothing(api, method, path, body, status, error):
    pool = await _create(api, "victim", "unchanged")
    before = await snapshot(api.core)
    sent, envelope, _ = await raw_call(api, method, path.replace("{pool}", pool["uuid"]), body)
    if status == 200:  # a batch of unknown uuids: every item failed, nothing deleted
        assert (sent, envelope["data"]["success_num"], envelope["data"]["failed_num"]) == (200, 0, 2)
    else:
        assert_error(sent, envelope, status, error.code if error else None)
        assert 400 <= sent < 500
    assert await snapshot(api.core) == before


def _every_pool_endpoint():
    for method, path in [("GET", POOLS), ("POST", POOLS), ("PUT", POOLS + "/{pool}"), ("DELETE", POOLS)]:
        for index, headers in enumerate(NO_TOKEN):
            yield pytest.param(method, path, headers, id=f"{method}-{index}")


@pytest.mark.parametrize("method, path, headers", list(_every_pool_endpoint()))
@pytest_twisted.ensureDeferred
async def test_no_token_on_every_pool_endpoint(api, method, path, headers):
    pool = await _create(api, "victim", "unchanged")
    before = await snapshot(api.core)
    body = {"GET": None, "POST": b'{"name": "intruder", "desc": ""}', "PUT": b'{"name": "pwned"}',
            "DELETE": ('{"uuids": ["%s"]}' % pool["uuid"]).encode()}[method]
    status, envelope, _ = await raw_call(api, method, path.replace("{pool}", pool["uuid"]), body, headers=headers,
                                         auth=False)
    assert_error(status, envelope, 401, errors.UNAUTHENTICATED.code)
    assert await snapshot(api.core) == before


@pytest_twisted.ensureDeferred
async def test_a_logged_out_token_changes_nothing(api):
    pool = await _create(api, "victim")
    await api.call("POST", "/auth/logout")
    before = await snapshot(api.core)
    for method, path, body in [("POST", POOLS, {"name": "x", "desc": ""}), ("PUT", f"{POOLS}/{pool['uuid']}", {"name": "y"}),
                               ("DELETE", POOLS, {"uuids": [pool["uuid"]]})]:
        status, envelope = await api.call(method, path, body)
        assert_error(status, envelope, 401, errors.UNAUTHENTICATED.code)
    assert await snapshot(api.core) == before
    fresh = ApiClient(api.core)
    await fresh.login()
    status, _ = await fresh.call("GET", POOLS)
    assert status == 200
