"""Switches and data networks drive the bridges on the nodes through their agents, confirmed before the
store changes; an offline node is brought in step when it returns."""
import pytest_twisted

from kvmdesk.plugins.network import errors as net_errors
from kvmdesk.plugins.network import schema
from kvmdesk.testing.network import (InProcessAgents, add_agent_node, assert_error, memory_node_net, snapshot,
                                             subnet_body)
from kvmdesk.testing.api import api_client

SWITCHES = "/resource_mgr/vswitchs"
NETS = "/resource_mgr/data_networks"
EN = {"Accept-Language": "en"}


async def two_nodes(api):
    agents = InProcessAgents()
    api.core.extensions["agents"] = agents
    n1 = await add_agent_node(api.core, agents, "n1", "10.0.0.1")
    n2 = await add_agent_node(api.core, agents, "n2", "10.0.0.2")
    return agents, n1, n2


def uplinks(*nodes, nic="eth1"):
    return [{"node_uuid": n["uuid"], "nic_uuid": n["nics"][nic]["uuid"]} for n in nodes]


def bridges(node):
    return node["net"].ovs.bridges


@pytest_twisted.ensureDeferred
async def test_switch_and_networks_are_realised_on_every_uplinked_node(tmp_path):
    async with api_client(tmp_path) as api:
        agents, n1, n2 = await two_nodes(api)
        status, body = await api.call("POST", SWITCHES, {"name": "sw", "type": "vlan", "uplinks": uplinks(n1, n2)})
        assert status == 200, body
        switch = body["data"]
        assert [u["synced"] for u in switch["uplinks"]] == [1, 1]
        # a type change (possible while no network is on the switch) reaches the bridges too
        for switch_type in ("flat", "vlan"):
            status, body = await api.call("PUT", f"{SWITCHES}/{switch['uuid']}", {"type": switch_type})
            assert status == 200 and bridges(n1)[switch["bridge"]]["type"] == switch_type
        for node in (n1, n2):
            assert bridges(node) == {switch["bridge"]: {"ports": {}, "switch_uuid": switch["uuid"], "type": "vlan",
                                                        "uplink": "eth1", "networks": {}}}

        status, body = await api.call("POST", NETS, {"name": "v12", "switch_uuid": switch["uuid"], "vlan_id": 12,
                                                     "subnet_info": subnet_body()})
        v12 = body["data"]
        status, body = await api.call("POST", NETS, {"name": "v13", "switch_uuid": switch["uuid"], "vlan_id": 13})
        v13 = body["data"]
        for node in (n1, n2):
            assert bridges(node)[switch["bridge"]]["networks"] == {v12["uuid"]: 12, v13["uuid"]: 13}

        # the domain layer asks an agent where a network lives
        status, body = await agents.harnesses["10.0.0.1"].call("GET", f"/net/networks/{v13['uuid']}")
        assert (body["data"]["bridge"], body["data"]["tag"]) == (switch["bridge"], 13)

        status, body = await api.call("PUT", f"{NETS}/{v13['uuid']}", {"vlan_id": 23})
        assert status == 200 and bridges(n2)[switch["bridge"]]["networks"][v13["uuid"]] == 23

        # one node's uplink changes on that node only
        status, body = await api.call("PUT", f"{SWITCHES}/{switch['uuid']}/node_map", uplinks(n2, nic="eth2")[0])
        assert status == 200, body
        assert bridges(n2)[switch["bridge"]]["uplink"] == "eth2" and bridges(n1)[switch["bridge"]]["uplink"] == "eth1"

        status, body = await api.call("DELETE", NETS, {"uuids": [v12["uuid"], v13["uuid"]]})
        assert body["data"]["success_num"] == 2
        assert bridges(n1)[switch["bridge"]]["networks"] == {}
        status, body = await api.call("DELETE", SWITCHES, {"uuids": [switch["uuid"]]})
        assert status == 200, body
        assert bridges(n1) == {} and bridges(n2) == {}


@pytest_twisted.ensureDeferred
async def test_a_refusing_agent_changes_nothing_anywhere(tmp_path):
    async with api_client(tmp_path) as api:
        agents = InProcessAgents()
        api.core.extensions["agents"] = agents
        n1 = await add_agent_node(api.core, agents, "n1", "10.0.0.1")
        # n2's eth1 is known to the store but Open vSwitch cannot open it
        n2 = await add_agent_node(api.core, agents, "n2", "10.0.0.2",
                                  memory_node_net(ip="10.0.0.2", devices={"eth0", "eth2"}))
        before = await snapshot(api.core)
        status, body = await api.call("POST", SWITCHES, {"name": "sw", "type": "vlan", "uplinks": uplinks(n1, n2)},
                                      headers=EN)
        assert_error(status, body, 502, net_errors.AGENT_FAILED.code, "n2", "eth1", "No such device")
        assert body["data"]["agent_code"] == 3522
        assert await snapshot(api.core) == before
        assert bridges(n1) == {} and bridges(n2) == {}  # n1's bridge was undone

        # an edit that one node refuses leaves the switch as it was on every node
        status, body = await api.call("POST", SWITCHES, {"name": "sw", "type": "vlan", "uplinks": uplinks(n1, n2, nic="eth2")})
        switch = body["data"]
        before = await snapshot(api.core)
        status, body = await api.call("PUT", f"{SWITCHES}/{switch['uuid']}", {"uplinks": uplinks(n1, n2)}, headers=EN)
        assert_error(status, body, 502, net_errors.AGENT_FAILED.code, "n2")
        assert await snapshot(api.core) == before
        assert bridges(n1)[switch["bridge"]]["uplink"] == "eth2"


@pytest_twisted.ensureDeferred
async def test_an_offline_node_is_brought_in_step_when_it_returns(tmp_path):
    async with api_client(tmp_path) as api:
        agents, n1, n2 = await two_nodes(api)
        agents.offline.add("10.0.0.2")
        status, body = await api.call("POST", SWITCHES, {"name": "sw", "type": "vlan", "uplinks": uplinks(n1, n2)})
        assert status == 200, body
        switch = body["data"]
        assert {u["node_name"]: u["synced"] for u in switch["uplinks"]} == {"n1": 1, "n2": 0}
        status, body = await api.call("POST", NETS, {"name": "v12", "switch_uuid": switch["uuid"], "vlan_id": 12})
        net = body["data"]
        status, body = await api.call("POST", SWITCHES, {"name": "gone", "type": "flat", "uplinks": uplinks(n1, n2, nic="eth2")})
        gone = body["data"]
        assert bridges(n2) == {}
        # a bridge the store no longer knows is removed too
        n2["net"].ovs.bridges["kvs-stale"] = {"switch_uuid": gone["uuid"], "type": "flat", "uplink": "eth2",
                                              "networks": {}, "ports": {}}
        status, body = await api.call("DELETE", SWITCHES, {"uuids": [gone["uuid"]]})
        assert status == 200, body

        agents.offline.clear()
        sync = api.core.extensions["network.sync"]
        api.core.plugins.hook.kvmdesk_node_status_changed(core=api.core, node=n2, old="offline", new="online")
        await sync.settled()
        assert set(bridges(n2)) == {switch["bridge"]}
        assert bridges(n2)[switch["bridge"]]["networks"] == {net["uuid"]: 12}
        status, body = await api.call("GET", f"{SWITCHES}/{switch['uuid']}/node_map")
        assert {u["node_name"]: u["synced"] for u in body["data"]["uplinks"]} == {"n1": 1, "n2": 1}


@pytest_twisted.ensureDeferred
async def test_a_new_node_gets_its_nics_and_the_uplinks_it_was_added_with(tmp_path):
    async with api_client(tmp_path) as api:
        agents = InProcessAgents()
        api.core.extensions["agents"] = agents
        default = await api.core.store.collection(schema.SWITCHES).find_one({"default": 1})
        net = memory_node_net(ip="10.0.0.7")
        agents.add("10.0.0.7", net)
        # what the nodes plugin stores when a node is added (#29)
        node = await api.core.store.collection(schema.NODES).insert_one({
            "uuid": "node-7", "name": "n7", "ip": "10.0.0.7", "resource_pool_uuid": None, "type": 5, "agent_secret": "s",
            "uplinks": [{"switch_uuid": default["uuid"], "interface": "eth1"}], "image_interface": "eth0"})
        api.core.plugins.hook.kvmdesk_node_status_changed(core=api.core, node=node, old=None, new="online")
        await api.core.extensions["network.sync"].settled()

        assert net.ovs.bridges[default["bridge"]]["uplink"] == "eth1"
        status, body = await api.call("GET", "/resource_mgr/nodes/node-7/nics")
        assert [n["nic"] for n in body["data"]] == ["eth0", "eth1", "eth2"]
        eth0 = body["data"][0]
        assert (eth0["ip"], eth0["is_manage"], eth0["is_image"]) == ("10.0.0.7", 1, 1)
        status, body = await api.call("GET", "/resource_mgr/vswitchs", params={"searchtype": "single", "default": "1"})
        assert [(u["node_name"], u["nic_name"], u["synced"]) for u in body["data"]["uplinks"]] == [("n7", "eth1", 1)]


@pytest_twisted.ensureDeferred
async def test_concurrent_network_changes_on_one_switch_all_reach_the_nodes(tmp_path):
    from twisted.internet import defer

    async with api_client(tmp_path) as api:
        agents, n1, n2 = await two_nodes(api)
        status, body = await api.call("POST", SWITCHES, {"name": "sw", "type": "vlan", "uplinks": uplinks(n1, n2)})
        switch = body["data"]
        answers = await defer.gatherResults([defer.ensureDeferred(api.call("POST", NETS, {
            "name": f"v{vlan}", "switch_uuid": switch["uuid"], "vlan_id": vlan})) for vlan in range(100, 110)])
        assert [status for status, _ in answers] == [200] * 10
        for node in (n1, n2):
            assert sorted(bridges(node)[switch["bridge"]]["networks"].values()) == list(range(100, 110))


@pytest_twisted.ensureDeferred
async def test_a_deleted_node_is_forgotten(tmp_path):
    async with api_client(tmp_path) as api:
        agents, n1, n2 = await two_nodes(api)
        status, body = await api.call("POST", SWITCHES, {"name": "sw", "type": "vlan", "uplinks": uplinks(n1, n2)})
        switch = body["data"]
        # the nodes plugin deletes n2's record, then tells this plugin
        await api.core.store.collection(schema.NODES).delete_one({"uuid": n2["uuid"]})
        status, body = await api.call("GET", f"{SWITCHES}/{switch['uuid']}/node_map")
        assert [u["node_name"] for u in body["data"]["uplinks"]] == ["n1"]
        await api.core.extensions["network"].forget_node(n2["uuid"])
        for collection in (schema.UPLINKS, schema.NICS, schema.IP_INFOS):
            assert await api.core.store.collection(collection).count({"node_uuid": n2["uuid"]}) == 0
        assert await api.core.store.collection(schema.NICS).count({"node_uuid": n1["uuid"]}) == 3


@pytest_twisted.ensureDeferred
async def test_the_sweep_brings_new_and_lagging_nodes_in_step(tmp_path):
    from twisted.internet.task import Clock

    clock = Clock()
    async with api_client(tmp_path, clock=clock) as api:
        agents = InProcessAgents()
        api.core.extensions["agents"] = agents
        default = await api.core.store.collection(schema.SWITCHES).find_one({"default": 1})
        net = memory_node_net(ip="10.0.0.7")
        agents.add("10.0.0.7", net)
        # just added by the nodes plugin: its watcher starts out "online", so no status change is announced
        node = await api.core.store.collection(schema.NODES).insert_one({
            "uuid": "node-7", "name": "n7", "ip": "10.0.0.7", "type": 5, "state": "online", "agent_secret": "s",
            "uplinks": [{"switch_uuid": default["uuid"], "interface": "eth1"}]})
        sync = api.core.extensions["network.sync"]
        assert sync.interval == 30.0
        async def swept(rounds_before: int) -> None:
            """The round the clock started has finished (it may have finished at once)."""
            if sync.current_round is not None:
                await sync.current_round
            assert sync.rounds == rounds_before + 1

        sync.startService()
        try:
            await swept(0)  # the first sweep runs at start
            assert net.ovs.bridges[default["bridge"]]["uplink"] == "eth1"
            assert await api.core.store.collection(schema.NICS).count({"node_uuid": node["uuid"]}) == 3

            agents.offline.add("10.0.0.7")
            status, body = await api.call("POST", NETS, {"name": "flat", "switch_uuid": default["uuid"]})
            assert status == 200
            clock.advance(30)
            await swept(1)  # still offline: stays behind
            assert net.ovs.bridges[default["bridge"]]["networks"] == {}
            agents.offline.clear()
            clock.advance(30)
            await swept(2)
            assert net.ovs.bridges[default["bridge"]]["networks"] == {body["data"]["uuid"]: 0}
            assert node["uuid"] not in {n["uuid"] for n in await sync.out_of_step()}
        finally:
            await sync.stopService()
        assert clock.getDelayedCalls() == []
