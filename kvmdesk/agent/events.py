"""Forwarding of domain lifecycle events to the controller, in order, with retry.

Events wait in a bounded queue and are posted in batches to ``<controller_url>/agent/events``,
signed with the enrolment secret (direction ``to-controller``) and naming the enrolment in
``X-Kvmdesk-Agent``.  A failed post is retried with exponential backoff on an injected clock; while
the agent is not enrolled, events wait.
"""
from __future__ import annotations

import collections
import time
from typing import Any, Callable, Optional
from urllib.parse import urlsplit

import attrs
import orjson
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from kvmdesk.agent.enrolment import EnrolmentStore
from kvmdesk.core import agentauth

log = Logger(namespace="kvmdesk.agent.events")

EVENTS_PATH = "/agent/events"


def events_url(controller_url: str) -> str:
    return controller_url.rstrip("/") + EVENTS_PATH


@attrs.define(eq=False, slots=False)
class EventForwarder(Service):
    """Posts events to the controller of the current enrolment.

    :param enrolments: where the controller URL and secret come from (read at each post).
    :param http: a treq ``HTTPClient`` (or the ``treq`` module).
    :param clock: schedules retries.
    :param wallclock: Unix time for signatures.
    """

    enrolments: EnrolmentStore
    http: Any
    clock: IReactorTime
    wallclock: Callable[[], float] = time.time
    retry_initial: float = 1.0
    retry_max: float = 60.0
    queue_max: int = 10000
    batch_max: int = 100
    timeout: float = 10.0
    name: str = "event-forwarder"

    queue: collections.deque = attrs.field(factory=collections.deque, init=False)
    sent: int = attrs.field(default=0, init=False)
    dropped: int = attrs.field(default=0, init=False)
    _seq: int = attrs.field(default=0, init=False)
    _delay: float = attrs.field(default=0.0, init=False)
    _retry_call: Any = attrs.field(default=None, init=False)
    _sending: Optional[defer.Deferred] = attrs.field(default=None, init=False)

    def push(self, event: dict[str, Any]) -> None:
        """Queue one event (a hypervisor lifecycle event dict) and post it as soon as possible."""
        self._seq += 1
        self.queue.append({**event, "seq": self._seq, "at": self.wallclock()})
        while len(self.queue) > self.queue_max:
            self.queue.popleft()
            self.dropped += 1
            if self.dropped in (1, 10, 100) or self.dropped % 1000 == 0:
                log.warn("event queue full: {dropped} events dropped so far", dropped=self.dropped)
        self.kick()

    def kick(self) -> None:
        """Post now unless a post or a retry is already pending."""
        if not self.running or self._sending is not None or self._retry_call is not None or not self.queue:
            return
        self._sending = defer.ensureDeferred(self._drain())
        self._sending.addBoth(self._drained)

    def _drained(self, result: Any) -> None:
        self._sending = None

    async def _drain(self) -> None:
        while self.queue and self.running:
            enrolment = self.enrolments.current
            if enrolment is None:
                return  # waits for an enrolment; the enrol handler kicks again
            batch = [self.queue[i] for i in range(min(self.batch_max, len(self.queue)))]
            try:
                await self._post(enrolment, batch)
            except Exception as exc:
                self._schedule_retry(str(exc) or exc.__class__.__name__)
                return
            for _ in batch:
                if self.queue and self.queue[0]["seq"] <= batch[-1]["seq"]:
                    self.queue.popleft()
            self.sent += len(batch)
            self._delay = 0.0

    async def _post(self, enrolment: Any, batch: list[dict[str, Any]]) -> None:
        url = events_url(enrolment.controller_url)
        parts = urlsplit(url)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        body = orjson.dumps({"agent_id": enrolment.agent_id, "events": batch})
        headers = agentauth.sign(enrolment.secret, "POST", target, body, now=self.wallclock(),
                                 direction=agentauth.TO_CONTROLLER)
        headers[agentauth.H_AGENT] = enrolment.agent_id
        headers["Content-Type"] = "application/json"
        response = await self.http.post(url, data=body, headers=headers, timeout=self.timeout)
        content = await response.content()
        if response.code != 200:
            raise RuntimeError(f"controller answered HTTP {response.code}: {content[:200]!r}")

    def _schedule_retry(self, why: str) -> None:
        self._delay = min(max(self._delay * 2, self.retry_initial), self.retry_max)
        log.warn("cannot post {n} events to the controller ({why}); retrying in {delay}s",
                 n=len(self.queue), why=why, delay=self._delay)
        self._retry_call = self.clock.callLater(self._delay, self._retry)

    def _retry(self) -> None:
        self._retry_call = None
        self.kick()

    def startService(self) -> None:
        super().startService()
        self.kick()

    def stopService(self) -> defer.Deferred:
        super().stopService()
        if self._retry_call is not None and self._retry_call.active():
            self._retry_call.cancel()
        self._retry_call = None
        sending = self._sending
        if sending is None:
            return defer.succeed(None)
        waiter: defer.Deferred = defer.Deferred()
        sending.addBoth(lambda _: waiter.callback(None))
        return waiter
