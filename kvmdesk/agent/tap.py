"""``twistd -n kvmdesk-agent``: the node agent.

    twistd -n kvmdesk-agent --listen ADDR --port PORT --libvirt-uri URI --data-dir DIR [--config FILE]

The enrolment password comes from ``KVMDESK_AGENT_PASSWORD`` or the configuration's ``password``.
"""
from __future__ import annotations


from twisted.application import service
from twisted.python import usage

from kvmdesk.agent.config import AgentConfig
from kvmdesk.core.config import ConfigError, command_line_layers


class Options(usage.Options):
    """Command-line options; each overrides the configuration file (``agent-defaults.toml``)."""

    optParameters = [
        ["config", "c", None, "TOML configuration file (see kvmdesk/config/agent-defaults.toml)"],
        ["listen", "l", None, "address the agent listens on [default: 0.0.0.0]"],
        ["port", "p", None, "TCP port of the agent [default: 50005]", int],
        ["libvirt-uri", "u", None, "libvirt URI [default: qemu:///system]"],
        ["data-dir", "d", None, "directory for the enrolment secret and storage [default: ./kvmdesk-agent-data]"],
    ]

    def postOptions(self) -> None:
        try:
            layers = command_line_layers(self, {"listen": "agent.listen", "port": "agent.port",
                                                "libvirt-uri": "agent.libvirt_uri", "data-dir": "agent.data_dir"})
        except ConfigError as exc:
            raise usage.UsageError(str(exc)) from None
        self.config = AgentConfig(layers)


def makeService(options: Options) -> service.IService:
    """twistd's hook: the agent service for the parsed options."""
    from twisted.internet import reactor

    from kvmdesk.agent.service import Agent
    from kvmdesk.core.filemodes import private_umask
    from kvmdesk.core.process import exit_after_shutdown

    private_umask()  # the enrolment secret, images and logs are the agent's user's only
    agent = Agent(options.config)
    agent.fatal = lambda: exit_after_shutdown(reactor, 1)
    return agent
