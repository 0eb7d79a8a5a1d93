"""A third-party plugin (tests/plugins_example) registered like an entry point: its route and service work."""
from __future__ import annotations

import pytest_twisted
from twisted.internet import defer

from core_testlib import assert_error, load_example_plugin, plugins_with, running_api
from kvmdesk.core.plugins import make_plugin_manager


@pytest_twisted.ensureDeferred
async def test_example_plugin_route_and_service(tmp_path, clock):
    example = load_example_plugin()
    manager = make_plugin_manager(load_entry_points=True)
    manager.register(example, name="example")
    async with running_api(tmp_path, clock, plugins=manager) as api:
        core = api.core
        assert core.config.get("example.interval") == 5.0  # the plugin's configuration defaults
        service = core.extensions[example.EXTENSION]
        assert isinstance(service, example.TickService) and service.parent is core.services
        assert core.services.getServiceNamed("example-ticks") is service

        status, body = await api.call("GET", "/example/ticks")
        assert (status, body["data"]) == (200, {"ticks": 0, "running": False})

        core.services.startService()
        clock.advance(4.9)
        assert service.ticks == 0
        clock.advance(0.1)
        clock.pump([5.0] * 9)
        status, body = await api.call("GET", "/example/ticks/")
        assert (status, body["data"]) == (200, {"ticks": 10, "running": True})

        await defer.maybeDeferred(core.services.stopService)
        assert not service.running and clock.getDelayedCalls() == []
        clock.advance(60)
        status, body = await api.call("GET", "/example/ticks")
        assert body["data"] == {"ticks": 10, "running": False}

        # The built-in plugins are still there alongside it.
        status, _ = await api.call("GET", "/resource_mgr/resource_pools")
        assert status == 200


@pytest_twisted.ensureDeferred
async def test_example_plugin_routes_need_a_token(tmp_path, clock):
    async with running_api(tmp_path, clock, login=False, plugins=plugins_with((load_example_plugin(), "example"))) as api:
        status, body = await api.call("GET", "/example/ticks")
        assert_error(status, body, 401)


@pytest_twisted.ensureDeferred
async def test_example_plugin_can_be_blocked(tmp_path, clock):
    manager = make_plugin_manager(["example"], load_entry_points=True)
    manager.register(load_example_plugin(), name="example")  # refused: the name is blocked
    async with running_api(tmp_path, clock, plugins=manager) as api:
        assert manager.get_plugin("example") is None
        assert "example" not in api.core.extensions
        status, body = await api.call("GET", "/example/ticks")
        assert_error(status, body, 404)


def test_tick_service_alone(clock):
    example = load_example_plugin()
    service = example.TickService(clock=clock, interval=2.0)
    service.startService()
    clock.pump([1.0] * 7)
    assert service.ticks == 3
    service.stopService()
    assert clock.getDelayedCalls() == []
    service.startService()
    clock.advance(2)
    service.stopService()
    assert (service.ticks, clock.getDelayedCalls()) == (4, [])
