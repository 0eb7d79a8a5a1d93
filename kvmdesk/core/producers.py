"""A request body streamed from a range of a file, reporting how many bytes went out; chunks shared
between the bodies that send the same file at the same time."""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Hashable, Optional

from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from kvmdesk.core.directio import RangeReader
from kvmdesk.core.threadpools import in_reactor_pool

CHUNK = 1 << 20
#: Bytes of recently read chunks :class:`SharedReads` keeps for other transfers of the same file.
SHARED_WINDOW = 16 << 20


class SourceChanged(Exception):
    """The file got shorter while it was being sent."""


class _Stopped(Exception):
    """The consumer stopped the producer (the request was abandoned)."""


class _SharedRead:
    """One read whose result several producers wait for."""

    def __init__(self, failed: Callable[[], None]):
        self.result: Any = None
        self.settled = False
        self._waiters: list[defer.Deferred] = []
        self._failed = failed

    def follow(self, reading: defer.Deferred) -> None:
        reading.addBoth(self._settle)

    def _settle(self, result: Any) -> None:
        self.settled, self.result = True, result
        if isinstance(result, Failure):
            self._failed()
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            self._deliver(waiter)

    def _deliver(self, waiter: defer.Deferred) -> None:
        if isinstance(self.result, Failure):
            waiter.errback(self.result)
        else:
            waiter.callback(self.result)

    def wait(self) -> defer.Deferred:
        waiter: defer.Deferred = defer.Deferred()
        if self.settled:
            self._deliver(waiter)
        else:
            self._waiters.append(waiter)
        return waiter


class SharedReads:
    """The chunks read most recently (up to ``window`` bytes), for the transfers sending the same file.

    A pool's image usually goes to several nodes at once, and the transfers run at about the same
    pace: the chunk one of them reads, or is reading, is what the others ask for next.  Without this,
    each transfer reads the whole file itself (with ``direct_io``, from the disk, which the nodes'
    agents may be writing to as well).  Chunks are known by the file's identity (device, inode,
    modification time, size), their offset and their size; a failed read is not kept.
    """

    def __init__(self, window: int = SHARED_WINDOW):
        self.window = window
        self.reads = 0  # reads started (the rest were shared)
        self._chunks: OrderedDict[Hashable, tuple[_SharedRead, int]] = OrderedDict()
        self._bytes = 0

    def read(self, key: Hashable, size: int, start: Callable[[], defer.Deferred]) -> defer.Deferred:
        """The chunk known as ``key``: shared if it is kept, else read with ``start()`` (and kept)."""
        kept = self._chunks.get(key)
        if kept is None:
            self.reads += 1
            kept = self._chunks[key] = (_SharedRead(lambda: self._forget(key)), size)
            self._bytes += size
            while self._bytes > self.window and len(self._chunks) > 1:
                self._bytes -= self._chunks.popitem(last=False)[1][1]
            kept[0].follow(start())  # a read that fails, even at once, forgets its entry
        return kept[0].wait()

    def _forget(self, key: Hashable) -> None:
        kept = self._chunks.pop(key, None)
        if kept is not None:
            self._bytes -= kept[1]


@implementer(IBodyProducer)
class FileRangeProducer:
    """Streams bytes ``offset..offset+length-1`` of ``path`` to the consumer, one chunk at a time.

    The file is read on the reactor's thread pool (a disk read never holds the reactor), the next
    chunk while the last one is being sent, so the disk and the network work at the same time.  The
    HTTP client pauses the producer while its socket buffer is full; a paused producer holds one chunk
    and reads nothing more.  So a producer has at most two chunks in memory, whatever the file size
    (and ``shared`` keeps a bounded window of recent chunks for all producers together).

    :param on_progress: called with the number of bytes written so far after each chunk.
    :param direct: read with ``O_DIRECT`` where the filesystem allows it (see :mod:`kvmdesk.core.directio`).
    :param shared: chunks shared with other producers of the same file.
    """

    def __init__(self, path: Path, offset: int, length: int, *, on_progress: Optional[Callable[[int], None]] = None,
                 chunk_size: int = CHUNK, reactor: Any = None, direct: bool = False,
                 shared: Optional[SharedReads] = None):
        if reactor is None:
            from twisted.internet import reactor
        self.path = Path(path)
        self.offset = offset
        self.length = length
        self.on_progress = on_progress
        self.chunk_size = chunk_size
        self.reactor = reactor
        self.direct = direct
        self.shared = shared
        self.sent = 0
        self._paused = False
        self._stopped = False
        self._unpaused: Optional[defer.Deferred] = None

    def startProducing(self, consumer: Any) -> defer.Deferred:
        d = defer.ensureDeferred(self._produce(consumer))

        def stopped(failure: Any) -> Any:
            failure.trap(_Stopped)
            return defer.Deferred()  # the request was abandoned; the client has given up on this body

        return d.addErrback(stopped)

    async def _produce(self, consumer: Any) -> None:
        reader = await in_reactor_pool(self.reactor, RangeReader, self.path, direct=self.direct)
        ahead: Optional[defer.Deferred] = None
        try:
            ahead = self._read(reader, 0) if self.length > 0 else None
            while self.sent < self.length:
                data = await ahead
                ahead = None
                if not data:
                    raise SourceChanged(f"{self.path} ended at {self.offset + self.sent} bytes")
                await self._writable()
                if self.sent + len(data) < self.length:
                    ahead = self._read(reader, self.sent + len(data))
                consumer.write(data)
                self.sent += len(data)
                if self.on_progress is not None:
                    self.on_progress(self.sent)
                await self._after_chunk()
        finally:
            if ahead is not None:
                # The descriptor stays open until the thread reading it is done.
                await ahead.addErrback(lambda _: None)
            reader.close()

    def _read(self, reader: RangeReader, position: int) -> defer.Deferred:
        offset, size = self.offset + position, min(self.chunk_size, self.length - position)

        def start() -> defer.Deferred:
            return in_reactor_pool(self.reactor, reader.read, offset, size)

        if self.shared is None:
            return start()
        return self.shared.read((reader.identity, offset, size), size, start)

    async def _writable(self) -> None:
        while self._paused and not self._stopped:
            self._unpaused = defer.Deferred()
            await self._unpaused
        if self._stopped:
            raise _Stopped()

    def _after_chunk(self) -> Any:
        """Awaited after each chunk is written (a subclass may hold the stream there); nothing here."""
        return defer.succeed(None)

    def _wake(self) -> None:
        waiting, self._unpaused = self._unpaused, None
        if waiting is not None:
            waiting.callback(None)

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._wake()

    def stopProducing(self) -> None:
        self._stopped = True
        self._wake()
