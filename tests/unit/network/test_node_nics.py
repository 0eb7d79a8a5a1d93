"""A node's NICs, secondary addresses and bonds (contract #10-#16 / #38-#40) through in-process agents."""
import pytest_twisted

from kvmdesk.core import errors
from kvmdesk.plugins.network import errors as net_errors
from kvmdesk.testing.network import InProcessAgents, add_agent_node, assert_error, snapshot
from kvmdesk.testing.api import api_client

EN = {"Accept-Language": "en"}


async def setup(api, **node_args):
    agents = InProcessAgents()
    api.core.extensions["agents"] = agents
    n1 = await add_agent_node(api.core, agents, "n1", "10.0.0.1", **node_args)
    n2 = await add_agent_node(api.core, agents, "n2", "10.0.0.2")
    return agents, n1, n2


def base(node):
    return f"/resource_mgr/nodes/{node['uuid']}"


def kernel_addresses(node, nic):
    return [a["ip"] for a in node["net"].netlink.links[nic]["addresses"]]


@pytest_twisted.ensureDeferred
async def test_list_nics_with_addresses_and_roles(tmp_path):
    async with api_client(tmp_path) as api:
        agents, n1, n2 = await setup(api)
        status, body = await api.call("GET", f"{base(n1)}/nics")
        assert status == 200, body
        eth0, eth1, eth2 = body["data"]
        assert (eth0["nic"], eth0["status"], eth0["type"], eth0["speed"], eth0["mac"]) == ("eth0", 2, 0, 1000, "52:54:00:aa:00:00")
        (ip,) = eth0["ip_info"]
        assert (ip["ip"], ip["netmask"], ip["is_manage"], ip["is_image"], ip["name"]) == ("10.0.0.1", "255.255.255.0", 1, 1, "eth0")
        assert eth1["ip_info"] == [] and eth1["is_manage"] == 0

        # what the node changed behind the controller's back shows on the next listing
        n1["net"].netlink.links["eth2"]["up"] = False
        status, body = await api.call("GET", f"{base(n1)}/nics")
        assert body["data"][2]["status"] == 1
        # an offline node still lists what the store knows
        agents.offline.add("10.0.0.1")
        status, offline = await api.call("GET", f"{base(n1)}/nics")
        assert status == 200 and offline["data"] == body["data"]
        status, body = await api.call("GET", "/resource_mgr/nodes/nope/nics")
        assert status == 404


@pytest_twisted.ensureDeferred
async def test_add_and_change_secondary_addresses(tmp_path):
    async with api_client(tmp_path) as api:
        agents, n1, n2 = await setup(api)
        eth1 = n1["nics"]["eth1"]
        status, body = await api.call("POST", f"{base(n1)}/nics/{eth1['uuid']}/ip_infos", {
            "ip": "192.168.1.49", "netmask": "255.255.255.0", "gateway": "192.168.1.245", "dns1": "114.114.114.114",
            "dns2": "8.8.8.8"})
        assert status == 200, body
        added = body["data"]
        assert (added["ip"], added["gateway"], added["dns1"], added["name"], added["is_manage"]) == (
            "192.168.1.49", "192.168.1.245", "114.114.114.114", "eth1", 0)
        assert kernel_addresses(n1, "eth1") == ["192.168.1.49"]
        # the contract's table spelling: wrapped in ip_info
        status, body = await api.call("POST", f"{base(n1)}/nics/{eth1['uuid']}/ip_infos",
                                      {"ip_info": {"ip": "192.168.1.50", "netmask": "255.255.255.0"}})
        assert status == 200 and body["data"]["name"] == "eth1:0"

        status, body = await api.call("PUT", f"{base(n1)}/nics/{eth1['uuid']}/ip_infos/{added['uuid']}", {
            "ip": "192.168.1.60", "netmask": "255.255.255.0", "gateway": "192.168.1.1", "dns1": "8.8.4.4"})
        assert status == 200, body
        changed = body["data"]
        assert (changed["uuid"], changed["ip"], changed["gateway"], changed["dns1"], changed["dns2"]) == (
            added["uuid"], "192.168.1.60", "192.168.1.1", "8.8.4.4", "")
        assert sorted(kernel_addresses(n1, "eth1")) == ["192.168.1.50", "192.168.1.60"]

        status, body = await api.call("DELETE", f"{base(n1)}/nics/{eth1['uuid']}/ip_infos/{changed['uuid']}")
        assert status == 200 and kernel_addresses(n1, "eth1") == ["192.168.1.50"]


@pytest_twisted.ensureDeferred
async def test_address_refusals_change_nothing(tmp_path):
    async with api_client(tmp_path) as api:
        agents, n1, n2 = await setup(api)
        eth1, eth0 = n1["nics"]["eth1"], n1["nics"]["eth0"]
        await api.call("POST", f"{base(n1)}/nics/{eth1['uuid']}/ip_infos", {"ip": "192.168.1.49", "netmask": "24"})
        manage = (await api.core.store.collection("node_ip_infos").find_one({"ip": "10.0.0.1"}))
        before = await snapshot(api.core)
        add = f"{base(n1)}/nics/{eth1['uuid']}/ip_infos"
        for request, status_code, code, words in [
            ({"ip": "10.0.0.2", "netmask": "24"}, 409, net_errors.MANAGE_IP_CONFLICT.code, ["10.0.0.2", "n2"]),
            ({"ip": "192.168.1.49", "netmask": "24"}, 409, net_errors.IP_ON_NODE.code, ["192.168.1.49", "eth1"]),
            ({"ip": "192.168.1.0", "netmask": "24"}, 400, net_errors.NOT_A_HOST.code, ["network address"]),
            ({"ip": "192.168.1.70", "netmask": "24", "gateway": "10.9.9.9"}, 400, net_errors.OUTSIDE_NETWORK.code,
             ["gateway", "10.9.9.9"]),
            ({"ip": "192.168.1.70", "netmask": "24", "dns1": "x"}, 400, net_errors.BAD_ADDRESS.code, ["dns1"]),
            ({"ip": "192.168.1.70"}, 400, errors.INVALID_PARAM.code, ["netmask"]),
        ]:
            status, body = await api.call("POST", add, request, headers=EN)
            assert_error(status, body, status_code, code, *words)
        # a NIC of another node in this node's path
        status, body = await api.call("POST", f"{base(n1)}/nics/{n2['nics']['eth1']['uuid']}/ip_infos",
                                      {"ip": "192.168.1.71", "netmask": "24"}, headers=EN)
        assert_error(status, body, 404, errors.NOT_FOUND.code)
        # the management address cannot change under the controller's feet
        status, body = await api.call("PUT", f"{base(n1)}/nics/{eth0['uuid']}/ip_infos/{manage['uuid']}",
                                      {"ip": "10.0.0.9", "netmask": "24"}, headers=EN)
        assert_error(status, body, 409, net_errors.MANAGE_IP_LOCKED.code, "10.0.0.1", "management network")
        status, body = await api.call("DELETE", f"{base(n1)}/nics/{eth0['uuid']}/ip_infos/{manage['uuid']}", headers=EN)
        assert_error(status, body, 409, net_errors.MANAGE_IP_LOCKED.code, "10.0.0.1")
        # the agent is the last word: an address the kernel already has elsewhere
        n1["net"].netlink.links["eth2"]["addresses"].append({"ip": "172.16.5.5", "prefixlen": 24, "label": "eth2",
                                                             "secondary": False})
        status, body = await api.call("POST", add, {"ip": "172.16.5.5", "netmask": "24"}, headers=EN)
        assert_error(status, body, 502, net_errors.AGENT_FAILED.code, "n1", "172.16.5.5", "eth2")
        n1["net"].netlink.links["eth2"]["addresses"].clear()
        agents.offline.add("10.0.0.1")
        status, body = await api.call("POST", add, {"ip": "192.168.1.72", "netmask": "24"}, headers=EN)
        assert_error(status, body, 503, net_errors.AGENT_UNREACHABLE.code, "n1", "Connection refused")
        assert await snapshot(api.core) == before


@pytest_twisted.ensureDeferred
async def test_bond_create_edit_delete_with_inherited_addresses(tmp_path):
    async with api_client(tmp_path) as api:
        agents, n1, n2 = await setup(api)
        nics = n1["nics"]
        eth1_ip = await api.call("POST", f"{base(n1)}/nics/{nics['eth1']['uuid']}/ip_infos",
                                 {"ip": "192.168.1.76", "netmask": "24"})
        status, body = await api.call("POST", f"{base(n1)}/bond", {
            "bond_name": "bond0", "mode": 0, "slaves": [nics["eth1"]["uuid"], nics["eth2"]["uuid"]],
            "ip_list": [{"ip": "192.168.1.76", "netmask": "255.255.255.0"}, {"ip": "192.168.1.77", "netmask": "255.255.255.0"}],
            "gate_info": {"gateway": "192.168.1.254", "dns1": "8.8.8.8", "dns2": ""}})
        assert status == 200, body
        bond = body["data"]
        assert (bond["nic"], bond["mode"], [s["nic"] for s in bond["slaves"]]) == ("bond0", 0, ["eth1", "eth2"])
        assert [(i["ip"], i["gateway"], i["dns1"]) for i in bond["ip_info"]] == [
            ("192.168.1.76", "192.168.1.254", "8.8.8.8"), ("192.168.1.77", "192.168.1.254", "8.8.8.8")]
        # the address that moved onto the bond kept its uuid
        assert bond["ip_info"][0]["uuid"] == eth1_ip[1]["data"]["uuid"]
        kernel = n1["net"].netlink.links
        assert kernel["eth1"]["master"] == "bond0" and kernel["eth1"]["addresses"] == []

        status, body = await api.call("GET", f"{base(n1)}/bond")
        assert [b["uuid"] for b in body["data"]] == [bond["uuid"]]
        status, body = await api.call("GET", f"{base(n1)}/nics")
        assert {n["nic"]: (n["type"], n["master"]) for n in body["data"]}["eth1"] == (0, bond["uuid"])

        status, body = await api.call("PUT", f"{base(n1)}/bond/{bond['uuid']}", {
            "mode": 1, "slaves": [nics["eth1"]["uuid"], nics["eth2"]["uuid"]],
            "ip_list": [{"ip": "192.168.1.77", "netmask": "255.255.255.0"}],
            "gate_info": {"gateway": "192.168.1.254", "dns1": "8.8.8.8", "dns2": ""}})
        assert status == 200, body
        assert body["data"]["mode"] == 1 and [i["ip"] for i in body["data"]["ip_info"]] == ["192.168.1.77"]
        assert kernel["bond0"]["bond_mode"] == 1

        kept = body["data"]["ip_info"][0]
        status, body = await api.call("DELETE", f"{base(n1)}/bond/{bond['uuid']}", {
            "inherit_infos": [{"nic_uuid": nics["eth2"]["uuid"], "ip_uuid": kept["uuid"]}]})
        assert status == 200, body
        assert "bond0" not in kernel and [a["ip"] for a in kernel["eth2"]["addresses"]] == ["192.168.1.77"]
        status, body = await api.call("GET", f"{base(n1)}/nics")
        by_name = {n["nic"]: n for n in body["data"]}
        assert set(by_name) == {"eth0", "eth1", "eth2"} and by_name["eth1"]["master"] is None
        (inherited,) = by_name["eth2"]["ip_info"]
        assert (inherited["uuid"], inherited["ip"], inherited["gateway"]) == (kept["uuid"], "192.168.1.77", "192.168.1.254")


@pytest_twisted.ensureDeferred
async def test_bond_refusals_change_nothing(tmp_path):
    async with api_client(tmp_path) as api:
        agents, n1, n2 = await setup(api)
        nics = n1["nics"]
        status, body = await api.call("POST", "/resource_mgr/vswitchs", {"name": "sw", "type": "vlan", "uplinks": [
            {"node_uuid": n1["uuid"], "nic_uuid": nics["eth2"]["uuid"]},
            {"node_uuid": n2["uuid"], "nic_uuid": n2["nics"]["eth2"]["uuid"]}]})
        assert status == 200, body
        before = await snapshot(api.core)
        bond = {"bond_name": "bond0", "mode": 1, "slaves": [nics["eth1"]["uuid"]], "ip_list": [],
                "gate_info": {"gateway": "", "dns1": "", "dns2": ""}}
        for request, status_code, code, words in [
            ({**bond, "mode": 2}, 400, errors.INVALID_PARAM.code, ["mode", "bond mode 2 is not supported", "0 (balance-rr)"]),
            ({**bond, "slaves": [nics["eth1"]["uuid"], n2["nics"]["eth1"]["uuid"]]}, 400,
             net_errors.UPLINK_NIC_NOT_ON_NODE.code, ["slaves.1", "eth1", "n1"]),
            ({**bond, "slaves": [nics["eth2"]["uuid"]]}, 409, net_errors.UPLINK_IN_BOND.code, ["eth2", "sw"]),
            ({**bond, "slaves": [nics["eth0"]["uuid"]]}, 409, net_errors.ROLE_WOULD_BE_LOST.code,
             ["10.0.0.1", "management network", "ip_list"]),
            ({**bond, "ip_list": [{"ip": "10.0.0.2", "netmask": "24"}]}, 409, net_errors.MANAGE_IP_CONFLICT.code, ["n2"]),
            ({**bond, "ip_list": [{"ip": "10.0.0.1", "netmask": "24"}]}, 409, net_errors.IP_ON_NODE.code, ["eth0"]),
            ({**bond, "bond_name": "eth0"}, 409, errors.ALREADY_EXISTS.code, ["eth0"]),
            ({**bond, "slaves": []}, 400, errors.INVALID_PARAM.code, ["slaves"]),
        ]:
            status, body = await api.call("POST", f"{base(n1)}/bond", request, headers=EN)
            assert_error(status, body, status_code, code, *words)
        status, body = await api.call("PUT", f"{base(n1)}/bond/{nics['eth1']['uuid']}", {k: v for k, v in bond.items()
                                                                                         if k != "bond_name"})
        assert status == 404
        assert await snapshot(api.core) == before
        assert "bond0" not in n1["net"].netlink.links


@pytest_twisted.ensureDeferred
async def test_bond_delete_refusals(tmp_path):
    async with api_client(tmp_path) as api:
        agents, n1, n2 = await setup(api)
        nics = n1["nics"]
        status, body = await api.call("POST", f"{base(n1)}/bond", {
            "bond_name": "bond0", "mode": 6, "slaves": [nics["eth1"]["uuid"]],
            "ip_list": [{"ip": "192.168.1.76", "netmask": "24"}], "gate_info": {}})
        bond = body["data"]
        ip_uuid = bond["ip_info"][0]["uuid"]
        before = await snapshot(api.core)
        for request, status_code, code, words in [
            ({"inherit_infos": [{"nic_uuid": n2["nics"]["eth1"]["uuid"], "ip_uuid": ip_uuid}]}, 400,
             net_errors.UPLINK_NIC_NOT_ON_NODE.code, ["inherit_infos.0.nic_uuid", "n1"]),
            ({"inherit_infos": [{"nic_uuid": nics["eth2"]["uuid"], "ip_uuid": "nope"}]}, 400,
             net_errors.INHERIT_INVALID.code, ["inherit_infos.0.ip_uuid", "bond0"]),
            ({"inherit_infos": [{"nic_uuid": bond["uuid"], "ip_uuid": ip_uuid}]}, 400, net_errors.NIC_IS_BOND.code,
             ["bond0"]),
        ]:
            status, body = await api.call("DELETE", f"{base(n1)}/bond/{bond['uuid']}", request, headers=EN)
            assert_error(status, body, status_code, code, *words)
        # the image role moved onto the bond: dropping its address is refused
        await api.core.store.collection("node_ip_infos").update_one({"uuid": ip_uuid}, {"$set": {"is_image": 1}})
        await api.core.store.collection("node_ip_infos").update_one({"ip": "10.0.0.1"}, {"$set": {"is_image": 0}})
        before = await snapshot(api.core)
        status, body = await api.call("DELETE", f"{base(n1)}/bond/{bond['uuid']}", {"inherit_infos": []}, headers=EN)
        assert_error(status, body, 409, net_errors.ROLE_WOULD_BE_LOST.code, "192.168.1.76", "image network", "inherit_infos")
        assert await snapshot(api.core) == before
        assert "bond0" in n1["net"].netlink.links


@pytest_twisted.ensureDeferred
async def test_a_node_known_offline_is_not_asked_for_a_listing(tmp_path):
    async with api_client(tmp_path) as api:
        agents, n1, n2 = await setup(api)
        await api.core.store.collection("nodes").update_one({"uuid": n1["uuid"]}, {"$set": {"state": "offline"}})
        asked = len(agents.calls)
        status, body = await api.call("GET", f"{base(n1)}/nics")
        assert status == 200 and [n["nic"] for n in body["data"]] == ["eth0", "eth1", "eth2"]
        assert len(agents.calls) == asked
