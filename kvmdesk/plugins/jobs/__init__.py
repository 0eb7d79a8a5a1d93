"""Built-in plugin: the API of the core's persisted jobs and schedules (beyond the contract).

The job service and the scheduler are part of the core (``core.jobs``, ``core.scheduler``: every plugin
needs them, and they run whether or not this plugin is loaded); their endpoints live here because the
core does not import the HTTP layer, and a plugin's routes are declared like every other plugin's
(the OpenAPI document and the operation log pick them up the same way).

- ``GET /jobs``: jobs, newest first, paged, with the generic search on ``uuid, kind, state, title,
  admin``; each without its ``items`` (ask for one job to get them).
- ``GET /jobs/{uuid}``: one job with its per-item results.
- ``POST /jobs/{uuid}/cancel``: no further item starts; the job ends ``cancelled``.
- ``GET /schedules``: scheduled entries (run_date saves, timetables), soonest first, paged, searchable
  on ``key, kind, type, uuid``; ``GET /schedules/{key}``: one entry with its last runs (``history``).
"""
from __future__ import annotations

from kvmdesk import hookimpl
from kvmdesk.api.router import ApiRequest, Router
from kvmdesk.core import jobqueue, scheduler
from kvmdesk.core.errors import NOT_FOUND, ApiError
from kvmdesk.core.paging import paged_search

TAGS = ("jobs",)


async def _without_items(jobs: list[dict]) -> list[dict]:
    return [{k: v for k, v in job.items() if k != "items"} for job in jobs]


@hookimpl
def kvmdesk_routes(router: Router, core) -> None:
    @router.endpoint("GET", "/jobs", summary="Jobs, newest first, paged (without their items)", tags=TAGS,
                     search_fields=jobqueue.SEARCH_FIELDS, paged=True)
    async def list_jobs(req: ApiRequest) -> dict:
        return await paged_search(req, req.core.store.collection(jobqueue.COLLECTION), jobqueue.SEARCH_FIELDS,
                                  sort=[("id", -1)], decorate=_without_items, resource=jobqueue.RESOURCE)

    @router.endpoint("GET", "/jobs/{uuid}", summary="One job: state, progress and per-item results", tags=TAGS)
    async def get_job(req: ApiRequest) -> dict:
        return await req.core.jobs.get(req.path["uuid"])

    @router.endpoint("POST", "/jobs/{uuid}/cancel", summary="Cancel a job: no further item starts", tags=TAGS,
                     oplog="取消任务")
    async def cancel_job(req: ApiRequest) -> dict:
        return await req.core.jobs.cancel(req.path["uuid"])

    @router.endpoint("GET", "/schedules", summary="Scheduled operations, soonest first, paged", tags=TAGS,
                     search_fields=scheduler.SEARCH_FIELDS, paged=True)
    async def list_schedules(req: ApiRequest) -> dict:
        return await paged_search(req, req.core.store.collection(scheduler.COLLECTION), scheduler.SEARCH_FIELDS,
                                  sort=[("next_time", 1), ("id", 1)], resource=scheduler.RESOURCE)

    @router.endpoint("GET", "/schedules/{key}", summary="One scheduled operation and its last runs", tags=TAGS)
    async def get_schedule(req: ApiRequest) -> dict:
        key = req.path["key"]
        entry = await req.core.scheduler.get(key)
        if entry is None:
            raise ApiError(NOT_FOUND, resource=scheduler.RESOURCE, key=key)
        return {**entry, "history": await req.core.scheduler.history(key)}
