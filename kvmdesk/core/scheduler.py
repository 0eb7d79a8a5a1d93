"""The persisted scheduler: timed operations that survive a controller restart (``core.scheduler``).

A plugin declares what a kind of entry does (in ``kvmdesk_configure``), then schedules entries::

    core.scheduler.register("template.save", save_template)      # async (core, entry) -> result

    at = parse_run_date(param.run_date, now=core.clock.seconds())  # 400 naming the field if bad/past
    await core.scheduler.schedule(f"template.save:{uuid}", at, "template.save", {"uuid": uuid})
    await core.scheduler.schedule_weekly(f"group.start:{uuid}", "group.start", {"uuid": uuid},
                                         [{"weekday": 0, "time": "07:50"}])     # Monday 07:50, local

An entry (collection ``schedules``)::

    {uuid, key, kind, payload, type: "once" | "weekly", slots, next_time (unix seconds), next_run
     (local text), runs, last_run: {due_at, fired_at, misfired, result, error}, created_at, updated_at}

- ``key`` is unique: scheduling a key again replaces its pending entry (a new ``uuid``).
- One delayed call waits for the earliest ``next_time`` (re-armed whenever entries change); no polling.
- Due entries are claimed (so each fires once), then their handlers run in the background: a handler
  should start long work as a job (:mod:`kvmdesk.core.jobqueue`) and return.  What it returns (e.g. the
  job's uuid) or the error it raised is kept in the run's history (collection ``schedule_runs``,
  :meth:`Scheduler.history`) and in ``last_run``; a failure is logged and the scheduler goes on.
- A one-shot entry is removed once it ran; a weekly one is re-armed for its next slot.
- Misfires: an entry whose time passed while the controller was down fires once at start-up, with
  ``misfired: true`` in its history (a weekly entry that missed several slots runs once, not once per
  slot).  A one-shot entry whose handler was running when the controller stopped is recorded as
  interrupted and removed (the job it started, if any, is resumed or failed by the job service).

Times are the controller's local time, like the contract's ``run_date`` (``2020-4-19 15:48:15``).
"""
from __future__ import annotations

import re
from datetime import date, datetime, timedelta
from typing import Any, Awaitable, Callable, Mapping, Optional, Sequence

import attrs
from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger

from kvmdesk.core import errors
from kvmdesk.core.errors import ApiError
from kvmdesk.core.jobqueue import error_of, jsonable
from kvmdesk.core.records import format_time, new_record
from kvmdesk.core.store import Index

log = Logger(namespace="kvmdesk.scheduler")

COLLECTION = "schedules"
RUNS = "schedule_runs"
INDEXES = [
    Index(COLLECTION, ["key"], unique=True),
    Index(COLLECTION, ["next_time"]),
    Index(RUNS, ["key"]),
    Index(RUNS, ["created_time"]),
]
#: Filterable fields of the schedule list (``GET /schedules``).
SEARCH_FIELDS = {"key": str, "kind": str, "type": str, "uuid": str}
RESOURCE = errors.Resource("定时任务", "schedule")
HISTORY_SIZE = 20

RUN_DATE_INVALID = errors.define(
    1060, 400, "{field} 格式错误: {value} (应为 YYYY-MM-DD HH:MM:SS)",
    "{field} is malformed: {value} (expected YYYY-MM-DD HH:MM:SS)")
RUN_DATE_PAST = errors.define(1061, 400, "{field} 不能早于当前时间: {value}", "{field} is in the past: {value}")
HANDLER_MISSING = errors.define(1065, 500, "没有处理此类定时任务的插件: {kind}", "no plugin handles scheduled {kind}")
RUN_INTERRUPTED = errors.define(1066, 503, "定时任务执行时控制器停止", "the controller stopped while it ran")

Handler = Callable[[Any, dict], Awaitable[Any]]

_RUN_DATE = re.compile(r"\s*(\d{4})-(\d{1,2})-(\d{1,2})[ T](\d{1,2}):(\d{2}):(\d{2})\s*")
_SLOT_TIME = re.compile(r"([01]?\d|2[0-3]):([0-5]\d)")


# -- validation helpers for API layers ------------------------------------------------------------


def parse_run_date(value: Any, *, now: float, field: str = "run_date") -> float:
    """The unix time of the contract's ``run_date`` (``YYYY-MM-DD HH:MM:SS``, unpadded allowed, local time).

    :raises ApiError: :data:`RUN_DATE_INVALID` (malformed or impossible date), :data:`RUN_DATE_PAST`
        (not after ``now``); both name ``field``.
    """
    match = _RUN_DATE.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise ApiError(RUN_DATE_INVALID, field=field, value=value)
    try:
        at = datetime(*(int(part) for part in match.groups())).timestamp()
    except (ValueError, OverflowError):
        raise ApiError(RUN_DATE_INVALID, field=field, value=value) from None
    if at <= now:
        raise ApiError(RUN_DATE_PAST, field=field, value=value)
    return at


def validate_slots(slots: Any, *, field: str = "slots") -> list[dict[str, Any]]:
    """Weekly slots ``[{"weekday": 0-6 (Monday 0), "time": "HH:MM"}]``, checked and normalised
    (``"7:5"`` is refused, ``"7:05"`` becomes ``"07:05"``; duplicates dropped, sorted).

    :raises ApiError: :data:`~kvmdesk.core.errors.INVALID_PARAM` naming the field (``slots[1].time``).
    """
    if not isinstance(slots, (list, tuple)) or not slots:
        raise ApiError(errors.INVALID_PARAM, field=field, reason="expected a non-empty list of {weekday, time}")
    normalised = set()
    for position, slot in enumerate(slots):
        where = f"{field}[{position}]"
        if not isinstance(slot, Mapping) or set(slot) != {"weekday", "time"}:
            raise ApiError(errors.INVALID_PARAM, field=where, reason="expected exactly {weekday, time}")
        weekday, text = slot["weekday"], slot["time"]
        if type(weekday) is not int or not 0 <= weekday <= 6:
            raise ApiError(errors.INVALID_PARAM, field=f"{where}.weekday", reason="expected 0 (Monday) to 6 (Sunday)")
        match = _SLOT_TIME.fullmatch(text) if isinstance(text, str) else None
        if match is None:
            raise ApiError(errors.INVALID_PARAM, field=f"{where}.time", reason="expected HH:MM (00:00-23:59)")
        normalised.add((weekday, f"{int(match[1]):02d}:{match[2]}"))
    return [{"weekday": weekday, "time": text} for weekday, text in sorted(normalised)]


def shift_slot(slot: Mapping[str, Any], minutes: int) -> dict[str, Any]:
    """``slot`` moved by ``minutes`` (negative: earlier), across midnight and the week's end
    (e.g. a lesson's start slot minus the minutes desktops need to boot)."""
    hours, mins = (int(part) for part in slot["time"].split(":"))
    total = (slot["weekday"] * 1440 + hours * 60 + mins + minutes) % (7 * 1440)
    return {"weekday": total // 1440, "time": f"{total % 1440 // 60:02d}:{total % 60:02d}"}


def next_weekly(slots: Sequence[Mapping[str, Any]], after: float) -> float:
    """The first slot time (local) strictly after the unix time ``after``."""
    start = datetime.fromtimestamp(after).date()
    candidates = []
    for slot in slots:
        hours, mins = (int(part) for part in slot["time"].split(":"))
        days_ahead = (slot["weekday"] - start.weekday()) % 7
        for weeks in (0, 1):
            day: date = start + timedelta(days=days_ahead + 7 * weeks)
            at = datetime(day.year, day.month, day.day, hours, mins).timestamp()
            if at > after:
                candidates.append(at)
                break
    return min(candidates)


# -- the service ------------------------------------------------------------------------------------


@attrs.define(eq=False)
class Scheduler(Service):
    """Fires persisted entries at their time with the core's clock (see the module doc).

    :param core: its ``store``, ``clock`` and ``config`` (``[scheduler]``) are used; handlers get it.
    """

    core: Any
    handlers: dict[str, Handler] = attrs.field(factory=dict)
    _call: Any = None
    _pump: Optional[defer.Deferred] = None
    _pumping: bool = False
    _poked: bool = False
    _running_handlers: set = attrs.field(factory=set)
    name = "scheduler"

    @property
    def collection(self) -> Any:
        return self.core.store.collection(COLLECTION)

    def register(self, kind: str, handler: Handler) -> None:
        """Declare what entries of ``kind`` do: ``async handler(core, entry) -> result`` (kept in the
        history; make it JSON-able, e.g. a job's uuid)."""
        if kind in self.handlers and self.handlers[kind] is not handler:
            raise ValueError(f"scheduled kind {kind!r} is already registered")
        self.handlers[kind] = handler

    async def schedule(self, key: str, at: float, kind: str, payload: Mapping[str, Any]) -> dict[str, Any]:
        """Run ``kind`` once at the unix time ``at``; replaces the pending entry of ``key`` (if any)."""
        return await self._put(key, kind, payload, type="once", slots=None, next_time=float(at))

    async def schedule_weekly(self, key: str, kind: str, payload: Mapping[str, Any],
                              slots: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Run ``kind`` at every slot ``{"weekday": 0-6 (Monday 0), "time": "HH:MM"}`` of the week, in
        the controller's local time; replaces the entry of ``key`` (if any).

        :raises ApiError: bad slots (400 naming ``slots[i]...``; see :func:`validate_slots`).
        """
        slots = validate_slots(slots)
        return await self._put(key, kind, payload, type="weekly", slots=slots,
                               next_time=next_weekly(slots, self.core.clock.seconds()))

    async def _put(self, key: str, kind: str, payload: Mapping[str, Any], **fields: Any) -> dict[str, Any]:
        if not isinstance(key, str) or not key:
            raise ValueError("a schedule key is a non-empty string")
        if kind not in self.handlers:
            raise ValueError(f"unknown scheduled kind {kind!r} (register it first)")
        entry = new_record(self.core.clock, key=key, kind=kind, payload=dict(payload), runs=0, last_run=None,
                           next_run=format_time(fields["next_time"]), **fields)
        await self.collection.update_one({"key": key}, {"$set": entry}, upsert=True)
        self._poke()
        return await self.collection.find_one({"key": key}) or entry

    async def cancel(self, key: str) -> bool:
        """Remove the entry of ``key``; ``False`` if there was none."""
        removed = await self.collection.delete_one({"key": key}) == 1
        if removed:
            self._poke()
        return removed

    async def get(self, key: str) -> Optional[dict[str, Any]]:
        """The entry of ``key`` (pending one-shot or weekly), or ``None``."""
        return await self.collection.find_one({"key": key})

    async def list(self, prefix: str = "", *, kind: Optional[str] = None) -> list[dict[str, Any]]:
        """Entries whose key starts with ``prefix`` (of ``kind``, if given), soonest first."""
        conditions: dict[str, Any] = {}
        if prefix:
            conditions["key"] = {"$regex": "^" + re.escape(prefix)}
        if kind is not None:
            conditions["kind"] = kind
        return await self.collection.find(conditions, sort=[("next_time", 1), ("id", 1)])

    async def history(self, key: str, limit: int = HISTORY_SIZE) -> list[dict[str, Any]]:
        """The last runs of ``key``, newest first: ``{due_at, fired_at, misfired, result, error}``."""
        return await self.core.store.collection(RUNS).find({"key": key}, sort=[("id", -1)], limit=limit)

    # -- firing ------------------------------------------------------------------------------------

    def _poke(self) -> None:
        """Something changed, or the delayed call fired: fire what is due, then wait for the next one."""
        self._poked = True
        if not self._pumping and self.running:
            # a flag besides the Deferred: the rounds may finish before ensureDeferred returns
            self._pumping = True
            pump = defer.ensureDeferred(self._pump_rounds())
            self._pump = None if pump.called else pump

    async def _pump_rounds(self) -> None:
        try:
            while self._poked and self.running:
                self._poked = False
                try:
                    await self._fire_due()
                    await self._arm()
                except Exception:
                    retry = self.core.config.number("scheduler.retry_interval", 60.0, minimum=0.1)
                    log.failure("scheduler round failed; trying again in {retry} s", retry=retry)
                    self._set_call(retry)
        finally:
            self._pumping = False
            self._pump = None

    async def idle(self) -> None:
        """Wait until no round and no handler is in progress (tests; a plugin's own shutdown)."""
        while self._pump is not None or self._running_handlers:
            await defer.gatherResults([*self._running_handlers, *filter(None, [self._pump])], consumeErrors=True)

    def _set_call(self, delay: float) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = self.core.clock.callLater(max(0.0, delay), self._timer_fired)

    def _timer_fired(self) -> None:
        self._call = None
        self._poke()

    async def _arm(self) -> None:
        first = await self.collection.find_one({"next_time": {"$ne": None}}, sort=[("next_time", 1)])
        if first is None:
            if self._call is not None and self._call.active():
                self._call.cancel()
            self._call = None
            return
        self._set_call(first["next_time"] - self.core.clock.seconds())

    async def _fire_due(self) -> None:
        now = self.core.clock.seconds()
        for entry in await self.collection.find({"next_time": {"$lte": now}}, sort=[("next_time", 1)]):
            if entry["type"] == "weekly":
                next_time = next_weekly(entry["slots"], now)
                claim = {"next_time": next_time, "next_run": format_time(next_time)}
            else:
                claim = {"next_time": None, "next_run": None}
            # the entry's uuid and time in the filter: a replaced or already claimed entry is left alone
            claimed = await self.collection.find_one_and_update(
                {"uuid": entry["uuid"], "next_time": entry["next_time"]}, {"$set": claim})
            if claimed is not None:
                running = defer.ensureDeferred(self._run(claimed, entry["next_time"], now))
                self._running_handlers.add(running)
                running.addBoth(lambda _, running=running: self._running_handlers.discard(running))

    async def _run(self, entry: dict[str, Any], due: float, fired: float) -> None:
        grace = self.core.config.number("scheduler.misfire_grace", 60.0)
        misfired = fired - due > grace
        if misfired:
            log.info("schedule {key} was due at {due} and runs late (once)", key=entry["key"], due=format_time(due))
        result, error = None, None
        handler = self.handlers.get(entry["kind"])
        try:
            if handler is None:
                raise ApiError(HANDLER_MISSING, kind=entry["kind"])
            result = jsonable(await handler(self.core, entry))
        except ApiError as exc:
            log.warn("schedule {key} failed: {reason}", key=entry["key"], reason=exc.message("en"))
            error = error_of(exc, "en")
        except Exception:
            log.failure("schedule {key} ({kind}) failed", key=entry["key"], kind=entry["kind"])
            error = error_of(ApiError(errors.INTERNAL_ERROR, request_id=entry["uuid"]), "en")
        try:
            await self._record_run(entry, due, fired, misfired, result, error)
        except Exception:
            log.failure("could not record the run of schedule {key}", key=entry["key"])

    async def _record_run(self, entry: dict[str, Any], due: Optional[float], fired: float, misfired: bool,
                          result: Any, error: Optional[dict]) -> None:
        finished = self.core.clock.seconds()
        summary = {"due_at": format_time(due) if due is not None else None, "fired_at": format_time(fired),
                   "finished_at": format_time(finished), "misfired": misfired, "result": result, "error": error}
        await self.core.store.collection(RUNS).insert_one(
            new_record(self.core.clock, key=entry["key"], kind=entry["kind"], entry_uuid=entry["uuid"],
                       created_time=finished, **summary))
        if entry["type"] == "once":
            await self.collection.delete_one({"uuid": entry["uuid"]})
        else:
            await self.collection.update_one({"uuid": entry["uuid"]},
                                             {"$set": {"last_run": summary}, "$inc": {"runs": 1}})

    async def recover(self) -> None:
        """At start-up: one-shot entries claimed by a previous run but never recorded are closed as
        interrupted; old history is pruned; then due entries (misfires) fire and the timer is armed."""
        interrupted = error_of(ApiError(RUN_INTERRUPTED), "en")
        for entry in await self.collection.find({"type": "once", "next_time": None}):
            log.warn("schedule {key} was running when the controller stopped", key=entry["key"])
            await self._record_run(entry, None, self.core.clock.seconds(), False, None, interrupted)
        days = self.core.config.number("scheduler.history_days", 30)
        if days:
            cutoff = self.core.clock.seconds() - days * 86400
            await self.core.store.collection(RUNS).delete_many({"created_time": {"$lt": cutoff}})

    def startService(self) -> None:
        super().startService()
        recovering = defer.ensureDeferred(self.recover())
        recovering.addErrback(lambda failure: log.failure("scheduler start-up recovery failed", failure))
        recovering.addBoth(lambda _: self._poke())
        self._running_handlers.add(recovering)
        recovering.addBoth(lambda _: self._running_handlers.discard(recovering))

    def stopService(self) -> defer.Deferred:
        """Cancel the timer; wait for the round and the handlers in progress."""
        super().stopService()
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        waiting = list(self._running_handlers) + ([self._pump] if self._pump is not None else [])
        return defer.gatherResults(waiting, consumeErrors=True).addCallback(lambda _: self._cancel_timer())

    def _cancel_timer(self) -> None:
        # a round that was finishing while we stopped may have armed it again
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
