"""Helpers shared by the core's unit tests (imported by name: conftest.py puts this directory on sys.path)."""
from __future__ import annotations

import contextlib
import importlib.util
import sys
from pathlib import Path
from typing import Any, AsyncIterator

import orjson
from twisted.internet.task import Clock

from kvmdesk.testing.api import ApiClient, api_client
from kvmdesk.testing.plugins import plugin_manager

PLUGINS_EXAMPLE = Path(__file__).resolve().parents[2] / "plugins_example"
EXAMPLE_PLUGIN = PLUGINS_EXAMPLE / "kvmdesk_example.py"
POOLS = "/resource_mgr/resource_pools"


def load_plugin_module(name: str) -> Any:
    """Import ``tests/plugins_example/<name>.py`` as the module ``name`` (once), as an installed package would be."""
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, PLUGINS_EXAMPLE / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return module


def load_example_plugin() -> Any:
    """Import ``tests/plugins_example/kvmdesk_example.py`` as the module ``kvmdesk_example`` (once)."""
    return load_plugin_module("kvmdesk_example")


def plugins_with(*extra: tuple[Any, str]) -> Any:
    """The production plugin manager (entry points) plus ``(plugin, name)`` pairs registered by hand."""
    return plugin_manager(*extra)


@contextlib.asynccontextmanager
async def running_api(tmp_path: Path, clock: Clock, *, login: bool = True, **kwargs: Any) -> AsyncIterator[ApiClient]:
    """A core with ``clock`` and an :class:`ApiClient` on it; stops services and closes the store after."""
    async with api_client(tmp_path, login=login, clock=clock, **kwargs) as client:
        yield client
    assert clock.getDelayedCalls() == [], "a delayed call was left on the clock"


async def snapshot(core: Any, collection: str = "resource_pools") -> list[dict]:
    """Every document of ``collection`` in id order (to compare before and after a request)."""
    return await core.store.collection(collection).find({}, sort=[("id", 1)])


async def raw_call(api: ApiClient, method: str, path: str, body: bytes | None = None, *,
                   headers: dict[str, str] | None = None, auth: bool = True) -> tuple[int, Any, Any]:
    """Send raw bytes; returns ``(status, decoded envelope or raw bytes, response headers)``."""
    sent = {"Host": "kvmdesk.test", **(headers or {})}
    if auth and api.token:
        sent["Authorization"] = f"Bearer {api.token}"
    response = await api.stub.request(method, "http://kvmdesk.test/api/v1.0" + path, data=body, headers=sent)
    content = await response.content()
    try:
        decoded = orjson.loads(content)
    except orjson.JSONDecodeError:
        decoded = content
    return response.code, decoded, response.headers


def assert_error(status: int, body: Any, expected_status: int, code: int | None = None) -> None:
    """``body`` is an error envelope with this HTTP status (and envelope code)."""
    assert isinstance(body, dict), f"not a JSON envelope: {body!r}"
    assert set(body) == {"code", "msg", "data"}, body
    assert status == expected_status, (status, body)
    assert body["code"] != 0 and isinstance(body["msg"], str) and body["msg"], body
    if code is not None:
        assert body["code"] == code, body


async def seed_pools(core: Any, names: list[str], **fields: Any) -> list[dict]:
    """Insert pools straight into the store (as the pools plugin stores them)."""
    from kvmdesk.core.records import new_record

    docs = [new_record(core.clock, name=name, desc=fields.get("desc", f"desc of {name}"),
                       status=fields.get("status", 0), default=0) for name in names]
    inserted = await core.store.collection("resource_pools").insert_many(docs)
    assert all(isinstance(doc, dict) for doc in inserted), inserted
    return inserted
