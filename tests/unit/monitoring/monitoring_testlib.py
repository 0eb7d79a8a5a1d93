"""Helpers of the monitoring tests: a real core on an injected clock, node records, heartbeat samples."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, AsyncIterator, Optional

from twisted.internet.task import Clock

from kvmdesk.core.records import new_record
from kvmdesk.testing.api import ApiClient, api_client

#: 2023-11-14 22:13:20 UTC: a start on no minute boundary (the tests step to one themselves).
START = 1_700_000_000.0
GIB = 1024 ** 3


def make_clock(start: float = START) -> Clock:
    clock = Clock()
    clock.advance(start)
    return clock


@contextlib.asynccontextmanager
async def monitoring_api(tmp_path: Path, clock: Clock, plugins: Any = None, **monitoring: Any) -> AsyncIterator[ApiClient]:
    """A logged-in API on a fresh store, no local agent; its services are not started.

    :param monitoring: settings of the ``[monitoring]`` section.
    """
    config = {"agent": {"local": False}, "monitoring": monitoring}
    async with api_client(tmp_path, clock=clock, config=config, plugins=plugins) as api:
        yield api


def facts(ip: str, *, nic: str = "eth0", total: int = 100 * GIB, used: int = 10 * GIB) -> dict[str, Any]:
    return {
        "hostname": f"host-{ip}",
        "network_interfaces": [
            {"name": "lo", "loopback": True, "ipv4": [{"address": "127.0.0.1"}]},
            {"name": nic, "ipv4": [{"address": ip, "netmask": "255.255.255.0"}]},
            {"name": "eth9", "ipv4": []},
        ],
        # Two roles on one filesystem (counted once) and one on another.
        "storage": [
            {"role": "template_sys", "path": "/a", "total": total, "used": used, "device": 2049},
            {"role": "instance_sys", "path": "/a/b", "total": total, "used": used, "device": 2049},
            {"role": "template_data", "path": "/c", "total": total, "used": used, "device": 2050},
        ],
    }


async def add_node(api: ApiClient, name: str, ip: str, *, state: str = "online", **extra: Any) -> dict[str, Any]:
    """A node record as the nodes plugin stores it."""
    record = new_record(api.core.clock, name=name, ip=ip, hostname=f"host-{ip}", type=5, state=state,
                        status={"online": 0, "warning": 1, "offline": 2}[state], facts=facts(ip), **extra)
    return await api.core.store.collection("nodes").insert_one(record)


def metrics(cpu: Optional[float], mem: float = 40.0, *, used: int = 4 * GIB, nic: str = "eth0",
            recv: float = 1000.0, sent: float = 500.0, interval: float = 5.0) -> dict[str, Any]:
    return {
        "interval": interval,
        "cpu": {"percent": cpu},
        "memory": {"percent": mem, "used": used, "total": 16 * GIB, "available": 12 * GIB},
        "disks": [{"name": "sda", "read_bytes_per_sec": 100.0, "write_bytes_per_sec": 2000.0}],
        "nics": [{"name": nic, "sent_bytes_per_sec": sent, "recv_bytes_per_sec": recv},
                 {"name": "eth9", "sent_bytes_per_sec": 0.0, "recv_bytes_per_sec": 7.0}],
    }


def heartbeat(api: ApiClient, node: dict[str, Any], **kwargs: Any) -> None:
    """Fire ``kvmdesk_node_metrics`` as a watcher does, at the clock's time."""
    core = api.core
    sample = {"at": core.clock.seconds(), "metrics": metrics(**kwargs),
              "hypervisor": {"connected": True, "domains_total": 3, "domains_running": 2}}
    core.plugins.hook.kvmdesk_node_metrics(core=core, node=node, sample=sample)


def monitor(api: ApiClient) -> Any:
    return api.core.extensions["monitoring"]


async def advance(api: ApiClient, seconds: float) -> None:
    """Advance the clock and wait for the monitoring rounds it started (their store writes are real)."""
    api.core.clock.advance(seconds)
    await api.core.services.getServiceNamed("monitoring").settled()
