"""Adding a node with uplinks (#29): a switch or NIC that does not exist is refused before anything is stored.

The node's agent is a real one (enrolment, host facts); its network side (what ``/net/nics`` reports,
its Open vSwitch) is an in-process agent with in-memory drivers named like this machine's NICs, so no
bridge is ever made on the host.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, AsyncIterator

import psutil
import pytest_twisted

from kvmdesk.plugins.network import errors as net_errors
from kvmdesk.plugins.network import schema
from kvmdesk.testing.network import InProcessAgents, memory_node_net, snapshot
from kvmdesk.testing.agents import AGENT_PASSWORD, nodes_controller, running_agent

POOLS = "/resource_mgr/resource_pools"


def host_nics() -> list[str]:
    """This machine's NICs but loopback (what the real agent's host facts list)."""
    stats = psutil.net_if_stats()
    return sorted(name for name, stat in stats.items() if "loopback" not in (getattr(stat, "flags", "") or "")
                  and name != "lo")


@pytest_twisted.async_yield_fixture
async def api(tmp_path: Path, agent_port: int) -> AsyncIterator[Any]:
    async with running_agent(tmp_path / "agent", "127.0.0.2", agent_port, hostname="node-a"), \
            nodes_controller(tmp_path / "controller", agent_port) as client:
        agents = InProcessAgents()
        agents.add("127.0.0.2", memory_node_net(nics=host_nics(), ip="127.0.0.2"))
        client.core.extensions["agents"] = agents
        client.agents = agents
        yield client


@pytest_twisted.ensureDeferred
async def test_an_uplink_on_an_unknown_nic_or_switch_is_refused_before_anything_changes(api):
    core = api.core
    pool = (await core.store.collection(schema.POOLS).find_one({"default": 1}))["uuid"]
    default = await core.store.collection(schema.SWITCHES).find_one({"default": 1})
    before = await snapshot(core)
    en = {"Accept-Language": "en"}

    # "lo" is in the host facts, but the agent offers no such uplink NIC (it was stored and "not adopted")
    status, body = await api.call("POST", f"{POOLS}/{pool}/nodes", {
        "ip": "127.0.0.2", "password": AGENT_PASSWORD,
        "network": [{"switch_uuid": default["uuid"], "interface": "lo"}]}, headers=en)
    assert status == 400 and body["code"] == net_errors.UPLINK_NIC_UNKNOWN.code, body
    assert "lo" in body["msg"] and "network.0.interface" in body["msg"]
    status, body = await api.call("POST", f"{POOLS}/{pool}/nodes", {
        "ip": "127.0.0.2", "password": AGENT_PASSWORD,
        "network": [{"switch_uuid": "no-such-switch", "interface": host_nics()[0]}]}, headers=en)
    assert status == 400 and body["code"] == net_errors.UPLINK_SWITCH_UNKNOWN.code, body
    assert "no-such-switch" in body["msg"] and "network.0.switch_uuid" in body["msg"]
    assert await snapshot(core) == before

    # a NIC the agent has: the node is added and its uplink adopted
    nic = host_nics()[0]
    status, body = await api.call("POST", f"{POOLS}/{pool}/nodes", {
        "ip": "127.0.0.2", "password": AGENT_PASSWORD, "network": [{"switch_uuid": default["uuid"], "interface": nic}]})
    assert status == 200, body
    await core.extensions["network.sync"].settled()
    uplinks = await core.store.collection(schema.UPLINKS).find({"node_uuid": body["data"]["uuid"]})
    assert [u["vswitch_uuid"] for u in uplinks] == [default["uuid"]]
    assert api.agents.harnesses["127.0.0.2"].net.ovs.bridges[default["bridge"]]["uplink"] == nic
