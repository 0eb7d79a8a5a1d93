"""User groups: create, edit, delete (batch), paged query with user counts and users (contract #99-#102)."""
from __future__ import annotations

from typing import Any

from twisted.internet import defer

from kvmdesk.api.router import ApiRequest, Router
from kvmdesk.core import errors, group_names
from kvmdesk.core.errors import ApiError
from kvmdesk.core.jobs import run_batch
from kvmdesk.core.paging import paged_search
from kvmdesk.core.records import new_record, now_text
from kvmdesk.core.store import DuplicateKeyError
from kvmdesk.plugins.users import codes
from kvmdesk.plugins.users.accounts import (
    GROUP,
    GROUP_KIND,
    GROUP_SEARCH_FIELDS,
    GROUP_TYPE,
    GROUPS,
    USERS,
    group_or_404,
    public_user,
)
from kvmdesk.plugins.users.models import GroupCreate, GroupDelete, GroupEdit

BASE = "/personal/group"
TAGS = ("user_groups",)
_HOLDERS = {GROUP_KIND: ("用户分组", "user group"), "teaching_group": ("教学分组", "teaching group")}


def name_taken(exc: group_names.NameTaken) -> ApiError:
    zh, en = _HOLDERS.get(exc.kind or "", ("其他分组", "group"))
    return ApiError(codes.GROUP_NAME_TAKEN, name=exc.name, holder=zh, holder_en=en)


async def with_users(core: Any, groups: list[dict]) -> list[dict]:
    """Add ``user_num``, ``enable_num``, ``disable_num``, ``name_with_num`` and ``users`` to each group.

    A group lists at most ``[users] group_users_limit`` users (``users_truncated`` says when there are
    more); the complete list is the paged ``GET /personal/user/?group=<uuid>``.
    """
    users = core.store.collection(USERS)
    uuids = [g["uuid"] for g in groups]
    limit = int(core.config.get("users.group_users_limit", 1000))
    totals, enabled = await defer.gatherResults([
        defer.ensureDeferred(users.count_by("group", {"group": {"$in": uuids}})),
        defer.ensureDeferred(users.count_by("group", {"group": {"$in": uuids}, "enabled": True})),
    ])
    members = await defer.gatherResults([
        defer.ensureDeferred(users.find({"group": uuid}, sort=[("id", 1)], limit=limit + 1)) for uuid in uuids
    ])
    shown = []
    for group, found in zip(groups, members):
        total = totals.get(group["uuid"], 0)
        on = enabled.get(group["uuid"], 0)
        shown.append({
            **group,
            "user_num": total,
            "enable_num": on,
            "disable_num": total - on,
            "name_with_num": f"{group['name']}({total})",
            "users": [public_user(u) for u in found[:limit]],
            "users_truncated": len(found) > limit,
        })
    return shown


def register_routes(router: Router) -> None:
    @router.endpoint("POST", BASE, summary="Create a user group (name unique among all groups)", body=GroupCreate,
                     tags=TAGS, oplog="新增用户分组")
    async def create_group(req: ApiRequest) -> dict:
        body: GroupCreate = req.body
        record = new_record(req.core.clock, name=body.name, desc=body.desc, group_type=GROUP_TYPE)
        store = req.core.store
        try:
            await group_names.claim(store, body.name, GROUP_KIND, record["uuid"])
        except group_names.NameTaken as exc:
            raise name_taken(exc) from None
        try:
            created = await store.collection(GROUPS).insert_one(record)
        except BaseException:
            await group_names.release(store, body.name, record["uuid"])
            raise
        await req.core.created(GROUP_KIND, created)
        return (await with_users(req.core, [created]))[0]

    @router.endpoint("PUT", BASE, summary="Edit a user group (name, desc)", body=GroupEdit, tags=TAGS,
                     oplog="修改用户分组")
    async def edit_group(req: ApiRequest) -> dict:
        body: GroupEdit = req.body
        store = req.core.store
        group = await group_or_404(req.core, body.uuid)
        req.oplog_detail = group["name"] if group["name"] == body.value.name else f"{group['name']} -> {body.value.name}"
        changes: dict[str, Any] = {"name": body.value.name, "updated_at": now_text(req.core.clock)}
        if body.value.desc is not None:
            changes["desc"] = body.value.desc
        renamed = body.value.name != group["name"]
        if renamed:
            try:
                await group_names.claim(store, body.value.name, GROUP_KIND, group["uuid"])
            except group_names.NameTaken as exc:
                raise name_taken(exc) from None
        try:
            updated = await store.collection(GROUPS).find_one_and_update({"uuid": group["uuid"]}, {"$set": changes})
        except BaseException as exc:
            if renamed:
                await group_names.release(store, body.value.name, group["uuid"])
            if isinstance(exc, DuplicateKeyError):
                raise ApiError(errors.ALREADY_EXISTS, resource=GROUP, key=body.value.name) from None
            raise
        if updated is None:
            if renamed:
                await group_names.release(store, body.value.name, group["uuid"])
            raise ApiError(errors.NOT_FOUND, resource=GROUP, key=group["uuid"])
        if renamed:
            await group_names.release(store, group["name"], group["uuid"])
        await req.core.updated(GROUP_KIND, updated, changes)
        return (await with_users(req.core, [updated]))[0]

    @router.endpoint("DELETE", BASE, summary="Delete user groups (batch); a group that has users is refused",
                     body=GroupDelete, tags=TAGS, oplog="删除用户分组")
    async def delete_groups(req: ApiRequest) -> dict:
        store = req.core.store

        async def delete_one(ref: dict) -> None:
            group = await group_or_404(req.core, ref["uuid"])
            count = await store.collection(USERS).count({"group": group["uuid"]})
            if count:
                raise ApiError(codes.GROUP_HAS_USERS, name=group["name"], count=count)
            await req.core.refuse_if_used(GROUP_KIND, group["uuid"], GROUP.named(group['name']))
            await store.collection(GROUPS).delete_one({"uuid": group["uuid"]})
            await group_names.release(store, group["name"], group["uuid"])
            await req.core.deleted(GROUP_KIND, group)

        refs = list({g.uuid: {"uuid": g.uuid, "name": g.name} for g in req.body.groups}.values())
        req.oplog_detail = ", ".join(r["name"] or r["uuid"] for r in refs[:10])
        return await run_batch(req, refs, delete_one)

    @router.endpoint("GET", BASE, summary="Query user groups, paged, with user counts and users", tags=TAGS,
                     search_fields=GROUP_SEARCH_FIELDS)
    async def list_groups(req: ApiRequest) -> Any:
        return await paged_search(req, req.core.store.collection(GROUPS), GROUP_SEARCH_FIELDS, sort=[("id", 1)],
                                  decorate=lambda groups: with_users(req.core, groups), resource=GROUP)
