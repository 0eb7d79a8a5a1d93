"""Traffic through a private Open vSwitch driven by the agent: two ports on VLAN 12 reach each other,
a port on VLAN 13 is isolated from them (all addresses in one IP network, so only the VLANs separate)."""
import pytest_twisted

from kvmdesk.agent.net.netlink import MemoryNetlink
from kvmdesk.agent.net.ovs import OvsDriver
from kvmdesk.agent.net.routes import NetAgent
from kvmdesk.testing.agent_net import AgentHarness, ping, tcp_exchange

SWITCH = "5b2f0c1e-0000-4000-8000-0000000000aa"
NET12 = "aaaaaaaa-0000-4000-8000-000000000012"
NET13 = "aaaaaaaa-0000-4000-8000-000000000013"


def guests(namespaces, node_ns):
    """Three namespaces standing for domains, each with eth0 wired to a port in the node namespace."""
    hosts = {}
    for i, port in enumerate(("pa", "pb", "pc"), start=1):
        guest = namespaces.add("vm")
        namespaces.veth(guest, "eth0", node_ns, port)
        namespaces.run(guest, "ip", "addr", "add", f"10.77.0.{i}/24", "dev", "eth0")
        hosts[port] = (guest, f"10.77.0.{i}")
    return hosts


@pytest_twisted.ensureDeferred
async def test_vlans_on_a_private_open_vswitch(private_ovs, namespaces):
    namespaces.veth(private_ovs.netns, "up0", private_ovs.netns, "up0x")
    hosts = guests(namespaces, private_ovs.netns)
    api = AgentHarness(NetAgent(MemoryNetlink({}), OvsDriver(str(private_ovs.dir), "netdev")))
    status, body = await api.call("PUT", f"/net/switches/{SWITCH}", {"bridge": "kvs-traffic", "type": "vlan",
                                                                     "uplink": "up0", "networks": {NET12: 12, NET13: 13}})
    assert status == 200, body
    for port, network in (("pa", NET12), ("pb", NET12), ("pc", NET13)):
        status, body = await api.call("POST", f"/net/networks/{network}/ports", {"port": port})
        assert status == 200, body

    (a, ip_a), (b, ip_b), (c, ip_c) = hosts["pa"], hosts["pb"], hosts["pc"]
    assert ping(namespaces, a, ip_b, attempts=3), private_ovs.log()
    assert ping(namespaces, b, ip_a)
    assert tcp_exchange(namespaces, b, ip_b, a) == 200_000
    assert not ping(namespaces, a, ip_c, timeout=1.0)
    assert not ping(namespaces, c, ip_b, timeout=1.0)

    # the same port moved to VLAN 12 does answer: the isolation above was the VLAN's doing
    status, body = await api.call("POST", f"/net/networks/{NET12}/ports", {"port": "pc"})
    assert status == 200 and body["data"]["tag"] == 12
    assert ping(namespaces, a, ip_c, attempts=3)
