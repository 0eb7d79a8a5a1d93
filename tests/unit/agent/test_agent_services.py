"""Node services through a fake ``systemctl`` script that records its calls."""
from __future__ import annotations

import stat
from pathlib import Path

import pytest
import pytest_twisted

from kvmdesk.agent.services import (
    DEFAULT_UNITS,
    SHOW_PROPERTIES,
    PowerActionRefused,
    ServiceActionFailed,
    SystemdServices,
    SystemdUnavailable,
    UnitNotManaged,
    parse_show,
)

FAKE_SYSTEMCTL = """#!/bin/sh
here=$(dirname "$0")
echo "$*" >> "$here/calls.log"
if [ -f "$here/fail" ]; then cat "$here/fail" >&2; exit 1; fi
case "$1" in
  show) cat "$here/show.txt" ;;
esac
exit 0
"""

SHOW_OUTPUT = """Id=kvmdesk.service
Description=kvmdesk controller
LoadState=loaded
ActiveState=active
SubState=running
UnitFileState=enabled
MainPID=4242
ActiveEnterTimestamp=Tue 2024-03-05 14:07:09 UTC

Id=libvirtd.service
Description=Virtualization daemon
LoadState=not-found
ActiveState=inactive
SubState=dead
UnitFileState=
MainPID=0
ActiveEnterTimestamp=
"""


@pytest.fixture
def fake(tmp_path) -> Path:
    """A directory holding the fake systemctl, its canned output and its call log."""
    script = tmp_path / "systemctl"
    script.write_text(FAKE_SYSTEMCTL)
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    (tmp_path / "show.txt").write_text(SHOW_OUTPUT)
    return tmp_path


def _calls(fake: Path) -> list[str]:
    log = fake / "calls.log"
    return log.read_text().splitlines() if log.exists() else []


def _services(fake: Path, **kwargs) -> SystemdServices:
    # The fake's own directory exists, so it stands in for /run/systemd/system.
    kwargs.setdefault("units", ["kvmdesk", "libvirtd"])
    kwargs.setdefault("booted_marker", str(fake))
    return SystemdServices(systemctl=str(fake / "systemctl"), **kwargs)


@pytest_twisted.ensureDeferred
async def test_list_services_parses_systemctl_show(fake):
    services = await _services(fake).list_services()
    assert services == [
        {
            "name": "kvmdesk",
            "unit": "kvmdesk.service",
            "description": "kvmdesk controller",
            "state": "active",
            "sub_state": "running",
            "load_state": "loaded",
            "enabled": "enabled",
            "installed": True,
            "main_pid": 4242,
            "since": "Tue 2024-03-05 14:07:09 UTC",
            "reason": None,
        },
        {
            "name": "libvirtd",
            "unit": "libvirtd.service",
            "description": "Virtualization daemon",
            "state": "inactive",
            "sub_state": "dead",
            "load_state": "not-found",
            "enabled": None,
            "installed": False,
            "main_pid": None,
            "since": None,
            "reason": None,
        },
    ]
    assert _calls(fake) == ["show --property=" + ",".join(SHOW_PROPERTIES) + " -- kvmdesk libvirtd"]


@pytest_twisted.ensureDeferred
async def test_without_systemd_every_service_is_unknown_with_a_reason(fake):
    not_booted = await _services(fake, booted_marker=str(fake / "no-such-dir")).list_services()
    assert [(s["name"], s["state"]) for s in not_booted] == [("kvmdesk", "unknown"), ("libvirtd", "unknown")]
    assert all(s["reason"] == "systemd is not the init system (PID 1) on this node" for s in not_booted)

    no_binary = await SystemdServices(systemctl=None).list_services()
    assert [s["name"] for s in no_binary] == list(DEFAULT_UNITS)
    assert {s["reason"] for s in no_binary} == {"systemctl is not installed on this node"}
    assert _calls(fake) == []


@pytest_twisted.ensureDeferred
async def test_systemctl_failure_is_reported_as_unknown(fake):
    (fake / "fail").write_text("System has not been booted with systemd as init system (PID 1). Can't operate.\n")
    services = await _services(fake).list_services()
    assert {s["state"] for s in services} == {"unknown"}
    assert services[0]["reason"].startswith("System has not been booted with systemd")


@pytest_twisted.ensureDeferred
async def test_unexpected_show_output_is_reported_as_unknown(fake):
    services = await _services(fake, units=["kvmdesk", "libvirtd", "virtlogd"]).list_services()
    assert {s["state"] for s in services} == {"unknown"}
    assert services[0]["reason"] == "systemctl show returned 2 units for 3 asked"


@pytest_twisted.ensureDeferred
async def test_restart_a_managed_unit(fake):
    result = await _services(fake).restart("libvirtd")
    assert result == {"name": "libvirtd", "action": "restart", "ok": True}
    assert _calls(fake) == ["restart -- libvirtd"]


@pytest_twisted.ensureDeferred
async def test_restart_refuses_unmanaged_units_without_running_anything(fake):
    with pytest.raises(UnitNotManaged):
        await _services(fake).restart("sshd")
    assert _calls(fake) == []


@pytest_twisted.ensureDeferred
async def test_restart_failure_carries_systemctls_message(fake):
    (fake / "fail").write_text("Job for libvirtd.service failed because the control process exited.\n")
    with pytest.raises(ServiceActionFailed) as failed:
        await _services(fake).restart("libvirtd")
    assert "Job for libvirtd.service failed" in str(failed.value)


@pytest_twisted.ensureDeferred
async def test_restart_without_systemd(fake):
    with pytest.raises(SystemdUnavailable) as unavailable:
        await _services(fake, booted_marker=str(fake / "absent")).restart("kvmdesk")
    assert "not the init system" in str(unavailable.value)
    assert _calls(fake) == []


@pytest_twisted.ensureDeferred
async def test_power_actions_are_refused_unless_allowed(fake):
    guarded = _services(fake)
    with pytest.raises(PowerActionRefused) as refused:
        await guarded.reboot_node()
    assert "allow_power_actions = true" in str(refused.value)
    with pytest.raises(PowerActionRefused):
        await guarded.poweroff_node()
    assert _calls(fake) == []

    # Allowed, but pointed at the fake: the machine itself is never touched.
    allowed = _services(fake, allow_power_actions=True)
    assert await allowed.reboot_node() == {"action": "reboot", "ok": True}
    assert await allowed.poweroff_node() == {"action": "poweroff", "ok": True}
    assert _calls(fake) == ["reboot", "poweroff"]


def test_from_config():
    services = SystemdServices.from_config(
        {"services": ["kvmdesk-agent", "libvirtd"], "allow_power_actions": True, "systemctl": "/opt/bin/systemctl"}
    )
    assert services.units == ("kvmdesk-agent", "libvirtd")
    assert services.allow_power_actions is True
    assert services.systemctl == "/opt/bin/systemctl"
    defaults = SystemdServices.from_config({})
    assert defaults.units == DEFAULT_UNITS and defaults.allow_power_actions is False


def test_unit_names_that_look_like_options_are_rejected():
    with pytest.raises(ValueError):
        SystemdServices(units=["--force"])
    with pytest.raises(ValueError):
        SystemdServices(units=["kvmdesk; reboot"])


def test_parse_show_keeps_equals_signs_in_values():
    assert parse_show("ExecStart=a=b\nId=x.service\n\n\nId=y.service\n") == [
        {"ExecStart": "a=b", "Id": "x.service"},
        {"Id": "y.service"},
    ]
