"""File format checks: disk images through ``qemu-img info`` (a subprocess), ISO 9660 by its signature."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import orjson
from twisted.internet import defer, error, protocol

from kvmdesk.core.errors import ApiError
from kvmdesk.plugins.storage import errors

#: Disk image formats a base image may have.
IMAGE_FORMATS = ("qcow2", "raw")
#: The ISO 9660 primary volume descriptor's identifier, at byte 0x8001 of the image.
ISO_SIGNATURE = b"CD001"
ISO_SIGNATURE_OFFSET = 0x8001
ISO_MIN_SIZE = ISO_SIGNATURE_OFFSET + len(ISO_SIGNATURE)
SECTOR = 512
#: Signatures of files that qemu-img would call "raw" but are no disk: (offset, magic, what).
NOT_A_DISK = (
    (0, b"\x1f\x8b", "a gzip archive"),
    (0, b"PK\x03\x04", "a zip archive"),
    (0, b"\xfd7zXZ\x00", "an xz archive"),
    (0, b"BZh", "a bzip2 archive"),
    (0, b"\x28\xb5\x2f\xfd", "a zstd archive"),
    (0, b"7z\xbc\xaf\x27\x1c", "a 7z archive"),
    (0, b"Rar!\x1a\x07", "a rar archive"),
    (257, b"ustar", "a tar archive"),
    (0, b"\x7fELF", "an executable"),
    (0, b"%PDF-", "a PDF document"),
)
#: How much of the head decides "text": a disk's first sectors hold binary (boot code, zeros, tables).
TEXT_PROBE = 4096
QEMU_IMG_TIMEOUT = 60.0


class _Collect(protocol.ProcessProtocol):
    """Collects a subprocess's output, bounded (``qemu-img info`` prints a few hundred bytes)."""

    LIMIT = 1 << 20

    def __init__(self) -> None:
        self.out: list[bytes] = []
        self.err: list[bytes] = []
        self.size = 0
        self.done: defer.Deferred = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.size += len(data)
        if self.size <= self.LIMIT:
            self.out.append(data)

    def errReceived(self, data: bytes) -> None:
        if sum(map(len, self.err)) <= self.LIMIT:
            self.err.append(data)

    def processEnded(self, reason: Any) -> None:
        code = reason.value.exitCode if isinstance(reason.value, error.ProcessTerminated) else 0
        self.done.callback((code, b"".join(self.out), b"".join(self.err)))


async def qemu_img_info(path: Path, *, reactor: Any, qemu_img: str = "qemu-img", timeout: float = QEMU_IMG_TIMEOUT) -> dict:
    """``qemu-img info --output=json`` of ``path``, run asynchronously (never on the reactor thread).

    :raises ApiError: ``qemu-img`` is missing, timed out, or could not read the file.
    """
    collector = _Collect()
    try:
        transport = reactor.spawnProcess(
            collector, qemu_img, [qemu_img, "info", "--output=json", "--force-share", str(path)],
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"},
        )
    except OSError as exc:
        raise ApiError(errors.IMAGE_CHECK_FAILED, reason=f"{qemu_img}: {exc.strerror}") from None
    killer = reactor.callLater(timeout, lambda: transport.signalProcess("KILL"))
    code, out, err = await collector.done
    if killer.active():
        killer.cancel()
    else:
        raise ApiError(errors.IMAGE_CHECK_FAILED, reason=f"{qemu_img} took longer than {timeout:g} s")
    if code != 0:
        reason = err.decode("utf-8", "replace").strip().splitlines()
        raise ApiError(errors.NOT_AN_IMAGE, reason=reason[-1] if reason else f"qemu-img exit status {code}")
    try:
        return orjson.loads(out)
    except orjson.JSONDecodeError:
        raise ApiError(errors.IMAGE_CHECK_FAILED, reason="qemu-img printed no JSON") from None


def image_problem(info: dict, size: int, head: bytes) -> Optional[str]:
    """Why ``qemu-img info``'s answer (plus the file's size and first bytes) is not a usable base image.

    - only qcow2 and raw;
    - a qcow2 image must be self-contained: no backing file, no external data file (either would make
      the hypervisor open a path of the uploader's choosing on every node);
    - qemu-img calls anything it does not recognise "raw", so a raw image must at least be a whole
      number of 512-byte sectors and must not be an ISO (those belong in the ISO library), an archive
      (or another file with a known signature) or text.
    """
    fmt = info.get("format")
    if fmt not in IMAGE_FORMATS:
        return f"format {fmt!r} (only qcow2 and raw are accepted)"
    if fmt == "qcow2":
        if info.get("backing-filename") or info.get("full-backing-filename"):
            return "a qcow2 image with a backing file"
        data_file = (info.get("format-specific") or {}).get("data", {}).get("data-file")
        if data_file:
            return "a qcow2 image with an external data file"
        return None
    if size % SECTOR:
        return f"{size} bytes is not a whole number of {SECTOR}-byte sectors"
    if looks_like_iso(head):
        return "an ISO image (upload it to the ISO library)"
    for offset, magic, what in NOT_A_DISK:
        if head[offset : offset + len(magic)] == magic:
            return f"{what}, not a disk image"
    if looks_like_text(head[:TEXT_PROBE]):
        return "a text file, not a disk image"
    return None


def looks_like_text(sample: bytes) -> bool:
    """Whether bytes read as text: no NUL, valid UTF-8, and (almost) nothing but printable characters.

    An empty sample is not text (an all-zero disk has NULs anyway).
    """
    if not sample or b"\0" in sample:
        return False
    try:
        decoded = sample.decode("utf-8")
    except UnicodeDecodeError as exc:
        # a multi-byte character cut off at the end of the sample is still text
        if exc.start < len(sample) - 3:
            return False
        decoded = sample[: exc.start].decode("utf-8")
    control = sum(1 for c in decoded if not c.isprintable() and c not in "\t\r\n\f\v\x1b")
    return control <= len(decoded) // 100


def looks_like_iso(head: bytes) -> bool:
    """Whether the first bytes of a file (at least :data:`ISO_MIN_SIZE`) carry the ISO 9660 signature."""
    return head[ISO_SIGNATURE_OFFSET:ISO_MIN_SIZE] == ISO_SIGNATURE


async def check_base_image(path: Path, size: int, head: bytes, *, reactor: Any, qemu_img: str = "qemu-img") -> dict:
    """Check an uploaded base image; returns ``{"format", "virtual_size"}``.

    :raises ApiError: not a usable image.
    """
    info = await qemu_img_info(path, reactor=reactor, qemu_img=qemu_img)
    problem = image_problem(info, size, head)
    if problem:
        raise ApiError(errors.NOT_AN_IMAGE, reason=problem)
    return {"format": info["format"], "virtual_size": info.get("virtual-size")}
