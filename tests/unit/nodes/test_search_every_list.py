"""The generic search (#135) on every list route of the OpenAPI document.

Each list (an operation with ``page_size``) must take ``searchtype`` and field filters: an unknown field
is refused (not silently dropped), ``single`` answers one record (not a page), ``contain`` matches by
substring.  The lists are filled first (a real agent as node, a network, a subnet, an ISO, users), so
``single`` and ``contain`` are checked on real records wherever a list has any.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, AsyncIterator

import pytest_twisted

from kvmdesk.core import errors
from kvmdesk.testing.agents import AGENT_PASSWORD, nodes_controller, running_agent

UNKNOWN = "no_such_field"


def iso_image() -> bytes:
    """The smallest file the ISO library takes: an ISO 9660 primary volume descriptor at 0x8000."""
    data = bytearray(0x9000)
    data[0x8000:0x8006] = b"\x01CD001"
    return bytes(data)


@pytest_twisted.async_yield_fixture
async def api(tmp_path: Path, agent_port: int) -> AsyncIterator[Any]:
    async with running_agent(tmp_path / "agent", "127.0.0.2", agent_port, hostname="node-a"), \
            nodes_controller(tmp_path / "controller", agent_port) as client:
        yield client


async def ok(api: Any, method: str, path: str, body: Any = None) -> Any:
    status, answer = await api.call(method, path, body)
    assert status == 200 and answer["code"] == 0, (method, path, answer)
    return answer["data"]


async def fill(api: Any) -> dict[str, str]:
    """Something in every list; returns the values of the path parameters."""
    pools = await ok(api, "GET", "/resource_mgr/resource_pools")
    pool = next(p["uuid"] for p in pools["results"] if p["default"])
    node = await ok(api, "POST", f"/resource_mgr/resource_pools/{pool}/nodes",
                     {"ip": "127.0.0.2", "password": AGENT_PASSWORD})
    switches = await ok(api, "GET", "/resource_mgr/vswitchs")
    network = await ok(api, "POST", "/resource_mgr/data_networks",
                        {"name": "teaching", "switch_uuid": switches["results"][0]["uuid"]})
    await ok(api, "POST", f"/resource_mgr/data_networks/{network['uuid']}/sub_networks",
             {"name": "s1", "start_ip": "172.16.1.10", "end_ip": "172.16.1.50", "netmask": "255.255.255.0",
              "gateway": "172.16.1.254", "dns1": "8.8.8.8"})
    status, body = await api.upload("/resource_mgr/isos", {"iso_type": "3", "os_type": "linux"},
                                    {"file": ("debian-12.iso", iso_image())})
    assert status == 200, body
    await ok(api, "POST", "/personal/group", {"name": "class-1", "group_type": 2})
    groups = await ok(api, "GET", "/personal/group")
    await ok(api, "POST", "/personal/user", {"action": "single_create", "param": {
        "group_uuid": groups["results"][0]["uuid"], "user_name": "student1", "passwd": "Passw0rd!x"}})
    return {"pool_uuid": pool, "node_uuid": node["uuid"], "network_uuid": network["uuid"]}


def list_routes(document: dict) -> list[tuple[str, dict]]:
    routes = []
    for path, item in document["paths"].items():
        operation = item.get("get")
        if operation and any(p["name"] == "page_size" for p in operation.get("parameters", [])):
            routes.append((path, operation))
    return routes


def filters(operation: dict) -> dict[str, dict]:
    reserved = {"page", "page_size", "searchtype"}
    return {p["name"]: p["schema"] for p in operation["parameters"] if p["in"] == "query" and p["name"] not in reserved}


def probe_value(record: dict, filters_: dict[str, dict]) -> tuple[str, str] | None:
    """A text filter field the record has a value for, and that value (to search for it)."""
    for name, schema in filters_.items():
        value = record.get(name)
        if schema.get("type") == "string" and "enum" not in schema and isinstance(value, str) and len(value) >= 3:
            return name, value
    return None


@pytest_twisted.ensureDeferred
async def test_every_list_takes_the_generic_search(api):
    params = await fill(api)
    status, document = await api.call("GET", "/openapi.json", auth=False)
    routes = list_routes(document)
    assert len(routes) >= 14, [p for p, _ in routes]
    checked_with_data = []
    for template, operation in routes:
        path = template.removeprefix("/api/v1.0").format(**params)
        names = {p["name"] for p in operation["parameters"]}
        fields = filters(operation)
        assert "searchtype" in names and fields, f"{template} documents no generic search"

        # an unknown field is refused, naming it
        status, body = await api.call("GET", path, params={UNKNOWN: "x"}, headers={"Accept-Language": "en"})
        assert status == 400 and body["code"] == errors.UNKNOWN_FILTER.code and UNKNOWN in body["msg"], (template, body)
        # contain and single need a filter
        for searchtype in ("contain", "single"):
            status, body = await api.call("GET", path, params={"searchtype": searchtype})
            assert status == 400 and body["code"] == errors.SEARCH_NEEDS_FILTER.code, (template, searchtype, body)
        # single finds nothing: a 404, not an empty page
        text_field = next(n for n, s in fields.items() if s.get("type") == "string" and "enum" not in s)
        status, body = await api.call("GET", path, params={"searchtype": "single", text_field: "zz-nothing-zz"})
        assert status == 404 and body["code"] == errors.NOT_FOUND.code, (template, body)
        status, body = await api.call("GET", path, params={"searchtype": "contain", text_field: "zz-nothing-zz"})
        assert status == 200 and body["data"]["count"] == 0 and body["data"]["results"] == [], (template, body)

        page = await ok(api, "GET", path)
        found = next((probe_value(r, fields) for r in page["results"] if probe_value(r, fields)), None)
        if found is None:
            continue
        field, value = found
        # single: the record itself, not a page
        status, body = await api.call("GET", path, params={"searchtype": "single", field: value})
        assert status == 200 and "results" not in body["data"] and body["data"][field] == value, (template, body)
        # contain: a substring from the middle of the value, in another case
        part = value[1:-1].swapcase()
        status, body = await api.call("GET", path, params={"searchtype": "contain", field: part})
        assert status == 200 and body["data"]["results"], (template, field, part, body)
        assert all(part.lower() in r[field].lower() for r in body["data"]["results"]), (template, body)
        checked_with_data.append(template)
    # the lists the issue named are among those checked on real records
    for named in ("/nodes/{node_uuid}/services", "/manage_networks", "/isos"):
        assert any(t.endswith(named) for t in checked_with_data), (named, checked_with_data)
