"""Fixtures of the nodes tests: real agents on loopback addresses, each with its own test-driver host."""
from __future__ import annotations

from pathlib import Path
from typing import Any, AsyncIterator

import pytest
import pytest_twisted
from twisted.internet import reactor

from kvmdesk.nodeaccess.client import AgentClient
from kvmdesk.testing.agents import free_port, running_agent

ADDRESSES = ("127.0.0.2", "127.0.0.3", "127.0.0.4")


@pytest.fixture
def agent_port() -> int:
    return free_port(*ADDRESSES)


@pytest_twisted.async_yield_fixture
async def agent(tmp_path: Path, agent_port: int) -> AsyncIterator[Any]:
    """An in-process agent on 127.0.0.2 with one running and one stopped domain."""
    domains = [{"name": "vm-running", "vcpus": 2, "memory_kib": 1048576, "state": "running"},
               {"name": "vm-off", "vcpus": 1, "memory_kib": 524288, "state": "shutoff"}]
    async with running_agent(tmp_path / "agent-a", "127.0.0.2", agent_port, hostname="node-a",
                             domains=domains) as running:
        yield running


@pytest_twisted.async_yield_fixture
async def client(agent_port: int) -> AsyncIterator[AgentClient]:
    agents = AgentClient(reactor, agent_port, timeout=10)
    yield agents
    await agents.close()
