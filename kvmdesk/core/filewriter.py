"""Writing a stream of chunks to a file while hashing it, for uploads (MD5) and image transfers (their digest's
algorithm: SHA-256 for template versions, MD5 for base images and ISOs).

Used by the controller's upload sinks and by the agent's image receiver.  Two strategies (the product
uses the threaded one unless ``[storage] hash_in_thread`` / ``[agent.images] hash_in_thread`` say no):

- ``threaded=False``: each chunk is written and hashed on the reactor thread as it arrives.
  MD5 runs at about 600-700 MB/s and a page-cache write of a 64 KiB-1 MiB chunk takes tens of
  microseconds, so a chunk costs well under a millisecond; ``bench/transfer_bench.py --hash-on-reactor``
  measures this strategy against the other.
- ``threaded=True``: chunks are queued, in order, for two :class:`OrderedDrain` s: one writes them
  on a pool thread while the other hashes them on another; hashlib and ``os.write`` release the
  GIL, so hashing, writing and the reactor's socket reads overlap.  A drain's thread keeps taking
  chunks as long as there are any, without a round trip through the reactor between them (that
  round trip, once per batch, left the hashing thread idle for 17% of an upload).  When more than
  :data:`HIGH_WATER` bytes wait, ``pause()`` stops reading from the network until fewer than
  :data:`LOW_WATER` do, so a slow disk never makes the queue grow without bound.

``write_behind=True`` (for a file that will be fsynced when complete) asks the kernel to start
writing the file to disk after every :data:`WRITE_BEHIND` bytes (``sync_file_range``), so the disk
works while the rest still arrives and the final ``fsync`` finds almost nothing left to write: for a
1 GiB upload here it went from about 0.5 s to a few milliseconds.  ``direct=True`` (an agent's
received images; the controller's uploads with ``[storage] direct_io``) writes through
:mod:`kvmdesk.core.directio` instead, past the page cache.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import threading
from collections import deque
from typing import Any, Callable, Optional

from twisted.internet import defer

from kvmdesk.core.directio import DirectWriter, write_all
from kvmdesk.core.threadpools import in_reactor_pool

HIGH_WATER = 16 << 20
LOW_WATER = 4 << 20
#: bytes a drain's thread handles before it gives its pool thread back for a turn (fairness).
DRAIN_PASS = 64 << 20
WRITE_BEHIND = 8 << 20

_SYNC_FILE_RANGE_WRITE = 2


def _sync_file_range() -> Optional[Callable[..., int]]:
    # Not in the os module; glibc has it on Linux (where else it is missing, write-behind is skipped).
    # CDLL(None) is the running process, libc included: no ldconfig subprocess as find_library runs.
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
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


class OrderedDrain:
    """Hands chunks, in order, to ``work`` on the reactor's pool threads, one thread at a time.

    A thread keeps taking chunks while there are any (up to :data:`DRAIN_PASS` bytes, then it
    queues itself again so other pool work gets a turn).  ``completed`` is the byte count done so
    far, kept by that thread; ``progress`` is called on the pool thread after each chunk.
    """

    def __init__(self, reactor: Any, work: Callable[[bytes], None], progress: Callable[[], None],
                 finished: Callable[[Optional[BaseException]], None]):
        self.reactor = reactor
        self.work = work
        self.progress = progress
        self.finished = finished
        self.completed = 0
        self._chunks: deque[bytes] = deque()
        self._lock = threading.Lock()
        self._running = False  # a thread owns the queue (guarded by the lock)
        self._tasks = 0  # pool calls not yet answered on the reactor

    def put(self, data: bytes) -> None:
        self._chunks.append(data)
        with self._lock:
            if self._running:
                return
            self._running = True
        self._start()

    @property
    def idle(self) -> bool:
        return self._tasks == 0 and not self._chunks

    def discard(self) -> None:
        """Drop the chunks not yet taken (after an error: they will never be needed)."""
        self._chunks.clear()

    def _start(self) -> None:
        self._tasks += 1
        d = in_reactor_pool(self.reactor, self._run)
        d.addCallbacks(self._ran, self._failed)

    def _run(self) -> bool:
        """On a pool thread: work through the queue; returns whether chunks may remain."""
        done = 0
        while done < DRAIN_PASS:
            try:
                data = self._chunks.popleft()
            except IndexError:
                with self._lock:
                    if not self._chunks:
                        self._running = False
                        return False
                continue
            self.work(data)
            done += len(data)
            self.completed += len(data)
            self.progress()
        return True

    def _ran(self, more: bool) -> None:
        self._tasks -= 1
        if more:
            self._start()
        else:
            self.finished(None)

    def _failed(self, failure: Any) -> None:
        self._tasks -= 1
        self.discard()
        with self._lock:
            self._running = False
        self.finished(failure.value)


class HashingWriter:
    """Appends chunks to an open file descriptor and hashes them (MD5 unless given another hasher).

    :param fd: a file descriptor open for writing (the writer does not close it).
    :param hasher: a hashlib object to continue (a resumed transfer, a fresh one of the transfer's
        algorithm), or ``None`` for a fresh MD5;
        pass ``hashing=False`` to skip hashing entirely.
    :param threaded: write and hash on worker threads (see the module docstring).
    :param pause: stop the producer of the chunks (network back-pressure); ``resume`` restarts it.
    :param write_behind: start writing to disk as the file grows (see the module docstring).
    :param direct: ``fd`` is a new file in ``O_DIRECT`` mode (:func:`~kvmdesk.core.directio.open_for_stream`,
        :func:`~kvmdesk.core.directio.enable_direct`):
        chunks go through a :class:`~kvmdesk.core.directio.DirectWriter`; :meth:`flush` writes its tail.
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
        direct: bool = False,
    ):
        self.fd = fd
        self.reactor = reactor
        self.hasher = (hasher if hasher is not None else hashlib.md5()) if hashing else None
        self.threaded = threaded
        self._pause = pause or (lambda: None)
        self._resume = resume or (lambda: None)
        self._direct = DirectWriter(fd) if direct else None
        self.write_behind = write_behind  # (a direct writer bypasses the page cache: nothing to write back)
        self._unsynced = 0
        self._inline_written = 0
        self.error: Optional[BaseException] = None
        self._queued = 0
        self._paused = False
        self._resume_asked = False
        self._idle: list[defer.Deferred] = []
        self._drains: list[OrderedDrain] = []
        if threaded:
            self._writing = OrderedDrain(reactor, self._write_chunk, self._progress, self._drained)
            self._drains.append(self._writing)
            if self.hasher is not None:
                self._drains.append(OrderedDrain(reactor, self.hasher.update, self._progress, self._drained))

    @property
    def written(self) -> int:
        """Bytes written so far (in direct mode the last partial buffer reaches the file at :meth:`flush`)."""
        return self._writing.completed if self.threaded else self._inline_written

    def write(self, data: bytes) -> None:
        """Write one chunk (raises the first ``OSError`` of the inline strategy at once)."""
        if self.error is not None:
            raise self.error
        if not self.threaded:
            self._write_chunk(data)
            if self.hasher is not None:
                self.hasher.update(data)
            self._inline_written += len(data)
            return
        self._queued += len(data)
        for drain in self._drains:
            drain.put(data)
        if not self._paused and self._backlog() > HIGH_WATER:
            self._paused = True
            self._pause()
            # A drain thread that finished before the flag was set saw nothing to resume.
            self._check_resume()

    def _backlog(self) -> int:
        return self._queued - min(drain.completed for drain in self._drains)

    def _write_chunk(self, data: bytes) -> None:
        if self._direct is not None:
            self._direct.write(data)
            return
        write_all(self.fd, data)
        self._wrote(len(data))

    def _wrote(self, size: int) -> None:
        if self.write_behind:
            self._unsynced += size
            if self._unsynced >= WRITE_BEHIND:
                self._unsynced = 0
                start_writeback(self.fd)

    def _progress(self) -> None:
        """On a drain's thread, after each chunk: ask the reactor to resume the network once."""
        if self._paused and not self._resume_asked and self._backlog() < LOW_WATER:
            self._resume_asked = True
            self.reactor.callFromThread(self._check_resume)

    def _check_resume(self) -> None:
        self._resume_asked = False
        if self._paused and (self.error is not None or self._backlog() < LOW_WATER):
            self._paused = False
            self._resume()

    def _drained(self, error: Optional[BaseException]) -> None:
        if error is not None and self.error is None:
            self.error = error
            for drain in self._drains:
                drain.discard()
        self._check_resume()
        if not self.pending:
            waiting, self._idle = self._idle, []
            for d in waiting:
                d.callback(None)

    async def flush(self, *, fsync: bool = False) -> None:
        """Wait until every chunk is written (direct mode: its tail too, then ordinary writes); raises the
        first write error.

        :param fsync: then wait until the file is on disk too (``os.fsync`` on a pool thread).
        """
        if self.pending:
            d: defer.Deferred = defer.Deferred()
            self._idle.append(d)
            await d
        if self.error is not None:
            raise self.error
        if self._direct is not None and self._direct.direct:
            await in_reactor_pool(self.reactor, self._direct.finish)
        if fsync:
            await in_reactor_pool(self.reactor, os.fsync, self.fd)

    @property
    def pending(self) -> bool:
        """Whether chunks are still waiting for (or being handled by) a worker thread."""
        return not all(drain.idle for drain in self._drains)

    def hexdigest(self) -> Optional[str]:
        return self.hasher.hexdigest() if self.hasher is not None else None
