"""Minute rollups of every node's samples, persisted for ``history`` and kept for ``retention``.

Samples are summed in memory per node and minute (weighted by the seconds each covers); completed
minutes are flushed every ``flush_interval``.  Three places hold a node's minutes, newest first:

- ``pending``: minutes still being summed (not yet flushed);
- the **head**: every flushed minute of the hours not yet sealed, as minute columns in memory
  (normally the current hour and the one before).  The controller is the only writer of monitoring
  data, so it knows these hours without asking the store: a history answer within them (every
  1-hour answer) reads nothing.  The head is made durable by **fragments**, ``monitor_minutes``
  ``{"hour", "points": JSON text of [[node, minute, point], ...]}``: a flush *inserts* one or a few
  fragments holding every node's new minutes, whatever the number of nodes.  Inserts, not updates:
  a MongoDB-wire server charges per updated document (briskdb: 30-40 ms each, so updating 1,000
  nodes' hour documents every minute could not keep up), and a new document is cheap.  At start the
  head is read back from the fragments (:meth:`Rollups.load`);
- **day documents** (:mod:`.days`): hours older than the one before the current are sealed from the
  head into one document per node and day, then their fragments are deleted.  Finished hours read
  from day documents stay in a bounded cache (:class:`~.columns.HourCache`).

This is the shape of Prometheus's TSDB: a head of recent hours in memory with a write-ahead log,
compacted into blocks.  A minute that comes late for a sealed hour lands in the head and a fragment
like any other and is merged into the day's slot when that hour is sealed again; until then an answer
lays the head over the day document.

Hour documents of an older version (``monitor_rollups``, ``{"node", "hour", "m": {slot: point}}``) are
taken into the head and the fragments at start and deleted (:meth:`Rollups.load`).

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
import orjson

from kvmdesk.core.store import Index, Store
from kvmdesk.plugins.monitoring import days
from kvmdesk.plugins.monitoring.columns import Columns, HourCache, join, put_point
from kvmdesk.plugins.monitoring.samples import Sample

MINUTES = "monitor_minutes"
#: The hour documents of an older version, taken into the head at start.
LEGACY_HOURS = "monitor_rollups"
#: Points one fragment holds (some 250 bytes each: a fragment stays far below briskdb's budget for one
#: write command, and 1,000 nodes' minute is one insert).
FRAGMENT_POINTS = 1000
#: Fragments one insert command carries.
INSERT_BATCH = 8
#: Node-hours the hour cache keeps by default (a day of 100 nodes).
DEFAULT_CACHE_HOURS = 2400
#: Hours kept in the head before they are sealed: the current one and the one before, so that any
#: answer of up to an hour is served from memory.
HEAD_HOURS = 2
INDEXES = [Index(MINUTES, ("hour",)), *days.INDEXES]

Point = dict[str, Any]


@attrs.define(slots=True)
class MinuteSums:
    """Weighted sums of one node's samples within one minute: ``key -> [sum, weight]``."""

    sums: dict[str, list[float]] = attrs.field(factory=dict)
    #: Samples taken so far: a flush leaves the minute pending if one came while it was written.
    samples: int = 0

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
        self.samples += 1
        w = sample.weight
        self._add("c", sample.cpu, w)
        self._add("mp", sample.mem_percent, w)
        self._add("mu", sample.mem_used, w)
        for prefix, devices in (("d", sample.disks), ("n", sample.nics)):
            for name, (read, write) in devices.items():
                self._add(f"{prefix}\0{name}\0r", read, w)
                self._add(f"{prefix}\0{name}\0w", write, w)

    def point(self) -> Point:
        """The minute's point (see the module docstring)."""
        point: Point = {}
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


def fragments(points: list[tuple[str, int, Point]]) -> list[dict[str, Any]]:
    """Fragment documents holding ``points`` (``(node, minute, point)``), each of one hour."""
    by_hour: dict[int, list[tuple[str, int, Point]]] = {}
    for entry in points:
        by_hour.setdefault(hour_of(entry[1]), []).append(entry)
    return [{"hour": hour, "points": orjson.dumps(group[at:at + FRAGMENT_POINTS]).decode()}
            for hour, group in sorted(by_hour.items()) for at in range(0, len(group), FRAGMENT_POINTS)]


@attrs.define
class Rollups:
    """Minute sums, the head and the sealed days of every node.

    :param store: the controller's store.
    """

    store: Store
    cache: HourCache = attrs.field(factory=lambda: HourCache(DEFAULT_CACHE_HOURS))
    pending: dict[tuple[str, int], MinuteSums] = attrs.field(factory=dict)
    #: ``(node, hour) -> columns`` of every flushed minute not yet sealed (what the fragments hold).
    head: dict[tuple[str, int], Columns] = attrs.field(factory=dict)
    #: The latest hour ever sealed into a day document: a later hour is in the head only.
    sealed_through: int = -1
    #: The last hour expiry has deleted: a read still under way must not cache it again.
    expired_through: int = -1
    #: Moves at the start and the end of every write into day documents: a read that overlapped one
    #: does not cache what it read.
    writes: int = 0

    @property
    def collection(self) -> Any:
        return self.store.collection(MINUTES)

    def add(self, node_uuid: str, sample: Sample) -> None:
        minute = int(sample.at // 60 * 60)
        key = (node_uuid, minute)
        sums = self.pending.get(key)
        if sums is None:
            sums = self.pending[key] = MinuteSums()
        sums.add(sample)

    def forget(self, node_uuid: str) -> None:
        """Drop a removed node from memory (what the store holds of it expires with the retention)."""
        for mapping in (self.pending, self.head):
            for key in [k for k in mapping if k[0] == node_uuid]:
                del mapping[key]
        self.cache.forget(node_uuid)

    def _to_head(self, points: Iterable[tuple[str, int, Point]]) -> None:
        for node, minute, point in points:
            hour = hour_of(minute)
            columns = self.head.get((node, hour))
            if columns is None:
                columns = self.head[(node, hour)] = {}
            put_point(columns, (minute - hour) // 60, 60, point)

    async def load(self, chunk: int = 500) -> int:
        """Rebuild the head from the fragments (at start, before any flush), taking in hour documents
        of an older version first; find the latest sealed hour.

        :returns: how many minute points the head holds.
        """
        legacy = self.store.collection(LEGACY_HOURS)
        while docs := await legacy.find({}, sort=[("id", 1)], limit=chunk):
            points = [(doc["node"], doc["hour"] + int(slot) * 60, point)
                      for doc in docs for slot, point in (doc.get("m") or {}).items()]
            await self._write(fragments(points))
            await legacy.delete_many({"id": {"$in": [doc["id"] for doc in docs]}})
        self.head.clear()
        count, after = 0, None
        while True:
            query = {} if after is None else {"id": {"$gt": after}}
            docs = await self.collection.find(query, sort=[("id", 1)], limit=chunk)
            for doc in docs:
                points = orjson.loads(doc["points"])
                self._to_head(points)
                count += len(points)
            if len(docs) < chunk:
                break
            after = docs[-1]["id"]
        self.sealed_through = max(self.sealed_through, await days.latest_hour(self.store))
        return count

    async def _write(self, docs: list[dict[str, Any]],
                     taken: Optional[dict[tuple[str, int], tuple[MinuteSums, int]]] = None) -> int:
        """Insert fragment documents, ``INSERT_BATCH`` a command; each stored one's minutes go into the
        head, and out of ``pending`` if ``taken`` (``(node, minute) -> (sums, samples)`` when the
        points were made) says no sample came since.  A refused fragment's minutes stay pending for
        the next flush; the first refusal is raised once the others are written.

        :returns: how many minute points were written.
        """
        written, refused = 0, None
        for at in range(0, len(docs), INSERT_BATCH):
            batch = docs[at:at + INSERT_BATCH]
            for doc, outcome in zip(batch, await self.collection.insert_many(batch)):
                if isinstance(outcome, BaseException):
                    refused = refused or outcome
                    continue
                points = orjson.loads(doc["points"])
                self._to_head(points)
                for node, minute, _ in points:
                    sums, samples = (taken or {}).get((node, minute), (None, 0))
                    if sums is not None and self.pending.get((node, minute)) is sums and sums.samples == samples:
                        del self.pending[(node, minute)]  # (one that took a sample meanwhile goes next time)
                written += len(points)
        if refused is not None:
            raise refused
        return written

    async def flush(self, before: Optional[float] = None) -> int:
        """Write the minutes that started before ``before`` (every pending one when ``None``) as
        fragments, and put them into the head.

        A minute leaves ``pending`` only once it is written; a failed write keeps it for the next flush.

        :returns: how many minute points were written.
        """
        limit = None if before is None else int(before // 60 * 60)
        taken = {key: (sums, sums.samples) for key, sums in self.pending.items() if limit is None or key[1] < limit}
        ready = [(node, minute, sums.point()) for (node, minute), (sums, _) in taken.items()]
        return await self._write(fragments(ready), taken)

    async def columns(self, node_uuid: str, first: int, count: int) -> Columns:
        """The node's minute columns for ``count`` minutes from ``first``: sealed hours (from day
        documents or the hour cache) with the head laid over them, and the pending minutes on top."""
        hours = range(hour_of(first), hour_of(first + (count - 1) * 60) + 1, 3600)
        end = first + count * 60
        writes = self.writes
        head = {hour: self.head.get((node_uuid, hour)) for hour in hours}  # before any wait: see seal()
        sealed: dict[int, Optional[Columns]] = {}
        missing = []
        for hour in hours:
            if hour > self.sealed_through:
                sealed[hour] = None  # never sealed: the head holds all of it
                continue
            found, columns = self.cache.get(node_uuid, hour)
            if found:
                sealed[hour] = columns
            else:
                missing.append(hour)
        if missing:
            read = await days.read_hours(self.store, node_uuid, missing)
            for hour in missing:
                sealed[hour] = read.get(hour)
                if hour > self.expired_through and self.writes == writes:
                    self.cache.put(node_uuid, hour, sealed[hour])
        known = {}
        for hour in hours:
            base, top = sealed[hour], head[hour]
            known[hour] = days.overlay(base, top) if base is not None and top is not None else base or top
        joined = join((known[hour], (max(first, hour) - hour) // 60, (min(end, hour + 3600) - hour) // 60)
                      for hour in hours)
        for (node, minute), sums in self.pending.items():
            if node == node_uuid and first <= minute < end:
                put_point(joined, (minute - first) // 60, count, sums.point())
        return joined

    async def seal(self, now: float, chunk: int) -> int:
        """Pack the head's hours older than the ``HEAD_HOURS`` latest into day documents (merged with
        what their slots hold), ``chunk`` node-days a write, then delete their fragments.

        An hour whose day documents could not all be written keeps its fragments and its place in the
        head (sealing again merges the same minutes again: nothing doubles).

        :returns: how many node-hours were sealed.
        """
        last_hour = hour_of(int(now)) - HEAD_HOURS * 3600
        groups: dict[tuple[str, int], dict[int, Columns]] = {}
        for (node, hour), columns in self.head.items():
            if self.expired_through < hour <= last_hour:
                groups.setdefault((node, days.day_of(hour)), {})[hour] = columns
        if not groups:
            return 0
        hours = {hour for group in groups.values() for hour in group}
        # Before the first write: from now on a read asks the day documents for these hours too.
        self.sealed_through = max(self.sealed_through, max(hours))
        failed: set[int] = set()
        items = list(groups.items())
        self.writes += 1
        try:
            for at in range(0, len(items), chunk):
                batch = items[at:at + chunk]
                outcomes = await days.seal(self.store, dict(batch))
                for ((node, _), group), outcome in zip(batch, outcomes):
                    for hour in group:
                        self.cache.drop(node, hour)
                    if isinstance(outcome, BaseException):
                        failed.update(group)
        finally:
            self.writes += 1
        done = sorted(hours - failed)
        if done:
            await self.collection.delete_many({"hour": {"$in": done}})
            for key in [k for k in self.head if k[1] in done]:
                del self.head[key]
        if failed:
            raise RuntimeError(f"day documents of {len(failed)} hours could not be written; they stay in the head")
        return sum(len(group) for group in groups.values())

    async def prune(self, cutoff: float, chunk: int) -> int:
        """Delete the hours that ended before ``cutoff``: whole days, the expired hours of the day the
        cutoff falls in, and expired fragments, ``chunk`` documents a statement.

        :returns: how many documents (days and fragments) were deleted.
        """
        last_hour = int(cutoff // 3600 * 3600) - 3600
        self.expired_through = max(self.expired_through, last_hour)
        self.cache.expire(last_hour)
        for key in [k for k in self.head if k[1] <= last_hour]:
            del self.head[key]
        deleted = await days.expire(self.store, last_hour, chunk)
        return deleted + await days.delete_chunked(self.collection, {"hour": {"$lte": last_hour}}, chunk)
