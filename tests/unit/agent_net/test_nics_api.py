"""The agent's NIC, address and bond endpoints, for real inside a network namespace and against the
in-memory kernel (one contract, both must pass it)."""
import pytest_twisted

from kvmdesk.agent.net import errors as agent_errors
from kvmdesk.agent.net.netlink import MemoryNetlink, Netlink
from kvmdesk.agent.net.ovs import MemoryOvs
from kvmdesk.agent.net.routes import NetAgent
from kvmdesk.testing.agent_net import AgentHarness
from kvmdesk.core import errors


def agent(netlink):
    return AgentHarness(NetAgent(netlink, MemoryOvs()))


def nic(nics, name):
    return next(n for n in nics if n["name"] == name)


def addresses(nics, name):
    return [(a["ip"], a["prefixlen"], a["label"]) for a in nic(nics, name)["addresses"]]


@pytest_twisted.ensureDeferred
async def test_list_nics(netlink):
    status, body = await agent(netlink).call("GET", "/net/nics")
    assert status == 200 and body["code"] == 0
    names = [n["name"] for n in body["data"]]
    assert {"eth1", "eth2", "eth3"} <= set(names) and "lo" not in names
    eth1 = nic(body["data"], "eth1")
    assert eth1["kind"] == "veth" and eth1["up"] is True and eth1["addresses"] == [] and eth1["bond"] is None
    assert len(eth1["mac"].split(":")) == 6


@pytest_twisted.ensureDeferred
async def test_secondary_addresses_add_change_remove(netlink):
    api = agent(netlink)
    status, body = await api.call("POST", "/net/nics/eth1/addresses", {"ip": "192.168.50.10", "netmask": "255.255.255.0"})
    assert status == 200, body
    assert addresses(body["data"], "eth1") == [("192.168.50.10", 24, "eth1")]
    status, body = await api.call("POST", "/net/nics/eth1/addresses", {"ip": "192.168.50.11", "netmask": "255.255.255.0"})
    assert addresses(body["data"], "eth1") == [("192.168.50.10", 24, "eth1"), ("192.168.50.11", 24, "eth1:0")]
    assert nic(body["data"], "eth1")["addresses"][1]["secondary"] is True

    status, body = await api.call("PUT", "/net/nics/eth1/addresses/192.168.50.11", {"ip": "192.168.50.12", "netmask": "24"})
    assert status == 200, body
    assert addresses(body["data"], "eth1") == [("192.168.50.10", 24, "eth1"), ("192.168.50.12", 24, "eth1:0")]

    # removing the primary keeps the secondary (the kernel alone would drop it)
    status, body = await api.call("DELETE", "/net/nics/eth1/addresses/192.168.50.10")
    assert status == 200, body
    assert [ip for ip, _, _ in addresses(body["data"], "eth1")] == ["192.168.50.12"]

    for method, path, request, status_code, error, words in [
        ("POST", "/net/nics/eth2/addresses", {"ip": "192.168.50.12", "netmask": "24"}, 409, agent_errors.ADDRESS_EXISTS,
         ["192.168.50.12", "eth1"]),
        ("POST", "/net/nics/eth9/addresses", {"ip": "192.168.60.1", "netmask": "24"}, 404, agent_errors.NO_SUCH_NIC,
         ["eth9"]),
        ("DELETE", "/net/nics/eth1/addresses/192.168.50.99", None, 404, agent_errors.ADDRESS_MISSING, ["192.168.50.99"]),
        ("PUT", "/net/nics/eth1/addresses/192.168.50.99", {"ip": "192.168.50.5", "netmask": "24"}, 404,
         agent_errors.ADDRESS_MISSING, ["192.168.50.99"]),
        ("POST", "/net/nics/eth1/addresses", {"ip": "192.168.50.300", "netmask": "24"}, 400, agent_errors.BAD_BRIDGE,
         ["192.168.50.300"]),
    ]:
        status, body = await api.call(method, path, request)
        assert (status, body["code"]) == (status_code, error.code), body
        assert all(w in body["msg"] for w in words), body["msg"]
        assert body["data"]["params"]  # the controller re-renders the message from these
    status, body = await api.call("GET", "/net/nics")
    assert [ip for ip, _, _ in addresses(body["data"], "eth1")] == ["192.168.50.12"]
    assert addresses(body["data"], "eth2") == []


@pytest_twisted.ensureDeferred
async def test_gateway_is_installed_only_where_the_node_has_none(netlink):
    api = agent(netlink)
    status, body = await api.call("POST", "/net/nics/eth1/addresses",
                                  {"ip": "10.20.0.5", "netmask": "255.255.0.0", "gateway": "10.20.0.1"})
    assert status == 200, body
    assert nic(body["data"], "eth1")["gateway"] == "10.20.0.1"
    status, body = await api.call("POST", "/net/nics/eth2/addresses",
                                  {"ip": "10.30.0.5", "netmask": "255.255.0.0", "gateway": "10.30.0.1"})
    assert status == 200, body
    assert nic(body["data"], "eth2")["gateway"] is None and nic(body["data"], "eth1")["gateway"] == "10.20.0.1"


@pytest_twisted.ensureDeferred
async def test_bond_without_the_bonding_driver_is_a_clear_error_and_changes_nothing(netlink):
    api = agent(netlink)
    await api.call("POST", "/net/nics/eth1/addresses", {"ip": "192.168.70.10", "netmask": "24"})
    status, before = await api.call("GET", "/net/nics")
    status, body = await api.call("POST", "/net/bonds", {"name": "bond0", "mode": 1, "slaves": ["eth1", "eth2"],
                                                         "addresses": [{"ip": "192.168.70.10", "netmask": "24"}]})
    assert (status, body["code"]) == (501, agent_errors.BOND_DRIVER_MISSING.code), body
    assert "bonding driver is missing" in body["msg"] and "bond0" in body["msg"]
    assert "Unknown device type" in body["msg"]
    status, zh = await api.call("POST", "/net/bonds", {"name": "bond0", "mode": 1, "slaves": ["eth1"]}, lang="zh")
    assert "缺少Linux bonding驱动" in zh["msg"]
    status, after = await api.call("GET", "/net/nics")
    assert after["data"] == before["data"]


@pytest_twisted.ensureDeferred
async def test_bond_requests_are_validated_before_netlink(netlink):
    api = agent(netlink)
    for request, status_code, code, word in [
        ({"name": "bond0", "mode": 2, "slaves": ["eth1"]}, 400, agent_errors.BOND_MODE.code, "mode 2"),
        ({"name": "bond0", "mode": 1, "slaves": ["eth9"]}, 404, agent_errors.NO_SUCH_NIC.code, "eth9"),
        ({"name": "eth1", "mode": 1, "slaves": ["eth2"]}, 409, agent_errors.BOND_EXISTS.code, "eth1"),
        ({"name": "bond0", "mode": 1, "slaves": []}, 400, errors.INVALID_PARAM.code, "slaves"),
    ]:
        status, body = await api.call("POST", "/net/bonds", request)
        assert (status, body["code"]) == (status_code, code), body
        assert word in body["msg"]
    status, body = await api.call("PUT", "/net/bonds/eth1", {"mode": 1, "slaves": ["eth2"]})
    assert (status, body["code"]) == (404, agent_errors.NOT_A_BOND.code)
    status, body = await api.call("DELETE", "/net/bonds/eth1", {"inherit": []})
    assert (status, body["code"]) == (404, agent_errors.NOT_A_BOND.code)
    status, body = await api.call("GET", "/net/bonds")
    assert body["data"] == []


@pytest_twisted.ensureDeferred
async def test_bond_lifecycle_through_the_api_where_the_driver_exists():
    memory = MemoryNetlink({"eth1": {"kind": "veth"}, "eth2": {"kind": "veth"}, "eth3": {"kind": "veth"}}, bonding=True)
    api = agent(memory)
    status, body = await api.call("POST", "/net/bonds", {"name": "bond0", "mode": 6, "slaves": ["eth1", "eth2"],
                                                         "addresses": [{"ip": "192.168.1.76", "netmask": "24"}],
                                                         "gateway": "192.168.1.254"})
    assert status == 200, body
    status, body = await api.call("GET", "/net/bonds")
    (bond,) = body["data"]
    assert (bond["name"], bond["bond"], bond["gateway"]) == ("bond0", {"mode": 6, "slaves": ["eth1", "eth2"]}, "192.168.1.254")
    status, body = await api.call("PUT", "/net/bonds/bond0", {"mode": 1, "slaves": ["eth1", "eth2", "eth3"],
                                                              "addresses": [{"ip": "192.168.1.77", "netmask": "24"}]})
    assert status == 200, body
    assert addresses(body["data"], "bond0") == [("192.168.1.77", 24, "bond0")]
    assert nic(body["data"], "bond0")["gateway"] == "192.168.1.254"  # back after the mode change
    status, body = await api.call("DELETE", "/net/bonds/bond0", {"inherit": [
        {"nic": "eth3", "ip": "192.168.1.77", "netmask": "255.255.255.0"}]})
    assert status == 200, body
    assert addresses(body["data"], "eth3") == [("192.168.1.77", 24, "eth3")]
    assert nic(body["data"], "eth3")["gateway"] == "192.168.1.254"


@pytest_twisted.ensureDeferred
async def test_calls_without_the_node_secret_are_refused(netlink):
    api = agent(netlink)
    for token in (None, "wrong"):
        status, body = await api.call("GET", "/net/nics", token=token)
        assert (status, body["code"]) == (401, errors.UNAUTHENTICATED.code)
        status, body = await api.call("POST", "/net/nics/eth1/addresses", {"ip": "192.168.80.1", "netmask": "24"},
                                      token=token)
        assert status == 401
    status, body = await api.call("GET", "/net/nics")
    assert addresses(body["data"], "eth1") == []


@pytest_twisted.ensureDeferred
async def test_a_missing_namespace_is_reported(namespaces):
    status, body = await agent(Netlink(netns="kvt-does-not-exist")).call("GET", "/net/nics")
    assert (status, body["code"]) == (503, agent_errors.NETNS_MISSING.code)
    assert "kvt-does-not-exist" in body["msg"]
