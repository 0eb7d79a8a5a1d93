"""Random desktops: user groups bound to a random personal desktop group (contract #122-#124).

A user of a bound user group may take any free desktop of the group through the portal
(:mod:`.broker`).  Binding a user group already bound is refused per item (409, 6510); the unique
index on (group, user group) makes that hold under concurrent requests too.
"""
from __future__ import annotations

from typing import Any

from kvmdesk.api.router import Action, ApiRequest, Router
from kvmdesk.core import errors
from kvmdesk.core.errors import ApiError
from kvmdesk.core.jobs import run_batch
from kvmdesk.core.paging import paged_search
from kvmdesk.core.records import new_record
from kvmdesk.core.store import DuplicateKeyError
from kvmdesk.plugins.desktops import personal_codes as codes
from kvmdesk.plugins.desktops.broker import EXTENSION as BROKER
from kvmdesk.plugins.desktops.personal_models import BindGroups, UnbindGroups
from kvmdesk.plugins.desktops.personal_schema import PERSONAL_GROUPS, RANDOM, RANDOM_BINDINGS, USER_GROUPS, USERS

BASE = "/personal/desktop/random"
TAGS = ("personal_random_desktops",)
SEARCH_FIELDS = {"desktop": str, "uuid": str, "group_uuid": str}
BINDING = errors.Resource("绑定关系", "binding")


async def random_group(core: Any, uuid: str) -> dict:
    group = await core.store.collection(PERSONAL_GROUPS).find_one({"uuid": uuid})
    if group is None:
        raise ApiError(errors.NOT_FOUND, resource=codes.PERSONAL_GROUP, key=uuid)
    if group.get("desktop_type") != RANDOM:
        raise ApiError(codes.NOT_RANDOM, name=group["name"])
    return group


async def add_group(req: ApiRequest) -> dict:
    body: BindGroups = req.body
    core = req.core
    group = await random_group(core, body.desktop_uuid)
    req.oplog_detail = f"{group['name']}: " + ", ".join(g.group_name or g.group_uuid for g in body.groups)
    bindings = core.store.collection(RANDOM_BINDINGS)

    async def bind(ref: Any) -> None:
        user_group = await core.store.collection(USER_GROUPS).find_one({"uuid": ref.group_uuid})
        if user_group is None:
            raise ApiError(errors.NOT_FOUND, resource=codes.USER_GROUP, key=ref.group_uuid)
        try:
            await bindings.insert_one(new_record(core.clock, desktop=group["uuid"], group_uuid=user_group["uuid"],
                                                 group_name=user_group["name"]))
        except DuplicateKeyError:
            raise ApiError(codes.ALREADY_BOUND, group=user_group["name"], desktop=group["name"]) from None

    try:
        return await run_batch(req, [{"uuid": g.group_uuid, "name": g.group_name, "ref": g} for g in body.groups],
                               lambda item: bind(item["ref"]))
    finally:
        core.extensions[BROKER].forget()


async def delete_group(req: ApiRequest) -> dict:
    body: UnbindGroups = req.body
    core = req.core
    group = await random_group(core, body.desktop_uuid)
    req.oplog_detail = f"{group['name']}: " + ", ".join(g.group_name or g.uuid for g in body.groups)

    async def unbind(ref: Any) -> None:
        if not await core.store.collection(RANDOM_BINDINGS).delete_one({"uuid": ref.uuid, "desktop": group["uuid"]}):
            raise ApiError(codes.NOT_BOUND, group=ref.group_name or ref.uuid, desktop=group["name"])

    try:
        return await run_batch(req, [{"uuid": g.uuid, "name": g.group_name, "ref": g} for g in body.groups],
                               lambda item: unbind(item["ref"]))
    finally:
        core.extensions[BROKER].forget()


async def with_user_counts(core: Any, bindings: list[dict]) -> list[dict]:
    """``user_num`` and ``disable_num`` of each bound user group; the group's current name."""
    groups = sorted({b["group_uuid"] for b in bindings})
    users = core.store.collection(USERS)
    totals = await users.count_by("group", {"group": {"$in": groups}})
    disabled = await users.count_by("group", {"group": {"$in": groups}, "enabled": False})
    names = {g["uuid"]: g["name"] for g in await core.store.collection(USER_GROUPS).find({"uuid": {"$in": groups}},
                                                                                       projection=["uuid", "name"])}
    return [{"uuid": b["uuid"], "group_uuid": b["group_uuid"], "group_name": names.get(b["group_uuid"], b.get("group_name")),
             "user_num": totals.get(b["group_uuid"], 0), "disable_num": disabled.get(b["group_uuid"], 0)} for b in bindings]


async def list_bindings(req: ApiRequest) -> Any:
    """``?desktop=<group>`` lists one group's bindings (the contract's use); like every list it takes
    the generic search, and without ``desktop`` it lists every binding."""
    return await paged_search(req, req.core.store.collection(RANDOM_BINDINGS), SEARCH_FIELDS, sort=[("id", 1)],
                              decorate=lambda bs: with_user_counts(req.core, bs), resource=BINDING)


ACTIONS = {
    "add_group": Action(add_group, "Bind user groups to a random desktop group (per-item results)", BindGroups,
                        "绑定用户组到随机桌面组"),
    "delete_group": Action(delete_group, "Remove bindings of a random desktop group (per-item results)", UnbindGroups,
                           "移除随机桌面组的用户组绑定"),
}


def register_routes(router: Router) -> None:
    router.actions(BASE + "/", ACTIONS, tags=TAGS)
    router.endpoint("GET", BASE + "/", summary="Query a random group's bound user groups, paged, with user counts "
                    "(?desktop=<group uuid>)", tags=TAGS, search_fields=SEARCH_FIELDS)(list_bindings)
