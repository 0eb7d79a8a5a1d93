"""Direct I/O (kvmdesk.core.directio) on a real filesystem: writing, through the HashingWriter that uses it,
and reading ranges."""
from __future__ import annotations

import errno
import fcntl
import hashlib
import os

import pytest
import pytest_twisted
from twisted.internet import reactor

from kvmdesk.core import directio
from kvmdesk.core.directio import ALIGN, DirectWriter, RangeReader, enable_direct, open_for_stream
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


def test_enable_direct_switches_a_new_file_and_reports_a_refusal(tmp_path, monkeypatch):
    fd = os.open(tmp_path / "upload", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        assert not is_direct(fd)
        assert enable_direct(fd) is True and is_direct(fd)
    finally:
        os.close(fd)

    real_fcntl = directio.fcntl.fcntl

    def refusing(fd, command, *args):
        if command == fcntl.F_SETFL and args and args[0] & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_fcntl(fd, command, *args)

    monkeypatch.setattr(directio.fcntl, "fcntl", refusing)
    fd = os.open(tmp_path / "other", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        assert enable_direct(fd) is False and not is_direct(fd)
    finally:
        os.close(fd)


@pytest.mark.parametrize("direct", [True, False])
def test_range_reader_returns_any_range_exactly(tmp_path, direct):
    content = os.urandom(5 * ALIGN + 123)
    path = tmp_path / "image"
    path.write_bytes(content)
    reader = RangeReader(path, direct=direct)
    try:
        assert reader.direct is direct and is_direct(reader.fd) is direct
        ranges = [(0, ALIGN), (1, 10), (ALIGN - 1, 2), (ALIGN + 7, 3 * ALIGN), (0, len(content)),
                  (len(content) - 5, 5), (len(content) - 5, ALIGN)]  # the last one runs past the end
        for offset, size in ranges:
            assert reader.read(offset, size) == content[offset:offset + size], (offset, size)
        assert reader.read(len(content), ALIGN) == b""
        assert reader.read(len(content) + 3 * ALIGN, 10) == b""
        assert reader.direct is direct  # every direct read was accepted
    finally:
        reader.close()


def test_range_reader_reads_through_the_page_cache_when_a_direct_read_is_refused(tmp_path, monkeypatch):
    content = os.urandom(3 * ALIGN + 5)
    path = tmp_path / "image"
    path.write_bytes(content)
    real_preadv = directio.os.preadv

    def refusing_preadv(fd, buffers, offset):
        if is_direct(fd):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(directio.os, "preadv", refusing_preadv)
    reader = RangeReader(path, direct=True)
    try:
        assert reader.direct
        assert reader.read(ALIGN + 1, 2 * ALIGN) == content[ALIGN + 1:3 * ALIGN + 1]
        assert not reader.direct and not is_direct(reader.fd)
        assert reader.read(0, len(content)) == content
    finally:
        reader.close()


def test_range_reader_opens_through_the_page_cache_where_open_refuses_direct_io(tmp_path, monkeypatch):
    path = tmp_path / "image"
    path.write_bytes(b"abc" * 5000)
    real_open = directio.os.open

    def refusing_open(path, flags, mode=0o777):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, mode)

    monkeypatch.setattr(directio.os, "open", refusing_open)
    reader = RangeReader(path, direct=True)
    try:
        assert not reader.direct and not is_direct(reader.fd)
        assert reader.read(4094, 6) == (b"abc" * 5000)[4094:4100]
    finally:
        reader.close()
