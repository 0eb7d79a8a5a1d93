"""Administrators, login tokens and login throttling.

Tokens are random (256 bits), given to the client once and stored only as their SHA-256, with an
expiry.  Verified tokens are cached in memory for a short time so that the hot path of every API
call costs one dictionary lookup; a logout drops the cache entry at once.
"""
from __future__ import annotations

import hashlib
import math
import os
import secrets
from collections import defaultdict, deque
from pathlib import Path
from typing import Any, Callable, Optional

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from kvmdesk.core import errors
from kvmdesk.core.errors import ApiError
from kvmdesk.core.logtext import escaped
from kvmdesk.core.passwords import DUMMY_HASH, hash_password, verify_password
from kvmdesk.core.records import new_record
from kvmdesk.core.store import Index, Store

log = Logger(namespace="kvmdesk.auth")

ADMINS = "admins"
TOKENS = "tokens"
FIRST_ADMIN = "admin"
PASSWORD_FILE = "initial-admin-password"
#: Seconds a verified token is trusted from memory before the store is asked again.
CACHE_SECONDS = 30.0

INDEXES = [Index(ADMINS, ["username"], unique=True), Index(TOKENS, ["token_hash"], unique=True), Index(TOKENS, ["expires_at"])]


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def public_admin(admin: dict[str, Any]) -> dict[str, Any]:
    """An administrator record as the API may show it (never the hash)."""
    return {k: v for k, v in admin.items() if k != "password_hash"}


class Throttle:
    """Refuses logins for a (user name, address) for ``lockout`` seconds after ``max_failures``
    failures within ``window`` seconds.

    The lockout runs from the failure that triggered it (not from the oldest failure counted).
    """

    def __init__(self, clock: IReactorTime, max_failures: int, window: float, lockout: float):
        self.clock = clock
        self.max_failures = max_failures
        self.window = window
        self.lockout = lockout
        self._failures: dict[tuple[str, str], deque[float]] = defaultdict(deque)
        self._locked_until: dict[tuple[str, str], float] = {}

    def _recent(self, key: tuple[str, str]) -> deque[float]:
        times = self._failures[key]
        horizon = self.clock.seconds() - self.window
        while times and times[0] <= horizon:
            times.popleft()
        return times

    def check(self, key: tuple[str, str]) -> None:
        """:raises ApiError: this key is locked out; says for how long."""
        until = self._locked_until.get(key)
        if until is None:
            return
        remaining = until - self.clock.seconds()
        if remaining > 0:
            raise ApiError(errors.LOGIN_THROTTLED, seconds=math.ceil(remaining))
        del self._locked_until[key]

    def failed(self, key: tuple[str, str]) -> bool:
        """Count a failure; returns ``True`` when it locks ``key`` out."""
        times = self._recent(key)
        times.append(self.clock.seconds())
        if len(times) >= self.max_failures:
            self._locked_until[key] = self.clock.seconds() + self.lockout
            del self._failures[key]
            return True
        return False

    def succeeded(self, key: tuple[str, str]) -> None:
        self._failures.pop(key, None)
        self._locked_until.pop(key, None)


#: Why a login was refused (the ``reason`` of ``kvmdesk_login_refused``).
BAD_CREDENTIALS, DISABLED, LOCKED = "bad_credentials", "disabled", "locked"


class Authenticator:
    """Logs administrators in and checks the token of every request.

    :ivar refused_logins: logins refused since start (any reason), a metric for monitoring.
    :ivar lockouts: lockouts started since start (a user name and address locked for ``lockout`` s).
    :ivar on_refused: called with ``(username, address, reason)`` for every refused login (the core
        calls the ``kvmdesk_login_refused`` hook from it).
    """

    def __init__(self, store: Store, clock: IReactorTime, config: Any):
        self.store = store
        self.clock = clock
        self.ttl = float(config.get("auth.token_ttl", 43200))
        self.throttle = Throttle(
            clock,
            int(config.get("auth.max_failures", 5)),
            float(config.get("auth.failure_window", 300)),
            float(config.get("auth.lockout", 300)),
        )
        self._cache: dict[str, tuple[dict[str, Any], float]] = {}
        self.refused_logins = 0
        self.lockouts = 0
        self.on_refused: Optional[Callable[[str, str, str], None]] = None

    async def ensure_first_admin(self, data_dir: Path, password: Optional[str] = None) -> None:
        """Create ``admin`` on first start, with ``password``, ``KVMDESK_ADMIN_PASSWORD`` or a random password.

        A random password is logged once and written to ``<data_dir>/initial-admin-password``
        (readable by its owner only).

        :param password: the password to give (``[auth] first_admin_password``; tests set it).
        """
        admins = self.store.collection(ADMINS)
        if await admins.count() > 0:
            return
        source = "[auth] first_admin_password" if password else "KVMDESK_ADMIN_PASSWORD"
        password = password or os.environ.get("KVMDESK_ADMIN_PASSWORD", "")
        generated = not password
        if generated:
            password = secrets.token_urlsafe(12)
        record = new_record(self.clock, username=FIRST_ADMIN, password_hash=await hash_password(password), enabled=True)
        await admins.insert_one(record)
        if generated:
            path = Path(data_dir) / PASSWORD_FILE
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(password + "\n")
            log.warn(
                "Created administrator 'admin' with password {password} (also in {path}; "
                "set KVMDESK_ADMIN_PASSWORD before the first start to choose it)",
                password=password,
                path=str(path),
            )
        else:
            log.info("Created administrator 'admin' with the password from {source}", source=source)

    async def login(self, username: str, password: str, client_ip: str) -> dict[str, Any]:
        """Check the credentials and issue a token.

        :returns: ``{"token", "expires_at", "username"}``.
        :raises ApiError: wrong credentials (401) or too many failures (429).
        """
        key = (username, client_ip)
        try:
            self.throttle.check(key)
        except ApiError:
            self._refused(username, client_ip, LOCKED)
            raise
        admin = await self.store.collection(ADMINS).find_one({"username": username})
        ok = await verify_password(admin["password_hash"] if admin else DUMMY_HASH, password)
        if not (ok and admin and admin.get("enabled", True)):
            locked = self.throttle.failed(key)
            self._refused(username, client_ip, DISABLED if ok and admin else BAD_CREDENTIALS)
            if locked:
                self.lockouts += 1
                log.warn("login locked out for '{username}' from {ip} for {seconds:g} s after {count} failures",
                         username=escaped(username), ip=client_ip, seconds=self.throttle.lockout,
                         count=self.throttle.max_failures)
            raise ApiError(errors.LOGIN_FAILED)
        self.throttle.succeeded(key)
        now = self.clock.seconds()
        await self.store.collection(TOKENS).delete_many({"expires_at": {"$lt": now}})
        token = secrets.token_urlsafe(32)
        expires = now + self.ttl
        digest = _digest(token)
        await self.store.collection(TOKENS).insert_one(
            {"token_hash": digest, "admin_uuid": admin["uuid"], "expires_at": expires, "client_ip": client_ip}
        )
        # Trusted from memory at once: the first call with the new token needs no store round trip
        # (and a streamed upload is then authenticated before twisted.web answers "100 Continue").
        self._cache[digest] = (public_admin(admin), min(expires, now + CACHE_SECONDS))
        return {"token": token, "expires_at": expires, "username": admin["username"]}

    def _refused(self, username: str, client_ip: str, reason: str) -> None:
        """Log (the user name escaped, never the password), count, and tell the plugins."""
        self.refused_logins += 1
        explained = {BAD_CREDENTIALS: "wrong user name or password", DISABLED: "account disabled",
                     LOCKED: "locked out"}[reason]
        log.warn("refused login for '{username}' from {ip}: {why}", username=escaped(username), ip=client_ip,
                 why=explained)
        if self.on_refused is not None:
            try:
                self.on_refused(username, client_ip, reason)
            except Exception:
                log.failure("a kvmdesk_login_refused implementation failed")

    @staticmethod
    def _token(header: Optional[bytes]) -> Optional[str]:
        if not header:
            return None
        scheme, _, value = header.decode("latin-1").partition(" ")
        value = value.strip()
        return value if scheme.lower() == "bearer" and value else None

    async def authenticate(self, header: Optional[bytes]) -> dict[str, Any]:
        """Return the administrator behind an ``Authorization: Bearer`` header.

        :raises ApiError: 401 when the token is missing, unknown or expired.
        """
        token = self._token(header)
        if token is None:
            raise ApiError(errors.UNAUTHENTICATED)
        digest = _digest(token)
        now = self.clock.seconds()
        cached = self._cache.get(digest)
        if cached is not None and cached[1] > now:
            return cached[0]
        record = await self.store.collection(TOKENS).find_one({"token_hash": digest, "expires_at": {"$gt": now}})
        admin = await self.store.collection(ADMINS).find_one({"uuid": record["admin_uuid"]}) if record else None
        if admin is None or not admin.get("enabled", True):
            self._cache.pop(digest, None)
            raise ApiError(errors.UNAUTHENTICATED)
        admin = public_admin(admin)
        self._cache[digest] = (admin, min(record["expires_at"], now + CACHE_SECONDS))
        if len(self._cache) > 10000:
            self._cache = {k: v for k, v in self._cache.items() if v[1] > now}
        return admin

    async def logout(self, header: Optional[bytes]) -> None:
        """Revoke the token of this request."""
        token = self._token(header)
        if token is not None:
            digest = _digest(token)
            self._cache.pop(digest, None)
            await self.store.collection(TOKENS).delete_many({"token_hash": digest})
