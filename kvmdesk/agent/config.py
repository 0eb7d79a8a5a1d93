"""The agent's configuration: built-in defaults, a TOML file, the command line, the environment."""
from __future__ import annotations

import copy
import os
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Mapping

from kvmdesk.core.config import Config, _merge
from kvmdesk.protocol.storage import STORAGE_ROLES

PASSWORD_ENV = "KVMDESK_AGENT_PASSWORD"

def agent_defaults() -> dict[str, Any]:
    """The documented defaults in ``kvmdesk/config/agent-defaults.toml``."""
    text = resources.files("kvmdesk.config").joinpath("agent-defaults.toml").read_text(encoding="utf-8")
    return tomllib.loads(text)


class AgentConfig(Config):
    """Layered like the controller's :class:`~kvmdesk.core.config.Config`, on the agent's defaults.

    ``KVMDESK_AGENT_PASSWORD`` (when set and not empty) overrides ``agent.password``.
    """

    def __init__(self, layers: Iterable[Mapping[str, Any]] = (), environ: Mapping[str, str] | None = None):
        self.data = agent_defaults()
        for layer in layers:
            _merge(self.data, copy.deepcopy(dict(layer)))
        env = os.environ if environ is None else environ
        if env.get(PASSWORD_ENV):
            self.set("agent.password", env[PASSWORD_ENV])

    @property
    def data_dir(self) -> Path:
        return Path(self.get("agent.data_dir")).absolute()

    def storage_paths(self) -> dict[str, str]:
        """Role key -> absolute directory (created on first use by the agent)."""
        default = str(self.data_dir / "storage")
        configured = self.get("agent.storage", {}) or {}
        return {role: str(Path(configured.get(role) or default).absolute()) for role in STORAGE_ROLES}
