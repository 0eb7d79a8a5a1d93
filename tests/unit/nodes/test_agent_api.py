"""The agent's API, in-process: enrolment, signatures both ways, domains, services, guarded power."""
from __future__ import annotations

import stat

import orjson
import pytest
import pytest_twisted
import treq
from twisted.internet import reactor

from kvmdesk.agent import api as agent_api
from kvmdesk.agent.testdriver import domain_xml
from kvmdesk.core import agentauth
from kvmdesk.nodeaccess.client import AgentCallError, AgentSignatureRefused
from kvmdesk.testing.agents import AGENT_PASSWORD

IP = "127.0.0.2"
CONTROLLER = {"controller_id": "controller-1", "controller_url": "http://127.0.0.1:9/api/v1.0"}


async def post_json(url: str, body, headers=None):
    response = await treq.post(url, data=orjson.dumps(body), headers={"Content-Type": "application/json",
                                                                     **(headers or {})})
    return response.code, orjson.loads(await response.content()), response.headers


async def enrol(client, agent_port, password=AGENT_PASSWORD) -> dict:
    return await client.enrol(IP, password, CONTROLLER["controller_id"], CONTROLLER["controller_url"])


@pytest_twisted.ensureDeferred
async def test_unsigned_and_wrongly_signed_requests_are_refused_on_every_path(agent, agent_port):
    base = f"http://{IP}:{agent_port}/agent/v1"
    for method, path in [("GET", "/status"), ("GET", "/facts"), ("GET", "/domains"), ("POST", "/node/reboot"),
                         ("POST", "/unenrol"), ("GET", "/no/such/path")]:
        response = await treq.request(method, base + path)
        body = orjson.loads(await response.content())
        assert response.code == 401 and body["code"] == agent_api.AGENT_UNAUTHENTICATED.code, (path, body)
        assert agentauth.H_PROOF.encode() not in dict(response.headers.getAllRawHeaders())
    # A signature made with a secret the agent does not hold (it is not even enrolled yet).
    headers = agentauth.sign("guessed-secret", "GET", "/agent/v1/status", b"", now=reactor.seconds())
    response = await treq.get(base + "/status", headers=headers)
    assert response.code == 401
    assert "not enrolled" in orjson.loads(await response.content())["msg"]


@pytest_twisted.ensureDeferred
async def test_wrong_enrolment_password_is_refused_with_a_clear_error(agent, agent_port, client):
    code, body, _ = await post_json(f"http://{IP}:{agent_port}/agent/v1/enrol",
                                    {"password": "wrong", **CONTROLLER}, {"Accept-Language": "en"})
    assert code == 401 and body["code"] == agent_api.ENROL_WRONG_PASSWORD.code
    assert body["msg"] == "wrong enrolment password for this node"
    assert agent.enrolments.current is None


@pytest_twisted.ensureDeferred
async def test_enrolment_stores_the_secret_0600_and_every_answer_carries_a_proof(agent, agent_port, client):
    answer = await enrol(client, agent_port)
    path = agent.enrolments.path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert orjson.loads(path.read_bytes())["secret"] == answer["secret"]
    node = {"ip": IP, "agent_secret": answer["secret"]}
    status = await client.call(node, "GET", "/status")
    assert status["agent"]["agent_id"] == answer["agent_id"]
    assert status["hypervisor"]["connected"] and status["hypervisor"]["demo"] is True
    # An error answer (404 envelope for an unknown path) is proved too.
    with pytest.raises(AgentCallError) as caught:
        await client.call(node, "GET", "/no/such/path")
    assert caught.value.status == 404
    # The controller refuses to go on with a secret the agent does not hold.
    with pytest.raises(AgentSignatureRefused):
        await client.call({"ip": IP, "agent_secret": "not-the-secret"}, "GET", "/status")


@pytest_twisted.ensureDeferred
async def test_re_enrolment_needs_the_current_secret_and_rotates_it(agent, agent_port, client):
    first = await enrol(client, agent_port)
    # The password alone no longer enrols (another controller, or anyone who learnt it).
    code, body, _ = await post_json(f"http://{IP}:{agent_port}/agent/v1/enrol", {"password": AGENT_PASSWORD,
                                                                                "controller_id": "other",
                                                                                "controller_url": "http://x/"})
    assert code == 409 and body["code"] == agent_api.ENROL_CONFLICT.code
    second = await client.enrol(IP, AGENT_PASSWORD, "controller-1", CONTROLLER["controller_url"],
                                current_secret=first["secret"])
    assert second["rotated"] is True and second["secret"] != first["secret"]
    with pytest.raises(AgentSignatureRefused):
        await client.call({"ip": IP, "agent_secret": first["secret"]}, "GET", "/status")
    # Releasing the agent (node deleted) makes the password enrol again.
    await client.call({"ip": IP, "agent_secret": second["secret"]}, "POST", "/unenrol")
    assert agent.enrolments.current is None and not agent.enrolments.path.exists()
    third = await enrol(client, agent_port)
    assert third["rotated"] is False


@pytest_twisted.ensureDeferred
async def test_enrolment_failures_are_throttled(agent, agent_port):
    url = f"http://{IP}:{agent_port}/agent/v1/enrol"
    for _ in range(5):
        code, _, _ = await post_json(url, {"password": "wrong", **CONTROLLER})
        assert code == 401
    code, body, _ = await post_json(url, {"password": AGENT_PASSWORD, **CONTROLLER})
    assert code == 429 and body["code"] == agent_api.ENROL_THROTTLED.code


@pytest_twisted.ensureDeferred
async def test_domain_lifecycle_through_the_signed_api(agent, agent_port, client):
    node = {"ip": IP, "agent_secret": (await enrol(client, agent_port))["secret"]}
    names = {d["name"]: d["state"] for d in await client.call(node, "GET", "/domains")}
    assert names == {"vm-running": "running", "vm-off": "shutoff"}
    defined = await client.call(node, "POST", "/domains", {"xml": domain_xml("vm-new", vcpus=2)})
    assert defined["name"] == "vm-new" and defined["state"] == "shutoff"
    started = await client.call(node, "POST", "/domains/vm-new", {"action": "start"})
    assert started["state"] == "running"
    with pytest.raises(AgentCallError) as caught:
        await client.call(node, "POST", "/domains/vm-new", {"action": "start"})
    # The test driver reports this as an internal error (qemu as an invalid operation, 409).
    assert caught.value.status in (409, 500) and "already running" in caught.value.msg
    with pytest.raises(AgentCallError) as caught:
        await client.call(node, "POST", "/domains/vm-new", {"action": "explode"})
    assert caught.value.status == 400
    assert (await client.call(node, "POST", "/domains/vm-new", {"action": "destroy"}))["state"] == "shutoff"
    xml = await client.call(node, "GET", "/domains/vm-new/xml")
    assert "<name>vm-new</name>" in xml["xml"]
    assert (await client.call(node, "DELETE", "/domains/vm-new"))["name"] == "vm-new"
    with pytest.raises(AgentCallError) as caught:
        await client.call(node, "GET", "/domains/vm-new")
    assert caught.value.status == 404 and caught.value.code == agent_api.DOMAIN_NOT_FOUND.code
    with pytest.raises(AgentCallError) as caught:
        await client.call(node, "POST", "/domains", {"xml": "<domain"})
    assert caught.value.status == 400


@pytest_twisted.ensureDeferred
async def test_facts_metrics_services_and_guarded_power(agent, agent_port, client):
    node = {"ip": IP, "agent_secret": (await enrol(client, agent_port))["secret"]}
    facts = await client.call(node, "GET", "/facts")
    assert {"hostname", "cpu", "memory", "gpus", "os", "virtualization", "network_interfaces", "storage",
            "hypervisor", "agent"} <= set(facts)
    assert facts["hypervisor"]["node"]["hostname"] == "node-a"
    assert facts["hypervisor"]["domains_total"] == 2 and facts["hypervisor"]["vcpus_running"] == 2
    assert {s["role"] for s in facts["storage"]} == {"template_sys", "template_data", "instance_sys", "instance_data"}
    metrics = await client.call(node, "GET", "/metrics", params={"processes": 1})
    assert "processes" in metrics and metrics["memory"]["total"] > 0
    services = await client.call(node, "GET", "/services")
    assert services and all(s["state"] == "unknown" and s["reason"] for s in services)
    for path in ("/node/reboot", "/node/shutdown"):
        with pytest.raises(AgentCallError) as caught:
            await client.call(node, "POST", path, headers={"Accept-Language": "en"})
        assert caught.value.status == 403 and caught.value.code == agent_api.POWER_REFUSED.code
        assert "allow_power_actions" in caught.value.msg
    with pytest.raises(AgentCallError) as caught:
        await client.call(node, "POST", "/services/sshd/restart")
    assert caught.value.status == 404


class _Counter:
    """A body sink that counts what it receives."""

    def __init__(self):
        self.size = 0

    def write(self, data: bytes) -> None:
        self.size += len(data)

    def finish(self):
        return self.size

    def abort(self, reason) -> None:
        self.size = -1


@pytest_twisted.ensureDeferred
async def test_streamed_uploads_and_downloads_are_signed_and_proved(agent, agent_port, client):
    import io

    from twisted.web.client import FileBodyProducer

    from kvmdesk.api.router import ApiRequest

    sinks = []

    def factory(context):
        sinks.append(_Counter())
        return sinks[-1]

    @agent.router.endpoint("PUT", "/test/upload", summary="test upload", auth=False, oplog="", stream=factory)
    async def upload(req: ApiRequest) -> dict:
        return {"received": req.stream}

    @agent.router.endpoint("GET", "/test/download", summary="test download", auth=False)
    async def download(req: ApiRequest) -> bytes:
        req.http.setHeader(b"content-type", b"application/octet-stream")
        return b"z" * 500_000

    node = {"ip": IP, "agent_secret": (await enrol(client, agent_port))["secret"]}
    body = FileBodyProducer(io.BytesIO(b"x" * 3_000_000))
    answer = await client.call(node, "PUT", "/test/upload", body=body)
    assert answer == {"received": 3_000_000} and sinks[-1].size == 3_000_000

    response = await client.request(node, "GET", "/test/download", stream=True)
    chunks = []
    await treq.collect(response, chunks.append)
    assert sum(map(len, chunks)) == 500_000

    # A streamed body with a wrong signature is refused before a sink for it even exists.
    bad = {"ip": IP, "agent_secret": "wrong"}
    with pytest.raises(AgentSignatureRefused):
        await client.call(bad, "PUT", "/test/upload", body=FileBodyProducer(io.BytesIO(b"y" * 100_000)))
    assert len(sinks) == 1 and sinks[-1].size == 3_000_000
    # A streamed endpoint does not accept a body signed by hash (it cannot check it before storing).
    with pytest.raises(AgentSignatureRefused):
        await client.call(node, "PUT", "/test/upload", body=b"small body")


@pytest_twisted.ensureDeferred
async def test_stale_and_replayed_requests_are_refused_over_http(tmp_path, agent_port, client):
    from twisted.internet.task import Clock

    from kvmdesk.testing.agents import running_agent

    clock = Clock()
    clock.advance(reactor.seconds())
    async with running_agent(tmp_path / "skewed", "127.0.0.3", agent_port, clock=clock) as skewed:
        answer = await client.enrol("127.0.0.3", AGENT_PASSWORD, "c", "http://127.0.0.1:9/api/v1.0")
        secret = answer["secret"]
        url = f"http://127.0.0.3:{agent_port}/agent/v1/status"
        headers = agentauth.sign(secret, "GET", "/agent/v1/status", b"", now=reactor.seconds())
        first = await treq.get(url, headers=headers)
        assert first.code == 200 and first.headers.getRawHeaders(agentauth.H_PROOF)
        await first.content()
        replay = await treq.get(url, headers=headers)
        assert replay.code == 401 and "replayed" in orjson.loads(await replay.content())["msg"]
        # the agent's clock moves an hour on: a request signed "now" by the controller is stale (not just past
        # the 300 s window: real time has moved on since the clock was set, by seconds on a loaded host)
        clock.advance(3600)
        with pytest.raises(AgentSignatureRefused) as caught:
            await client.call({"ip": "127.0.0.3", "agent_secret": secret}, "GET", "/status")
        assert "stale" in caught.value.reason
        assert skewed.enrolments.current.secret == secret


def test_the_event_forwarder_retries_with_backoff_and_keeps_order(tmp_path):
    from twisted.internet import defer
    from twisted.internet.task import Clock

    from kvmdesk.agent.enrolment import EnrolmentStore
    from kvmdesk.agent.events import EventForwarder

    class Response:
        def __init__(self, code):
            self.code = code

        def content(self):
            return defer.succeed(b'{"code": 0, "msg": "ok", "data": {}}')

    class FlakyController:
        def __init__(self):
            self.fail = 2
            self.posts = []

        def post(self, url, data, headers, timeout):
            if self.fail:
                self.fail -= 1
                return defer.fail(ConnectionRefusedError("controller down"))
            self.posts.append((url, orjson.loads(data), headers))
            return defer.succeed(Response(200))

    clock = Clock()
    store = EnrolmentStore(tmp_path)
    http = FlakyController()
    forwarder = EventForwarder(store, http, clock, wallclock=lambda: 1_800_000_000.0, retry_initial=1.0,
                               retry_max=8.0, queue_max=3)
    forwarder.startService()
    forwarder.push({"name": "a", "event": "started"})
    assert http.posts == [] and len(forwarder.queue) == 1  # not enrolled: events wait
    store.enrol("controller", "http://127.0.0.1:1/api/v1.0", 0)
    forwarder.kick()  # what the enrol handler does
    assert forwarder._retry_call.getTime() == 1.0  # first failure: retry after 1 s
    for name in "bcde":
        forwarder.push({"name": name, "event": "started"})
    assert [e["name"] for e in forwarder.queue] == ["c", "d", "e"] and forwarder.dropped == 2
    clock.advance(1.0)
    assert forwarder._retry_call.getTime() == 3.0  # second failure: 2 s later
    clock.advance(2.0)
    assert forwarder._retry_call is None and not forwarder.queue
    [(url, body, headers)] = http.posts
    assert url == "http://127.0.0.1:1/api/v1.0/agent/events"
    assert [e["name"] for e in body["events"]] == ["c", "d", "e"] and [e["seq"] for e in body["events"]] == [3, 4, 5]
    assert headers[agentauth.H_AGENT] == store.current.agent_id and headers[agentauth.H_SIGNATURE]
    forwarder.stopService()
    assert clock.getDelayedCalls() == []
