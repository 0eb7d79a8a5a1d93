"""The broker: which desktops a desktop user may use, and giving them one.

- A static user gets the desktop bound to them (``desktops.user_uuid``).
- A random user gets a free desktop of a random group bound to their user group: one atomic
  ``find_one_and_update`` claims it (``holder: None`` -> the user), so two users never get the same
  desktop whatever the concurrency; running desktops are preferred (no boot).  The claims of
  concurrent requests go to the store together (:class:`.group_commit.GroupCommit`: one writer
  transaction for a burst instead of one each), each still atomic.  A user who already
  holds a desktop gets it again.  The desktop is held for the user's portal session until it logs out
  or idles out (:class:`IdleReleaser`).
- A desktop that is off is started through the teaching desktops' power module (admission per node,
  restore first in restore groups); if that fails the claim is released and the user told why.
- A group in maintenance gives nobody a desktop; administrators still work on it.
"""
from __future__ import annotations

from typing import Any, Optional

import attrs
from twisted.internet import defer
from twisted.logger import Logger

from kvmdesk.core.errors import ApiError
from kvmdesk.core.records import now_text
from kvmdesk.core.periodic import PeriodicService
from kvmdesk.plugins.desktops import power, schema
from kvmdesk.plugins.desktops.domain_ops import restores
from kvmdesk.plugins.desktops.group_commit import GroupCommit
from kvmdesk.plugins.desktops import personal_codes as codes
from kvmdesk.plugins.desktops.personal_schema import PERSONAL_GROUPS, RANDOM, RANDOM_BINDINGS, STATIC
from kvmdesk.plugins.desktops.portal_auth import EXTENSION as AUTH

log = Logger(namespace="kvmdesk.desktops.broker")
HOLD_FIELDS = ("holder", "holder_session", "held_at")
#: Desktop states a claim may take (an ``error`` desktop would fail its user).
CLAIMABLE = ("active", "inactive")
#: Seconds the broker trusts the random groups it read for a user group.
GROUPS_TTL = 2.0
#: The holder of a released restore desktop while it is being restored.
RESTORING = "(restoring)"


async def random_groups(core: Any, user: dict) -> list[dict]:
    """The random groups bound to the user's group."""
    if not user.get("group"):
        return []
    bound = await core.store.collection(RANDOM_BINDINGS).find({"group_uuid": user["group"]}, projection=["desktop"])
    if not bound:
        return []
    return await core.store.collection(PERSONAL_GROUPS).find(
        {"uuid": {"$in": sorted({b["desktop"] for b in bound})}, "desktop_type": RANDOM}, sort=[("name", 1)])


async def static_desktops(core: Any, user: dict) -> list[dict]:
    return await core.store.collection(schema.DESKTOPS).find({"user_uuid": user["uuid"]}, sort=[("name", 1)])


async def groups_by_uuid(core: Any, uuids: set[str]) -> dict[str, dict]:
    if not uuids:
        return {}
    found = await core.store.collection(PERSONAL_GROUPS).find({"uuid": {"$in": sorted(uuids)}})
    return {g["uuid"]: g for g in found}


def names(groups: list[dict]) -> str:
    return ", ".join(g["name"] for g in groups)


@attrs.define(eq=False)
class Broker:
    core: Any
    #: One request per user at a time: a user's second concurrent request waits and gets the same desktop.
    _locks: dict[str, defer.DeferredLock] = attrs.field(factory=dict)
    #: The random groups of each user group, for ``GROUPS_TTL`` seconds: a login rush reads them once.
    #: Changes made here (bindings, maintenance) call :meth:`forget`; another controller's within the TTL.
    _groups: dict[str, tuple[list[dict], float]] = attrs.field(factory=dict)
    #: Restores of released desktops in progress.
    restoring: set[defer.Deferred] = attrs.field(factory=set)
    #: The claims of concurrent requests, written together (one writer transaction per batch).
    _claims: GroupCommit = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._claims = GroupCommit(lambda claims: self.desktops.find_one_and_update_each(claims))

    async def random_groups(self, user: dict) -> list[dict]:
        now = self.core.clock.seconds()
        cached = self._groups.get(user.get("group") or "")
        if cached is not None and cached[1] > now:
            return cached[0]
        found = await random_groups(self.core, user)
        self._groups[user.get("group") or ""] = (found, now + GROUPS_TTL)
        return found

    def forget(self) -> None:
        """Bindings or groups changed: read them again at the next request."""
        self._groups.clear()

    @property
    def desktops(self) -> Any:
        return self.core.store.collection(schema.DESKTOPS)

    async def available(self, user: dict) -> dict[str, Any]:
        """What the user may use: their static desktops and their random groups (free count, maintenance,
        the desktop they hold there)."""
        statics = await static_desktops(self.core, user)
        owners = await groups_by_uuid(self.core, {d["desktop_uuid"] for d in statics})
        randoms = await random_groups(self.core, user)
        shown_randoms = []
        for group in randoms:
            free = await self.desktops.count({"desktop_uuid": group["uuid"], "holder": None, "status": {"$in": list(CLAIMABLE)}})
            held = await self.desktops.find_one({"desktop_uuid": group["uuid"], "holder": user["uuid"]})
            shown_randoms.append({"desktop_uuid": group["uuid"], "desktop_name": group["name"], "desktop_type": RANDOM,
                                  "maintenance": bool(group.get("maintenance")), "free": free,
                                  "held": desktop_view(held) if held else None})
        shown_statics = [{"desktop_uuid": d["desktop_uuid"], "desktop_name": owners.get(d["desktop_uuid"], {}).get("name"),
                          "desktop_type": STATIC, "maintenance": bool(owners.get(d["desktop_uuid"], {}).get("maintenance")),
                          "instance": desktop_view(d)} for d in statics]
        return {"static": shown_statics, "random": shown_randoms}

    async def assign(self, user: dict, group_uuid: Optional[str] = None) -> dict:
        """A desktop for ``user`` (of ``group_uuid`` if given), running; see the module's description.

        :raises ApiError: no group for the user (404), the group not theirs (403), maintenance or none
            free (409), the start failed (502; the claim released).
        """
        lock = self._locks.setdefault(user["uuid"], defer.DeferredLock())
        await lock.acquire()
        try:
            desktop, group = await self._choose(user, group_uuid)
            return await self._running(user, desktop, group)
        finally:
            lock.release()
            if not lock.locked and not lock.waiting:
                self._locks.pop(user["uuid"], None)

    async def _choose(self, user: dict, group_uuid: Optional[str]) -> tuple[dict, dict]:
        # One query for both: the desktops bound to the user and the one they hold.
        mine = await self.desktops.find({"$or": [{"user_uuid": user["uuid"]}, {"holder": user["uuid"]}]}, sort=[("name", 1)])
        statics = [d for d in mine if d.get("user_uuid") == user["uuid"]]
        randoms = await self.random_groups(user)
        owners = await groups_by_uuid(self.core, {d["desktop_uuid"] for d in statics})
        groups = randoms + [g for g in owners.values() if g not in randoms]
        if not groups:
            raise ApiError(codes.NO_DESKTOP_GROUP, user=user["user_name"])
        if group_uuid is not None:
            groups = [g for g in groups if g["uuid"] == group_uuid]
            if not groups:
                raise ApiError(codes.GROUP_NOT_BOUND, group=group_uuid, user=user["user_name"])
        usable = [g for g in groups if not g.get("maintenance")]
        if not usable:
            raise ApiError(codes.IN_MAINTENANCE, groups=names(groups))
        static = next((d for d in statics if d["desktop_uuid"] in {g["uuid"] for g in usable}), None)
        if static is not None:
            return static, owners[static["desktop_uuid"]]
        random_usable = [g for g in usable if g.get("desktop_type") == RANDOM]
        by_uuid = {g["uuid"]: g for g in random_usable}
        held = next((d for d in mine if d.get("holder") == user["uuid"] and d["desktop_uuid"] in by_uuid), None)
        if held is not None:
            return held, by_uuid[held["desktop_uuid"]]
        claimed = await self._claims.submit((
            {"desktop_uuid": {"$in": list(by_uuid)}, "holder": None, "status": {"$in": list(CLAIMABLE)}},
            {"$set": {"holder": user["uuid"], "holder_session": user.get("session"), "held_at": now_text(self.core.clock),
                      "user_name": user["user_name"]}},
            [("status", 1), ("name", 1)]))  # "active" sorts first: a running desktop needs no boot
        if claimed is None:
            raise ApiError(codes.NONE_FREE, groups=names(random_usable))
        return claimed, by_uuid[claimed["desktop_uuid"]]

    async def _running(self, user: dict, desktop: dict, group: dict) -> dict:
        if desktop.get("status") == "active":
            return desktop
        ctx = await power.Context.load(self.core, group, [desktop["node"]])
        try:
            await power.start(ctx, desktop)
        except ApiError as exc:
            if desktop.get("holder") == user["uuid"]:
                await self.release({"uuid": desktop["uuid"], "holder": user["uuid"]})
            raise ApiError(codes.DESKTOP_START_FAILED, data={"code": exc.error.code}, name=desktop["name"],
                           reason=exc.message("en")) from None
        return desktop

    async def release(self, filter: dict) -> int:
        """Free the random desktops matching ``filter`` (held ones only); returns how many.

        A running desktop of a restore group is restored first (off, fresh overlays, on: the power
        module's reboot) so the next user never sees the last one's data; until that is done it is
        held by :data:`RESTORING`, and if it fails the desktop is left in ``error``, which no claim takes.
        """
        held = await self.desktops.find({"$and": [filter, {"holder": {"$ne": None}}]})
        if not held:
            return 0
        groups = await groups_by_uuid(self.core, {d["desktop_uuid"] for d in held})
        dirty = [d for d in held if d.get("status") == "active" and restores(groups.get(d["desktop_uuid"], {}))]
        clean = [d["uuid"] for d in held if d not in dirty]
        if clean:
            await self.desktops.update_many({"uuid": {"$in": clean}, "holder": {"$ne": None}},
                                            {"$set": {**dict.fromkeys(HOLD_FIELDS), "user_name": ""}})
        for desktop in dirty:
            await self.desktops.update_one({"uuid": desktop["uuid"]}, {"$set": {
                "holder": RESTORING, "holder_session": None, "user_name": ""}})
            work = defer.ensureDeferred(self._restore(groups[desktop["desktop_uuid"]], desktop))
            self.restoring.add(work)
            work.addBoth(lambda result, work=work: (self.restoring.discard(work), result)[1])
        return len(held)

    async def _restore(self, group: dict, desktop: dict) -> None:
        try:
            ctx = await power.Context.load(self.core, group, [desktop["node"]])
            await power.reboot(ctx, desktop)
        except ApiError as exc:
            log.warn("desktop {name} could not be restored after its user left: {why}", name=desktop["name"],
                     why=exc.message("en"))
            # Not given to anyone until an administrator has seen to it (the next user would get the
            # last one's disk).
            await self.desktops.update_one({"uuid": desktop["uuid"]}, {"$set": {
                "status": "error", "message": "not restored after its user left: " + exc.message("en")}})
        except Exception:
            log.failure("desktop {name}: restore after release failed", name=desktop["name"])
        finally:
            await self.desktops.update_one({"uuid": desktop["uuid"], "holder": RESTORING},
                                           {"$set": dict.fromkeys(HOLD_FIELDS)})

    async def settled(self) -> None:
        """Wait for the restores in progress (tests, shutdown)."""
        await defer.gatherResults(list(self.restoring), consumeErrors=True)

    async def logout(self, user: dict) -> int:
        """End the user's portal session and free what it held."""
        await self.core.extensions[AUTH].end(user["session"])
        return await self.release({"holder_session": user["session"]})


def desktop_view(desktop: dict) -> dict:
    """What a desktop user sees of a desktop (no node secrets)."""
    return {k: desktop.get(k) for k in ("uuid", "name", "desktop_uuid", "ipaddr", "status", "up_time", "held_at")}


@attrs.define(eq=False)
class IdleReleaser(PeriodicService):
    """Every ``interval`` seconds: ends the portal sessions idle for ``[desktops.portal] idle_timeout``
    (or expired) and frees the desktops they held.  A failed round is logged; the next one runs."""

    what = "an idle-session round"
    at_start = False

    async def sweep(self) -> int:
        auth, broker = self.core.extensions[AUTH], self.core.extensions[EXTENSION]
        freed = 0
        for session in await auth.ended_sessions():
            await auth.end(session)
            freed += await broker.release({"holder_session": session})
        if freed:
            log.info("freed {count} desktops of idle desktop users", count=freed)
        return freed


EXTENSION = "desktops.broker"
