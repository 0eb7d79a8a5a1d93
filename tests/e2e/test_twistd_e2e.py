"""End to end: the real ``twistd -n kvmdesk`` in a subprocess on a loopback port, driven with treq.

Readiness is event-driven: a ProcessProtocol watches the log output for the "listening on" line,
bounded by a timeout.  Every process started here is stopped by its pid in teardown.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import sys
from pathlib import Path
from typing import Any, Optional

import pytest
import pytest_twisted
import treq
from twisted.internet import defer, reactor
from twisted.internet.error import ProcessDone
from twisted.internet.protocol import ProcessProtocol
from twisted.web.client import HTTPConnectionPool

pytestmark = pytest.mark.e2e

PASSWORD = "e2e-admin-password"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
REQUEST_TIMEOUT = 30.0
LISTENING = re.compile(rb"kvmdesk controller listening on http://([0-9.]+):(\d+)/api/v1\.0/")


def _twistd_command() -> list[str]:
    script = Path(sys.executable).with_name("twistd")
    if script.exists():
        return [sys.executable, str(script)]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Twistd(ProcessProtocol):
    """One ``twistd -n kvmdesk`` process: its output, readiness and exit."""

    def __init__(self) -> None:
        self.output = bytearray()
        self.ready: defer.Deferred = defer.Deferred()  # fires with the base URL
        self.ended: defer.Deferred = defer.Deferred()  # fires with the exit reason
        self.transport: Any = None
        self.pid: Optional[int] = None
        self._waits: list[tuple[re.Pattern, defer.Deferred]] = []

    def wait_for(self, pattern: bytes) -> defer.Deferred:
        """Fires once the output matches ``pattern`` (at once if it already does)."""
        d: defer.Deferred = defer.Deferred()
        self._waits.append((re.compile(pattern), d))
        self._check_waits()
        return d

    def _check_waits(self) -> None:
        for pattern, d in list(self._waits):
            if pattern.search(self.output):
                self._waits.remove((pattern, d))
                d.callback(None)

    def connectionMade(self) -> None:
        self.pid = self.transport.pid

    def outReceived(self, data: bytes) -> None:
        self._received(data)

    def errReceived(self, data: bytes) -> None:
        self._received(data)

    def _received(self, data: bytes) -> None:
        self.output += data
        self._check_waits()
        if not self.ready.called:
            found = LISTENING.search(self.output)
            if found:
                host, port = found.group(1).decode(), int(found.group(2))
                self.ready.callback(f"http://{host}:{port}/api/v1.0")

    def processEnded(self, reason: Any) -> None:
        self.pid = None
        if not self.ready.called:
            self.ready.errback(RuntimeError("twistd ended before listening:\n" + self.text))
        self.ended.callback(reason.value)

    @property
    def text(self) -> str:
        return self.output.decode("utf-8", "replace")

    @property
    def running(self) -> bool:
        return self.pid is not None


@pytest_twisted.async_yield_fixture
async def start(tmp_path):
    """``await start(data_dir, env)`` runs a controller; teardown stops whatever still runs, by pid."""
    started: list[Twistd] = []

    async def run(data_dir: Path, env: Optional[dict[str, str]] = None, config_text: str = "") -> tuple[Twistd, str]:
        environment = {k: v for k, v in os.environ.items() if not k.startswith("KVMDESK_")}
        environment.update(env if env is not None else {"KVMDESK_ADMIN_PASSWORD": PASSWORD})
        process = Twistd()
        # The product's defaults, except the in-process node agent's port: a free one, so that this test
        # never clashes with another controller on the machine.
        config = tmp_path / f"kvmdesk-{len(started)}.toml"
        config.write_text(f"[nodes]\nagent_port = {_free_port()}\n{config_text}")
        command = _twistd_command() + ["-n", "--pidfile=", "kvmdesk", "--config", str(config), "--port",
                                       str(_free_port()), "--listen", "127.0.0.1", "--data-dir", str(data_dir)]
        reactor.spawnProcess(process, command[0], command, env=environment, path=str(tmp_path))
        started.append(process)
        base = await process.ready.addTimeout(START_TIMEOUT, reactor)
        return process, base

    yield run

    for process in started:
        if process.running:
            os.kill(process.pid, signal.SIGKILL)
            await process.ended.addTimeout(STOP_TIMEOUT, reactor)


async def _terminate(process: Twistd) -> Any:
    """SIGTERM the process and wait (bounded) for it to exit."""
    os.kill(process.pid, signal.SIGTERM)
    return await process.ended.addTimeout(STOP_TIMEOUT, reactor)


class Client:
    """A small treq client for the envelope API."""

    def __init__(self, base: str):
        self.base = base
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.token: Optional[str] = None

    async def call(self, method: str, path: str, json: Any = None, *, auth: bool = True) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {self.token}"} if auth and self.token else {}
        response = await treq.request(method, self.base + path, json=json, headers=headers, pool=self.pool,
                                      timeout=REQUEST_TIMEOUT)
        return response.code, await response.json()

    async def login(self, password: str = PASSWORD) -> None:
        status, body = await self.call("POST", "/auth/login", {"username": "admin", "password": password}, auth=False)
        assert (status, body["code"]) == (200, 0), body
        self.token = body["data"]["token"]


def _assert_clean_exit(process: Twistd, reason: Any) -> None:
    """The shutdown ran to its end without errors.

    twistd (since Twisted 21.2) ends a process stopped by a signal with that same signal once the
    reactor has shut down cleanly (``twisted.scripts.twistd.runApp``), so supervisors see "stopped by
    SIGTERM" (systemd counts it as a clean stop); a plain exit status 0 is accepted too.
    """
    clean_status = (isinstance(reason, ProcessDone) and reason.exitCode == 0) or (
        reason.signal == signal.SIGTERM and reason.exitCode is None)
    assert clean_status, (reason, process.text)
    assert "Main loop terminated." in process.text and "Server Shut Down." in process.text, process.text
    assert "Traceback" not in process.text and "Unhandled" not in process.text, process.text


@pytest_twisted.ensureDeferred
async def test_pools_survive_a_restart(start, tmp_path):
    data_dir = tmp_path / "data"
    process, base = await start(data_dir)
    api = Client(base)

    status, body = await api.call("GET", "/resource_mgr/resource_pools", auth=False)
    assert (status, body["code"]) == (401, 1008)
    status, body = await api.call("POST", "/auth/login", {"username": "admin", "password": "nope"}, auth=False)
    assert (status, body["code"]) == (401, 1009)
    await api.login()

    status, body = await api.call("GET", "/resource_mgr/resource_pools")
    assert (status, [p["name"] for p in body["data"]["results"]]) == (200, ["default"])
    status, body = await api.call("POST", "/resource_mgr/resource_pools", {"name": "e2e-pool", "desc": "created"})
    assert (status, body["code"]) == (200, 0)
    kept = body["data"]["uuid"]
    status, body = await api.call("POST", "/resource_mgr/resource_pools/", {"name": "e2e-doomed", "desc": None})
    doomed = body["data"]["uuid"]
    status, body = await api.call("PUT", f"/resource_mgr/resource_pools/{kept}", {"desc": "edited"})
    assert (status, body["data"]["desc"]) == (200, "edited")
    status, body = await api.call("DELETE", "/resource_mgr/resource_pools", {"uuids": [doomed]})
    assert (status, body["code"]) == (200, 0)
    status, body = await api.call("GET", "/resource_mgr/resource_pools?searchtype=contain&name=E2E")
    assert [(p["name"], p["desc"]) for p in body["data"]["results"]] == [("e2e-pool", "edited")]
    status, body = await api.call("GET", "/index/get_operation_log/?page_size=3")
    before_restart = body["data"]["results"]
    assert [r["content"].split(":")[0] for r in before_restart] == ["删除资源池", "编辑资源池", "新增资源池"]
    assert {r["user_ip"] for r in before_restart} == {"127.0.0.1"}

    _assert_clean_exit(process, await _terminate(process))
    # The access log is a file of its own in the data directory, one combined-format line per request.
    access = (data_dir / "access.log").read_text()
    assert '"GET /api/v1.0/resource_mgr/resource_pools HTTP/1.1" 401' in access
    assert '"POST /api/v1.0/auth/login HTTP/1.1" 200' in access
    assert '"DELETE /api/v1.0/resource_mgr/resource_pools HTTP/1.1" 200' in access
    assert "resource_mgr/resource_pools HTTP/1.1" not in process.text
    assert api.token and api.token not in access

    process, base = await start(data_dir)
    api = Client(base)
    await api.login()
    status, body = await api.call("GET", "/resource_mgr/resource_pools")
    pools = {p["name"]: p for p in body["data"]["results"]}
    assert set(pools) == {"default", "e2e-pool"}
    assert (pools["e2e-pool"]["uuid"], pools["e2e-pool"]["desc"]) == (kept, "edited")
    status, body = await api.call("GET", "/index/get_operation_log/?page_size=4")
    assert body["data"]["results"][1:] == before_restart  # the newest record is this login

    status, body = await api.call("POST", "/auth/logout")
    assert status == 200
    status, body = await api.call("GET", "/resource_mgr/resource_pools")
    assert status == 401
    _assert_clean_exit(process, await _terminate(process))


@pytest_twisted.ensureDeferred
async def test_first_start_without_a_password_writes_one(start, tmp_path):
    data_dir = tmp_path / "data"
    process, base = await start(data_dir, env={})
    path = data_dir / "initial-admin-password"
    assert oct(path.stat().st_mode & 0o777) == oct(0o600)
    password = path.read_text().strip()
    assert password in process.text  # logged once, for the operator
    api = Client(base)
    await api.login(password)
    status, body = await api.call("GET", "/openapi.json", auth=False)
    assert status == 200 and body["openapi"].startswith("3.")
    status, body = await api.call("GET", "/no/such/page", auth=False)
    assert (status, body["code"]) == (404, 1006)
    _assert_clean_exit(process, await _terminate(process))


@pytest_twisted.ensureDeferred
async def test_a_bad_setting_stops_the_start_with_a_clear_message(start, tmp_path):
    with pytest.raises(RuntimeError, match="twistd ended before listening") as raised:
        await start(tmp_path / "data", config_text='[controller]\naccess_log_rotate_mb = "big"\n')
    text = str(raised.value)
    assert "kvmdesk controller cannot start: controller.access_log_rotate_mb must be a number" in text, text
    assert "Traceback" not in text, text


#: Phrases that read as trouble; none belongs in the log of a healthy first start.
ALARMING = re.compile(r"cannot be reached|enrolment removed|holds no secret|not brought in step|Traceback|Unhandled|"
                      r"#error\]|#critical\]|failed", re.I)


@pytest_twisted.ensureDeferred
async def test_a_healthy_first_start_logs_nothing_that_sounds_like_an_error(start, tmp_path):
    process, base = await start(tmp_path / "empty-data-dir")
    # The local agent enrols, then the network plugin brings the node in step: the whole first start.
    await process.wait_for(rb"local machine enrolled as node").addTimeout(START_TIMEOUT, reactor)
    await process.wait_for(rb"node \S+ (is in step|not brought in step|refused to be brought in step)|"
                           rb"bringing node").addTimeout(START_TIMEOUT, reactor)
    _assert_clean_exit(process, await _terminate(process))
    # Where no libvirtd runs (CI runs this before or after the integration set has stopped its own), the
    # one DEMO HYPERVISOR warning is the intended, tested message, and it quotes libvirt's "Failed to connect".
    lines = [line for line in process.text.splitlines() if "DEMO HYPERVISOR" not in line]
    alarming = [line for line in lines if ALARMING.search(line)]
    assert alarming == [], "\n".join(alarming)
    warnings = [line for line in lines if "#warn]" in line]
    assert warnings == [], "\n".join(warnings)
    assert ("plugins loaded: admin, alarm_webhook, console, desktops, jobs, monitoring, network, nodes, storage, "
            "templates, users; blocked: none") in process.text
