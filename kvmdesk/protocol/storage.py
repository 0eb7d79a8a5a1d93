"""Storage roles and file checksums, the same on the controller and on the agent."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Optional

#: Contract storage roles: 1 template system disks, 2 template data disks, 3 desktop system disks,
#: 4 desktop data disks.  The keys are those of ``[agent.storage]`` and of the node detail views.
STORAGE_ROLES = {"template_sys": 1, "template_data": 2, "instance_sys": 3, "instance_data": 4}

HASH_BLOCK = 1 << 20


def md5_file(path: Path, limit: Optional[int] = None) -> Any:
    """MD5 object of the first ``limit`` bytes of ``path`` (all of it by default).  Blocking: use a thread.

    The controller checksums a file it publishes with it, the agent a file it received: the same function,
    so the two digests can only differ when the bytes do.
    """
    hasher = hashlib.md5()
    remaining = limit
    with open(path, "rb") as handle:
        while remaining is None or remaining > 0:
            block = handle.read(HASH_BLOCK if remaining is None else min(HASH_BLOCK, remaining))
            if not block:
                break
            hasher.update(block)
            if remaining is not None:
                remaining -= len(block)
    return hasher
