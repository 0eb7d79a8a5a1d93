"""Storage roles and file digests, the same on the controller and on the agent."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

#: Contract storage roles: 1 template system disks, 2 template data disks, 3 desktop system disks,
#: 4 desktop data disks.  The keys are those of ``[agent.storage]`` and of the node detail views.
STORAGE_ROLES = {"template_sys": 1, "template_data": 2, "instance_sys": 3, "instance_data": 4}


def hash_file(path: Path, algorithm: str) -> Any:
    """The ``hashlib`` object (``md5``, ``sha256``) of the whole file at ``path``.  Blocking: use a thread.

    The controller and the agents hash files with it (a version the host seals, a file a node received):
    the same function, so two digests can only differ when the bytes do.
    """
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, algorithm)
