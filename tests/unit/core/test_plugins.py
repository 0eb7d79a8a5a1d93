"""The plugin manager: entry points, blocking, check_pending, gather_hook."""
from __future__ import annotations

import pluggy
import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from core_testlib import POOLS, assert_error, running_api
from kvmdesk import hookimpl
from kvmdesk.api.app import make_router
from kvmdesk.core import errors
from kvmdesk.core.app import build_core
from kvmdesk.core.config import Config
from kvmdesk.core.plugins import ENTRY_POINT_GROUP, blocked_names, gather_hook, make_plugin_manager

BUILT_INS = {"admin", "nodes"}


def test_entry_points_load_the_built_in_plugins():
    manager = make_plugin_manager()
    names = {name for name, plugin in manager.list_name_plugin()}
    assert BUILT_INS <= names
    import kvmdesk.plugins.admin
    import kvmdesk.plugins.nodes

    assert manager.get_plugin("admin") is kvmdesk.plugins.admin
    assert manager.get_plugin("nodes") is kvmdesk.plugins.nodes
    assert {tuple(dist.entry_points)[0].group for _, dist in manager.list_plugin_distinfo()} == {ENTRY_POINT_GROUP}


def test_hand_registration_without_entry_points():
    manager = make_plugin_manager(load_entry_points=False)
    assert manager.get_plugins() == set()


def test_blocked_by_name():
    manager = make_plugin_manager({"nodes"})
    assert manager.is_blocked("nodes") and manager.get_plugin("nodes") is None
    assert manager.get_plugin("admin") is not None


def test_blocked_names_from_config_and_environment(monkeypatch):
    monkeypatch.setenv("KVMDESK_BLOCKED_PLUGINS", " storage, ,network ")
    assert blocked_names(["nodes", " ", "users "]) == {"nodes", "users", "storage", "network"}
    monkeypatch.delenv("KVMDESK_BLOCKED_PLUGINS")
    assert blocked_names([]) == set()


@pytest_twisted.ensureDeferred
async def test_plugin_blocked_through_the_configuration(tmp_path, clock):
    async with running_api(tmp_path, clock, config={"plugins": {"blocked": ["nodes"]}}) as api:
        assert api.core.plugins.is_blocked("nodes")
        status, body = await api.call("GET", POOLS)
        assert_error(status, body, 404, errors.ROUTE_NOT_FOUND.code)
        assert await api.core.store.collection("resource_pools").count() == 0  # its start-up hook did not run
        status, body = await api.call("GET", "/index/get_operation_log/")
        assert status == 200


@pytest_twisted.ensureDeferred
async def test_plugin_blocked_through_the_environment(tmp_path, clock, monkeypatch):
    monkeypatch.setenv("KVMDESK_BLOCKED_PLUGINS", "nodes")
    async with running_api(tmp_path, clock) as api:
        assert api.core.plugins.is_blocked("nodes")
        status, body = await api.call("GET", POOLS)
        assert_error(status, body, 404, errors.ROUTE_NOT_FOUND.code)


class _UnknownHook:
    @hookimpl
    def kvmdesk_no_such_hook(self, core):
        return None


def test_check_pending_rejects_an_unknown_hook():
    manager = make_plugin_manager(load_entry_points=False)
    manager.register(_UnknownHook(), name="bad")
    with pytest.raises(pluggy.PluginValidationError, match="kvmdesk_no_such_hook"):
        manager.check_pending()


class _WrongArguments:
    @hookimpl
    def kvmdesk_routes(self, router, core, extra):
        return None


def test_registration_rejects_an_implementation_with_unknown_arguments():
    manager = make_plugin_manager(load_entry_points=False)
    with pytest.raises(pluggy.PluginValidationError, match="extra"):
        manager.register(_WrongArguments(), name="wrong")


@pytest_twisted.ensureDeferred
async def test_build_core_rejects_a_plugin_with_an_unknown_hook(tmp_path, clock):
    manager = make_plugin_manager()
    manager.register(_UnknownHook(), name="bad")
    config = Config([{"controller": {"data_dir": str(tmp_path / "data")}}])
    with pytest.raises(pluggy.PluginValidationError):
        await build_core(config, reactor, plugins=manager, clock=clock, make_router=make_router)


@pytest_twisted.ensureDeferred
async def test_gather_hook_waits_for_every_kind_of_result():
    later = defer.Deferred()

    async def coroutine():
        return "coro"

    gathered = gather_hook([None, 1, defer.succeed("deferred"), coroutine(), later])
    assert not gathered.called
    later.callback("later")
    assert await gathered == [None, 1, "deferred", "coro", "later"]


@pytest_twisted.ensureDeferred
async def test_gather_hook_reraises_the_first_failure_after_all_finish():
    finished = []
    later = defer.Deferred()

    async def fails():
        raise KeyError("boom")

    async def waits():
        await later
        finished.append(True)

    gathered = gather_hook([fails(), waits()])
    assert not gathered.called  # waits for the slow one
    later.callback(None)
    with pytest.raises(KeyError, match="boom"):
        await gathered
    assert finished == [True]


@pytest_twisted.ensureDeferred
async def test_gather_hook_of_nothing():
    assert await gather_hook([]) == []


@pytest_twisted.ensureDeferred
async def test_usage_hook_reports_the_first_reason(tmp_path, clock):
    class InUse:
        @hookimpl
        def kvmdesk_usage(self, core, kind, uuid):
            return "used by a test" if kind == "thing" else None

    from core_testlib import plugins_with

    async with running_api(tmp_path, clock, plugins=plugins_with((InUse(), "in-use"))) as api:
        assert await api.core.usage("thing", "x") == "used by a test"
        assert await api.core.usage("resource_pool", "x") is None


def _install_fake_plugin(site, name: str, code: int, message: str) -> None:
    """A plugin package as pip would leave it: a module and a dist-info with the entry point."""
    (site / f"kvmdesk_fake_{name}.py").write_text(
        "from kvmdesk.core.errors import define\n"
        f"MINE = define({code}, 409, {message!r}, {message!r})\n")
    info = site / f"kvmdesk_fake_{name}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: kvmdesk-fake-{name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n{name} = kvmdesk_fake_{name}\n")


def test_an_error_code_clash_names_both_plugins(tmp_path, monkeypatch):
    import sys

    from kvmdesk.core.plugins import PluginConflict

    _install_fake_plugin(tmp_path, "alpha", 9990, "alpha's message")
    _install_fake_plugin(tmp_path, "beta", 9990, "beta's message")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with pytest.raises(PluginConflict) as caught:
            make_plugin_manager()
        message = str(caught.value)
        assert "'alpha' (kvmdesk_fake_alpha)" in message and "'beta' (kvmdesk_fake_beta)" in message, message
        assert "error code 9990" in message and "\n" not in message
    finally:
        errors.CATALOGUE.pop(9990, None)
        errors.DEFINED_BY.pop(9990, None)
        for name in ("kvmdesk_fake_alpha", "kvmdesk_fake_beta"):
            sys.modules.pop(name, None)


def test_define_names_the_first_module_in_a_clash():
    errors.define(9991, 400, "一", "one", module="first.module")
    try:
        with pytest.raises(errors.CodeClash, match="already defined by first.module .* second.module defines it"):
            errors.define(9991, 400, "二", "two", module="second.module")
        assert errors.define(9991, 400, "一", "one") == errors.CATALOGUE[9991]  # the same definition again is fine
    finally:
        errors.CATALOGUE.pop(9991, None)
        errors.DEFINED_BY.pop(9991, None)


@pytest_twisted.ensureDeferred
async def test_start_up_logs_loaded_and_blocked_plugins(tmp_path, clock):
    from twisted.logger import globalLogPublisher

    seen = []
    globalLogPublisher.addObserver(seen.append)
    try:
        async with running_api(tmp_path, clock, config={"plugins": {"blocked": ["storage"]}}):
            pass
    finally:
        globalLogPublisher.removeObserver(seen.append)
    lines = [e for e in seen if e.get("log_format", "").startswith("plugins loaded")]
    assert len(lines) == 1
    loaded, blocked = lines[0]["loaded"].split(", "), lines[0]["blocked"]
    assert {"admin", "nodes", "network", "users"} <= set(loaded) and "storage" not in loaded
    assert blocked == "storage"


def test_testing_helpers_leave_the_environment_alone(tmp_path):
    import os

    from kvmdesk.testing.plugins import plugin_manager

    before = dict(os.environ)
    manager = plugin_manager(only=["admin"], blocked=["nodes"])
    assert {name for name, plugin in manager.list_name_plugin() if plugin} == {"admin"}
    assert manager.is_blocked("nodes")
    assert dict(os.environ) == before


@pytest_twisted.ensureDeferred
async def test_make_core_sets_the_admin_password_without_the_environment(tmp_path, clock, monkeypatch):
    import os

    monkeypatch.delenv("KVMDESK_ADMIN_PASSWORD", raising=False)
    async with running_api(tmp_path, clock) as api:  # logs in with kvmdesk.testing's password
        assert api.token
    assert "KVMDESK_ADMIN_PASSWORD" not in os.environ
