"""The whole path with a real agent: watcher heartbeats -> kvmdesk_node_metrics -> current_perf, history,
and the process list asked of the agent."""
from __future__ import annotations

from pathlib import Path

import pytest_twisted
from twisted.internet import defer
from twisted.internet.task import Clock

from kvmdesk.testing.agents import AGENT_PASSWORD, free_port, nodes_controller, running_agent

POOLS = "/resource_mgr/resource_pools"


@pytest_twisted.ensureDeferred
async def test_heartbeats_of_a_real_agent_reach_current_perf_and_history(tmp_path: Path):
    port = free_port("127.0.0.2")
    clock = Clock()
    clock.advance(1_700_000_000 - 1_700_000_000 % 60)
    async with running_agent(tmp_path / "agent", "127.0.0.2", port, hostname="node-a"), \
            nodes_controller(tmp_path / "c", port, clock=clock, nodes={"heartbeat_interval": 5.0}) as api:
        status, body = await api.call("GET", POOLS)
        pool = body["data"]["results"][0]["uuid"]
        status, body = await api.call("POST", f"{POOLS}/{pool}/nodes", {"ip": "127.0.0.2", "password": AGENT_PASSWORD})
        assert status == 200, body
        uuid = body["data"]["uuid"]
        manager = api.core.extensions["nodes"]
        api.core.services.startService()
        await manager.watchers.loaded
        watcher = manager.watchers.watcher(uuid)
        for _ in range(14):  # a minute and then some of real heartbeats on the injected clock
            waiting = watcher.wait_round()
            clock.advance(5)
            await waiting
        await api.core.services.getServiceNamed("monitoring").settled()

        status, body = await api.call("POST", "/monitor_mgr/node/current_perf/",
                                      {"statis_period": 30, "node_uuid": uuid, "is_all_nodes": False})
        assert status == 200, body
        [view] = body["data"]
        assert view["node_name"] and len(view["time"]) >= 5
        assert 0.0 <= view["cpu_util"] <= 100.0 and view["memory_util"]["used"] > 0
        assert "lo" in view["nic_util"]
        # The agent answered with its busiest processes, in the contract's shape.
        assert view["process_list"], view
        assert set(view["process_list"][0]) == {"pid", "user", "cpu", "mem", "time", "command"}
        assert all(isinstance(p["pid"], int) for p in view["process_list"])

        status, body = await api.call("GET", "/monitor_mgr/node/history/",
                                      params={"node_uuid": uuid, "statis_hours": 1, "step_minutes": 1})
        assert status == 200, body
        assert body["data"]["cpu_util"][-1] is not None and body["data"]["cpu_util"][0] is None
        await defer.maybeDeferred(api.core.services.stopService)
