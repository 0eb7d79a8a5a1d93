"""Fixtures for the agent tests: a fresh libvirt test-driver host per test, a started driver."""
from __future__ import annotations

from typing import Any, AsyncIterator, Callable

import libvirt
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from kvmdesk.agent.hypervisor import Hypervisor
from kvmdesk.agent.testdriver import write_test_host

#: Upper bound for anything that crosses threads (pool calls, libvirt events) in these tests.
TIMEOUT = 10.0


def _bounded(d: Deferred) -> Deferred:
    """``d`` failing with TimeoutError after :data:`TIMEOUT` seconds on the real reactor."""
    return d.addTimeout(TIMEOUT, reactor)


def _libvirt_error(code: int, domain: int, message: str) -> libvirt.libvirtError:
    """A libvirtError as the binding raises it, with a chosen code, origin and message."""
    error = libvirt.libvirtError(message)
    # The binding's err tuple: (code, domain, message, level, str1, str2, str3, int1, int2).
    error.err = (code, domain, message, libvirt.VIR_ERR_ERROR, None, None, None, -1, -1)
    return error


class _CountingOpener:
    """Wraps ``libvirt.open``: counts attempts and fails the first ``failures`` of them."""

    def __init__(self, failures: int = 0):
        self.failures = failures
        self.attempts = 0
        self.opened: list[libvirt.virConnect] = []

    def __call__(self, uri: str) -> libvirt.virConnect:
        self.attempts += 1
        if self.attempts <= self.failures:
            raise _libvirt_error(
                libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_FROM_RPC, "Failed to connect socket: Connection refused"
            )
        conn = libvirt.open(uri)
        self.opened.append(conn)
        return conn


@pytest.fixture
def bounded() -> Callable[[Deferred], Deferred]:
    """Bounds a Deferred by :data:`TIMEOUT` seconds (tests never wait unbounded, never sleep)."""
    return _bounded


@pytest.fixture
def libvirt_error() -> Callable[[int, int, str], libvirt.libvirtError]:
    """Builds a libvirtError with a chosen code, origin and message."""
    return _libvirt_error


@pytest.fixture
def counting_opener() -> type:
    """The class of openers that count attempts and fail the first N."""
    return _CountingOpener


@pytest.fixture
def host_uri(tmp_path) -> str:
    """A fresh test-driver node with no domains."""
    return write_test_host(tmp_path / "host.xml", hostname="node-a", cpus=4, memory_kib=8 * 1024 * 1024)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest_twisted.async_yield_fixture
async def start_hypervisor(clock: Clock) -> AsyncIterator[Callable[..., Any]]:
    """Start :class:`Hypervisor` services on the test clock; all are stopped at teardown, which
    also checks that nothing is left scheduled."""
    started: list[Hypervisor] = []

    async def start(uri: str, wait: bool = True, **kwargs: Any) -> Hypervisor:
        service = Hypervisor(uri=uri, clock=clock, **kwargs)
        service.startService()
        started.append(service)
        if wait:
            await _bounded(service.wait_connected())
        return service

    yield start
    for service in started:
        if service.running:
            await _bounded(service.stopService())
    assert clock.getDelayedCalls() == []
