"""The node agent as one Twisted service: libvirt, metrics, services, enrolment, events and the API.

:class:`Agent` is what ``twistd kvmdesk-agent`` runs, and what the controller runs in-process in the
all-in-one setup.  It is also the object the agent's routes (and the optional route modules) close
over: ``agent.hypervisor``, ``agent.node_services`` (systemd), ``agent.run_blocking(...)``, ``agent.config``,
``agent.data_dir``.
"""
from __future__ import annotations

import socket
import time
import uuid as uuidlib
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from twisted.web.client import Agent as WebAgent
from twisted.web.client import HTTPConnectionPool

from treq.client import HTTPClient
from kvmdesk import __version__
from kvmdesk.agent.api import (
    ENROL_CONFLICT,
    ENROL_DISABLED,
    ENROL_THROTTLED,
    ENROL_WRONG_PASSWORD,
    AgentSite,
    SignedResource,
    _headers,
    make_router,
)
from kvmdesk.agent.config import AgentConfig
from kvmdesk.agent.enrolment import EnrolmentStore
from kvmdesk.agent.events import EventForwarder
from kvmdesk.agent.hypervisor import Hypervisor, HypervisorError
from kvmdesk.agent.metrics import MetricsSampler
from kvmdesk.agent.services import SystemdServices
from kvmdesk.core import agentauth
from kvmdesk.core.auth import Throttle
from kvmdesk.core.errors import ApiError
from kvmdesk.core.filemodes import reachable_dirs, restrict_tree
from kvmdesk.core.process import listen_failure_line
from kvmdesk.core.threadpools import stop_pool
from kvmdesk.protocol import hostfacts as host

log = Logger(namespace="kvmdesk.agent")
T = TypeVar("T")


def _default_reactor() -> Any:
    from twisted.internet import reactor

    return reactor


class AgentListenError(Exception):
    """The agent's port could not be opened (the message is the one line to log)."""


class TrackingSite(AgentSite):
    """An :class:`AgentSite` that can drop its open connections (a stopped agent serves nobody)."""

    def __init__(self, resource: Any, **kwargs: Any):
        super().__init__(resource, **kwargs)
        self.protocols: set[Any] = set()

    def buildProtocol(self, addr: Any) -> Any:
        protocol = super().buildProtocol(addr)
        if protocol is None:
            return None
        protocols = self.protocols
        lost = protocol.connectionLost

        def connection_lost(reason: Any) -> Any:
            protocols.discard(protocol)
            return lost(reason)

        protocol.connectionLost = connection_lost
        protocols.add(protocol)
        return protocol

    def drop_connections(self) -> None:
        for protocol in list(self.protocols):
            # twisted.web wraps each HTTP channel in a proxy that has no transport of its own.
            channel = getattr(protocol, "_channel", protocol)
            transport = getattr(channel, "transport", None)
            if transport is not None:
                transport.abortConnection()


class Agent(MultiService):
    """The node agent.

    :param config: the agent's configuration.
    :param reactor: network, threads and processes.
    :param clock: signature freshness, event retries, libvirt reconnection (the reactor by default).
    :param wallclock: Unix time for signatures of the events posted to the controller.
    :param listen: open the API port on start (``False``: the caller serves :attr:`site` itself).
    :param hypervisor, services, sampler: replacements for tests.
    """

    def __init__(
        self,
        config: AgentConfig,
        *,
        reactor: Any = None,
        clock: Any = None,
        wallclock: Callable[[], float] = time.time,
        listen: bool = True,
        hypervisor: Optional[Hypervisor] = None,
        services: Optional[SystemdServices] = None,
        sampler: Optional[MetricsSampler] = None,
    ):
        super().__init__()
        self.reactor = reactor if reactor is not None else _default_reactor()
        self.clock = clock if clock is not None else self.reactor
        self.wallclock = wallclock
        self.config = config
        self.listen = listen
        #: Ends the process when the agent cannot listen (``twistd kvmdesk-agent``); without it
        #: :meth:`startService` raises :class:`AgentListenError` (an embedding process decides).
        self.fatal: Optional[Callable[[], None]] = None
        self.data_dir: Path = config.data_dir
        self.enrolments = EnrolmentStore(self.data_dir)
        self.verifier = agentauth.Verifier(self.clock, agentauth.TO_AGENT, float(config.get("agent.max_clock_skew", 300)))
        self.throttle = Throttle(
            self.clock,
            int(config.get("agent.enrol_max_failures", 5)),
            float(config.get("agent.enrol_failure_window", 300)),
            float(config.get("agent.enrol_lockout", 300)),
        )
        self.hypervisor = hypervisor or Hypervisor(
            config.get("agent.libvirt_uri"), clock=self.clock, reactor=self.reactor,
            pool_size=int(config.get("agent.libvirt_threads", 4)),
        )
        self.hypervisor.setServiceParent(self)
        section = config.section("agent")
        self.node_services = services or SystemdServices.from_config(section, reactor=self.reactor)
        self.sampler = sampler or MetricsSampler(process_limit=int(config.get("agent.process_limit", 20)))
        self.http_pool = HTTPConnectionPool(self.reactor, persistent=True)
        self.http = HTTPClient(WebAgent(self.reactor, pool=self.http_pool, connectTimeout=10))
        events = config.section("agent").get("events", {})
        self.forwarder = EventForwarder(
            self.enrolments,
            self.http,
            self.clock,
            wallclock=wallclock,
            retry_initial=float(events.get("retry_initial", 1.0)),
            retry_max=float(events.get("retry_max", 60.0)),
            queue_max=int(events.get("queue_max", 10000)),
            batch_max=int(events.get("batch_max", 100)),
            timeout=float(events.get("timeout", 10.0)),
        )
        self.forwarder.setServiceParent(self)
        self.hypervisor.subscribe(self.forwarder.push)
        #: Waited for at stop, once the connections are dropped: what dropped requests left running
        #: (route modules add theirs, e.g. an image receiver writing its last chunks).
        self.drains: list[Callable[[], Any]] = []
        self.router = make_router(self)
        self.site = TrackingSite(SignedResource(self.router.resource(), self, self.router))
        self.site.api_router = self.router
        self.port: Any = None
        self.pool: Optional[ThreadPool] = None
        self.boot_id = uuidlib.uuid4().hex
        self.started_at: Optional[float] = None
        self._node_info: Optional[dict] = None

    # -- lifecycle --

    def startService(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        restrict_tree(self.data_dir)
        self.enrolments.current  # noqa: B018  (read now: a corrupt file stops the start, not a request)
        self.pool = ThreadPool(minthreads=0, maxthreads=int(self.config.get("agent.worker_threads", 2)),
                               name="kvmdesk-agent-worker")
        self.pool.start()
        self.started_at = self.wallclock()
        super().startService()
        if self.listen:
            try:
                self.port = self.reactor.listenTCP(int(self.config.get("agent.port")), self.site,
                                                   interface=self.config.get("agent.listen"))
            except CannotListenError as exc:
                line = listen_failure_line("kvmdesk agent", exc.interface, exc.port, exc)
                if self.fatal is None:
                    raise AgentListenError(line) from None
                # The agent process: one clear line and a non-zero exit, never an agent that listens nowhere.
                log.critical("{line}", line=line)
                self.fatal()
                return
            address = self.port.getHost()
            log.info("kvmdesk agent listening on http://{host}:{port}/agent/v1 (libvirt {uri}, {state})",
                     host=address.host, port=address.port, uri=self.config.get("agent.libvirt_uri"),
                     state="enrolled" if self.enrolments.current else "not enrolled yet")

    def stopService(self) -> defer.Deferred:
        return defer.ensureDeferred(self._stop())

    async def _stop(self) -> None:
        if self.port is not None:
            port, self.port = self.port, None
            await port.stopListening()
        self.site.drop_connections()
        for drain in self.drains:
            await defer.maybeDeferred(drain)
        try:
            await defer.maybeDeferred(super().stopService)
        finally:
            await self.http_pool.closeCachedConnections()
            pool, self.pool = self.pool, None
            if pool is not None:
                await stop_pool(self.reactor, pool, "kvmdesk-agent-pool-stop")

    def run_blocking(self, fn: Callable[..., T], *args: Any) -> defer.Deferred:
        """Run a blocking function in the agent's worker threads (for route modules too)."""
        if self.pool is None:
            return defer.fail(RuntimeError("the agent is not running"))
        return deferToThreadPool(self.reactor, self.pool, fn, *args)

    # -- enrolment --

    def enrol(self, request: Any, password: str, controller_id: str, controller_url: str) -> dict:
        """Check the password (and, when already enrolled, the current secret's signature); rotate.

        :raises ApiError: wrong password (401), no password configured (403), enrolled with another
            controller or unsigned re-enrolment (409), too many failures (429).
        """
        peer = getattr(request.getClientAddress(), "host", "") or ""
        key = ("enrol", peer)
        try:
            self.throttle.check(key)
        except ApiError as exc:
            raise ApiError(ENROL_THROTTLED, **exc.params) from None
        expected = self.config.get("agent.password") or ""
        if not expected:
            raise ApiError(ENROL_DISABLED)
        if not agentauth.password_matches(password, expected):
            self.throttle.failed(key)
            log.warn("refused an enrolment from {peer}: wrong password", peer=peer)
            raise ApiError(ENROL_WRONG_PASSWORD)
        current = self.enrolments.current
        if current is not None:
            request.content.seek(0)
            body = request.content.read()
            headers = _headers(request)
            try:
                self.verifier.verify(current.secret, request.method.decode("latin-1"),
                                     request.uri.decode("utf-8", "replace"), headers, body)
            except agentauth.SignatureError as exc:
                log.warn("refused a re-enrolment from {peer} (controller {cid}): {reason}", peer=peer,
                         cid=controller_id, reason=str(exc))
                raise ApiError(ENROL_CONFLICT) from None
        self.throttle.succeeded(key)
        enrolment = self.enrolments.enrol(controller_id, controller_url, self.wallclock())
        log.info("{what} with controller {cid} (events to {url}); agent id {agent_id}",
                 what="re-enrolled (secret rotated)" if current else "enrolled", cid=controller_id,
                 url=controller_url, agent_id=enrolment.agent_id)
        self.forwarder.kick()
        return {
            "agent_id": enrolment.agent_id,
            "secret": enrolment.secret,
            "hostname": socket.gethostname(),
            "version": __version__,
            "rotated": current is not None,
        }

    def unenrol(self) -> None:
        """Forget the enrolment (if any): the enrolment password enrols again."""
        if self.enrolments.current is None:
            return  # nothing to remove: no log line that sounds like something went
        self.enrolments.clear()
        log.info("enrolment removed: the enrolment password enrols again")

    # -- facts and metrics --

    async def _hypervisor_summary(self) -> dict[str, Any]:
        summary: dict[str, Any] = {"uri": self.config.get("agent.libvirt_uri"), "connected": self.hypervisor.connected,
                                   "error": None}
        if not self.hypervisor.connected:
            summary["error"] = "not connected to libvirt"
            return summary
        try:
            if self._node_info is None:
                self._node_info = await self.hypervisor.node_info()
            domains = await self.hypervisor.list_domains()
        except HypervisorError as exc:
            summary.update(connected=self.hypervisor.connected, error=exc.message)
            return summary
        running = [d for d in domains if d["state"] in ("running", "blocked", "paused")]
        summary.update(
            node=self._node_info,
            demo=bool(self._node_info and self._node_info.get("demo")),
            domains_total=len(domains),
            domains_running=len(running),
            vcpus_running=sum(d["vcpus"] for d in running),
            memory_running_kib=sum(d["memory_kib"] for d in running),
        )
        return summary

    def _agent_info(self) -> dict[str, Any]:
        enrolment = self.enrolments.current
        return {
            "version": __version__,
            "agent_id": enrolment.agent_id if enrolment else None,
            "boot_id": self.boot_id,
            "uptime": self.wallclock() - (self.started_at or self.wallclock()),
            "allow_power_actions": bool(self.config.get("agent.allow_power_actions", False)),
        }

    async def status(self) -> dict[str, Any]:
        """The heartbeat: agent, hypervisor summary and metrics without the process list."""
        metrics = await self.run_blocking(self.sampler.sample, False)
        return {"agent": self._agent_info(), "hypervisor": await self._hypervisor_summary(), "metrics": metrics}

    async def metrics(self, with_processes: bool = True) -> dict[str, Any]:
        return await self.run_blocking(self.sampler.sample, with_processes)

    def _host_facts(self) -> dict[str, Any]:
        paths = self.config.storage_paths()
        private = self.data_dir.absolute()
        for path in set(paths.values()):
            # inside the private data directory a storage root stays private (restrict_tree keeps it so);
            # elsewhere QEMU, another user, must reach the disks below
            if Path(path).is_relative_to(private):
                Path(path).mkdir(parents=True, exist_ok=True)
            else:
                reachable_dirs(Path(path))
        return host.host_facts(paths)

    async def facts(self) -> dict[str, Any]:
        """Host facts, the hypervisor's view and the agent's identity."""
        facts = await self.run_blocking(self._host_facts)
        facts["hypervisor"] = await self._hypervisor_summary()
        facts["agent"] = self._agent_info()
        return facts
