"""Security: secrets never leave the controller (API answers, logs, operation log); impostors are refused."""
from __future__ import annotations

import json
from pathlib import Path

import orjson
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.web import resource, server

from kvmdesk.core import agentauth
from kvmdesk.nodeaccess.client import AgentClient, AgentIdentityError
from kvmdesk.plugins.nodes.views import WARNING
from kvmdesk.testing.agents import AGENT_PASSWORD, nodes_controller, running_agent

POOLS = "/resource_mgr/resource_pools"


def _all_text(events: list[dict]) -> str:
    parts = []
    for event in events:
        try:
            parts.append(formatEvent(event))
        except Exception:
            pass
        parts.append(repr({k: v for k, v in event.items() if k not in ("log_logger", "log_source")}))
        failure = event.get("log_failure")
        if failure is not None:
            parts.append(failure.getTraceback())
    return "\n".join(parts)


@pytest_twisted.ensureDeferred
async def test_secrets_are_never_in_api_answers_logs_or_the_operation_log(tmp_path: Path, agent_port: int):
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    answers: list[bytes] = []
    try:
        async with running_agent(tmp_path / "a", "127.0.0.2", agent_port) as agent, \
                nodes_controller(tmp_path / "c", agent_port) as api:
            real_call = api.call

            async def recording_call(*args, **kwargs):
                status, body = await real_call(*args, **kwargs)
                answers.append(orjson.dumps(body))
                return status, body

            api.call = recording_call
            status, body = await api.call("GET", POOLS)
            pool = body["data"]["results"][0]["uuid"]
            await api.call("POST", "/resource_mgr/check_node_virt", {"ip": "127.0.0.2", "root_pwd": AGENT_PASSWORD})
            await api.call("POST", "/resource_mgr/check_node_virt", {"ip": "127.0.0.2", "root_pwd": "bad-password"})
            status, body = await api.call("POST", f"{POOLS}/{pool}/nodes", {"ip": "127.0.0.2", "password": AGENT_PASSWORD})
            assert status == 200, body
            uuid = body["data"]["uuid"]
            for path in (f"{POOLS}/{pool}/nodes", f"/resource_mgr/nodes/{uuid}", "/resource_mgr/controller_nodes",
                         f"/resource_mgr/nodes/{uuid}/services", "/index/get_operation_log/", "/openapi.json"):
                status, _ = await api.call("GET", path)
                assert status == 200, path
            await api.call("GET", f"{POOLS}/{pool}/nodes", params={"searchtype": "single", "ip": "127.0.0.2"})
            await api.call("PUT", f"/resource_mgr/nodes/{uuid}", {"name": "renamed"})
            stored = await api.core.store.collection("nodes").find_one({"uuid": uuid})
            secret = stored["agent_secret"]
            assert secret == agent.enrolments.current.secret
            oplog = await api.core.store.collection("operation_logs").find({})
            status, _ = await api.call("DELETE", "/resource_mgr/nodes", {"uuids": [uuid]})
            assert status == 200
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert answers and events
    for text in [*(a.decode("utf-8") for a in answers), _all_text(events), json.dumps(oplog, default=str)]:
        assert secret not in text
        assert AGENT_PASSWORD not in text


@pytest_twisted.ensureDeferred
async def test_the_controller_refuses_an_agent_that_cannot_prove_itself(tmp_path: Path, agent_port: int):
    """An impostor at the node's address answers like an agent, without the proof: refused."""
    clock = Clock()
    secret = "the-real-secret"

    class Impostor(resource.Resource):
        isLeaf = True

        def render(self, request):
            request.setHeader(b"content-type", b"application/json")
            request.setHeader(agentauth.H_PROOF.encode(), b"0" * 64)
            return orjson.dumps({"code": 0, "msg": "ok", "data": {"agent": {}, "hypervisor": {"connected": True},
                                                                    "metrics": {}}})

    port = reactor.listenTCP(agent_port, server.Site(Impostor()), interface="127.0.0.4")
    client = AgentClient(reactor, agent_port, timeout=5)
    try:
        try:
            await client.call({"ip": "127.0.0.4", "agent_secret": secret}, "GET", "/status")
        except AgentIdentityError as exc:
            assert "proof" in exc.reason
        else:
            raise AssertionError("an answer without a valid proof was believed")
        # A watcher puts such a node in "warning", with the reason, instead of trusting its figures.
        async with nodes_controller(tmp_path / "c", agent_port, clock=clock) as api:
            record = await api.core.store.collection("nodes").insert_one(
                {"uuid": "impostor-node", "name": "x", "ip": "127.0.0.4", "type": 5, "agent_secret": secret,
                 "state": "online", "resource_pool_uuid": None})
            manager = api.core.extensions["nodes"]
            api.core.services.startService()
            await manager.watchers.loaded
            watcher = manager.watchers.watcher("impostor-node")
            waiter = watcher.wait_round()
            clock.advance(10)
            await waiter
            assert watcher.state == WARNING and "AgentIdentityError" in watcher.reason
            assert "impostor-node" not in manager.latest
            await api.core.services.stopService()
    finally:
        await client.close()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_an_agent_event_post_needs_the_node_secret(tmp_path: Path, agent_port: int):
    async with running_agent(tmp_path / "a", "127.0.0.2", agent_port), \
            nodes_controller(tmp_path / "c", agent_port) as api:
        status, body = await api.call("GET", POOLS)
        pool = body["data"]["results"][0]["uuid"]
        status, body = await api.call("POST", f"{POOLS}/{pool}/nodes", {"ip": "127.0.0.2", "password": AGENT_PASSWORD})
        node = await api.core.store.collection("nodes").find_one({"uuid": body["data"]["uuid"]})
        payload = orjson.dumps({"agent_id": node["agent_id"], "events": [{"name": "x", "event": "started"}]})
        target = "/api/v1.0/agent/events"
        for secret in (None, "wrong-secret"):
            headers = {"Content-Type": "application/json", agentauth.H_AGENT: node["agent_id"]}
            if secret:
                headers.update(agentauth.sign(secret, "POST", target, payload, now=reactor.seconds(),
                                              direction=agentauth.TO_CONTROLLER))
            status, answer = await api.call("POST", "/agent/events", data=payload, headers=headers, auth=False)
            assert status == 401, answer
        # The controller's own direction is not accepted either (no reflection of agent-bound requests).
        headers = {"Content-Type": "application/json", agentauth.H_AGENT: node["agent_id"],
                   **agentauth.sign(node["agent_secret"], "POST", target, payload, now=reactor.seconds())}
        status, answer = await api.call("POST", "/agent/events", data=payload, headers=headers, auth=False)
        assert status == 401
        headers = {"Content-Type": "application/json", agentauth.H_AGENT: node["agent_id"],
                   **agentauth.sign(node["agent_secret"], "POST", target, payload, now=reactor.seconds(),
                                    direction=agentauth.TO_CONTROLLER)}
        status, answer = await api.call("POST", "/agent/events", data=payload, headers=headers, auth=False)
        assert status == 200 and answer["data"] == {"accepted": 1}
        assert api.core.extensions["nodes"].events[-1]["name"] == "x"


class EventRecorder:
    def __init__(self):
        self.events: list[dict] = []
        self.arrived = defer.Deferred()

    from kvmdesk import hookimpl

    @hookimpl
    def kvmdesk_domain_event(self, core, node, event):
        self.events.append({"ip": node["ip"], **event})
        if event["event"] == "stopped" and not self.arrived.called:
            self.arrived.callback(None)


@pytest_twisted.ensureDeferred
async def test_domain_events_reach_the_controller_hook(tmp_path: Path, agent_port: int):
    from kvmdesk.agent.testdriver import domain_xml
    from kvmdesk.core.plugins import make_plugin_manager

    recorder = EventRecorder()
    plugins = make_plugin_manager()
    plugins.register(recorder, name="recorder")
    async with running_agent(tmp_path / "a", "127.0.0.2", agent_port) as agent, \
            nodes_controller(tmp_path / "c", agent_port, plugins=plugins) as api:
        status, body = await api.call("GET", POOLS)
        pool = body["data"]["results"][0]["uuid"]
        status, body = await api.call("POST", f"{POOLS}/{pool}/nodes", {"ip": "127.0.0.2", "password": AGENT_PASSWORD})
        node = await api.core.store.collection("nodes").find_one({"uuid": body["data"]["uuid"]})
        agents = api.core.extensions["agents"]
        await agents.call(node, "POST", "/domains", {"xml": domain_xml("evt")})
        await agents.call(node, "POST", "/domains/evt", {"action": "start"})
        await agents.call(node, "POST", "/domains/evt", {"action": "destroy"})
        await recorder.arrived
        kinds = [(e["name"], e["event"]) for e in recorder.events]
        assert kinds[:3] == [("evt", "defined"), ("evt", "started"), ("evt", "stopped")]
        assert all(e["ip"] == "127.0.0.2" for e in recorder.events)
        seqs = [e["seq"] for e in recorder.events]
        assert seqs == sorted(seqs)
        assert agent.forwarder.dropped == 0
