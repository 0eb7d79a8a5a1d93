"""Writing a stream of chunks to a file while computing its MD5, for uploads and image transfers.

Used by the controller's upload sinks and by the agent's image receiver.  Two strategies (the product
uses the threaded one unless ``[storage] hash_in_thread`` / ``[agent.images] hash_in_thread`` say no):

- ``threaded=False``: each chunk is written and hashed on the reactor thread as it arrives.
  MD5 runs at about 600-700 MB/s and a page-cache write of a 64 KiB-1 MiB chunk takes tens of
  microseconds, so a chunk costs well under a millisecond; ``bench/transfer_bench.py --hash-in-thread``
  measures both strategies side by side.
- ``threaded=True``: chunks are queued in batches (order kept, one batch in flight), written by one
  worker thread while another hashes them; hashlib and ``os.write`` release the GIL, so hashing,
  writing and the reactor's socket reads overlap.  When more than
  :data:`HIGH_WATER` bytes wait, ``pause()`` stops reading from the network until the queue drains
  below :data:`LOW_WATER`, so a slow disk never makes the queue grow without bound.

``write_behind=True`` (for a file that will be fsynced when complete) asks the kernel to start
writing the file to disk after every :data:`WRITE_BEHIND` bytes (``sync_file_range``), so the disk
works while the rest still arrives and the final ``fsync`` finds almost nothing left to write: for a
1 GiB upload here it went from about 0.5 s to a few milliseconds.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import os
from collections import deque
from typing import Any, Callable, Optional

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool

HIGH_WATER = 16 << 20
LOW_WATER = 4 << 20
WRITE_BEHIND = 8 << 20

_SYNC_FILE_RANGE_WRITE = 2


def _sync_file_range() -> Optional[Callable[..., int]]:
    # Not in the os module; glibc has it on Linux (where else it is missing, write-behind is skipped).
    try:
        function = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_sync_file_range_call = _sync_file_range()


def start_writeback(fd: int) -> None:
    """Start (without waiting for) writing ``fd``'s dirty pages to disk; only a hint, so it never fails."""
    if _sync_file_range_call is not None:
        _sync_file_range_call(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


class HashingWriter:
    """Appends chunks to an open file descriptor and hashes them (MD5).

    :param fd: a file descriptor open for writing (the writer does not close it).
    :param hasher: an MD5 object to continue (a resumed transfer), or ``None`` for a fresh one;
        pass ``hashing=False`` to skip hashing entirely.
    :param threaded: write and hash on a worker thread (see the module docstring).
    :param pause: stop the producer of the chunks (network back-pressure); ``resume`` restarts it.
    :param write_behind: start writing to disk as the file grows (see the module docstring).
    """

    def __init__(
        self,
        fd: int,
        *,
        reactor: Any,
        hasher: Any = None,
        hashing: bool = True,
        threaded: bool = False,
        pause: Optional[Callable[[], None]] = None,
        resume: Optional[Callable[[], None]] = None,
        write_behind: bool = False,
    ):
        self.fd = fd
        self.reactor = reactor
        self.hasher = (hasher if hasher is not None else hashlib.md5()) if hashing else None
        self.threaded = threaded
        self._pause = pause or (lambda: None)
        self._resume = resume or (lambda: None)
        self.write_behind = write_behind
        self._unsynced = 0
        self.written = 0
        self.error: Optional[BaseException] = None
        self._queue: deque[bytes] = deque()
        self._queued = 0
        self._busy = False
        self._paused = False
        self._idle: list[defer.Deferred] = []

    def write(self, data: bytes) -> None:
        """Write one chunk (raises the first ``OSError`` of the inline strategy at once)."""
        if self.error is not None:
            raise self.error
        if not self.threaded:
            _write_all(self.fd, data)
            if self.hasher is not None:
                self.hasher.update(data)
            self.written += len(data)
            self._wrote(len(data))
            return
        self._queue.append(data)
        self._queued += len(data)
        if self._queued > HIGH_WATER and not self._paused:
            self._paused = True
            self._pause()
        if not self._busy:
            self._next_batch()

    def _next_batch(self) -> None:
        batch = list(self._queue)
        self._queue.clear()
        self._busy = True
        # Writing and hashing each take a thread of their own: both release the GIL, so on two
        # cores the batch costs the longer of the two (MD5), not their sum.
        pool = self.reactor.getThreadPool()
        work = [deferToThreadPool(self.reactor, pool, self._write_batch, batch)]
        if self.hasher is not None:
            work.append(deferToThreadPool(self.reactor, pool, self._hash_batch, batch))
        d = defer.gatherResults(work, consumeErrors=True)
        d.addCallbacks(self._batch_done, self._batch_failed, callbackArgs=(batch,))

    def _write_batch(self, batch: list[bytes]) -> None:
        for data in batch:
            _write_all(self.fd, data)
        self._wrote(sum(map(len, batch)))

    def _wrote(self, size: int) -> None:
        if self.write_behind:
            self._unsynced += size
            if self._unsynced >= WRITE_BEHIND:
                self._unsynced = 0
                start_writeback(self.fd)

    def _hash_batch(self, batch: list[bytes]) -> None:
        for data in batch:
            self.hasher.update(data)

    def _batch_done(self, _: Any, batch: list[bytes]) -> None:
        size = sum(map(len, batch))
        self.written += size
        self._queued -= size
        self._busy = False
        if self._paused and self._queued < LOW_WATER:
            self._paused = False
            self._resume()
        if self._queue:
            self._next_batch()
        else:
            self._notify_idle()

    def _batch_failed(self, failure: Any) -> None:
        error = failure.value
        self.error = error.subFailure.value if isinstance(error, defer.FirstError) else error
        self._busy = False
        self._queue.clear()
        self._queued = 0
        if self._paused:
            self._paused = False
            self._resume()
        self._notify_idle()

    def _notify_idle(self) -> None:
        waiting, self._idle = self._idle, []
        for d in waiting:
            d.callback(None)

    async def flush(self, *, fsync: bool = False) -> None:
        """Wait until every chunk is written; raises the first write error.

        :param fsync: then wait until the file is on disk too (``os.fsync`` on a pool thread).
        """
        if self._busy or self._queue:
            d: defer.Deferred = defer.Deferred()
            self._idle.append(d)
            await d
        if self.error is not None:
            raise self.error
        if fsync:
            await deferToThreadPool(self.reactor, self.reactor.getThreadPool(), os.fsync, self.fd)

    @property
    def pending(self) -> bool:
        """Whether chunks are still waiting for (or being written by) the worker thread."""
        return self._busy or bool(self._queue)

    def hexdigest(self) -> Optional[str]:
        return self.hasher.hexdigest() if self.hasher is not None else None
