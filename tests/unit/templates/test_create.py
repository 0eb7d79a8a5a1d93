"""#64 create and #78 query against real agents on the test driver; every bad input refused with the
field named and nothing changed in the store or on any node."""
from __future__ import annotations

from xml.etree import ElementTree as ET

import pytest_twisted

from kvmdesk.core import errors as core_errors
from kvmdesk.plugins.templates import errors
from templates_testlib import T, assert_error

CONTRACT_FIELDS = {"name", "uuid", "desc", "host_ip", "host_name", "pool_name", "pool_uuid", "network_name",
                   "network_uuid", "subnet_name", "subnet_uuid", "subnet_start_ip", "subnet_end_ip", "bind_ip", "vcpu",
                   "ram", "os_type", "os_type_simple", "owner", "desktop_count", "instance_count", "status",
                   "updated_time", "created_at", "devices"}


@pytest_twisted.ensureDeferred
async def test_create_defines_the_domain_on_a_node_and_the_query_shows_every_field(world):
    created = await world.create(bind_ip="172.16.1.15")
    assert created["bind_ip"] == "172.16.1.15" and created["status"] == "inactive"
    assert "vnc_password" not in created
    agent = world.agent_of(created)
    (domain,) = [d for d in await agent.hypervisor.list_domains() if d["uuid"] == created["uuid"]]
    assert (domain["vcpus"], domain["memory_kib"]) == (2, 2 * 1024 * 1024)
    tree = ET.fromstring(await agent.hypervisor.domain_xml(created["uuid"], inactive=True))
    assert tree.find("./devices/interface/vlan/tag").get("id") == "101"
    assert tree.find("./devices/interface/virtualport").get("type") == "openvswitch"
    sources = [d.find("source").get("file") for d in tree.findall("./devices/disk[@device='disk']")]
    assert len(sources) == 2 and all("_template" in s for s in sources)

    status, body = await world.api.call("GET", T, params={"searchtype": "all", "classify": 1, "page": 1,
                                                          "page_size": 10})
    assert status == 200, body
    (listed,) = body["data"]["results"]
    assert CONTRACT_FIELDS <= set(listed), CONTRACT_FIELDS - set(listed)
    assert listed["host_ip"] == agent.config.get("agent.listen") and listed["pool_name"]
    assert (listed["network_name"], listed["subnet_name"]) == ("net1", "s1")
    assert (listed["subnet_start_ip"], listed["subnet_end_ip"]) == ("172.16.1.10", "172.16.1.20")
    assert listed["os_type_simple"] == "win7" and listed["owner"] == "admin" and listed["ram"] == 2.0
    system, data = listed["devices"]
    assert (system["type"], system["device_name"], system["boot_index"], system["size"]) == ("system", "vda", 0, 50)
    assert (data["type"], data["size"]) == ("data", 10)
    assert isinstance(system["used"], float) and system["used"] < 1
    status, body = await world.api.call("GET", T, params={"searchtype": "contain", "name": "templ"})
    assert body["data"]["count"] == 1
    status, body = await world.api.call("GET", T, params={"classify": 2})
    assert body["data"]["count"] == 0
    status, body = await world.api.call("GET", T, params={"pool_uuid": world.pool})
    assert body["data"]["count"] == 1

    # the next template gets the next free address, on the node with fewer templates
    second = await world.create(name="template2", data_disks=[])
    assert second["bind_ip"] != "172.16.1.15" and second["host_uuid"] != created["host_uuid"]


@pytest_twisted.ensureDeferred
async def test_every_bad_create_is_refused_naming_the_field_and_changes_nothing(world):
    await world.create(bind_ip="172.16.1.12")
    before = await world.snapshot()
    other_subnet = await world.core.store.collection("subnets").insert_one(
        {"uuid": "other-subnet", "name": "elsewhere", "network_uuid": "another-network"})
    cases = [
        ({"pool_uuid": "nope"}, 404, core_errors.NOT_FOUND.code, "nope"),
        ({"network_uuid": "nope"}, 404, core_errors.NOT_FOUND.code, "nope"),
        ({"subnet_uuid": "nope"}, 404, core_errors.NOT_FOUND.code, "nope"),
        ({"subnet_uuid": other_subnet["uuid"]}, 400, errors.SUBNET_NOT_IN_NETWORK.code, "subnet_uuid"),
        ({"system_disk": {"image_id": "nope", "size": 50}}, 404, core_errors.NOT_FOUND.code, "nope"),
        ({"system_disk": {"image_id": world.base["uuid"], "size": 1}}, 400, errors.DISK_SHRINK.code,
         "system_disk.size"),
        ({"system_disk": {"image_id": world.base["uuid"], "size": 60000}}, 507, errors.NO_SPACE.code,
         "system_disk.size"),
        ({"data_disks": [{"inx": 0, "size": 60000}]}, 507, errors.NO_SPACE.code, "data_disks.0.size"),
        ({"data_disks": [{"inx": 0, "size": 0}]}, 400, core_errors.INVALID_PARAM.code, "data_disks.0.size"),
        ({"data_disks": [{"inx": 1, "size": 5}, {"inx": 1, "size": 5}]}, 400, core_errors.INVALID_PARAM.code,
         "data_disks"),
        ({"bind_ip": "10.0.0.1"}, 400, errors.BIND_IP_INVALID.code, "bind_ip"),
        ({"bind_ip": "not-an-ip"}, 400, core_errors.INVALID_PARAM.code, "bind_ip"),
        ({"bind_ip": "172.16.1.12"}, 409, errors.BIND_IP_TAKEN.code, "bind_ip"),
        ({"name": "template1"}, 409, core_errors.ALREADY_EXISTS.code, "template1"),
        ({"classify": 3}, 400, core_errors.INVALID_PARAM.code, "classify"),
        ({"vcpu": 0}, 400, core_errors.INVALID_PARAM.code, "vcpu"),
        ({"ram": "2"}, 400, core_errors.INVALID_PARAM.code, "ram"),
    ]
    for changes, status_code, code, word in cases:
        body = world.body(name="fresh", **{k: v for k, v in changes.items() if k != "name"})
        if "name" in changes:
            body["name"] = changes["name"]
        status, answer = await world.api.call("POST", T, {"action": "create", "param": body},
                                              headers={"Accept-Language": "en"})
        assert_error(status, answer, status_code, code, word)
        assert await world.snapshot() == before, changes
    # a missing required field
    body = world.body()
    del body["system_disk"]
    status, answer = await world.api.call("POST", T, {"action": "create", "param": body})
    assert_error(status, answer, 400, core_errors.INVALID_PARAM.code, "param.system_disk")
    assert await world.snapshot() == before
