"""Password hashing with Argon2id, always off the reactor thread.

Parameters follow OWASP's Password Storage Cheat Sheet minimum for Argon2id: 19 MiB of memory,
2 iterations, 1 lane (about 20-30 ms a hash on one core here).  Hashes are self-describing PHC
strings, so stronger parameters later only need ``needs_rehash`` on the next successful login.
"""
from __future__ import annotations

import os
import threading
from typing import Optional

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

HASHER = PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1)

_pool: Optional[ThreadPool] = None
_lock = threading.Lock()


def _hash_pool() -> ThreadPool:
    """A pool as wide as the machine: argon2 releases the GIL, so more threads only queue."""
    global _pool
    with _lock:
        if _pool is None:
            from twisted.internet import reactor

            _pool = ThreadPool(1, max(1, os.cpu_count() or 1), name="kvmdesk-passwords")
            _pool.start()
            reactor.addSystemEventTrigger("during", "shutdown", _stop_pool)
        return _pool


def _stop_pool() -> None:
    global _pool
    with _lock:
        pool, _pool = _pool, None
    if pool is not None:
        pool.stop()


def _reactor():
    from twisted.internet import reactor

    return reactor


def hash_password(password: str) -> defer.Deferred:
    """Hash ``password`` in the hashing pool; fires with the PHC string."""
    return deferToThreadPool(_reactor(), _hash_pool(), HASHER.hash, password)


def hash_password_now(password: str) -> str:
    """Hash on the calling thread: only for code already off the reactor (bulk jobs in threads)."""
    return HASHER.hash(password)


def _verify(hashed: str, password: str) -> bool:
    try:
        return HASHER.verify(hashed, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def verify_password(hashed: str, password: str) -> defer.Deferred:
    """Check ``password`` against ``hashed`` in the hashing pool; fires with True or False."""
    return deferToThreadPool(_reactor(), _hash_pool(), _verify, hashed, password)


#: A hash of a random password, verified against when a user does not exist, so that the answer
#: takes as long as for a real user (no user-name probing by timing).
DUMMY_HASH = HASHER.hash(os.urandom(16).hex())
