"""A request body streamed from a range of a file, reporting how many bytes went out."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from twisted.internet import defer, task
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

CHUNK = 1 << 20


class SourceChanged(Exception):
    """The file got shorter while it was being sent."""


@implementer(IBodyProducer)
class FileRangeProducer:
    """Streams bytes ``offset..offset+length-1`` of ``path`` to the consumer, one chunk at a time.

    At most one chunk is read ahead of what the transport accepted: the HTTP client pauses the
    producer while its socket buffer is full, so memory stays flat whatever the file size.

    :param on_progress: called with the number of bytes written so far after each chunk.
    """

    def __init__(self, path: Path, offset: int, length: int, *, on_progress: Optional[Callable[[int], None]] = None,
                 chunk_size: int = CHUNK, cooperator: Any = None):
        self.path = Path(path)
        self.offset = offset
        self.length = length
        self.on_progress = on_progress
        self.chunk_size = chunk_size
        self.sent = 0
        self._cooperate = (cooperator or task).cooperate
        self._task: Optional[task.CooperativeTask] = None

    def _chunks(self, consumer: Any) -> Iterator[None]:
        with open(self.path, "rb") as handle:
            handle.seek(self.offset)
            while self.sent < self.length:
                data = handle.read(min(self.chunk_size, self.length - self.sent))
                if not data:
                    raise SourceChanged(f"{self.path} ended at {self.offset + self.sent} bytes")
                consumer.write(data)
                self.sent += len(data)
                if self.on_progress is not None:
                    self.on_progress(self.sent)
                yield None

    def startProducing(self, consumer: Any) -> defer.Deferred:
        self._task = self._cooperate(self._chunks(consumer))
        d = self._task.whenDone()

        def stopped(failure: Any) -> Any:
            failure.trap(task.TaskStopped)
            return defer.Deferred()  # the request was abandoned; the client has given up on this body

        d.addCallbacks(lambda _: None, stopped)
        return d

    def pauseProducing(self) -> None:
        if self._task is not None:
            try:
                self._task.pause()
            except task.TaskFinished:
                pass

    def resumeProducing(self) -> None:
        if self._task is not None:
            try:
                self._task.resume()
            except (task.TaskFinished, task.NotPaused):
                pass

    def stopProducing(self) -> None:
        if self._task is not None:
            try:
                self._task.stop()
            except task.TaskFinished:
                pass
