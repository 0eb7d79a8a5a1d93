"""Data networks and subnets (contract #42-#49): validation, counts, deletes, without node agents."""
import pytest_twisted

from kvmdesk import hookimpl
from kvmdesk.core import errors
from kvmdesk.core.plugins import make_plugin_manager
from kvmdesk.plugins.network import errors as net_errors
from kvmdesk.plugins.network import schema
from kvmdesk.testing.network import assert_error, snapshot, subnet_body
from kvmdesk.testing.api import api_client

NETS = "/resource_mgr/data_networks"
EN = {"Accept-Language": "en"}


async def make_switch(api, name="sw", type="vlan"):
    status, body = await api.call("POST", "/resource_mgr/vswitchs", {"name": name, "type": type, "uplinks": []})
    assert status == 200, body
    return body["data"]


async def default_switch(api):
    return await api.core.store.collection(schema.SWITCHES).find_one({"default": 1})


async def make_network(api, name, switch, vlan_id=None, **extra):
    request = {"name": name, "switch_uuid": switch["uuid"], **extra}
    if vlan_id is not None:
        request["vlan_id"] = vlan_id
    status, body = await api.call("POST", NETS, request)
    assert status == 200, body
    return body["data"]


@pytest_twisted.ensureDeferred
async def test_create_network_with_first_subnet_and_list_counts(tmp_path):
    async with api_client(tmp_path) as api:
        switch = await make_switch(api)
        net = await make_network(api, "net12", switch, 12, subnet_info=subnet_body("first"))
        assert (net["vlan_id"], net["switch_name"], net["switch_type"], net["switch"]) == (12, "sw", "vlan", switch["uuid"])
        assert net["subnet_count"] == 1 and net["default"] == 0 and "tag" not in net
        flat = await make_network(api, "flatnet", await default_switch(api))
        assert flat["vlan_id"] is None and flat["switch_type"] == "flat"

        status, body = await api.call("GET", NETS)
        assert body["data"]["count"] == 2
        assert {n["name"]: n["subnet_count"] for n in body["data"]["results"]} == {"net12": 1, "flatnet": 0}
        status, body = await api.call("GET", NETS, params={"searchtype": "single", "vlan_id": "12"})
        assert body["data"]["name"] == "net12"

        status, body = await api.call("GET", f"{NETS}/{net['uuid']}/sub_networks")
        (subnet,) = body["data"]["results"]
        assert subnet["cidr"] == "172.16.1.0/24" and subnet["network"] == net["uuid"]
        assert (subnet["ip_count"], subnet["used_count"], subnet["dns2"]) == (41, 0, "")

        status, body = await api.call("GET", "/resource_mgr/vswitchs", params={"searchtype": "single", "name": "sw"})
        assert body["data"]["network_count"] == 1


@pytest_twisted.ensureDeferred
async def test_vlan_rules_refuse_and_change_nothing(tmp_path):
    async with api_client(tmp_path) as api:
        vlan = await make_switch(api)
        flat = await default_switch(api)
        await make_network(api, "taken12", vlan, 12)
        await make_network(api, "flat-one", flat)
        before = await snapshot(api.core)
        cases = [
            ({"name": "a", "switch_uuid": vlan["uuid"]}, 400, net_errors.VLAN_REQUIRED.code, ["vlan_id", "sw"]),
            ({"name": "a", "switch_uuid": vlan["uuid"], "vlan_id": 0}, 400, net_errors.VLAN_REQUIRED.code, ["1 to 4094"]),
            ({"name": "a", "switch_uuid": vlan["uuid"], "vlan_id": 4095}, 400, net_errors.VLAN_REQUIRED.code, ["vlan_id"]),
            ({"name": "a", "switch_uuid": flat["uuid"], "vlan_id": 12}, 400, net_errors.VLAN_FORBIDDEN.code,
             ["vlan_id", "flat", "default"]),
            ({"name": "a", "switch_uuid": vlan["uuid"], "vlan_id": 12}, 409, net_errors.VLAN_TAKEN.code, ["12", "taken12"]),
            ({"name": "a", "switch_uuid": flat["uuid"]}, 409, net_errors.FLAT_TAKEN.code, ["flat-one"]),
            ({"name": "taken12", "switch_uuid": vlan["uuid"], "vlan_id": 20}, 409, errors.ALREADY_EXISTS.code, ["taken12"]),
            ({"name": "a", "switch_uuid": "nope", "vlan_id": 20}, 400, errors.INVALID_PARAM.code, ["switch_uuid"]),
            ({"name": "a", "switch_uuid": vlan["uuid"], "vlan_id": "x"}, 400, errors.INVALID_PARAM.code, ["vlan_id"]),
            # a bad first subnet refuses the network too
            ({"name": "a", "switch_uuid": vlan["uuid"], "vlan_id": 20, "subnet_info": subnet_body(gateway="172.16.1.20")},
             400, net_errors.GATEWAY_IN_RANGE.code, ["172.16.1.20"]),
            ({"name": "a", "switch_uuid": vlan["uuid"], "vlan_id": 20, "subnet_info": subnet_body(start="10.0.0.1")},
             400, net_errors.OUTSIDE_NETWORK.code, ["subnet_info.end_ip", "10.0.0.0/24"]),
        ]
        for request, status_code, code, words in cases:
            status, body = await api.call("POST", NETS, request, headers=EN)
            assert_error(status, body, status_code, code, *words)
        assert await snapshot(api.core) == before


@pytest_twisted.ensureDeferred
async def test_edit_network(tmp_path):
    async with api_client(tmp_path) as api:
        vlan = await make_switch(api)
        a = await make_network(api, "a", vlan, 12)
        await make_network(api, "b", vlan, 13)
        flat = await make_network(api, "f", await default_switch(api))

        status, body = await api.call("PUT", f"{NETS}/{a['uuid']}", {"name": "a2", "vlan_id": "14"})
        assert status == 200 and (body["data"]["name"], body["data"]["vlan_id"]) == ("a2", 14)
        before = await snapshot(api.core)
        for path, request, status_code, code, words in [
            (a["uuid"], {"vlan_id": 13}, 409, net_errors.VLAN_TAKEN.code, ["13", "b"]),
            (a["uuid"], {"vlan_id": None}, 400, net_errors.VLAN_REQUIRED.code, ["vlan_id"]),
            (a["uuid"], {"name": "b"}, 409, errors.ALREADY_EXISTS.code, ["b"]),
            (flat["uuid"], {"vlan_id": 3}, 400, net_errors.VLAN_FORBIDDEN.code, ["vlan_id"]),
            ("nope", {"name": "x"}, 404, errors.NOT_FOUND.code, ["nope"]),
        ]:
            status, body = await api.call("PUT", f"{NETS}/{path}", request, headers=EN)
            assert_error(status, body, status_code, code, *words)
        assert await snapshot(api.core) == before


@pytest_twisted.ensureDeferred
async def test_subnet_validation(tmp_path):
    async with api_client(tmp_path) as api:
        net = await make_network(api, "n", await make_switch(api), 12)
        sub = f"{NETS}/{net['uuid']}/sub_networks"
        # the contract's own example: two ranges of one /24 in one network
        for body in (subnet_body("s1", "172.16.1.10", "172.16.1.50"), subnet_body("s2", "172.16.1.51", "172.16.1.100")):
            status, answer = await api.call("POST", sub, body)
            assert status == 200, answer
        assert answer["data"]["cidr"] == "172.16.1.0/24" and answer["data"]["netmask"] == "255.255.255.0"
        before = await snapshot(api.core)
        cases = [
            (subnet_body("x", "172.16.1.40", "172.16.1.60"), 409, net_errors.SUBNET_OVERLAP.code, ["s1", "172.16.1.10-172.16.1.50"]),
            (subnet_body("x", "172.16.1.101", "172.16.1.120", gateway="172.16.1.30"), 409, net_errors.SUBNET_OVERLAP.code,
             ["s1", "gateway 172.16.1.30"]),
            (subnet_body("x", "172.16.0.10", "172.16.0.20", netmask="255.255.0.0", gateway="172.16.0.1"), 409,
             net_errors.SUBNET_OVERLAP.code, ["172.16.0.0/16 overlaps 172.16.1.0/24"]),
            (subnet_body("x", "172.16.1.110", "172.16.1.120", gateway="172.16.1.115"), 400, net_errors.GATEWAY_IN_RANGE.code,
             ["172.16.1.115", "172.16.1.110-172.16.1.120"]),
            (subnet_body("x", "172.16.1.120", "172.16.1.110"), 400, net_errors.RANGE_ORDER.code, ["172.16.1.120"]),
            (subnet_body("x", "172.16.1.110", "172.16.2.10"), 400, net_errors.OUTSIDE_NETWORK.code, ["end_ip", "172.16.2.10"]),
            (subnet_body("x", "172.16.1.110", "172.16.1.120", gateway="10.0.0.1"), 400, net_errors.OUTSIDE_NETWORK.code,
             ["gateway", "10.0.0.1"]),
            (subnet_body("x", "172.16.1.110", "172.16.1.120", gateway="172.16.1.0"), 400, net_errors.NOT_A_HOST.code,
             ["gateway", "network address"]),
            (subnet_body("x", "172.16.1.110", "172.16.1.255"), 400, net_errors.NOT_A_HOST.code, ["broadcast address"]),
            (subnet_body("x", "172.16.1.110", "172.16.1.120", netmask="255.0.255.0"), 400, net_errors.BAD_NETMASK.code,
             ["netmask"]),
            (subnet_body("x", "172.16.1.300", "172.16.1.120"), 400, net_errors.BAD_ADDRESS.code, ["start_ip", "172.16.1.300"]),
            (subnet_body("x", "172.16.1.110", "172.16.1.120", dns1="8.8.8"), 400, net_errors.BAD_ADDRESS.code, ["dns1"]),
            (subnet_body("x", "172.16.1.110", "172.16.1.120", dns2="dns.example"), 400, net_errors.BAD_ADDRESS.code, ["dns2"]),
            (subnet_body("s1", "172.16.1.110", "172.16.1.120"), 409, errors.ALREADY_EXISTS.code, ["s1"]),
            ({"name": "x", "start_ip": "172.16.1.110"}, 400, errors.INVALID_PARAM.code, ["end_ip"]),
        ]
        for request, status_code, code, words in cases:
            status, body = await api.call("POST", sub, request, headers=EN)
            assert_error(status, body, status_code, code, *words)
        assert await snapshot(api.core) == before
        status, body = await api.call("POST", f"{NETS}/nope/sub_networks", subnet_body("y"))
        assert status == 404

        # the same addresses are fine in another data network
        other = await make_network(api, "other", await default_switch(api))
        status, body = await api.call("POST", f"{NETS}/{other['uuid']}/sub_networks", subnet_body("s1", "172.16.1.40", "172.16.1.60"))
        assert status == 200, body


@pytest_twisted.ensureDeferred
async def test_edit_and_delete_subnets(tmp_path):
    async with api_client(tmp_path) as api:
        net = await make_network(api, "n", await make_switch(api), 12, subnet_info=subnet_body("s1"))
        sub = f"{NETS}/{net['uuid']}/sub_networks"
        status, body = await api.call("GET", sub)
        s1 = body["data"]["results"][0]
        status, body = await api.call("POST", sub, subnet_body("s2", "172.16.1.60", "172.16.1.70"))
        s2 = body["data"]

        status, body = await api.call("PUT", f"{sub}/{s1['uuid']}", {"end_ip": "172.16.1.20", "dns2": "114.114.114.114"})
        assert status == 200 and (body["data"]["end_ip"], body["data"]["dns2"], body["data"]["ip_count"]) == (
            "172.16.1.20", "114.114.114.114", 11)

        ipam = api.core.extensions["ipam"]
        await ipam.allocate(s1["uuid"], "172.16.1.20", owner="test")
        before = await snapshot(api.core)
        for path, request, status_code, code, words in [
            (s1["uuid"], {"end_ip": "172.16.1.15"}, 409, net_errors.ALLOCATION_OUTSIDE.code, ["172.16.1.20"]),
            (s1["uuid"], {"end_ip": "172.16.1.65"}, 409, net_errors.SUBNET_OVERLAP.code, ["s2"]),
            (s1["uuid"], {"name": "s2"}, 409, errors.ALREADY_EXISTS.code, ["s2"]),
            (s1["uuid"], {"gateway": None}, 400, errors.INVALID_PARAM.code, ["gateway"]),
            ("nope", {"name": "x"}, 404, errors.NOT_FOUND.code, ["nope"]),
        ]:
            status, body = await api.call("PUT", f"{sub}/{path}", request, headers=EN)
            assert_error(status, body, status_code, code, *words)
        status, body = await api.call("DELETE", sub, {"uuids": [s1["uuid"]]}, headers=EN)
        assert_error(status, body, 409, net_errors.SUBNET_IN_USE.code, "s1", "172.16.1.20")
        status, body = await api.call("DELETE", NETS, {"uuids": [net["uuid"]]}, headers=EN)
        assert_error(status, body, 409, net_errors.SUBNET_IN_USE.code, "s1")
        assert await snapshot(api.core) == before

        status, body = await api.call("GET", sub, params={"searchtype": "single", "name": "s1"})
        assert body["data"]["used_count"] == 1
        await ipam.release(s1["uuid"], "172.16.1.20")
        status, body = await api.call("DELETE", sub, {"uuids": [s1["uuid"], s2["uuid"]]})
        assert status == 200 and body["data"]["success_num"] == 2
        status, body = await api.call("GET", NETS)
        assert body["data"]["results"][0]["subnet_count"] == 0


class UsedNetworks:
    """A later plugin (desktops) saying one data network is in use."""

    def __init__(self):
        self.used: set[str] = set()

    @hookimpl
    def kvmdesk_usage(self, core, kind, uuid):
        if kind == "data_network" and uuid in self.used:
            return "2 desktop groups use it"
        return None


@pytest_twisted.ensureDeferred
async def test_delete_network_refused_while_in_use(tmp_path):
    plugins = make_plugin_manager()
    users = UsedNetworks()
    plugins.register(users)
    async with api_client(tmp_path, plugins=plugins) as api:
        switch = await make_switch(api)
        used = await make_network(api, "used", switch, 12, subnet_info=subnet_body())
        free = await make_network(api, "free", switch, 13, subnet_info=subnet_body())
        users.used.add(used["uuid"])
        before = await snapshot(api.core)
        status, body = await api.call("DELETE", NETS, {"uuids": [used["uuid"]]}, headers=EN)
        assert_error(status, body, 409, errors.IN_USE.code, "used", "2 desktop groups use it")
        assert await snapshot(api.core) == before

        status, body = await api.call("DELETE", NETS, {"uuids": [free["uuid"]]})
        assert status == 200, body
        assert await api.core.store.collection(schema.SUBNETS).count({"network_uuid": free["uuid"]}) == 0
        assert await api.core.store.collection(schema.NETWORKS).count() == 1
        # the switch is free of it: the tag can be used again
        await make_network(api, "again", switch, 13)
