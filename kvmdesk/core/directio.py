"""Direct I/O for image files: written and read without passing through the page cache.

An image is gigabytes written once (an upload on the controller, a received copy on a node) and then
read once per node at most.  Through the page cache, every byte costs a copy into a freshly
allocated cache page (in a VM whose memory the host backs lazily, a fault on the host as well:
here 2.3-3.9 s of CPU per GiB once the host has taken back freed memory, against 0.3 s when it has
not), and pushes out pages that other work is using; the final ``fsync`` then waits for all of it.
With ``O_DIRECT`` the disk reads the bytes from, or writes them into, one aligned buffer of ours:
here 1 GiB took 0.1 s of CPU each way, writing at about 1 GB/s and reading at 480-680 MB/s.  (oVirt's
imageio writes uploads the same way.)

- :class:`DirectWriter`: an agent's received images (``[agent.images] direct_io``) and the
  controller's uploads (``[storage] direct_io``), both on by default;
- :class:`RangeReader`: the controller reading an image to send it to a node, direct with the same
  setting (an upload written past the page cache and read back through it pays the page allocations
  the write avoided: 269-275 MB/s to two agents, against 305 reading direct).

Measured with ``bench/transfer_bench.py`` (1 GiB, two agents, medians of 3 rounds), direct against
page cache on the controller (medians of each run): the upload ran at 438-510 MB/s direct in all
eight runs; through the page cache at 470-480 MB/s while the host still backed recently freed
memory, and at 258-387 MB/s once it had taken it back.  The distribution, with the transfers sharing
their reads (:class:`~kvmdesk.core.producers.SharedReads`; the disk reads at 600-700 MB/s
here and the agents write to the same disk), reached 340-380 MB/s direct and 405-434 MB/s from the
cache.

``O_DIRECT`` wants the buffer address, the length and the file offset aligned to the device's
block size (:data:`ALIGN` covers 512-byte and 4 KiB devices): chunks are gathered into an aligned
buffer of :data:`BUFFER` bytes, written whole; the tail is written padded to a block and the file
cut back to its length.  Filesystems without direct I/O refuse it at ``open`` (tmpfs before Linux
6.6) or at the first write; both fall back to ordinary writes.
"""
from __future__ import annotations

import errno
import fcntl
import mmap
import os

ALIGN = 4096
BUFFER = 4 << 20


def open_for_stream(path: os.PathLike | str, flags: int, mode: int, *, direct: bool) -> tuple[int, bool]:
    """``os.open`` for streaming a file in or out; with ``O_DIRECT`` when ``direct`` and the filesystem allows it.

    Not for ``O_EXCL``: a filesystem that refuses ``O_DIRECT`` may refuse it after creating the file.

    :returns: the descriptor, and whether it is in direct mode.
    """
    if direct:
        try:
            return os.open(path, flags | os.O_DIRECT, mode), True
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
    return os.open(path, flags, mode), False


def enable_direct(fd: int) -> bool:
    """Switch an open descriptor (say one created with ``O_EXCL``) to ``O_DIRECT``; ``False`` where the
    filesystem does not allow it (the descriptor is left as it was)."""
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_DIRECT)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        return False
    return True


def disable_direct(fd: int) -> None:
    """Switch a descriptor back to ordinary (page cache) reads and writes."""
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)


def write_all(fd: int, data: bytes | memoryview) -> None:
    """``os.write`` until every byte is written."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


class DirectWriter:
    """Writes a stream to a descriptor opened with ``O_DIRECT`` (at an aligned offset: a new file).

    Not thread-safe: one thread at a time calls :meth:`write` and :meth:`finish` (the writer's drain).
    After :meth:`finish` (or when the filesystem refuses a direct write) the descriptor is in
    ordinary mode and writes go straight through.
    """

    def __init__(self, fd: int, size: int | None = None):
        self.fd = fd
        self.size = size or BUFFER
        self.buffer: mmap.mmap | None = mmap.mmap(-1, self.size)  # page-aligned
        self.used = 0
        #: bytes accepted, and where the descriptor stood when they started
        self.length = 0
        self.start = os.lseek(fd, 0, os.SEEK_CUR)

    @property
    def direct(self) -> bool:
        return self.buffer is not None

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view and self.buffer is not None:
            taken = min(len(view), self.size - self.used)
            self.buffer[self.used:self.used + taken] = view[:taken]
            self.used += taken
            self.length += taken
            view = view[taken:]
            if self.used == self.size:
                self._write_buffer(self.size)
                self.used = 0
        if view:
            write_all(self.fd, view)
            self.length += len(view)

    def finish(self) -> None:
        """Write the tail (padded to a block, then the file is cut to its length); leave direct mode."""
        if self.buffer is None:
            return
        if self.used:
            padded = -(-self.used // ALIGN) * ALIGN
            self.buffer[self.used:padded] = bytes(padded - self.used)
            if self._write_buffer(padded):
                os.ftruncate(self.fd, self.start + self.length)
            self.used = 0
        if self.buffer is not None:
            self._leave_direct_mode(self.start + self.length)

    def _write_buffer(self, size: int) -> bool:
        """Write the buffer's first ``size`` bytes directly; ``False`` if the filesystem would not."""
        try:
            write_all(self.fd, memoryview(self.buffer)[:size])
            return True
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
        # The filesystem opened the file for direct I/O but will not do it: write normally.
        pending = bytes(self.buffer[:self.used])
        self._leave_direct_mode(self.start + self.length - self.used)
        write_all(self.fd, pending)
        return False

    def _leave_direct_mode(self, position: int) -> None:
        disable_direct(self.fd)
        os.lseek(self.fd, position, os.SEEK_SET)
        self.buffer.close()
        self.buffer = None


class RangeReader:
    """Reads ranges of a file, with ``O_DIRECT`` when asked and the filesystem allows it.

    A direct read covers the aligned blocks around the range, into an aligned buffer of ours, and the
    range is copied out of it.  Where the filesystem refuses direct reads (at ``open`` or at the first
    read) the file is read through the page cache.  One thread at a time calls :meth:`read`.
    """

    def __init__(self, path: os.PathLike | str, *, direct: bool):
        self.fd, self.direct = open_for_stream(path, os.O_RDONLY, 0, direct=direct)
        self.buffer: mmap.mmap | None = None
        found = os.fstat(self.fd)
        #: which file this is (a file replaced under the same name is another one)
        self.identity = (found.st_dev, found.st_ino, found.st_mtime_ns, found.st_size)

    def read(self, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes at ``offset`` (fewer only at the end of the file)."""
        if self.direct:
            try:
                return self._read_direct(offset, size)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                disable_direct(self.fd)
                self.direct = False
        return os.pread(self.fd, size, offset)

    def _read_direct(self, offset: int, size: int) -> bytes:
        start = offset - offset % ALIGN
        span = -(-(offset + size - start) // ALIGN) * ALIGN
        if self.buffer is None or len(self.buffer) < span:
            if self.buffer is not None:
                self.buffer.close()
            self.buffer = mmap.mmap(-1, span)  # page-aligned
        view = memoryview(self.buffer)
        try:
            got = os.preadv(self.fd, [view[:span]], start)
            return bytes(view[offset - start:max(offset - start, min(got, offset - start + size))])
        finally:
            view.release()

    def close(self) -> None:
        os.close(self.fd)
        if self.buffer is not None:
            self.buffer.close()
            self.buffer = None
