"""Virtual switches (contract #50-#55): store, validation and API, without node agents."""
import pytest_twisted

from kvmdesk.core import errors
from kvmdesk.plugins.network import errors as net_errors
from kvmdesk.plugins.network import schema
from kvmdesk.testing.network import add_node, add_pool, assert_error, snapshot, uplink
from kvmdesk.testing.api import api_client

BASE = "/resource_mgr/vswitchs"


@pytest_twisted.ensureDeferred
async def test_default_flat_switch_exists_from_the_start(tmp_path):
    async with api_client(tmp_path) as api:
        status, body = await api.call("GET", BASE)
        assert status == 200 and body["code"] == 0
        (switch,) = body["data"]["results"]
        assert (switch["name"], switch["type"], switch["default"]) == ("default", "flat", 1)
        assert switch["network_count"] == 0 and switch["uplinks"] == []
        assert switch["bridge"].startswith("kvs-") and len(switch["bridge"]) <= 15


@pytest_twisted.ensureDeferred
async def test_create_list_and_node_map(tmp_path):
    async with api_client(tmp_path) as api:
        core = api.core
        n1 = await add_node(core, "n1", "10.0.0.1")
        n2 = await add_node(core, "n2", "10.0.0.2")
        status, body = await api.call("POST", BASE, {"name": "sw1", "type": "VLAN", "desc": "d",
                                                      "uplinks": [uplink(n1), uplink(n2)]})
        assert status == 200, body
        created = body["data"]
        assert created["type"] == "vlan" and created["network_count"] == 0
        assert [(u["node_name"], u["nic_name"]) for u in created["uplinks"]] == [("n1", "eth1"), ("n2", "eth1")]

        status, body = await api.call("GET", BASE, params={"page_size": 1, "page": 2})
        assert body["data"]["count"] == 2 and body["data"]["previous"] and body["data"]["next"] is None
        assert body["data"]["results"][0]["name"] == "sw1"

        status, body = await api.call("GET", BASE, params={"searchtype": "contain", "name": "SW"})
        assert [s["name"] for s in body["data"]["results"]] == ["sw1"]

        status, body = await api.call("GET", f"{BASE}/{created['uuid']}/node_map")
        assert status == 200
        # the rule for every answer (README, API conventions): the fields the contract's example shows
        # beside code/msg are in data
        assert set(body) == {"code", "msg", "data"}
        data = body["data"]
        assert (data["name"], data["type"]) == ("sw1", "vlan")
        assert all({"node_name", "node_uuid", "nic_name", "nic_uuid"} <= set(u) for u in data["uplinks"])
        assert {(u["node_uuid"], u["nic_uuid"], u["resource_pool_name"]) for u in data["uplinks"]} == {
            (n1["uuid"], n1["nics"]["eth1"]["uuid"], "default"), (n2["uuid"], n2["nics"]["eth1"]["uuid"], "default")}


@pytest_twisted.ensureDeferred
async def test_create_refusals_change_nothing(tmp_path):
    async with api_client(tmp_path) as api:
        core = api.core
        n1 = await add_node(core, "n1", "10.0.0.1")
        n2 = await add_node(core, "n2", "10.0.0.2")
        status, body = await api.call("POST", BASE, {"name": "taken", "type": "flat", "uplinks": [uplink(n1), uplink(n2)]})
        assert status == 200, body
        before = await snapshot(core)

        cases = [
            # a NIC of another node given as this node's uplink
            ({"name": "x", "type": "vlan", "uplinks": [{"node_uuid": n1["uuid"], "nic_uuid": n2["nics"]["eth0"]["uuid"]},
                                                       uplink(n2, "eth0")]},
             400, net_errors.UPLINK_NIC_NOT_ON_NODE.code, ["uplinks.0.nic_uuid", "eth0", "n1"]),
            ({"name": "x", "type": "vlan", "uplinks": [uplink(n1, "eth0"), uplink(n1, "eth0")]},
             400, net_errors.UPLINK_NODE_TWICE.code, ["uplinks.1.node_uuid", "n1"]),
            ({"name": "x", "type": "vlan", "uplinks": [uplink(n1, "eth1"), uplink(n2, "eth0")]},
             409, net_errors.NIC_IS_UPLINK.code, ["n1/eth1", "taken"]),
            ({"name": "x", "type": "vlan", "uplinks": [uplink(n1, "eth0")]},
             400, net_errors.POOL_WITHOUT_UPLINK.code, ["default", "n2"]),
            ({"name": "x", "type": "vlan", "uplinks": [{"node_uuid": "nope", "nic_uuid": "nope"}]},
             400, errors.INVALID_PARAM.code, ["uplinks.0.node_uuid"]),
            ({"name": "taken", "type": "vlan", "uplinks": []}, 409, errors.ALREADY_EXISTS.code, ["taken"]),
            ({"name": "x", "type": "vxlan", "uplinks": []}, 400, errors.INVALID_PARAM.code, ["type"]),
            ({"name": "x", "type": "vlan"}, 400, errors.INVALID_PARAM.code, ["uplinks"]),
        ]
        for request, status_code, code, words in cases:
            status, body = await api.call("POST", BASE, request, headers={"Accept-Language": "en"})
            assert_error(status, body, status_code, code, *words)
        assert await snapshot(core) == before


@pytest_twisted.ensureDeferred
async def test_pool_coverage_counts_every_node_of_a_reached_pool(tmp_path):
    async with api_client(tmp_path) as api:
        core = api.core
        other = await add_pool(core, "lab")
        a = await add_node(core, "a", "10.0.0.1")
        b = await add_node(core, "b", "10.0.0.2", pool=other)
        await add_node(core, "c", "10.0.0.3", pool=other)
        status, body = await api.call("POST", BASE, {"name": "sw", "type": "vlan", "uplinks": [uplink(a), uplink(b)]},
                                      headers={"Accept-Language": "en"})
        assert_error(status, body, 400, net_errors.POOL_WITHOUT_UPLINK.code, "lab", "c")


@pytest_twisted.ensureDeferred
async def test_edit_switch_uplinks_name_and_type(tmp_path):
    async with api_client(tmp_path) as api:
        core = api.core
        n1 = await add_node(core, "n1", "10.0.0.1")
        n2 = await add_node(core, "n2", "10.0.0.2")
        status, body = await api.call("POST", BASE, {"name": "sw", "type": "flat", "uplinks": [uplink(n1), uplink(n2)]})
        uuid = body["data"]["uuid"]

        status, body = await api.call("PUT", f"{BASE}/{uuid}", {
            "name": "sw2", "type": "VLAN", "desc": "x",
            "uplinks": [{**uplink(n1, "eth0"), "nic_name": "eth0", "node_name": "n1"}, uplink(n2, "eth1")]})
        assert status == 200, body
        assert (body["data"]["name"], body["data"]["type"]) == ("sw2", "vlan")
        assert [u["nic_name"] for u in body["data"]["uplinks"]] == ["eth0", "eth1"]

        # the default switch keeps its name free of clashes
        status, body = await api.call("PUT", f"{BASE}/{uuid}", {"name": "default"}, headers={"Accept-Language": "en"})
        assert_error(status, body, 409, errors.ALREADY_EXISTS.code, "default")
        status, body = await api.call("PUT", f"{BASE}/nope", {"name": "z"})
        assert status == 404

        # one node's uplink (#55)
        status, body = await api.call("PUT", f"{BASE}/{uuid}/node_map",
                                      {**uplink(n2, "eth0"), "nic_name": "eth0", "node_name": "n2"})
        assert status == 200, body
        assert {u["node_name"]: u["nic_name"] for u in body["data"]["uplinks"]} == {"n1": "eth0", "n2": "eth0"}
        before = await snapshot(core)
        status, body = await api.call("PUT", f"{BASE}/{uuid}/node_map", {"node_uuid": n2["uuid"],
                                                                          "nic_uuid": n1["nics"]["eth1"]["uuid"]},
                                      headers={"Accept-Language": "en"})
        assert_error(status, body, 400, net_errors.UPLINK_NIC_NOT_ON_NODE.code, "nic_uuid", "eth1", "n2")
        assert await snapshot(core) == before

        # dropping a node from the uplinks is refused while its pool still has the node
        status, body = await api.call("PUT", f"{BASE}/{uuid}", {"uplinks": [uplink(n1, "eth0")]},
                                      headers={"Accept-Language": "en"})
        assert_error(status, body, 400, net_errors.POOL_WITHOUT_UPLINK.code, "n2")
        assert await snapshot(core) == before


@pytest_twisted.ensureDeferred
async def test_type_is_locked_while_networks_exist(tmp_path):
    async with api_client(tmp_path) as api:
        status, body = await api.call("POST", BASE, {"name": "sw", "type": "vlan", "uplinks": []})
        uuid = body["data"]["uuid"]
        status, body = await api.call("POST", "/resource_mgr/data_networks", {"name": "n", "switch_uuid": uuid, "vlan_id": 5})
        assert status == 200, body
        before = await snapshot(api.core)
        status, body = await api.call("PUT", f"{BASE}/{uuid}", {"type": "flat"}, headers={"Accept-Language": "en"})
        assert_error(status, body, 409, net_errors.SWITCH_TYPE_LOCKED.code, "sw")
        assert await snapshot(api.core) == before


@pytest_twisted.ensureDeferred
async def test_delete_switch_in_use_default_and_batch(tmp_path):
    async with api_client(tmp_path) as api:
        core = api.core
        n1 = await add_node(core, "n1", "10.0.0.1")
        status, body = await api.call("POST", BASE, {"name": "used", "type": "vlan", "uplinks": [uplink(n1)]})
        used = body["data"]["uuid"]
        status, body = await api.call("POST", BASE, {"name": "free", "type": "vlan", "uplinks": []})
        free = body["data"]["uuid"]
        await api.call("POST", "/resource_mgr/data_networks", {"name": "net-a", "switch_uuid": used, "vlan_id": 12})
        default = (await core.store.collection(schema.SWITCHES).find_one({"default": 1}))["uuid"]
        before = await snapshot(core)

        status, body = await api.call("DELETE", BASE, {"uuids": [used]}, headers={"Accept-Language": "en"})
        assert_error(status, body, 409, net_errors.SWITCH_IN_USE.code, "used", "net-a")
        status, body = await api.call("DELETE", BASE, {"uuids": [default]}, headers={"Accept-Language": "en"})
        assert_error(status, body, 409, net_errors.DEFAULT_SWITCH.code, "default")
        assert await snapshot(core) == before

        status, body = await api.call("DELETE", BASE, {"uuids": [used, free, "missing"]})
        assert status == 200 and body["data"]["success_num"] == 1 and body["data"]["failed_num"] == 2
        assert {f["code"] for f in body["data"]["failures"]} == {net_errors.SWITCH_IN_USE.code, errors.NOT_FOUND.code}
        assert await core.store.collection(schema.SWITCHES).find_one({"uuid": free}) is None
        assert await core.store.collection(schema.UPLINKS).count({"vswitch_uuid": used}) == 1
