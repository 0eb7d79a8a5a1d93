"""Issue 14 defects 2 and 6, against the real ``twistd`` processes.

- A controller, its in-process agent, or an agent that cannot bind its port exits non-zero with one
  clear line (it kept running without listening).
- After a real start, the data directories are 0700 and every file in them 0600 (the store, its WAL
  and shared-memory files, the access log, the enrolment secret were readable by every local user).
"""
from __future__ import annotations

import os
import re
import signal
import socket
import stat
import sys
from pathlib import Path
from typing import Any, Optional

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.protocol import ProcessProtocol

from kvmdesk.testing.agents import free_port

pytestmark = pytest.mark.e2e

TIMEOUT = 60.0
CONTROLLER_READY = re.compile(rb"kvmdesk controller listening on http://[0-9.]+:\d+/api/v1\.0/")
LOCAL_NODE_READY = re.compile(rb"local machine enrolled as node|already enrolled as node")


class Process(ProcessProtocol):
    """A twistd child: its output, the moment a marker appears, its exit code."""

    def __init__(self, marker: Optional[re.Pattern] = None):
        self.marker = marker
        self.output = bytearray()
        self.ready: defer.Deferred = defer.Deferred()
        self.ended: defer.Deferred = defer.Deferred()
        self.pid: Optional[int] = None

    def connectionMade(self) -> None:
        self.pid = self.transport.pid

    def outReceived(self, data: bytes) -> None:
        self.output += data
        if self.marker is not None and not self.ready.called and self.marker.search(self.output):
            self.ready.callback(None)

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        self.pid = None
        if self.marker is not None and not self.ready.called:
            self.ready.errback(RuntimeError("ended before ready:\n" + self.text))
        self.ended.callback(reason.value.exitCode)

    @property
    def text(self) -> str:
        return self.output.decode("utf-8", "replace")


@pytest_twisted.async_yield_fixture
async def spawn(tmp_path):
    started: list[Process] = []

    def run(args: list[str], marker: Optional[re.Pattern] = None, env: Optional[dict] = None) -> Process:
        environment = {k: v for k, v in os.environ.items() if not k.startswith("KVMDESK_")}
        environment.update(env or {})
        process = Process(marker)
        twistd = str(Path(sys.executable).with_name("twistd"))
        reactor.spawnProcess(process, twistd, [twistd, "-n", "--pidfile=", *args], env=environment, path=str(tmp_path))
        started.append(process)
        return process

    yield run
    for process in started:
        if process.pid is not None:
            os.kill(process.pid, signal.SIGKILL)
            await process.ended.addTimeout(TIMEOUT, reactor)


def occupied_port() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def controller_args(tmp_path: Path, port: int, agent_port: int, local: bool = True) -> list[str]:
    config = tmp_path / "controller.toml"
    config.write_text(f"[nodes]\nagent_port = {agent_port}\n[agent]\nlocal = {'true' if local else 'false'}\n"
                      f"libvirt_uri = \"test:///default\"\n")
    return ["kvmdesk", "--config", str(config), "--port", str(port), "--listen", "127.0.0.1",
            "--data-dir", str(tmp_path / "data")]


def tracebacks(text: str) -> int:
    return text.count("Traceback")


@pytest_twisted.ensureDeferred
async def test_an_agent_that_cannot_bind_exits_with_one_clear_line(tmp_path, spawn):
    with occupied_port() as busy:
        port = busy.getsockname()[1]
        process = spawn(["kvmdesk-agent", "--listen", "127.0.0.1", "--port", str(port), "--libvirt-uri",
                         "test:///default", "--data-dir", str(tmp_path / "agent")], env={"KVMDESK_AGENT_PASSWORD": "x"})
        code = await process.ended.addTimeout(TIMEOUT, reactor)
    assert code != 0, process.text
    lines = [line for line in process.text.splitlines() if f"127.0.0.1:{port}" in line and "cannot listen" in line]
    assert len(lines) == 1 and tracebacks(process.text) == 0, process.text


@pytest_twisted.ensureDeferred
async def test_a_controller_that_cannot_bind_exits_with_one_clear_line(tmp_path, spawn):
    with occupied_port() as busy:
        port = busy.getsockname()[1]
        process = spawn(controller_args(tmp_path, port, free_port("127.0.0.1"), local=False),
                        env={"KVMDESK_ADMIN_PASSWORD": "pw"})
        code = await process.ended.addTimeout(TIMEOUT, reactor)
    assert code != 0, process.text
    lines = [line for line in process.text.splitlines() if f"127.0.0.1:{port}" in line and "cannot listen" in line]
    assert len(lines) == 1 and tracebacks(process.text) == 0, process.text


@pytest_twisted.ensureDeferred
async def test_a_controller_whose_local_agent_cannot_bind_exits(tmp_path, spawn):
    with occupied_port() as busy:
        agent_port = busy.getsockname()[1]
        process = spawn(controller_args(tmp_path, free_port("127.0.0.1"), agent_port),
                        env={"KVMDESK_ADMIN_PASSWORD": "pw"})
        code = await process.ended.addTimeout(TIMEOUT, reactor)
    assert code != 0, process.text
    lines = [line for line in process.text.splitlines() if f"127.0.0.1:{agent_port}" in line and "cannot listen" in line]
    assert len(lines) == 1 and tracebacks(process.text) == 0, process.text


def modes(root: Path) -> dict[str, str]:
    found = {".": oct(stat.S_IMODE(root.stat().st_mode))}
    for path in root.rglob("*"):
        found[str(path.relative_to(root))] = oct(stat.S_IMODE(path.lstat().st_mode))
    return found


@pytest_twisted.ensureDeferred
async def test_after_a_real_start_the_data_dirs_are_private(tmp_path, spawn):
    old = os.umask(0o022)  # what a shell gives: files 0644, directories 0755, unless the service says otherwise
    try:
        controller = spawn(controller_args(tmp_path, free_port("127.0.0.1"), free_port("127.0.0.1")),
                           marker=LOCAL_NODE_READY)
        await controller.ready.addTimeout(TIMEOUT, reactor)
        agent = spawn(["kvmdesk-agent", "--listen", "127.0.0.1", "--port", str(free_port("127.0.0.1")),
                       "--libvirt-uri", "test:///default", "--data-dir", str(tmp_path / "agent")],
                      marker=re.compile(rb"kvmdesk agent listening on"), env={"KVMDESK_AGENT_PASSWORD": "x"})
        await agent.ready.addTimeout(TIMEOUT, reactor)
    finally:
        os.umask(old)
    controller_modes, agent_modes = modes(tmp_path / "data"), modes(tmp_path / "agent")
    names = set(controller_modes)
    assert {"kvmdesk.db", "kvmdesk.db-wal", "access.log", "initial-admin-password", "agent"} <= names, names
    for found in (controller_modes, agent_modes):
        for name, mode in found.items():
            is_dir = (tmp_path / ("data" if found is controller_modes else "agent") / name).is_dir()
            assert mode == ("0o700" if is_dir else "0o600"), (name, mode, found)
