"""Saves as persisted jobs, now (#70) or at ``run_date`` through ``core.scheduler``.

A save is a job of kind :data:`SAVE` (``GET /api/v1.0/jobs/{uuid}``): resumed after a controller
restart (the version it made is stamped with the job's uuid, so a save that had finished is not
made twice).  ``run_date`` is one scheduler entry per template (key :func:`schema.save_key`): a new
``run_date`` replaces the pending one, the entry survives a restart, and when it fires it submits
the save job (the job's uuid is the run's result in the scheduler's history).
"""
from __future__ import annotations

from typing import Any, Optional

from twisted.logger import Logger

from kvmdesk.core.scheduler import parse_run_date
from kvmdesk.plugins.templates import publish, schema
from kvmdesk.plugins.templates.service import refuse_if_updating, templates

log = Logger(namespace="kvmdesk.templates.schedule")

#: The kind of the save job and of its scheduler entries.
SAVE = "templates.save"


def register(core: Any) -> None:
    core.jobs.register(SAVE, run_save, on_restart="resume")
    core.scheduler.register(SAVE, fire_save)


async def run_save(core: Any, job: Any) -> None:
    """The save job: publish a new version of each item (one template).  A job of one template shows
    how much of the version the other nodes hold as its progress (up to 99 until it is recorded)."""
    follow = (lambda percent: job.set_progress(min(99.0, percent))) if len(job.items) == 1 else None

    async def one(item: dict) -> dict:
        current = await templates(core).find_one({"uuid": item["uuid"]})
        done = (current or {}).get("versions") or []
        if done and done[-1].get("job_id") == job.uuid:
            saved = current  # resumed after a restart that came once the version was stored
        else:
            saved = await publish.save(core, item["uuid"], job_id=job.uuid, on_progress=follow)
        return {"uuid": saved["uuid"], "name": saved["name"], "version": saved["version"], "publish": saved["publish"]}

    await job.for_each(one)


async def schedule_save(core: Any, template: dict, run_date: Any) -> dict:
    """Save ``template`` at ``run_date`` (replacing its pending save); answers ``{"uuid", "run_date"}``.

    :raises ApiError: ``run_date`` malformed or not in the future (naming the field); the template updating.
    """
    refuse_if_updating(template)
    at = parse_run_date(run_date, now=core.clock.seconds())
    await core.scheduler.schedule(schema.save_key(template["uuid"]), at, SAVE, {"uuid": template["uuid"]})
    return {"uuid": template["uuid"], "run_date": run_date}


async def fire_save(core: Any, entry: dict) -> Optional[str]:
    """A ``run_date`` came: submit the save job; answers its uuid (``None`` if the template is gone)."""
    template = await templates(core).find_one({"uuid": entry["payload"]["uuid"]})
    if template is None:
        return None
    record = await core.jobs.submit(SAVE, title=f"scheduled save of template {template['name']}",
                                    items=[{"uuid": template["uuid"], "name": template["name"]}])
    return record["uuid"]


async def take_over_saved_schedules(core: Any) -> int:
    """At start-up: pending saves of the old per-template schedule (a template's ``scheduled_save``,
    ``{"at", "run_date"}``) become scheduler entries, once (a time already past fires at start, as a
    misfire).  Returns how many were taken over."""
    taken = 0
    for template in await templates(core).find({"scheduled_save": {"$ne": None}}):
        pending = template.get("scheduled_save")
        key = schema.save_key(template["uuid"])
        if pending and await core.scheduler.get(key) is None:
            await core.scheduler.schedule(key, float(pending["at"]), SAVE, {"uuid": template["uuid"]})
            log.info("the scheduled save of template {name} ({run_date}) moved to the scheduler",
                     name=template["name"], run_date=pending.get("run_date"))
            taken += 1
        await templates(core).update_one({"uuid": template["uuid"]}, {"$set": {"scheduled_save": None}})
    return taken
