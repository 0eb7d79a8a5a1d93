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

import sys
import uuid
from pathlib import Path

import pytest
import pytest_twisted

pytest.importorskip("kvmdesk.protocol.domains")

from kvmdesk.testing.agents import AGENT_PASSWORD, free_port, nodes_controller, running_agent  # noqa: E402
from kvmdesk.testing.guests import (KEY_RESET_BOOT_SECTOR, boot_sector_disk, domain_state, guest_template, has_marker,  # noqa: E402
                                    overlay_of, reboot_in_place, reset_guest, until, write_marker)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit" / "storage"))
from storage_testlib import wait_all  # noqa: E402

pytestmark = pytest.mark.integration
HOSTS = ("127.0.0.2", "127.0.0.3")
POOLS = "/resource_mgr/resource_pools"
ROLES = ("template_sys", "template_data", "instance_sys", "instance_data")
#: the guest waits for a key, then resets itself (kvmdesk.testing.guests)
BOOT_SECTOR = KEY_RESET_BOOT_SECTOR


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

            await reboot_in_place(libvirtd, kept["uuid"])  # returns at libvirt's reboot event
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
