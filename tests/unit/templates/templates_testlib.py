"""Helpers of the templates tests: the world (agents, controller, base image, network), template
bodies, and the "nothing changed" snapshot (store, domains and disk files on every node)."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, AsyncIterator

import attrs

from kvmdesk.testing.agents import AGENT_PASSWORD, free_port, nodes_controller, running_agent
from kvmdesk.testing.api import running_jobs as started  # noqa: F401  (the tests import it from here)
from storage_testlib import make_qcow2, wait_all

HOSTS = ("127.0.0.2", "127.0.0.3")
POOLS = "/resource_mgr/resource_pools"
T = "/education/template"


@attrs.define
class World:
    api: Any
    pool: str
    nodes: list[dict]
    agents: list[Any]
    base: dict
    network: dict
    subnet: dict
    tmp: Path
    port: int

    @property
    def core(self) -> Any:
        return self.api.core

    def body(self, **changes: Any) -> dict:
        fields = {"name": "template1", "desc": "this is template1", "os_type": "Windows 7 bit 64", "classify": 1,
                  "pool_uuid": self.pool, "network_uuid": self.network["uuid"], "subnet_uuid": self.subnet["uuid"],
                  "vcpu": 2, "ram": 2, "system_disk": {"image_id": self.base["uuid"], "size": 50},
                  "data_disks": [{"inx": 0, "size": 10}]}
        fields.update(changes)
        return fields

    async def create(self, **changes: Any) -> dict:
        status, body = await self.api.call("POST", T, {"action": "create", "param": self.body(**changes)})
        assert status == 200, body
        return body["data"]

    async def act(self, action: str, *templates: dict) -> tuple[int, dict]:
        refs = [{"name": t["name"], "uuid": t["uuid"]} for t in templates]
        return await self.api.call("POST", T, {"action": action, "param": {"templates": refs}})

    def agent_of(self, template: dict) -> Any:
        ip = next(n["ip"] for n in self.nodes if n["uuid"] == template["host_uuid"])
        return self.agents[HOSTS.index(ip)]

    async def domains(self) -> list[list[dict]]:
        """Every node's domains (what defines them; the test driver's CPU time moves by itself)."""
        keys = ("uuid", "name", "state", "vcpus", "memory_kib")
        return [[{k: d[k] for k in keys} for d in await agent.hypervisor.list_domains()] for agent in self.agents]

    def template_files(self) -> list[list[str]]:
        return [sorted(p.name for p in (agent.data_dir / "storage").rglob("*")
                       if p.is_file() and "_template" in p.parts) for agent in self.agents]

    async def snapshot(self) -> dict:
        """The store's templates and addresses, every node's domains and template files."""
        store = self.core.store
        return {"templates": await store.collection("templates").find({}, sort=[("id", 1)]),
                "allocations": await store.collection("ip_allocations").find({}, sort=[("id", 1)]),
                "domains": await self.domains(), "files": self.template_files()}


def assert_error(status: int, body: dict, expected_status: int, code: int, *words: str) -> None:
    assert status == expected_status, (status, body)
    assert body["code"] == code, body
    for word in words:
        assert word in body["msg"], (word, body["msg"])


@contextlib.asynccontextmanager
async def restarted(world: World) -> AsyncIterator[Any]:
    """The controller restarted: the first core's store closes and a new core starts over the same
    SQLite store (same clock, same agents); yields its logged-in API client."""
    old = world.core
    await old.store.close()
    async with nodes_controller(world.tmp / "controller", world.port, clock=old.clock) as api:
        yield api


@contextlib.asynccontextmanager
async def world_of(tmp_path: Path, clock: Any) -> AsyncIterator[World]:
    port = free_port(*HOSTS)
    image = make_qcow2(tmp_path / "win7.qcow2", 1, virtual="2G")
    async with running_agent(tmp_path / "agent-a", HOSTS[0], port) as first, \
            running_agent(tmp_path / "agent-b", HOSTS[1], port) as second, \
            nodes_controller(tmp_path / "controller", port, clock=clock) as api:
        status, body = await api.call("GET", POOLS)
        pool = body["data"]["results"][0]["uuid"]
        nodes = []
        for host in HOSTS:
            status, body = await api.call("POST", f"{POOLS}/{pool}/nodes", {"ip": host, "password": AGENT_PASSWORD})
            assert status == 200, body
            nodes.append(body["data"])
        distributor = api.core.extensions["storage.distributor"]
        distributor.startService()
        try:
            arrived = wait_all(distributor, "done", [n["uuid"] for n in nodes])
            status, body = await api.upload(f"{POOLS}/{pool}/base_images", {"name": "win7", "os_type": "Windows 7"},
                                            {"file": ("win7.qcow2", image.read_bytes())})
            assert status == 200, body
            base = body["data"]
            await arrived
            status, body = await api.call("POST", "/resource_mgr/vswitchs", {"name": "sw1", "type": "vlan",
                                                                               "uplinks": []})
            assert status == 200, body
            switch = body["data"]
            status, body = await api.call("POST", "/resource_mgr/data_networks", {
                "name": "net1", "switch_uuid": switch["uuid"], "vlan_id": 101,
                "subnet_info": {"name": "s1", "start_ip": "172.16.1.10", "end_ip": "172.16.1.20",
                                "netmask": "255.255.255.0", "gateway": "172.16.1.254", "dns1": "8.8.8.8"}})
            assert status == 200, body
            network = body["data"]
            subnet = await api.core.store.collection("subnets").find_one({"network_uuid": network["uuid"]})
            yield World(api, pool, nodes, [first, second], base, network, subnet, tmp_path, port)
        finally:
            await distributor.stopService()
