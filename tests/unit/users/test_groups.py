"""User groups: create, edit, delete, query (contract #99-#102) and the name rule shared with teaching groups."""
from __future__ import annotations

import pytest_twisted

from kvmdesk.core import group_names

from .conftest import GROUPS, USERS, create_group, create_user, failed, multi_create, ok, refs, users_api


@pytest_twisted.ensureDeferred
async def test_create_group_as_in_the_contract(api):
    status, body = await api.call("POST", GROUPS, {"name": "group2", "group_type": 2, "desc": "this is group2"})
    group = ok(status, body)
    assert group["name"] == "group2" and group["desc"] == "this is group2" and group["group_type"] == 2
    assert (group["user_num"], group["enable_num"], group["disable_num"], group["users"]) == (0, 0, 0, [])
    listed = ok(*await api.call("GET", GROUPS, params={"searchtype": "all", "group_type": 2, "page": 1, "page_size": 10}))
    assert [g["uuid"] for g in listed["results"]] == [group["uuid"]]


@pytest_twisted.ensureDeferred
async def test_create_group_refuses_bad_bodies(api):
    for body, field in [
        ({"name": "g", "group_type": 1}, "group_type"),
        ({"name": "", "group_type": 2}, "name"),
        ({"group_type": 2}, "name"),
        ({"name": "g", "group_type": 2, "colour": "red"}, "colour"),
    ]:
        status, answer = await api.call("POST", GROUPS, body)
        failed(status, answer, 400, 1002)
        assert answer["data"][0]["field"] == field
    assert ok(*await api.call("GET", GROUPS))["count"] == 0


@pytest_twisted.ensureDeferred
async def test_duplicate_group_name_is_a_conflict(api):
    await create_group(api, "group1")
    status, body = await api.call("POST", GROUPS, {"name": "group1", "group_type": 2})
    failed(status, body, 409, 7002)
    assert ok(*await api.call("GET", GROUPS))["count"] == 1


@pytest_twisted.ensureDeferred
async def test_group_names_are_shared_with_teaching_groups(api):
    store = api.core.store
    await group_names.claim(store, "class-a", "teaching_group", "teaching-uuid-1")
    status, body = await api.call("POST", GROUPS, {"name": "class-a", "group_type": 2}, headers={"Accept-Language": "en"})
    failed(status, body, 409, 7002)
    assert "teaching group" in body["msg"]
    # ...and the other way round: a teaching group cannot take a user group's name.
    await create_group(api, "staff")
    try:
        await group_names.claim(store, "staff", "teaching_group", "teaching-uuid-2")
    except group_names.NameTaken as exc:
        assert exc.kind == "user_group"
    else:
        raise AssertionError("a teaching group took a user group's name")


@pytest_twisted.ensureDeferred
async def test_edit_group_renames_and_frees_the_old_name(api):
    group = await create_group(api, "group1", "old")
    edit = {"uuid": group["uuid"], "name": "group1", "value": {"name": "group2", "desc": "this is group2"}}
    edited = ok(*await api.call("PUT", GROUPS, edit))
    assert (edited["name"], edited["desc"]) == ("group2", "this is group2")
    again = await create_group(api, "group1")
    assert again["uuid"] != group["uuid"]
    claim = await group_names.holder(api.core.store, "group2")
    assert claim["owner"] == group["uuid"]


@pytest_twisted.ensureDeferred
async def test_edit_group_keeps_desc_when_absent_and_refuses_taken_names(api):
    first = await create_group(api, "first", "keep me")
    await create_group(api, "second")
    same = ok(*await api.call("PUT", GROUPS, {"uuid": first["uuid"], "name": "first", "value": {"name": "first"}}))
    assert same["desc"] == "keep me"
    status, body = await api.call("PUT", GROUPS, {"uuid": first["uuid"], "name": "first", "value": {"name": "second"}})
    failed(status, body, 409, 7002)
    status, body = await api.call("PUT", GROUPS, {"uuid": "no-such-group", "name": "x", "value": {"name": "y"}})
    failed(status, body, 404, 1012)
    names = sorted(g["name"] for g in ok(*await api.call("GET", GROUPS))["results"])
    assert names == ["first", "second"]
    # The failed rename left no claim on a name nobody uses.
    assert await group_names.holder(api.core.store, "y") is None


@pytest_twisted.ensureDeferred
async def test_delete_groups_in_a_batch(api):
    one = await create_group(api, "group4")
    two = await create_group(api, "group2")
    body = {"groups": [{"uuid": one["uuid"], "name": "group4"}, {"uuid": two["uuid"], "name": "group2"}]}
    result = ok(*await api.call("DELETE", GROUPS + "/", body))
    assert (result["success_num"], result["failed_num"]) == (2, 0)
    assert ok(*await api.call("GET", GROUPS))["count"] == 0
    # The names are free again.
    await create_group(api, "group4")


@pytest_twisted.ensureDeferred
async def test_deleting_a_group_with_users_is_refused(api):
    group = await create_group(api, "busy")
    await create_user(api, group["uuid"], "someone")
    status, body = await api.call("DELETE", GROUPS + "/", {"groups": [{"uuid": group["uuid"], "name": "busy"}]})
    failed(status, body, 409, 7001)
    listed = ok(*await api.call("GET", GROUPS))["results"]
    assert [(g["name"], g["user_num"]) for g in listed] == [("busy", 1)]


@pytest_twisted.ensureDeferred
async def test_batch_delete_reports_each_group(api):
    busy = await create_group(api, "busy")
    empty = await create_group(api, "empty")
    await create_user(api, busy["uuid"], "someone")
    body = {"groups": [{"uuid": busy["uuid"], "name": "busy"}, {"uuid": empty["uuid"], "name": "empty"},
                       {"uuid": "missing-uuid", "name": "ghost"}]}
    result = ok(*await api.call("DELETE", GROUPS + "/", body))
    assert (result["success_num"], result["failed_num"]) == (1, 2)
    assert sorted((f["name"], f["code"]) for f in result["failures"]) == [("busy", 7001), ("ghost", 1012)]
    assert [g["name"] for g in ok(*await api.call("GET", GROUPS))["results"]] == ["busy"]


@pytest_twisted.ensureDeferred
async def test_delete_single_missing_group_is_404(api):
    status, body = await api.call("DELETE", GROUPS, {"groups": [{"uuid": "nope", "name": "nope"}]})
    failed(status, body, 404, 1012)


@pytest_twisted.ensureDeferred
async def test_group_query_counts_and_lists_users(api):
    group = await create_group(api, "group1", "this is group3")
    other = await create_group(api, "other")
    ok(*await multi_create(api, group["uuid"], "ctt", 5, postfix=2))
    members = ok(*await api.call("GET", USERS, params={"group": group["uuid"]}))["results"]
    ok(*await api.call("POST", USERS, {"action": "disable", "param": {"users": refs(members[2:3])}}))
    listed = ok(*await api.call("GET", GROUPS, params={"searchtype": "all", "group_type": 2}))
    assert listed["count"] == 2
    first = listed["results"][0]
    assert (first["name"], first["user_num"], first["enable_num"], first["disable_num"]) == ("group1", 5, 4, 1)
    assert first["name_with_num"] == "group1(5)"
    assert [u["user_name"] for u in first["users"]] == ["ctt01", "ctt02", "ctt03", "ctt04", "ctt05"]
    assert [u["enabled"] for u in first["users"]] == [True, True, False, True, True]
    assert all(u["group"] == group["uuid"] and "passwd" not in u and "password_hash" not in u for u in first["users"])
    assert listed["results"][1]["uuid"] == other["uuid"] and listed["results"][1]["user_num"] == 0


@pytest_twisted.ensureDeferred
async def test_group_generic_search(api):
    for name in ("alpha", "beta", "alphabet"):
        await create_group(api, name)
    contain = ok(*await api.call("GET", GROUPS, params={"searchtype": "contain", "name": "alpha"}))
    assert sorted(g["name"] for g in contain["results"]) == ["alpha", "alphabet"]
    single = ok(*await api.call("GET", GROUPS, params={"searchtype": "single", "name": "beta"}))
    assert single["name"] == "beta" and single["user_num"] == 0
    teaching = ok(*await api.call("GET", GROUPS, params={"group_type": 1}))
    assert teaching["count"] == 0
    paged = ok(*await api.call("GET", GROUPS, params={"page": 2, "page_size": 2}))
    assert paged["count"] == 3 and [g["name"] for g in paged["results"]] == ["alphabet"]
    assert paged["next"] is None and "page=1" in paged["previous"]
    status, body = await api.call("GET", GROUPS, params={"colour": "red"})
    failed(status, body, 400, 1003)


@pytest_twisted.ensureDeferred
async def test_large_groups_list_a_bounded_number_of_users(tmp_path, clock):
    async with users_api(tmp_path, clock, {"users": {"group_users_limit": 3}}) as api:
        group = await create_group(api, "large")
        ok(*await multi_create(api, group["uuid"], "u", 5))
        listed = ok(*await api.call("GET", GROUPS))["results"][0]
        assert listed["user_num"] == 5 and len(listed["users"]) == 3 and listed["users_truncated"] is True


@pytest_twisted.ensureDeferred
async def test_start_up_repairs_group_name_claims(api):
    group = await create_group(api, "kept")
    store = api.core.store
    # A crash between the steps of a create or delete can leave a stale claim or miss one.
    await group_names.claim(store, "orphan", "user_group", "deleted-group-uuid")
    await store.collection("group_names").delete_many({"name": "kept"})
    from kvmdesk.plugins.users.plugin import startup

    await startup(api.core)
    assert await group_names.holder(store, "orphan") is None
    assert (await group_names.holder(store, "kept"))["owner"] == group["uuid"]
