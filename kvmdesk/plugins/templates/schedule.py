"""Scheduled saves (#70 ``run_date``): one pending save per template, kept in the template's record so
it survives a controller restart; a new ``run_date`` replaces the pending one.

A seam for the core scheduler (``core.scheduler``, being built): :meth:`SaveSchedule.schedule` and the
record's ``scheduled_save`` are all the routes see, so moving onto it changes this module only.
"""
from __future__ import annotations

import re
import time
from typing import Any, Optional

import attrs
from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger

from kvmdesk.core import errors as core_errors
from kvmdesk.core.errors import ApiError
from kvmdesk.plugins.templates import errors, publish, schema

log = Logger(namespace="kvmdesk.templates.schedule")
EXTENSION = "templates.schedule"
_RUN_DATE = re.compile(r"^(\d{4})-(\d{1,2})-(\d{1,2}) (\d{1,2}):(\d{1,2}):(\d{1,2})$")


def parse_run_date(text: str, now: float) -> float:
    """The Unix time of a contract ``run_date`` (``2020-4-19 15:48:15``, the controller's local time).

    :raises ApiError: malformed (``INVALID_PARAM``) or not in the future (:data:`errors.RUN_DATE_PAST`),
        both naming ``run_date``.
    """
    found = _RUN_DATE.match(text.strip())
    if not found:
        raise ApiError(core_errors.INVALID_PARAM, field="run_date", reason="expected YYYY-M-D H:M:S")
    year, month, day, hour, minute, second = (int(g) for g in found.groups())
    try:
        parsed = time.strptime(f"{year}-{month}-{day} {hour}:{minute}:{second}", "%Y-%m-%d %H:%M:%S")
    except ValueError:
        raise ApiError(core_errors.INVALID_PARAM, field="run_date", reason="not a date and time") from None
    at = time.mktime(parsed)
    if at <= now:
        raise ApiError(errors.RUN_DATE_PAST, run_date=text)
    return at


@attrs.define(eq=False)
class SaveSchedule(Service):
    """Runs each template's pending save at its time; re-armed from the store when started."""

    core: Any
    clock: Any
    _calls: dict[str, Any] = attrs.field(factory=dict)
    _running: set = attrs.field(factory=set)
    #: Fires once the pending saves in the store are armed again (after :meth:`startService`).
    ready: Optional[defer.Deferred] = None

    def startService(self) -> None:
        super().startService()
        self.ready = defer.ensureDeferred(self._rearm())
        self.ready.addErrback(lambda f: log.failure("re-arming scheduled template saves failed", f))

    async def _rearm(self) -> None:
        for template in await self.core.store.collection(schema.TEMPLATES).find({"scheduled_save": {"$ne": None}}):
            pending = template.get("scheduled_save")
            if pending and self.running:
                self._arm(template["uuid"], float(pending["at"]))

    def stopService(self) -> defer.Deferred:
        super().stopService()
        for call in self._calls.values():
            if call.active():
                call.cancel()
        self._calls.clear()
        return defer.gatherResults(list(self._running) + ([self.ready] if self.ready else []), consumeErrors=True)

    def idle(self) -> defer.Deferred:
        """Fires when no scheduled save is running."""
        return defer.gatherResults(list(self._running), consumeErrors=True)

    async def schedule(self, uuid: str, run_date: str) -> dict:
        """Save ``uuid`` at ``run_date`` (replacing a pending save); answers ``{"uuid", "run_date"}``."""
        at = parse_run_date(run_date, self.clock.seconds())
        pending = {"at": at, "run_date": run_date}
        await self.core.store.collection(schema.TEMPLATES).update_one({"uuid": uuid}, {"$set": {"scheduled_save": pending}})
        self._arm(uuid, at)
        return {"uuid": uuid, "run_date": run_date}

    def pending(self, uuid: str) -> Optional[float]:
        call = self._calls.get(uuid)
        return call.getTime() if call is not None and call.active() else None

    def _arm(self, uuid: str, at: float) -> None:
        previous = self._calls.pop(uuid, None)
        if previous is not None and previous.active():
            previous.cancel()
        self._calls[uuid] = self.clock.callLater(max(0.0, at - self.clock.seconds()), self._fire, uuid)

    def _fire(self, uuid: str) -> None:
        self._calls.pop(uuid, None)
        d = defer.ensureDeferred(self._save(uuid))
        self._running.add(d)
        d.addBoth(lambda result: (self._running.discard(d), result)[1])

    async def _save(self, uuid: str) -> None:
        try:
            await publish.save(self.core, uuid)
            log.info("scheduled save of template {uuid} done", uuid=uuid)
        except ApiError as exc:
            log.warn("scheduled save of template {uuid} failed: {why}", uuid=uuid, why=exc.message("en"))
            await self.core.store.collection(schema.TEMPLATES).update_one(
                {"uuid": uuid}, {"$set": {"scheduled_save": None, "scheduled_save_error": exc.message("en")}})
        except Exception:
            log.failure("scheduled save of template {uuid} failed", uuid=uuid)
