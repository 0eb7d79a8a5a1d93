"""Private data directories: the store (every agent's secret, every password hash), enrolment secrets,
access logs and uploads are for the service's user only.

Both services set :data:`PRIVATE_UMASK` when they start (new files 0600, new directories 0700), and
:func:`restrict_tree` brings what an older version left (0644 files, a 0755 directory) to the same modes.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

PRIVATE_UMASK = 0o077
DIR_MODE = 0o700
FILE_MODE = 0o600


def private_umask() -> int:
    """Set the umask of this process to :data:`PRIVATE_UMASK`; returns the previous one."""
    return os.umask(PRIVATE_UMASK)


def restrict_tree(root: Path) -> int:
    """Directories under ``root`` (and ``root``) 0700, files 0600; symbolic links are not followed.

    :returns: how many modes were changed.
    """
    changed = 0
    for directory, subdirs, files in os.walk(root):
        for path, wanted in [(directory, DIR_MODE), *((os.path.join(directory, f), FILE_MODE) for f in files)]:
            try:
                info = os.lstat(path)
            except FileNotFoundError:
                continue  # removed meanwhile (a temporary file)
            if stat.S_ISLNK(info.st_mode) or stat.S_IMODE(info.st_mode) == wanted:
                continue
            if stat.S_ISDIR(info.st_mode) or stat.S_ISREG(info.st_mode):
                os.chmod(path, wanted)
                changed += 1
    return changed


#: Directories on the path to disk images: QEMU runs as another user (``libvirt-qemu``) and must reach
#: the images by path; it needs no listing, and nobody else gets one.
REACHABLE_DIR_MODE = 0o711


def reachable_dirs(directory: Path) -> None:
    """``mkdir -p directory``, each directory it creates :data:`REACHABLE_DIR_MODE` whatever the umask
    (the agent's private umask would make them 0700, and QEMU could not open the disks below)."""
    missing = []
    parent = Path(directory)
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    Path(directory).mkdir(parents=True, exist_ok=True)
    for created in missing:
        os.chmod(created, REACHABLE_DIR_MODE)
