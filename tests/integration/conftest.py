"""The integration set's setup: a real libvirtd (with virtlogd) and QEMU.

A session fixture starts ``virtlogd -d`` and ``libvirtd -d`` when they are not running (after making
``/dev/kvm`` usable by the kvm group, as the Debian packages' udev rule would), and stops at the end
only the daemons it started, by their pids.  Without libvirtd, QEMU or qemu-img the tests are skipped
with the reason.
"""
from __future__ import annotations

import contextlib
import grp
import os
import select
import shutil
import signal
import socket
import subprocess
import uuid
from pathlib import Path
from typing import Iterator, Optional

import pytest

LIBVIRT_SOCKET = Path("/var/run/libvirt/libvirt-sock")
PIDFILES = {"virtlogd": Path("/run/virtlogd.pid"), "libvirtd": Path("/run/libvirtd.pid")}
IMAGES = Path("/var/lib/libvirt/images")


def _socket_answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def _daemon_running(name: str) -> bool:
    pidfile = PIDFILES[name]
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return False
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == name
    except OSError:
        return False


def _pid(name: str) -> Optional[int]:
    try:
        return int(PIDFILES[name].read_text().strip())
    except (OSError, ValueError):
        return None


def _stop(pid: int, timeout: float = 30.0) -> None:
    """SIGTERM ``pid`` and wait for it to exit (a pidfd: no polling)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        os.kill(pid, signal.SIGTERM)
        ready, _, _ = select.select([fd], [], [], timeout)
        if not ready:
            os.kill(pid, signal.SIGKILL)
            select.select([fd], [], [], timeout)
    finally:
        os.close(fd)


def _root_is_a_mount() -> bool:
    """True when this process's "/" is a mount point (not so in a chroot into a plain directory).

    ``os.path.ismount("/")`` is always true (there "/.." is "/"); mountinfo lists mounts as this
    process sees them, and a chroot into a directory has no mount at "/".
    """
    with open("/proc/self/mountinfo", encoding="utf-8") as handle:
        return any(line.split()[4] == "/" for line in handle if len(line.split()) > 4)


def _missing() -> Optional[str]:
    for tool in ("libvirtd", "virtlogd", "qemu-system-x86_64", "qemu-img"):
        if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists():
            return f"{tool} is not installed (apt install libvirt-daemon-system qemu-system-x86 qemu-utils)"
    if os.geteuid() != 0:
        return "the integration set starts libvirtd and must run as root"
    if not _root_is_a_mount():
        # libvirt gives each QEMU domain its own mount namespace, which needs "/" to be a mount point.
        return "the root filesystem is not a mount point (a chroot?): libvirt cannot start QEMU domains here"
    return None


@pytest.fixture(scope="session")
def libvirtd() -> Iterator[str]:
    """``qemu:///system`` with libvirtd and virtlogd running; yields the URI."""
    reason = _missing()
    if reason:
        pytest.skip(reason)
    started: list[int] = []
    if Path("/dev/kvm").exists():
        with contextlib.suppress(KeyError, OSError):
            os.chown("/dev/kvm", -1, grp.getgrnam("kvm").gr_gid)
            os.chmod("/dev/kvm", 0o660)
    try:
        for name in ("virtlogd", "libvirtd"):
            if name == "libvirtd" and _socket_answers(LIBVIRT_SOCKET):
                continue
            if _daemon_running(name):
                continue
            # -d: the daemon forks into the background once it is set up, so it answers on return.
            result = subprocess.run([shutil.which(name) or f"/usr/sbin/{name}", "-d"], capture_output=True, text=True,
                                    timeout=60)
            if result.returncode != 0:
                pytest.fail(f"{name} -d failed: {result.stderr.strip() or result.returncode}")
            pid = _pid(name)
            if pid is not None:
                started.append(pid)
        if not _socket_answers(LIBVIRT_SOCKET):
            pytest.fail(f"libvirtd started but {LIBVIRT_SOCKET} does not answer")
        yield "qemu:///system"
    finally:
        for pid in reversed(started):
            _stop(pid)


@pytest.fixture
def image_dir() -> Iterator[Path]:
    """A directory QEMU (running as libvirt-qemu) can reach, removed afterwards."""
    IMAGES.mkdir(parents=True, exist_ok=True)
    directory = IMAGES / f"kvmdesk-test-{uuid.uuid4().hex[:8]}"
    directory.mkdir(mode=0o755)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)
