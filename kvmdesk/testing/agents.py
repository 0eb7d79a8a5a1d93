"""Test helpers: real node agents (in-process or as ``twistd kvmdesk-agent`` processes) and a controller
that reaches them, each agent on its own loopback address with its own libvirt test-driver host.

Usage (pytest-twisted)::

    port = free_port("127.0.0.2", "127.0.0.3")
    async with running_agent(tmp_path, "127.0.0.2", port) as agent, \\
            nodes_controller(tmp_path, port) as api:
        status, body = await api.call("POST", "/resource_mgr/check_node_virt",
                                      {"ip": "127.0.0.2", "root_pwd": AGENT_PASSWORD})
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any, AsyncIterator, Iterable, Mapping, Optional

import attrs
from twisted.internet import defer, protocol, task
from twisted.logger import Logger

from kvmdesk.agent.config import AgentConfig
from kvmdesk.agent.testdriver import DomainSpec, write_test_host
from kvmdesk.testing.api import ApiClient, listening_api, make_core

log = Logger(namespace="kvmdesk.testing.agents")

AGENT_PASSWORD = "test-enrolment-password"
POOLS = "/resource_mgr/resource_pools"
#: Thresholds that never put a test node in "warning" (the machine running the tests may be busy).
NO_WARNINGS = {"warn_cpu": 101.0, "warn_memory": 101.0, "warn_storage": 101.0}


def free_port(*hosts: str) -> int:
    """A TCP port free on every one of ``hosts`` (agents on distinct loopback addresses share it)."""
    for _ in range(200):
        with socket.socket() as probe:
            probe.bind((hosts[0], 0))
            port = probe.getsockname()[1]
        ok = True
        for host in hosts:
            with socket.socket() as other:
                try:
                    other.bind((host, port))
                except OSError:
                    ok = False
                    break
        if ok:
            return port
    raise RuntimeError(f"no port free on all of {hosts}")


def agent_layers(
    directory: Path,
    ip: str,
    port: int,
    *,
    hostname: Optional[str] = None,
    password: str = AGENT_PASSWORD,
    domains: Iterable[DomainSpec | Mapping] = (),
    cpus: int = 4,
    memory_kib: int = 8 * 1024 * 1024,
    agent: Optional[Mapping[str, Any]] = None,
) -> dict[str, Any]:
    """Configuration of a test agent: a fresh test-driver host file and data directory under ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    uri = write_test_host(directory / "host.xml", hostname=hostname or f"node-{ip}", cpus=cpus,
                          memory_kib=memory_kib, domains=domains)
    section = {
        "listen": ip,
        "port": port,
        "libvirt_uri": uri,
        "data_dir": str(directory / "data"),
        "password": password,
        "allow_power_actions": False,
        # No systemctl: the services list says "unknown" instead of touching the machine's units.
        "systemctl": str(directory / "no-systemctl"),
    }
    section.update(agent or {})
    return {"agent": section}


@contextlib.asynccontextmanager
async def running_agent(directory: Path, ip: str, port: int, **kwargs: Any) -> AsyncIterator[Any]:
    """An in-process :class:`~kvmdesk.agent.service.Agent` listening on ``ip:port`` (stopped after)."""
    from kvmdesk.agent.service import Agent

    clock = kwargs.pop("clock", None)
    agent = Agent(AgentConfig([agent_layers(directory, ip, port, **kwargs)], environ={}), clock=clock)
    agent.startService()
    try:
        await agent.hypervisor.wait_connected()
        yield agent
    finally:
        if agent.running:
            await agent.stopService()


class _AgentProcessProtocol(protocol.ProcessProtocol):
    def __init__(self, ready: defer.Deferred, ended: defer.Deferred, marker: bytes):
        self.ready = ready
        self.ended = ended
        self.marker = marker
        self.output = bytearray()

    def outReceived(self, data: bytes) -> None:
        self.output += data
        if not self.ready.called and self.marker in self.output:
            self.ready.callback(None)

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        if not self.ready.called:
            self.ready.errback(RuntimeError("agent process ended before listening:\n"
                                            + self.output.decode("utf-8", "replace")[-3000:]))
        self.ended.callback(reason.value)


class AgentProcess:
    """``twistd -n kvmdesk-agent`` in a child process, with its own test-driver host.

    :meth:`start` waits for the agent's "listening" log line (no polling); :meth:`kill` ends it by
    its pid (SIGKILL: an agent that dies) and waits for the exit; :meth:`stop` sends SIGTERM.
    """

    def __init__(self, directory: Path, ip: str, port: int, **kwargs: Any):
        self.directory = directory
        self.ip = ip
        self.port = port
        self.kwargs = kwargs
        self.transport: Any = None
        self.protocol: Optional[_AgentProcessProtocol] = None
        self.ended: Optional[defer.Deferred] = None
        directory.mkdir(parents=True, exist_ok=True)
        self.config_file = directory / "agent.toml"
        self._write_config()

    def _write_config(self) -> None:
        section = agent_layers(self.directory, self.ip, self.port, **self.kwargs)["agent"]
        self.config_file.write_text("\n".join(_toml_table("agent", section)) + "\n", encoding="utf-8")

    async def start(self) -> None:
        from twisted.internet import reactor

        ready: defer.Deferred = defer.Deferred()
        self.ended = defer.Deferred()
        self.protocol = _AgentProcessProtocol(ready, self.ended, b"kvmdesk agent listening on")
        twistd = str(Path(sys.executable).with_name("twistd"))
        args = [twistd, "-n", "--pidfile=", "kvmdesk-agent", "--config", str(self.config_file),
                "--listen", self.ip, "--port", str(self.port)]
        env = {k: v for k, v in os.environ.items() if k != "KVMDESK_AGENT_PASSWORD"}
        self.transport = reactor.spawnProcess(self.protocol, twistd, args, env=env, path=str(self.directory))
        await ready

    @property
    def pid(self) -> Optional[int]:
        return self.transport.pid if self.transport is not None else None

    @property
    def output(self) -> str:
        return self.protocol.output.decode("utf-8", "replace") if self.protocol else ""

    async def _signal(self, signo: int) -> None:
        if self.transport is None or self.transport.pid is None:
            return
        ended = self.ended
        os.kill(self.transport.pid, signo)
        await ended
        self.transport = None

    async def kill(self) -> None:
        await self._signal(signal.SIGKILL)

    async def stop(self) -> None:
        await self._signal(signal.SIGTERM)


def _toml_table(name: str, table: Mapping[str, Any]) -> list[str]:
    """The lines of a TOML table; nested mappings (e.g. the agent's ``storage`` roles) become sub-tables."""
    lines, nested = [f"[{name}]"], []
    for key, value in table.items():
        if isinstance(value, Mapping):
            nested += _toml_table(f"{name}.{key}", value)
        elif isinstance(value, bool):
            lines.append(f"{key} = {'true' if value else 'false'}")
        elif isinstance(value, (int, float)):
            lines.append(f"{key} = {value}")
        else:
            lines.append(f"{key} = {_toml_string(str(value))}")
    return lines + nested


def _toml_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def controller_config(agent_port: int, **nodes: Any) -> dict[str, Any]:
    """A controller configuration for tests: no local agent, agents on ``agent_port``, no warnings."""
    return {"agent": {"local": False}, "nodes": {"agent_port": agent_port, **NO_WARNINGS, **nodes}}


@contextlib.asynccontextmanager
async def nodes_controller(
    tmp_path: Path,
    agent_port: int,
    *,
    clock: Any = None,
    plugins: Any = None,
    config: Optional[Mapping[str, Any]] = None,
    nodes: Optional[Mapping[str, Any]] = None,
) -> AsyncIterator[ApiClient]:
    """A logged-in controller whose API also listens on a loopback port (agents post events to it).

    Its services (the watchers) are not started: a test starts ``api.core.services`` itself.
    """
    from twisted.internet import reactor

    from kvmdesk.api.streaming import make_site

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        api_port = probe.getsockname()[1]
    layers = controller_config(agent_port, controller_url=f"http://127.0.0.1:{api_port}/api/v1.0", **(nodes or {}))
    for key, value in (config or {}).items():
        layers.setdefault(key, {}).update(value)
    layers.setdefault("controller", {})["port"] = api_port
    core = await make_core(tmp_path, config=layers, plugins=plugins, clock=clock)
    site_port = None
    try:
        site_port = reactor.listenTCP(api_port, make_site(core.router), interface="127.0.0.1")
        client = ApiClient(core)
        await client.login()
        yield client
    finally:
        if core.services.running:
            await defer.maybeDeferred(core.services.stopService)
        await core.extensions["nodes"].close()
        if site_port is not None:
            await site_port.stopListening()
        await core.store.close()


async def added_node(api: ApiClient, ip: str, password: str = AGENT_PASSWORD) -> dict:
    """Add the agent at ``ip`` to the default pool through the API; returns the stored node record
    (with its agent secret, for ``core.extensions["agents"].call(node, ...)``)."""
    status, body = await api.call("GET", "/resource_mgr/resource_pools")
    pool = body["data"]["results"][0]["uuid"]
    status, body = await api.call("POST", f"/resource_mgr/resource_pools/{pool}/nodes", {"ip": ip, "password": password})
    assert status == 200, body
    return await api.core.store.collection("nodes").find_one({"uuid": body["data"]["uuid"]})


def loopback_hosts(count: int) -> list[str]:
    """``count`` loopback addresses for agents, from 127.0.0.2 on (127.0.0.1 is the controller's)."""
    return [f"127.0.0.{i + 2}" for i in range(count)]


@attrs.define
class Testbed:
    """A controller in this process and the agent processes it enrolled (see :func:`agent_testbed`).

    :ivar nodes: the add-node answers, in the order of ``ips``.
    """

    api: ApiClient
    pool: str
    ips: list[str]
    nodes: list[dict]
    agents: list[AgentProcess]

    async def distributed_image(self, path: Path, name: str = "base", poll: float = 0.2) -> dict:
        """Upload ``path`` (small: sent in one body) as a base image; returns it once every node has it."""
        status, body = await self.api.upload(f"{POOLS}/{self.pool}/base_images", {"name": name, "os_type": "Linux"},
                                             {"file": (path.name, path.read_bytes())})
        if status != 200:
            raise RuntimeError(f"base image upload: {status} {body}")
        image = body["data"]
        transfers = self.api.core.store.collection("image_transfers")
        while await transfers.count({"image_uuid": image["uuid"], "status": 0}) < len(self.ips):
            await task.deferLater(self.api.core.reactor, poll, lambda: None)
        return image

    async def data_network(self, subnet_info: Mapping[str, Any], name: str = "net") -> tuple[dict, dict]:
        """A flat switch and a data network on it with one subnet; returns ``(network, subnet)``."""
        status, switch = await self.api.call("POST", "/resource_mgr/vswitchs",
                                             {"name": f"{name}-sw", "type": "flat", "uplinks": []})
        if status != 200:
            raise RuntimeError(f"switch: {status} {switch}")
        status, network = await self.api.call("POST", "/resource_mgr/data_networks", {
            "name": name, "switch_uuid": switch["data"]["uuid"], "subnet_info": dict(subnet_info)})
        if status != 200:
            raise RuntimeError(f"data network: {status} {network}")
        subnet = await self.api.core.store.collection("subnets").find_one({"network_uuid": network["data"]["uuid"]})
        return network["data"], subnet


@contextlib.asynccontextmanager
async def agent_testbed(directory: Path, count: int, *, config: Optional[Mapping[str, Any]] = None,
                        **agent_kwargs: Any) -> AsyncIterator[Testbed]:
    """``count`` ``twistd kvmdesk-agent`` processes on 127.0.0.2... (test driver), enrolled into the
    default pool of a controller running in this process, whose image distributor runs.  For the
    benches: every process is real, and everything is stopped after.

    :param config: controller configuration layered over :func:`controller_config`'s.
    :param agent_kwargs: passed to every :class:`AgentProcess` (``agent={...}`` sets ``[agent]`` keys).
    """
    ips = loopback_hosts(count)
    port = free_port(*ips)
    agents = [AgentProcess(directory / f"agent-{i}", ip, port, **agent_kwargs) for i, ip in enumerate(ips)]
    try:
        await defer.gatherResults([defer.ensureDeferred(a.start()) for a in agents], consumeErrors=True)
        async with nodes_controller(directory / "controller", port, config=config) as api:
            status, body = await api.call("GET", POOLS)
            pool = body["data"]["results"][0]["uuid"]
            nodes = []
            for ip in ips:
                status, body = await api.call("POST", f"{POOLS}/{pool}/nodes", {"ip": ip, "password": AGENT_PASSWORD})
                if status != 200:
                    raise RuntimeError(f"enrolling {ip}: {status} {body}")
                nodes.append(body["data"])
            distributor = api.core.extensions["storage.distributor"]
            distributor.startService()
            try:
                yield Testbed(api, pool, ips, nodes, agents)
            finally:
                await distributor.stopService()
                for agent in agents:  # before the controller stops: their last events find its store open
                    await agent.stop()
    finally:
        for agent in agents:
            await agent.stop()


__all__ = [
    "AGENT_PASSWORD",
    "AgentProcess",
    "NO_WARNINGS",
    "Testbed",
    "added_node",
    "agent_layers",
    "agent_testbed",
    "controller_config",
    "free_port",
    "listening_api",
    "loopback_hosts",
    "nodes_controller",
    "running_agent",
]
