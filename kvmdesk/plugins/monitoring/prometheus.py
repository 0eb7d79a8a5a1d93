"""``GET /api/v1.0/monitor_mgr/metrics``: the latest node metrics in the Prometheus text format.

Scrape it with a bearer token (``authorization: {type: Bearer, credentials: ...}`` in Prometheus'
``scrape_configs``).  The text is written by ``prometheus_client``'s exposition code, which gets the
format's details right (HELP/TYPE lines, label escaping, NaN/Inf spelling) for us; the values are
gauges built fresh for each scrape from the raw buffer and the store (no process-wide registry).
"""
from __future__ import annotations

from typing import Any, Iterable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily

from kvmdesk.api.router import ApiRequest, Router
from kvmdesk.plugins.monitoring.alarms import ALARMS, NODES
from kvmdesk.plugins.monitoring.monitor import EXTENSION, Monitor
from kvmdesk.plugins.monitoring.samples import disk_use

NODE_LABELS = ["node", "name", "ip"]
#: Every metric and label name here is a classic one, so the text is the 0.0.4 format every scraper
#: reads (newer prometheus_client versions announce 1.0.0 for the same text).
CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"


class _Snapshot:
    """A collector over figures gathered beforehand (``collect`` cannot wait for the store)."""

    def __init__(self, families: list[GaugeMetricFamily]):
        self.families = families

    def collect(self) -> Iterable[GaugeMetricFamily]:
        return self.families


def families(monitor: Monitor, nodes: list[dict[str, Any]], open_alarms: int, alarm_records: int,
             now: float) -> list[GaugeMetricFamily]:
    """The gauges: node up, CPU, memory, disk use and I/O, NIC traffic; alarms open and recorded."""
    up = GaugeMetricFamily("kvmdesk_node_up", "1 when the node's agent answers its heartbeats", labels=NODE_LABELS)
    cpu = GaugeMetricFamily("kvmdesk_node_cpu_percent", "CPU use of the node (percent)", labels=NODE_LABELS)
    mem = GaugeMetricFamily("kvmdesk_node_memory_percent", "Memory use of the node (percent)", labels=NODE_LABELS)
    used = GaugeMetricFamily("kvmdesk_node_memory_used_bytes", "Memory used on the node", labels=NODE_LABELS)
    storage = GaugeMetricFamily("kvmdesk_node_storage_used_percent", "Use of the node's storage filesystems (percent)",
                                labels=NODE_LABELS)
    disk_labels = NODE_LABELS + ["device"]
    disk_read = GaugeMetricFamily("kvmdesk_node_disk_read_bytes_per_second", "Disk reads", labels=disk_labels)
    disk_write = GaugeMetricFamily("kvmdesk_node_disk_write_bytes_per_second", "Disk writes", labels=disk_labels)
    nic_labels = NODE_LABELS + ["nic", "management"]
    nic_recv = GaugeMetricFamily("kvmdesk_node_network_receive_bytes_per_second", "NIC traffic received",
                                 labels=nic_labels)
    nic_sent = GaugeMetricFamily("kvmdesk_node_network_transmit_bytes_per_second", "NIC traffic sent",
                                 labels=nic_labels)
    for node in nodes:
        labels = [node["uuid"], node.get("name") or "", node.get("ip") or ""]
        up.add_metric(labels, 0.0 if node.get("state") in ("offline", None) else 1.0)
        series = monitor.buffer.nodes.get(node["uuid"])
        percent = disk_use(series.facts if series else node.get("facts") or {})[0]
        if percent is not None:
            storage.add_metric(labels, percent)
        sample = monitor.buffer.latest(node["uuid"], now)
        if sample is None:
            continue
        for family, value in ((cpu, sample.cpu), (mem, sample.mem_percent), (used, sample.mem_used)):
            if value is not None:
                family.add_metric(labels, float(value))
        for name, (read, write) in sorted(sample.disks.items()):
            if read is not None:
                disk_read.add_metric(labels + [name], read)
            if write is not None:
                disk_write.add_metric(labels + [name], write)
        for name, (recv, sent) in sorted(sample.nics.items()):
            manage = "true" if series is not None and name == series.manage_nic else "false"
            if recv is not None:
                nic_recv.add_metric(labels + [name, manage], recv)
            if sent is not None:
                nic_sent.add_metric(labels + [name, manage], sent)
    alarms_open = GaugeMetricFamily("kvmdesk_alarms_open", "Alarms open now", value=open_alarms)
    records = GaugeMetricFamily("kvmdesk_alarm_records", "Alarm records kept", value=alarm_records)
    return [up, cpu, mem, used, storage, disk_read, disk_write, nic_recv, nic_sent, alarms_open, records]


async def exposition(core: Any) -> bytes:
    """The whole scrape answer."""
    monitor: Monitor = core.extensions[EXTENSION]
    nodes = await core.store.collection(NODES).find({}, projection=["uuid", "name", "ip", "state", "facts"],
                                                    sort=[("id", 1)])
    alarms = core.store.collection(ALARMS)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(families(monitor, nodes, await alarms.count({"status": "open"}), await alarms.count(),
                                         core.clock.seconds())))
    return generate_latest(registry)


def register_routes(router: Router) -> None:
    @router.endpoint("GET", "/monitor_mgr/metrics", tags=("monitoring",), produces=("text/plain",), file_only=True,
                     summary="Node metrics in the Prometheus text format (bearer token required)")
    async def metrics(req: ApiRequest) -> bytes:
        body = await exposition(req.core)
        req.http.setHeader(b"content-type", CONTENT_TYPE)
        return body
