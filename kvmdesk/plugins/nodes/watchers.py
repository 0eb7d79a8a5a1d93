"""Node watchers: one service per enrolled node, polling its agent on an injected clock.

Each round asks the agent for ``GET /status`` (heartbeat, hypervisor summary, metrics).  Rounds run
at a fixed rate from a random offset within the first interval (so nodes are not polled in
lockstep).  A failed heartbeat is confirmed by a retry half an interval later; two failures in a row
make the node ``offline`` and later retries back off exponentially.  A reachable agent is ``online``,
or ``warning`` when its hypervisor is disconnected, it uses too much CPU, memory or storage, or it
answers but cannot prove its identity.  Every transition is stored with its time and announced
through ``kvmdesk_node_status_changed``.

Host facts are fetched again when the agent restarts (its ``boot_id`` changes) and every
``facts_interval``; the latest sample stays in memory (:attr:`NodeWatchers.latest`) and is written to
the node record every ``metrics_store_interval``.
"""
from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any, Optional

import attrs
from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.logger import Logger

from kvmdesk.core.logtext import escaped
from kvmdesk.core.records import now_text
from kvmdesk.nodeaccess.client import AgentConnectionError, AgentError
from kvmdesk.plugins.nodes.views import NODES, OFFLINE, ONLINE, STATUS_CODES, WARNING

if TYPE_CHECKING:  # pragma: no cover
    from kvmdesk.plugins.nodes.manager import NodeManager

log = Logger(namespace="kvmdesk.nodes.watchers")


@attrs.define
class WatchSettings:
    """The ``[nodes]`` settings the watchers use (see ``nodes-defaults.toml``)."""

    interval: float = 5.0
    timeout: float = 4.0
    max_backoff: float = 60.0
    facts_interval: float = 300.0
    metrics_store_interval: float = 60.0
    warn_cpu: float = 95.0
    warn_memory: float = 95.0
    warn_storage: float = 95.0
    #: Consecutive heartbeats over ``warn_cpu`` before the node is in "warning" (CPU use is bursty).
    warn_cpu_rounds: int = 3
    confirm_failures: int = 2

    @classmethod
    def from_config(cls, config: Any) -> "WatchSettings":
        get = config.get
        interval = float(get("nodes.heartbeat_interval", 5.0))
        return cls(
            interval=interval,
            timeout=min(float(get("nodes.heartbeat_timeout", 4.0)), interval),
            max_backoff=float(get("nodes.max_backoff", 60.0)),
            facts_interval=float(get("nodes.facts_interval", 300.0)),
            metrics_store_interval=float(get("nodes.metrics_store_interval", 60.0)),
            warn_cpu=float(get("nodes.warn_cpu", 95.0)),
            warn_memory=float(get("nodes.warn_memory", 95.0)),
            warn_storage=float(get("nodes.warn_storage", 95.0)),
            warn_cpu_rounds=int(get("nodes.warn_cpu_rounds", 3)),
        )


def health(
    sample: dict[str, Any], facts: dict[str, Any], settings: WatchSettings, hot_rounds: int = 1 << 30
) -> tuple[str, Optional[str]]:
    """``(state, reason)`` of a node that answered its heartbeat.

    :param hot_rounds: how many heartbeats in a row (this one included) were over ``warn_cpu``.
    """
    hypervisor = sample.get("hypervisor") or {}
    if not hypervisor.get("connected"):
        return WARNING, f"hypervisor unavailable: {hypervisor.get('error') or 'not connected'}"
    metrics = sample.get("metrics") or {}
    cpu = (metrics.get("cpu") or {}).get("percent")
    if cpu is not None and cpu >= settings.warn_cpu and hot_rounds >= settings.warn_cpu_rounds:
        return WARNING, f"CPU use {cpu:.0f}%"
    memory = (metrics.get("memory") or {}).get("percent")
    if memory is not None and memory >= settings.warn_memory:
        return WARNING, f"memory use {memory:.0f}%"
    for entry in facts.get("storage") or []:
        usage = entry.get("usage")
        if usage is not None and usage >= settings.warn_storage:
            return WARNING, f"storage {entry.get('path')} {usage:.0f}% full"
    return ONLINE, None


@attrs.define(eq=False, slots=False)
class NodeWatcher(Service):
    """Watches one node.

    :param node: the node record (``uuid``, ``ip``, ``agent_secret``, ``state``...).
    :param manager: gives the core (store, clock, hooks), the agent client and the shared sample map.
    """

    node: dict[str, Any] = attrs.field(repr=False)  # holds the agent secret
    manager: "NodeManager" = attrs.field(repr=False)
    settings: WatchSettings
    rng: random.Random = attrs.field(factory=random.Random)

    state: Optional[str] = attrs.field(default=None, init=False)
    reason: Optional[str] = attrs.field(default=None, init=False)
    failures: int = attrs.field(default=0, init=False)
    rounds: int = attrs.field(default=0, init=False)
    max_lag: float = attrs.field(default=0.0, init=False)
    boot_id: Optional[str] = attrs.field(default=None, init=False)
    _due: float = attrs.field(default=0.0, init=False)
    _call: Any = attrs.field(default=None, init=False)
    _round: Optional[defer.Deferred] = attrs.field(default=None, init=False)
    _waiters: list = attrs.field(factory=list, init=False)
    _facts_at: Optional[float] = attrs.field(default=None, init=False)
    _stored_at: Optional[float] = attrs.field(default=None, init=False)
    _hot_rounds: int = attrs.field(default=0, init=False)

    def __attrs_post_init__(self) -> None:
        self.name = self.node["uuid"]
        self.state = self.node.get("state")
        self.reason = self.node.get("status_reason")

    @property
    def clock(self) -> Any:
        return self.manager.core.clock

    # -- scheduling --

    def startService(self) -> None:
        super().startService()
        self._schedule_at(self.clock.seconds() + self.rng.uniform(0, self.settings.interval))

    def _schedule_at(self, due: float) -> None:
        self._due = due
        self._call = self.clock.callLater(max(0.0, due - self.clock.seconds()), self._tick)

    def _tick(self) -> None:
        self._call = None
        lag = self.clock.seconds() - self._due
        if lag > self.max_lag:
            self.max_lag = lag
        self._round = defer.ensureDeferred(self._safe_round())
        self._round.addBoth(self._round_done)

    def _round_done(self, _: Any) -> None:
        self._round = None
        self.rounds += 1
        if self.running:
            self._schedule_at(self._next_due())
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(self.state)

    def _next_due(self) -> float:
        now = self.clock.seconds()
        if self.failures == 0:
            # Fixed rate: a slow round does not push every later heartbeat back.
            due = self._due + self.settings.interval
            return due if due >= now else now
        if self.failures < self.settings.confirm_failures:
            return now + self.settings.interval / 2
        backoff = self.settings.interval * 2 ** (self.failures - self.settings.confirm_failures)
        return now + min(backoff, self.settings.max_backoff)

    def wait_round(self) -> defer.Deferred:
        """Fires with the node's state when the current (or next) round finishes."""
        waiter: defer.Deferred = defer.Deferred()
        self._waiters.append(waiter)
        return waiter

    def stopService(self) -> defer.Deferred:
        super().stopService()
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        if self._round is None:
            return defer.succeed(None)
        return self.wait_round().addCallback(lambda _: None)

    # -- one round --

    async def _safe_round(self) -> None:
        try:
            await self.poll()
        except Exception:
            log.failure("watcher of node {uuid} ({ip}) failed a round", uuid=self.node["uuid"], ip=self.node.get("ip"))

    async def poll(self) -> None:
        """Heartbeat, facts when due, state and stored sample."""
        client = self.manager.client
        try:
            sample = await client.call(self.node, "GET", "/status", timeout=self.settings.timeout)
        except AgentConnectionError as exc:
            self.failures += 1
            if self.failures >= self.settings.confirm_failures or self.state in (OFFLINE, None):
                await self.transition(OFFLINE, f"agent unreachable: {exc.reason}")
            return
        except AgentError as exc:
            self.failures = 0
            await self.transition(WARNING, f"{exc.__class__.__name__}: {exc.reason}")
            return
        self.failures = 0
        now = self.clock.seconds()
        self.manager.latest[self.node["uuid"]] = {"at": now, **sample}
        changes: dict[str, Any] = {}
        boot_id = (sample.get("agent") or {}).get("boot_id")
        if boot_id != self.boot_id or self._facts_at is None or now - self._facts_at >= self.settings.facts_interval:
            if self.boot_id is not None and boot_id != self.boot_id:
                log.info("agent of node {name} ({ip}) restarted", name=escaped(self.node.get("name")), ip=self.node.get("ip"))
            try:
                facts = await client.call(self.node, "GET", "/facts", timeout=self.settings.timeout * 2)
            except AgentConnectionError as exc:
                # It answered its status and went away before its facts (a node going down, or the
                # in-process agent stopped first at shutdown): the next round asks again.
                log.info("facts of node {ip} not fetched: {reason}", ip=self.node.get("ip"), reason=exc.reason)
                return
            self.boot_id = boot_id
            self._facts_at = now
            changes.update(facts=facts, facts_at=now_text(self.clock), hostname=facts.get("hostname"))
            self.node["facts"] = facts
        self.manager.publish_metrics(self.node, {"at": now, **sample})
        cpu = ((sample.get("metrics") or {}).get("cpu") or {}).get("percent")
        self._hot_rounds = self._hot_rounds + 1 if cpu is not None and cpu >= self.settings.warn_cpu else 0
        state, reason = health(sample, self.node.get("facts") or {}, self.settings, self._hot_rounds)
        if changes or self._stored_at is None or now - self._stored_at >= self.settings.metrics_store_interval:
            changes.update(metrics=sample.get("metrics"), hypervisor=sample.get("hypervisor"),
                           last_seen_at=now_text(self.clock))
            self._stored_at = now
        await self.transition(state, reason, changes)

    async def transition(self, state: str, reason: Optional[str], changes: Optional[dict] = None) -> None:
        """Store ``state`` (and any other ``changes``); announce it if it differs from the last one."""
        old = self.state
        changed = state != old or reason != self.reason
        if not changed and not changes:
            return
        fields = dict(changes or {})
        stamp = now_text(self.clock)
        if changed:
            fields.update(state=state, status=STATUS_CODES[state], status_reason=reason)
            if state != old:
                fields["status_changed_at"] = stamp
        fields["updated_at"] = stamp
        updated = await self.manager.core.store.collection(NODES).find_one_and_update(
            {"uuid": self.node["uuid"]}, {"$set": fields}
        )
        if updated is None:
            return  # deleted meanwhile; the manager stops this watcher
        self.node = updated
        self.state, self.reason = state, reason
        if state != old:
            log.info("node {name} ({ip}): {old} -> {new}{why}", name=escaped(updated.get("name")), ip=updated.get("ip"),
                     old=old, new=state, why=f" ({reason})" if reason else "")
            self.manager.announce(updated, old, state)


class NodeWatchers(MultiService):
    """The watchers of every enrolled node; loads them from the store when started."""

    def __init__(self, manager: "NodeManager", settings: WatchSettings, rng: Optional[random.Random] = None):
        super().__init__()
        self.manager = manager
        self.settings = settings
        self.rng = rng or random.Random()
        self.loaded: Optional[defer.Deferred] = None

    def startService(self) -> None:
        super().startService()
        self.loaded = defer.ensureDeferred(self._load())
        self.loaded.addErrback(lambda f: log.failure("cannot load the nodes to watch", f))

    async def _load(self) -> None:
        for node in await self.manager.core.store.collection(NODES).find({"agent_secret": {"$exists": True}}):
            if node.get("agent_secret") and node["uuid"] not in self.namedServices:
                self.watch(node)
        log.info("watching {n} nodes every {interval}s", n=len(self.namedServices), interval=self.settings.interval)

    def watch(self, node: dict[str, Any]) -> NodeWatcher:
        """Start (or restart) watching ``node``."""
        if node["uuid"] in self.namedServices:
            self.removeService(self.namedServices[node["uuid"]])
        watcher = NodeWatcher(dict(node), self.manager, self.settings, self.rng)
        watcher.setServiceParent(self)
        return watcher

    def forget(self, uuid: str) -> defer.Deferred:
        """Stop watching a node (waits for its round in progress)."""
        self.manager.latest.pop(uuid, None)
        service = self.namedServices.get(uuid)
        if service is None:
            return defer.succeed(None)
        return defer.maybeDeferred(self.removeService, service)

    def watcher(self, uuid: str) -> Optional[NodeWatcher]:
        return self.namedServices.get(uuid)

    def stopService(self) -> defer.Deferred:
        Service.stopService(self)

        async def stop() -> None:
            if self.loaded is not None:
                await self.loaded
            results = await defer.DeferredList(
                [defer.maybeDeferred(s.stopService) for s in reversed(list(self))], consumeErrors=True
            )
            await self.manager.close()
            for ok, failure in results:
                if not ok:
                    failure.raiseException()

        return defer.ensureDeferred(stop())
