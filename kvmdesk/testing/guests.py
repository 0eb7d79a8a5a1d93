"""Tiny real guests for real-KVM tests and benches: a disk whose first sector is the whole program."""
from __future__ import annotations

import subprocess
from pathlib import Path

#: cli; hlt; jmp back to the hlt: boots and then idles without using the CPU
HALTING_BOOT_SECTOR = bytes.fromhex("faf4ebfd")


def boot_sector_disk(path: Path, code: bytes = HALTING_BOOT_SECTOR, size: int = 1024 * 1024) -> Path:
    """A qcow2 at ``path`` of ``size`` bytes whose boot sector is ``code`` (at most 510 bytes) and the
    BIOS signature; the BIOS loads it at 0x7c00 and jumps to it."""
    if len(code) > 510:
        raise ValueError(f"a boot sector holds 510 bytes of code, not {len(code)}")
    raw = path.with_suffix(".raw")
    raw.write_bytes(code.ljust(510, b"\0") + b"\x55\xaa" + bytes(size - 512))
    try:
        subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(path)], check=True, timeout=60)
    finally:
        raw.unlink(missing_ok=True)
    return path
