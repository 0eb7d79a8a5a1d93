"""Alarm rules and alarm records.

A rule says what to watch (``metric``), from which value (``threshold``) and for how long
(``duration`` seconds) before an alarm opens:

- ``cpu``, ``memory``, ``disk``: percent used (disk: the node's storage filesystems together);
- ``nic``: bytes per second received plus sent on the node's management NIC;
- ``offline``: the node's watcher says it is offline (``threshold`` unused);
- ``login_failed``: at least ``threshold`` refused API logins within the last ``duration`` seconds
  (not tied to a node; the alarm opens at once and closes when the window holds fewer).

Every ``alarm_interval`` seconds the evaluator compares each enabled rule with each node's latest fresh
sample.  A condition that holds for ``duration`` opens an alarm record (``status`` ``open``,
``started_at``); once it no longer holds the record is closed (``ended_at``, ``duration``).  Each
opening and closing is announced through ``kvmdesk_alarm``; the hook's implementations run detached,
so a slow webhook never holds up the evaluation.
"""
from __future__ import annotations

from collections import Counter, deque
from typing import TYPE_CHECKING, Any, Mapping, Optional

import attrs
from twisted.internet import defer
from twisted.logger import Logger

from kvmdesk.core.plugins import gather_hook
from kvmdesk.core.records import format_time, new_record
from kvmdesk.core.store import Index
from kvmdesk.plugins.monitoring.samples import RawBuffer, disk_use

if TYPE_CHECKING:  # pragma: no cover
    from kvmdesk.core.app import Core

log = Logger(namespace="kvmdesk.monitoring.alarms")

RULES = "monitor_alarm_rules"
ALARMS = "monitor_alarms"
#: The node records (the nodes plugin's collection; read only).
NODES = "nodes"
OFFLINE = "offline"
METRICS = ("cpu", "memory", "disk", "nic", "offline", "login_failed")
NODE_METRICS = ("cpu", "memory", "disk", "nic", "offline")

INDEXES = [
    Index(RULES, ("uuid",), unique=True),
    Index(ALARMS, ("uuid",), unique=True),
    Index(ALARMS, ("status",)),
    Index(ALARMS, ("node_uuid",)),
]

#: Rules created on first start (edit them through ``/monitor_mgr/alarm_rules``).
DEFAULT_RULES = [
    {"name": "CPU", "metric": "cpu", "threshold": 90.0, "duration": 300},
    {"name": "内存 (memory)", "metric": "memory", "threshold": 90.0, "duration": 300},
    {"name": "磁盘 (disk)", "metric": "disk", "threshold": 90.0, "duration": 0},
    {"name": "管理网卡 (management NIC)", "metric": "nic", "threshold": 100 * 1024 * 1024, "duration": 300},
    {"name": "节点离线 (node offline)", "metric": "offline", "threshold": 1.0, "duration": 60},
    {"name": "登录失败 (failed logins)", "metric": "login_failed", "threshold": 5.0, "duration": 300},
]

UNITS = {"cpu": "%", "memory": "%", "disk": "%", "nic": " B/s", "offline": "", "login_failed": " refused logins"}


@attrs.define(eq=False)
class Alarms:
    """The evaluator: remembers since when each condition holds and which alarms are open.

    :param core: store, clock and hooks.
    :param buffer: the raw samples (latest metrics per node).
    """

    core: "Core"
    buffer: RawBuffer
    since: dict[tuple[str, Optional[str]], float] = attrs.field(factory=dict)
    open: dict[tuple[str, Optional[str]], dict[str, Any]] = attrs.field(factory=dict)
    refusals: deque = attrs.field(factory=deque)
    notifying: set = attrs.field(factory=set)
    loaded: bool = False
    _last_notice: Optional[defer.Deferred] = None

    async def seed_rules(self) -> None:
        """Create the default rules when there are none."""
        rules = self.core.store.collection(RULES)
        if await rules.count() == 0:
            for rule in DEFAULT_RULES:
                await rules.insert_one(new_record(self.core.clock, enabled=True, node_uuid=None, **rule))

    async def load(self) -> None:
        """Pick up the alarms left open by the previous run (they close like any other)."""
        for alarm in await self.core.store.collection(ALARMS).find({"status": "open"}):
            self.open[(alarm["rule_uuid"], alarm.get("node_uuid"))] = alarm
            self.since[(alarm["rule_uuid"], alarm.get("node_uuid"))] = alarm.get("started_ts", self.core.clock.seconds())
        self.loaded = True

    def login_refused(self, at: float, username: str, address: str) -> None:
        self.refusals.append((at, username, address))

    def _refusals_since(self, start: float) -> list[tuple[float, str, str]]:
        return [r for r in self.refusals if r[0] > start]

    def _value(self, rule: Mapping[str, Any], node: Mapping[str, Any], now: float) -> Optional[float]:
        metric = rule["metric"]
        if metric == "offline":
            return 1.0 if node.get("state") == OFFLINE else None
        series = self.buffer.nodes.get(node["uuid"])
        if metric == "disk":
            return disk_use(series.facts if series else node.get("facts") or {})[0]
        sample = self.buffer.latest(node["uuid"], now)
        if sample is None:
            return None
        if metric == "cpu":
            return sample.cpu
        if metric == "memory":
            return sample.mem_percent
        rates = sample.nics.get(series.manage_nic) if series and series.manage_nic else None
        return None if rates is None else (rates[0] or 0.0) + (rates[1] or 0.0)

    async def evaluate(self, now: float) -> None:
        """One round: open and close alarms against every enabled rule."""
        if not self.loaded:
            await self.load()
        rules = await self.core.store.collection(RULES).find({"enabled": True})
        nodes = await self.core.store.collection(NODES).find({}, projection=["uuid", "name", "ip", "state", "facts"])
        window = max((float(r["duration"]) for r in rules if r["metric"] == "login_failed"), default=0.0)
        while self.refusals and self.refusals[0][0] <= now - window:
            self.refusals.popleft()
        seen: set[tuple[str, Optional[str]]] = set()
        for rule in rules:
            if rule["metric"] == "login_failed":
                recent = self._refusals_since(now - float(rule["duration"]))
                holds = len(recent) >= float(rule["threshold"])
                await self._settle(rule, None, None, float(len(recent)), holds, 0.0, now, recent)
                seen.add((rule["uuid"], None))
                continue
            for node in nodes:
                if rule.get("node_uuid") and rule["node_uuid"] != node["uuid"]:
                    continue
                value = self._value(rule, node, now)
                holds = value is not None and (rule["metric"] == "offline" or value >= float(rule["threshold"]))
                await self._settle(rule, node["uuid"], node.get("name"), value, holds, float(rule["duration"]), now)
                seen.add((rule["uuid"], node["uuid"]))
        # Rules disabled or deleted, nodes removed: what they had open ends now.
        for key in [k for k in self.open if k not in seen]:
            await self._close(key, now)
        for key in [k for k in self.since if k not in seen]:
            del self.since[key]

    async def _settle(self, rule: Mapping[str, Any], node_uuid: Optional[str], node_name: Optional[str],
                      value: Optional[float], holds: bool, hold: float, now: float, refusals: Any = None) -> None:
        key = (rule["uuid"], node_uuid)
        if not holds:
            self.since.pop(key, None)
            if key in self.open:
                await self._close(key, now)
            return
        started = self.since.setdefault(key, now)
        if key not in self.open and now - started >= hold:
            await self._open(key, rule, node_uuid, node_name, value, started, now, refusals)

    async def _open(self, key: tuple, rule: Mapping[str, Any], node_uuid: Optional[str], node_name: Optional[str],
                    value: Optional[float], started: float, now: float, refusals: Any) -> None:
        metric = rule["metric"]
        subject = node_name or node_uuid or "controller"
        if metric == "login_failed":
            sources = Counter(address for _, _, address in refusals or [])
            where = ", ".join(f"{a} x{n}" for a, n in sources.most_common(5))
            message = f"{int(value or 0)} refused logins in {int(rule['duration'])} s ({where})"
        elif metric == "offline":
            message = f"node {subject} offline"
        else:
            message = f"{rule['name']} of node {subject}: {value:.2f}{UNITS[metric]} >= {rule['threshold']}{UNITS[metric]}"
        alarm = new_record(
            self.core.clock, rule_uuid=rule["uuid"], rule_name=rule["name"], metric=metric, node_uuid=node_uuid,
            node_name=node_name, value=None if value is None else round(value, 2), threshold=rule["threshold"],
            started_at=format_time(started), started_ts=started, ended_at=None, duration=None, status="open",
            message=message,
        )
        self.open[key] = await self.core.store.collection(ALARMS).insert_one(alarm)
        log.warn("alarm opened: {message}", message=message)
        self._notify(self.open[key], "opened")

    async def _close(self, key: tuple, now: float) -> None:
        alarm = self.open.pop(key)
        self.since.pop(key, None)
        duration = int(round(now - float(alarm.get("started_ts", now))))
        changes = {"status": "closed", "ended_at": format_time(now), "duration": duration, "updated_at": format_time(now)}
        closed = await self.core.store.collection(ALARMS).find_one_and_update({"uuid": alarm["uuid"]}, {"$set": changes})
        log.info("alarm closed after {duration} s: {message}", duration=duration, message=alarm.get("message"))
        self._notify(closed or {**alarm, **changes}, "closed")

    def _notify(self, alarm: Mapping[str, Any], event: str) -> None:
        """Announce through ``kvmdesk_alarm``, detached but in order (a closing never overtakes its opening)."""
        alarm = {k: v for k, v in alarm.items() if k != "_id"}
        previous = self._last_notice

        async def announce() -> None:
            if previous is not None:
                await previous
            try:
                await gather_hook(self.core.plugins.hook.kvmdesk_alarm(core=self.core, alarm=alarm, event=event))
            except Exception:
                log.failure("a kvmdesk_alarm implementation failed")

        pending = self._last_notice = defer.ensureDeferred(announce())
        self.notifying.add(pending)
        pending.addBoth(lambda _: self.notifying.discard(pending))

    async def drain(self) -> None:
        """Wait for the notifications still under way (at shutdown)."""
        await defer.DeferredList(list(self.notifying), consumeErrors=True)
