"""Group commit: store writes that arrive while one batch is being written go together in the next.

The first write goes at once (no added latency when the store keeps up); those that arrive while it
is in flight wait for it and then go as one batch, so a burst costs a few round trips to the store's
single writer instead of one each (bench/broker_bench.py: the desktop users' claims and session
touches of a login rush).
"""
from __future__ import annotations

from typing import Any, Awaitable, Callable, Generic, TypeVar

import attrs
from twisted.internet import defer
from twisted.python.failure import Failure

Item = TypeVar("Item")


@attrs.define(eq=False)
class GroupCommit(Generic[Item]):
    """:param write: writes a batch of items; returns one result per item, in order."""

    write: Callable[[list[Item]], Awaitable[list[Any]]]
    _queued: list[tuple[Item, defer.Deferred]] = attrs.field(factory=list)
    _busy: bool = False

    def submit(self, item: Item) -> defer.Deferred:
        """Queue ``item``; fires with its result (or the batch's failure)."""
        done: defer.Deferred = defer.Deferred()
        self._queued.append((item, done))
        if not self._busy:
            self._next()
        return done

    def _next(self) -> None:
        batch, self._queued = self._queued, []
        self._busy = bool(batch)
        if not batch:
            return
        work = defer.ensureDeferred(self._write(batch))
        work.addBoth(lambda _: self._next())

    async def _write(self, batch: list[tuple[Item, defer.Deferred]]) -> None:
        try:
            results = await self.write([item for item, _ in batch])
        except Exception:
            failure = Failure()
            for _, done in batch:
                done.errback(failure)
            return
        for (_, done), result in zip(batch, results, strict=True):
            done.callback(result)
