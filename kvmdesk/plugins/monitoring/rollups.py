"""Minute rollups of every node's samples, persisted for ``history`` and kept for ``retention``.

Samples are summed in memory per node and minute (weighted by the seconds each covers); completed
minutes are flushed to the store every ``flush_interval``.  Storage of the hours under way: one
document per node and hour in ``monitor_rollups``, ``{"node", "hour", "m": {"0".."59": point}}``,
unique on ``(node, hour)``:

- a flush is one batch of upserts (``upsert_each``), one per node (its new minutes ``$set`` into the
  hour's document);
- once an hour is over and none of its minutes is left in memory, :meth:`Rollups.seal` (after each
  flush) packs it into the node's day document (:mod:`.days`) and deletes the hour document: 24 hours
  of one node are then two day documents and the current hour's, not 25 documents of 60 nested points;
- finished hours read once stay in a bounded cache as minute columns (:mod:`.columns`);
- expiry deletes whole hours and days, ``prune_chunk`` documents per statement (each chunk its own
  write, so other writers and the reactor get their turn between chunks).

The same layout serves both store backends.  MongoDB's time-series collections are not used: they
bucket points per series and hour internally just like this, but take one insert per point with a
BSON date as its time (the store interface speaks JSON, so that needs a new store API and a second
write and read path), allow no in-place update of a minute before MongoDB 7, and could only be tested
against a real MongoDB server (briskdb, the CI server, has none).

A point is ``{"c": cpu %, "mp": memory %, "mu": memory used bytes, "d": {disk: [read, write]},
"n": {nic: [received, sent]}}`` (bytes per second); a field nothing measured is absent.
"""
from __future__ import annotations

from typing import Any, Optional

import attrs

from kvmdesk.core.store import Index, Store
from kvmdesk.core.together import both
from kvmdesk.plugins.monitoring import days
from kvmdesk.plugins.monitoring.columns import Columns, HourCache, hour_columns, join, put_point
from kvmdesk.plugins.monitoring.samples import Sample

ROLLUPS = "monitor_rollups"
#: Hour documents a flush writes with one ``upsert_each`` (one round trip: MongoDB servers charge tens of
#: milliseconds a request; SQLite commits once).  A batch is the bound on one SQLite write transaction.
FLUSH_BATCH = 1000
#: Node-hours the hour cache keeps by default (a day of 100 nodes).
DEFAULT_CACHE_HOURS = 2400
#: ``(hour, node)`` serves both reads: expiry (hours up to a cutoff, its prefix) and history (a node's
#: hours by name).  A MongoDB server may not answer a query through the unique index: the store makes
#: unique indexes partial (see :mod:`kvmdesk.core.store.mongo`), and briskdb then scans the collection
#: (a node's 20 hours among 2,000 documents: 1.4 s; through this index: 37 ms).
INDEXES = [Index(ROLLUPS, ("node", "hour"), unique=True), Index(ROLLUPS, ("hour", "node")), *days.INDEXES]


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
    cache: HourCache = attrs.field(factory=lambda: HourCache(DEFAULT_CACHE_HOURS))
    pending: dict[tuple[str, int], MinuteSums] = attrs.field(factory=dict)
    #: The last hour expiry has deleted: a read still under way must not cache it again.
    expired_through: int = -1
    #: Moves at the start and the end of every write into hours (flushed minutes, sealed hours): a read
    #: that overlapped one does not cache what it read.
    writes: int = 0

    @property
    def collection(self) -> Any:
        return self.store.collection(ROLLUPS)

    def add(self, node_uuid: str, sample: Sample) -> None:
        minute = int(sample.at // 60 * 60)
        key = (node_uuid, minute)
        sums = self.pending.get(key)
        if sums is None:
            sums = self.pending[key] = MinuteSums()
            self.cache.drop(node_uuid, hour_of(minute))  # a minute of a past hour (a clock set back)
        sums.add(sample)

    def forget(self, node_uuid: str) -> None:
        for key in [k for k in self.pending if k[0] == node_uuid]:
            del self.pending[key]
        self.cache.forget(node_uuid)

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
        failures: list[BaseException] = []
        items = list(grouped.items())
        for start in range(0, len(items), FLUSH_BATCH):
            batch = items[start:start + FLUSH_BATCH]
            operations = [({"node": node, "hour": hour},
                           {"$set": {f"m.{slot}": sums.point() for slot, (_, sums) in minutes.items()}})
                          for (node, hour), minutes in batch]
            self.writes += 1
            try:
                outcomes = await self.collection.upsert_each(operations)
            finally:
                self.writes += 1
            for ((node, hour), minutes), outcome in zip(batch, outcomes):
                self.cache.drop(node, hour)
                if isinstance(outcome, BaseException):
                    failures.append(outcome)  # its minutes stay pending for the next flush
                    continue
                for minute, _ in minutes.values():
                    self.pending.pop((node, minute), None)
                written += len(minutes)
        if failures:
            raise failures[0]  # the others are written; the failed ones stay pending
        return written

    async def columns(self, node_uuid: str, first: int, count: int, now: float) -> Columns:
        """The node's minute columns for ``count`` minutes from ``first``: sealed hours and hour
        documents (kept in the hour cache once they are over, before ``now``), with the minutes still
        in memory on top."""
        hours = range(hour_of(first), hour_of(first + (count - 1) * 60) + 1, 3600)
        end = first + count * 60
        writes = self.writes
        # An hour with a minute still in memory (or being written) is not settled: not cached.
        unsettled = {hour_of(minute) for node, minute in self.pending if node == node_uuid}
        known: dict[int, Optional[Columns]] = {}
        for hour in hours:
            found, columns = self.cache.get(node_uuid, hour)
            if found:
                known[hour] = columns
        missing = [hour for hour in hours if hour not in known]
        if missing:
            sealed, docs = await both(
                days.read_hours(self.store, node_uuid, [hour for hour in missing if hour + 3600 <= now]),
                # The hours by name, not as a range: both backends answer equality through an index,
                # where briskdb scanned a range of hours past its command deadline.
                self.collection.find({"node": node_uuid, "hour": {"$in": missing}}, projection=["hour", "m"]),
            )
            unsealed = {doc["hour"]: hour_columns(doc.get("m") or {}) for doc in docs}
            for hour in missing:
                base, top = sealed.get(hour), unsealed.get(hour)
                known[hour] = days.overlay(base, top) if base is not None and top is not None else base or top
                if (hour + 3600 <= now and hour not in unsettled and hour > self.expired_through
                        and self.writes == writes):
                    self.cache.put(node_uuid, hour, known[hour])
        joined = join((known[hour], (max(first, hour) - hour) // 60, (min(end, hour + 3600) - hour) // 60)
                      for hour in hours)
        for (node, minute), sums in self.pending.items():
            if node == node_uuid and first <= minute < end:
                put_point(joined, (minute - first) // 60, count, sums.point())
        return joined

    async def seal(self, now: float, chunk: int) -> int:
        """Pack every hour document of an hour that is over (before ``now``) and has no minute left in
        memory into its node's day document (:mod:`.days`), ``chunk`` documents at a time.

        :returns: how many hours were sealed.
        """
        last_hour = hour_of(int(now)) - 3600
        sealed = after = 0
        while True:
            docs = await self.collection.find({"hour": {"$lte": last_hour}, "id": {"$gt": after}}, sort=[("id", 1)],
                                              limit=chunk)
            unsettled = {(node, hour_of(minute)) for node, minute in self.pending}
            # One write per node and day (two writes to one day document would race to create it).
            groups: dict[tuple[str, int], list[dict]] = {}
            for doc in docs:
                if (doc["node"], doc["hour"]) not in unsettled and doc["hour"] > self.expired_through:
                    groups.setdefault((doc["node"], days.day_of(doc["hour"])), []).append(doc)
            self.writes += 1
            outcomes = await days.seal(self.store, {key: {d["hour"]: hour_columns(d.get("m") or {}) for d in group}
                                                    for key, group in groups.items()}) if groups else []
            # A failed seal leaves its hour documents (read as before, sealed by a later round).
            done = [doc["id"] for group, outcome in zip(groups.values(), outcomes)
                    if not isinstance(outcome, BaseException) for doc in group]
            if done:
                await self.collection.delete_many({"id": {"$in": done}})
                sealed += len(done)
            self.writes += 1  # a read between the day's write and the hour's delete may have missed both
            for outcome in outcomes:
                if isinstance(outcome, BaseException):
                    raise outcome
            if len(docs) < chunk:
                return sealed
            after = docs[-1]["id"]

    async def prune(self, cutoff: float, chunk: int) -> int:
        """Delete the hours that ended before ``cutoff``, ``chunk`` documents at a time (sealed ones:
        whole days, and the expired hours of the day the cutoff falls in).

        :returns: how many documents (days and hours) were deleted.
        """
        last_hour = int(cutoff // 3600 * 3600) - 3600
        self.expired_through = max(self.expired_through, last_hour)
        self.cache.expire(last_hour)
        deleted = await days.expire(self.store, last_hour, chunk)
        while True:
            rows = await self.collection.find({"hour": {"$lte": last_hour}}, limit=chunk, projection=["id"])
            if not rows:
                return deleted
            deleted += await self.collection.delete_many({"id": {"$in": [r["id"] for r in rows]}})
            if len(rows) < chunk:
                return deleted
