"""Timetables (beyond the contract; what a school runs by): a desktop group's weekly lessons.

``PUT /education/desktop/timetable`` sets them (``{"uuid", "lessons": [{"weekday": 0-6 (Monday 0),
"start": "HH:MM", "end": "HH:MM"}], "lead_minutes": 10}``; no lessons clears the timetable);
``GET /education/desktop/timetable?uuid=`` shows them with the next start and stop.

Every lesson starts the group's desktops ``lead_minutes`` before it begins and stops them when it
ends (a restore group's desktops come back clean at the next start).  The times are weekly entries
of the persisted scheduler (``core.scheduler``: they survive restarts; a slot missed while the
controller was down fires once at start-up), and each firing runs the group operation as a
persisted job (``core.jobs``), with its per-desktop results.  An inactive group is not started.
"""
from __future__ import annotations

import re
from typing import Any, Optional

from pydantic import Field

from kvmdesk.api.models import Model
from kvmdesk.api.router import ApiRequest, Router
from kvmdesk.core import errors
from kvmdesk.core.errors import ApiError
from kvmdesk.core.records import now_text
from kvmdesk.core.scheduler import shift_slot
from kvmdesk.plugins.desktops import schema
from kvmdesk.plugins.desktops.desktop_groups import BASE, TAGS, on_every_desktop
from kvmdesk.plugins.desktops.lookups import NAMES, record_or_404
from kvmdesk.plugins.desktops.models import Uuid

PATH = BASE + "/timetable"
#: Scheduled kinds (one weekly entry each per group) and the job kind they start.
START, STOP = "desktops.lesson_start", "desktops.lesson_stop"
JOB_KIND = "desktop_groups.lesson"
_TIME = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")


class Lesson(Model):
    weekday: int = Field(ge=0, le=6)
    start: str = Field(pattern=_TIME.pattern)
    end: str = Field(pattern=_TIME.pattern)


class TimetableQuery(Model):
    uuid: Uuid


class TimetableBody(Model):
    uuid: Uuid
    lessons: list[Lesson] = Field(max_length=100)
    lead_minutes: int = Field(default=10, ge=0, le=240)


def _minutes(text: str) -> int:
    hours, minutes = text.split(":")
    return int(hours) * 60 + int(minutes)


def slots_of(lessons: list[Lesson], lead: int) -> tuple[list[dict], list[dict]]:
    """The weekly start slots (``lead`` minutes before each lesson) and stop slots (its end).

    :raises ApiError: a lesson that ends before it starts (400, naming ``lessons[i].end``).
    """
    starts, stops = [], []
    for index, lesson in enumerate(lessons):
        if _minutes(lesson.end) <= _minutes(lesson.start):
            raise ApiError(errors.INVALID_PARAM, field=f"lessons[{index}].end", reason="a lesson ends after it starts")
        starts.append(shift_slot({"weekday": lesson.weekday, "time": lesson.start}, -lead))
        stops.append({"weekday": lesson.weekday, "time": lesson.end})
    return starts, stops


async def view(core: Any, group: dict) -> dict:
    timetable = group.get("timetable") or {"lessons": [], "lead_minutes": 10}
    entries = [await core.scheduler.get(key) for key in schema.lesson_keys(group["uuid"])]
    shown = [{"next_run": e["next_run"], "slots": e["slots"], "last_run": e.get("last_run")} if e else None
             for e in entries]
    return {"uuid": group["uuid"], "name": group["name"], **timetable, "start": shown[0], "stop": shown[1]}


async def set_timetable(req: ApiRequest) -> dict:
    body: TimetableBody = req.body
    core = req.core
    group = await record_or_404(core, schema.DESKTOP_GROUPS, body.uuid)
    req.oplog_detail = f"{group['name']}: {len(body.lessons)} lessons"
    starts, stops = slots_of(body.lessons, body.lead_minutes)
    timetable = {"lessons": [lesson.model_dump() for lesson in body.lessons], "lead_minutes": body.lead_minutes}
    start_key, stop_key = schema.lesson_keys(group["uuid"])
    if starts:
        await core.scheduler.schedule_weekly(start_key, START, {"uuid": group["uuid"]}, starts)
        await core.scheduler.schedule_weekly(stop_key, STOP, {"uuid": group["uuid"]}, stops)
    else:
        await cancel(core, group["uuid"])
    changes = {"timetable": timetable, "updated_at": now_text(core.clock)}
    updated = await core.store.collection(schema.DESKTOP_GROUPS).find_one_and_update({"uuid": group["uuid"]},
                                                                                      {"$set": changes})
    if updated is None:  # deleted meanwhile
        await cancel(core, group["uuid"])
        raise ApiError(errors.NOT_FOUND, resource=NAMES[schema.DESKTOP_GROUPS], key=group["uuid"])
    await core.updated(schema.DESKTOP_GROUP_KIND, updated, changes)
    return await view(core, updated)


async def cancel(core: Any, group_uuid: str) -> None:
    """Remove a group's timetable entries (the group was deleted, or its timetable cleared)."""
    for key in schema.lesson_keys(group_uuid):
        await core.scheduler.cancel(key)


async def fire(core: Any, entry: dict, operation: str) -> Optional[str]:
    """A timetable slot came: run the group operation as a job; answers the job's uuid (the history)."""
    group = await core.store.collection(schema.DESKTOP_GROUPS).find_one({"uuid": entry["payload"]["uuid"]})
    if group is None:
        await cancel(core, entry["payload"]["uuid"])
        return None
    if operation == "start" and not group.get("active"):
        return None  # a deactivated group is not started (the timetable stays)
    record = await core.jobs.submit(JOB_KIND, title=f"lesson {operation}: {group['name']}",
                                    items=[{"uuid": group["uuid"], "name": group["name"]}],
                                    params={"operation": operation})
    return record["uuid"]


async def fire_start(core: Any, entry: dict) -> Optional[str]:
    return await fire(core, entry, "start")


async def fire_stop(core: Any, entry: dict) -> Optional[str]:
    return await fire(core, entry, "stop")


async def run_lesson_job(core: Any, job: Any) -> None:
    """The job a slot starts: the operation on every desktop of the group (resumed after a restart)."""
    operation = job.params["operation"]

    async def one(item: dict) -> None:
        group = await record_or_404(core, schema.DESKTOP_GROUPS, item["uuid"])
        await on_every_desktop(core, group, operation)

    await job.for_each(one)


def register(core: Any) -> None:
    core.jobs.register(JOB_KIND, run_lesson_job, on_restart="resume")
    core.scheduler.register(START, fire_start)
    core.scheduler.register(STOP, fire_stop)


def register_routes(router: Router) -> None:
    router.endpoint("PUT", PATH, summary="Set a desktop group's weekly timetable (start before, stop after each lesson)",
                    body=TimetableBody, tags=TAGS, oplog="设置教学桌面组课表")(set_timetable)

    @router.endpoint("GET", PATH, summary="A desktop group's timetable and its next start and stop", tags=TAGS,
                     query=TimetableQuery)
    async def get_timetable(req: ApiRequest) -> dict:
        return await view(req.core, await record_or_404(req.core, schema.DESKTOP_GROUPS, req.query.uuid))
