"""How the network plugin reaches node agents: the shared client (kvmdesk.nodeaccess), through one method.

The controller's agent client (:class:`~kvmdesk.nodeaccess.client.AgentClient`, created by the nodes plugin)
is published as ``core.extensions["agents"]``; anything with the :class:`AgentCalls` method fits (the
tests use in-process agents).  Paths are relative to the agent's API prefix (``/agent/v1``), e.g.
``/net/nics``; the call returns the ``data`` of the agent's envelope, or raises one of the client's
errors: :class:`AgentUnreachable` when the agent could not be asked (or not be trusted: the node is
treated as offline and brought in step when it returns), :class:`AgentCallError` when it answered with
an error envelope.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Protocol, runtime_checkable

from kvmdesk.core.errors import CATALOGUE, ApiError
from kvmdesk.plugins.network import errors as net_errors
from kvmdesk.nodeaccess.client import AgentCallError as AgentError
from kvmdesk.nodeaccess.client import AgentConnectionError, AgentUnreachable

__all__ = ["AgentCalls", "AgentConnectionError", "AgentError", "AgentRefused", "AgentUnreachable", "call", "client"]

EXTENSION = "agents"


@runtime_checkable
class AgentCalls(Protocol):
    """The generic authenticated call into a node's agent."""

    async def call(self, node: Mapping[str, Any], method: str, path: str, json: Any = None) -> Any:
        """Call ``method path`` on the agent of ``node``; return the ``data`` of its envelope.

        :raises AgentUnreachable: the agent could not be asked.
        :raises AgentError: the agent answered with an error.
        """


def client(core: Any) -> Optional[AgentCalls]:
    return core.extensions.get(EXTENSION)


def node_label(node: Mapping[str, Any]) -> str:
    return node.get("name") or node.get("hostname") or node.get("ip") or node.get("uuid", "?")


async def call(core: Any, node: Mapping[str, Any], method: str, path: str, json: Any = None) -> Any:
    """Call an agent for a request that cannot go on without it; failures become API errors.

    :raises ApiError: no client (503), node unreachable (503), or the agent's refusal (502, with the
        agent's code and message in ``data``).
    """
    agents = client(core)
    if agents is None:
        raise ApiError(net_errors.NO_AGENT_CLIENT)
    try:
        return await agents.call(node, method, path, json)
    except AgentUnreachable as exc:
        raise ApiError(net_errors.AGENT_UNREACHABLE, data={"node_uuid": node.get("uuid")}, node=node_label(node),
                       reason=exc.reason) from None
    except AgentError as exc:
        raise refused(node, exc) from None


class AgentRefused(ApiError):
    """The agent's refusal relayed by the controller: ``node X: <the agent's message>``.

    When the agent's code is in this process's catalogue and its envelope carried the message
    parameters (the agent's network errors do), the message is rendered again in the language of
    the controller's request; otherwise the agent's own text is used.
    """

    def __init__(self, node: Mapping[str, Any], exc: AgentError):
        data = {"node_uuid": node.get("uuid"), "agent_code": exc.code, "agent_msg": exc.msg}
        super().__init__(net_errors.AGENT_FAILED, data=data, node=node_label(node), reason=exc.msg)
        self.agent = exc

    def message(self, lang: str = "zh") -> str:
        entry = CATALOGUE.get(self.agent.code)
        params = self.agent.data.get("params") if isinstance(self.agent.data, Mapping) else None
        reason = entry.message(lang, params) if entry is not None and isinstance(params, Mapping) else self.agent.msg
        return self.error.message(lang, {**self.params, "reason": reason})


def refused(node: Mapping[str, Any], exc: AgentError) -> ApiError:
    return AgentRefused(node, exc)
