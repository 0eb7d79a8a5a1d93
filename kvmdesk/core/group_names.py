"""One namespace of group names shared by every kind of group (user groups, teaching groups).

The contract requires a user group's name to differ from every teaching group's name.  The two kinds
belong to different plugins, so neither can enforce the rule with its own unique index.  Instead both
claim the name here first: the collection ``group_names`` has a unique index on ``name``, so a claim is
atomic against any concurrent claim from either side, on every store backend.

Protocol for a plugin that owns a kind of group (e.g. ``kind="user_group"`` or ``"teaching_group"``):

- declare :data:`INDEXES` in its ``kvmdesk_store_indexes`` (declaring it twice is harmless);
- create: :func:`claim` the name, then insert the group; if the insert fails, :func:`release` it;
- rename: :func:`claim` the new name, update the group, then :func:`release` the old one
  (release the new one instead if the update failed);
- delete: delete the group, then :func:`release` its name;
- at start-up, :func:`reconcile` the claims of its kind with its groups (repairs claims left behind
  by a crash between two of the steps above).
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

from kvmdesk.core.store import DuplicateKeyError, Index, Store

COLLECTION = "group_names"
INDEXES = [Index(COLLECTION, ["name"], unique=True), Index(COLLECTION, ["kind", "owner"])]


class NameTaken(Exception):
    """The name is already claimed.

    :param name: the name asked for.
    :param kind: the kind of group that holds it (``None`` if it vanished meanwhile).
    """

    def __init__(self, name: str, kind: Optional[str]):
        super().__init__(f"group name {name!r} is taken by a {kind or 'group'}")
        self.name = name
        self.kind = kind


async def claim(store: Store, name: str, kind: str, owner: str) -> None:
    """Reserve ``name`` for the group ``owner`` (its uuid) of ``kind``; idempotent for the same owner.

    :raises NameTaken: another group of any kind holds the name.
    """
    names = store.collection(COLLECTION)
    try:
        await names.insert_one({"name": name, "kind": kind, "owner": owner})
    except DuplicateKeyError:
        holder = await names.find_one({"name": name})
        if holder is not None and holder.get("owner") == owner and holder.get("kind") == kind:
            return
        raise NameTaken(name, holder.get("kind") if holder else None) from None


async def release(store: Store, name: str, owner: str) -> None:
    """Give ``name`` back, if ``owner`` holds it (never another group's claim)."""
    await store.collection(COLLECTION).delete_many({"name": name, "owner": owner})


async def holder(store: Store, name: str) -> Optional[dict[str, Any]]:
    """The claim on ``name`` (``{"name", "kind", "owner"}``), or ``None``."""
    return await store.collection(COLLECTION).find_one({"name": name})


async def reconcile(store: Store, kind: str, groups: Mapping[str, str]) -> list[str]:
    """Make the claims of ``kind`` match ``groups`` (``{owner uuid: name}``).

    Drops claims of groups that no longer exist or were renamed, and adds missing claims.

    :returns: the names that could not be claimed because another group holds them.
    """
    names = store.collection(COLLECTION)
    stale = [
        c for c in await names.find({"kind": kind}) if groups.get(c.get("owner")) != c.get("name")
    ]
    for c in stale:
        await names.delete_many({"name": c["name"], "owner": c.get("owner")})
    claimed = {(c["owner"], c["name"]) for c in await names.find({"kind": kind}, projection=["owner", "name"])}
    conflicts = []
    for owner, name in groups.items():
        if (owner, name) in claimed:
            continue
        try:
            await claim(store, name, kind, owner)
        except NameTaken:
            conflicts.append(name)
    return conflicts
