"""Fixtures and helpers of the desktops plugin's API tests: a real core on a fresh store, with a
data network and subnet made through the network plugin's own API."""
from __future__ import annotations

from pathlib import Path
from typing import Any, AsyncIterator, Optional

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


# -- desktop groups --------------------------------------------------------------------------------------

DESKTOP_GROUPS = "/education/desktop"
INSTANCES = "/education/instance"
GIB = 1024**3


async def seed_node(core: Any, name: str, ip: str, *, pool: Optional[dict] = None, state: str = "online", cpus: int = 16,
                    ram_gib: int = 64, disk_gib: int = 500) -> dict:
    """A node record as the nodes plugin and its watcher store it (facts, state)."""
    from kvmdesk.testing.network import add_node

    node = await add_node(core, name, ip, pool=pool)
    facts = {"cpu": {"logical_count": cpus}, "memory": {"total": ram_gib * GIB, "available": ram_gib * GIB},
             "storage": [{"role": "instance_sys", "free": disk_gib * GIB}]}
    return await core.store.collection("nodes").find_one_and_update(
        {"uuid": node["uuid"]}, {"$set": {"state": state, "facts": facts}})


async def seed_template(core: Any, pool: dict, nodes: list[dict], *, name: str = "win7", status: str = "inactive",
                        version: int = 1) -> dict:
    """A template record with a saved version published to ``nodes`` (the shape the templates plugin stores)."""
    from kvmdesk.core.records import new_record

    device = {"uuid": "dev-sys", "type": "system", "role": 1, "device_name": "vda", "file_id": f"{name}-sys",
              "boot_index": 0, "size": 20}
    versions = [{"version": v, "files": [{"device_uuid": "dev-sys", "role": 1, "file_id": f"{name}-sys.v{v}", "md5": "0" * 32,
                                          "size": GIB}], "created_at": "2026-01-01 00:00:00"} for v in range(1, version + 1)]
    return await core.store.collection("templates").insert_one(new_record(
        core.clock, name=name, status=status, os_type="Windows 7 64 bit", pool_uuid=pool["uuid"], devices=[device],
        version=version or None, versions=versions, publish={n["uuid"]: {"version": version, "status": 0, "error": None}
                                                              for n in nodes}))


def group_body(name: str, teaching: dict, template: dict, pool: dict, network: dict, subnet: dict,
               create_info: dict, **extra: Any) -> dict:
    count = sum(v for v in create_info.values() if isinstance(v, int))
    param = {"name": name, "group_uuid": teaching["uuid"], "template_uuid": template["uuid"], "pool_uuid": pool["uuid"],
             "network_uuid": network["uuid"], "subnet_uuid": subnet["uuid"], "vcpu": 2, "ram": 2, "sys_restore": 1,
             "data_restore": 1, "instance_num": count, "prefix": "pc", "postfix": 3, "postfix_start": 1,
             "create_info": create_info, **extra}
    return {"action": "create", "param": param}
