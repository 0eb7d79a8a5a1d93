"""quickstart.sh run: what it installs and starts for a real hypervisor, checked function by function with
stand-in commands on PATH (the real `run` is never started on this machine: it would start libvirtd and OVS)."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[3] / "quickstart.sh"


def shell(tmp_path: Path, code: str, commands: dict[str, int], systemd: bool = False,
          script: Path = SCRIPT) -> tuple[str, list[str]]:
    """Source quickstart.sh and run ``code`` with stand-ins for ``commands`` (name -> exit status).

    Returns the output and the stand-ins' calls, in order.
    """
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir(exist_ok=True)
    for name, status in commands.items():
        stand_in = bin_dir / name
        stand_in.write_text(f'#!/bin/sh\necho "{name} $*" >> {calls}\nexit {status}\n')
        stand_in.chmod(0o755)
    systemd_dir = tmp_path / "systemd"
    if systemd:
        systemd_dir.mkdir(exist_ok=True)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "SYSTEMD_DIR": str(systemd_dir), "RUN_DIR": str(tmp_path / "run")}
    done = subprocess.run(["bash", "-c", f"source {script}; {code}"], env=env, capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout, calls.read_text().splitlines() if calls.exists() else []


def test_run_installs_what_a_real_single_machine_setup_needs():
    text = SCRIPT.read_text()
    packages = text.split("RUN_PACKAGES=(", 1)[1].split(")", 1)[0].split()
    assert {"libvirt-daemon-system", "libvirt-daemon-driver-qemu", "qemu-system-x86", "openvswitch-switch",
            "curl"} <= set(packages)
    run = text.split("    run)", 1)[1].split(";;", 1)[0]
    order = [run.index(step) for step in ("install_packages", "prepare_kvm", "start_libvirt", "start_ovs", "exec")]
    assert order == sorted(order)


@pytest.mark.parametrize("module_loads, datapath", [(0, "system"), (1, "netdev")])
def test_the_ovs_datapath_follows_the_kernel_module(tmp_path, module_loads, datapath):
    output, calls = shell(tmp_path, "ovs_datapath", {"modprobe": module_loads})
    assert output.strip() == datapath
    assert calls == ["modprobe openvswitch"]
    written, _ = shell(tmp_path, f"write_machine_config {datapath} {tmp_path}", {})
    assert Path(written.strip()).read_text().splitlines()[1:] == ["[network]", f'ovs_datapath = "{datapath}"']


def running_daemon(tmp_path: Path, name: str, pid: int) -> None:
    """A pidfile for ``name`` under the script's RUN_DIR."""
    pidfile = tmp_path / "run" / f"{name}.pid"
    pidfile.parent.mkdir(parents=True, exist_ok=True)
    pidfile.write_text(f"{pid}\n")


def test_without_systemd_the_daemons_are_started_by_hand(tmp_path):
    _, calls = shell(tmp_path, "start_libvirt", {"pgrep": 0, "virtlogd": 0, "libvirtd": 0, "systemctl": 0})
    # No pidfile: started, even though pgrep (which sees a host's daemons from a chroot) would say running.
    assert calls == ["virtlogd -d", "libvirtd -d"]
    (tmp_path / "calls").unlink()
    running_daemon(tmp_path, "virtlogd", os.getpid())
    running_daemon(tmp_path, "libvirtd", os.getpid())
    _, calls = shell(tmp_path, "start_libvirt", {"virtlogd": 0, "libvirtd": 0})
    assert calls == []  # alive pids in their pidfiles: left alone
    # A stale pidfile (no such process) does not count as running.
    dead = subprocess.Popen(["true"])
    dead.wait()
    running_daemon(tmp_path, "libvirtd", dead.pid)
    _, calls = shell(tmp_path, "start_libvirt", {"virtlogd": 0, "libvirtd": 0})
    assert calls == ["libvirtd -d"]


def test_with_systemd_the_units_are_started(tmp_path):
    _, calls = shell(tmp_path, "start_libvirt", {"systemctl": 0, "libvirtd": 0}, systemd=True)
    assert calls == ["systemctl start virtlogd.socket libvirtd.socket virtlogd libvirtd"]


def test_userspace_ovs_runs_vswitchd_without_the_kernel_module(tmp_path):
    ctl_dir = tmp_path / "ovs-scripts"
    ctl_dir.mkdir()
    script = SCRIPT.read_text().replace("/usr/share/openvswitch/scripts/ovs-ctl", str(ctl_dir / "ovs-ctl"))
    patched = tmp_path / "quickstart.sh"
    patched.write_text(script)
    calls = tmp_path / "calls"
    ctl = ctl_dir / "ovs-ctl"
    ctl.write_text(f'#!/bin/sh\necho "ovs-ctl $*" >> {calls}\n')
    ctl.chmod(0o755)
    _, seen = shell(tmp_path, "start_ovs netdev", {"ovs-vswitchd": 0, "mkdir": 0}, script=patched)
    assert seen[0] == "ovs-ctl --no-ovs-vswitchd --system-id=random start"
    assert seen[-1].startswith("ovs-vswitchd unix:/var/run/openvswitch/db.sock --pidfile --detach")
    assert not any("--no-ovsdb-server" in call for call in seen)


def test_kvm_device_permissions_are_the_documented_fact():
    text = SCRIPT.read_text()
    assert "chgrp kvm /dev/kvm && chmod 0660 /dev/kvm" in text
    assert os.access(SCRIPT, os.X_OK)
