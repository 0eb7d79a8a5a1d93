"""The templates tests' world: two real in-process agents on libvirt's test driver (127.0.0.2, .3),
a controller that enrolled them through the API, a base image uploaded and distributed to both, and a
data network with a subnet."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import AsyncIterator

import pytest_twisted
from twisted.internet.task import Clock

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "storage"))

from templates_testlib import World, world_of  # noqa: E402


@pytest_twisted.async_yield_fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    clock = Clock()
    async with world_of(tmp_path, clock) as made:
        yield made
    assert clock.getDelayedCalls() == [], "a delayed call was left on the clock"
