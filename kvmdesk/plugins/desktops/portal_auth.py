"""Desktop users' sessions: login with the user's own name and password, tokens that only the portal
accepts, logout, and the idle end of a session.

The passwords are the Argon2id hashes the users plugin keeps (``users.password_hash``); a disabled user
is refused; failed logins lock a (user name, address) out exactly as for administrators
(:class:`kvmdesk.core.auth.Throttle`, the same ``[auth]`` settings).  Tokens are stored as their
SHA-256 in their own collection: the administrators' authenticator never finds them, so no
administrator endpoint accepts a user token, and this one never finds an administrator's.
"""
from __future__ import annotations

import hashlib
import secrets
from typing import Any, Optional

import attrs
from twisted.logger import Logger

from kvmdesk.core import errors
from kvmdesk.core.auth import CACHE_SECONDS, Throttle
from kvmdesk.core.errors import ApiError
from kvmdesk.core.passwords import DUMMY_HASH, verify_password
from kvmdesk.plugins.desktops.group_commit import GroupCommit
from kvmdesk.plugins.desktops.personal_schema import USER_SESSIONS, USERS

log = Logger(namespace="kvmdesk.desktops.portal")
EXTENSION = "desktops.portal_auth"


def digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def bearer(header: Optional[bytes]) -> Optional[str]:
    if not header:
        return None
    scheme, _, value = header.decode("latin-1").partition(" ")
    value = value.strip()
    return value if scheme.lower() == "bearer" and value else None


@attrs.define(eq=False)
class DesktopUserAuth:
    """Logs desktop users in and checks their tokens.

    :param ttl: seconds a token lives at most; :param idle: seconds without a request that end a session.
    """

    core: Any
    ttl: float
    idle: float
    throttle: Throttle
    _cache: dict[str, tuple[dict, float]] = attrs.field(factory=dict)
    #: Sessions seen, marked so together (one store write for a burst of requests, not one each).
    _touches: GroupCommit = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._touches = GroupCommit(self._touch)

    async def _touch(self, sessions: list[str]) -> list[None]:
        await self.sessions.update_many({"token_hash": {"$in": sessions}}, {"$set": {"seen_at": self.core.clock.seconds()}})
        return [None] * len(sessions)

    @classmethod
    def from_config(cls, core: Any) -> "DesktopUserAuth":
        config = core.config
        throttle = Throttle(core.clock, int(config.get("auth.max_failures", 5)), float(config.get("auth.failure_window", 300)),
                            float(config.get("auth.lockout", 300)))
        return cls(core, float(config.get("desktops.portal.token_ttl", 43200)),
                   float(config.get("desktops.portal.idle_timeout", 1800)), throttle)

    @property
    def sessions(self) -> Any:
        return self.core.store.collection(USER_SESSIONS)

    async def login(self, user_name: str, password: str, client_ip: str) -> dict[str, Any]:
        """:returns: ``{"token", "expires_at", "user_name"}``.
        :raises ApiError: wrong credentials or a disabled user (401), too many failures (429)."""
        key = (user_name, client_ip)
        self.throttle.check(key)
        user = await self.core.store.collection(USERS).find_one({"user_name": user_name})
        hashed = (user or {}).get("password_hash") or DUMMY_HASH
        ok = await verify_password(hashed, password)
        if not (ok and user and user.get("enabled", True) and not user.get("deleted")):
            self.throttle.failed(key)
            log.warn("failed desktop user login for {user!r} from {ip}", user=user_name, ip=client_ip)
            raise ApiError(errors.LOGIN_FAILED)
        self.throttle.succeeded(key)
        now = self.core.clock.seconds()
        token = secrets.token_urlsafe(32)
        hashed_token = digest(token)
        expires = now + self.ttl
        await self.sessions.insert_one({"token_hash": hashed_token, "user_uuid": user["uuid"], "user_name": user["user_name"],
                                        "expires_at": expires, "seen_at": now, "client_ip": client_ip})
        self._cache[hashed_token] = (self._session_user(user, hashed_token), min(expires, now + CACHE_SECONDS))
        return {"token": token, "expires_at": expires, "user_name": user["user_name"]}

    @staticmethod
    def _session_user(user: dict, session: str) -> dict:
        return {"uuid": user["uuid"], "user_name": user["user_name"], "group": user.get("group"), "session": session}

    async def authenticate(self, header: Optional[bytes]) -> dict[str, Any]:
        """The desktop user behind ``Authorization: Bearer``: ``{"uuid", "user_name", "group", "session"}``.

        A session is marked seen when its cache entry is renewed (every ``CACHE_SECONDS`` at most):
        the idle timeout counts from there.
        :raises ApiError: 401 for a missing, unknown, expired or idle token, or a user disabled since.
        """
        token = bearer(header)
        if token is None:
            raise ApiError(errors.UNAUTHENTICATED)
        hashed = digest(token)
        now = self.core.clock.seconds()
        cached = self._cache.get(hashed)
        if cached is not None and cached[1] > now:
            return cached[0]
        session = await self.sessions.find_one({"token_hash": hashed, "expires_at": {"$gt": now},
                                                "seen_at": {"$gt": now - self.idle}})
        user = await self.core.store.collection(USERS).find_one({"uuid": session["user_uuid"]}) if session else None
        if user is None or not user.get("enabled", True) or user.get("deleted"):
            self._cache.pop(hashed, None)
            raise ApiError(errors.UNAUTHENTICATED)
        await self._touches.submit(hashed)
        shown = self._session_user(user, hashed)
        self._cache[hashed] = (shown, min(session["expires_at"], now + CACHE_SECONDS))
        if len(self._cache) > 10000:
            self._cache = {k: v for k, v in self._cache.items() if v[1] > now}
        return shown

    async def end(self, session: str) -> None:
        """End one session (logout, idle): its token stops working at once."""
        self._cache.pop(session, None)
        await self.sessions.delete_many({"token_hash": session})

    async def ended_sessions(self) -> list[str]:
        """The sessions idle for ``idle`` seconds or past their expiry (not yet ended)."""
        now = self.core.clock.seconds()
        found = await self.sessions.find({"$or": [{"seen_at": {"$lte": now - self.idle}}, {"expires_at": {"$lte": now}}]},
                                         projection=["token_hash"])
        return [s["token_hash"] for s in found]
