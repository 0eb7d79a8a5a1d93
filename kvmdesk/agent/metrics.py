"""Node metrics: CPU and memory use, disk and NIC throughput, the busiest processes.

Rates are differences of psutil's cumulative counters between two samples, divided by the time
between them as measured by an injected clock, so a test can feed counters and time and check
the arithmetic exactly.  Sampling blocks (it reads ``/proc``): call :meth:`MetricsSampler.sample`
in a thread.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable, Iterable, Mapping

import attrs
import psutil

#: The per-process fields psutil is asked for.
PROCESS_ATTRS = ["pid", "username", "cpu_percent", "memory_percent", "create_time", "cmdline", "name"]


def _disk_counters() -> Mapping[str, Any]:
    # None on machines without any disk statistics.
    return psutil.disk_io_counters(perdisk=True) or {}


def _nic_counters() -> Mapping[str, Any]:
    return psutil.net_io_counters(pernic=True) or {}


def _processes() -> Iterable[Mapping[str, Any]]:
    # process_iter caches Process objects between calls, which is what gives cpu_percent a
    # baseline: the first sample of a process reads 0.0, later ones the use since the last sample.
    for proc in psutil.process_iter(PROCESS_ATTRS, ad_value=None):
        yield proc.info


@attrs.define
class CounterSources:
    """Where the sampler reads from; the defaults are psutil's.

    :param cpu_times: system-wide ``scputimes``-like object (attributes in seconds).
    :param virtual_memory: object with ``total``, ``used``, ``available``, ``percent``.
    :param disk_io: disk name -> object with ``read_bytes`` and ``write_bytes``.
    :param nic_io: NIC name -> object with ``bytes_sent`` and ``bytes_recv``.
    :param processes: iterable of dicts with the keys of :data:`PROCESS_ATTRS`.
    """

    cpu_times: Callable[[], Any] = psutil.cpu_times
    virtual_memory: Callable[[], Any] = psutil.virtual_memory
    disk_io: Callable[[], Mapping[str, Any]] = _disk_counters
    nic_io: Callable[[], Mapping[str, Any]] = _nic_counters
    processes: Callable[[], Iterable[Mapping[str, Any]]] = _processes


@attrs.frozen
class _Snapshot:
    at: float
    cpu: tuple[float, float]  # (busy seconds, total seconds)
    disks: dict[str, tuple[int, int]]  # name -> (read bytes, written bytes)
    nics: dict[str, tuple[int, int]]  # name -> (bytes sent, bytes received)


def _cpu_busy_total(times: Any) -> tuple[float, float]:
    fields = times._asdict() if hasattr(times, "_asdict") else dict(vars(times))
    # On Linux guest time is already counted in user/nice; counting it twice would inflate use.
    total = sum(v for k, v in fields.items() if k not in ("guest", "guest_nice"))
    idle = fields.get("idle", 0.0) + fields.get("iowait", 0.0)
    return total - idle, total


def _rate(new: int, old: int, seconds: float) -> float:
    # A counter that went backwards was reset (device re-added, driver reloaded): no rate for it.
    return max(new - old, 0) / seconds


def format_start_time(epoch: float | None) -> str | None:
    """``YYYY-MM-DD HH:MM:SS`` in the node's local time, as ``ps`` shows it."""
    if epoch is None:
        return None
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


def _command_line(info: Mapping[str, Any]) -> str:
    cmdline = info.get("cmdline")
    if cmdline:
        return " ".join(cmdline)
    # Kernel threads and zombies have no command line; ps shows their name in brackets.
    return f"[{info.get('name') or '?'}]"


def top_processes(processes: Iterable[Mapping[str, Any]], limit: int) -> list[dict[str, Any]]:
    """The ``limit`` processes using the most CPU, busiest first.

    :returns: ``{"pid", "user", "cpu_percent", "memory_percent", "start_time", "command"}`` each.
    """
    rows = [
        {
            "pid": info["pid"],
            "user": info.get("username"),
            "cpu_percent": round(info.get("cpu_percent") or 0.0, 1),
            "memory_percent": round(info.get("memory_percent") or 0.0, 2),
            "start_time": format_start_time(info.get("create_time")),
            "command": _command_line(info),
        }
        for info in processes
    ]
    rows.sort(key=lambda row: (-row["cpu_percent"], row["pid"]))
    return rows[: max(limit, 0)]


@attrs.define
class MetricsSampler:
    """Samples node metrics; rates cover the time since the previous sample.

    Thread-safe: samples are serialised, because each one moves the baseline of the next.

    :param sources: the counter sources (psutil by default).
    :param clock: monotonic seconds, ``time.monotonic`` by default.
    :param process_limit: how many processes :meth:`sample` lists.
    """

    sources: CounterSources = attrs.field(factory=CounterSources)
    clock: Callable[[], float] = time.monotonic
    process_limit: int = 20
    _last: _Snapshot | None = attrs.field(default=None, init=False)
    _lock: threading.Lock = attrs.field(factory=threading.Lock, init=False)

    def _snapshot(self) -> _Snapshot:
        disks = {name: (c.read_bytes, c.write_bytes) for name, c in self.sources.disk_io().items()}
        nics = {name: (c.bytes_sent, c.bytes_recv) for name, c in self.sources.nic_io().items()}
        return _Snapshot(self.clock(), _cpu_busy_total(self.sources.cpu_times()), disks, nics)

    def sample(self, include_processes: bool = True) -> dict[str, Any]:
        """Take a sample.

        The first sample has no baseline: its ``interval``, ``cpu.percent`` and every rate are
        ``None`` (not 0, which would claim an idle node).

        :returns: ``{"interval", "cpu": {"percent"}, "memory": {"percent", "used", "total",
            "available"}, "disks": [{"name", "read_bytes_per_sec", "write_bytes_per_sec"}],
            "nics": [{"name", "sent_bytes_per_sec", "recv_bytes_per_sec"}], "processes": [...]}``.
        """
        with self._lock:
            current = self._snapshot()
            previous, self._last = self._last, current
        memory = self.sources.virtual_memory()
        result: dict[str, Any] = {
            "interval": None,
            "cpu": {"percent": None},
            "memory": {
                "percent": memory.percent,
                "used": memory.used,
                "total": memory.total,
                "available": memory.available,
            },
            "disks": [],
            "nics": [],
        }
        seconds = current.at - previous.at if previous is not None else 0.0
        if previous is not None and seconds > 0:
            result["interval"] = seconds
            busy = current.cpu[0] - previous.cpu[0]
            total = current.cpu[1] - previous.cpu[1]
            result["cpu"]["percent"] = round(min(max(busy / total * 100.0, 0.0), 100.0), 1) if total > 0 else 0.0
        for name in sorted(current.disks):
            old = previous.disks.get(name) if previous is not None and seconds > 0 else None
            new = current.disks[name]
            result["disks"].append(
                {
                    "name": name,
                    "read_bytes_per_sec": _rate(new[0], old[0], seconds) if old is not None else None,
                    "write_bytes_per_sec": _rate(new[1], old[1], seconds) if old is not None else None,
                }
            )
        for name in sorted(current.nics):
            old = previous.nics.get(name) if previous is not None and seconds > 0 else None
            new = current.nics[name]
            result["nics"].append(
                {
                    "name": name,
                    "sent_bytes_per_sec": _rate(new[0], old[0], seconds) if old is not None else None,
                    "recv_bytes_per_sec": _rate(new[1], old[1], seconds) if old is not None else None,
                }
            )
        if include_processes:
            result["processes"] = top_processes(self.sources.processes(), self.process_limit)
        return result
