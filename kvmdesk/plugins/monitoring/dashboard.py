"""The dashboard: top five nodes (#1) and the system statistics (#2)."""
from __future__ import annotations

from typing import Any, Mapping, Optional

from kvmdesk.api.models import Model
from kvmdesk.api.router import ApiRequest, Router
from kvmdesk.core.errors import ApiError
from kvmdesk.core.plugins import gather_hook
from kvmdesk.plugins.monitoring import errors as codes
from kvmdesk.plugins.monitoring.alarms import ALARMS, NODES
from kvmdesk.plugins.monitoring.monitor import EXTENSION, Monitor
from kvmdesk.plugins.monitoring.samples import Sample, disk_use, weighted_mean

TAGS = ("monitoring",)
POOLS = "resource_pools"
TOP = 5
ONLINE_STATES = ("online", "warning")
#: Keys other plugins may contribute through ``kvmdesk_resource_counts``.
COUNT_KEYS = ("sum_instance_cnt", "online_instance_cnt", "sum_terminal_cnt", "online_terminal_cnt")


class TopBody(Model):
    statis_period: int


def _ranked(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Highest value first; equal values by node name, then uuid (the last element), so ties never shuffle."""
    rows.sort(key=lambda row: (-row[1], row[0] or "", row[-1]))
    return rows[:TOP]


def nic_total(sample: Sample, nic: Optional[str]) -> Optional[float]:
    rates = sample.nics.get(nic) if nic else None
    if rates is None or (rates[0] is None and rates[1] is None):
        return None
    return (rates[0] or 0.0) + (rates[1] or 0.0)


def top_data(monitor: Monitor, nodes: list[Mapping[str, Any]], now: float, period: int) -> dict[str, Any]:
    """#1: the five busiest nodes by CPU, disk use, memory and management-NIC traffic over ``period``."""
    cpu, disk, memory, nic = [], [], [], []
    for node in nodes:
        uuid, name = node["uuid"], node.get("name")
        samples = monitor.buffer.window(uuid, now, period)
        if not samples:
            continue  # offline, or not heard from yet: nothing to rank
        series = monitor.buffer.nodes[uuid]
        value = weighted_mean(samples, lambda s: s.cpu)
        if value is not None:
            cpu.append((name, value, uuid))
        value = weighted_mean(samples, lambda s: s.mem_percent)
        if value is not None:
            memory.append((name, value, uuid))
        percent, total, used = disk_use(series.facts or node.get("facts") or {})
        if percent is not None:
            disk.append((name, percent, total, used, uuid))
        traffic = [(t, s.weight) for s in samples if (t := nic_total(s, series.manage_nic)) is not None]
        if traffic:
            average = sum(t * w for t, w in traffic) / sum(w for _, w in traffic)
            nic.append((name, average, max(t for t, _ in traffic), uuid))
    return {
        "utc": int(now),
        "cpu_util": [[n, f"{v:.2f}"] for n, v, _ in _ranked(cpu)],
        "disk_util": [[n, f"{v:.2f}", total, used] for n, v, total, used, _ in _ranked(disk)],
        "memory_util": [[n, f"{v:.2f}"] for n, v, _ in _ranked(memory)],
        "nic_util": [[n, int(round(avg)), int(round(peak))] for n, avg, peak, _ in _ranked(nic)],
    }


async def statistics(req: ApiRequest) -> dict[str, Any]:
    """#2: nodes, instances, terminals, pools, alarms and the licence fields."""
    core, config = req.core, req.core.config
    nodes = core.store.collection(NODES)
    alarms = core.store.collection(ALARMS)
    counts = dict.fromkeys(COUNT_KEYS, 0)
    for answer in await gather_hook(core.plugins.hook.kvmdesk_resource_counts(core=core)):
        for key in COUNT_KEYS:
            counts[key] += int((answer or {}).get(key) or 0)
    open_by_node = await alarms.count_by("node_uuid", {"status": "open"})
    return {
        "online_node_cnt": await nodes.count({"state": {"$in": list(ONLINE_STATES)}}),
        "sum_node_cnt": await nodes.count(),
        "online_instance_cnt": counts["online_instance_cnt"],
        "sum_instance_cnt": counts["sum_instance_cnt"],
        "online_terminal_cnt": counts["online_terminal_cnt"],
        "sum_terminal_cnt": counts["sum_terminal_cnt"],
        "resource_pool_cnt": await core.store.collection(POOLS).count(),
        "alarm_node_cnt": len([uuid for uuid in open_by_node if uuid]),
        "alarm_records_cnt": await alarms.count(),
        "license_status": int(config.get("monitoring.license_status", 1)),
        "trial_days": int(config.get("monitoring.trial_days", 0)),
        "license_terminal_cnt": int(config.get("monitoring.license_terminal_cnt", 0)),
    }


async def instance_counts(core: Any) -> dict[str, int]:
    """Every libvirt domain the nodes report is an instance; running ones on online nodes are online.

    The latest heartbeat's summary when the buffer has one, else the one stored with the node.
    """
    monitor: Monitor = core.extensions[EXTENSION]
    total = online = 0
    for node in await core.store.collection(NODES).find({}, projection=["uuid", "state", "hypervisor"]):
        series = monitor.buffer.nodes.get(node["uuid"])
        summary = (series.hypervisor if series and series.hypervisor else None) or node.get("hypervisor") or {}
        total += int(summary.get("domains_total") or 0)
        if node.get("state") in ONLINE_STATES:
            online += int(summary.get("domains_running") or 0)
    return {"sum_instance_cnt": total, "online_instance_cnt": online}


def register_routes(router: Router) -> None:
    @router.endpoint("POST", "/index/get_top_data/", tags=TAGS, body=TopBody, oplog="",
                     summary="Top five nodes by CPU, disk, memory and management-NIC traffic over statis_period seconds")
    async def get_top_data(req: ApiRequest) -> dict:
        period = req.body.statis_period
        if not 1 < period < 60:
            raise ApiError(codes.OUT_OF_RANGE, field="statis_period", reason="1 < statis_period < 60")
        nodes = await req.core.store.collection(NODES).find({}, projection=["uuid", "name", "facts"])
        return top_data(req.core.extensions[EXTENSION], nodes, req.core.clock.seconds(), period)

    @router.endpoint("GET", "/index/get_resource_statistic/", tags=TAGS,
                     summary="System statistics: nodes, instances, terminals, pools, alarms, licence")
    async def get_resource_statistic(req: ApiRequest) -> dict:
        return await statistics(req)
