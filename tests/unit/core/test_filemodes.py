"""File modes: the agent's private umask must not make disk-image directories unreachable for QEMU."""
from __future__ import annotations

import os
import stat

from kvmdesk.core.filemodes import PRIVATE_UMASK, REACHABLE_DIR_MODE, reachable_dirs


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_reachable_dirs_makes_what_is_missing_traversable_under_the_private_umask(tmp_path):
    existing = tmp_path / "storage"
    existing.mkdir(mode=0o750)
    os.chmod(existing, 0o750)
    previous = os.umask(PRIVATE_UMASK)
    try:
        reachable_dirs(existing / "instances" / "_instance")
        reachable_dirs(existing / "instances" / "_instance")  # again: nothing to do, no error
        with open(existing / "instances" / "_instance" / "disk", "w"):
            pass
    finally:
        os.umask(previous)
    assert mode(existing / "instances") == REACHABLE_DIR_MODE == 0o711
    assert mode(existing / "instances" / "_instance") == 0o711
    assert mode(existing) == 0o750  # what existed keeps its mode
    assert mode(existing / "instances" / "_instance" / "disk") == 0o600  # files stay private (libvirt labels disks)
