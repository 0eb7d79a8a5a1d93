"""Tiny real guests for real-KVM tests and benches: a disk whose first sector is the whole program."""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

from twisted.internet import reactor, task

#: cli; hlt; jmp back to the hlt: boots and then idles without using the CPU
HALTING_BOOT_SECTOR = bytes.fromhex("faf4ebfd")


def boot_sector_disk(path: Path, code: bytes = HALTING_BOOT_SECTOR, size: int = 1024 * 1024) -> Path:
    """A qcow2 at ``path`` of ``size`` bytes whose boot sector is ``code`` (at most 510 bytes) and the
    BIOS signature; the BIOS loads it at 0x7c00 and jumps to it."""
    if len(code) > 510:
        raise ValueError(f"a boot sector holds 510 bytes of code, not {len(code)}")
    raw = path.with_suffix(".raw")
    raw.write_bytes(code.ljust(510, b"\0") + b"\x55\xaa" + bytes(size - 512))
    try:
        subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(path)], check=True, timeout=60)
    finally:
        raw.unlink(missing_ok=True)
    return path


# -- a guest that reboots itself when a key is pressed, and a marker on its disk ------------------------
#
# The guest (KEY_RESET_BOOT_SECTOR) waits for a key (BIOS int 16h) and then resets the machine through
# the keyboard controller: it reboots itself, but only when the test presses a key (libvirt's
# send-key), so nothing depends on how fast a busy host runs.  A restore desktop runs with
# on_reboot=destroy (the reset ends the domain, the controller restores and restarts it); one without
# restore is reset in place by libvirt (its reboot event: reboot_in_place).  The marker is written
# while the domain runs, through QEMU's own block layer (the monitor's qemu-io; a restore desktop gets
# a fresh overlay at every start), and read from the overlay file with qemu-io -U.

#: mov ah,0; int 16h (wait for a key); mov al,FEh; out 64h,al (reset); jmp $
KEY_RESET_BOOT_SECTOR = bytes.fromhex("b400cd16b0fee664ebfe")
KEY_ENTER = 28  # Linux keycode
#: Seconds a guest may take to reach its boot sector: SeaBIOS took 75 s on a shared host at load 20.
BOOT_WAIT = 300.0
#: qemu-io's pattern byte, offset and length of the marker.
MARKER = ("0x5a", "1M", "64k")


def write_marker(uri: str, domain_uuid: str) -> None:
    """Write the marker into a running domain's system disk through QEMU (HMP ``qemu-io``)."""
    import libvirt
    import libvirt_qemu

    pattern, offset, length = MARKER
    conn = libvirt.open(uri)
    try:
        dom = conn.lookupByUUIDString(domain_uuid)
        # the disk's own block backend (another user of the node could not share its write permission)
        blocks = json.loads(libvirt_qemu.qemuMonitorCommand(dom, '{"execute": "query-block"}', 0))["return"]
        (qdev,) = [b["qdev"] for b in blocks if "virtio-disk0" in b.get("qdev", "") and b.get("inserted")]
        # qemu-io writes its report to QEMU's stdout: the monitor answers only errors; flush so the
        # qcow2 metadata reaches the file, where has_marker reads it
        for command in (f"write -P {pattern} {offset} {length}", "flush"):
            out = libvirt_qemu.qemuMonitorCommand(dom, f'qemu-io -d {qdev} "{command}"',
                                                  libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
            assert out.strip() == "", out
    finally:
        conn.close()


def has_marker(overlay: Path) -> bool:
    """Read the marker's place (``-U``: the domain may be running and hold its lock)."""
    pattern, offset, length = MARKER
    done = subprocess.run(["qemu-io", "-r", "-U", "-f", "qcow2", "-c", f"read -P {pattern} {offset} {length}", str(overlay)],
                          capture_output=True, text=True, timeout=60)
    return done.returncode == 0 and "Pattern verification failed" not in done.stdout + done.stderr


def overlay_of(storage: Path, desktop: dict) -> Path:
    """The system-disk overlay of ``desktop`` under an agent's ``storage`` directory."""
    (found,) = [p for p in storage.rglob(f"{desktop['uuid']}-0") if p.is_file()]
    return found


def press_key(uri: str, domain_uuid: str) -> None:
    """Press Enter in a running domain (a key that arrives while the BIOS still boots may be lost: the
    callers press again until they see the reset)."""
    import libvirt

    conn = libvirt.open(uri)
    try:
        conn.lookupByUUIDString(domain_uuid).sendKey(libvirt.VIR_KEYCODE_SET_LINUX, 0, [KEY_ENTER], 1, 0)
    except libvirt.libvirtError:
        pass  # the domain is resetting or gone: the reset the caller waits for is under way
    finally:
        conn.close()


async def until(condition: Callable[[], Awaitable[bool]], what: str, timeout: float = 90.0, quiet: bool = False) -> bool:
    """Wait for a state that a real guest and real daemons reach in their own time (integration only:
    the state is asked again every 0.2 s); ``quiet``: answer False at the timeout instead of failing."""
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            if quiet:
                return False
            raise AssertionError(f"timed out waiting for {what}")
        await task.deferLater(reactor, 0.2, lambda: None)
    return True


async def reset_guest(uri: str, domain_uuid: str, reset_seen: Callable[[], Awaitable[bool]],
                      timeout: float = BOOT_WAIT) -> None:
    """Make the guest reboot itself: press a key, and again while ``reset_seen()`` says it has not
    (keys pressed before the BIOS reads the keyboard are lost)."""
    deadline = time.monotonic() + timeout
    while not await reset_seen():
        if time.monotonic() > deadline:
            raise AssertionError(f"domain {domain_uuid}: no reset seen after {timeout:.0f} s of key presses")
        # from the test's own thread: the reactor's pool may be taken by what earlier tests left there
        press_key(uri, domain_uuid)
        await until(reset_seen, "the guest's reset", timeout=3.0, quiet=True)


def watch_reboot(uri: str, domain_uuid: str) -> subprocess.Popen:
    """``virsh event`` that ends at the domain's first ``reboot`` event: a guest reset of a domain
    that libvirt restarts in place (``on_reboot=restart``, a desktop without restore)."""
    return subprocess.Popen(["virsh", "-q", "-c", uri, "event", "--domain", domain_uuid, "--event", "reboot",
                             "--timeout", str(int(BOOT_WAIT) + 30)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


async def reboot_in_place(uri: str, domain_uuid: str) -> None:
    """Make the guest of a domain restarted in place reboot itself; returns at libvirt's reboot event."""
    watcher = watch_reboot(uri, domain_uuid)
    try:
        async def rebooted() -> bool:
            return watcher.poll() is not None

        await reset_guest(uri, domain_uuid, rebooted)
        output = watcher.communicate(timeout=10)[0]
        assert "reboot" in output, output
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait()


async def domain_state(api: Any, node: dict, desktop: dict) -> str:
    """The state of ``desktop``'s domain as its node's agent reports it."""
    stored = await api.core.store.collection("nodes").find_one({"uuid": node["uuid"]})
    return (await api.core.extensions["agents"].call(stored, "GET", f"/domains/{desktop['uuid']}"))["state"]


async def guest_template(api: Any, pool: str, image_uuid: str, name: str, *, classify: int, net: str,
                         created: list[dict]) -> tuple[dict, dict, dict]:
    """A flat data network with the subnet ``{net}.0/24`` and a saved template of the guest on it (one
    vCPU, 64 MiB, the uploaded guest image ``image_uuid`` as its disk), made through the API; the
    template is appended to ``created`` as soon as it exists (for the caller's clean-up).

    :returns: ``(network, subnet, template)``.
    """
    async def ok(method: str, path: str, body: dict) -> dict:
        status, answer = await api.call(method, path, body)
        assert status == 200 and answer["code"] == 0, (method, path, answer)
        return answer["data"]

    switch = await ok("POST", "/resource_mgr/vswitchs", {"name": f"sw-{name}", "type": "flat", "uplinks": []})
    network = await ok("POST", "/resource_mgr/data_networks", {
        "name": f"net-{name}", "switch_uuid": switch["uuid"],
        "subnet_info": {"name": "s", "start_ip": f"{net}.10", "end_ip": f"{net}.30", "netmask": "255.255.255.0",
                        "gateway": f"{net}.1", "dns1": f"{net}.1"}})
    subnet = await api.core.store.collection("subnets").find_one({"network_uuid": network["uuid"]})
    template = await ok("POST", "/education/template", {"action": "create", "param": {
        "name": name, "os_type": "Linux", "classify": classify, "pool_uuid": pool, "network_uuid": network["uuid"],
        "subnet_uuid": subnet["uuid"], "vcpu": 1, "ram": 0.0625, "system_disk": {"image_id": image_uuid, "size": 1},
        "data_disks": []}})
    created.append(template)
    await ok("POST", "/education/template", {"action": "save", "param": {"name": template["name"], "uuid": template["uuid"]}})
    return network, subnet, template


def tiny_domain_xml(name: str, disk: Path, *, vnc_password: str = "", user_nic: bool = False) -> str:
    """libvirt XML of a 64 MiB, one-vCPU domain booting the qcow2 ``disk``, with VNC on 127.0.0.1 (with
    ``vnc_password`` if given) and, with ``user_nic``, a user-mode NIC (no bridge on the host); KVM
    where /dev/kvm is usable, else QEMU's emulation."""
    kvm = os.path.exists("/dev/kvm") and os.access("/dev/kvm", os.R_OK | os.W_OK)
    nic = "\n    <interface type='user'><model type='virtio'/></interface>" if user_nic else ""
    password = f" passwd='{vnc_password}'" if vnc_password else ""
    video = "\n    <video><model type='vga'/></video>" if vnc_password else ""
    return f"""<domain type='{"kvm" if kvm else "qemu"}'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>{nic}
    <graphics type='vnc' listen='127.0.0.1' port='-1' autoport='yes'{password}/>{video}
  </devices>
</domain>
"""
