"""The operation log: written by the router for every state-changing request, listed newest first."""
from __future__ import annotations

import orjson
import pytest_twisted

from core_testlib import POOLS, load_example_plugin, plugins_with, running_api, snapshot
from kvmdesk.core import errors, oplog
from kvmdesk.core.records import format_time
from kvmdesk.testing.api import ADMIN_PASSWORD

LOG = "/index/get_operation_log/"
#: The peer address treq's in-memory transport reports for every request.
CLIENT_IP = "127.0.0.1"


async def _records(api) -> list[dict]:
    return await snapshot(api.core, oplog.COLLECTION)


@pytest_twisted.ensureDeferred
async def test_state_changes_are_recorded_with_user_ip_content_and_result(api):
    before = await _records(api)
    status, body = await api.call("POST", POOLS, {"name": "pool-a", "desc": "first"})
    assert status == 200
    uuid = body["data"]["uuid"]
    await api.call("PUT", f"{POOLS}/{uuid}", {"name": "pool-b"})
    await api.call("DELETE", POOLS, {"uuids": [uuid]})
    new = (await _records(api))[len(before):]
    assert [r["content"] for r in new] == ["新增资源池: pool-a", "编辑资源池: pool-a", f"删除资源池: {uuid}"]
    admin = await api.core.store.collection("admins").find_one({"username": "admin"})
    for record in new:
        assert record["user_name"] == "admin" and record["user_id"] == admin["id"]
        assert record["user_ip"] == CLIENT_IP
        assert (record["result"], record["code"], record["module"]) == ("成功", 0, "resource_pools")
        assert record["created_at"] == format_time(api.core.clock.seconds())
        assert {"uuid", "created_at", "updated_at", "deleted", "deleted_at", "id"} <= set(record)


@pytest_twisted.ensureDeferred
async def test_failed_operations_are_recorded_with_their_error(api):
    before = len(await _records(api))
    status, body = await api.call("POST", POOLS, {"name": "default", "desc": ""})
    assert status == 409
    (record,) = (await _records(api))[before:]
    assert record["content"] == "新增资源池: default"
    assert (record["code"], record["result"]) == (errors.ALREADY_EXISTS.code, body["msg"])


@pytest_twisted.ensureDeferred
async def test_reads_and_unauthenticated_requests_are_not_recorded(api):
    before = await _records(api)
    await api.call("GET", POOLS)
    await api.call("GET", POOLS, params={"searchtype": "single", "name": "default"})
    await api.call("GET", LOG)
    await api.call("GET", "/openapi.json")
    await api.call("POST", POOLS, {"name": "sneaky", "desc": ""}, auth=False)
    await api.call("GET", "/no/such/path")
    assert await _records(api) == before


@pytest_twisted.ensureDeferred
async def test_logins_are_recorded_without_the_password(api):
    before = len(await _records(api))
    await api.call("POST", "/auth/login", {"username": "admin", "password": "wrong-secret-1"}, auth=False)
    await api.login()
    new = (await _records(api))[before:]
    assert [(r["content"], r["user_name"], r["code"]) for r in new] == [
        ("管理员登录: admin", "admin", errors.LOGIN_FAILED.code),
        ("管理员登录: admin", "admin", 0),
    ]
    dumped = orjson.dumps(await _records(api)).decode()
    assert "wrong-secret-1" not in dumped and ADMIN_PASSWORD not in dumped and api.token not in dumped


@pytest_twisted.ensureDeferred
async def test_secret_fields_never_reach_the_content(tmp_path, clock):
    """Any body field that looks like a secret is left out of the content, for every plugin."""
    from kvmdesk import hookimpl
    from kvmdesk.api.models import Model

    class Account(Model):
        name: str
        password: str
        new_passwd: str
        api_token: str

    class Accounts:
        @hookimpl
        def kvmdesk_routes(self, router, core):
            @router.endpoint("POST", "/test/accounts", summary="create", body=Account, oplog="创建账号")
            async def create(req):
                return None

    async with running_api(tmp_path, clock, plugins=plugins_with((Accounts(), "accounts"))) as api:
        status, _ = await api.call("POST", "/test/accounts",
                                   {"name": "bob", "password": "s3cret-a", "new_passwd": "s3cret-b", "api_token": "s3cret-c"})
        assert status == 200
        record = (await _records(api))[-1]
        assert record["content"] == "创建账号: bob"
        assert "s3cret" not in orjson.dumps(await _records(api)).decode()


@pytest_twisted.ensureDeferred
async def test_actions_are_recorded_with_the_action_label(tmp_path, clock):
    async with running_api(tmp_path, clock, plugins=plugins_with((load_example_plugin(), "example"))) as api:
        await api.call("POST", "/example/counter", {"action": "add", "param": {"x": 2}})
        await api.call("POST", "/example/counter", {"action": "reset"})
        records = (await _records(api))[-2:]
        assert [(r["content"], r["module"]) for r in records] == [("计数器增加", "example"), ("计数器清零", "example")]


@pytest_twisted.ensureDeferred
async def test_list_is_newest_first_and_paged(api):
    for i in range(12):
        await api.call("POST", POOLS, {"name": f"p{i:02d}", "desc": ""})
    total = len(await _records(api))
    status, body = await api.call("GET", LOG, params={"page_size": "5"})
    page = body["data"]
    assert (status, page["count"], len(page["results"])) == (200, total, 5)
    assert [r["content"] for r in page["results"]] == [f"新增资源池: p{i:02d}" for i in (11, 10, 9, 8, 7)]
    ids = [r["id"] for r in page["results"]]
    assert ids == sorted(ids, reverse=True)
    assert page["next"] == "http://kvmdesk.test/api/v1.0/index/get_operation_log/?page_size=5&page=2"
    _, body = await api.call("GET", LOG, params={"page_size": "5", "page": "2"})
    assert body["data"]["results"][0]["content"] == "新增资源池: p06"


@pytest_twisted.ensureDeferred
async def test_list_supports_the_generic_search(api):
    await api.call("POST", POOLS, {"name": "findme", "desc": ""})
    _, body = await api.call("GET", LOG, params={"searchtype": "contain", "content": "findme"})
    assert [r["content"] for r in body["data"]["results"]] == ["新增资源池: findme"]
    _, body = await api.call("GET", LOG, params={"user_name": "admin"})
    assert body["data"]["count"] == len(await _records(api))
    status, body = await api.call("GET", LOG, params={"password": "x"})
    assert (status, body["code"]) == (400, errors.UNKNOWN_FILTER.code)


class StuckUsage:
    """A plugin whose usage check never answers for one pool: the batch hangs there, as a process
    killed in the middle of it would stop."""

    def __init__(self, stuck: str):
        from twisted.internet import defer

        self.stuck = stuck
        self.reached = defer.Deferred()

    from kvmdesk import hookimpl

    @hookimpl
    def kvmdesk_usage(self, core, kind, uuid):
        from twisted.internet import defer

        if uuid != self.stuck:
            return None
        self.reached.callback(None)
        return defer.Deferred()


@pytest_twisted.ensureDeferred
async def test_a_batch_cut_off_midway_leaves_an_interrupted_entry_with_its_progress(tmp_path, clock):
    """Issue 14 defect 5: a bulk operation killed midway left no operation-log entry."""
    from twisted.internet import defer

    from kvmdesk.testing.api import ApiClient, make_core

    core = await make_core(tmp_path, clock=clock)
    api = ApiClient(core)
    await api.login()
    uuids = []
    for number in range(5):
        status, body = await api.call("POST", POOLS, {"name": f"batch-{number}", "desc": None})
        uuids.append(body["data"]["uuid"])
    stuck = StuckUsage(uuids[3])
    core.plugins.register(stuck, name="stuck")
    abandoned = defer.ensureDeferred(api.call("DELETE", POOLS, {"uuids": uuids}))
    await stuck.reached
    (entry,) = [r for r in await snapshot(core, oplog.COLLECTION) if r["content"].startswith("删除资源池")]
    assert entry["state"] == "running" and entry["progress"] == {"done": 3, "total": 5}, entry
    assert not abandoned.called
    await core.store.close()  # the process is gone; its store is all that is left

    again = await make_core(tmp_path, clock=clock)
    try:
        (entry,) = [r for r in await snapshot(again, oplog.COLLECTION) if r["content"].startswith("删除资源池")]
        assert entry["state"] == "interrupted" and entry["progress"] == {"done": 3, "total": 5}
        assert entry["code"] == errors.OPERATION_INTERRUPTED.code and "3/5" in entry["result"]
        left = [p["name"] for p in await snapshot(again)]
        assert left == ["default", "batch-3", "batch-4"]
    finally:
        await again.store.close()


@pytest_twisted.ensureDeferred
async def test_a_completed_batch_entry_is_done_with_its_count(api):
    uuids = []
    for number in range(3):
        status, body = await api.call("POST", POOLS, {"name": f"whole-{number}", "desc": None})
        uuids.append(body["data"]["uuid"])
    status, body = await api.call("DELETE", POOLS, {"uuids": uuids})
    assert status == 200 and body["data"]["success_num"] == 3
    (entry,) = [r for r in await _records(api) if r["content"].startswith("删除资源池")]
    assert entry["state"] == "done" and entry["progress"] == {"done": 3, "total": 3}
    assert (entry["code"], entry["result"]) == (0, "成功")
