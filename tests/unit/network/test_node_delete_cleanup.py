"""Deleting a node (#33) removes the bridges kvmdesk made on it (and their ports) through its agent;
what could not be removed (an unreachable agent) is reported in the delete answer's per-item data.

The nodes are on loopback addresses: releasing their (test) enrolment reaches nothing beyond this machine."""
import pytest_twisted

from kvmdesk.plugins.network import schema
from kvmdesk.testing.network import InProcessAgents, add_agent_node, memory_node_net
from kvmdesk.testing.api import api_client

NODES = "/resource_mgr/nodes"


async def node_with_bridge(api, agents):
    devices = {"eth0", "eth1", "eth2", "vnet0"}  # vnet0: a domain's port
    n1 = await add_agent_node(api.core, agents, "n1", "127.0.0.41", memory_node_net(ip="127.0.0.41", devices=devices))
    n2 = await add_agent_node(api.core, agents, "n2", "127.0.0.42", memory_node_net(ip="127.0.0.42", devices=devices))
    status, body = await api.call("POST", "/resource_mgr/vswitchs", {"name": "sw", "type": "vlan", "uplinks": [
        {"node_uuid": n["uuid"], "nic_uuid": n["nics"]["eth1"]["uuid"]} for n in (n1, n2)]})
    assert status == 200, body
    switch = body["data"]
    status, body = await api.call("POST", "/resource_mgr/data_networks",
                                  {"name": "v12", "switch_uuid": switch["uuid"], "vlan_id": 12})
    assert status == 200, body
    network = body["data"]
    for node in (n1, n2):
        harness = agents.harnesses[node["ip"]]
        status, body = await harness.call("POST", f"/net/networks/{network['uuid']}/ports", {"port": "vnet0"})
        assert status == 200, body
        assert set(node["net"].ovs.bridges) == {switch["bridge"]}
    return n1, n2, switch


@pytest_twisted.ensureDeferred
async def test_deleting_a_node_removes_its_bridges_and_reports_what_stayed(tmp_path):
    async with api_client(tmp_path) as api:
        agents = InProcessAgents()
        api.core.extensions["agents"] = agents
        n1, n2, switch = await node_with_bridge(api, agents)

        status, body = await api.call("DELETE", NODES, {"uuids": [n1["uuid"]]})
        assert status == 200 and body["data"]["success_num"] == 1, body
        assert "results" not in body["data"]  # nothing stayed behind
        assert n1["net"].ovs.bridges == {}  # the bridge and its port are gone from the node
        assert ("127.0.0.41", "DELETE", f"/net/switches/{switch['uuid']}", None) in agents.calls
        assert await api.core.store.collection(schema.UPLINKS).find({"node_uuid": n1["uuid"]}) == []

        # an agent that cannot be reached: the node goes, and the answer says which bridge stayed on it
        agents.offline.add("127.0.0.42")
        status, body = await api.call("DELETE", NODES, {"uuids": [n2["uuid"]]})
        assert status == 200 and body["data"]["success_num"] == 1, body
        (result,) = body["data"]["results"]
        assert result["uuid"] == n2["uuid"]
        (left,) = result["not_removed"]
        assert left["bridge"] == switch["bridge"] and left["switch_uuid"] == switch["uuid"] and left["reason"]
        assert set(n2["net"].ovs.bridges) == {switch["bridge"]}
        assert await api.core.store.collection(schema.NODES).find_one({"uuid": n2["uuid"]}) is None
