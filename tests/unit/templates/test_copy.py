"""#71 copy: the disks flattened on the source's node and, on another node, fetched from it on a
ticket; the copy has its own address and domain; bad input changes nothing."""
from __future__ import annotations

import pytest_twisted

from kvmdesk.core import errors as core_errors
from kvmdesk.plugins.templates import errors
from kvmdesk.testing.agents import AGENT_PASSWORD, running_agent
from templates_testlib import POOLS, T, assert_error

THIRD = "127.0.0.4"  # an agent of another pool


@pytest_twisted.ensureDeferred
async def test_copy_to_another_node_and_refusals(world):
    source = await world.create(bind_ip="172.16.1.11")
    param = {"template_uuid": source["uuid"], "name": "copy1", "desc": "a copy", "pool_uuid": world.pool,
             "network_uuid": world.network["uuid"], "subnet_uuid": world.subnet["uuid"]}
    await world.act("start", source)
    before = await world.snapshot()
    status, body = await world.api.call("POST", T, {"action": "copy", "param": param})
    assert_error(status, body, 409, errors.TEMPLATE_STATE.code, "template1")  # running
    assert await world.snapshot() == before
    await world.act("hard_stop", source)
    before = await world.snapshot()
    for changes, status_code, code, word in [
            ({"template_uuid": "nope"}, 404, core_errors.NOT_FOUND.code, "nope"),
            ({"name": "template1"}, 409, core_errors.ALREADY_EXISTS.code, "template1"),
            ({"bind_ip": "172.16.1.11"}, 409, errors.BIND_IP_TAKEN.code, "bind_ip"),
            ({"bind_ip": "1.2.3.4"}, 400, errors.BIND_IP_INVALID.code, "bind_ip"),
            ({"pool_uuid": "nope"}, 404, core_errors.NOT_FOUND.code, "nope")]:
        status, body = await world.api.call("POST", T, {"action": "copy", "param": {**param, **changes}})
        assert_error(status, body, status_code, code, word)
        assert await world.snapshot() == before, changes

    status, body = await world.api.call("POST", T, {"action": "copy", "param": param})
    assert status == 200, body
    copied = body["data"]
    assert copied["host_uuid"] != source["host_uuid"]  # the emptier node: the bytes moved node to node
    assert (copied["desc"], copied["vcpu"], copied["ram"]) == ("a copy", 2, 2.0)
    assert copied["bind_ip"] not in (None, "172.16.1.11")
    node = next(n for n in world.nodes if n["uuid"] == copied["host_uuid"])
    stored_node = await world.core.store.collection("nodes").find_one({"uuid": node["uuid"]})
    agents = world.core.extensions["agents"]
    for device, original in zip(copied["devices"], source["devices"]):
        info = await agents.call(stored_node, "GET", f"/disks/template/{device['uuid']}",
                                 params={"role": 1 if device["type"] == "system" else 2})
        assert info["backing"] is None and info["virtual_size"] == original["size"] << 30
    assert copied["uuid"] in {d["uuid"] for d in await world.agent_of(copied).hypervisor.list_domains()}
    # nothing of the copy stays on the source's node
    source_files = world.template_files()[[n["uuid"] for n in world.nodes].index(source["host_uuid"])]
    assert not any(device["uuid"] in name for device in copied["devices"] for name in source_files)


@pytest_twisted.ensureDeferred
async def test_copy_into_another_pool_lands_on_a_node_of_that_pool(world):
    source = await world.create()
    status, body = await world.api.call("POST", POOLS, {"name": "second", "desc": None})
    assert status == 200, body
    pool = body["data"]
    async with running_agent(world.tmp / "agent-c", THIRD, world.port) as third:
        status, body = await world.api.call("POST", f"{POOLS}/{pool['uuid']}/nodes",
                                            {"ip": THIRD, "password": AGENT_PASSWORD})
        assert status == 200, body
        node = body["data"]
        status, body = await world.api.call("POST", T, {"action": "copy", "param": {
            "template_uuid": source["uuid"], "name": "copy-pool2", "pool_uuid": pool["uuid"],
            "network_uuid": world.network["uuid"], "subnet_uuid": world.subnet["uuid"]}})
        assert status == 200, body
        copied = body["data"]
        assert (copied["pool_uuid"], copied["pool_name"], copied["host_uuid"]) == (pool["uuid"], "second", node["uuid"])
        assert copied["host_ip"] == THIRD
        assert copied["uuid"] in {d["uuid"] for d in await third.hypervisor.list_domains()}
        disks = sorted(p.name for p in (third.data_dir / "storage").rglob("*")
                       if p.is_file() and "_template" in p.parts and not p.name.startswith("."))  # not md5 records
        assert disks == sorted(d["uuid"] for d in copied["devices"])
        status, body = await world.api.call("GET", T, params={"pool_uuid": pool["uuid"]})
        assert [t["name"] for t in body["data"]["results"]] == ["copy-pool2"]
        status, body = await world.api.call("DELETE", T, {"templates": [{"name": "copy-pool2",
                                                                          "uuid": copied["uuid"]}]})
        assert status == 200 and body["data"]["success_num"] == 1, body
        assert await third.hypervisor.list_domains() == []
        assert not any(p.is_file() for p in (third.data_dir / "storage").rglob("*") if "_template" in p.parts)
