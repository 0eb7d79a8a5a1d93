"""Batch operations on many users at once, answered like :func:`kvmdesk.core.jobs.run_batch`.

``run_batch`` runs one store operation per item; for thousands of users that is thousands of write
transactions.  Here the users are looked up and changed with a few ``$in`` queries instead, and the
answer has the same shape: ``{"success_num", "failed_num", "failures"}``, or, for a single item that
failed, that item's error itself.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from kvmdesk.core import errors
from kvmdesk.core.errors import ApiError
from kvmdesk.core.jobs import BatchProgress
from kvmdesk.plugins.users import codes
from kvmdesk.plugins.users.accounts import USER, USER_KIND, USERS, chunks, find_by

if TYPE_CHECKING:  # pragma: no cover
    from kvmdesk.api.router import ApiRequest

Failure = tuple[dict[str, Any], ApiError]


def batch_answer(req: "ApiRequest", total: int, failures: Sequence[Failure]) -> dict[str, Any]:
    """The per-item result of a batch of ``total`` items.

    :raises ApiError: the batch had one item and it failed.
    """
    if total == 1 and failures:
        raise failures[0][1]
    return {
        "success_num": total - len(failures),
        "failed_num": len(failures),
        "failures": [{**who, "code": exc.error.code, "msg": exc.message(req.lang)} for who, exc in failures],
    }


def check_batch_size(req: "ApiRequest", count: int) -> None:
    if count == 0:
        raise ApiError(errors.BATCH_EMPTY)
    limit = int(req.core.config.get("users.max_batch", 10000))
    if count > limit:
        raise ApiError(codes.BATCH_TOO_LARGE, limit=limit)


async def resolve_users(req: "ApiRequest", refs: Sequence[Any], projection: Sequence[str]) -> tuple[list[dict], list[Failure]]:
    """Look up the users a batch names (by uuid, duplicates merged).

    :returns: the users found, in request order, and a "not found" failure for each missing one.
    """
    wanted: dict[str, Any] = {}
    for ref in refs:
        wanted.setdefault(ref.uuid, ref)
    check_batch_size(req, len(wanted))
    fields = list(dict.fromkeys(["uuid", "user_name", *projection]))
    by_uuid = {u["uuid"]: u for u in await find_by(req.core, USERS, "uuid", list(wanted), fields)}
    found = [by_uuid[uuid] for uuid in wanted if uuid in by_uuid]
    missing = [
        ({"uuid": uuid, "user_name": ref.user_name}, ApiError(errors.NOT_FOUND, resource=USER, key=ref.user_name or uuid))
        for uuid, ref in wanted.items()
        if uuid not in by_uuid
    ]
    return found, missing


async def update_users(req: "ApiRequest", found: Sequence[dict[str, Any]], changes: dict[str, Any]) -> None:
    """``$set`` the same ``changes`` on every user of ``found``, a bounded chunk per write.

    Plugins hear ``kvmdesk_updated("user")`` for each, with the fields :func:`resolve_users` read plus
    the changes (not the whole record: a batch of 10,000 is not read back).
    """
    users = req.core.store.collection(USERS)
    tracker = BatchProgress(req, len(found))
    await tracker.begin()
    for part in chunks(list(found)):
        await users.update_many({"uuid": {"$in": [u["uuid"] for u in part]}}, {"$set": changes})
        for user in part:
            await req.core.updated(USER_KIND, {**user, **changes}, changes)
        await tracker.advance(len(part))


async def delete_users(req: "ApiRequest", found: Sequence[dict[str, Any]]) -> None:
    """Delete the users of ``found``; plugins hear ``kvmdesk_deleted("user")`` with the fields read."""
    users = req.core.store.collection(USERS)
    tracker = BatchProgress(req, len(found))
    await tracker.begin()
    for part in chunks(list(found)):
        await users.delete_many({"uuid": {"$in": [u["uuid"] for u in part]}})
        for user in part:
            await req.core.deleted(USER_KIND, user)
        await tracker.advance(len(part))


def describe_users(users: Sequence[dict[str, Any]], limit: int = 10) -> str:
    """A short operation-log description: the first user names and how many more."""
    names = ", ".join(str(u.get("user_name") or u.get("uuid")) for u in users[:limit])
    return names + (f" ... ({len(users)})" if len(users) > limit else "")
