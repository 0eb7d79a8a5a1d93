"""Fields every stored record carries: ``uuid``, ``created_at``, ``updated_at``, ``deleted``, ``deleted_at``."""
from __future__ import annotations

import time
import uuid as uuidlib
from typing import Any, Iterable, Mapping

from twisted.internet.interfaces import IReactorTime

TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
#: Fields no hook, log line or answer may carry (agent secrets, password hashes).
SECRET_FIELDS = frozenset({"agent_secret", "password_hash", "password", "passwd", "secret", "vnc_password"})


def format_time(seconds: float) -> str:
    """The contract's timestamp format, in the controller's local time."""
    return time.strftime(TIME_FORMAT, time.localtime(seconds))


def now_text(clock: IReactorTime) -> str:
    return format_time(clock.seconds())


def new_record(clock: IReactorTime, **fields: Any) -> dict[str, Any]:
    """A new record with a fresh uuid and timestamps; records are deleted for real, so ``deleted`` is 0."""
    stamp = now_text(clock)
    record = {"uuid": str(uuidlib.uuid4()), "created_at": stamp, "updated_at": stamp, "deleted": 0, "deleted_at": None}
    record.update(fields)
    return record


def without(doc: Mapping[str, Any], hidden: Iterable[str]) -> dict[str, Any]:
    """A copy of ``doc`` without the ``hidden`` fields (secrets, internal bookkeeping)."""
    hidden = set(hidden)
    return {k: v for k, v in doc.items() if k not in hidden}
