"""The agent against a real libvirtd + QEMU: a tiny domain defined, started, reported, stopped, undefined."""
from __future__ import annotations

import subprocess

import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from kvmdesk import hookimpl
from kvmdesk.core.plugins import make_plugin_manager
from kvmdesk.testing.agents import AGENT_PASSWORD, free_port, nodes_controller, running_agent
from kvmdesk.testing.guests import tiny_domain_xml

pytestmark = pytest.mark.integration


class Events:
    """Collects forwarded domain events; ``wait(name, kind)`` fires when one arrives."""

    def __init__(self):
        self.seen: list[dict] = []
        self.waiting: list[tuple[str, str, defer.Deferred]] = []

    @hookimpl
    def kvmdesk_domain_event(self, core, node, event):
        self.seen.append(dict(event))
        for entry in list(self.waiting):
            name, kind, d = entry
            if event["name"] == name and event["event"] == kind:
                self.waiting.remove(entry)
                d.callback(event)

    def wait(self, name: str, kind: str) -> defer.Deferred:
        for event in self.seen:
            if event["name"] == name and event["event"] == kind:
                return defer.succeed(event)
        d: defer.Deferred = defer.Deferred()
        self.waiting.append((name, kind, d))
        return d.addTimeout(120, reactor)


@pytest_twisted.ensureDeferred
async def test_a_tiny_domain_through_the_agent_and_the_event_path(libvirtd, image_dir, tmp_path):
    disk = image_dir / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True, timeout=60)
    name = f"kvmdesk-it-{image_dir.name[-8:]}"
    port = free_port("127.0.0.2")
    events = Events()
    plugins = make_plugin_manager()
    plugins.register(events, name="events")
    async with running_agent(tmp_path / "agent", "127.0.0.2", port, agent={"libvirt_uri": libvirtd}) as agent, \
            nodes_controller(tmp_path / "controller", port, plugins=plugins) as api:
        status, body = await api.call("GET", "/resource_mgr/resource_pools")
        pool = body["data"]["results"][0]["uuid"]
        status, body = await api.call("POST", f"/resource_mgr/resource_pools/{pool}/nodes",
                                      {"ip": "127.0.0.2", "password": AGENT_PASSWORD})
        assert status == 200, body
        assert body["data"]["demo_hypervisor"] is False
        node = await api.core.store.collection("nodes").find_one({"uuid": body["data"]["uuid"]})
        agents = api.core.extensions["agents"]
        defined = await agents.call(node, "POST", "/domains", {"xml": tiny_domain_xml(name, disk, user_nic=True)})
        try:
            assert defined["state"] == "shutoff"
            await events.wait(name, "defined")
            started = await agents.call(node, "POST", f"/domains/{name}", {"action": "start"})
            assert started["state"] == "running"
            event = await events.wait(name, "started")
            assert event["detail"] == "booted" and event["uuid"] == defined["uuid"]
            xml = (await agents.call(node, "GET", f"/domains/{name}/xml"))["xml"]
            assert "listen='127.0.0.1'" in xml and "type='vnc'" in xml
            domains = {d["name"]: d for d in await agents.call(node, "GET", "/domains")}
            assert domains[name]["state"] == "running" and domains[name]["id"] is not None
            stopped = await agents.call(node, "POST", f"/domains/{name}", {"action": "destroy"})
            assert stopped["state"] == "shutoff"
            event = await events.wait(name, "stopped")
            assert event["detail"] == "destroyed"
        finally:
            await agents.call(node, "DELETE", f"/domains/{name}")
        await events.wait(name, "undefined")
        assert name not in {d["name"] for d in await agents.call(node, "GET", "/domains")}
        status, body = await api.call("GET", f"/resource_mgr/nodes/{node['uuid']}")
        assert body["data"]["hypervisor_warning"] is None and body["data"]["total_vcpus"] >= 1
        assert agent.forwarder.dropped == 0
