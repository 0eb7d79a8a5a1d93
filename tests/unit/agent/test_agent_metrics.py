"""Metrics: exact rates from injected counters and time; sanity on the real psutil."""
from __future__ import annotations

import os
import re
import time
from types import SimpleNamespace as NS

import psutil
import pytest

from kvmdesk.agent.metrics import CounterSources, MetricsSampler, format_start_time, top_processes


class Script:
    """Serves one prepared value per call, in order."""

    def __init__(self, *values):
        self.values = list(values)

    def __call__(self):
        return self.values.pop(0)


def _cpu(busy: float, idle: float) -> NS:
    # Only user and idle carry time; guest time must be ignored (it is inside user already).
    return NS(user=busy, idle=idle, guest=1000.0)


def _sources(cpu, disks, nics, processes=()) -> CounterSources:
    return CounterSources(
        cpu_times=Script(*cpu),
        virtual_memory=lambda: NS(total=8000, used=2000, available=6000, percent=25.0),
        disk_io=Script(*disks),
        nic_io=Script(*nics),
        processes=lambda: list(processes),
    )


def test_rates_between_two_samples():
    sources = _sources(
        cpu=[_cpu(100.0, 900.0), _cpu(130.0, 970.0)],
        disks=[
            {"vda": NS(read_bytes=1000, write_bytes=500)},
            {"vda": NS(read_bytes=5000, write_bytes=500), "vdb": NS(read_bytes=7, write_bytes=7)},
        ],
        nics=[
            {"eth0": NS(bytes_sent=0, bytes_recv=100), "br0": NS(bytes_sent=900, bytes_recv=900)},
            # br0's counters went backwards: it was re-created, so no negative rate.
            {"eth0": NS(bytes_sent=2000, bytes_recv=4100), "br0": NS(bytes_sent=10, bytes_recv=10)},
        ],
    )
    sampler = MetricsSampler(sources=sources, clock=Script(10.0, 12.0))

    first = sampler.sample(include_processes=False)
    assert first["interval"] is None and first["cpu"]["percent"] is None
    assert first["disks"] == [{"name": "vda", "read_bytes_per_sec": None, "write_bytes_per_sec": None}]
    assert first["memory"] == {"percent": 25.0, "used": 2000, "total": 8000, "available": 6000}

    second = sampler.sample(include_processes=False)
    assert second["interval"] == 2.0
    assert second["cpu"]["percent"] == 30.0  # 30 s busy out of 100 s
    assert second["disks"] == [
        {"name": "vda", "read_bytes_per_sec": 2000.0, "write_bytes_per_sec": 0.0},
        {"name": "vdb", "read_bytes_per_sec": None, "write_bytes_per_sec": None},  # new disk: no baseline
    ]
    assert second["nics"] == [
        {"name": "br0", "sent_bytes_per_sec": 0.0, "recv_bytes_per_sec": 0.0},
        {"name": "eth0", "sent_bytes_per_sec": 1000.0, "recv_bytes_per_sec": 2000.0},
    ]
    assert "processes" not in second


def test_no_rates_when_the_clock_did_not_move():
    counters = {"vda": NS(read_bytes=1, write_bytes=1)}
    sampler = MetricsSampler(
        sources=_sources(cpu=[_cpu(1, 1), _cpu(2, 2)], disks=[counters, counters], nics=[{}, {}]),
        clock=Script(5.0, 5.0),
    )
    sampler.sample(include_processes=False)
    again = sampler.sample(include_processes=False)
    assert again["interval"] is None and again["cpu"]["percent"] is None
    assert again["disks"][0]["read_bytes_per_sec"] is None


def test_top_processes_sorted_limited_and_formatted():
    start = time.mktime((2024, 3, 5, 14, 7, 9, 0, 0, -1))
    infos = [
        {"pid": 10, "username": "root", "cpu_percent": 1.0, "memory_percent": 0.5, "create_time": start, "cmdline": ["/usr/sbin/libvirtd"], "name": "libvirtd"},
        {"pid": 2, "username": "root", "cpu_percent": 0.0, "memory_percent": 0.0, "create_time": start, "cmdline": [], "name": "kthreadd"},
        {"pid": 77, "username": "qemu", "cpu_percent": 87.25, "memory_percent": 12.345, "create_time": start, "cmdline": ["qemu-system-x86_64", "-name", "desk-1"], "name": "qemu"},
        {"pid": 5, "username": None, "cpu_percent": None, "memory_percent": None, "create_time": None, "cmdline": None, "name": None},
    ]
    rows = top_processes(infos, limit=3)
    assert [row["pid"] for row in rows] == [77, 10, 2]
    assert rows[0] == {
        "pid": 77,
        "user": "qemu",
        "cpu_percent": 87.2,
        "memory_percent": 12.35,
        "start_time": "2024-03-05 14:07:09",
        "command": "qemu-system-x86_64 -name desk-1",
    }
    assert rows[2]["command"] == "[kthreadd]"
    assert top_processes(infos, limit=10)[-1] == {
        "pid": 5, "user": None, "cpu_percent": 0.0, "memory_percent": 0.0, "start_time": None, "command": "[?]",
    }
    assert format_start_time(None) is None


def test_real_psutil_samples_are_sane():
    sampler = MetricsSampler(process_limit=100000)
    sampler.sample()
    sample = sampler.sample()
    assert sample["interval"] > 0
    assert 0.0 <= sample["cpu"]["percent"] <= 100.0
    assert sample["memory"]["total"] == psutil.virtual_memory().total
    assert 0 < sample["memory"]["used"] <= sample["memory"]["total"]
    assert {d["name"] for d in sample["disks"]} <= set(psutil.disk_io_counters(perdisk=True) or {})
    assert "lo" in {n["name"] for n in sample["nics"]}
    for entry in sample["disks"] + sample["nics"]:
        rates = [v for k, v in entry.items() if k.endswith("_per_sec")]
        assert all(rate is None or rate >= 0 for rate in rates)
    mine = next(p for p in sample["processes"] if p["pid"] == os.getpid())
    assert "pytest" in mine["command"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", mine["start_time"])
    cpus = [p["cpu_percent"] for p in sample["processes"]]
    assert cpus == sorted(cpus, reverse=True)
    assert len(MetricsSampler(process_limit=3).sample()["processes"]) <= 3


@pytest.mark.parametrize("limit", [0, -1])
def test_process_limit_zero_or_less_lists_nothing(limit):
    assert top_processes([{"pid": 1, "cpu_percent": 5.0}], limit) == []
