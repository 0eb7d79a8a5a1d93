"""Configuration: built-in defaults, plugin defaults, a TOML file, then command-line overrides."""
from __future__ import annotations

import copy
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Mapping


class ConfigError(Exception):
    """The configuration file is missing, unreadable or malformed."""


def _merge(base: dict, override: Mapping) -> dict:
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def builtin_defaults() -> dict[str, Any]:
    """The documented defaults shipped in ``kvmdesk/config/defaults.toml``."""
    text = resources.files("kvmdesk.config").joinpath("defaults.toml").read_text(encoding="utf-8")
    return tomllib.loads(text)


def load_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML configuration file.

    :raises ConfigError: the file cannot be read or is not valid TOML.
    """
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"cannot read configuration file {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"configuration file {path} is not valid TOML: {exc}") from exc


def command_line_layers(options: Mapping[str, Any], keys: Mapping[str, str]) -> list[dict[str, Any]]:
    """Configuration layers from twistd options: the ``--config`` file, then the options given.

    :param keys: option name -> dotted configuration key (``{"port": "controller.port"}``).
    :raises ConfigError: the file named by ``--config`` is unreadable or malformed.
    """
    layers: list[dict[str, Any]] = []
    if options.get("config"):
        layers.append(load_file(options["config"]))
    overrides: dict[str, Any] = {}
    for option, dotted in keys.items():
        value = options.get(option)
        if value is None or value == "":
            continue
        *parents, leaf = dotted.split(".")
        node = overrides
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    layers.append(overrides)
    return layers


class Config:
    """Layered configuration, read with dotted keys: ``config.get("controller.port")``."""

    def __init__(self, layers: Iterable[Mapping[str, Any]] = ()):
        self.data: dict[str, Any] = builtin_defaults()
        for layer in layers:
            self.merge(layer)

    def merge(self, layer: Mapping[str, Any]) -> None:
        """Apply ``layer`` over the current values."""
        _merge(self.data, layer)

    def add_defaults(self, defaults: Mapping[str, Any]) -> None:
        """Add a plugin's defaults underneath the values already set."""
        self.data = _merge(copy.deepcopy(dict(defaults)), self.data)

    def get(self, dotted: str, default: Any = None) -> Any:
        node: Any = self.data
        for key in dotted.split("."):
            # dict, not Mapping: every layer is parsed TOML or a dict, and the ABC check made this
            # lookup, done on every request, several times slower.
            if not isinstance(node, dict) or key not in node:
                return default
            node = node[key]
        return node

    def number(self, dotted: str, default: float, *, minimum: float = 0) -> float:
        """A numeric setting, at least ``minimum``.

        :raises ConfigError: the value is not a number or is below ``minimum`` (named in the message).
        """
        value = self.get(dotted, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum:
            raise ConfigError(f"{dotted} must be a number of at least {minimum:g}, not {value!r}")
        return value

    def section(self, name: str) -> dict[str, Any]:
        """A section as a dict (empty if absent)."""
        value = self.data.get(name, {})
        return value if isinstance(value, dict) else {}

    def set(self, dotted: str, value: Any) -> None:
        *parents, leaf = dotted.split(".")
        node = self.data
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
