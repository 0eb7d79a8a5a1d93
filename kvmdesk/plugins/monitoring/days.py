"""Finished hours packed into one document per node and day: what ``history`` reads for past hours.

``monitor_days`` holds ``{"node", "day", "h00".."h23": packed hour}``, unique on ``(node, day)``;
``day`` is the Unix time of the UTC day's start, ``hNN`` the hour's slot in it (top-level fields:
briskdb refuses a projection of numbered sub-fields).  A packed hour is
the JSON text of its minute columns (:mod:`.columns`): ``[[key, [60 values]], ...]``, a device key
as ``["d" | "n", name, 0 | 1]``.

Why: a MongoDB-wire server pays for every document and every nested field it returns.  On briskdb,
a node's 25 hour documents (60 nested points each) took 230 ms to read, the same day as one document
of 24 strings 16 ms; SQLite reads one row instead of 25 and decodes columns instead of points.

Hours are kept in the controller's head (:mod:`.rollups`) while they are recent and sealed here once
they are older than the hour before the current one; sealing an hour whose slot is already filled (a
minute that came late, after the hour was sealed) merges the two.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import orjson

from kvmdesk.core.store import Index
from kvmdesk.plugins.monitoring.columns import Columns

DAYS = "monitor_days"
#: ``(day, node)`` answers the reads (a node's days by name) and expiry (days up to a cutoff); the
#: unique index is partial on a MongoDB server, which briskdb does not use for queries.
INDEXES = [Index(DAYS, ("node", "day"), unique=True), Index(DAYS, ("day", "node"))]


def day_of(hour: int) -> int:
    return hour - hour % 86400


def slot_of(hour: int) -> str:
    return f"h{(hour % 86400) // 3600:02d}"


#: Every slot's field, in order.
SLOTS = [slot_of(hour * 3600) for hour in range(24)]


def pack(columns: Columns) -> str:
    return orjson.dumps([[list(key) if isinstance(key, tuple) else key, values] for key, values in columns.items()]).decode()


def unpack(text: str) -> Columns:
    return {tuple(key) if isinstance(key, list) else key: values for key, values in orjson.loads(text)}


def overlay(base: Columns, top: Columns) -> Columns:
    """``base`` with every minute ``top`` has a value for replaced (both 60 minutes long)."""
    merged = {key: list(values) for key, values in base.items()}
    for key, values in top.items():
        column = merged.setdefault(key, [None] * 60)
        for index, value in enumerate(values):
            if value is not None:
                column[index] = value
    return merged


async def read_hours(store: Any, node: str, hours: Iterable[int]) -> dict[int, Columns]:
    """The sealed ``hours`` of ``node`` that exist: hour -> columns."""
    wanted = {hour: (day_of(hour), slot_of(hour)) for hour in hours}
    if not wanted:
        return {}
    days = sorted({day for day, _ in wanted.values()})
    docs = await store.collection(DAYS).find({"node": node, "day": {"$in": days}},
                                             projection=["day", *sorted({slot for _, slot in wanted.values()})])
    by_day = {doc["day"]: doc for doc in docs}
    found = {}
    for hour, (day, slot) in wanted.items():
        text = by_day.get(day, {}).get(slot)
        if text is not None:
            found[hour] = unpack(text)
    return found


async def seal(store: Any, groups: Mapping[tuple[str, int], Mapping[int, Columns]]) -> list[Any]:
    """Pack each ``(node, day) -> hours`` (all of that day) into the node's day document, each hour
    merged with what its slot already holds: one read of the slots and one ``upsert_each`` for all.

    :returns: per group, in order, the store's outcome (``"created"``, ``"updated"`` or the error).
    """
    nodes = sorted({node for node, _ in groups})
    wanted_days = sorted({day for _, day in groups})
    slots = sorted({slot_of(hour) for hours in groups.values() for hour in hours})
    docs = await store.collection(DAYS).find({"node": {"$in": nodes}, "day": {"$in": wanted_days}},
                                             projection=["node", "day", *slots])
    by_key = {(doc["node"], doc["day"]): doc for doc in docs}
    operations = []
    for (node, day), hours in groups.items():
        held = by_key.get((node, day), {})
        update = {}
        for hour, columns in hours.items():
            text = held.get(slot_of(hour))
            update[slot_of(hour)] = pack(overlay(unpack(text), columns) if text is not None else columns)
        operations.append(({"node": node, "day": day}, {"$set": update}))
    return await store.collection(DAYS).upsert_each(operations)


async def latest_hour(store: Any) -> int:
    """The latest hour any day document holds (``-1`` when there is none)."""
    docs = await store.collection(DAYS).find({}, sort=[("day", -1)], limit=1)
    if not docs:
        return -1
    return max(docs[0]["day"] + SLOTS.index(slot) * 3600 for slot in SLOTS if slot in docs[0])


async def delete_chunked(collection: Any, query: Mapping[str, Any], chunk: int) -> int:
    """Delete what ``query`` matches, ``chunk`` documents a statement (each its own write, so other
    writers and the reactor get their turn between chunks).  Returns how many were deleted."""
    deleted = 0
    while True:
        rows = await collection.find(query, limit=chunk, projection=["id"])
        if rows:
            deleted += await collection.delete_many({"id": {"$in": [r["id"] for r in rows]}})
        if len(rows) < chunk:
            return deleted


async def expire(store: Any, last_hour: int, chunk: int) -> int:
    """Remove the sealed hours up to ``last_hour``: whole days ``chunk`` documents at a time, then the
    expired slots of the day it falls in.  Returns how many day documents were deleted."""
    days = store.collection(DAYS)
    last_whole_day = day_of(last_hour + 3600) - 86400
    deleted = await delete_chunked(days, {"day": {"$lte": last_whole_day}}, chunk)
    if day_of(last_hour) > last_whole_day:
        expired = SLOTS[:SLOTS.index(slot_of(last_hour)) + 1]
        await days.update_many({"day": day_of(last_hour)}, {"$unset": {slot: "" for slot in expired}})
    return deleted
