"""Recent raw samples of every node, in memory: what ``current_perf``, the top five and alarms read.

Each heartbeat's metrics become one :class:`Sample` (rates are per second over the ``interval`` the
agent measured).  A node keeps the samples of the last ``keep`` seconds in a deque.  Averages over a
period weight each sample by the seconds it covers, so a shorter sample (one taken between two
heartbeats for a process list) counts for what it measured and no more.
"""
from __future__ import annotations

from collections import deque
from typing import Any, Callable, Iterable, Mapping, Optional

import attrs

#: ``(read, write)`` bytes per second; for a NIC, read is received and write is sent.
Rates = tuple[Optional[float], Optional[float]]


@attrs.frozen(slots=True)
class Sample:
    """One heartbeat's metrics.

    :param at: the controller clock's Unix time of the answer.
    :param weight: seconds the sample covers (the agent's interval, or the heartbeat interval).
    """

    at: float
    weight: float
    cpu: Optional[float]
    mem_percent: Optional[float]
    mem_used: Optional[int]
    disks: dict[str, Rates]
    nics: dict[str, Rates]


def sample_from(at: float, metrics: Mapping[str, Any], default_weight: float) -> Sample:
    """A :class:`Sample` from the agent's metrics (:meth:`kvmdesk.agent.metrics.MetricsSampler.sample`)."""
    memory = metrics.get("memory") or {}
    return Sample(
        at=at,
        weight=float(metrics.get("interval") or default_weight),
        cpu=(metrics.get("cpu") or {}).get("percent"),
        mem_percent=memory.get("percent"),
        mem_used=memory.get("used"),
        disks={d["name"]: (d.get("read_bytes_per_sec"), d.get("write_bytes_per_sec")) for d in metrics.get("disks") or []},
        nics={n["name"]: (n.get("recv_bytes_per_sec"), n.get("sent_bytes_per_sec")) for n in metrics.get("nics") or []},
    )


def management_nic(node: Mapping[str, Any]) -> Optional[str]:
    """The name of the node's management NIC: the one configured, else the one holding the node's IP."""
    facts = node.get("facts") or {}
    nics = [n for n in facts.get("network_interfaces") or [] if not n.get("loopback")]
    chosen = node.get("manage_interface")
    for nic in nics:
        if chosen and nic.get("name") == chosen:
            return chosen
    for nic in nics:
        if any(a.get("address") == node.get("ip") for a in nic.get("ipv4") or []):
            return nic.get("name")
    return None


def disk_use(facts: Mapping[str, Any]) -> tuple[Optional[float], int, int]:
    """``(percent, total, used)`` over the node's storage filesystems.

    Storage roles often share one filesystem: it is counted once (same ``device``; agents that do not
    report it: same ``(total, used)``).
    """
    seen: dict[Any, tuple[int, int]] = {}
    for entry in facts.get("storage") or []:
        if entry.get("total"):
            figures = (int(entry["total"]), int(entry.get("used") or 0))
            seen[entry.get("device", figures)] = figures
    total = sum(t for t, _ in seen.values())
    used = sum(u for _, u in seen.values())
    return (used / total * 100.0 if total else None), total, used


def nic_addresses(facts: Mapping[str, Any]) -> dict[str, str]:
    """NIC name -> its first IPv4 address ("" when it has none)."""
    return {n.get("name"): ((n.get("ipv4") or [{}])[0].get("address") or "")
            for n in facts.get("network_interfaces") or [] if n.get("name")}


@attrs.define(eq=False)
class NodeSeries:
    """What the buffer knows of one node: its latest details and its recent samples."""

    uuid: str
    name: Optional[str] = None
    ip: Optional[str] = None
    manage_nic: Optional[str] = None
    facts: Mapping[str, Any] = attrs.field(factory=dict)
    hypervisor: Mapping[str, Any] = attrs.field(factory=dict)
    samples: deque = attrs.field(factory=deque)


def weighted_mean(samples: Iterable[Sample], value: Callable[[Sample], Optional[float]]) -> Optional[float]:
    """Mean of ``value`` over the samples that have one, weighted by the seconds each covers."""
    total = weight = 0.0
    for sample in samples:
        v = value(sample)
        if v is not None:
            total += v * sample.weight
            weight += sample.weight
    return total / weight if weight else None


def mean_rates(samples: list[Sample], field: str) -> dict[str, Rates]:
    """Per device (``disks`` or ``nics``): the weighted mean read and write rates."""
    names = sorted({name for s in samples for name in getattr(s, field)})
    result = {}
    for name in names:
        read = weighted_mean(samples, lambda s: getattr(s, field).get(name, (None, None))[0])
        write = weighted_mean(samples, lambda s: getattr(s, field).get(name, (None, None))[1])
        result[name] = (read, write)
    return result


@attrs.define
class RawBuffer:
    """The recent samples of every node.

    :param keep: seconds of samples kept per node (the longest period ``current_perf`` accepts).
    :param stale_after: a node's latest sample still stands for "now" this long after it arrived
        (a period shorter than the heartbeat interval may hold no sample of its own).
    """

    keep: float
    stale_after: float
    nodes: dict[str, NodeSeries] = attrs.field(factory=dict)

    def add(self, node: Mapping[str, Any], sample: Sample, hypervisor: Optional[Mapping[str, Any]] = None) -> NodeSeries:
        series = self.nodes.get(node["uuid"])
        if series is None:
            series = self.nodes[node["uuid"]] = NodeSeries(node["uuid"])
        series.name, series.ip = node.get("name"), node.get("ip")
        if node.get("facts"):
            series.facts = node["facts"]
            series.manage_nic = management_nic(node)
        if hypervisor:
            series.hypervisor = hypervisor
        samples = series.samples
        samples.append(sample)
        horizon = sample.at - self.keep
        while samples and samples[0].at < horizon:
            samples.popleft()
        return series

    def forget(self, uuid: str) -> None:
        self.nodes.pop(uuid, None)

    def window(self, uuid: str, now: float, seconds: float) -> list[Sample]:
        """The samples of the last ``seconds``; else the latest one if it is still fresh; else none."""
        series = self.nodes.get(uuid)
        if series is None or not series.samples:
            return []
        start = now - seconds
        found = [s for s in reversed(series.samples) if s.at > start]
        if found:
            found.reverse()
            return found
        latest = series.samples[-1]
        return [latest] if now - latest.at <= self.stale_after else []

    def latest(self, uuid: str, now: float) -> Optional[Sample]:
        """The node's latest sample if it is fresh."""
        found = self.window(uuid, now, 0.0)
        return found[-1] if found else None
