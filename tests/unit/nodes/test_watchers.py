"""Node watchers on an injected clock, against real agent processes (killed and restarted by pid)."""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from kvmdesk import hookimpl
from kvmdesk.core.plugins import make_plugin_manager
from kvmdesk.plugins.nodes.views import NODES, OFFLINE, ONLINE, WARNING
from kvmdesk.plugins.nodes.watchers import NodeWatcher, WatchSettings, health
from kvmdesk.testing.agents import AGENT_PASSWORD, AgentProcess, nodes_controller, running_agent

INTERVAL = 5.0
POOLS = "/resource_mgr/resource_pools"


class StatusRecorder:
    def __init__(self):
        self.changes: list[tuple[str, Any, str]] = []

    @hookimpl
    def kvmdesk_node_status_changed(self, core, node, old, new):
        self.changes.append((node["ip"], old, new))


def plugins(*extra) -> Any:
    manager = make_plugin_manager(load_entry_points=True)
    for i, plugin in enumerate(extra):
        manager.register(plugin, name=f"test-{i}")
    return manager


async def add_nodes(api, *ips: str) -> dict[str, dict]:
    status, body = await api.call("GET", POOLS)
    pool = body["data"]["results"][0]["uuid"]
    added = {}
    for ip in ips:
        status, body = await api.call("POST", f"{POOLS}/{pool}/nodes", {"ip": ip, "password": AGENT_PASSWORD})
        assert status == 200, body
        added[ip] = body["data"]
    return added


async def rounds(clock: Clock, watchers: list[NodeWatcher], seconds: float) -> None:
    """Advance the clock and wait for the rounds it started (their HTTP is real)."""
    waits = [w.wait_round() for w in watchers]
    clock.advance(seconds)
    await defer.gatherResults(waits)


async def settled(*watchers: NodeWatcher) -> None:
    """Wait out rounds in progress: the shared clock may have started another watcher's round too."""
    for watcher in watchers:
        while watcher._round is not None:
            await watcher.wait_round()


@pytest_twisted.ensureDeferred
async def test_a_killed_agent_goes_offline_within_two_intervals_and_comes_back(tmp_path: Path, agent_port: int):
    clock = Clock()
    recorder = StatusRecorder()
    a = AgentProcess(tmp_path / "a", "127.0.0.2", agent_port, hostname="node-a")
    b = AgentProcess(tmp_path / "b", "127.0.0.3", agent_port, hostname="node-b")
    await a.start()
    await b.start()
    try:
        async with nodes_controller(tmp_path / "c", agent_port, clock=clock, plugins=plugins(recorder),
                                    nodes={"heartbeat_interval": INTERVAL, "max_backoff": 4 * INTERVAL}) as api:
            nodes = await add_nodes(api, "127.0.0.2", "127.0.0.3")
            manager = api.core.extensions["nodes"]
            api.core.services.startService()
            await manager.watchers.loaded
            wa = manager.watchers.watcher(nodes["127.0.0.2"]["uuid"])
            wb = manager.watchers.watcher(nodes["127.0.0.3"]["uuid"])
            assert wa.running and wb.running
            # First round: somewhere within the first interval (jittered).
            await rounds(clock, [wa, wb], INTERVAL)
            assert (wa.state, wb.state) == (ONLINE, ONLINE)
            assert manager.latest[wa.node["uuid"]]["metrics"]["memory"]["total"] > 0
            stored = await api.core.store.collection(NODES).find_one({"uuid": wa.node["uuid"]})
            assert stored["metrics"] and stored["last_seen_at"]
            # Adding a node is its first observation; the first heartbeats changed nothing.
            assert recorder.changes == [("127.0.0.2", None, ONLINE), ("127.0.0.3", None, ONLINE)]
            del recorder.changes[:]

            await a.kill()
            elapsed = 0.0
            while wa.state != OFFLINE:
                step = wa._call.getTime() - clock.seconds()
                waits = [wa.wait_round()]
                clock.advance(step)
                elapsed += step
                await defer.gatherResults(waits)
            assert elapsed <= 2 * INTERVAL + 1e-9, elapsed  # a sum of clock steps: float rounding only
            assert wb.state == ONLINE
            status, body = await api.call("GET", f"/resource_mgr/nodes/{wa.node['uuid']}")
            assert body["data"]["status"] == 2 and body["data"]["status_changed_at"]
            assert "unreachable" in body["data"]["status_reason"]
            assert recorder.changes == [("127.0.0.2", ONLINE, OFFLINE)]

            # While it stays down, retries back off: each delay at least the one before.
            delays = []
            for _ in range(3):
                step = wa._call.getTime() - clock.seconds()
                delays.append(step)
                await rounds(clock, [wa], step)
            # Delays are differences of clock times: allow float rounding (20.000000000000004), nothing more.
            assert delays == sorted(delays) and delays[-1] > delays[0] and max(delays) <= 4 * INTERVAL + 1e-9

            await a.start()  # same data directory: same enrolment, new boot
            boot_before = wa.boot_id
            await rounds(clock, [wa], wa._call.getTime() - clock.seconds())
            assert wa.state == ONLINE and wa.boot_id != boot_before
            assert recorder.changes[-1] == ("127.0.0.2", OFFLINE, ONLINE)
            status, body = await api.call("GET", f"/resource_mgr/nodes/{wa.node['uuid']}")
            assert body["data"]["status"] == 0

            # stopService waits for a round in progress.
            await settled(wa, wb)
            clock.advance(max(wa._call.getTime(), wb._call.getTime()) - clock.seconds())
            assert wa._round is not None or wb._round is not None
            await api.core.services.stopService()
            assert wa._round is None and wb._round is None and not wa.running
        assert clock.getDelayedCalls() == []
    finally:
        await a.stop()
        await b.stop()


@pytest_twisted.ensureDeferred
async def test_watching_resumes_after_a_controller_restart(tmp_path: Path, agent_port: int):
    clock = Clock()
    async with running_agent(tmp_path / "a", "127.0.0.2", agent_port), \
            running_agent(tmp_path / "b", "127.0.0.3", agent_port):
        async with nodes_controller(tmp_path / "c", agent_port, clock=clock) as api:
            nodes = await add_nodes(api, "127.0.0.2", "127.0.0.3")
        # The same data directory: a controller restart.
        async with nodes_controller(tmp_path / "c", agent_port, clock=clock) as api:
            manager = api.core.extensions["nodes"]
            api.core.services.startService()
            await manager.watchers.loaded
            watchers = [manager.watchers.watcher(n["uuid"]) for n in nodes.values()]
            assert all(w is not None and w.running for w in watchers)
            await rounds(clock, watchers, INTERVAL)
            assert [w.state for w in watchers] == [ONLINE, ONLINE]
            # Deleting a node stops its watcher.
            status, body = await api.call("DELETE", "/resource_mgr/nodes", {"uuids": [nodes["127.0.0.2"]["uuid"]]})
            assert status == 200
            assert manager.watchers.watcher(nodes["127.0.0.2"]["uuid"]) is None
            await api.core.services.stopService()
        assert clock.getDelayedCalls() == []


@pytest_twisted.ensureDeferred
async def test_a_failing_round_is_logged_and_the_next_one_runs(tmp_path: Path, agent_port: int):
    clock = Clock()
    logged: list[dict] = []
    observer = logged.append
    async with running_agent(tmp_path / "a", "127.0.0.2", agent_port):
        async with nodes_controller(tmp_path / "c", agent_port, clock=clock) as api:
            nodes = await add_nodes(api, "127.0.0.2")
            manager = api.core.extensions["nodes"]
            api.core.services.startService()
            await manager.watchers.loaded
            watcher = manager.watchers.watcher(nodes["127.0.0.2"]["uuid"])
            real_call = manager.client.call
            calls = []

            async def broken_once(*args, **kwargs):
                calls.append(args)
                if len(calls) == 1:
                    raise RuntimeError("boom")
                return await real_call(*args, **kwargs)

            manager.client.call = broken_once
            globalLogPublisher.addObserver(observer)
            try:
                await rounds(clock, [watcher], INTERVAL)
            finally:
                globalLogPublisher.removeObserver(observer)
            assert any("failed a round" in e.get("log_format", "") and e.get("log_failure") for e in logged)
            assert watcher._call is not None and watcher._call.active()
            await rounds(clock, [watcher], watcher._call.getTime() - clock.seconds())
            assert watcher.state == ONLINE and len(calls) >= 2
            await api.core.services.stopService()
        assert clock.getDelayedCalls() == []


def test_first_rounds_are_jittered_within_one_interval():
    clock = Clock()

    class Manager:
        core = type("Core", (), {"clock": clock})()

    settings = WatchSettings(interval=INTERVAL)
    rng = random.Random(7)
    watchers = [NodeWatcher({"uuid": f"n{i}", "ip": f"10.0.0.{i}"}, Manager(), settings, rng) for i in range(20)]
    for watcher in watchers:
        watcher.startService()
    due = sorted(w._call.getTime() for w in watchers)
    assert 0 <= due[0] and due[-1] < INTERVAL and len(set(due)) == 20
    for watcher in watchers:
        watcher.stopService()
    assert clock.getDelayedCalls() == []


def test_health_rules():
    settings = WatchSettings(warn_cpu=90, warn_memory=90, warn_storage=90)
    good = {"hypervisor": {"connected": True}, "metrics": {"cpu": {"percent": 10.0}, "memory": {"percent": 20.0}}}
    assert health(good, {}, settings) == (ONLINE, None)
    assert health({**good, "hypervisor": {"connected": False, "error": "x"}}, {}, settings)[0] == WARNING
    busy = {**good, "metrics": {"cpu": {"percent": 95.0}, "memory": {"percent": 20.0}}}
    assert health(busy, {}, settings, hot_rounds=2) == (ONLINE, None)  # a burst is not a warning
    assert health(busy, {}, settings, hot_rounds=3) == (WARNING, "CPU use 95%")
    full = {"storage": [{"path": "/s", "usage": 99.0}]}
    assert health(good, full, settings) == (WARNING, "storage /s 99% full")
