"""Boot-storm admission control: how many desktops may be starting on a node at once.

Starting a class (hundreds of desktops) at once would have every node boot all its guests together:
disk and CPU contention make each boot slower, and a node whose memory figures lag behind the
starts can be overcommitted.  So every start first takes a *slot* on its node:

- the node's limit of concurrent starts is ``starts_per_cpu`` per logical CPU (at least one, at most
  ``max_starts``), scaled down linearly as the node's CPU use rises from ``idle_cpu`` to ``busy_cpu``
  percent (one start at a time above it);
- a start is admitted only while the node's free memory, less ``memory_reserve`` and less the RAM of
  the starts in flight *and of those finished since the last sample* (which the sample cannot show
  yet), still holds the desktop's RAM;
- the others wait in order (FIFO per node) and are woken by a finished start or, when nothing is in
  flight on the node, by a re-check every ``recheck`` seconds; one that waits ``queue_timeout``
  seconds fails with a clear error (the rest of the batch goes on).

:func:`start_limit` is the pure rule; :class:`StartAdmission` is the service that applies it with an
injected clock and keeps the figures the benchmark prints (peak concurrent starts per node against
the limit in force at that moment).
"""
from __future__ import annotations

import collections
from typing import Any, Callable, Optional

import attrs
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from kvmdesk.core.errors import ApiError
from kvmdesk.plugins.desktops import codes

GIB = 1024**3


@attrs.frozen
class Settings:
    """``[desktops.admission]``."""

    starts_per_cpu: float = 0.5
    max_starts: int = 16
    idle_cpu: float = 50.0
    busy_cpu: float = 95.0
    memory_reserve: int = 1 * GIB
    recheck: float = 1.0
    queue_timeout: float = 600.0

    @classmethod
    def from_config(cls, config: Any) -> "Settings":
        get = lambda key, default: config.get(f"desktops.admission.{key}", default)  # noqa: E731
        return cls(starts_per_cpu=float(get("starts_per_cpu", 0.5)), max_starts=int(get("max_starts", 16)),
                   idle_cpu=float(get("idle_cpu", 50.0)), busy_cpu=float(get("busy_cpu", 95.0)),
                   memory_reserve=int(float(get("memory_reserve_gib", 1)) * GIB), recheck=float(get("recheck", 1.0)),
                   queue_timeout=float(get("queue_timeout", 600.0)))


@attrs.frozen
class NodeLoad:
    """What the watchers last measured on a node (``None``: not measured)."""

    cpus: Optional[int]
    cpu_percent: Optional[float]
    memory_available: Optional[int]
    #: when that sample was taken (clock seconds); RAM of starts finished before it is in the sample
    sampled_at: float = 0.0


def start_limit(load: NodeLoad, settings: Settings) -> int:
    """How many starts may run at once on a node under ``load`` (at least one)."""
    base = max(1, min(settings.max_starts, int((load.cpus or 1) * settings.starts_per_cpu)))
    cpu = load.cpu_percent
    if cpu is None or cpu <= settings.idle_cpu:
        return base
    if cpu >= settings.busy_cpu:
        return 1
    share = (settings.busy_cpu - cpu) / (settings.busy_cpu - settings.idle_cpu)
    return max(1, int(base * share))


@attrs.define
class NodeFigures:
    """What the benchmark and the API show of one node's admissions."""

    admitted: int = 0
    waited: int = 0
    timed_out: int = 0
    peak: int = 0
    #: the limit in force when the peak was reached
    limit_at_peak: int = 0
    #: the largest ``in flight - limit`` ever seen after an admission (0 or less: never over)
    worst_excess: int = -(1 << 30)


@attrs.define(eq=False)
class _Waiter:
    ram: int
    label: str
    result: defer.Deferred
    timeout: Optional[IDelayedCall] = None
    queued_at: float = 0.0


@attrs.define(eq=False)
class _Node:
    in_flight: dict[int, int] = attrs.field(factory=dict)  # slot id -> ram
    #: (finished at, ram) of starts whose RAM the last sample may not show yet
    recent: list[tuple[float, int]] = attrs.field(factory=list)
    queue: collections.deque = attrs.field(factory=collections.deque)
    recheck: Optional[IDelayedCall] = None
    figures: NodeFigures = attrs.field(factory=NodeFigures)


@attrs.define(eq=False)
class Slot:
    """A held start slot; give it back with :meth:`StartAdmission.release` (or use ``async with``)."""

    admission: "StartAdmission"
    node: str
    id: int

    async def __aenter__(self) -> "Slot":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.admission.release(self)


@attrs.define(eq=False, slots=False)
class StartAdmission(Service):
    """Admits desktop starts per node (see the module's description).

    :param clock: the time source (a ``Clock`` in tests).
    :param load_of: the node's current :class:`NodeLoad`, from what the watchers keep.
    """

    clock: IReactorTime
    load_of: Callable[[str], NodeLoad]
    settings: Settings = attrs.field(factory=Settings)
    _nodes: dict[str, _Node] = attrs.field(factory=dict, init=False)
    _next_id: int = attrs.field(default=0, init=False)
    name: str = "start-admission"

    def __attrs_post_init__(self) -> None:
        Service.__init__(self)

    def acquire(self, node: str, ram: int, label: str = "") -> defer.Deferred:
        """A :class:`Slot` on ``node`` (its uuid) for a desktop of ``ram`` bytes, once admitted.

        :param label: how errors name the node (its IP).

        :returns: a Deferred that fails with :class:`ApiError` (6030) after ``queue_timeout`` seconds.
        """
        state = self._nodes.setdefault(node, _Node())
        waiter = _Waiter(ram, label or node, defer.Deferred(), queued_at=self.clock.seconds())
        state.queue.append(waiter)
        self._pump(node)
        if not waiter.result.called:
            state.figures.waited += 1
            waiter.timeout = self.clock.callLater(self.settings.queue_timeout, self._expire, node, waiter)
        return waiter.result

    def release(self, slot: Slot) -> None:
        state = self._nodes.get(slot.node)
        if state is None or slot.id not in state.in_flight:
            return
        ram = state.in_flight.pop(slot.id)
        state.recent.append((self.clock.seconds(), ram))
        self._pump(slot.node)

    def limit(self, node: str) -> int:
        return start_limit(self.load_of(node), self.settings)

    def in_flight(self, node: str) -> int:
        state = self._nodes.get(node)
        return len(state.in_flight) if state else 0

    def figures(self) -> dict[str, dict[str, int]]:
        """Per node: admitted, waited, timed out, peak concurrent starts and the limit at that peak."""
        return {node: attrs.asdict(state.figures) for node, state in self._nodes.items()}

    # -- admission --

    def _headroom(self, state: _Node, load: NodeLoad) -> Optional[int]:
        if load.memory_available is None:
            return None
        state.recent = [(at, ram) for at, ram in state.recent if at >= load.sampled_at]
        pending = sum(state.in_flight.values()) + sum(ram for _, ram in state.recent)
        return load.memory_available - self.settings.memory_reserve - pending

    def _pump(self, node: str) -> None:
        state = self._nodes[node]
        load = self.load_of(node)
        limit = start_limit(load, self.settings)
        while state.queue and len(state.in_flight) < limit:
            waiter = state.queue[0]
            headroom = self._headroom(state, load)
            if headroom is not None and headroom < waiter.ram:
                break
            state.queue.popleft()
            if waiter.timeout is not None and waiter.timeout.active():
                waiter.timeout.cancel()
            self._next_id += 1
            state.in_flight[self._next_id] = waiter.ram
            figures = state.figures
            figures.admitted += 1
            figures.worst_excess = max(figures.worst_excess, len(state.in_flight) - limit)
            if len(state.in_flight) > figures.peak:
                figures.peak, figures.limit_at_peak = len(state.in_flight), limit
            waiter.result.callback(Slot(self, node, self._next_id))
        self._arm_recheck(node, state)

    def _arm_recheck(self, node: str, state: _Node) -> None:
        """Nothing in flight wakes the queue on this node: look again after ``recheck`` seconds."""
        needed = bool(state.queue) and not state.in_flight
        if needed and (state.recheck is None or not state.recheck.active()):
            state.recheck = self.clock.callLater(self.settings.recheck, self._recheck, node)
        elif not needed and state.recheck is not None and state.recheck.active():
            state.recheck.cancel()
            state.recheck = None

    def _recheck(self, node: str) -> None:
        state = self._nodes.get(node)
        if state is not None:
            state.recheck = None
            self._pump(node)

    def _expire(self, node: str, waiter: _Waiter) -> None:
        state = self._nodes[node]
        try:
            state.queue.remove(waiter)
        except ValueError:
            return
        state.figures.timed_out += 1
        waiter.result.errback(ApiError(codes.START_QUEUE_TIMEOUT, ip=waiter.label, seconds=int(self.settings.queue_timeout)))
        self._arm_recheck(node, state)

    def stopService(self) -> Any:
        super().stopService()
        for state in self._nodes.values():
            if state.recheck is not None and state.recheck.active():
                state.recheck.cancel()
            while state.queue:
                waiter = state.queue.popleft()
                if waiter.timeout is not None and waiter.timeout.active():
                    waiter.timeout.cancel()
                waiter.result.errback(ApiError(codes.START_QUEUE_TIMEOUT, ip=waiter.label, seconds=0))
        return None


def load_from(node: dict[str, Any], latest: Optional[dict[str, Any]], clock_now: float) -> NodeLoad:
    """A node's :class:`NodeLoad` from its record and the watchers' latest sample of it.

    :param latest: ``{"at", "metrics", ...}`` as the node watchers keep it (``None``: none yet; the
        stored record's metrics are used).
    """
    facts = node.get("facts") or {}
    metrics = (latest or {}).get("metrics") or node.get("metrics") or {}
    return NodeLoad(
        cpus=(facts.get("cpu") or {}).get("logical_count"),
        cpu_percent=(metrics.get("cpu") or {}).get("percent"),
        memory_available=(metrics.get("memory") or {}).get("available"),
        sampled_at=float((latest or {}).get("at", clock_now)),
    )
