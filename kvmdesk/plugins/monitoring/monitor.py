"""The monitoring state of one controller (``core.extensions["monitoring"]``) and its loops."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Awaitable, Callable, ClassVar, Mapping

import attrs
from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.logger import Logger

from kvmdesk.core.periodic import PeriodicService

from kvmdesk.plugins.monitoring.alarms import NODES, Alarms
from kvmdesk.plugins.monitoring.columns import HourCache
from kvmdesk.plugins.monitoring.rollups import Rollups
from kvmdesk.plugins.monitoring.samples import RawBuffer, sample_from

if TYPE_CHECKING:  # pragma: no cover
    from kvmdesk.core.app import Core

log = Logger(namespace="kvmdesk.monitoring")

EXTENSION = "monitoring"

#: The ``[monitoring]`` configuration section and its defaults.
DEFAULTS = {
    "monitoring": {
        # Seconds of raw heartbeat samples kept in memory per node: the longest `statis_period` of
        # current_perf (and of the top five).
        "raw_seconds": 600,
        # Days of minute rollups kept in the store; older hours are deleted every `prune_interval` seconds,
        # `prune_chunk` documents per statement (also the node-days one write of sealed hours holds).
        "retention_days": 30,
        "prune_interval": 3600,
        "prune_chunk": 500,
        # Seconds between writes of the completed minutes to the store.
        "flush_interval": 60,
        # Most points one history answer may have (statis_hours * 60 / step_minutes).
        "max_history_points": 1440,
        # Sealed node-hours of minute points kept in memory for history answers once read (about 20 KiB
        # each; 2,400 = a day of 100 nodes); 0 turns the cache off.  (The current and the previous hour
        # of every node are always in memory: the rollups' head.)
        "history_cache_hours": 2400,
        # Seconds between two evaluations of the alarm rules.
        "alarm_interval": 5.0,
        # Seconds to wait for a node's process list (current_perf asks the agents).
        "process_timeout": 4.0,
        # The dashboard's licence fields. An open-source build has no licence: 1 = full version,
        # no trial (0 days), 0 terminals = no limit.
        "license_status": 1,
        "trial_days": 0,
        "license_terminal_cnt": 0,
    }
}


@attrs.frozen
class Settings:
    raw_seconds: float = 600.0
    heartbeat: float = 5.0
    retention_days: float = 30.0
    prune_interval: float = 3600.0
    prune_chunk: int = 500
    flush_interval: float = 60.0
    max_history_points: int = 1440
    history_cache_hours: int = 2400
    alarm_interval: float = 5.0
    process_timeout: float = 4.0

    @classmethod
    def from_config(cls, config: Any) -> "Settings":
        get = config.get
        return cls(
            raw_seconds=float(get("monitoring.raw_seconds", 600)),
            heartbeat=float(get("nodes.heartbeat_interval", 5.0)),
            retention_days=float(get("monitoring.retention_days", 30)),
            prune_interval=float(get("monitoring.prune_interval", 3600)),
            prune_chunk=int(get("monitoring.prune_chunk", 500)),
            flush_interval=float(get("monitoring.flush_interval", 60)),
            max_history_points=int(get("monitoring.max_history_points", 1440)),
            history_cache_hours=int(get("monitoring.history_cache_hours", 2400)),
            alarm_interval=float(get("monitoring.alarm_interval", 5.0)),
            process_timeout=float(get("monitoring.process_timeout", 4.0)),
        )


@attrs.define(eq=False)
class Monitor:
    """Raw samples, rollups and alarms of one controller."""

    core: "Core"
    settings: Settings
    buffer: RawBuffer = attrs.field(init=False)
    rollups: Rollups = attrs.field(init=False)
    alarms: Alarms = attrs.field(init=False)
    #: Uuids of nodes known to exist (loaded at start, learnt from heartbeats and reads, dropped when a
    #: node is removed): a history answer for one of them reads nothing but the day documents it needs.
    known_nodes: set[str] = attrs.field(init=False, factory=set)

    def __attrs_post_init__(self) -> None:
        # A latest sample stands for "now" until two heartbeats were missed.
        self.buffer = RawBuffer(keep=self.settings.raw_seconds, stale_after=2 * self.settings.heartbeat)
        self.rollups = Rollups(self.core.store, HourCache(self.settings.history_cache_hours))
        self.alarms = Alarms(self.core, self.buffer)

    def receive(self, node: Mapping[str, Any], sample: Mapping[str, Any]) -> None:
        """Take one heartbeat sample (``kvmdesk_node_metrics``)."""
        metrics = sample.get("metrics")
        if not metrics:
            return
        raw = sample_from(float(sample["at"]), metrics, self.settings.heartbeat)
        self.buffer.add(node, raw, sample.get("hypervisor"))
        self.rollups.add(node["uuid"], raw)
        self.known_nodes.add(node["uuid"])

    def forget(self, uuid: str) -> None:
        self.buffer.forget(uuid)
        self.rollups.forget(uuid)
        self.known_nodes.discard(uuid)

    async def start(self) -> None:
        """At start-up: the alarm rules seeded, the rollups' head read back, the nodes' uuids known."""
        await self.alarms.seed_rules()
        points = await self.rollups.load(self.settings.prune_chunk)
        nodes = await self.core.store.collection(NODES).find({}, projection=["uuid"])
        self.known_nodes.update(node["uuid"] for node in nodes)
        log.info("monitoring: {points} recent minute points of {nodes} nodes in memory", points=points,
                 nodes=len({node for node, _ in self.rollups.head}))

    async def flush(self) -> int:
        """Write the completed minutes, then seal the hours that are over into day documents."""
        written = await self.rollups.flush(before=self.core.clock.seconds())
        await self.rollups.seal(self.core.clock.seconds(), self.settings.prune_chunk)
        return written

    async def prune(self) -> int:
        cutoff = self.core.clock.seconds() - self.settings.retention_days * 86400
        return await self.rollups.prune(cutoff, self.settings.prune_chunk)

    async def evaluate_alarms(self) -> None:
        await self.alarms.evaluate(self.core.clock.seconds())

    def services(self) -> "MultiService":
        """The flush, prune and alarm loops, as one service; stopping it writes every pending minute."""
        return MonitorServices(self)


@attrs.define(eq=False)
class Loop(PeriodicService):
    """One of the monitoring loops: ``work`` every ``interval`` seconds, the first one interval after
    the start."""

    at_start: ClassVar[bool] = False
    work: Callable[[], Awaitable[Any]] = attrs.field(kw_only=True)
    what: str = attrs.field(kw_only=True, default="a monitoring round")

    async def sweep(self) -> Any:
        return await self.work()


class MonitorServices(MultiService):
    """The monitoring loops; on stop, the loops end, then every pending minute is written."""

    name = "monitoring"

    def __init__(self, monitor: Monitor):
        super().__init__()
        self.monitor = monitor
        settings = monitor.settings
        for interval, work, what in ((settings.flush_interval, monitor.flush, "monitoring: a flush"),
                                     (settings.prune_interval, monitor.prune, "monitoring: an expiry round"),
                                     (settings.alarm_interval, monitor.evaluate_alarms, "monitoring: an alarm round")):
            Loop(monitor.core, interval, work=work, what=what).setServiceParent(self)

    def settled(self) -> defer.Deferred:
        """Fires when every loop's round in progress has finished (tests advance a clock, then wait)."""
        return defer.DeferredList([s.current_round for s in self if s.current_round is not None],
                                  consumeErrors=True)

    def stopService(self) -> defer.Deferred:
        async def stop() -> None:
            await MultiService.stopService(self)
            await self.monitor.alarms.drain()
            try:
                await self.monitor.rollups.flush()
            except Exception:
                log.failure("monitoring: could not write the last minutes")

        return defer.ensureDeferred(stop())
