"""Login, tokens (hashed, expiring), logout, throttling, the first administrator."""
from __future__ import annotations

import os
import re
import stat

import orjson
import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from core_testlib import POOLS, assert_error, load_example_plugin, plugins_with, raw_call, running_api
from kvmdesk.api.app import make_router
from kvmdesk.core import auth, errors
from kvmdesk.core.app import build_core
from kvmdesk.core.config import Config
from kvmdesk.testing.api import ADMIN_PASSWORD, ApiClient

TTL = 43200
LOCKOUT = 300


async def _login(api: ApiClient, username: str = "admin", password: str = ADMIN_PASSWORD):
    return await api.call("POST", "/auth/login", {"username": username, "password": password}, auth=False)


@pytest_twisted.ensureDeferred
async def test_login_returns_a_token_and_never_a_password(api):
    status, body = await _login(api)
    assert (status, body["code"]) == (200, 0)
    data = body["data"]
    assert set(data) == {"token", "expires_at", "username"}
    assert data["username"] == "admin" and data["expires_at"] == api.core.clock.seconds() + TTL
    assert len(data["token"]) >= 40
    text = orjson.dumps(body).decode()
    assert ADMIN_PASSWORD not in text and "password" not in text and "argon2" not in text


@pytest_twisted.ensureDeferred
async def test_passwords_and_tokens_are_stored_hashed(api):
    admin = await api.core.store.collection(auth.ADMINS).find_one({"username": "admin"})
    assert admin["password_hash"].startswith("$argon2id$") and ADMIN_PASSWORD not in orjson.dumps(admin).decode()
    tokens = await api.core.store.collection(auth.TOKENS).find({})
    assert tokens and api.token not in orjson.dumps(tokens).decode()


@pytest.mark.parametrize("username, password", [("admin", "wrong"), ("nobody", ADMIN_PASSWORD), ("admin", ADMIN_PASSWORD + " ")])
@pytest_twisted.ensureDeferred
async def test_login_failure(api, username, password):
    status, body = await _login(api, username, password)
    assert_error(status, body, 401, errors.LOGIN_FAILED.code)
    assert body["data"] is None and body["msg"] == "用户名或密码错误"


@pytest.mark.parametrize("body", [{"username": "admin"}, {"password": "x"}, {"username": "", "password": "x"},
                                  {"username": "admin", "password": 1}])
@pytest_twisted.ensureDeferred
async def test_login_body_is_validated(api, body):
    status, envelope = await api.call("POST", "/auth/login", body, auth=False)
    assert_error(status, envelope, 400, errors.INVALID_PARAM.code)


def _concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "00000000-0000-4000-8000-000000000000", path)


@pytest_twisted.ensureDeferred
async def test_every_endpoint_but_login_and_openapi_needs_a_token(tmp_path, clock):
    async with running_api(tmp_path, clock, plugins=plugins_with((load_example_plugin(), "example"))) as api:
        registry = api.core.router.registry
        public = {(spec.method, spec.path) for spec in registry if not spec.auth}
        assert {("POST", "/auth/login"), ("GET", "/openapi.json")} <= public
        # Other plugins may open endpoints that authenticate otherwise (signed agent events, one-time
        # download links); the core's own, the pools' and the example plugin's are never among them.
        for method, path in public - {("POST", "/auth/login"), ("GET", "/openapi.json")}:
            assert not path.startswith(("/auth", "/index", "/resource_mgr/resource_pools", "/example")), path
        protected = [spec for spec in registry if spec.auth]
        assert len(protected) >= 7
        bad_headers = [
            {},
            {"Authorization": "Bearer not-a-token"},
            {"Authorization": "Bearer "},
            {"Authorization": "Basic YWRtaW46eA=="},
            {"Authorization": api.token},  # the token without its scheme
        ]
        for spec in protected:
            for path in {_concrete(spec.path), _concrete(spec.path).rstrip("/") + "/"}:
                for headers in bad_headers:
                    status, body, _ = await raw_call(api, spec.method, path, b"{}", headers=headers, auth=False)
                    answer = (spec.method, path, headers, status, body)
                    assert status == 401 and body["code"] == errors.UNAUTHENTICATED.code, answer


@pytest_twisted.ensureDeferred
async def test_bearer_scheme_is_case_insensitive(api):
    status, body, _ = await raw_call(api, "GET", POOLS, headers={"Authorization": f"bearer {api.token}"}, auth=False)
    assert (status, body["code"]) == (200, 0)


@pytest_twisted.ensureDeferred
async def test_token_expires(api, clock):
    clock.advance(TTL - 1)
    status, _ = await api.call("GET", POOLS)
    assert status == 200
    clock.advance(1)
    status, body = await api.call("GET", POOLS)
    assert_error(status, body, 401, errors.UNAUTHENTICATED.code)
    await api.login()
    status, _ = await api.call("GET", POOLS)
    assert status == 200


@pytest_twisted.ensureDeferred
async def test_expired_tokens_are_purged_at_the_next_login(api, clock):
    clock.advance(TTL + 1)
    await api.login()
    assert await api.core.store.collection(auth.TOKENS).count() == 1


@pytest_twisted.ensureDeferred
async def test_logout_revokes_the_token_at_once(api):
    old = api.token
    other = ApiClient(api.core)
    await other.login()
    status, _ = await api.call("GET", POOLS)  # the token is now in the memory cache too
    assert status == 200
    status, body = await api.call("POST", "/auth/logout")
    assert (status, body["code"]) == (200, 0)
    status, body = await api.call("GET", POOLS)
    assert_error(status, body, 401, errors.UNAUTHENTICATED.code)
    status, body = await api.call("POST", "/auth/logout")
    assert_error(status, body, 401, errors.UNAUTHENTICATED.code)
    assert api.token == old
    status, _ = await other.call("GET", POOLS)  # other sessions are untouched
    assert status == 200


@pytest_twisted.ensureDeferred
async def test_disabled_administrator_loses_access(api, clock):
    await api.core.store.collection(auth.ADMINS).update_one({"username": "admin"}, {"$set": {"enabled": False}})
    clock.advance(auth.CACHE_SECONDS)  # the token cache trusts a verified token this long
    status, body = await api.call("GET", POOLS)
    assert_error(status, body, 401, errors.UNAUTHENTICATED.code)
    status, body = await _login(api)
    assert_error(status, body, 401, errors.LOGIN_FAILED.code)


@pytest_twisted.ensureDeferred
async def test_repeated_failures_are_throttled_then_lifted(api, clock):
    for _ in range(5):
        status, body = await _login(api, password="wrong")
        assert status == 401
        clock.advance(10)
    # Locked out now, even with the right password.
    status, body = await api.call("POST", "/auth/login", {"username": "admin", "password": ADMIN_PASSWORD},
                                  auth=False, headers={"Accept-Language": "en"})
    assert_error(status, body, 429, errors.LOGIN_THROTTLED.code)
    seconds = int(re.search(r"in (\d+) seconds", body["msg"]).group(1))
    assert 0 < seconds <= LOCKOUT
    # Another user name is not locked out by admin's failures.
    status, body = await _login(api, "someone-else", "x")
    assert_error(status, body, 401, errors.LOGIN_FAILED.code)
    clock.advance(LOCKOUT - 11)
    status, body = await _login(api)
    assert_error(status, body, 429, errors.LOGIN_THROTTLED.code)
    clock.advance(2)
    status, body = await _login(api)
    assert (status, body["code"]) == (200, 0)


@pytest_twisted.ensureDeferred
async def test_success_resets_the_failure_count(api, clock):
    for _ in range(4):
        assert (await _login(api, password="wrong"))[0] == 401
    assert (await _login(api))[0] == 200
    for _ in range(4):
        assert (await _login(api, password="wrong"))[0] == 401
    status, body = await _login(api)
    assert (status, body["code"]) == (200, 0)


@pytest_twisted.ensureDeferred
async def test_failures_spread_over_time_are_forgiven(api, clock):
    for _ in range(10):
        assert (await _login(api, password="wrong"))[0] == 401
        clock.advance(LOCKOUT + 1)
    assert (await _login(api))[0] == 200


async def _start(data_dir, clock):
    config = Config([{"controller": {"data_dir": str(data_dir)}}])
    return await build_core(config, reactor, clock=clock, make_router=make_router)


@pytest_twisted.ensureDeferred
async def test_first_admin_gets_a_random_password_in_a_private_file(tmp_path, clock, monkeypatch):
    monkeypatch.delenv("KVMDESK_ADMIN_PASSWORD", raising=False)
    data_dir = tmp_path / "data"
    core = await _start(data_dir, clock)
    try:
        path = data_dir / auth.PASSWORD_FILE
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        password = path.read_text().strip()
        assert len(password) >= 12 and password != ADMIN_PASSWORD
        client = ApiClient(core)
        await client.login(password=password)
        status, _ = await client.call("GET", POOLS)
        assert status == 200
    finally:
        await core.store.close()
    # A second start keeps the administrator and does not write a new password.
    path.write_text("tampered\n")
    core = await _start(data_dir, clock)
    try:
        assert path.read_text() == "tampered\n"
        await ApiClient(core).login(password=password)
    finally:
        await core.store.close()


@pytest_twisted.ensureDeferred
async def test_first_admin_password_from_the_environment(tmp_path, clock, monkeypatch):
    monkeypatch.setenv("KVMDESK_ADMIN_PASSWORD", "from-the-env")
    core = await _start(tmp_path / "data", clock)
    try:
        assert not (tmp_path / "data" / auth.PASSWORD_FILE).exists()
        await ApiClient(core).login(password="from-the-env")
    finally:
        await core.store.close()


@pytest_twisted.ensureDeferred
async def test_concurrent_logins_all_succeed(api):
    results = await defer.gatherResults([defer.ensureDeferred(_login(api)) for _ in range(4)])
    tokens = {body["data"]["token"] for status, body in results if status == 200}
    assert len(tokens) == 4


def test_lockout_runs_from_the_failure_that_triggered_it(clock):
    throttle = auth.Throttle(clock, max_failures=3, window=100, lockout=50)
    key = ("admin", "10.0.0.1")
    for _ in range(3):
        throttle.check(key)
        throttle.failed(key)
        clock.advance(40)  # failures at 0, 40, 80: the third locks until 130
    assert clock.seconds() == 120
    with pytest.raises(errors.ApiError) as raised:
        throttle.check(key)  # the first failure is 120 s old: still locked
    assert raised.value.params == {"seconds": 10}
    clock.advance(10)
    throttle.check(key)
    throttle.failed(key)  # one fresh failure does not lock again
    throttle.check(key)
    throttle.failed(key)
    throttle.failed(key)  # a third one does, for the full lockout
    with pytest.raises(errors.ApiError) as raised:
        throttle.check(key)
    assert raised.value.params == {"seconds": 50}


def test_failures_outside_the_window_do_not_count(clock):
    throttle = auth.Throttle(clock, max_failures=3, window=100, lockout=50)
    key = ("admin", "10.0.0.1")
    locked = []
    for _ in range(6):
        throttle.failed(key)
        clock.advance(51)  # never three within 100 s
        try:
            throttle.check(key)
            locked.append(False)
        except errors.ApiError:
            locked.append(True)
    assert locked == [False] * 6


class RefusedLogins:
    """A plugin that records ``kvmdesk_login_refused`` (what the monitoring plugin raises alarms from)."""

    def __init__(self):
        self.calls = []

    from kvmdesk import hookimpl

    @hookimpl
    def kvmdesk_login_refused(self, core, username, address, reason):
        self.calls.append((username, address, reason))


@pytest_twisted.ensureDeferred
async def test_refused_logins_and_lockouts_are_logged_counted_and_hooked(api):
    """Issue 14 defect 8: refusals and lockouts reached neither the log nor a metric."""
    from twisted.logger import formatEvent, globalLogPublisher

    seen = RefusedLogins()
    api.core.plugins.register(seen, name="seen-refusals")
    events: list = []
    globalLogPublisher.addObserver(events.append)
    try:
        status, _ = await _login(api, "nobody\x1b[31m\n", "secret-pw-1")
        assert status == 401
        await api.core.store.collection(auth.ADMINS).insert_one(
            {"uuid": "u-off", "username": "off", "password_hash": (await api.core.store.collection(auth.ADMINS)
                                                                    .find_one({"username": "admin"}))["password_hash"],
             "enabled": False})
        status, _ = await _login(api, "off", ADMIN_PASSWORD)
        assert status == 401
        for _ in range(5):
            status, _ = await _login(api, "admin", "secret-pw-1")
        assert status == 401
        status, body = await _login(api, "admin", "secret-pw-1")
        assert_error(status, body, 429, errors.LOGIN_THROTTLED.code)
    finally:
        globalLogPublisher.removeObserver(events.append)
    lines = [formatEvent(e) for e in events if e.get("log_namespace") == "kvmdesk.auth"]
    text = "\n".join(lines)
    assert "secret-pw-1" not in text and ADMIN_PASSWORD not in text
    assert "\x1b" not in text and "nobody\\x1b[31m\\n" in text
    assert any("locked out" in line and "'admin'" in line for line in lines), lines
    assert any("disabled" in line and "'off'" in line for line in lines), lines
    assert api.core.auth.refused_logins == 8 and api.core.auth.lockouts == 1
    reasons = [reason for _, _, reason in seen.calls]
    assert reasons == ["bad_credentials", "disabled", *["bad_credentials"] * 5, "locked"]
    assert seen.calls[0][0] == "nobody\x1b[31m\n" and all(address == seen.calls[0][1] for _, address, _ in seen.calls)
