"""The nodes API against two real agent processes (``twistd -n kvmdesk-agent``) on 127.0.0.2/3."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, AsyncIterator

import pytest_twisted

from kvmdesk.core import errors
from kvmdesk.nodeaccess import client as agentclient
from kvmdesk.plugins.nodes import manager
from kvmdesk.core.ids import stable_uuid
from kvmdesk.testing.network import InProcessAgents, memory_node_net
from kvmdesk.testing.agents import AGENT_PASSWORD, AgentProcess, nodes_controller
from kvmdesk.testing.plugins import LifecycleRecorder, plugin_manager

POOLS = "/resource_mgr/resource_pools"

#: Every field of the contract's node list/detail.
CONTRACT_FIELDS = {
    "id", "uuid", "name", "hostname", "ip", "usage_sys", "usage_data", "total_sys", "used_sys",
    "server_version_info", "cpu_info", "mem_info", "gpu_info", "total_vm", "running_vm", "status", "type",
    "total_vcpus", "running_vcpus", "usage_vcpus", "usage_vcpu", "total_mem", "running_mem", "usage_mem",
    "network_interfaces", "storages", "deleted", "deleted_at", "updated_at", "created_at",
    "TEMPLATE_SYS", "TEMPLATE_DATA", "INSTANCE_SYS", "INSTANCE_DATA",
}
NIC_FIELDS = {"uuid", "nic", "mac", "speed", "status", "type", "deleted_at", "updated_at", "created_at", "ip_info"}
STORAGE_FIELDS = {"uuid", "path", "used", "total", "usage", "role"}


@pytest_twisted.async_yield_fixture
async def agents(tmp_path: Path, agent_port: int) -> AsyncIterator[list[AgentProcess]]:
    """Two agent processes; node-a runs a 2-vCPU 1 GiB domain and has a stopped one."""
    processes = [
        AgentProcess(tmp_path / "a", "127.0.0.2", agent_port, hostname="node-a",
                     domains=[{"name": "vm1", "vcpus": 2, "memory_kib": 1048576, "state": "running"},
                              {"name": "vm2", "state": "shutoff"}]),
        AgentProcess(tmp_path / "b", "127.0.0.3", agent_port, hostname="node-b", cpus=8),
    ]
    try:
        for process in processes:
            await process.start()
        yield processes
    finally:
        for process in processes:
            await process.stop()


@pytest_twisted.async_yield_fixture
async def api(tmp_path: Path, agent_port: int) -> AsyncIterator[Any]:
    async with nodes_controller(tmp_path / "controller", agent_port) as client:
        yield client


async def default_pool(api) -> str:
    status, body = await api.call("GET", POOLS)
    return next(p["uuid"] for p in body["data"]["results"] if p["default"])


async def add(api, pool: str, ip: str, **extra) -> dict:
    status, body = await api.call("POST", f"{POOLS}/{pool}/nodes", {"ip": ip, "password": AGENT_PASSWORD, **extra})
    assert status == 200 and body["code"] == 0, body
    return body["data"]


@pytest_twisted.ensureDeferred
async def test_check_node_virt_reports_interfaces_storage_and_refuses_bad_input(agents, api):
    status, body = await api.call("POST", "/resource_mgr/check_node_virt", {"ip": "127.0.0.2", "root_pwd": AGENT_PASSWORD})
    assert status == 200 and body["code"] == 0, body
    data = body["data"]
    assert {"interface_list", "storage_list", "virtual_switch_list"} <= set(data)
    assert data["hostname"] and data["demo_hypervisor"] is True
    assert data["storage_list"] and {"path", "total", "used", "type", "utilization"} <= set(data["storage_list"][0])
    assert data["storage_list"][0]["type"] == 1 and data["storage_list"][0]["role"] == "1,2,3,4"
    assert all({"interface", "ip", "mac", "mask", "speed", "stat"} <= set(i) for i in data["interface_list"])

    status, body = await api.call("POST", "/resource_mgr/check_node_virt", {"ip": "127.0.0.3", "root_pwd": "wrong"},
                                  headers={"Accept-Language": "en"})
    assert status == 400 and body["code"] == agentclient.NODE_PASSWORD_WRONG.code
    assert body["msg"] == "wrong password for node 127.0.0.3"
    status, body = await api.call("POST", "/resource_mgr/check_node_virt", {"ip": "127.0.0.9", "root_pwd": "x"})
    assert status == 502 and body["code"] == agentclient.NODE_UNREACHABLE.code
    status, body = await api.call("POST", "/resource_mgr/check_node_virt", {"ip": "not-an-ip", "root_pwd": "x"})
    assert status == 400 and body["code"] == errors.INVALID_PARAM.code and body["data"][0]["field"] == "ip"


@pytest_twisted.ensureDeferred
async def test_add_list_detail_rename_reboot_delete(agents, api):
    pool = await default_pool(api)
    # check first (as the UI does), then add: the add re-enrols with the check's secret.
    status, body = await api.call("POST", "/resource_mgr/check_node_virt", {"ip": "127.0.0.2", "root_pwd": AGENT_PASSWORD})
    eth = body["data"]["interface_list"][0]
    # The uplink's switch and NIC must exist: the network side of node-a is in memory (no bridge on the host).
    network_agents = InProcessAgents()
    network_agents.add("127.0.0.2", memory_node_net(nics=[i["interface"] for i in body["data"]["interface_list"]],
                                                    ip="127.0.0.2"))
    api.core.extensions["agents"] = network_agents
    switch = body["data"]["virtual_switch_list"]["uuid"]
    node_a = await add(api, pool, "127.0.0.2", manage_interface_uuid=eth["uuid"], image_interface=eth["interface"],
                       network=[{"switch_uuid": switch, "interface": eth["interface"]}])
    node_b = await add(api, pool, "127.0.0.3")
    assert node_a["uplinks"] == [{"switch_uuid": switch, "interface": eth["interface"]}]

    status, body = await api.call("POST", f"{POOLS}/{pool}/nodes", {"ip": "127.0.0.2", "password": AGENT_PASSWORD})
    assert status == 409 and body["code"] == errors.ALREADY_EXISTS.code

    status, body = await api.call("GET", f"{POOLS}/{pool}/nodes")
    assert status == 200
    page = body["data"]
    by_ip = {n["ip"]: n for n in page["results"]}
    assert set(by_ip) == {"127.0.0.2", "127.0.0.3"} and page["count"] == 2
    for node in by_ip.values():
        assert CONTRACT_FIELDS <= set(node), CONTRACT_FIELDS - set(node)
        assert "agent_secret" not in node and "facts" not in node
        assert node["status"] == 0 and node["type"] == 5 and node["deleted"] == 0
        assert node["storages"] and STORAGE_FIELDS <= set(node["storages"][0])
        assert node["storages"][0]["role"] == "1,2,3,4"
        assert node["TEMPLATE_SYS"]["path"] == node["INSTANCE_DATA"]["path"]
        assert node["network_interfaces"] and all(NIC_FIELDS <= set(n) for n in node["network_interfaces"])
        assert node["demo_hypervisor"] is True and "demo" in node["hypervisor_warning"]
    a, b = by_ip["127.0.0.2"], by_ip["127.0.0.3"]
    assert a["hostname"] and a["total_vcpus"] == 4 and b["total_vcpus"] == 8
    assert (a["total_vm"], a["running_vm"], a["running_vcpus"], a["running_mem"]) == (2, 1, 2, 1.0)
    assert a["usage_vcpus"] == "50.00" and b["running_vm"] == 0
    assert a["total_mem"] == 8.0
    managed = [ip for nic in a["network_interfaces"] for ip in nic["ip_info"] if ip["is_manage"]]
    assert all(ip["is_image"] for ip in managed)

    status, body = await api.call("GET", f"{POOLS}/{pool}/nodes", params={"searchtype": "contain", "ip": "0.0.3"})
    assert [n["ip"] for n in body["data"]["results"]] == ["127.0.0.3"]

    status, body = await api.call("GET", f"/resource_mgr/nodes/{node_a['uuid']}")
    assert status == 200 and CONTRACT_FIELDS <= set(body["data"]) and body["data"]["ip"] == "127.0.0.2"

    status, body = await api.call("PUT", f"/resource_mgr/nodes/{node_a['uuid']}", {"name": "first"})
    assert status == 200 and body["data"]["name"] == "first"
    status, body = await api.call("PUT", f"/resource_mgr/nodes/{node_a['uuid']}", {"name": ""})
    assert status == 400

    # Reboot is guarded on the agents: per-item failures with the agent's reason.
    status, body = await api.call("POST", f"/resource_mgr/nodes/{node_a['uuid']}/reboot",
                                  {"nodes": [{"uuid": node_a["uuid"], "name": "first"},
                                             {"uuid": node_b["uuid"], "name": node_b["name"]}]},
                                  headers={"Accept-Language": "en"})
    assert status == 200 and body["data"]["success_num"] == 0 and body["data"]["failed_num"] == 2
    assert all(f["code"] == agentclient.NODE_REFUSED.code and "allow_power_actions" in f["msg"]
               for f in body["data"]["failures"])
    status, body = await api.call("POST", f"/resource_mgr/nodes/{node_b['uuid']}/shutdown",
                                  {"nodes": [{"uuid": node_b["uuid"]}]}, headers={"Accept-Language": "en"})
    assert status == 409 and "power actions are disabled" in body["msg"]

    status, body = await api.call("GET", f"/resource_mgr/nodes/{node_a['uuid']}/services", params={"page_size": 2})
    services = body["data"]
    assert status == 200 and services["count"] == 6 and len(services["results"]) == 2 and services["next"]
    first = services["results"][0]
    assert first == {**first, "uuid": stable_uuid(node_a["uuid"], "service", first["name"]), "status": 3}
    status, body = await api.call("POST", f"/resource_mgr/nodes/{node_a['uuid']}/services/{first['uuid']}/reboot")
    assert status == 502 and body["code"] == agentclient.NODE_FAILED.code and "systemctl" in body["msg"]
    status, body = await api.call("POST", f"/resource_mgr/nodes/{node_a['uuid']}/services/nope/reboot")
    assert status == 404

    status, body = await api.call("DELETE", "/resource_mgr/nodes", {"uuids": [node_a["uuid"], node_b["uuid"]]})
    assert status == 200 and body["data"] == {"success_num": 2, "failed_num": 0, "failures": []}
    status, body = await api.call("GET", f"{POOLS}/{pool}/nodes")
    assert body["data"]["count"] == 0
    # Deleting released the agents: they can be added again (here, to another pool).
    status, body = await api.call("POST", POOLS, {"name": "second", "desc": None})
    again = await add(api, body["data"]["uuid"], "127.0.0.3")
    assert again["resource_pool_uuid"] == body["data"]["uuid"]


class BusyNodes:
    """A plugin that says a node still hosts desktops."""

    def __init__(self, busy: set[str]):
        self.busy = busy

    from kvmdesk import hookimpl

    @hookimpl
    def kvmdesk_usage(self, core, kind, uuid):
        if kind == "node" and uuid in self.busy:
            return "3 desktops"
        return None


@pytest_twisted.ensureDeferred
async def test_delete_is_refused_while_a_plugin_says_the_node_is_in_use(agents, api):
    pool = await default_pool(api)
    node = await add(api, pool, "127.0.0.2")
    api.core.plugins.register(BusyNodes({node["uuid"]}), name="busy")
    status, body = await api.call("DELETE", "/resource_mgr/nodes", {"uuids": [node["uuid"]]},
                                  headers={"Accept-Language": "en"})
    assert status == 409 and body["code"] == manager.NODE_IN_USE.code and "3 desktops" in body["msg"]
    status, body = await api.call("GET", f"/resource_mgr/nodes/{node['uuid']}")
    assert status == 200


@pytest_twisted.ensureDeferred
async def test_controller_nodes(agents, api):
    status, body = await api.call("GET", "/resource_mgr/controller_nodes")
    assert status == 200 and body["data"]["count"] == 1
    controller = body["data"]["results"][0]
    assert controller["type"] == 3 and controller["status"] == "active"
    assert CONTRACT_FIELDS <= set(controller) and controller["cpu_info"] and controller["network_interfaces"] is not None
    uuid = controller["uuid"]
    status, body = await api.call("PUT", f"/resource_mgr/controller_nodes/{uuid}", {"name": "ctl"})
    assert status == 200 and body["data"]["name"] == "ctl" and body["data"]["type"] == 3
    # Without an agent the compute role cannot be added, and power actions have nobody to ask.
    status, body = await api.call("PUT", f"/resource_mgr/controller_nodes/{uuid}",
                                  {"name": "ctl", "add_compute_function": True})
    assert status == 409 and body["code"] == manager.NO_AGENT.code
    status, body = await api.call("POST", f"/resource_mgr/controller_nodes/{uuid}/reboot")
    assert status == 409 and body["code"] == manager.NO_AGENT.code
    status, body = await api.call("GET", f"/resource_mgr/controller_nodes/{uuid}x/reboot")
    assert status == 405 or status == 404
    # A compute node is not a controller node.
    pool = await default_pool(api)
    node = await add(api, pool, "127.0.0.2")
    status, body = await api.call("POST", f"/resource_mgr/controller_nodes/{node['uuid']}/shutdown")
    assert status == 404 and body["code"] == manager.NOT_CONTROLLER.code


@pytest_twisted.ensureDeferred
async def test_nodes_announce_create_rename_delete_without_their_secret(tmp_path, agent_port, agent):
    recorder = LifecycleRecorder()
    async with nodes_controller(tmp_path / "controller", agent_port, plugins=plugin_manager(recorder)) as api:
        node = await add(api, await default_pool(api), "127.0.0.2")
        status, body = await api.call("PUT", f"/resource_mgr/nodes/{node['uuid']}", {"name": "renamed"})
        assert status == 200, body
        status, body = await api.call("DELETE", "/resource_mgr/nodes", {"uuids": [node["uuid"]]})
        assert status == 200, body
        events = recorder.of("node")
        assert [(e.hook, e.record["uuid"]) for e in events] == [("created", node["uuid"]), ("updated", node["uuid"]),
                                                                 ("deleted", node["uuid"])]
        assert events[1].changes == {"name": "renamed"} and events[2].record["name"] == "renamed"
        assert all("agent_secret" not in e.record for e in events)


def enrolment_file(process: AgentProcess) -> Path:
    return process.directory / "data" / "enrolment.json"


@pytest_twisted.ensureDeferred
async def test_add_with_a_name_and_a_failed_add_leaves_both_sides_as_they_were(agents, api):
    """Issue 14 defect 1: ``name`` answered 500 and a failed add left the agent enrolled."""
    pool = await default_pool(api)
    named = await add(api, pool, "127.0.0.2", name="rack-1")
    assert named["name"] == "rack-1"

    # A fresh agent, no check first: the add fails after enrolling (unknown NIC) and releases the agent.
    status, body = await api.call("POST", f"{POOLS}/{pool}/nodes",
                                  {"ip": "127.0.0.3", "password": AGENT_PASSWORD, "name": "rack-2",
                                   "manage_interface": "no-such-nic"})
    assert status == 400 and body["code"] != 0, body
    assert not enrolment_file(agents[1]).exists()
    pending = await api.core.store.collection(manager.ENROLMENTS).find_one({"ip": "127.0.0.3"})
    assert pending is None
    status, body = await api.call("GET", f"{POOLS}/{pool}/nodes")
    assert [n["ip"] for n in body["data"]["results"]] == ["127.0.0.2"]

    # After a check the agent stays enrolled with the controller's pending secret: a retry succeeds.
    status, body = await api.call("POST", "/resource_mgr/check_node_virt", {"ip": "127.0.0.3", "root_pwd": AGENT_PASSWORD})
    assert status == 200
    status, body = await api.call("POST", f"{POOLS}/{pool}/nodes",
                                  {"ip": "127.0.0.3", "password": AGENT_PASSWORD, "manage_interface": "no-such-nic"})
    assert status == 400
    secret = json.loads(enrolment_file(agents[1]).read_text())["secret"]
    pending = await api.core.store.collection(manager.ENROLMENTS).find_one({"ip": "127.0.0.3"})
    assert pending["agent_secret"] == secret
    second = await add(api, pool, "127.0.0.3", name="rack-2")
    assert second["name"] == "rack-2"
