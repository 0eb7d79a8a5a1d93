"""The desktop users' portal: login with the users plugin's passwords, user tokens kept apart from the
administrators', and the broker (static and random desktops, atomic claims, maintenance, release)."""
from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest_twisted
from twisted.internet import defer

from kvmdesk.core import console, errors
from kvmdesk.plugins.desktops import personal_codes as codes
from kvmdesk.plugins.desktops.broker import IdleReleaser
from kvmdesk.testing.personal import STATIC, seed_personal_group

from .conftest import EN, failed, ok, seed_node

PASSWORD = "desk-user-pw"
RANDOM_API = "/personal/desktop/random/"
GROUPS_API = "/personal/desktop/"


async def user_group(api: Any, name: str, users: int, prefix: str) -> tuple[dict, list[dict]]:
    """A user group with ``users`` numbered users (one password), made through the users plugin's API."""
    group = ok(*await api.call("POST", "/personal/group", {"name": name, "group_type": 2}))
    ok(*await api.call("POST", "/personal/user/", {"action": "multi_create", "param": {
        "group_uuid": group["uuid"], "prefix": prefix, "postfix": 3, "user_num": users, "passwd": PASSWORD}}))
    found = await api.core.store.collection("users").find({"group": group["uuid"]}, sort=[("user_name", 1)])
    return group, found


async def bind(api: Any, desktop_group: dict, *user_groups: dict) -> dict:
    return ok(*await api.call("POST", RANDOM_API, {"action": "add_group", "param": {
        "desktop_uuid": desktop_group["uuid"], "desktop_name": desktop_group["name"],
        "groups": [{"group_uuid": g["uuid"], "group_name": g["name"]} for g in user_groups]}}))


async def user_login(api: Any, user_name: str, password: str = PASSWORD) -> tuple[int, Any]:
    return await api.call("POST", "/portal/login", {"user_name": user_name, "password": password}, auth=False, headers=EN)


async def user_token(api: Any, user_name: str) -> str:
    return ok(*await user_login(api, user_name))["token"]


async def as_user(api: Any, token: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    return await api.call(method, path, body, auth=False, headers={"Authorization": f"Bearer {token}", **EN})


async def connect(api: Any, token: str, group: Any = None) -> tuple[int, Any]:
    return await as_user(api, token, "POST", "/portal/connect", {} if group is None else {"desktop_uuid": group})


async def online_node(api: Any) -> dict:
    return await seed_node(api.core, "n1", "10.0.0.1")


# -- login and tokens ------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_login_with_the_users_own_password_wrong_password_and_disabled_user(api):
    _, users = await user_group(api, "staff", 2, "st")
    answer = ok(*await user_login(api, users[0]["user_name"]))
    assert set(answer) == {"token", "expires_at", "user_name"} and answer["user_name"] == "st001"
    failed(*await user_login(api, "st001", "nope"), 401, errors.LOGIN_FAILED.code, "wrong user name or password")
    failed(*await user_login(api, "nobody"), 401, errors.LOGIN_FAILED.code)
    ok(*await api.call("POST", "/personal/user/", {"action": "disable", "param": {"users": [{"uuid": users[1]["uuid"]}]}}))
    failed(*await user_login(api, "st002"), 401, errors.LOGIN_FAILED.code)


@pytest_twisted.ensureDeferred
async def test_failed_logins_lock_the_user_out_like_administrators(api, clock):
    await user_group(api, "staff", 1, "st")
    for _ in range(5):
        failed(*await user_login(api, "st001", "wrong"), 401, errors.LOGIN_FAILED.code)
        clock.advance(1)
    body = failed(*await user_login(api, "st001"), 429, errors.LOGIN_THROTTLED.code)
    seconds = int(re.search(r"in (\d+) seconds", body["msg"]).group(1))
    clock.advance(seconds + 1)
    ok(*await user_login(api, "st001"))


@pytest_twisted.ensureDeferred
async def test_a_user_token_opens_no_administrator_endpoint(api):
    await user_group(api, "staff", 1, "st")
    token = await user_token(api, "st001")
    protected = [spec for spec in api.core.router.registry if spec.auth]
    assert len(protected) > 50
    for spec in protected:
        path = re.sub(r"\{[^}]+\}", "00000000-0000-4000-8000-000000000000", spec.path)
        status, body = await api.call(spec.method, path, {}, auth=False, headers={"Authorization": f"Bearer {token}"})
        assert status in (401, 403) and isinstance(body, dict) and set(body) == {"code", "msg", "data"}, (spec.path, status, body)
        assert body["code"] in (errors.UNAUTHENTICATED.code, errors.FORBIDDEN.code), (spec.path, body)
    # ...and the administrator's token opens no portal endpoint.
    for method, path in (("GET", "/portal/desktops"), ("POST", "/portal/connect"), ("POST", "/portal/logout")):
        failed(*await api.call(method, path, {}), 401, errors.UNAUTHENTICATED.code)
        failed(*await as_user(api, "not-a-token", method, path, {}), 401, errors.UNAUTHENTICATED.code)


@pytest_twisted.ensureDeferred
async def test_the_openapi_document_lists_the_portal(api):
    document = (await api.call("GET", "/openapi.json"))[1]
    paths = document["paths"]
    for path in ("/api/v1.0/portal/login", "/api/v1.0/portal/desktops", "/api/v1.0/portal/connect", "/api/v1.0/portal/logout"):
        assert path in paths or path.replace("/api/v1.0", "") in paths, sorted(p for p in paths if "portal" in p)


# -- the broker ------------------------------------------------------------------------------------


async def race(api, tokens: list[str]) -> tuple[dict[str, str], list[dict]]:
    """Every token asks at once: ``({token: desktop uuid} of the winners, refusals)``; nothing else answers."""
    answers = await defer.gatherResults([defer.ensureDeferred(connect(api, t)) for t in tokens])
    winners = {t: body["data"]["instance"]["uuid"] for t, (status, body) in zip(tokens, answers) if status == 200}
    refusals = [body for status, body in answers if status != 200]
    for body in refusals:
        assert body["code"] == codes.NONE_FREE.code and "no free desktop in desktop group rnd" in body["msg"], body
    return winners, refusals


async def holders(api, group: dict) -> dict[str, str]:
    """``{desktop uuid: holder}`` of the held desktops of ``group``, as stored."""
    found = await api.core.store.collection("desktops").find({"desktop_uuid": group["uuid"], "holder": {"$ne": None}})
    return {d["uuid"]: d["holder"] for d in found}


@pytest_twisted.ensureDeferred
async def test_fifty_users_race_for_ten_free_desktops(api):
    """Ten free desktops among others that no claim may take (held, off in error); the claims of the
    race are written in batches: still ten distinct winners, forty clear refusals, and what the answers
    say is what the store holds.  A second race of the losers after the winners log out: ten more."""
    node = await online_node(api)
    group, desktops = await seed_personal_group(api.core, "rnd", 14, node=node)
    broken = await seed_personal_group(api.core, "rnd-broken", 2, node=node, status="error")
    users_group, users = await user_group(api, "class", 50, "u")
    await bind(api, group, users_group)
    await bind(api, broken[0], users_group)
    tokens = [await user_token(api, u["user_name"]) for u in users]
    # four desktops are already held by a user of another group
    await api.core.store.collection("desktops").update_many(
        {"uuid": {"$in": [d["uuid"] for d in desktops[10:]]}}, {"$set": {"holder": "someone-else"}})
    uuid_of = {t: u["uuid"] for t, u in zip(tokens, users)}
    winners, refusals = await race(api, tokens)
    assert len(winners) == 10 and len(set(winners.values())) == 10 and len(refusals) == 40
    assert set(winners.values()) == {d["uuid"] for d in desktops[:10]}
    assert {d: h for d, h in (await holders(api, group)).items() if h != "someone-else"} == {
        d: uuid_of[t] for t, d in winners.items()}
    # a winner asking again (twice at once) gets the same desktop; nobody got two
    again = await defer.gatherResults([defer.ensureDeferred(connect(api, t)) for t in list(winners)[:3] * 2])
    assert [body["data"]["instance"]["uuid"] for _, body in again] == [winners[t] for t in list(winners)[:3]] * 2
    for token in winners:
        ok(*await as_user(api, token, "POST", "/portal/logout", {}))
    losers = [t for t in tokens if t not in winners]
    second, refusals = await race(api, losers)
    assert len(second) == 10 and set(second.values()) == set(winners.values()) and len(refusals) == 30
    assert sorted((await holders(api, group)).values()) == sorted([uuid_of[t] for t in second] + ["someone-else"] * 4)


@pytest_twisted.ensureDeferred
async def test_a_random_desktop_is_held_until_logout_or_idle_timeout(api, clock):
    node = await online_node(api)
    group, _ = await seed_personal_group(api.core, "rnd", 1, node=node)
    users_group, _ = await user_group(api, "class", 2, "u")
    await bind(api, group, users_group)
    first, second = await user_token(api, "u001"), await user_token(api, "u002")
    mine = ok(*await connect(api, first))
    assert mine["instance"]["name"] == "rnd001" and mine["websockify_url"].startswith("ws://kvmdesk.test/")
    # The console token is bound to this desktop (its node and domain) and to this user.
    token = parse_qs(urlparse(mine["websockify_url"]).query)["token"][0]
    user = await api.core.store.collection("users").find_one({"user_name": "u001"})
    grant = await console.check(api.core, token, node_uuid=node["uuid"], domain_uuid=mine["instance"]["uuid"],
                                holder_kind="user", holder_id=user["uuid"], consume=False)
    assert grant is not None
    assert ok(*await connect(api, first))["instance"]["uuid"] == mine["instance"]["uuid"]  # the same one again
    failed(*await connect(api, second), 409, codes.NONE_FREE.code)
    listed = ok(*await as_user(api, first, "GET", "/portal/desktops"))
    assert listed["random"][0]["held"]["uuid"] == mine["instance"]["uuid"] and listed["random"][0]["free"] == 0
    assert ok(*await as_user(api, first, "POST", "/portal/logout", {})) == {"released": 1}
    failed(*await connect(api, first), 401, errors.UNAUTHENTICATED.code)  # the token is gone
    theirs = ok(*await connect(api, second))
    assert theirs["instance"]["uuid"] == mine["instance"]["uuid"]
    # Idle: past [desktops.portal] idle_timeout without a request, the sweep ends the session and frees it.
    clock.advance(1801)
    assert await IdleReleaser(api.core).sweep() == 1
    failed(*await connect(api, second), 401, errors.UNAUTHENTICATED.code)
    assert (await api.core.store.collection("desktops").find_one({"desktop_uuid": group["uuid"]}))["holder"] is None


@pytest_twisted.ensureDeferred
async def test_a_session_in_use_is_not_idle(api, clock):
    node = await online_node(api)
    group, _ = await seed_personal_group(api.core, "rnd", 1, node=node)
    users_group, _ = await user_group(api, "class", 1, "u")
    await bind(api, group, users_group)
    token = await user_token(api, "u001")
    ok(*await connect(api, token))
    for _ in range(4):
        clock.advance(600)
        ok(*await as_user(api, token, "GET", "/portal/desktops"))
    assert await IdleReleaser(api.core).sweep() == 0
    ok(*await as_user(api, token, "GET", "/portal/desktops"))


@pytest_twisted.ensureDeferred
async def test_maintenance_refuses_users_but_not_administrators(api):
    node = await online_node(api)
    group, _ = await seed_personal_group(api.core, "rnd", 2, node=node)
    users_group, _ = await user_group(api, "class", 1, "u")
    await bind(api, group, users_group)
    token = await user_token(api, "u001")
    batch = {"desktops": [{"uuid": group["uuid"], "name": group["name"]}]}
    ok(*await api.call("POST", GROUPS_API, {"action": "enter_maintenance", "param": batch}))
    failed(*await connect(api, token), 409, codes.IN_MAINTENANCE.code, "rnd", "under maintenance")
    shown = ok(*await api.call("GET", GROUPS_API, params={"uuid": group["uuid"]}))["results"][0]
    assert shown["maintenance"] is True and shown["instance_num"] == 2 and shown["group_count"] == 1
    ok(*await api.call("POST", GROUPS_API, {"action": "exit_maintenance", "param": batch}))
    assert ok(*await connect(api, token))["instance"]["desktop_uuid"] == group["uuid"]
    body = failed(*await api.call("POST", GROUPS_API, {"action": "enter_maintenance", "param": {
        "desktops": [{"uuid": "missing", "name": "ghost"}]}}, headers=EN), 404, errors.NOT_FOUND.code, "ghost")
    assert "personal desktop group" in body["msg"]


@pytest_twisted.ensureDeferred
async def test_a_static_user_gets_their_bound_desktop(api):
    node = await online_node(api)
    _, users = await user_group(api, "staff", 2, "st")
    group, desktops = await seed_personal_group(api.core, "own", 2, desktop_type=STATIC, node=node, users=users)
    for user, desktop in zip(users, desktops):
        token = await user_token(api, user["user_name"])
        assert ok(*await connect(api, token))["instance"]["uuid"] == desktop["uuid"]
        listed = ok(*await as_user(api, token, "GET", "/portal/desktops"))
        assert [d["instance"]["uuid"] for d in listed["static"]] == [desktop["uuid"]] and listed["random"] == []
        assert listed["static"][0]["desktop_name"] == "own"


@pytest_twisted.ensureDeferred
async def test_users_without_a_group_or_asking_for_another_groups_desktop(api):
    node = await online_node(api)
    group, _ = await seed_personal_group(api.core, "rnd", 1, node=node)
    other, _ = await seed_personal_group(api.core, "other", 1, node=node)
    users_group, _ = await user_group(api, "class", 1, "u")
    await user_group(api, "lonely", 1, "l")
    await bind(api, group, users_group)
    failed(*await connect(api, await user_token(api, "l001")), 404, codes.NO_DESKTOP_GROUP.code, "l001")
    token = await user_token(api, "u001")
    failed(*await connect(api, token, other["uuid"]), 403, codes.GROUP_NOT_BOUND.code, "desktop_uuid")
    failed(*await connect(api, token, 5), 400, errors.INVALID_PARAM.code, "desktop_uuid")
    assert ok(*await connect(api, token, group["uuid"]))["instance"]["desktop_uuid"] == group["uuid"]


@pytest_twisted.ensureDeferred
async def test_a_desktop_that_cannot_start_is_released_with_a_clear_error(api):
    """An off desktop is started through the teaching power module (here its node is offline)."""
    node = await seed_node(api.core, "n1", "10.0.0.1", state="offline")
    group, desktops = await seed_personal_group(api.core, "rnd", 1, node=node, status="inactive")
    users_group, _ = await user_group(api, "class", 1, "u")
    await bind(api, group, users_group)
    body = failed(*await connect(api, await user_token(api, "u001")), 502, codes.DESKTOP_START_FAILED.code,
                  "rnd001", "released", "offline")
    assert body["data"]["code"] == 6048
    stored = await api.core.store.collection("desktops").find_one({"uuid": desktops[0]["uuid"]})
    assert stored["holder"] is None and stored["holder_session"] is None


# -- random bindings (#122-#124) --------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_random_bindings_add_query_remove(api):
    group, _ = await seed_personal_group(api.core, "rnd", 1)
    first, users = await user_group(api, "g1", 3, "a")
    second, _ = await user_group(api, "g2", 1, "b")
    ok(*await api.call("POST", "/personal/user/", {"action": "disable", "param": {"users": [{"uuid": users[0]["uuid"]}]}}))
    assert await bind(api, group, first, second) == {"success_num": 2, "failed_num": 0, "failures": []}
    third, _ = await user_group(api, "g3", 1, "c")
    again = await bind(api, group, first, third)
    assert again == {"success_num": 1, "failed_num": 1, "failures": [
        {"uuid": first["uuid"], "name": "g1", "code": codes.ALREADY_BOUND.code, "msg": again["failures"][0]["msg"]}]}
    alone = {"action": "add_group", "param": {"desktop_uuid": group["uuid"], "groups": [{"group_uuid": first["uuid"]}]}}
    failed(*await api.call("POST", RANDOM_API, alone, headers=EN), 409, codes.ALREADY_BOUND.code, "g1", "already bound")
    ok(*await api.call("POST", RANDOM_API, {"action": "delete_group", "param": {"desktop_uuid": group["uuid"], "groups": [
        {"uuid": b["uuid"]} for b in await api.core.store.collection("random_bindings").find({"group_uuid": third["uuid"]})]}}))
    page = ok(*await api.call("GET", RANDOM_API, params={"desktop": group["uuid"], "page": 1, "page_size": 10}))
    assert page["count"] == 2
    rows = {r["group_name"]: r for r in page["results"]}
    assert set(rows["g1"]) == {"uuid", "group_uuid", "group_name", "user_num", "disable_num"}
    assert (rows["g1"]["user_num"], rows["g1"]["disable_num"], rows["g2"]["user_num"]) == (3, 1, 1)
    removed = ok(*await api.call("POST", RANDOM_API, {"action": "delete_group", "param": {
        "desktop_uuid": group["uuid"], "desktop_name": "rnd",
        "groups": [{"uuid": rows["g1"]["uuid"], "group_name": "g1"}, {"uuid": "gone", "group_name": "g9"}]}}))
    assert (removed["success_num"], removed["failed_num"], removed["failures"][0]["code"]) == (1, 1, codes.NOT_BOUND.code)
    assert ok(*await api.call("GET", RANDOM_API, params={"desktop": group["uuid"]}))["count"] == 1


@pytest_twisted.ensureDeferred
async def test_random_binding_bad_input(api):
    static, _ = await seed_personal_group(api.core, "own", 1, desktop_type=STATIC)
    group, _ = await seed_personal_group(api.core, "rnd", 1)
    users_group, _ = await user_group(api, "g1", 1, "a")
    call = {"action": "add_group", "param": {"desktop_uuid": static["uuid"], "groups": [{"group_uuid": users_group["uuid"]}]}}
    failed(*await api.call("POST", RANDOM_API, call, headers=EN), 400, codes.NOT_RANDOM.code, "desktop_uuid", "own")
    call["param"]["desktop_uuid"] = "missing"
    failed(*await api.call("POST", RANDOM_API, call), 404, errors.NOT_FOUND.code)
    call["param"].update(desktop_uuid=group["uuid"], groups=[{"group_uuid": "no-such-group"}])
    failed(*await api.call("POST", RANDOM_API, call), 404, errors.NOT_FOUND.code)
    call["param"]["groups"] = []
    failed(*await api.call("POST", RANDOM_API, call), 400, errors.INVALID_PARAM.code, "param.groups")
    assert ok(*await api.call("GET", RANDOM_API, params={"desktop": static["uuid"]}))["count"] == 0
    failed(*await api.call("GET", RANDOM_API, params={"group": "x"}), 400, errors.UNKNOWN_FILTER.code, "group")
    assert await api.core.store.collection("random_bindings").count({}) == 0


@pytest_twisted.ensureDeferred
async def test_a_released_restore_desktop_is_restored_before_anyone_gets_it(api):
    """Logout frees a running restore desktop through the power module's reboot (fresh overlays); here
    its node is offline, so the restore fails and the desktop stays out of reach (``error``)."""
    node = await seed_node(api.core, "n1", "10.0.0.1", state="offline")
    group, (desktop,) = await seed_personal_group(api.core, "rst", 1, node=node, sys_restore=1)
    users_group, _ = await user_group(api, "class", 2, "u")
    await bind(api, group, users_group)
    first = await user_token(api, "u001")
    ok(*await connect(api, first))
    assert ok(*await as_user(api, first, "POST", "/portal/logout", {})) == {"released": 1}
    await api.core.extensions["desktops.broker"].settled()
    stored = await api.core.store.collection("desktops").find_one({"uuid": desktop["uuid"]})
    assert (stored["holder"], stored["status"]) == (None, "error") and "offline" in stored["message"]
    failed(*await connect(api, await user_token(api, "u002")), 409, codes.NONE_FREE.code)
