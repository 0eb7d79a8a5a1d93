"""The Open vSwitch driver through the agent's API: against a private Open vSwitch (netdev datapath,
ovs-vswitchd inside a namespace the test owns) and against the in-memory switch (same contract)."""
import pytest
import pytest_twisted

from kvmdesk.agent.net import errors as agent_errors
from kvmdesk.agent.net.netlink import MemoryNetlink
from kvmdesk.agent.net.ovs import MemoryOvs, OvsDriver
from kvmdesk.agent.net.routes import NetAgent
from kvmdesk.testing.agent_net import AgentHarness
from kvmdesk.core import errors

SWITCH = "5b2f0c1e-0000-4000-8000-000000000001"
NET12 = "aaaaaaaa-0000-4000-8000-000000000012"
NET13 = "aaaaaaaa-0000-4000-8000-000000000013"
DEVICES = ("up0", "up1", "pa", "pb")


@pytest.fixture(params=["ovs", "memory"])
def switch_api(request):
    if request.param == "memory":
        ovs = MemoryOvs(devices=set(DEVICES))
    else:
        private = request.getfixturevalue("private_ovs")
        spaces = request.getfixturevalue("namespaces")
        for name in DEVICES:
            spaces.veth(private.netns, name, private.netns, name + "x")
        ovs = OvsDriver(str(private.dir), "netdev")
    return AgentHarness(NetAgent(MemoryNetlink({}), ovs))


def state(uplink="up0", networks=None, bridge="kvs-5b2f0c1e", type="vlan"):
    return {"bridge": bridge, "type": type, "uplink": uplink, "networks": networks or {}}


async def bridges(api):
    status, body = await api.call("GET", "/net/switches")
    assert status == 200, body
    return body["data"]


@pytest_twisted.ensureDeferred
async def test_switch_bridge_uplink_and_network_binding(switch_api):
    api = switch_api
    status, body = await api.call("PUT", f"/net/switches/{SWITCH}", state(networks={NET12: 12, NET13: 13}))
    assert status == 200, body
    bridge = body["data"]
    assert (bridge["bridge"], bridge["switch_uuid"], bridge["uplink"], bridge["datapath_type"]) == (
        "kvs-5b2f0c1e", SWITCH, "up0", "netdev")
    assert bridge["networks"] == {NET12: 12, NET13: 13}
    # idempotent: the same state again changes nothing
    status, again = await api.call("PUT", f"/net/switches/{SWITCH}", state(networks={NET12: 12, NET13: 13}))
    assert status == 200 and again["data"] == bridge
    assert await bridges(api) == [bridge]

    status, body = await api.call("GET", f"/net/networks/{NET13}")
    assert body["data"] == {"network_uuid": NET13, "switch_uuid": SWITCH, "bridge": "kvs-5b2f0c1e", "tag": 13,
                            "datapath_type": "netdev"}
    status, body = await api.call("GET", "/net/networks/bbbbbbbb-0000-4000-8000-000000000000")
    assert (status, body["code"]) == (404, agent_errors.NO_SUCH_NETWORK.code)


@pytest_twisted.ensureDeferred
async def test_an_uplink_that_cannot_work_is_refused_although_ovs_vsctl_succeeds(switch_api):
    api = switch_api
    status, body = await api.call("PUT", f"/net/switches/{SWITCH}", state(uplink="nosuch0"))
    assert (status, body["code"]) == (500, agent_errors.OVS_PORT_FAILED.code), body
    assert "nosuch0" in body["msg"] and "No such device" in body["msg"]
    assert await bridges(api) == []  # the new bridge went with it

    await api.call("PUT", f"/net/switches/{SWITCH}", state(uplink="up0"))
    status, body = await api.call("PUT", f"/net/switches/{SWITCH}", state(uplink="nosuch1"))
    assert body["code"] == agent_errors.OVS_PORT_FAILED.code
    (bridge,) = await bridges(api)
    assert bridge["uplink"] == "up0"  # the old uplink stays until a new one works
    status, body = await api.call("PUT", f"/net/switches/{SWITCH}", state(uplink="up1"))
    assert status == 200 and body["data"]["uplink"] == "up1"
    assert [p["name"] for p in body["data"]["ports"]] == ["up1"]


@pytest_twisted.ensureDeferred
async def test_access_ports_follow_their_network(switch_api):
    api = switch_api
    await api.call("PUT", f"/net/switches/{SWITCH}", state(networks={NET12: 12, NET13: 13}))
    status, body = await api.call("POST", f"/net/networks/{NET12}/ports", {"port": "pa"})
    assert status == 200, body
    assert (body["data"]["bridge"], body["data"]["tag"], body["data"]["port"]) == ("kvs-5b2f0c1e", 12, "pa")
    assert isinstance(body["data"]["ofport"], int) and body["data"]["ofport"] > 0
    await api.call("POST", f"/net/networks/{NET13}/ports", {"port": "pb"})

    status, body = await api.call("POST", f"/net/networks/{NET12}/ports", {"port": "nosuch2"})
    assert (status, body["code"]) == (500, agent_errors.OVS_PORT_FAILED.code)

    # retag network 12 to 22, drop network 13: its port leaves the bridge
    status, body = await api.call("PUT", f"/net/switches/{SWITCH}", state(networks={NET12: 22}))
    ports = {p["name"]: p for p in body["data"]["ports"]}
    assert set(ports) == {"up0", "pa"}
    assert (ports["pa"]["tag"], ports["pa"]["role"], ports["pa"]["network_uuid"]) == (22, "access", NET12)
    assert ports["up0"]["role"] == "uplink" and ports["up0"]["tag"] is None

    status, body = await api.call("DELETE", "/net/ports/pa")
    assert status == 200
    status, body = await api.call("DELETE", "/net/ports/pa")
    assert (status, body["code"]) == (404, errors.NOT_FOUND.code)

    status, body = await api.call("DELETE", f"/net/switches/{SWITCH}")
    assert body["data"] == {"deleted": True}
    assert await bridges(api) == []
    status, body = await api.call("DELETE", f"/net/switches/{SWITCH}")
    assert body["data"] == {"deleted": False}


@pytest_twisted.ensureDeferred
async def test_bad_switch_states_are_refused(switch_api):
    for request, field in [
        (state(bridge="a-bridge-name-too-long"), "bridge"),
        (state(type="vxlan"), "type"),
        (state(networks={NET12: 4095}), "networks"),
    ]:
        status, body = await switch_api.call("PUT", f"/net/switches/{SWITCH}", request)
        assert (status, body["code"]) == (400, agent_errors.BAD_BRIDGE.code), body
        assert field in body["msg"]


@pytest_twisted.ensureDeferred
async def test_unreachable_ovs_is_a_clear_error(tmp_path):
    api = AgentHarness(NetAgent(MemoryNetlink({}), OvsDriver(str(tmp_path), "netdev", timeout=1)))
    status, body = await api.call("GET", "/net/switches")
    assert (status, body["code"]) == (503, agent_errors.OVS_UNAVAILABLE.code)
    assert "db.sock" in body["msg"]


@pytest_twisted.ensureDeferred
async def test_system_datapath_refuses_an_uplink_that_carries_addresses(tmp_path):
    async def nic_addresses(name):
        return ["10.0.0.5/24"] if name == "eth0" else []

    driver = OvsDriver(str(tmp_path), "system", timeout=1, nic_addresses=nic_addresses)
    api = AgentHarness(NetAgent(MemoryNetlink({}), driver))
    status, body = await api.call("PUT", f"/net/switches/{SWITCH}", state(uplink="eth0"))
    assert (status, body["code"]) == (409, agent_errors.UPLINK_HAS_ADDRESSES.code)
    assert "eth0" in body["msg"] and "10.0.0.5/24" in body["msg"]
    with pytest.raises(ValueError, match="netdev"):
        OvsDriver(str(tmp_path), "kernel")
