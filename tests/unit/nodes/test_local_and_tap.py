"""All-in-one (the controller's own agent) and the twistd entry points."""
from __future__ import annotations

import threading
from pathlib import Path

import libvirt
import pytest_twisted
from twisted.application.service import IServiceMaker
from twisted.internet import reactor, task
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.plugin import getPlugins

from kvmdesk.agent import tap as agent_tap
from kvmdesk.plugins.nodes import local
from kvmdesk.testing.agents import NO_WARNINGS
from kvmdesk.testing.api import ApiClient, make_core


async def all_in_one(tmp_path: Path, agent_port: int, clock: Clock):
    config = {"agent": {"local": True, "listen": "127.0.0.4", "libvirt_probe_timeout": 5.0},
              "nodes": {"agent_port": agent_port, **NO_WARNINGS}}
    core = await make_core(tmp_path, config=config, clock=clock)
    api = ApiClient(core)
    await api.login()
    return core, api


@pytest_twisted.ensureDeferred
async def test_all_in_one_enrols_the_local_machine_with_a_demo_hypervisor(tmp_path, agent_port, monkeypatch):
    # libvirtd "is not reachable": the probe goes to a socket that does not exist.
    monkeypatch.setattr(local, "SYSTEM_URI", "qemu+unix:///system?socket=/nonexistent/libvirt-sock")
    clock = Clock()
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        core, api = await all_in_one(tmp_path, agent_port, clock)
        try:
            core.services.startService()
            node = await core.extensions["local_agent"].ready
            assert node["type"] == 1 and node["ip"] == "127.0.0.4"
            status, body = await api.call("GET", "/resource_mgr/resource_pools")
            default_pool = next(p for p in body["data"]["results"] if p["default"])
            assert node["resource_pool_uuid"] == default_pool["uuid"] and default_pool["host_count"] == 1
            status, body = await api.call("GET", f"/resource_mgr/nodes/{node['uuid']}")
            detail = body["data"]
            assert detail["demo_hypervisor"] is True and "demo hypervisor" in detail["hypervisor_warning"]
            assert "agent_secret" not in detail
            status, body = await api.call("GET", "/resource_mgr/controller_nodes")
            [controller] = body["data"]["results"]
            assert controller["uuid"] == node["uuid"] and controller["type"] == 1
            watcher = core.extensions["nodes"].watchers.watcher(node["uuid"])
            assert watcher is not None and watcher.running
            await core.services.stopService()
        finally:
            await core.extensions["nodes"].close()
            await core.store.close()
        text = "\n".join(formatEvent(e) for e in events)
        assert "DEMO HYPERVISOR" in text
        assert (tmp_path / "data" / "agent" / "demo-host.xml").exists()

        # A restart finds the agent enrolled already (same data directory) and does not re-enrol.
        events.clear()
        core, api = await all_in_one(tmp_path, agent_port, clock)
        try:
            core.services.startService()
            again = await core.extensions["local_agent"].ready
            assert again["uuid"] == node["uuid"] and again["agent_id"] == node["agent_id"]
            await core.services.stopService()
        finally:
            await core.extensions["nodes"].close()
            await core.store.close()
        assert "already enrolled" in "\n".join(formatEvent(e) for e in events)
        assert clock.getDelayedCalls() == []
    finally:
        globalLogPublisher.removeObserver(events.append)


@pytest_twisted.ensureDeferred
async def test_the_libvirt_probe_runs_in_a_thread_and_times_out(monkeypatch):
    release = threading.Event()

    def slow_open(uri):
        release.wait(10)
        raise libvirt.libvirtError("refused")

    monkeypatch.setattr(libvirt, "open", slow_open)
    clock = Clock()
    probe = local.probe_libvirt(reactor, "qemu:///system", 20.0, clock=clock)
    # The reactor keeps turning while libvirt blocks.
    await task.deferLater(reactor, 0, lambda: None)
    assert not probe.called
    clock.advance(20.0)
    assert probe.called
    assert "no answer" in await probe
    release.set()

    release2 = threading.Event()
    release2.set()
    monkeypatch.setattr(libvirt, "open", lambda uri: (_ for _ in ()).throw(libvirt.libvirtError("no socket")))
    reason = await local.probe_libvirt(reactor, "qemu:///system", 20.0, clock=Clock())
    assert "no socket" in reason


def test_the_agent_twistd_plugin_and_its_options(tmp_path, monkeypatch):
    makers = {maker.tapname: maker for maker in getPlugins(IServiceMaker)}
    assert {"kvmdesk", "kvmdesk-agent"} <= set(makers)
    config = tmp_path / "agent.toml"
    config.write_text('[agent]\nallow_power_actions = true\npassword = "from-file"\n', encoding="utf-8")
    monkeypatch.delenv("KVMDESK_AGENT_PASSWORD", raising=False)
    options = agent_tap.Options()
    options.parseOptions(["--listen", "127.0.0.9", "--port", "51234", "--libvirt-uri", "test:///default",
                          "--data-dir", str(tmp_path / "d"), "--config", str(config)])
    agent_config = options.config
    assert agent_config.get("agent.listen") == "127.0.0.9" and agent_config.get("agent.port") == 51234
    assert agent_config.get("agent.libvirt_uri") == "test:///default"
    assert agent_config.get("agent.allow_power_actions") is True
    assert agent_config.get("agent.password") == "from-file"
    monkeypatch.setenv("KVMDESK_AGENT_PASSWORD", "from-env")
    options = agent_tap.Options()
    options.parseOptions(["--config", str(config)])
    assert options.config.get("agent.password") == "from-env"
    assert options.config.get("agent.port") == 50005
