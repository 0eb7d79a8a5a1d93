"""Test helpers of the network plugin, for its tests and for plugin authors: seeding nodes and NICs,
store snapshots, error assertions, and in-process node agents."""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional

from kvmdesk.agent.net.netlink import MemoryNetlink
from kvmdesk.agent.net.ovs import MemoryOvs
from kvmdesk.agent.net.routes import NetAgent
from kvmdesk.core.records import new_record
from kvmdesk.nodeaccess.client import AgentCallError, AgentConnectionError
from kvmdesk.plugins.network import schema
from kvmdesk.testing.agent_net import AgentHarness

#: Every collection the network plugin writes: "nothing stored changed" compares all of them.
OWN_COLLECTIONS = (schema.SWITCHES, schema.UPLINKS, schema.NETWORKS, schema.SUBNETS, schema.ALLOCATIONS,
                   schema.CURSORS, schema.NICS, schema.IP_INFOS, schema.NODES)


async def snapshot(core: Any) -> dict[str, list[dict]]:
    return {name: await core.store.collection(name).find({}, sort=[("id", 1)]) for name in OWN_COLLECTIONS}


async def default_pool(core: Any) -> dict:
    return await core.store.collection(schema.POOLS).find_one({"default": 1})


async def add_pool(core: Any, name: str) -> dict:
    return await core.store.collection(schema.POOLS).insert_one(new_record(core.clock, name=name, desc=None, status=0,
                                                                           default=0))


#: The agent secret of the node records made here: enrolled nodes carry one (the in-process agents
#: do not check it; the network plugin only syncs nodes that are enrolled).
ENROLLED = "test-agent-secret"

async def add_node(core: Any, name: str, ip: str, *, pool: Optional[dict] = None, nics: Iterable[str] = ("eth0", "eth1"),
                   manage_nic: Optional[str] = "eth0", netmask: str = "255.255.255.0") -> dict:
    """A node record as the nodes plugin stores it, with NIC records and its management address.

    :returns: the node with ``nics`` (name -> NIC record) and ``manage_ip`` (the ip_info record).
    """
    pool = pool or await default_pool(core)
    node = await core.store.collection(schema.NODES).insert_one(
        new_record(core.clock, name=name, hostname=f"{name}.test", ip=ip, type=5, resource_pool_uuid=pool["uuid"],
                   agent_secret=ENROLLED))
    records = {}
    for i, nic in enumerate(nics):
        records[nic] = await core.store.collection(schema.NICS).insert_one(new_record(
            core.clock, node_uuid=node["uuid"], nic=nic, mac=f"52:54:00:00:00:{i:02x}", speed=1000, status=2,
            type=0, master=None))
    node["nics"] = records
    if manage_nic:
        node["manage_ip"] = await core.store.collection(schema.IP_INFOS).insert_one(new_record(
            core.clock, node_uuid=node["uuid"], nic_uuid=records[manage_nic]["uuid"], ip=ip, netmask=netmask, gateway="",
            dns1="", dns2="", name=manage_nic, is_manage=1, is_image=1))
    return node


def uplink(node: dict, nic: str = "eth1") -> dict:
    return {"node_uuid": node["uuid"], "nic_uuid": node["nics"][nic]["uuid"]}


def subnet_body(name: str = "s1", start: str = "172.16.1.10", end: str = "172.16.1.50", netmask: str = "255.255.255.0",
                gateway: str = "172.16.1.254", dns1: str = "8.8.8.8", **extra: Any) -> dict:
    return {"name": name, "start_ip": start, "end_ip": end, "netmask": netmask, "gateway": gateway, "dns1": dns1, **extra}


def assert_error(status: int, body: Any, expected_status: int, code: int, *words: str) -> None:
    """A 4xx/5xx envelope with ``code`` whose message names every one of ``words``."""
    assert status == expected_status, (status, body)
    assert body["code"] == code, body
    for word in words:
        assert word in body["msg"], (word, body["msg"])


# -- in-process node agents ------------------------------------------------------------------------------


class InProcessAgents:
    """The controller's agent client for tests: each node's agent is an in-process router
    (:class:`~kvmdesk.testing.agent_net.AgentHarness`), found by the node's ``ip``; a node can be taken
    offline.  Raises the same errors as the real client.

    Install with ``core.extensions["agents"] = agents``.
    """

    def __init__(self) -> None:
        self.harnesses: dict[str, Any] = {}
        self.offline: set[str] = set()
        #: every call: (ip, method, path, json)
        self.calls: list[tuple[str, str, str, Any]] = []

    def add(self, ip: str, net: Any) -> AgentHarness:
        harness = self.harnesses[ip] = AgentHarness(net)
        return harness

    async def call(self, node: Mapping[str, Any], method: str, path: str, json: Any = None) -> Any:
        ip = node.get("ip")
        self.calls.append((ip, method, path, json))
        harness = self.harnesses.get(ip)
        if harness is None or ip in self.offline:
            raise AgentConnectionError(ip, "Connection refused")
        # like the real client: no Accept-Language, so the agent answers in its default language
        status, body = await harness.call(method, path, json, lang="zh")
        if body.get("code") != 0:
            raise AgentCallError(ip, status, body["code"], body["msg"], body.get("data"))
        return body["data"]


def memory_node_net(nics: Iterable[str] = ("eth0", "eth1", "eth2"), *, ip: Optional[str] = None,
                    netmask: int = 24, bonding: bool = True, devices: Optional[set[str]] = None) -> NetAgent:
    """In-memory drivers for one node: NICs (the first carrying ``ip``) and an Open vSwitch."""
    links = {}
    for i, name in enumerate(nics):
        links[name] = {"kind": None, "up": True, "operstate": "UP", "mac": f"52:54:00:aa:00:{i:02x}", "mtu": 1500,
                       "speed": 1000, "addresses": []}
    if ip:
        first = next(iter(links))
        links[first]["addresses"].append({"ip": ip, "prefixlen": netmask, "label": first, "secondary": False})
    return NetAgent(MemoryNetlink(links, bonding=bonding), MemoryOvs(devices=set(devices or links)))


async def add_agent_node(core: Any, agents: InProcessAgents, name: str, ip: str, net: Any = None, *,
                         pool: Optional[dict] = None, **extra: Any) -> dict:
    """A node record with an in-process agent at ``ip``; its NICs are synced from the agent.

    :returns: the node record with ``nics`` (name -> NIC record) and ``net`` (its drivers).
    """
    pool = pool or await default_pool(core)
    net = net or memory_node_net(ip=ip)
    agents.add(ip, net)
    node = await core.store.collection(schema.NODES).insert_one(
        new_record(core.clock, name=name, hostname=f"{name}.test", ip=ip, type=5, resource_pool_uuid=pool["uuid"],
                   state="online", status=0, agent_secret=ENROLLED, **extra))
    records = await core.extensions["network"].sync_node(node)
    node["nics"] = {r["nic"]: r for r in records}
    node["net"] = net
    return node
