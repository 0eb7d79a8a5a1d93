"""The controller's API driving real node-side networking: netlink inside a namespace standing for the
node, and a private Open vSwitch (netdev datapath) whose ports are that namespace's devices."""
import pytest_twisted

from kvmdesk.agent.net.netlink import Netlink
from kvmdesk.agent.net.ovs import MemoryOvs, OvsDriver
from kvmdesk.agent.net.routes import NetAgent
from kvmdesk.testing.agent_net import ping, tcp_exchange
from kvmdesk.plugins.network import errors as net_errors
from kvmdesk.testing.network import InProcessAgents, add_agent_node, assert_error, snapshot
from kvmdesk.testing.api import api_client

EN = {"Accept-Language": "en"}


def node_namespace(namespaces, netns, ip):
    """NICs of the node: eth0 carrying its address, eth1 and eth2 free."""
    for nic in ("eth0", "eth1", "eth2"):
        namespaces.veth(netns, nic, netns, nic + "x")
    namespaces.run(netns, "ip", "addr", "add", f"{ip}/24", "dev", "eth0")


@pytest_twisted.ensureDeferred
async def test_vlan_12_ports_reach_each_other_and_vlan_13_is_isolated(tmp_path, private_ovs, namespaces):
    node_ns = private_ovs.netns
    node_namespace(namespaces, node_ns, "10.0.0.1")
    guests = {}
    for i, port in enumerate(("pa", "pb", "pc"), start=1):
        guest = namespaces.add("vm")
        namespaces.veth(guest, "eth0", node_ns, port)
        namespaces.run(guest, "ip", "addr", "add", f"10.77.0.{i}/24", "dev", "eth0")
        guests[port] = (guest, f"10.77.0.{i}")

    async with api_client(tmp_path) as api:
        agents = InProcessAgents()
        api.core.extensions["agents"] = agents
        net = NetAgent(Netlink(netns=node_ns), OvsDriver(str(private_ovs.dir), "netdev"))
        node = await add_agent_node(api.core, agents, "n1", "10.0.0.1", net)
        assert {"eth0", "eth1", "eth2"} <= set(node["nics"])

        status, body = await api.call("POST", "/resource_mgr/vswitchs", {"name": "sw", "type": "vlan", "uplinks": [
            {"node_uuid": node["uuid"], "nic_uuid": node["nics"]["eth1"]["uuid"]}]})
        assert status == 200, body
        switch = body["data"]
        networks = {}
        for vlan in (12, 13):
            status, body = await api.call("POST", "/resource_mgr/data_networks",
                                          {"name": f"v{vlan}", "switch_uuid": switch["uuid"], "vlan_id": vlan})
            assert status == 200, body
            networks[vlan] = body["data"]["uuid"]
        assert private_ovs.vsctl("list-br").stdout.split() == [switch["bridge"]]

        agent = agents.harnesses["10.0.0.1"]
        for port, vlan in (("pa", 12), ("pb", 12), ("pc", 13)):
            status, body = await agent.call("POST", f"/net/networks/{networks[vlan]}/ports", {"port": port})
            assert status == 200 and body["data"]["tag"] == vlan, body

        (a, ip_a), (b, ip_b), (c, ip_c) = guests["pa"], guests["pb"], guests["pc"]
        assert ping(namespaces, a, ip_b, attempts=3), private_ovs.log()
        assert ping(namespaces, b, ip_a)
        assert tcp_exchange(namespaces, a, ip_a, b) == 200_000
        assert not ping(namespaces, a, ip_c, timeout=1.0)
        assert not ping(namespaces, c, ip_a, timeout=1.0)

        # retagging a network through the API retags its ports on the node
        status, body = await api.call("PUT", f"/resource_mgr/data_networks/{networks[13]}", {"vlan_id": 14})
        assert status == 200
        assert "tag                 : 14" in private_ovs.vsctl("list", "Port", "pc").stdout

        status, body = await api.call("DELETE", "/resource_mgr/data_networks", {"uuids": list(networks.values())})
        assert status == 200 and body["data"]["success_num"] == 2
        status, body = await api.call("DELETE", "/resource_mgr/vswitchs", {"uuids": [switch["uuid"]]})
        assert status == 200, body
        assert private_ovs.vsctl("list-br").stdout.split() == []


@pytest_twisted.ensureDeferred
async def test_node_addresses_and_bonds_against_the_kernel(tmp_path, namespaces):
    node_ns = namespaces.add("node")
    node_namespace(namespaces, node_ns, "10.0.0.1")
    async with api_client(tmp_path) as api:
        agents = InProcessAgents()
        api.core.extensions["agents"] = agents
        node = await add_agent_node(api.core, agents, "n1", "10.0.0.1", NetAgent(Netlink(netns=node_ns), MemoryOvs()))
        nics = node["nics"]
        base = f"/resource_mgr/nodes/{node['uuid']}"
        status, body = await api.call("POST", f"{base}/nics/{nics['eth1']['uuid']}/ip_infos",
                                      {"ip": "192.168.9.10", "netmask": "255.255.255.0", "dns1": "8.8.8.8"})
        assert status == 200, body
        added = body["data"]
        status, body = await api.call("POST", f"{base}/nics/{nics['eth1']['uuid']}/ip_infos",
                                      {"ip": "192.168.9.11", "netmask": "255.255.255.0"})
        assert body["data"]["name"] == "eth1:0"
        status, body = await api.call("PUT", f"{base}/nics/{nics['eth1']['uuid']}/ip_infos/{added['uuid']}",
                                      {"ip": "192.168.9.20", "netmask": "255.255.255.0", "dns1": "8.8.8.8"})
        assert status == 200 and body["data"]["uuid"] == added["uuid"]
        shown = namespaces.run(node_ns, "ip", "-4", "-o", "addr", "show", "dev", "eth1").stdout
        assert "192.168.9.20/24" in shown and "192.168.9.11/24" in shown and "192.168.9.10/" not in shown

        before = await snapshot(api.core)
        status, body = await api.call("POST", f"{base}/bond", {
            "bond_name": "bond0", "mode": 1, "slaves": [nics["eth1"]["uuid"], nics["eth2"]["uuid"]],
            "ip_list": [{"ip": "192.168.9.20", "netmask": "255.255.255.0"}, {"ip": "192.168.9.11", "netmask": "24"}],
            "gate_info": {"gateway": "192.168.9.254", "dns1": "8.8.8.8", "dns2": ""}}, headers=EN)
        assert_error(status, body, 502, net_errors.AGENT_FAILED.code, "n1", "bonding driver is missing", "bond0")
        assert body["data"]["agent_code"] == 3502
        assert await snapshot(api.core) == before
        assert namespaces.run(node_ns, "ip", "-4", "-o", "addr", "show", "dev", "eth1").stdout == shown
