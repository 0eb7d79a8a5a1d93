"""Fixtures of the core's unit tests: a real core on a temporary SQLite store, an injected clock.

Every core here runs with a :class:`twisted.internet.task.Clock` as its time source, so token expiry,
throttling and services are driven by advancing it; teardown asserts no delayed call was left on it.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import AsyncIterator

import pytest
import pytest_twisted
from twisted.internet.task import Clock

# The tests import their shared helpers (core_testlib) by name; pytest runs with --import-mode=importlib.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from core_testlib import running_api  # noqa: E402
from kvmdesk.testing.api import ApiClient  # noqa: E402


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest_twisted.async_yield_fixture
async def api(tmp_path: Path, clock: Clock) -> AsyncIterator[ApiClient]:
    """A logged-in client on a fresh core with the built-in plugins."""
    async with running_api(tmp_path, clock) as client:
        yield client


