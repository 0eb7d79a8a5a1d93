"""Teaching desktops on a real libvirtd + QEMU/KVM: a 3-desktop restore group over two agents (both on
the real libvirtd, each with its own storage), and a 1-desktop group without restore.

The guest is a 512-byte boot sector that waits for a key (BIOS int 16h) and then resets the machine
through the keyboard controller: the guest reboots itself, but only when the test presses a key
(libvirt's send-key), so nothing depends on how fast a busy host runs.  A restore desktop gets a fresh
overlay at every start anyway, so the marker is written while the desktops run, through QEMU's own
block layer (the monitor's ``qemu-io``); after the guest's reboot the restore desktop is back on a
fresh overlay without it, and the desktop without restore still has it after its own guest reboot.
Skipped without libvirtd/QEMU (the integration fixtures) or without the domain layer."""
from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor, task

pytest.importorskip("kvmdesk.protocol.domains")

from kvmdesk.testing.agents import AGENT_PASSWORD, free_port, nodes_controller, running_agent  # noqa: E402
from kvmdesk.testing.guests import boot_sector_disk  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit" / "storage"))
from storage_testlib import wait_all  # noqa: E402

pytestmark = pytest.mark.integration
HOSTS = ("127.0.0.2", "127.0.0.3")
POOLS = "/resource_mgr/resource_pools"
ROLES = ("template_sys", "template_data", "instance_sys", "instance_data")
#: mov ah,0; int 16h (wait for a key); mov al,FEh; out 64h,al (reset); jmp $
BOOT_SECTOR = bytes.fromhex("b400cd16b0fee664ebfe")
KEY_ENTER = 28  # Linux keycode
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


async def reset_guest(uri: str, domain_uuid: str, reset_seen, timeout: float = 120.0) -> None:
    """Make the guest reboot itself: press a key, and again while ``reset_seen()`` says it has not.

    The key is pressed from the test's own thread, like :func:`write_marker`'s monitor commands (the
    reactor's thread pool may be taken by what earlier tests of a whole run left there)."""
    deadline = time.monotonic() + timeout
    while not await reset_seen():
        if time.monotonic() > deadline:
            raise AssertionError(f"the guest of {domain_uuid} did not reset on a key press within {timeout} s")
        press_key(uri, domain_uuid)
        await until(reset_seen, "the guest's reset", timeout=3.0, quiet=True)


def watch_reboot(uri: str, domain_uuid: str) -> subprocess.Popen:
    """``virsh event`` ends at the domain's first ``reboot`` event (a guest reset without on_reboot=destroy)."""
    return subprocess.Popen(["virsh", "-q", "-c", uri, "event", "--domain", domain_uuid, "--event", "reboot",
                             "--timeout", "120"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def has_marker(overlay: Path) -> bool:
    """Read the marker's place (``-U``: the domain may be running and hold its lock)."""
    pattern, offset, length = MARKER
    done = subprocess.run(["qemu-io", "-r", "-U", "-f", "qcow2", "-c", f"read -P {pattern} {offset} {length}", str(overlay)],
                          capture_output=True, text=True, timeout=60)
    return done.returncode == 0 and "Pattern verification failed" not in done.stdout + done.stderr


def overlay_of(storage: Path, desktop: dict) -> Path:
    (found,) = [p for p in storage.rglob(f"{desktop['uuid']}-0") if p.is_file()]
    return found


async def until(condition, what: str, timeout: float = 90.0, quiet: bool = False) -> bool:
    """Wait for something a real guest and real daemons do in their own time (integration only);
    ``quiet``: answer False at the timeout instead of failing."""
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            if quiet:
                return False
            raise AssertionError(f"timed out waiting for {what}")
        await task.deferLater(reactor, 0.2, lambda: None)
    return True


async def domain_state(api, node: dict, desktop: dict) -> str:
    stored = await api.core.store.collection("nodes").find_one({"uuid": node["uuid"]})
    return (await api.core.extensions["agents"].call(stored, "GET", f"/domains/{desktop['uuid']}"))["state"]


async def ok(api, method, path, body=None, params=None):
    status, answer = await api.call(method, path, body, params=params) if params else await api.call(method, path, body)
    assert status == 200 and answer["code"] == 0, (method, path, answer)
    return answer["data"]


@pytest_twisted.ensureDeferred
async def test_restore_desktops_come_back_clean_after_a_guest_reboot(libvirtd, image_dir, tmp_path):
    port = free_port(*HOSTS)
    storages = [image_dir / "a", image_dir / "b"]
    settings = [{"libvirt_uri": libvirtd, "storage": {role: str(s) for role in ROLES}} for s in storages]
    config = {"templates": {"nic_kind": "user"}, "desktops": {"nic_kind": "user"}}
    async with running_agent(tmp_path / "agent-a", HOSTS[0], port, agent=settings[0]), \
            running_agent(tmp_path / "agent-b", HOSTS[1], port, agent=settings[1]), \
            nodes_controller(tmp_path / "controller", port, config=config) as api:
        pool = (await ok(api, "GET", POOLS))["results"][0]["uuid"]
        nodes = [await ok(api, "POST", f"{POOLS}/{pool}/nodes", {"ip": ip, "password": AGENT_PASSWORD}) for ip in HOSTS]
        distributor = api.core.extensions["storage.distributor"]
        distributor.startService()
        groups, templates = [], []
        run = uuid.uuid4().hex[:6]  # names of this run: domains on the shared libvirtd never collide
        try:
            arrived = wait_all(distributor, "done", [n["uuid"] for n in nodes])
            status, body = await api.upload(f"{POOLS}/{pool}/base_images", {"name": "reset", "os_type": "Linux"},
                                            {"file": ("reset.qcow2", boot_sector_disk(tmp_path / "reset.qcow2", BOOT_SECTOR).read_bytes())})
            assert status == 200, body
            image = body["data"]
            await arrived
            switch = await ok(api, "POST", "/resource_mgr/vswitchs", {"name": "sw", "type": "flat", "uplinks": []})
            network = await ok(api, "POST", "/resource_mgr/data_networks", {
                "name": "net", "switch_uuid": switch["uuid"],
                "subnet_info": {"name": "s", "start_ip": "10.9.0.10", "end_ip": "10.9.0.30", "netmask": "255.255.255.0",
                                "gateway": "10.9.0.1", "dns1": "10.9.0.1"}})
            subnet = await api.core.store.collection("subnets").find_one({"network_uuid": network["uuid"]})
            template = await ok(api, "POST", "/education/template", {"action": "create", "param": {
                "name": f"reset-tpl-{run}", "os_type": "Linux", "classify": 1, "pool_uuid": pool, "network_uuid": network["uuid"],
                "subnet_uuid": subnet["uuid"], "vcpu": 1, "ram": 0.0625, "system_disk": {"image_id": image["uuid"], "size": 1},
                "data_disks": []}})
            templates.append(template)
            await ok(api, "POST", "/education/template", {"action": "save", "param": {"name": template["name"],
                                                                                     "uuid": template["uuid"]}})
            teaching = await ok(api, "POST", "/education/group", {
                "name": "it-class", "group_type": 1, "desc": "", "network_uuid": network["uuid"], "subnet_uuid": subnet["uuid"],
                "start_ip": "10.9.0.100", "end_ip": "10.9.0.110"})

            def group_body(name, restore, create_info):
                return {"action": "create", "param": {
                    "name": name, "group_uuid": teaching["uuid"], "template_uuid": template["uuid"], "pool_uuid": pool,
                    "network_uuid": network["uuid"], "subnet_uuid": subnet["uuid"], "vcpu": 1, "ram": 0.0625,
                    "sys_restore": restore, "data_restore": 0, "instance_num": sum(create_info.values()),
                    "prefix": f"it{name}{run}", "postfix": 2, "create_info": create_info}}

            restore = await ok(api, "POST", "/education/desktop", group_body("r", 1, {HOSTS[0]: 2, HOSTS[1]: 1}))
            groups.append(restore)
            keep = await ok(api, "POST", "/education/desktop", group_body("k", 0, {HOSTS[0]: 1}))
            groups.append(keep)
            desktops = api.core.store.collection("desktops")
            watched = await desktops.find_one({"desktop_uuid": restore["uuid"], "node_ip": HOSTS[0]})
            kept = await desktops.find_one({"desktop_uuid": keep["uuid"]})
            events = api.core.extensions["nodes"].events  # every event the agents posted

            def guest_stops() -> int:
                # both agents watch the one libvirtd and report every domain: count the desktop's own node's
                return sum(1 for e in list(events) if e.get("uuid") == watched["uuid"] and e.get("event") == "stopped"
                           and e.get("node_uuid") == watched["node"])

            async def start(group) -> None:
                await ok(api, "POST", "/education/desktop", {"action": "start",
                                                             "param": {"desktops": [{"uuid": group["uuid"], "name": group["name"]}]}})

            # the guests wait for a key, so the markers go in before any reboot whatever the host's load
            await start(restore)
            watched_overlay = overlay_of(storages[0], watched)
            write_marker(libvirtd, watched["uuid"])
            assert has_marker(watched_overlay)
            await start(keep)
            kept_overlay = overlay_of(storages[0], kept)
            write_marker(libvirtd, kept["uuid"])
            assert has_marker(kept_overlay)
            shown = await ok(api, "GET", "/education/desktop", params={"searchtype": "single", "name": "r"})
            assert shown["active_count"] == 3
            assert guest_stops() == 0
            before = await desktops.find_one({"uuid": watched["uuid"]})

            async def stopped_by_its_guest() -> bool:
                return guest_stops() > 0

            async def restored_and_back() -> bool:
                # the stop event is recorded before the desktops plugin handles it: wait for the restart
                # itself (a new up_at written by the boot), not for a status that may still be the old one
                current = await desktops.find_one({"uuid": watched["uuid"]})
                return (current["up_at"] != before["up_at"] and current["status"] == "active"
                        and current["uuid"] not in api.core.extensions.get("desktops.busy", set()))

            await reset_guest(libvirtd, watched["uuid"], stopped_by_its_guest)
            await until(restored_and_back, "the restore desktop's restart after its guest's reboot")
            assert guest_stops() == 1  # one reset, one restart
            assert (await domain_state(api, nodes[0], watched)) == "running"
            assert not has_marker(overlay_of(storages[0], watched)), "a restore desktop kept its overlay across a reboot"

            watcher = watch_reboot(libvirtd, kept["uuid"])
            try:
                await task.deferLater(reactor, 0, lambda: None)

                async def kept_rebooted() -> bool:
                    return watcher.poll() is not None

                await reset_guest(libvirtd, kept["uuid"], kept_rebooted)
                output = watcher.communicate(timeout=60)[0]
            finally:
                if watcher.poll() is None:
                    watcher.kill()
                    watcher.wait()
            assert "reboot" in output, output
            assert has_marker(kept_overlay), "a desktop without restore lost its disk across its guest's reboot"
            assert (await domain_state(api, nodes[0], kept)) == "running"
        finally:
            deleted = [await api.call("DELETE", "/education/desktop", {"desktops": [{"uuid": g["uuid"], "name": g["name"]}]})
                       for g in groups]
            for template in templates:
                await api.call("DELETE", "/education/template", {"templates": [{"uuid": template["uuid"],
                                                                                "name": template["name"]}]})
            await distributor.stopService()
        assert all(status == 200 for status, _ in deleted), deleted
        assert await api.core.store.collection("desktops").count({}) == 0
