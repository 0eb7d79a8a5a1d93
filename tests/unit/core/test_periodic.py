"""kvmdesk.core.periodic: the one loop of every reconciler, sweeper and sync, on an injected clock."""
from __future__ import annotations

from types import SimpleNamespace

import attrs
from twisted.internet import defer
from twisted.internet.task import Clock

from kvmdesk.core.periodic import PeriodicService


@attrs.define(eq=False)
class Rounds(PeriodicService):
    """Each round waits on a Deferred the test fires; a round told to fail raises."""

    what = "a test round"

    started: list = attrs.field(factory=list)
    fail: bool = False

    async def sweep(self) -> None:
        gate: defer.Deferred = defer.Deferred()
        self.started.append(gate)
        await gate
        if self.fail:
            raise RuntimeError("this round fails")


def service(clock: Clock, **kwargs) -> Rounds:
    return Rounds(SimpleNamespace(clock=clock), interval=10.0, **kwargs)


def test_rounds_follow_the_clock_and_never_overlap():
    clock = Clock()
    rounds = service(clock)
    rounds.startService()
    assert len(rounds.started) == 1  # at start
    clock.advance(10)
    clock.advance(10)
    assert len(rounds.started) == 1, "a round started while the previous one still ran"
    rounds.started[0].callback(None)
    assert rounds.current_round is None and rounds.rounds == 1
    clock.advance(10)
    assert len(rounds.started) == 2
    rounds.started[1].callback(None)
    rounds.stopService()


def test_a_failed_round_is_logged_and_the_next_one_runs():
    from twisted.logger import globalLogPublisher

    seen: list[dict] = []
    globalLogPublisher.addObserver(seen.append)
    try:
        clock = Clock()
        rounds = service(clock, fail=True)
        rounds.startService()
        rounds.started[0].callback(None)
        failures = [e for e in seen if e.get("log_namespace") == "kvmdesk.core.periodic" and "log_failure" in e]
        assert len(failures) == 1 and failures[0]["what"] == "a test round"
        assert failures[0]["log_failure"].check(RuntimeError)
        rounds.fail = False
        clock.advance(10)
        assert len(rounds.started) == 2 and rounds.rounds == 1
        rounds.started[1].callback(None)
        assert rounds.rounds == 2
        rounds.stopService()
    finally:
        globalLogPublisher.removeObserver(seen.append)


def test_stop_waits_for_the_round_in_flight_and_no_round_follows():
    clock = Clock()
    rounds = service(clock)
    rounds.startService()
    stopped = rounds.stopService()
    assert not stopped.called
    rounds.started[0].callback(None)
    assert stopped.called
    clock.advance(100)
    assert len(rounds.started) == 1


def test_a_late_first_round_waits_one_interval():
    @attrs.define(eq=False)
    class Later(Rounds):
        at_start = False

    clock = Clock()
    later = Later(SimpleNamespace(clock=clock), interval=10.0)
    later.startService()
    assert later.started == []
    clock.advance(10)
    assert len(later.started) == 1
    later.started[0].callback(None)
    assert later.stopService().called
