"""Fixtures of the domain-layer tests: a real in-process agent on the test driver, enrolled, and a
signed client to it (the controller's own agent client)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, AsyncIterator

import pytest_twisted
from twisted.internet import reactor

from kvmdesk.nodeaccess.client import AgentClient
from kvmdesk.testing.agents import AGENT_PASSWORD, free_port, running_agent

IP = "127.0.0.2"


class SignedAgent:
    """An enrolled agent and the controller's client: ``await call(method, path, json)``."""

    def __init__(self, agent: Any, client: AgentClient, node: dict):
        self.agent = agent
        self.client = client
        self.node = node

    async def call(self, method: str, path: str, json: Any = None, **kwargs: Any) -> Any:
        return await self.client.call(self.node, method, path, json, **kwargs)

    def storage(self) -> Path:
        return Path(self.agent.config.get("agent.data_dir")) / "storage"


@pytest_twisted.async_yield_fixture
async def node(tmp_path: Path) -> AsyncIterator[SignedAgent]:
    port = free_port(IP)
    async with running_agent(tmp_path / "agent", IP, port, hostname="node-a") as agent:
        client = AgentClient(reactor, port, timeout=30)
        try:
            answer = await client.enrol(IP, AGENT_PASSWORD, "controller-1", "http://127.0.0.1:9/api/v1.0")
            yield SignedAgent(agent, client, {"ip": IP, "agent_secret": answer["secret"]})
        finally:
            await client.close()
