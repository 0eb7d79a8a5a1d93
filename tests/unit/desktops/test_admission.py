"""Boot-storm admission control: the adaptive limit (pure) and the service on an injected clock."""
from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from kvmdesk.core.errors import ApiError
from kvmdesk.plugins.desktops.admission import GIB, NodeLoad, Settings, StartAdmission, load_from, start_limit

SETTINGS = Settings(starts_per_cpu=0.5, max_starts=16, idle_cpu=50, busy_cpu=90, memory_reserve=1 * GIB, recheck=1.0,
                    queue_timeout=30.0)


def test_limit_follows_cpus_and_load():
    assert start_limit(NodeLoad(8, None, None), SETTINGS) == 4
    assert start_limit(NodeLoad(64, 10.0, None), SETTINGS) == 16  # capped
    assert start_limit(NodeLoad(1, 0.0, None), SETTINGS) == 1  # at least one
    assert start_limit(NodeLoad(None, None, None), SETTINGS) == 1
    assert start_limit(NodeLoad(16, 50.0, None), SETTINGS) == 8
    assert start_limit(NodeLoad(16, 70.0, None), SETTINGS) == 4  # half way from idle to busy
    assert start_limit(NodeLoad(16, 89.0, None), SETTINGS) == 1
    assert start_limit(NodeLoad(16, 99.0, None), SETTINGS) == 1


class Node:
    """A node's measured load that the test changes as the watchers would."""

    def __init__(self, clock: Clock, cpus=8, cpu=None, available=100 * GIB):
        self.clock, self.cpus, self.cpu, self.available, self.at = clock, cpus, cpu, available, clock.seconds()

    def load(self, _uuid: str) -> NodeLoad:
        return NodeLoad(self.cpus, self.cpu, self.available, self.at)

    def sample(self, **changes) -> None:
        for k, v in changes.items():
            setattr(self, k, v)
        self.at = self.clock.seconds()


def admission(clock, node) -> StartAdmission:
    service = StartAdmission(clock, node.load, SETTINGS)
    service.startService()
    return service


def test_starts_beyond_the_limit_wait_in_order_and_never_exceed_it():
    clock = Clock()
    node = Node(clock, cpus=8)  # limit 4
    service = admission(clock, node)
    results = [service.acquire("n1", GIB) for _ in range(10)]
    slots = [r.result for r in results[:4]]
    assert all(r.called for r in results[:4]) and not any(r.called for r in results[4:])
    assert service.in_flight("n1") == 4
    service.release(slots[0])
    assert results[4].called and not results[5].called
    # load rises: the limit drops to 1, so releases do not admit anyone until only one is in flight
    node.sample(cpu=89.0)
    for slot in slots[1:]:
        service.release(slot)
    assert service.in_flight("n1") == 1 and not results[5].called
    service.release(results[4].result)
    assert results[5].called and not results[6].called
    service.release(results[5].result)
    assert results[6].called and not results[7].called
    figures = service.figures()["n1"]
    assert (figures["peak"], figures["limit_at_peak"], figures["admitted"], figures["waited"]) == (4, 4, 7, 6)
    assert figures["worst_excess"] <= 0
    service.stopService()
    for r in results[7:]:
        assert isinstance(r.result.value, ApiError)
        r.addErrback(lambda f: None)
    assert clock.getDelayedCalls() == []


def test_memory_of_starts_in_flight_and_since_the_last_sample_is_counted():
    clock = Clock()
    node = Node(clock, cpus=32, available=5 * GIB)  # 16 slots, but 4 GiB of headroom
    service = admission(clock, node)
    results = [service.acquire("n1", 2 * GIB) for _ in range(4)]
    assert [r.called for r in results] == [True, True, False, False]
    service.release(results[0].result)
    # finished, but the last sample was taken before it: its RAM still counts
    assert not results[2].called
    clock.advance(2)
    node.sample(available=4 * GIB)  # guests touch their memory lazily: the sample shows 1 GiB used
    clock.advance(1)
    service.release(results[1].result)  # after the sample: still counted
    assert not results[2].called
    clock.advance(1)  # nothing in flight: re-checked, but no newer sample yet
    assert not results[2].called
    node.sample()
    clock.advance(1)
    assert results[2].called and not results[3].called  # 4 - 1 reserve - 2 in flight = 1 GiB left
    service.release(results[2].result)
    service.stopService()
    assert isinstance(results[3].result.value, ApiError)
    results[3].addErrback(lambda f: None)
    assert clock.getDelayedCalls() == []


def test_a_start_that_waits_too_long_fails_clearly_and_the_others_go_on():
    clock = Clock()
    node = Node(clock, cpus=2, available=2 * GIB)  # 1 slot; 1 GiB headroom
    service = admission(clock, node)
    big = service.acquire("n1", 4 * GIB, label="10.0.0.7")
    failures = []
    big.addErrback(failures.append)
    clock.advance(29)
    assert not failures
    clock.advance(1)
    (failure,) = failures
    assert failure.value.error.code == 6030 and "10.0.0.7" in failure.value.message("en")
    small = service.acquire("n1", GIB // 2)
    assert small.called
    service.release(small.result)
    assert service.figures()["n1"]["timed_out"] == 1
    service.stopService()
    assert clock.getDelayedCalls() == []


def test_nodes_are_independent():
    clock = Clock()
    node = Node(clock, cpus=2)  # 1 slot per node
    service = admission(clock, node)
    a1, a2, b1 = service.acquire("a", GIB), service.acquire("a", GIB), service.acquire("b", GIB)
    assert a1.called and not a2.called and b1.called
    service.release(b1.result)
    assert not a2.called
    service.release(a1.result)
    service.release(a2.result)
    service.stopService()
    assert clock.getDelayedCalls() == []


def test_load_comes_from_the_watchers_sample_or_the_stored_record():
    node = {"facts": {"cpu": {"logical_count": 6}}, "metrics": {"cpu": {"percent": 20.0}, "memory": {"available": 7}}}
    assert load_from(node, None, 100.0) == NodeLoad(6, 20.0, 7, 100.0)
    latest = {"at": 90.0, "metrics": {"cpu": {"percent": 80.0}, "memory": {"available": 3}}}
    assert load_from(node, latest, 100.0) == NodeLoad(6, 80.0, 3, 90.0)
