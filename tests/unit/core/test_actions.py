"""``{"action", "param"}`` endpoints dispatch through a table; params are validated under ``param.``."""
from __future__ import annotations

import pytest
import pytest_twisted

from core_testlib import assert_error, load_example_plugin, plugins_with, raw_call, running_api
from kvmdesk.core import errors

COUNTER = "/example/counter"


@pytest_twisted.async_yield_fixture
async def api(tmp_path, clock):
    async with running_api(tmp_path, clock, plugins=plugins_with((load_example_plugin(), "example"))) as client:
        yield client


@pytest_twisted.ensureDeferred
async def test_dispatch(api):
    status, body = await api.call("POST", COUNTER, {"action": "add", "param": {"x": 3}})
    assert (status, body) == (200, {"code": 0, "msg": "成功", "data": {"counter": 3}})
    status, body = await api.call("POST", COUNTER + "/", {"action": "add", "param": {"x": 4}})
    assert body["data"] == {"counter": 7}
    status, body = await api.call("POST", COUNTER, {"action": "reset"})
    assert (status, body["data"]) == (200, {"counter": 0})
    status, body = await api.call("POST", COUNTER, {"action": "reset", "param": None})
    assert (status, body["data"]) == (200, {"counter": 0})


@pytest.mark.parametrize("action", ["delete", "ADD", "", "__init__"])
@pytest_twisted.ensureDeferred
async def test_unknown_action(api, action):
    status, body = await api.call("POST", COUNTER, {"action": action, "param": {}}, headers={"Accept-Language": "en"})
    assert_error(status, body, 400, errors.UNKNOWN_ACTION.code)
    assert body["msg"] == f"unknown action: {action}"
    assert body["data"] == {"actions": ["add", "reset"]}


@pytest.mark.parametrize(
    "body, field",
    [
        ({"action": "add", "param": {}}, "param.x"),
        ({"action": "add"}, "param.x"),
        ({"action": "add", "param": {"x": "3"}}, "param.x"),
        ({"action": "add", "param": {"x": 0}}, "param.x"),
        ({"action": "add", "param": {"x": 1, "y": 2}}, "param.y"),
        ({"action": "add", "param": [1]}, "param"),
        ({"param": {"x": 1}}, "action"),
        ({"action": 5}, "action"),
        ({"action": "add", "param": {"x": 1}, "extra": True}, "extra"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_bad_action_bodies_name_the_field(api, body, field):
    status, envelope = await api.call("POST", COUNTER, body, headers={"Accept-Language": "en"})
    assert_error(status, envelope, 400, errors.INVALID_PARAM.code)
    assert envelope["data"][0]["field"] == field
    assert envelope["msg"].startswith(f"invalid parameter {field}:")
    _, state = await api.call("POST", COUNTER, {"action": "add", "param": {"x": 1}})
    assert state["data"] == {"counter": 1}  # nothing ran before


@pytest_twisted.ensureDeferred
async def test_malformed_json_and_handler_errors(api):
    status, envelope, _ = await raw_call(api, "POST", COUNTER, b'{"action": ')
    assert_error(status, envelope, 400, errors.INVALID_JSON.code)
    status, envelope = await api.call("POST", COUNTER, {"action": "add", "param": {"x": 101}})
    assert_error(status, envelope, 409, 9001)
    assert envelope["msg"] == "计数器超过上限 100"


@pytest_twisted.ensureDeferred
async def test_only_post(api):
    status, envelope, _ = await raw_call(api, "GET", COUNTER)
    assert_error(status, envelope, 405, errors.METHOD_NOT_ALLOWED.code)
