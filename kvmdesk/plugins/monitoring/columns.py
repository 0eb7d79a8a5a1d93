"""Minute points as columns: the shape ``history`` builds its answer from, and what the hour cache keeps.

A column is a list with one value per minute (``None`` where the minute has no point).  Keys are
``"c"``, ``"mp"``, ``"mu"`` and, per device, ``("d" | "n", name, 0 read | 1 write)``.  Why columns:
a day at a one-minute step is then the hours' columns sliced and joined (C-level list operations), not
1,440 points taken apart field by field in Python; and a finished hour, kept in this form, costs a
later answer nothing to take apart again.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Iterable, Mapping, Optional

import attrs

Columns = dict[Any, list]

DEVICE_KEYS = ("d", "n")
#: A column of a field nothing measured in some stretch of minutes.
_NONES = [None] * 1440


def put_point(columns: Columns, index: int, count: int, point: Mapping[str, Any]) -> None:
    """Write one minute's ``point`` (the rollups' layout) at ``index`` of columns ``count`` long."""
    for key, value in point.items():
        if key in DEVICE_KEYS:
            for name, rates in value.items():
                for which in (0, 1):
                    column = columns.get((key, name, which))
                    if column is None:
                        column = columns[(key, name, which)] = [None] * count
                    column[index] = rates[which]
            continue
        column = columns.get(key)
        if column is None:
            column = columns[key] = [None] * count
        column[index] = value


def join(parts: Iterable[tuple[Optional[Columns], int, int]]) -> Columns:
    """One set of columns from consecutive stretches: ``(columns or None, first, end)`` takes the
    minutes ``first:end`` of each (a stretch without a column of some key is ``None`` there)."""
    parts = list(parts)
    keys: dict[Any, None] = {}
    for columns, _, _ in parts:
        keys.update(dict.fromkeys(columns or ()))
    joined: Columns = {}
    for key in keys:
        column: list = []
        for columns, first, end in parts:
            found = columns.get(key) if columns else None
            column.extend(found[first:end] if found is not None else _nones(end - first))
        joined[key] = column
    return joined


def _nones(count: int) -> list:
    return _NONES[:count] if count <= len(_NONES) else [None] * count


def series(columns: Columns, count: int, per_step: int) -> dict[str, Any]:
    """The history answer's series: ``count`` minutes, ``per_step`` minutes a step.  A step's value is
    the mean of its minutes that have one, ``None`` when none has (a gap is unknown, not zero).

    One minute a step takes the columns as they are: the points were rounded when they were written.
    """
    def column(key: Any, digits: Optional[int]) -> list:
        values = columns.get(key)
        if values is None:
            return _nones(count // per_step)
        if per_step == 1:
            return values
        return [_mean(values[i:i + per_step], digits) for i in range(0, count, per_step)]

    def devices(prefix: str) -> dict[str, dict[str, list]]:
        names = sorted({key[1] for key in columns if isinstance(key, tuple) and key[0] == prefix})
        return {name: {"read_bytes_avg": column((prefix, name, 0), None),
                       "write_bytes_avg": column((prefix, name, 1), None)} for name in names}

    return {
        "cpu_util": column("c", 2),
        "memory_util": {"percent": column("mp", 2), "used": column("mu", None)},
        "disk_io_util": devices("d"),
        "nic_util": devices("n"),
    }


def _mean(values: list, digits: Optional[int]) -> Any:
    present = [v for v in values if v is not None]
    if not present:
        return None
    mean = sum(present) / len(present)
    return round(mean, digits) if digits is not None else int(round(mean))


@attrs.define
class HourCache:
    """Columns of finished hours, least recently used first out.

    An hour is cached only once it is over; the rollups drop an entry whenever they write into its
    hour (a minute flushed late) and when the hour expires.  ``None`` stands for an hour with no
    document (a node offline), which is as final as one with points.

    :param capacity: most node-hours kept (a 1-minute hour of CPU, memory, two disks and two NICs is
        some 20 KiB of Python objects).
    """

    capacity: int
    entries: "OrderedDict[tuple[str, int], Optional[Columns]]" = attrs.field(factory=OrderedDict)

    def get(self, node: str, hour: int) -> tuple[bool, Optional[Columns]]:
        """``(found, columns)``."""
        key = (node, hour)
        if key not in self.entries:
            return False, None
        self.entries.move_to_end(key)
        return True, self.entries[key]

    def put(self, node: str, hour: int, columns: Optional[Columns]) -> None:
        if self.capacity <= 0:
            return
        self.entries[(node, hour)] = columns
        self.entries.move_to_end((node, hour))
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)

    def drop(self, node: str, hour: int) -> None:
        self.entries.pop((node, hour), None)

    def forget(self, node: str) -> None:
        for key in [k for k in self.entries if k[0] == node]:
            del self.entries[key]

    def expire(self, last_hour: int) -> None:
        """Drop every hour up to and including ``last_hour``."""
        for key in [k for k in self.entries if k[1] <= last_hour]:
            del self.entries[key]
