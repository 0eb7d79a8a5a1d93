"""Minute rollups of every node's samples, persisted for ``history`` and kept for ``retention``.

Samples are summed in memory per node and minute (weighted by the seconds each covers); completed
minutes are flushed to the store every ``flush_interval``.  Storage: one document per node and hour
in ``monitor_rollups``, ``{"node", "hour", "m": {"0".."59": point}}``, unique on ``(node, hour)``:

- a flush is one upsert per node (its new minutes ``$set`` into the hour's document);
- 24 hours of one node are 25 documents read through the ``(node, hour)`` index, not 1,440 rows;
- expiry deletes whole hours, ``prune_chunk`` documents per statement (each chunk its own write, so
  other writers and the reactor get their turn between chunks).

The same layout serves both store backends.  MongoDB's time-series collections are not used: they
bucket points per series and hour internally just like this, but take one insert per point with a
BSON date as its time (the store interface speaks JSON, so that needs a new store API and a second
write and read path), allow no in-place update of a minute before MongoDB 7, and could only be tested
against a real MongoDB server (briskdb, the CI server, has none).

A point is ``{"c": cpu %, "mp": memory %, "mu": memory used bytes, "d": {disk: [read, write]},
"n": {nic: [received, sent]}}`` (bytes per second); a field nothing measured is absent.
"""
from __future__ import annotations

from typing import Any, Iterable, Optional

import attrs
from twisted.internet import defer

from kvmdesk.core.store import Index, Store
from kvmdesk.plugins.monitoring.samples import Sample

ROLLUPS = "monitor_rollups"
#: Hour documents written at once by a flush: a MongoDB server works on several; SQLite's one writer
#: takes them in turn anyway.
FLUSH_CONCURRENCY = 16
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
        semaphore = defer.DeferredSemaphore(FLUSH_CONCURRENCY)

        async def write(node: str, hour: int, minutes: dict[str, Any]) -> int:
            update = {f"m.{slot}": sums.point() for slot, (_, sums) in minutes.items()}
            await self.collection.update_one({"node": node, "hour": hour}, {"$set": update}, upsert=True)
            for minute, _ in minutes.values():
                self.pending.pop((node, minute), None)
            return len(minutes)

        results = await defer.DeferredList(
            [semaphore.run(lambda k=key, m=minutes: defer.ensureDeferred(write(k[0], k[1], m)))
             for key, minutes in grouped.items()],
            consumeErrors=True,
        )
        for ok, value in results:
            if not ok:
                value.raiseException()  # the others are written; the failed ones stay pending
        return sum(value for _, value in results)

    async def points(self, node_uuid: str, first: int, last: int) -> dict[int, dict[str, Any]]:
        """Minute Unix time -> point for ``first <= minute <= last``, stored or still in memory."""
        # The hours by name, not as a range: both backends answer equality through the (node, hour)
        # index, where briskdb scanned a range of hours past its command deadline.
        hours = list(range(hour_of(first), hour_of(last) + 1, 3600))
        docs = await self.collection.find({"node": node_uuid, "hour": {"$in": hours}})
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
    no minute of the step has a point (a gap is unknown, not zero).  A step's value is the mean of
    its minutes that have one.

    :param step: seconds per step (a multiple of 60).
    """
    starts = list(starts)
    count = len(starts)
    # Field -> [values]; device fields are ("d"|"n", name, 0 read | 1 write).
    series: dict[Any, list] = {"c": [None] * count, "mp": [None] * count, "mu": [None] * count}
    for index, start in enumerate(starts):
        if step == 60:  # one minute per step: the points are the values (the common, fast case)
            found = points.get(start)
            if found is not None:
                _put(series, index, count, found, 1)
            continue
        sums: dict[Any, Any] = {}
        for minute in range(start, start + step, 60):
            found = points.get(minute)
            if found is not None:
                _add(sums, found)
        if sums:
            _put(series, index, count, {k: (v[0] / v[1]) for k, v in sums.items()}, 0)
    return {
        "cpu_util": [None if v is None else round(v, 2) for v in series["c"]],
        "memory_util": {"percent": [None if v is None else round(v, 2) for v in series["mp"]],
                        "used": [None if v is None else int(round(v)) for v in series["mu"]]},
        "disk_io_util": _devices(series, "d"),
        "nic_util": _devices(series, "n"),
    }


def _put(series: dict[Any, list], index: int, count: int, values: dict[Any, Any], nested: int) -> None:
    """Store one step's values; ``nested``: ``values`` is a point (devices nested), else flat keys."""
    for key, value in values.items():
        if nested and key in ("d", "n"):
            for name, rates in value.items():
                for which in (0, 1):
                    column = series.get((key, name, which))
                    if column is None:
                        column = series[(key, name, which)] = [None] * count
                    column[index] = rates[which]
            continue
        column = series.get(key)
        if column is None:
            column = series[key] = [None] * count
        column[index] = value


def _add(sums: dict[Any, Any], found: dict[str, Any]) -> None:
    for key, value in found.items():
        if key in ("d", "n"):
            for name, rates in value.items():
                for which in (0, 1):
                    if rates[which] is not None:
                        entry = sums.setdefault((key, name, which), [0.0, 0])
                        entry[0] += rates[which]
                        entry[1] += 1
        elif value is not None:
            entry = sums.setdefault(key, [0.0, 0])
            entry[0] += value
            entry[1] += 1


def _devices(series: dict[Any, list], prefix: str) -> dict[str, dict[str, list]]:
    names = sorted({key[1] for key in series if isinstance(key, tuple) and key[0] == prefix})
    empty = [None] * len(series["c"])
    return {name: {"read_bytes_avg": _ints(series.get((prefix, name, 0), empty)),
                   "write_bytes_avg": _ints(series.get((prefix, name, 1), empty))} for name in names}


def _ints(values: list) -> list:
    return [None if v is None else int(round(v)) for v in values]
