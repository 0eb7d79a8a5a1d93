"""Users: single and bulk creation, delete, update, enable, disable, move, query (contract #103-#109, #112)."""
from __future__ import annotations

import pytest_twisted

from kvmdesk.plugins.users import verify_user_password

from .conftest import (
    USERS,
    all_users,
    create_group,
    create_user,
    failed,
    group_users,
    multi_create,
    ok,
    refs,
    users_api,
)


async def stored(api, user_name: str) -> dict:
    return await api.core.store.collection("users").find_one({"user_name": user_name})


@pytest_twisted.ensureDeferred
async def test_single_create_as_in_the_contract(api):
    group = await create_group(api, "group1")
    param = {"group_uuid": group["uuid"], "user_name": "user2", "passwd": "password", "name": "john",
             "phone": "13144556677", "email": "345673456@qq.com", "enabled": 1}
    user = ok(*await api.call("POST", USERS, {"action": "single_create", "param": param}))
    expected = {"user_name": "user2", "name": "john", "phone": "13144556677", "email": "345673456@qq.com",
                "enabled": True, "group": group["uuid"]}
    assert {k: user[k] for k in expected} == expected
    assert "passwd" not in user and "password_hash" not in user
    assert (await stored(api, "user2"))["password_hash"].startswith("$argon2id$")
    assert (await verify_user_password(api.core, "user2", "password"))["uuid"] == user["uuid"]


@pytest_twisted.ensureDeferred
async def test_single_create_defaults_and_disabled(api):
    group = await create_group(api, "g")
    plain = await create_user(api, group["uuid"], "plain")
    assert (plain["enabled"], plain["name"], plain["phone"], plain["email"]) == (True, "", "", "")
    off = await create_user(api, group["uuid"], "off", enabled=False)
    assert off["enabled"] is False


@pytest_twisted.ensureDeferred
async def test_duplicate_user_name_is_a_conflict(api):
    group = await create_group(api, "g")
    await create_user(api, group["uuid"], "dup", passwd="first-password")
    status, body = await api.call("POST", USERS, {"action": "single_create", "param": {
        "group_uuid": group["uuid"], "user_name": "dup", "passwd": "second-password"}})
    failed(status, body, 409, 1013)
    assert len(await all_users(api)) == 1
    assert await verify_user_password(api.core, "dup", "first-password") is not None


@pytest_twisted.ensureDeferred
async def test_single_create_validation(api):
    group = await create_group(api, "g")
    base = {"group_uuid": group["uuid"], "user_name": "u", "passwd": "p"}
    for change, field in [
        ({"user_name": "has space"}, "param.user_name"),
        ({"user_name": ""}, "param.user_name"),
        ({"passwd": ""}, "param.passwd"),
        ({"passwd": "x" * 129}, "param.passwd"),
        ({"email": "not-mail"}, "param.email"),
        ({"phone": "call me"}, "param.phone"),
        ({"enabled": 2}, "param.enabled"),
        ({"enabled": "yes"}, "param.enabled"),
        ({"extra": 1}, "param.extra"),
    ]:
        status, body = await api.call("POST", USERS, {"action": "single_create", "param": {**base, **change}})
        failed(status, body, 400, 1002)
        assert body["data"][0]["field"] == field, (change, body)
    status, body = await api.call("POST", USERS, {"action": "single_create", "param": {**base, "group_uuid": "missing"}})
    failed(status, body, 404, 1012)
    status, body = await api.call("POST", USERS, {"action": "no_such_action", "param": {}})
    failed(status, body, 400, 1011)
    assert await all_users(api) == []


@pytest_twisted.ensureDeferred
async def test_multi_create_as_in_the_contract(api):
    group = await create_group(api, "g")
    param = {"group_uuid": group["uuid"], "prefix": "ctx", "postfix": 2, "postfix_start": 1, "user_num": 5,
             "passwd": "12345", "enabled": 1}
    result = ok(*await api.call("POST", USERS, {"action": "multi_create", "param": param}))
    assert (result["success_num"], result["failed_num"]) == (5, 0)
    users = await group_users(api, group["uuid"])
    assert [u["user_name"] for u in users] == ["ctx01", "ctx02", "ctx03", "ctx04", "ctx05"]
    assert all(u["enabled"] for u in users)
    # One hash for the whole batch, and it verifies for every user of the batch.
    hashes = {(await stored(api, u["user_name"]))["password_hash"] for u in users}
    assert len(hashes) == 1
    assert await verify_user_password(api.core, "ctx04", "12345") is not None


@pytest_twisted.ensureDeferred
async def test_multi_create_that_partly_collides(api):
    group = await create_group(api, "g")
    other = await create_group(api, "other")
    await create_user(api, other["uuid"], "ctx003", passwd="keep-this")
    ok(*await multi_create(api, group["uuid"], "ctx", 1, start=5))  # ctx005
    result = ok(*await multi_create(api, group["uuid"], "ctx", 6, start=1, enabled=False))
    assert (result["success_num"], result["failed_num"]) == (4, 2)
    assert sorted(f["user_name"] for f in result["failures"]) == ["ctx003", "ctx005"]
    assert {f["code"] for f in result["failures"]} == {1013}
    names = [u["user_name"] for u in await group_users(api, group["uuid"])]
    assert sorted(names) == ["ctx001", "ctx002", "ctx004", "ctx005", "ctx006"]
    # The colliding users were left as they were.
    ctx003 = await stored(api, "ctx003")
    assert ctx003["group"] == other["uuid"] and ctx003["enabled"] is True
    assert await verify_user_password(api.core, "ctx003", "keep-this") is not None


@pytest_twisted.ensureDeferred
async def test_multi_create_limits(tmp_path, clock):
    async with users_api(tmp_path, clock, {"users": {"max_batch": 50}}) as api:
        group = await create_group(api, "g")
        failed(*await multi_create(api, group["uuid"], "x", 20, postfix=1), 400, 7003)
        failed(*await multi_create(api, group["uuid"], "x", 51, postfix=3), 400, 7004)
        failed(*await multi_create(api, "missing", "x", 5), 404, 1012)
        status, body = await multi_create(api, group["uuid"], "x", 0)
        failed(status, body, 400, 1002)
        assert body["data"][0]["field"] == "param.user_num"
        assert await all_users(api) == []
        result = ok(*await multi_create(api, group["uuid"], "x", 50, postfix=2, start=50))
        assert result["success_num"] == 50
        assert {u["user_name"] for u in await all_users(api)} == {f"x{n}" for n in range(50, 100)}


@pytest_twisted.ensureDeferred
async def test_delete_users(api):
    group = await create_group(api, "g")
    ok(*await multi_create(api, group["uuid"], "ctx", 3, postfix=2))
    users = await group_users(api, group["uuid"])
    result = ok(*await api.call("DELETE", USERS, {"users": refs(users[:2])}))
    assert (result["success_num"], result["failed_num"]) == (2, 0)
    assert [u["user_name"] for u in await all_users(api)] == ["ctx03"]
    ghost = {"uuid": "no-such-user", "user_name": "ghost"}
    result = ok(*await api.call("DELETE", USERS, {"users": [*refs(users[2:]), ghost]}))
    assert (result["success_num"], result["failed_num"]) == (1, 1)
    assert result["failures"] == [{"uuid": "no-such-user", "user_name": "ghost", "code": 1012, "msg": result["failures"][0]["msg"]}]
    assert await all_users(api) == []
    failed(*await api.call("DELETE", USERS, {"users": [ghost]}), 404, 1012)
    failed(*await api.call("DELETE", USERS, {"users": []}), 400, 1018)


@pytest_twisted.ensureDeferred
async def test_update_renames_moves_and_changes_details(api):
    first = await create_group(api, "first")
    second = await create_group(api, "second")
    user = await create_user(api, first["uuid"], "ctx02", passwd="old-password", name="Old")
    body = {"uuid": user["uuid"], "user_name": "ctx02",
            "value": {"group_uuid": second["uuid"], "user_name": "test", "passwd": "123", "email": "t@example.com",
                      "enabled": 0}}
    updated = ok(*await api.call("PUT", USERS, body))
    assert (updated["user_name"], updated["group"], updated["email"], updated["name"], updated["enabled"]) == (
        "test", second["uuid"], "t@example.com", "Old", False)
    ok(*await api.call("POST", USERS, {"action": "enable", "param": {"users": refs([updated])}}))
    assert await verify_user_password(api.core, "test", "123") is not None
    assert await verify_user_password(api.core, "test", "old-password") is None
    assert await verify_user_password(api.core, "ctx02", "old-password") is None
    assert [u["user_name"] for u in await group_users(api, second["uuid"])] == ["test"]


@pytest_twisted.ensureDeferred
async def test_update_without_password_keeps_it(api):
    group = await create_group(api, "g")
    user = await create_user(api, group["uuid"], "keeper", passwd="secret-1")
    for value in ({"group_uuid": group["uuid"], "user_name": "keeper", "phone": "123"},
                  {"group_uuid": group["uuid"], "user_name": "keeper", "passwd": ""}):
        ok(*await api.call("PUT", USERS, {"uuid": user["uuid"], "user_name": "keeper", "value": value}))
    assert await verify_user_password(api.core, "keeper", "secret-1") is not None


@pytest_twisted.ensureDeferred
async def test_update_refusals(api):
    group = await create_group(api, "g")
    user = await create_user(api, group["uuid"], "a")
    await create_user(api, group["uuid"], "b")
    rename = {"uuid": user["uuid"], "user_name": "a", "value": {"group_uuid": group["uuid"], "user_name": "b"}}
    failed(*await api.call("PUT", USERS, rename), 409, 1013)
    move = {"uuid": user["uuid"], "user_name": "a", "value": {"group_uuid": "missing", "user_name": "a"}}
    failed(*await api.call("PUT", USERS, move), 404, 1012)
    ghost = {"uuid": "missing", "user_name": "x", "value": {"group_uuid": group["uuid"], "user_name": "x"}}
    failed(*await api.call("PUT", USERS, ghost), 404, 1012)
    status, body = await api.call("PUT", USERS, {"uuid": user["uuid"], "value": {"user_name": "c"}})
    failed(status, body, 400, 1002)
    assert sorted((u["user_name"], u["group"]) for u in await all_users(api)) == [("a", group["uuid"]), ("b", group["uuid"])]


@pytest_twisted.ensureDeferred
async def test_enable_and_disable(api):
    group = await create_group(api, "g")
    ok(*await multi_create(api, group["uuid"], "u", 3))
    users = await group_users(api, group["uuid"])
    result = ok(*await api.call("POST", USERS, {"action": "disable", "param": {"users": refs(users[:2])}}))
    assert (result["success_num"], result["failed_num"]) == (2, 0)
    assert [u["enabled"] for u in await group_users(api, group["uuid"])] == [False, False, True]
    assert await verify_user_password(api.core, "u001", "bulk-pw-1") is None  # disabled users never verify
    assert [u["user_name"] for u in await group_users(api, group["uuid"], enabled="false")] == ["u001", "u002"]
    ok(*await api.call("POST", USERS, {"action": "enable", "param": {"users": refs(users)}}))
    assert all(u["enabled"] for u in await group_users(api, group["uuid"]))
    assert await verify_user_password(api.core, "u001", "bulk-pw-1") is not None
    ghost = [{"uuid": "nope", "user_name": "nope"}]
    failed(*await api.call("POST", USERS, {"action": "enable", "param": {"users": ghost}}), 404, 1012)


@pytest_twisted.ensureDeferred
async def test_move_users(api):
    source = await create_group(api, "source")
    target = await create_group(api, "group2")
    ok(*await multi_create(api, source["uuid"], "ctx", 3, postfix=2))
    users = await group_users(api, source["uuid"])
    param = {"group_uuid": target["uuid"], "group_name": "group2", "users": refs(users[:2])}
    result = ok(*await api.call("POST", USERS, {"action": "move", "param": param}))
    assert (result["success_num"], result["failed_num"]) == (2, 0)
    assert [u["user_name"] for u in await group_users(api, target["uuid"])] == ["ctx01", "ctx02"]
    assert [u["user_name"] for u in await group_users(api, source["uuid"])] == ["ctx03"]


@pytest_twisted.ensureDeferred
async def test_moving_to_a_missing_group_moves_nobody(api):
    source = await create_group(api, "source")
    ok(*await multi_create(api, source["uuid"], "ctx", 2, postfix=2))
    users = await group_users(api, source["uuid"])
    param = {"group_uuid": "no-such-group", "group_name": "ghost", "users": refs(users)}
    failed(*await api.call("POST", USERS, {"action": "move", "param": param}), 404, 1012)
    assert len(await group_users(api, source["uuid"])) == 2


@pytest_twisted.ensureDeferred
async def test_move_reports_missing_users(api):
    source = await create_group(api, "source")
    target = await create_group(api, "target")
    user = await create_user(api, source["uuid"], "real")
    param = {"group_uuid": target["uuid"], "users": [*refs([user]), {"uuid": "gone", "user_name": "gone"}]}
    result = ok(*await api.call("POST", USERS, {"action": "move", "param": param}))
    assert (result["success_num"], result["failed_num"]) == (1, 1) and result["failures"][0]["user_name"] == "gone"
    assert [u["user_name"] for u in await group_users(api, target["uuid"])] == ["real"]


@pytest_twisted.ensureDeferred
async def test_user_query_paging_and_search(api):
    group = await create_group(api, "g")
    other = await create_group(api, "other")
    ok(*await multi_create(api, group["uuid"], "ctx", 5, postfix=2))
    await create_user(api, other["uuid"], "sss", name="Sam Smith", email="sam@example.com")
    page = ok(*await api.call("GET", USERS, params={"searchtype": "all", "group": group["uuid"], "page": 2, "page_size": 2}))
    assert page["count"] == 5 and [u["user_name"] for u in page["results"]] == ["ctx03", "ctx04"]
    assert "page=3" in page["next"] and "page=1" in page["previous"]
    everyone = ok(*await api.call("GET", USERS, params={"searchtype": "all", "page": 1, "page_size": 10}))
    assert everyone["count"] == 6
    contain = ok(*await api.call("GET", USERS, params={"searchtype": "contain", "name": "smith"}))
    assert [u["user_name"] for u in contain["results"]] == ["sss"]
    single = ok(*await api.call("GET", USERS, params={"searchtype": "single", "user_name": "ctx02"}))
    assert single["user_name"] == "ctx02" and single["group"] == group["uuid"] and "password_hash" not in single
    failed(*await api.call("GET", USERS, params={"searchtype": "single", "user_name": "nobody"}), 404, 1012)
    failed(*await api.call("GET", USERS, params={"passwd": "x"}), 400, 1003)
    failed(*await api.call("GET", USERS, params={"password_hash": "x"}), 400, 1003)


@pytest_twisted.ensureDeferred
async def test_user_endpoints_need_a_login(api):
    api.token = None
    for method, path, body in [("GET", USERS, None), ("POST", USERS, {"action": "enable", "param": {"users": []}}),
                               ("DELETE", USERS, {"users": []}), ("PUT", USERS, {}), ("GET", "/personal/group", None)]:
        failed(*await api.call(method, path, body), 401, 1008)


@pytest_twisted.ensureDeferred
async def test_verify_user_password(api):
    group = await create_group(api, "g")
    user = await create_user(api, group["uuid"], "alice", passwd="correct horse")
    found = await verify_user_password(api.core, "alice", "correct horse")
    assert found["uuid"] == user["uuid"] and "password_hash" not in found
    assert await verify_user_password(api.core, "alice", "wrong") is None
    assert await verify_user_password(api.core, "nobody", "correct horse") is None


@pytest_twisted.ensureDeferred
async def test_weak_hashes_are_upgraded_on_login(api):
    from argon2 import PasswordHasher

    group = await create_group(api, "g")
    await create_user(api, group["uuid"], "legacy", passwd="pw")
    weak = PasswordHasher(time_cost=1, memory_cost=8 * 1024, parallelism=1).hash("pw")
    await api.core.store.collection("users").update_one({"user_name": "legacy"}, {"$set": {"password_hash": weak}})
    assert await verify_user_password(api.core, "legacy", "pw") is not None
    upgraded = (await stored(api, "legacy"))["password_hash"]
    assert upgraded != weak and "m=19456" in upgraded
    assert await verify_user_password(api.core, "legacy", "pw") is not None


@pytest_twisted.ensureDeferred
async def test_operations_are_in_the_operation_log(api):
    group = await create_group(api, "g")
    ok(*await multi_create(api, group["uuid"], "ctx", 2, postfix=2))
    log = ok(*await api.call("GET", "/index/get_operation_log/", params={"page_size": 50}))["results"]
    contents = [entry["content"] for entry in log]
    assert any(c.startswith("批量新增用户") and "ctx01 .. ctx02" in c for c in contents), contents
    assert any(c.startswith("新增用户分组") for c in contents), contents


@pytest_twisted.ensureDeferred
async def test_openapi_documents_the_users_endpoints(api):
    status, document = await api.call("GET", "/openapi.json", auth=False)
    assert status == 200
    paths = document["paths"]
    assert set(paths["/api/v1.0/personal/group"]) == {"get", "post", "put", "delete"}
    assert set(paths["/api/v1.0/personal/user/"]) == {"get", "post", "put", "delete"}
    actions = {v["title"] for v in paths["/api/v1.0/personal/user/"]["post"]["requestBody"]["content"]["application/json"]["schema"]["oneOf"]}
    assert actions == {"single_create", "multi_create", "enable", "disable", "move", "export"}
    assert "multipart/form-data" in paths["/api/v1.0/personal/user/upload"]["post"]["requestBody"]["content"]
    assert paths["/api/v1.0/personal/user/download"]["get"]["security"] == []


@pytest_twisted.ensureDeferred
async def test_bulk_creation_writes_its_operation_log_entry_first_and_counts_progress(api):
    """Issue 14 defect 5: the entry exists (running) while the users are written, done at the end."""
    from kvmdesk.core import oplog

    group = await create_group(api, "bulk-oplog")
    seen = []
    users = api.core.store.collection("users")
    insert_many = users.insert_many

    async def watching_insert_many(records):
        seen.append(await api.core.store.collection(oplog.COLLECTION).find({"state": "running"}))
        return await insert_many(records)

    from unittest import mock

    with mock.patch.object(type(users), "insert_many", lambda self, records: watching_insert_many(records)):
        ok(*await multi_create(api, group["uuid"], "bulk", 2500, postfix=4))
    assert [[e["progress"] for e in entries] for entries in seen] == [
        [{"done": 0, "total": 2500}], [{"done": 1000, "total": 2500}], [{"done": 2000, "total": 2500}]]
    (entry,) = await api.core.store.collection(oplog.COLLECTION).find({"content": {"$regex": "^批量新增用户"}})
    assert entry["state"] == "done" and entry["progress"] == {"done": 2500, "total": 2500} and entry["code"] == 0
