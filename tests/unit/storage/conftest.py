"""Fixtures of the storage tests: an injected clock, agents on 127.0.0.2 and 127.0.0.3 (one port number)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import AsyncIterator

import pytest
import pytest_twisted
from twisted.internet.task import Clock

sys.path.insert(0, str(Path(__file__).resolve().parent))

from storage_testlib import InProcessAgent  # noqa: E402


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest_twisted.async_yield_fixture
async def agents(tmp_path: Path) -> AsyncIterator[list[InProcessAgent]]:
    """Two agents' image endpoints, on 127.0.0.2 and 127.0.0.3 with the same port (as real nodes would)."""
    first = InProcessAgent("127.0.0.2", tmp_path / "agent-a").start()
    second = InProcessAgent("127.0.0.3", tmp_path / "agent-b", port=first.port).start()
    running = [first, second]
    try:
        yield running  # a test that restarts an agent puts the new one in its place
    finally:
        for agent in running:
            await agent.stop()
