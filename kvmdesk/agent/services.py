"""The node's kvmdesk-related systemd services, and node reboot / power-off.

``systemctl`` runs as a child process through Twisted (never blocking the reactor); its ``show``
output (``Key=value`` lines, one block per unit) is systemd's stable machine-readable format.
Where systemd is not running (containers, CI) every service is reported with state ``unknown`` and
the reason, instead of failing.  Power actions run only when the agent's configuration allows them.
"""
from __future__ import annotations

import os
import re
import shutil
from typing import Any, Iterable, Mapping, Sequence

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import Logger

log = Logger()

#: Units listed when the configuration names none.
DEFAULT_UNITS = ("kvmdesk", "kvmdesk-agent", "libvirtd", "virtlogd", "ovs-vswitchd", "ovsdb-server")

#: Properties asked of ``systemctl show``.
SHOW_PROPERTIES = (
    "Id",
    "Description",
    "LoadState",
    "ActiveState",
    "SubState",
    "UnitFileState",
    "MainPID",
    "ActiveEnterTimestamp",
)

#: sd_booted(3): this directory exists only when PID 1 is systemd.
SYSTEMD_BOOTED_MARKER = "/run/systemd/system"

# Unit names as systemd allows them; the leading character rules out anything read as an option.
_UNIT_NAME = re.compile(r"^[A-Za-z0-9:_.\\@][A-Za-z0-9:_.\\@-]*$")

# C locale: timestamps and messages in a fixed format; a fixed PATH: systemctl may exec helpers.
_ENV = {"LC_ALL": "C", "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}


class ServiceError(Exception):
    """A service or power action could not be carried out."""


class SystemdUnavailable(ServiceError):
    """systemctl is missing or systemd is not PID 1."""


class UnitNotManaged(ServiceError):
    """The unit is not in the agent's configured list."""


class ServiceActionFailed(ServiceError):
    """systemctl ran and reported a failure."""


class PowerActionRefused(ServiceError):
    """Node reboot/power-off is disabled in this agent's configuration."""


def parse_show(output: str) -> list[dict[str, str]]:
    """Parse ``systemctl show`` output: one dict per unit, in the order the units were given.

    Blocks are separated by blank lines; a value may itself contain ``=``.
    """
    blocks: list[dict[str, str]] = []
    current: dict[str, str] = {}
    for line in output.splitlines():
        if not line.strip():
            if current:
                blocks.append(current)
                current = {}
            continue
        key, sep, value = line.partition("=")
        if sep:
            current[key] = value
    if current:
        blocks.append(current)
    return blocks


def _unknown(name: str, reason: str) -> dict[str, Any]:
    return {
        "name": name,
        "unit": None,
        "description": None,
        "state": "unknown",
        "sub_state": None,
        "load_state": None,
        "enabled": None,
        "installed": None,
        "main_pid": None,
        "since": None,
        "reason": reason,
    }


def _from_show(name: str, props: Mapping[str, str]) -> dict[str, Any]:
    main_pid = props.get("MainPID", "")
    load_state = props.get("LoadState") or None
    return {
        "name": name,
        "unit": props.get("Id") or None,
        "description": props.get("Description") or None,
        "state": props.get("ActiveState") or "unknown",
        "sub_state": props.get("SubState") or None,
        "load_state": load_state,
        # Not-found units report an empty UnitFileState.
        "enabled": props.get("UnitFileState") or None,
        "installed": None if load_state is None else load_state != "not-found",
        "main_pid": int(main_pid) if main_pid.isdigit() and int(main_pid) > 0 else None,
        "since": props.get("ActiveEnterTimestamp") or None,
        "reason": None,
    }


def _first_line(data: bytes) -> str:
    text = data.decode("utf-8", "replace").strip()
    return text.splitlines()[0] if text else ""


def _check_unit_name(unit: str) -> str:
    if not _UNIT_NAME.match(unit):
        raise ValueError(f"invalid systemd unit name: {unit!r}")
    return unit


def _units(value: Iterable[str]) -> tuple[str, ...]:
    return tuple(_check_unit_name(unit) for unit in value)


def _default_reactor() -> Any:
    from twisted.internet import reactor

    return reactor


@attrs.define
class SystemdServices:
    """The node's services through ``systemctl``.

    :param units: the units this agent lists and may restart.
    :param systemctl: path of the executable (``None``: not installed); tests point it at a script.
    :param allow_power_actions: the agent configuration's ``allow_power_actions``.
    :param booted_marker: the sd_booted(3) directory; tests point it at a directory that exists.
    :param timeout: seconds before a systemctl call is given up on.
    :param reactor: spawns the processes and times them out.
    """

    units: tuple[str, ...] = attrs.field(default=DEFAULT_UNITS, converter=_units)
    systemctl: str | None = attrs.field(factory=lambda: shutil.which("systemctl"))
    allow_power_actions: bool = False
    booted_marker: str = SYSTEMD_BOOTED_MARKER
    timeout: float = 120.0
    reactor: Any = attrs.field(factory=_default_reactor)

    @classmethod
    def from_config(cls, agent: Mapping[str, Any], **overrides: Any) -> "SystemdServices":
        """Build from the agent's configuration section.

        Keys: ``services`` (unit list), ``systemctl`` (path), ``allow_power_actions`` (bool).
        """
        kwargs: dict[str, Any] = {"allow_power_actions": bool(agent.get("allow_power_actions", False))}
        if agent.get("services"):
            kwargs["units"] = agent["services"]
        if agent.get("systemctl"):
            kwargs["systemctl"] = agent["systemctl"]
        kwargs.update(overrides)
        return cls(**kwargs)

    def unavailable_reason(self) -> str | None:
        """Why systemd cannot be used here, or ``None`` when it can.

        Two ``stat`` calls on local files; cheap enough for the reactor thread.
        """
        if not self.systemctl or not os.access(self.systemctl, os.X_OK):
            return "systemctl is not installed on this node"
        if not os.path.isdir(self.booted_marker):
            return "systemd is not the init system (PID 1) on this node"
        return None

    def _systemctl(self, args: Sequence[str]) -> Deferred[tuple[bytes, bytes, int]]:
        assert self.systemctl is not None
        d = getProcessOutputAndValue(self.systemctl, list(args), env=_ENV, reactor=self.reactor)

        def killed(failure: Any) -> Any:
            # getProcessOutputAndValue errbacks with a bare (out, err, signal) tuple when the
            # child dies of a signal.
            if isinstance(failure.value, tuple) and len(failure.value) == 3:
                out, err, signal = failure.value
                return out, err, 128 + int(signal)
            return failure

        d.addErrback(killed)
        d.addTimeout(self.timeout, self.reactor)
        return d

    def list_services(self) -> Deferred[list[dict[str, Any]]]:
        """The configured services and their states.

        :returns: one dict per unit, in configuration order: ``{"name", "unit", "description",
            "state", "sub_state", "load_state", "enabled", "installed", "main_pid", "since",
            "reason"}``; ``state`` is systemd's ActiveState (``active``, ``inactive``,
            ``failed``, ...) or ``unknown`` with ``reason`` saying why.
        """
        reason = self.unavailable_reason()
        if reason is not None:
            return succeed([_unknown(unit, reason) for unit in self.units])
        args = ["show", "--property=" + ",".join(SHOW_PROPERTIES), "--", *self.units]
        d = self._systemctl(args)

        def parsed(result: tuple[bytes, bytes, int]) -> list[dict[str, Any]]:
            out, err, code = result
            if code != 0:
                why = _first_line(err) or f"systemctl exited with status {code}"
                return [_unknown(unit, why) for unit in self.units]
            blocks = parse_show(out.decode("utf-8", "replace"))
            if len(blocks) != len(self.units):
                why = f"systemctl show returned {len(blocks)} units for {len(self.units)} asked"
                return [_unknown(unit, why) for unit in self.units]
            return [_from_show(unit, props) for unit, props in zip(self.units, blocks)]

        def failed(failure: Any) -> list[dict[str, Any]]:
            why = f"systemctl failed: {failure.getErrorMessage()}"
            log.warn("{why}", why=why)
            return [_unknown(unit, why) for unit in self.units]

        return d.addCallbacks(parsed, failed)

    def _act(self, args: Sequence[str], result: dict[str, Any]) -> Deferred[dict[str, Any]]:
        reason = self.unavailable_reason()
        if reason is not None:
            return fail(SystemdUnavailable(reason))
        log.info("running systemctl {args}", args=" ".join(args))

        def checked(outcome: tuple[bytes, bytes, int]) -> dict[str, Any]:
            _out, err, code = outcome
            if code != 0:
                why = _first_line(err) or f"systemctl exited with status {code}"
                raise ServiceActionFailed(f"systemctl {' '.join(args)} failed: {why}")
            return result

        return self._systemctl(args).addCallback(checked)

    def restart(self, unit: str) -> Deferred[dict[str, Any]]:
        """Restart one of the configured units.

        :returns: ``{"name", "action": "restart", "ok": True}``.
        :raises UnitNotManaged: (as a failed Deferred) for a unit not in the list.
        :raises SystemdUnavailable: when systemd cannot be used here.
        :raises ServiceActionFailed: when systemctl reports a failure.
        """
        if unit not in self.units:
            return fail(UnitNotManaged(f"{unit!r} is not one of this node's managed services"))
        return self._act(["restart", "--", unit], {"name": unit, "action": "restart", "ok": True})

    def _power(self, action: str) -> Deferred[dict[str, Any]]:
        if not self.allow_power_actions:
            return fail(
                PowerActionRefused(
                    f"node {action} refused: power actions are disabled on this agent "
                    "(set allow_power_actions = true in its configuration to enable them)"
                )
            )
        return self._act([action], {"action": action, "ok": True})

    def reboot_node(self) -> Deferred[dict[str, Any]]:
        """Reboot the node (``systemctl reboot``) if the configuration allows it.

        :raises PowerActionRefused: (as a failed Deferred) when ``allow_power_actions`` is off.
        """
        return self._power("reboot")

    def poweroff_node(self) -> Deferred[dict[str, Any]]:
        """Power the node off (``systemctl poweroff``) if the configuration allows it.

        :raises PowerActionRefused: (as a failed Deferred) when ``allow_power_actions`` is off.
        """
        return self._power("poweroff")
