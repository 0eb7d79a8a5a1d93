"""All-in-one: a node agent inside the controller process, enrolled as the controller's own node.

On start (without delaying the controller's start-up) the service picks the hypervisor: the
configured ``[agent] libvirt_uri``, else ``qemu:///system`` when libvirtd answers (probed in a
thread: the first connection can take seconds), else the libvirt test driver, with a "demo
hypervisor" warning in the log and in the node's detail.  It then starts the agent on
``[agent] listen`` and ``[nodes] agent_port`` and enrols it over HTTP like any other node, with a
one-time password that never leaves the process; the controller's node record becomes type 1
(compute and master controller) in the default pool.

The one controller module that imports the agent (:mod:`kvmdesk.agent`): it composes the two programs
in one process.  The nodes plugin imports it only when ``[agent] local`` is on, and the layering test
(``tests/unit/core/test_layering.py``) lists it as its only exception.
"""
from __future__ import annotations

import os
import secrets
import socket
import threading
from pathlib import Path
from typing import Any, Optional

import psutil
from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger

from kvmdesk.agent.config import AgentConfig
from kvmdesk.agent.testdriver import write_test_host
from kvmdesk.core.logtext import escaped
from kvmdesk.plugins.nodes import pools
from kvmdesk.plugins.nodes.controllers import ensure_controller_node
from kvmdesk.plugins.nodes.views import TYPE_COMPUTE_MASTER, WITH_COMPUTE

log = Logger(namespace="kvmdesk.nodes.local")

SYSTEM_URI = "qemu:///system"
#: Keys of the controller's ``[agent]`` section that are the controller's, not the agent's.
_CONTROLLER_KEYS = {"local", "libvirt_probe_timeout"}


def probe_libvirt(reactor: Any, uri: str, timeout: float, clock: Any = None) -> defer.Deferred:
    """Fires with ``None`` when ``uri`` opens within ``timeout`` seconds, else with the reason.

    The attempt runs on its own daemon thread so that a hung libvirtd cannot hold a pool thread.

    :param clock: times the attempt out (the reactor by default).
    """
    result: defer.Deferred = defer.Deferred()

    def settle(value: Optional[str]) -> None:
        if not result.called:
            result.callback(value)

    def attempt() -> None:
        try:
            import libvirt

            from kvmdesk.agent.hypervisor import ensure_event_loop

            ensure_event_loop()
            conn = libvirt.open(uri)
            conn.close()
            reason = None
        except Exception as exc:  # libvirtError, ImportError...
            reason = str(exc).strip() or exc.__class__.__name__
        reactor.callFromThread(settle, reason)

    threading.Thread(target=attempt, name="libvirt-probe", daemon=True).start()
    timer = (clock or reactor).callLater(timeout, settle, f"no answer from libvirt within {timeout:g} s")
    result.addBoth(lambda value: (timer.cancel() if timer.active() else None, value)[1])
    return result


def demo_host(path: Path) -> str:
    """Write a test-driver host shaped like this machine; return its URI."""
    path.parent.mkdir(parents=True, exist_ok=True)
    hostname = socket.gethostname().replace("--", "-")
    memory_kib = psutil.virtual_memory().total // 1024
    return write_test_host(path, hostname=hostname, cpus=os.cpu_count() or 1, memory_kib=memory_kib)


class LocalAgent(Service):
    """Runs and enrols the in-process agent.

    :ivar ready: fires with the controller's node record once enrolled (or with a failure).
    """

    name = "local-agent"

    def __init__(self, core: Any):
        self.core = core
        self.agent: Any = None
        self.demo = False
        self.ready: defer.Deferred = defer.Deferred()
        self._starting: Optional[defer.Deferred] = None

    def startService(self) -> None:
        super().startService()
        self._starting = defer.ensureDeferred(self._start())
        self._starting.addCallbacks(self._started, self._failed)

    def _started(self, node: Any) -> None:
        from kvmdesk.core.app import freeze_startup_heap

        # The agent's modules (libvirt, pyroute2, its routes) arrived after the controller froze its
        # start-up heap: left to the collector, every full collection walked them again (10-15 ms
        # pauses, every 2 s under load).
        freeze_startup_heap()
        self.ready.callback(node)

    def _failed(self, failure: Any) -> None:
        from kvmdesk.agent.service import AgentListenError

        if failure.check(AgentListenError):
            log.critical("{line} (the in-process agent: set [nodes] agent_port or [agent] local = false)",
                         line=str(failure.value))
            fatal = self.core.extensions.get("fatal")
            if fatal is not None:
                fatal()  # the controller process: an all-in-one node that listens nowhere is no node
        else:
            log.failure("the local (all-in-one) agent could not be started and enrolled", failure)
        self.ready.errback(failure)
        self.ready.addErrback(lambda _: None)

    async def _choose_uri(self, agent_dir: Path) -> str:
        configured = self.core.config.get("agent.libvirt_uri") or ""
        if configured:
            return configured
        timeout = float(self.core.config.get("agent.libvirt_probe_timeout", 20.0))
        reason = await probe_libvirt(self.core.reactor, SYSTEM_URI, timeout)
        if reason is None:
            return SYSTEM_URI
        uri = demo_host(agent_dir / "demo-host.xml")
        self.demo = True
        log.warn(
            "DEMO HYPERVISOR: libvirt at {system} is not usable ({reason}); the local node runs on the libvirt "
            "test driver ({uri}), which cannot run real virtual machines.  Install and start libvirtd "
            "(apt install libvirt-daemon-system qemu-system-x86) and restart kvmdesk, or set [agent] libvirt_uri.",
            system=SYSTEM_URI, reason=reason, uri=uri,
        )
        return uri

    async def _start(self) -> Any:
        from kvmdesk.agent.service import Agent

        config = self.core.config
        agent_dir = Path(config.get("agent.data_dir") or (self.core.data_dir / "agent")).absolute()
        uri = await self._choose_uri(agent_dir)
        if not self.running:
            return None
        password = secrets.token_urlsafe(24)
        section = {k: v for k, v in config.section("agent").items() if k not in _CONTROLLER_KEYS}
        section.update(listen=config.get("agent.listen") or "127.0.0.1", port=int(config.get("nodes.agent_port")),
                       libvirt_uri=uri, data_dir=str(agent_dir), password=password)
        # The local agent shares the controller's [network] section (datapath type, OVS paths).
        layer = {"agent": section, "network": dict(config.section("network"))}
        self.agent = Agent(AgentConfig([layer], environ={}), reactor=self.core.reactor)
        self.agent.startService()
        ip = self.agent.config.get("agent.listen")
        manager = self.core.extensions["nodes"]
        node = await ensure_controller_node(self.core)
        enrolment = self.agent.enrolments.current
        if node.get("agent_secret") and enrolment is not None and node.get("ip") == ip \
                and secrets.compare_digest(node["agent_secret"], enrolment.secret):
            log.info("local agent at {ip} already enrolled as node {name}", ip=ip, name=escaped(node.get("name")))
            return node
        # The process owns this agent: a stale enrolment (data directory reused) is simply reset.
        self.agent.unenrol()
        changes: dict[str, Any] = {"type": WITH_COMPUTE.get(node.get("type"), node.get("type") or TYPE_COMPUTE_MASTER)}
        if not node.get("resource_pool_uuid"):
            default_pool = await self.core.store.collection(pools.POOLS).find_one({"default": 1})
            changes["resource_pool_uuid"] = default_pool["uuid"] if default_pool else None
        updated = await manager.attach_agent(node, ip, password, changes)
        log.info("local machine enrolled as node {name} ({ip}), type {type}, in the default pool{demo}",
                 name=escaped(updated.get("name")), ip=ip, type=updated.get("type"),
                 demo=" (DEMO HYPERVISOR)" if self.demo else "")
        return updated

    def stopService(self) -> defer.Deferred:
        super().stopService()
        return defer.ensureDeferred(self._stop())

    async def _stop(self) -> None:
        if self._starting is not None and not self._starting.called:
            waiter: defer.Deferred = defer.Deferred()
            self._starting.addBoth(lambda _: waiter.callback(None))
            await waiter
        if self.agent is not None and self.agent.running:
            await self.agent.stopService()
