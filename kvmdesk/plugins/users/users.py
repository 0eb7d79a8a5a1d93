"""Users: create one or many, delete, update, enable, disable, move, paged query (contract #103-#109, #112).

Export (#110) and import (#111) live in :mod:`.exports` and :mod:`.imports`.
"""
from __future__ import annotations

from typing import Any

from kvmdesk.api.router import Action, ApiRequest, Router
from kvmdesk.core import errors
from kvmdesk.core.errors import ApiError
from kvmdesk.core.jobs import BatchProgress
from kvmdesk.core.paging import paged_search
from kvmdesk.core.passwords import hash_password
from kvmdesk.core.records import new_record, now_text
from kvmdesk.core.store import DuplicateKeyError
from kvmdesk.plugins.users import codes, exports
from kvmdesk.plugins.users.accounts import (
    USER,
    USER_KIND,
    USER_SEARCH_FIELDS,
    USERS,
    chunks,
    group_or_404,
    public_user,
    user_or_404,
)
from kvmdesk.plugins.users.batch import batch_answer, check_batch_size, delete_users, describe_users, resolve_users, update_users
from kvmdesk.plugins.users.models import MoveParam, MultiCreate, UserCreate, UsersParam, UserUpdate

BASE = "/personal/user"
TAGS = ("users",)
#: Users built and written per store transaction in bulk creation: keeps each reactor slice short.
INSERT_CHUNK = 1000


def user_record(core: Any, *, user_name: str, password_hash: str | None, group: str, enabled: bool,
                name: str = "", phone: str = "", email: str = "") -> dict[str, Any]:
    return new_record(core.clock, user_name=user_name, password_hash=password_hash, name=name, phone=phone,
                      email=email, enabled=enabled, group=group)


def numbered_names(prefix: str, digits: int, start: int, count: int) -> list[str]:
    """``prefix`` + the numbers ``start`` .. ``start+count-1`` zero-padded to ``digits`` digits.

    :raises ApiError: the last number needs more than ``digits`` digits.
    """
    last = start + count - 1
    if len(str(last)) > digits:
        raise ApiError(codes.POSTFIX_TOO_SHORT, postfix=digits, last=last)
    return [f"{prefix}{number:0{digits}d}" for number in range(start, last + 1)]


async def single_create(req: ApiRequest) -> dict:
    body: UserCreate = req.body
    req.oplog_detail = body.user_name
    await group_or_404(req.core, body.group_uuid)
    record = user_record(req.core, user_name=body.user_name, password_hash=await hash_password(body.passwd),
                         group=body.group_uuid, enabled=body.enabled, name=body.name, phone=body.phone, email=body.email)
    try:
        created = await req.core.store.collection(USERS).insert_one(record)
    except DuplicateKeyError:
        raise ApiError(errors.ALREADY_EXISTS, resource=USER, key=body.user_name) from None
    await req.core.created(USER_KIND, created)
    return public_user(created)


async def multi_create(req: ApiRequest) -> dict:
    """Create ``user_num`` numbered users; names that exist are failures, the others are created.

    The batch shares one password, so it is hashed once (one salt for the batch).
    """
    body: MultiCreate = req.body
    check_batch_size(req, body.user_num)
    names = numbered_names(body.prefix, body.postfix, body.postfix_start, body.user_num)
    req.oplog_detail = f"{names[0]} .. {names[-1]} ({len(names)})"
    await group_or_404(req.core, body.group_uuid)
    hashed = await hash_password(body.passwd)
    failures: list[dict] = []
    created = 0
    users = req.core.store.collection(USERS)
    tracker = BatchProgress(req, len(names))
    await tracker.begin()
    for part in chunks(names, INSERT_CHUNK):
        records = [user_record(req.core, user_name=n, password_hash=hashed, group=body.group_uuid, enabled=body.enabled)
                   for n in part]
        for name, outcome in zip(part, await users.insert_many(records)):
            if isinstance(outcome, DuplicateKeyError):
                exc = ApiError(errors.ALREADY_EXISTS, resource=USER, key=name)
                failures.append({"user_name": name, "code": exc.error.code, "msg": exc.message(req.lang)})
            else:
                created += 1
                await req.core.created(USER_KIND, outcome)
        await tracker.advance(len(part))
    return {"success_num": created, "failed_num": len(failures), "failures": failures}


async def set_enabled(req: ApiRequest, enabled: bool) -> dict:
    body: UsersParam = req.body
    found, failures = await resolve_users(req, body.users, ["enabled"])
    req.oplog_detail = describe_users(found or [f[0] for f in failures])
    await update_users(req, found, {"enabled": enabled, "updated_at": now_text(req.core.clock)})
    return batch_answer(req, len(found) + len(failures), failures)


async def enable(req: ApiRequest) -> dict:
    return await set_enabled(req, True)


async def disable(req: ApiRequest) -> dict:
    return await set_enabled(req, False)


async def move(req: ApiRequest) -> dict:
    body: MoveParam = req.body
    group = await group_or_404(req.core, body.group_uuid)
    found, failures = await resolve_users(req, body.users, ["group"])
    req.oplog_detail = f"{describe_users(found or [f[0] for f in failures])} -> {group['name']}"
    await update_users(req, found, {"group": group["uuid"], "updated_at": now_text(req.core.clock)})
    return batch_answer(req, len(found) + len(failures), failures)


ACTIONS = {
    "single_create": Action(single_create, "Create one user", UserCreate, "新增用户"),
    "multi_create": Action(multi_create, "Create numbered users in bulk (prefix + zero-padded number)", MultiCreate,
                           "批量新增用户"),
    "enable": Action(enable, "Enable users (batch)", UsersParam, "启用用户"),
    "disable": Action(disable, "Disable users (batch)", UsersParam, "禁用用户"),
    "move": Action(move, "Move users to another user group (batch)", MoveParam, "移动用户"),
    "export": exports.ACTION,
}


def register_routes(router: Router) -> None:
    router.actions(BASE + "/", ACTIONS, tags=TAGS)

    @router.endpoint("DELETE", BASE + "/", summary="Delete users (batch)", body=UsersParam, tags=TAGS, oplog="删除用户")
    async def delete(req: ApiRequest) -> dict:
        found, failures = await resolve_users(req, req.body.users, [])
        req.oplog_detail = describe_users(found or [f[0] for f in failures])
        await delete_users(req, found)
        return batch_answer(req, len(found) + len(failures), failures)

    @router.endpoint("PUT", BASE + "/", summary="Update a user (rename, move, details, password)", body=UserUpdate,
                     tags=TAGS, oplog="修改用户")
    async def update(req: ApiRequest) -> dict:
        body: UserUpdate = req.body
        value = body.value
        user = await user_or_404(req.core, body.uuid)
        req.oplog_detail = user["user_name"] if user["user_name"] == value.user_name else f"{user['user_name']} -> {value.user_name}"
        if value.group_uuid != user.get("group"):
            await group_or_404(req.core, value.group_uuid)
        changes: dict[str, Any] = {"user_name": value.user_name, "group": value.group_uuid}
        for field in ("name", "phone", "email", "enabled"):
            if getattr(value, field) is not None:
                changes[field] = getattr(value, field)
        if value.passwd:
            changes["password_hash"] = await hash_password(value.passwd)
        changes["updated_at"] = now_text(req.core.clock)
        try:
            updated = await req.core.store.collection(USERS).find_one_and_update({"uuid": user["uuid"]}, {"$set": changes})
        except DuplicateKeyError:
            raise ApiError(errors.ALREADY_EXISTS, resource=USER, key=value.user_name) from None
        if updated is None:
            raise ApiError(errors.NOT_FOUND, resource=USER, key=user["uuid"])
        await req.core.updated(USER_KIND, updated, changes)
        return public_user(updated)

    @router.endpoint("GET", BASE + "/", summary="Query users, paged (filter by group and any field)", tags=TAGS,
                     search_fields=USER_SEARCH_FIELDS)
    async def list_users(req: ApiRequest) -> Any:
        async def public(users: list[dict]) -> list[dict]:
            return [public_user(u) for u in users]

        return await paged_search(req, req.core.store.collection(USERS), USER_SEARCH_FIELDS, sort=[("id", 1)],
                                  decorate=public, resource=USER)
