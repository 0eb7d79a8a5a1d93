"""Node records (#4, #27, #41) carry every field of the contract's examples, NIC ``id`` included.

The NIC ``id`` is the id of the NIC's record in the network plugin: the same NIC, with the same id, that
``/nodes/{uuid}/nics`` (#12) lists.
"""
import pytest_twisted

from kvmdesk.testing.network import InProcessAgents, add_agent_node
from kvmdesk.testing.api import api_client

#: The keys of the contract's example answers (web-api.zh.md, 计算节点基本信息列表 / 详细信息 / 控制节点列表).
NODE_KEYS = {
    "id", "name", "uuid", "hostname", "ip", "total_mem", "running_mem", "total_vcpus", "running_vcpus",
    "server_version_info", "gpu_info", "cpu_info", "mem_info", "status", "type", "created_at", "updated_at",
    "deleted_at", "network_interfaces", "storages", "TEMPLATE_SYS", "TEMPLATE_DATA", "INSTANCE_SYS", "INSTANCE_DATA",
    "usage_sys", "usage_data", "total_sys", "used_sys", "usage_mem", "usage_vcpu", "total_vm", "running_vm",
}
NIC_KEYS = {"id", "uuid", "nic", "mac", "speed", "status", "type", "deleted_at", "updated_at", "created_at", "ip_info"}
IP_KEYS = {"uuid", "ip", "netmask", "gateway", "dns1", "dns2", "is_manage", "is_image"}


def facts(ip: str) -> dict:
    """Host facts as the agent reports them: the NICs the in-process agent has, loopback too."""
    return {"hostname": "n1.test", "network_interfaces": [
        {"name": "lo", "loopback": True, "up": True, "ipv4": [{"address": "127.0.0.1", "netmask": "255.0.0.0"}]},
        {"name": "eth0", "mac": "52:54:00:aa:00:00", "up": True, "ipv4": [{"address": ip, "netmask": "255.255.255.0"}]},
        {"name": "eth1", "mac": "52:54:00:aa:00:01", "up": True, "ipv4": []},
    ]}


@pytest_twisted.ensureDeferred
async def test_node_list_and_detail_show_every_contract_field_with_nic_ids(tmp_path):
    async with api_client(tmp_path) as api:
        agents = InProcessAgents()
        api.core.extensions["agents"] = agents
        node = await add_agent_node(api.core, agents, "n1", "10.0.0.1", facts=facts("10.0.0.1"))
        status, body = await api.call("GET", f"/resource_mgr/nodes/{node['uuid']}/nics")
        assert status == 200, body
        ids = {n["nic"]: n["id"] for n in body["data"]}

        status, body = await api.call("GET", f"/resource_mgr/resource_pools/{node['resource_pool_uuid']}/nodes")
        assert status == 200, body
        (listed,) = body["data"]["results"]
        status, body = await api.call("GET", f"/resource_mgr/nodes/{node['uuid']}")
        assert status == 200, body
        for view in (listed, body["data"]):
            assert NODE_KEYS <= set(view), NODE_KEYS - set(view)
            nics = view["network_interfaces"]
            assert [n["nic"] for n in nics] == ["eth0", "eth1"]
            for nic in nics:
                assert NIC_KEYS <= set(nic), NIC_KEYS - set(nic)
                assert isinstance(nic["id"], int) and nic["id"] == ids[nic["nic"]]
                assert all(IP_KEYS <= set(ip) for ip in nic["ip_info"])
            assert nics[0]["ip_info"][0]["ip"] == "10.0.0.1"
