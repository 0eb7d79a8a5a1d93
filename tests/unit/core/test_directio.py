"""Direct I/O writing (kvmdesk.core.directio) on a real filesystem, through the HashingWriter that uses it."""
from __future__ import annotations

import errno
import fcntl
import hashlib
import os

import pytest
import pytest_twisted
from twisted.internet import reactor

from kvmdesk.core import directio
from kvmdesk.core.directio import ALIGN, DirectWriter, open_for_stream
from kvmdesk.core.filewriter import HashingWriter

NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_TRUNC


def is_direct(fd: int) -> bool:
    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)


def uneven_chunks(total: int) -> list[bytes]:
    """Random chunks of sizes that fall across buffer and block boundaries."""
    sizes, left, i = [], total, 0
    while left:
        size = min(left, (1, 4095, 4097, 9000, 20_000, 65_536)[i % 6])
        sizes.append(size)
        left -= size
        i += 1
    return [os.urandom(size) for size in sizes]


@pytest.mark.parametrize("threaded", [False, True])
@pytest.mark.parametrize("total", [0, 5, ALIGN, 3 * 16_384 + 17, 200_001])
@pytest_twisted.ensureDeferred
async def test_a_direct_file_holds_exactly_the_bytes_written(tmp_path, monkeypatch, threaded, total):
    monkeypatch.setattr(directio, "BUFFER", 16_384)  # many buffer turns in a small file
    path = tmp_path / "image"
    fd, direct = open_for_stream(path, NEW_FILE, 0o600, direct=True)
    assert direct and is_direct(fd)
    writer = HashingWriter(fd, reactor=reactor, threaded=threaded, direct=True)
    chunks = uneven_chunks(total)
    for chunk in chunks:
        writer.write(chunk)
    await writer.flush(fsync=True)
    assert not is_direct(fd)  # the tail is written; later writes would be ordinary ones
    writer.write(b"more")
    await writer.flush()
    os.close(fd)
    whole = b"".join(chunks) + b"more"
    assert path.stat().st_size == len(whole) and path.read_bytes() == whole
    assert writer.hexdigest() == hashlib.md5(whole).hexdigest() and writer.written == len(whole)


def test_direct_writes_fall_back_when_the_filesystem_refuses_them(tmp_path):
    # A descriptor at an unaligned offset is one a direct write is refused on (EINVAL), as on a
    # filesystem that accepts O_DIRECT at open but cannot do it.
    path = tmp_path / "image"
    fd = os.open(path, NEW_FILE, 0o600)
    os.write(fd, b"head")
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_DIRECT)
    sink = DirectWriter(fd, size=ALIGN)
    body = os.urandom(3 * ALIGN + 100)
    sink.write(body)
    assert not sink.direct and not is_direct(fd)
    sink.write(b"tail")
    sink.finish()
    os.close(fd)
    assert path.read_bytes() == b"head" + body + b"tail"


def test_open_for_stream_falls_back_when_open_refuses_direct_io(tmp_path, monkeypatch):
    # tmpfs refused O_DIRECT at open before Linux 6.6; this kernel's does not, so os.open refuses here.
    real_open = os.open

    def refusing_open(path, flags, mode=0o777, *, dir_fd=None):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, mode, dir_fd=dir_fd)

    monkeypatch.setattr(directio.os, "open", refusing_open)
    fd, direct = open_for_stream(tmp_path / "image", NEW_FILE, 0o600, direct=True)
    assert not direct and not is_direct(fd)
    os.close(fd)
    fd, direct = open_for_stream(tmp_path / "plain", NEW_FILE, 0o600, direct=False)
    assert not direct
    os.close(fd)
