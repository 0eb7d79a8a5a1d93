"""Minute rollups of every node's samples, persisted for ``history`` and kept for ``retention``.

Samples are summed in memory per node and minute (weighted by the seconds each covers); completed
minutes are flushed to the store every ``flush_interval``.  Storage: one document per node and hour
in ``monitor_rollups``, ``{"node", "hour", "m": {"0".."59": point}}``, unique on ``(node, hour)``:

- a flush is one upsert per node (its new minutes ``$set`` into the hour's document);
- 24 hours of one node are 25 documents read through the ``(node, hour)`` index, not 1,440 rows;
- expiry deletes whole hours, ``prune_chunk`` documents per statement (each chunk its own write, so
  other writers and the reactor get their turn between chunks).

The same layout serves both store backends (MongoDB's time-series collections bucket points the
same way internally, but would need a second write and read path and a store API the core lacks).

A point is ``{"c": cpu %, "mp": memory %, "mu": memory used bytes, "d": {disk: [read, write]},
"n": {nic: [received, sent]}}`` (bytes per second); a field nothing measured is absent.
"""
from __future__ import annotations

from typing import Any, Iterable, Optional

import attrs

from kvmdesk.core.store import Index, Store
from kvmdesk.plugins.monitoring.samples import Sample

ROLLUPS = "monitor_rollups"
INDEXES = [Index(ROLLUPS, ("node", "hour"), unique=True), Index(ROLLUPS, ("hour",))]


@attrs.define(slots=True)
class MinuteSums:
    """Weighted sums of one node's samples within one minute: ``key -> [sum, weight]``."""

    sums: dict[str, list[float]] = attrs.field(factory=dict)

    def _add(self, key: str, value: Optional[float], weight: float) -> None:
        if value is None:
            return
        entry = self.sums.get(key)
        if entry is None:
            self.sums[key] = [value * weight, weight]
        else:
            entry[0] += value * weight
            entry[1] += weight

    def add(self, sample: Sample) -> None:
        w = sample.weight
        self._add("c", sample.cpu, w)
        self._add("mp", sample.mem_percent, w)
        self._add("mu", sample.mem_used, w)
        for prefix, devices in (("d", sample.disks), ("n", sample.nics)):
            for name, (read, write) in devices.items():
                self._add(f"{prefix}\0{name}\0r", read, w)
                self._add(f"{prefix}\0{name}\0w", write, w)

    def point(self) -> dict[str, Any]:
        """The minute's point (see the module docstring)."""
        point: dict[str, Any] = {}
        for key, (total, weight) in self.sums.items():
            mean = total / weight
            if key == "c" or key == "mp":
                point[key] = round(mean, 2)
            elif key == "mu":
                point[key] = int(round(mean))
            else:
                prefix, name, which = key.split("\0")
                rates = point.setdefault(prefix, {}).setdefault(name, [None, None])
                rates[0 if which == "r" else 1] = int(round(mean))
        return point


def hour_of(minute: int) -> int:
    """The Unix time of the hour holding ``minute`` (a Unix time on a minute boundary)."""
    return minute - minute % 3600


@attrs.define
class Rollups:
    """Minute sums in memory and hours in the store.

    :param store: the controller's store.
    """

    store: Store
    pending: dict[tuple[str, int], MinuteSums] = attrs.field(factory=dict)

    @property
    def collection(self) -> Any:
        return self.store.collection(ROLLUPS)

    def add(self, node_uuid: str, sample: Sample) -> None:
        minute = int(sample.at // 60 * 60)
        key = (node_uuid, minute)
        sums = self.pending.get(key)
        if sums is None:
            sums = self.pending[key] = MinuteSums()
        sums.add(sample)

    def forget(self, node_uuid: str) -> None:
        for key in [k for k in self.pending if k[0] == node_uuid]:
            del self.pending[key]

    async def flush(self, before: Optional[float] = None) -> int:
        """Write the minutes that started before ``before`` (every pending one when ``None``).

        A minute leaves memory only once it is written; a failed write keeps it for the next flush.

        :returns: how many minute points were written.
        """
        limit = None if before is None else int(before // 60 * 60)
        grouped: dict[tuple[str, int], dict[str, Any]] = {}
        for (node, minute), sums in list(self.pending.items()):
            if limit is None or minute < limit:
                grouped.setdefault((node, hour_of(minute)), {})[str((minute % 3600) // 60)] = (minute, sums)
        written = 0
        for (node, hour), minutes in grouped.items():
            update = {f"m.{slot}": sums.point() for slot, (_, sums) in minutes.items()}
            await self.collection.update_one({"node": node, "hour": hour}, {"$set": update}, upsert=True)
            for minute, _ in minutes.values():
                self.pending.pop((node, minute), None)
            written += len(minutes)
        return written

    async def points(self, node_uuid: str, first: int, last: int) -> dict[int, dict[str, Any]]:
        """Minute Unix time -> point for ``first <= minute <= last``, stored or still in memory."""
        docs = await self.collection.find({"node": node_uuid, "hour": {"$gte": hour_of(first), "$lte": hour_of(last)}})
        found: dict[int, dict[str, Any]] = {}
        for doc in docs:
            hour = doc["hour"]
            for slot, point in (doc.get("m") or {}).items():
                minute = hour + int(slot) * 60
                if first <= minute <= last:
                    found[minute] = point
        for (node, minute), sums in self.pending.items():
            if node == node_uuid and first <= minute <= last:
                found[minute] = sums.point()
        return found

    async def prune(self, cutoff: float, chunk: int) -> int:
        """Delete the hours that ended before ``cutoff``, ``chunk`` documents at a time.

        :returns: how many hour documents were deleted.
        """
        deleted = 0
        last_hour = int(cutoff // 3600 * 3600) - 3600
        while True:
            rows = await self.collection.find({"hour": {"$lte": last_hour}}, limit=chunk, projection=["id"])
            if not rows:
                return deleted
            deleted += await self.collection.delete_many({"id": {"$in": [r["id"] for r in rows]}})
            if len(rows) < chunk:
                return deleted


def minute_series(points: dict[int, dict[str, Any]], starts: Iterable[int], step: int) -> dict[str, Any]:
    """The history answer's series: one value per step starting at each of ``starts``, ``None`` where
    no minute of the step has a point (a gap is unknown, not zero).

    :param step: seconds per step (a multiple of 60).
    """
    cpu: list = []
    percent: list = []
    used: list = []
    disks: dict[str, dict[str, list]] = {}
    nics: dict[str, dict[str, list]] = {}
    starts = list(starts)
    for index, start in enumerate(starts):
        minutes = [points[m] for m in range(start, start + step, 60) if m in points]
        cpu.append(_mean(minutes, "c", 2))
        percent.append(_mean(minutes, "mp", 2))
        used.append(_mean(minutes, "mu", None))
        for prefix, target in (("d", disks), ("n", nics)):
            names = {name for p in minutes for name in p.get(prefix) or {}}
            for name in names:
                series = target.get(name)
                if series is None:
                    series = target[name] = {"read_bytes_avg": [None] * len(starts),
                                             "write_bytes_avg": [None] * len(starts)}
                rates = [(p.get(prefix) or {}).get(name) for p in minutes]
                series["read_bytes_avg"][index] = _mean_of([r[0] for r in rates if r], None)
                series["write_bytes_avg"][index] = _mean_of([r[1] for r in rates if r], None)
    return {"cpu_util": cpu, "memory_util": {"percent": percent, "used": used},
            "disk_io_util": dict(sorted(disks.items())), "nic_util": dict(sorted(nics.items()))}


def _mean(points: list[dict[str, Any]], key: str, digits: Optional[int]) -> Optional[float]:
    return _mean_of([p.get(key) for p in points], digits)


def _mean_of(values: list[Any], digits: Optional[int]) -> Any:
    present = [v for v in values if v is not None]
    if not present:
        return None
    mean = sum(present) / len(present)
    return round(mean, digits) if digits is not None else int(round(mean))
