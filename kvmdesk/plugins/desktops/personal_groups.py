"""Personal desktop groups: maintenance mode (#119-#120) and the paged query (#121).

Maintenance is a flag on the group: while it is on the portal gives none of its desktops to anyone
(409, 6502); the administrators' endpoints work on the group and its desktops as usual.  Entering
maintenance does not take desktops away from users who already hold them.
"""
from __future__ import annotations

from typing import Any

from kvmdesk.api.router import Action, ApiRequest, Router
from kvmdesk.core import errors
from kvmdesk.core.errors import ApiError
from kvmdesk.core.jobs import run_batch
from kvmdesk.core.paging import paged_search
from kvmdesk.core.records import now_text
from kvmdesk.plugins.desktops import personal_codes as codes
from kvmdesk.plugins.desktops.broker import EXTENSION as BROKER
from kvmdesk.plugins.desktops import schema
from kvmdesk.plugins.desktops.personal_models import PersonalGroups
from kvmdesk.plugins.desktops.personal_schema import PERSONAL_GROUPS, RANDOM_BINDINGS

BASE = "/personal/desktop"
TAGS = ("personal_desktop_groups",)
SEARCH_FIELDS = {"uuid": str, "name": str, "template": str, "pool": str, "network": str, "subnet": str,
                 "desktop_type": int, "maintenance": bool, "sys_restore": int, "data_restore": int, "owner": str}


def set_maintenance(on: bool) -> Any:
    async def handler(req: ApiRequest) -> dict:
        body: PersonalGroups = req.body
        req.oplog_detail = ", ".join(g.name or g.uuid for g in body.desktops[:10])
        groups = req.core.store.collection(PERSONAL_GROUPS)

        async def one(ref: Any) -> None:
            changed = await groups.update_one({"uuid": ref.uuid}, {"$set": {"maintenance": on,
                                                                            "updated_at": now_text(req.core.clock)}})
            if not changed and await groups.find_one({"uuid": ref.uuid}) is None:
                raise ApiError(errors.NOT_FOUND, resource=codes.PERSONAL_GROUP, key=ref.name or ref.uuid)

        try:
            return await run_batch(req, [{"uuid": g.uuid, "name": g.name, "ref": g} for g in body.desktops],
                                   lambda item: one(item["ref"]))
        finally:
            req.core.extensions[BROKER].forget()

    handler.__name__ = "enter_maintenance" if on else "exit_maintenance"
    return handler


async def with_counts(core: Any, groups: list[dict]) -> list[dict]:
    """The contract's counts: desktops, running ones, held (random) and bound user groups."""
    uuids = [g["uuid"] for g in groups]
    desktops = core.store.collection(schema.DESKTOPS)
    totals = await desktops.count_by("desktop_uuid", {"desktop_uuid": {"$in": uuids}})
    active = await desktops.count_by("desktop_uuid", {"desktop_uuid": {"$in": uuids}, "status": "active"})
    held = await desktops.count_by("desktop_uuid", {"desktop_uuid": {"$in": uuids}, "holder": {"$ne": None}})
    bound = await core.store.collection(RANDOM_BINDINGS).count_by("desktop", {"desktop": {"$in": uuids}})
    return [{**g, "instance_num": totals.get(g["uuid"], 0), "active_count": active.get(g["uuid"], 0),
             "inactive_count": totals.get(g["uuid"], 0) - active.get(g["uuid"], 0), "held_count": held.get(g["uuid"], 0),
             "group_count": bound.get(g["uuid"], 0)} for g in groups]


ACTIONS = {
    "enter_maintenance": Action(set_maintenance(True), "Personal groups enter maintenance: users get no desktop of them "
                                "(batch)", PersonalGroups, "个人桌面组开启维护模式"),
    "exit_maintenance": Action(set_maintenance(False), "Personal groups leave maintenance (batch)", PersonalGroups,
                               "个人桌面组关闭维护模式"),
}


def register_routes(router: Router) -> None:
    router.actions(BASE + "/", ACTIONS, tags=TAGS)

    @router.endpoint("GET", BASE + "/", summary="Query personal desktop groups, paged, with counts", tags=TAGS,
                     search_fields=SEARCH_FIELDS)
    async def list_groups(req: ApiRequest) -> Any:
        return await paged_search(req, req.core.store.collection(PERSONAL_GROUPS), SEARCH_FIELDS, sort=[("id", 1)],
                                  decorate=lambda gs: with_counts(req.core, gs), resource=codes.PERSONAL_GROUP)
