"""Alarms open after their duration, close with theirs, are counted, and reach a real webhook."""
from __future__ import annotations

import json
from pathlib import Path

import pytest_twisted
from twisted.internet import defer, reactor
from twisted.web import resource, server

from kvmdesk.testing.api import api_client
from kvmdesk.testing.plugins import LifecycleRecorder, plugin_manager
from tests.unit.monitoring.monitoring_testlib import add_node, advance, heartbeat, make_clock, monitor

RULES = "/monitor_mgr/alarm_rules"


class Receiver(resource.Resource):
    """A webhook endpoint: keeps every JSON body posted to it."""

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.bodies: list[dict] = []
        self.headers: list = []
        self.waiting: list[tuple[int, defer.Deferred]] = []

    def render_POST(self, request):
        self.bodies.append(json.loads(request.content.read()))
        self.headers.append(request.getHeader(b"authorization"))
        for count, waiter in list(self.waiting):
            if len(self.bodies) >= count:
                self.waiting.remove((count, waiter))
                waiter.callback(None)
        return b"{}"

    def wait_for(self, count: int) -> defer.Deferred:
        if len(self.bodies) >= count:
            return defer.succeed(None)
        waiter: defer.Deferred = defer.Deferred()
        self.waiting.append((count, waiter))
        return waiter


async def rule_of(api, metric: str) -> dict:
    status, body = await api.call("GET", RULES, params={"metric": metric})
    assert status == 200, body
    return body["data"]["results"][0]


@pytest_twisted.ensureDeferred
async def test_alarms_open_and_close_with_their_duration_and_reach_a_webhook(tmp_path: Path):
    receiver = Receiver()
    port = reactor.listenTCP(0, server.Site(receiver), interface="127.0.0.1")
    url = f"http://127.0.0.1:{port.getHost().port}/hook"
    clock = make_clock()
    config = {"agent": {"local": False}, "monitoring": {"alarm_interval": 5.0},
              "alarm_webhook": {"url": url, "token": "s3cret"}}
    try:
        async with api_client(tmp_path, clock=clock, config=config) as api:
            busy = await add_node(api, "busy", "10.0.0.1")
            calm = await add_node(api, "calm", "10.0.0.2")
            gone = await add_node(api, "gone", "10.0.0.3", state="offline")
            api.core.services.startService()
            # The default rules exist and can be changed (beyond the contract).
            cpu = await rule_of(api, "cpu")
            assert (cpu["threshold"], cpu["duration"], cpu["enabled"]) == (90.0, 300, True)
            status, body = await api.call("PUT", f"{RULES}/{cpu['uuid']}", {"threshold": 80.0, "duration": 60})
            assert status == 200 and body["data"]["threshold"] == 80.0
            status, body = await api.call("PUT", f"{RULES}/no-such-rule", {"threshold": 1.0})
            assert status == 404 and body["code"] == 8004

            for _ in range(24):  # two minutes of heartbeats: busy at 95 %, calm at 20 %
                await advance(api, 5)
                heartbeat(api, busy, cpu=95.0)
                heartbeat(api, calm, cpu=20.0)
            status, body = await api.call("GET", "/monitor_mgr/alarms", params={"status": "open"})
            opened = {(a["metric"], a["node_name"]) for a in body["data"]["results"]}
            # busy's CPU for over 60 s; gone offline for over 60 s; nothing about calm.
            assert opened == {("cpu", "busy"), ("offline", "gone")}
            cpu_alarm = next(a for a in body["data"]["results"] if a["metric"] == "cpu")
            assert cpu_alarm["value"] == 95.0 and cpu_alarm["ended_at"] is None and cpu_alarm["node_uuid"] == busy["uuid"]

            status, body = await api.call("GET", "/index/get_resource_statistic/")
            assert body["data"]["alarm_node_cnt"] == 2 and body["data"]["alarm_records_cnt"] == 2

            # busy calms down: its alarm closes, lasting from its start to now.
            started = clock.seconds()
            for _ in range(3):
                await advance(api, 5)
                heartbeat(api, busy, cpu=10.0)
                heartbeat(api, calm, cpu=20.0)
            status, body = await api.call("GET", "/monitor_mgr/alarms", params={"metric": "cpu"})
            closed = body["data"]["results"][0]
            assert closed["status"] == "closed" and closed["ended_at"]
            # The condition held from the first round that saw 95 % (START + 10: the first heartbeat came
            # just after the round at START + 5) to the round after the first calm heartbeat (started + 10).
            assert closed["started_ts"] == make_clock().seconds() + 10
            assert closed["duration"] == int(started + 10 - closed["started_ts"]) == 120
            status, body = await api.call("GET", "/index/get_resource_statistic/")
            assert body["data"]["alarm_node_cnt"] == 1 and body["data"]["alarm_records_cnt"] == 2

            # Failed logins: five refusals within the window open one alarm at once.
            for i in range(5):
                api.core.plugins.hook.kvmdesk_login_refused(core=api.core, username=f"u{i}", address="192.0.2.7",
                                                            reason="bad_credentials")
            await advance(api, 5)
            status, body = await api.call("GET", "/monitor_mgr/alarms", params={"metric": "login_failed"})
            login = body["data"]["results"][0]
            assert login["status"] == "open" and login["value"] == 5.0 and "192.0.2.7 x5" in login["message"]
            assert login["node_uuid"] is None
            await advance(api, 300)  # the window has passed
            status, body = await api.call("GET", "/monitor_mgr/alarms", params={"metric": "login_failed"})
            assert body["data"]["results"][0]["status"] == "closed"

            # The webhook got every opening and closing, in order, with the token.
            await receiver.wait_for(5)
            events = [(b["event"], b["alarm"]["metric"]) for b in receiver.bodies]
            assert sorted(events[:2]) == [("opened", "cpu"), ("opened", "offline")]
            assert events[2:] == [("closed", "cpu"), ("opened", "login_failed"), ("closed", "login_failed")]
            assert receiver.bodies[2]["alarm"]["duration"] == closed["duration"]
            assert set(receiver.headers) == {b"Bearer s3cret"}
            await api.core.services.stopService()
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_disabled_rule_closes_its_alarm_and_open_alarms_survive_a_restart(tmp_path: Path):
    clock = make_clock()
    config = {"agent": {"local": False}}
    async with api_client(tmp_path / "a", clock=clock, config=config) as api:
        await add_node(api, "gone", "10.0.0.3", state="offline")
        api.core.services.startService()
        for _ in range(14):  # rounds every 5 s: offline since the first (START + 5), open from START + 65
            await advance(api, 5)
        assert await api.core.store.collection("monitor_alarms").count({"status": "open"}) == 1
        # A new core on the same store picks the open alarm up and closes it once its rule is disabled.
        mon = monitor(api)
        mon.alarms.open.clear()
        mon.alarms.loaded = False
        rule = await rule_of(api, "offline")
        status, _ = await api.call("PUT", f"{RULES}/{rule['uuid']}", {"enabled": False})
        assert status == 200
        await advance(api, 5)
        alarms = await api.core.store.collection("monitor_alarms").find({})
        assert [a["status"] for a in alarms] == ["closed"] and alarms[0]["duration"] == 75 - 5
        await api.core.services.stopService()


@pytest_twisted.ensureDeferred
async def test_rules_are_created_changed_and_deleted_through_the_api_and_announced(tmp_path: Path):
    recorder = LifecycleRecorder()
    config = {"agent": {"local": False}}
    async with api_client(tmp_path, clock=make_clock(), config=config, plugins=plugin_manager(recorder)) as api:
        rule = {"name": "hot node 1", "metric": "cpu", "threshold": 50.0, "duration": 30, "node_uuid": "n-1"}
        status, body = await api.call("POST", RULES, rule)
        assert status == 200, body
        uuid = body["data"]["uuid"]
        status, body = await api.call("POST", RULES, {**rule, "metric": "gpu"})
        assert status == 400 and body["data"][0]["field"] == "metric"
        status, body = await api.call("POST", RULES, {**rule, "threshold": -1})
        assert status == 400 and body["data"][0]["field"] == "threshold"
        status, body = await api.call("PUT", f"{RULES}/{uuid}", {"enabled": False})
        assert status == 200 and body["data"]["enabled"] is False
        status, body = await api.call("DELETE", RULES, {"uuids": [uuid, "missing"]})
        assert status == 200 and (body["data"]["success_num"], body["data"]["failed_num"]) == (1, 1)
        assert [e.hook for e in recorder.of("alarm_rule")] == ["created", "updated", "deleted"]
        status, body = await api.call("GET", RULES)
        assert body["data"]["count"] == 6  # the default rules


@pytest_twisted.ensureDeferred
async def test_refused_api_logins_open_the_failed_login_alarm(tmp_path: Path):
    config = {"agent": {"local": False}}
    async with api_client(tmp_path, clock=make_clock(), config=config) as api:
        api.core.services.startService()
        for _ in range(5):
            status, _ = await api.call("POST", "/auth/login", {"username": "admin", "password": "wrong"}, auth=False)
            assert status in (400, 401, 403, 429)
        await advance(api, 5)
        alarms = await api.core.store.collection("monitor_alarms").find({"metric": "login_failed"})
        assert [a["status"] for a in alarms] == ["open"] and alarms[0]["value"] == 5.0
        await api.core.services.stopService()
