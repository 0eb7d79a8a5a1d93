"""A request body streamed from a range of a file, reporting how many bytes went out."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

from twisted.internet import defer
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from kvmdesk.core.directio import RangeReader
from kvmdesk.core.threadpools import in_reactor_pool

CHUNK = 1 << 20


class SourceChanged(Exception):
    """The file got shorter while it was being sent."""


class _Stopped(Exception):
    """The consumer stopped the producer (the request was abandoned)."""


@implementer(IBodyProducer)
class FileRangeProducer:
    """Streams bytes ``offset..offset+length-1`` of ``path`` to the consumer, one chunk at a time.

    The file is read on the reactor's thread pool (a disk read never holds the reactor), the next
    chunk while the last one is being sent, so the disk and the network work at the same time.  The
    HTTP client pauses the producer while its socket buffer is full; a paused producer holds one chunk
    and reads nothing more.  So at most two chunks are in memory, whatever the file size.

    :param on_progress: called with the number of bytes written so far after each chunk.
    :param direct: read with ``O_DIRECT`` where the filesystem allows it (see :mod:`kvmdesk.core.directio`).
    """

    def __init__(self, path: Path, offset: int, length: int, *, on_progress: Optional[Callable[[int], None]] = None,
                 chunk_size: int = CHUNK, reactor: Any = None, direct: bool = False):
        if reactor is None:
            from twisted.internet import reactor
        self.path = Path(path)
        self.offset = offset
        self.length = length
        self.on_progress = on_progress
        self.chunk_size = chunk_size
        self.reactor = reactor
        self.direct = direct
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
        size = min(self.chunk_size, self.length - position)
        return in_reactor_pool(self.reactor, reader.read, self.offset + position, size)

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
