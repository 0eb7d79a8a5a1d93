"""Stored users and user groups: collections, indexes, the public view of a record, password checks."""
from __future__ import annotations

from typing import Any, Iterable, Optional, Sequence

from twisted.logger import Logger

from kvmdesk.core import errors, group_names
from kvmdesk.core.errors import ApiError, Resource
from kvmdesk.core.passwords import DUMMY_HASH, HASHER, hash_password, verify_password
from kvmdesk.core.records import now_text
from kvmdesk.core.store import Index

log = Logger(namespace="kvmdesk.users")

USERS = "users"
GROUPS = "user_groups"
#: The kind of group in the shared name registry (:mod:`kvmdesk.core.group_names`).
GROUP_KIND = "user_group"
#: The kind other plugins see in the lifecycle hooks.
USER_KIND = "user"
#: The contract's ``group_type`` of a user group (1 is a teaching group).
GROUP_TYPE = 2
USER = Resource("用户", "user")
GROUP = Resource("用户分组", "user group")

INDEXES = [
    Index(USERS, ["uuid"], unique=True),
    Index(USERS, ["user_name"], unique=True),
    # Paging a group's users in id order walks this index; the pair below makes the counts covering.
    Index(USERS, ["group"]),
    Index(USERS, ["group", "enabled"]),
    Index(GROUPS, ["uuid"], unique=True),
    Index(GROUPS, ["name"], unique=True),
    *group_names.INDEXES,
]

#: What the API shows of a user: a whitelist, so the password hash can never leak by omission.
PUBLIC_USER_FIELDS = (
    "id", "uuid", "user_name", "name", "phone", "email", "enabled", "group",
    "created_at", "updated_at", "deleted", "deleted_at",
)
USER_SEARCH_FIELDS = {"uuid": str, "user_name": str, "name": str, "phone": str, "email": str, "enabled": bool, "group": str}
GROUP_SEARCH_FIELDS = {"uuid": str, "name": str, "desc": str, "group_type": int}

#: Bound of the ``$in`` lists sent to the store in one query.
CHUNK = 500


def public_user(user: dict[str, Any]) -> dict[str, Any]:
    """A user record as the API may show it (never ``password_hash``)."""
    return {k: user.get(k) for k in PUBLIC_USER_FIELDS}


def chunks(items: Sequence[Any], size: int = CHUNK) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


async def group_or_404(core: Any, uuid: str) -> dict[str, Any]:
    group = await core.store.collection(GROUPS).find_one({"uuid": uuid})
    if group is None:
        raise ApiError(errors.NOT_FOUND, resource=GROUP, key=uuid)
    return group


async def user_or_404(core: Any, uuid: str) -> dict[str, Any]:
    user = await core.store.collection(USERS).find_one({"uuid": uuid})
    if user is None:
        raise ApiError(errors.NOT_FOUND, resource=USER, key=uuid)
    return user


async def find_by(core: Any, collection: str, field: str, values: Sequence[Any], projection: Sequence[str]) -> list[dict]:
    """The documents whose ``field`` is one of ``values``, in bounded ``$in`` queries."""
    found: list[dict] = []
    for part in chunks(list(values)):
        found.extend(await core.store.collection(collection).find({field: {"$in": list(part)}}, projection=projection))
    return found


async def verify_user_password(core: Any, user_name: str, password: str) -> Optional[dict[str, Any]]:
    """Check a desktop user's credentials (for the desktop-login flow); the hash runs off the reactor.

    The answer takes as long for an unknown user as for a known one (a dummy hash is verified).
    A disabled user, or one without a password (imported without one), never verifies.
    A hash made with weaker parameters than today's is replaced after a successful check.

    :returns: the user's public record, or ``None``.
    """
    users = core.store.collection(USERS)
    user = await users.find_one({"user_name": user_name}) if isinstance(user_name, str) else None
    hashed = user.get("password_hash") if user else None
    ok = await verify_password(hashed or DUMMY_HASH, password if isinstance(password, str) else "")
    if not (ok and user and hashed and user.get("enabled")):
        return None
    if HASHER.check_needs_rehash(hashed):
        fresh = await hash_password(password)
        await users.update_one({"uuid": user["uuid"], "password_hash": hashed},
                               {"$set": {"password_hash": fresh, "updated_at": now_text(core.clock)}})
    return public_user(user)
