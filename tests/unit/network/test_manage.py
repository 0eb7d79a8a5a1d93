"""Management and image networks (contract #56-#58)."""
import pytest_twisted

from kvmdesk.core import errors
from kvmdesk.plugins.network import errors as net_errors
from kvmdesk.plugins.network import schema
from kvmdesk.testing.network import InProcessAgents, add_agent_node, assert_error, snapshot
from kvmdesk.testing.api import api_client

BASE = "/resource_mgr/manage_networks"
EN = {"Accept-Language": "en"}


async def setup(api):
    agents = InProcessAgents()
    api.core.extensions["agents"] = agents
    n1 = await add_agent_node(api.core, agents, "n1", "10.0.0.1")
    n2 = await add_agent_node(api.core, agents, "n2", "10.0.0.2")
    status, body = await api.call("POST", f"/resource_mgr/nodes/{n1['uuid']}/nics/{n1['nics']['eth1']['uuid']}/ip_infos",
                                  {"ip": "172.16.1.59", "netmask": "255.255.255.0"})
    assert status == 200, body
    return agents, n1, n2, body["data"]


async def ip_record(api, ip):
    return await api.core.store.collection(schema.IP_INFOS).find_one({"ip": ip})


@pytest_twisted.ensureDeferred
async def test_list_roles_per_node(tmp_path):
    async with api_client(tmp_path) as api:
        agents, n1, n2, extra = await setup(api)
        nodes = await api.core.store.collection(schema.NODES).count()  # the controller's own node too
        status, body = await api.call("GET", BASE, params={"page_size": 1})
        assert status == 200 and body["data"]["count"] == nodes and body["data"]["next"]
        status, body = await api.call("GET", BASE, params={"page_size": 100})
        assert len(body["data"]["results"]) == nodes
        row = next(r for r in body["data"]["results"] if r["node_uuid"] == n1["uuid"])
        manage = await ip_record(api, "10.0.0.1")
        assert (row["hostname"], row["type"], row["node_uuid"]) == ("n1.test", 5, n1["uuid"])
        assert row["manage"] == {"manage_network": "eth0/10.0.0.1", "manage_network_uuid": n1["nics"]["eth0"]["uuid"],
                                 "manage_network_interface_uuid": manage["uuid"]}
        assert row["image"]["image_network"] == "eth0/10.0.0.1"


@pytest_twisted.ensureDeferred
async def test_move_image_role(tmp_path):
    async with api_client(tmp_path) as api:
        agents, n1, n2, extra = await setup(api)
        old = await ip_record(api, "10.0.0.1")
        status, body = await api.call("PUT", f"{BASE}/in_node_map",
                                      {"uplinks": [{"old_ip_uuid": old["uuid"], "new_ip_uuid": extra["uuid"]}]})
        assert status == 200, body
        status, body = await api.call("GET", BASE)
        row = next(r for r in body["data"]["results"] if r["node_uuid"] == n1["uuid"])
        assert row["image"] == {"image_network": "eth1/172.16.1.59", "image_network_uuid": n1["nics"]["eth1"]["uuid"],
                                "image_network_interface_uuid": extra["uuid"]}
        assert row["manage"]["manage_network"] == "eth0/10.0.0.1"


@pytest_twisted.ensureDeferred
async def test_move_management_role_after_the_agent_answers_at_the_new_address(tmp_path):
    async with api_client(tmp_path) as api:
        agents, n1, n2, extra = await setup(api)
        old = await ip_record(api, "10.0.0.1")
        move = {"uplinks": [{"old_ip_uuid": old["uuid"], "new_ip_uuid": extra["uuid"]}]}
        before = await snapshot(api.core)
        # nothing answers at 172.16.1.59 yet: refused, nothing changes
        status, body = await api.call("PUT", f"{BASE}/mn_node_map", move, headers=EN)
        assert_error(status, body, 503, net_errors.AGENT_UNREACHABLE.code, "n1")
        assert await snapshot(api.core) == before
        assert ("172.16.1.59", "GET", "/net/nics", None) in agents.calls

        agents.harnesses["172.16.1.59"] = agents.harnesses["10.0.0.1"]  # the agent listens there too
        status, body = await api.call("PUT", f"{BASE}/mn_node_map", move)
        assert status == 200, body
        node = await api.core.store.collection(schema.NODES).find_one({"uuid": n1["uuid"]})
        assert node["ip"] == "172.16.1.59"
        assert (await ip_record(api, "10.0.0.1"))["is_manage"] == 0
        assert (await ip_record(api, "172.16.1.59"))["is_manage"] == 1


@pytest_twisted.ensureDeferred
async def test_role_move_refusals(tmp_path):
    async with api_client(tmp_path) as api:
        agents, n1, n2, extra = await setup(api)
        manage1 = await ip_record(api, "10.0.0.1")
        manage2 = await ip_record(api, "10.0.0.2")
        before = await snapshot(api.core)
        for path, move, status_code, code, words in [
            ("mn_node_map", {"old_ip_uuid": extra["uuid"], "new_ip_uuid": manage1["uuid"]}, 400, errors.INVALID_PARAM.code,
             ["uplinks.0.old_ip_uuid", "management network"]),
            ("mn_node_map", {"old_ip_uuid": manage1["uuid"], "new_ip_uuid": manage2["uuid"]}, 400,
             net_errors.IP_NOT_ON_NODE.code, ["uplinks.0.new_ip_uuid", "10.0.0.2", "n1"]),
            ("in_node_map", {"old_ip_uuid": "nope", "new_ip_uuid": extra["uuid"]}, 404, errors.NOT_FOUND.code, ["nope"]),
            ("in_node_map", {"old_ip_uuid": manage1["uuid"], "new_ip_uuid": extra["uuid"], "node_uuid": n2["uuid"]}, 400,
             errors.INVALID_PARAM.code, ["uplinks.0.node_uuid"]),
        ]:
            status, body = await api.call("PUT", f"{BASE}/{path}", {"uplinks": [move]}, headers=EN)
            assert_error(status, body, status_code, code, *words)
        status, body = await api.call("PUT", f"{BASE}/in_node_map", {"uplinks": []}, headers=EN)
        assert_error(status, body, 400, errors.INVALID_PARAM.code, "uplinks")
        # an address the node's agent no longer reports
        n1["net"].netlink.links["eth1"]["addresses"].clear()
        status, body = await api.call("PUT", f"{BASE}/in_node_map",
                                      {"uplinks": [{"old_ip_uuid": manage1["uuid"], "new_ip_uuid": extra["uuid"]}]},
                                      headers=EN)
        assert_error(status, body, 400, net_errors.IP_NOT_ON_NODE.code, "172.16.1.59")
        assert await snapshot(api.core) == before
