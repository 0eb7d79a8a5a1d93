"""Fixtures and helpers of the desktops plugin's API tests: a real core on a fresh store, with a
data network and subnet made through the network plugin's own API."""
from __future__ import annotations

from pathlib import Path
from typing import Any, AsyncIterator

import pytest
import pytest_twisted
from twisted.internet.task import Clock

from kvmdesk.testing.api import ApiClient, api_client
from kvmdesk.testing.network import subnet_body

NETS = "/resource_mgr/data_networks"
TEACHING = "/education/group"
EN = {"Accept-Language": "en"}


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest_twisted.async_yield_fixture
async def api(tmp_path: Path, clock: Clock) -> AsyncIterator[ApiClient]:
    async with api_client(tmp_path, clock=clock) as client:
        yield client
    assert clock.getDelayedCalls() == [], "a delayed call was left on the clock"


def ok(status: int, body: Any) -> Any:
    assert status == 200 and isinstance(body, dict) and body["code"] == 0, (status, body)
    return body["data"]


def failed(status: int, body: Any, expected_status: int, code: int, *words: str) -> dict:
    assert isinstance(body, dict) and set(body) == {"code", "msg", "data"}, body
    assert (status, body["code"]) == (expected_status, code), (status, body)
    for word in words:
        assert word in body["msg"], (word, body["msg"])
    return body


async def make_network(api: ApiClient, name: str = "net1", start: str = "172.16.1.10", end: str = "172.16.1.50") -> tuple[dict, dict]:
    """A data network (a VLAN of one switch) with one subnet; returns ``(network, subnet)``."""
    found = ok(*await api.call("GET", "/resource_mgr/vswitchs", params={"name": "teaching-sw"}))["results"]
    switch = found[0] if found else ok(*await api.call("POST", "/resource_mgr/vswitchs",
                                                       {"name": "teaching-sw", "type": "vlan", "uplinks": []}))
    vlan_id = 10 + await api.core.store.collection("data_networks").count({})
    network = ok(*await api.call("POST", NETS, {"name": name, "switch_uuid": switch["uuid"], "vlan_id": vlan_id,
                                                "subnet_info": subnet_body(f"{name}-s1", start, end, gateway=start.rsplit(".", 1)[0] + ".254")}))
    subnets = ok(*await api.call("GET", f"{NETS}/{network['uuid']}/sub_networks"))["results"]
    return network, subnets[0]


async def add_subnet(api: ApiClient, network: dict, name: str, start: str, end: str) -> dict:
    return ok(*await api.call("POST", f"{NETS}/{network['uuid']}/sub_networks", subnet_body(name, start, end)))


def teaching_body(name: str, network: dict, subnet: dict, start: str = "172.16.1.100", end: str = "172.16.1.140",
                  **extra: Any) -> dict:
    return {"name": name, "group_type": 1, "desc": f"class {name}", "network_uuid": network["uuid"],
            "subnet_uuid": subnet["uuid"], "start_ip": start, "end_ip": end, **extra}


async def create_teaching_group(api: ApiClient, name: str, network: dict, subnet: dict, **extra: Any) -> dict:
    return ok(*await api.call("POST", TEACHING, teaching_body(name, network, subnet, **extra)))
