"""Teaching desktops on a real libvirtd + QEMU/KVM: a 3-desktop restore group over two agents (both on
the real libvirtd, each with its own storage), and a 1-desktop group without restore.

The guest is a 512-byte boot sector that waits ten seconds (BIOS int 15h, AH=86h) and then resets the
machine through the keyboard controller: a guest-initiated reboot every ten seconds.  A restore desktop
gets a fresh overlay at every start anyway, so the marker is written while the desktops run, through
QEMU's own block layer (the monitor's ``qemu-io``); after the guest's reboot the
restore desktop is back on a fresh overlay without it, and the desktop without restore still has it.
Skipped without libvirtd/QEMU (the integration fixtures) or without the domain layer."""
from __future__ import annotations

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
from kvmdesk.testing.guests import domain_state, guest_template, has_marker, overlay_of, write_marker  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit" / "storage"))
from storage_testlib import wait_all  # noqa: E402

pytestmark = pytest.mark.integration
HOSTS = ("127.0.0.2", "127.0.0.3")
POOLS = "/resource_mgr/resource_pools"
ROLES = ("template_sys", "template_data", "instance_sys", "instance_data")
#: mov ah,86h; mov cx,0098h; mov dx,9680h; int 15h (wait 10 s); mov al,FEh; out 64h,al (reset); jmp $
BOOT_SECTOR = bytes.fromhex("b486b99800ba8096cd15b0fee664ebfe")


def boot_disk(path: Path) -> Path:
    raw = path.with_suffix(".raw")
    raw.write_bytes(BOOT_SECTOR.ljust(510, b"\0") + b"\x55\xaa" + bytes(1024 * 1024 - 512))
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(path)], check=True, timeout=60)
    return path


async def until(condition, what: str, timeout: float = 90.0) -> None:
    """Wait for something a real guest and real daemons do in their own time (integration only)."""
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await task.deferLater(reactor, 0.2, lambda: None)


async def ok(api, method, path, body=None, params=None):
    status, answer = await api.call(method, path, body, params=params) if params else await api.call(method, path, body)
    assert status == 200 and answer["code"] == 0, (method, path, answer)
    return answer["data"]


@pytest.mark.flaky(reruns=1)  # a real guest reboots on its own timing: one more full try on a busy host
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
                                            {"file": ("reset.qcow2", boot_disk(tmp_path / "reset.qcow2").read_bytes())})
            assert status == 200, body
            image = body["data"]
            await arrived
            network, subnet, template = await guest_template(api, pool, image["uuid"], f"reset-tpl-{run}", classify=1,
                                                             net="10.9.0", created=templates)
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
                return sum(1 for e in list(events) if e.get("uuid") == watched["uuid"] and e.get("event") == "stopped")

            async def start(group) -> float:
                await ok(api, "POST", "/education/desktop", {"action": "start",
                                                             "param": {"desktops": [{"uuid": group["uuid"], "name": group["name"]}]}})
                return time.monotonic()

            # the marker goes in while each guest waits out its ten seconds (a start makes a fresh overlay)
            started = await start(restore)
            watched_overlay = overlay_of(storages[0], watched)
            write_marker(libvirtd, watched["uuid"])
            assert has_marker(watched_overlay)
            assert time.monotonic() - started < 8, "the marker must be written before the guest's first reboot"
            started = await start(keep)
            kept_overlay = overlay_of(storages[0], kept)
            write_marker(libvirtd, kept["uuid"])
            assert has_marker(kept_overlay)
            assert time.monotonic() - started < 8, "the marker must be written before the guest's first reboot"
            shown = await ok(api, "GET", "/education/desktop", params={"searchtype": "single", "name": "r"})
            assert shown["active_count"] == 3
            assert guest_stops() == 0

            async def rebooted_and_back() -> bool:
                if guest_stops() == 0:
                    return False
                current = await desktops.find_one({"uuid": watched["uuid"]})
                return current["status"] == "active" and current["uuid"] not in api.core.extensions.get("desktops.busy", set())

            await until(rebooted_and_back, "the restore desktop's guest reboot and its restart")
            assert (await domain_state(api, nodes[0], watched)) == "running"
            assert not has_marker(overlay_of(storages[0], watched)), "a restore desktop kept its overlay across a reboot"
            assert has_marker(kept_overlay), "a desktop without restore lost its disk"
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
