"""A service that runs one round of work every few seconds: the loop every sweeper shares.

Reconcilers, sweepers and syncs subclass :class:`PeriodicService` and write only :meth:`~PeriodicService.sweep`;
the loop (the core's clock, no overlapping rounds, a failed round logged and the next one run, a stop
that waits for the round in flight) is written once, here.
"""
from __future__ import annotations

from typing import Any, ClassVar, Optional

import attrs
from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.logger import Logger

log = Logger(namespace="kvmdesk.core.periodic")


@attrs.define(eq=False)
class PeriodicService(Service):
    """Calls ``await self.sweep()`` every ``interval`` seconds on ``core.clock``.

    :cvar what: names the round in the log line of a failed one.
    :cvar at_start: the first round runs at start (else one interval later).
    :ivar current_round: fires when the round in flight ends (``None`` between rounds).
    :ivar rounds: rounds finished since the start, failed ones included.
    """

    what: ClassVar[str] = "a periodic round"
    at_start: ClassVar[bool] = True

    core: Any
    interval: float = 60.0
    current_round: Optional[defer.Deferred] = None
    rounds: int = 0
    _loop: Optional[task.LoopingCall] = None

    async def sweep(self) -> Any:
        """One round of work; an exception is logged and the next round runs all the same."""
        raise NotImplementedError

    def run_round(self) -> Optional[defer.Deferred]:
        """Start a round now unless one is running; returns the round in flight (``None`` if it ended at once)."""
        if self.current_round is None:
            round_ = defer.ensureDeferred(self.sweep())
            round_.addErrback(lambda failure: log.failure("{what} failed", failure, what=self.what))
            round_.addBoth(self._round_ended)
            if not round_.called:  # a round that ended at once has already cleared current_round
                self.current_round = round_
        return self.current_round

    def _round_ended(self, _: Any) -> None:
        self.current_round = None
        self.rounds += 1

    def _tick(self) -> None:
        # never returns the round: a LoopingCall would wait for it, and stop at its first failure
        self.run_round()

    def startService(self) -> None:
        super().startService()
        self._loop = task.LoopingCall(self._tick)
        self._loop.clock = self.core.clock
        self._loop.start(self.interval, now=self.at_start)

    def stopService(self) -> defer.Deferred:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self.current_round is None:
            return defer.succeed(None)
        finished: defer.Deferred = defer.Deferred()
        self.current_round.addBoth(lambda result: (finished.callback(None), result)[1])
        return finished
