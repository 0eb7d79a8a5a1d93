"""Personal desktops on a real libvirtd + QEMU/KVM, through the desktop users' portal: a static desktop
(bound to one user, no restore) keeps what its user wrote across a guest reboot; a random desktop of a
restore group does not.

One agent on the real libvirtd; the guest (:mod:`kvmdesk.testing.guests`) reboots itself when the test
presses a key, so each reboot happens when the test asks, whatever the host's load.  The static
desktop's guest is reset in place by libvirt (its ``reboot`` event); the restore desktop's ends its
domain and the controller restores and restarts it: the test waits for that stop event and restart
(events and states, not durations).  Skipped without
libvirtd/QEMU (the integration fixtures) or without the domain layer."""
from __future__ import annotations

import sys
import uuid
from pathlib import Path

import pytest
import pytest_twisted

pytest.importorskip("kvmdesk.protocol.domains")

from kvmdesk.testing.agents import AGENT_PASSWORD, free_port, nodes_controller, running_agent  # noqa: E402
from kvmdesk.testing.guests import (  # noqa: E402
    BOOT_WAIT, KEY_RESET_BOOT_SECTOR, boot_sector_disk, domain_state, guest_template, has_marker, overlay_of,
    reboot_in_place, reset_guest, until, write_marker)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit" / "storage"))
from storage_testlib import wait_all  # noqa: E402

pytestmark = pytest.mark.integration
HOST = "127.0.0.2"
POOLS = "/resource_mgr/resource_pools"
GROUPS = "/personal/desktop/"
ROLES = ("template_sys", "template_data", "instance_sys", "instance_data")
PASSWORD = "it-user-pw"


async def ok(api, method, path, body=None, **kwargs):
    status, answer = await api.call(method, path, body, **kwargs)
    assert status == 200 and answer["code"] == 0, (method, path, answer)
    return answer["data"]


async def users_of(api, name: str, prefix: str) -> dict:
    """A user group with one user ``{prefix}1`` (the users plugin's API)."""
    group = await ok(api, "POST", "/personal/group", {"name": name, "group_type": 2})
    await ok(api, "POST", "/personal/user/", {"action": "single_create", "param": {
        "group_uuid": group["uuid"], "user_name": f"{prefix}1", "passwd": PASSWORD}})
    return group


async def portal_desktop(api, user_name: str) -> dict:
    """The desktop the portal gives ``user_name`` (started if it was off)."""
    login = await ok(api, "POST", "/portal/login", {"user_name": user_name, "password": PASSWORD}, auth=False)
    answer = await ok(api, "POST", "/portal/connect", {}, auth=False, headers={"Authorization": f"Bearer {login['token']}"})
    return answer["instance"]


@pytest_twisted.ensureDeferred
async def test_a_static_desktop_keeps_its_disk_across_a_guest_reboot_a_restore_random_one_does_not(libvirtd, image_dir,
                                                                                                  tmp_path):
    port = free_port(HOST)
    storage = image_dir / "a"
    config = {"templates": {"nic_kind": "user"}, "desktops": {"nic_kind": "user"}}
    async with running_agent(tmp_path / "agent", HOST, port, agent={"libvirt_uri": libvirtd,
                                                                     "storage": {role: str(storage) for role in ROLES}}), \
            nodes_controller(tmp_path / "controller", port, config=config) as api:
        pool = (await ok(api, "GET", POOLS))["results"][0]["uuid"]
        node = await ok(api, "POST", f"{POOLS}/{pool}/nodes", {"ip": HOST, "password": AGENT_PASSWORD})
        distributor = api.core.extensions["storage.distributor"]
        distributor.startService()
        groups, templates = [], []
        run = uuid.uuid4().hex[:6]  # names of this run: domains on the shared libvirtd never collide
        try:
            arrived = wait_all(distributor, "done", [node["uuid"]])
            guest = boot_sector_disk(tmp_path / "reset.qcow2", KEY_RESET_BOOT_SECTOR)
            status, body = await api.upload(f"{POOLS}/{pool}/base_images", {"name": "reset", "os_type": "Linux"},
                                            {"file": ("reset.qcow2", guest.read_bytes())})
            assert status == 200, body
            await arrived
            network, subnet, template = await guest_template(api, pool, body["data"]["uuid"], f"reset-tpl-{run}", classify=2,
                                                             net="10.9.1", created=templates)
            staff, students = await users_of(api, "staff", "st"), await users_of(api, "students", "s")
            staff_user = await api.core.store.collection("users").find_one({"user_name": "st1"})

            def group_body(name, desktop_type, restore, **extra):
                return {"action": "create", "param": {
                    "name": name, "template_uuid": template["uuid"], "pool_uuid": pool, "network_uuid": network["uuid"],
                    "subnet_uuid": subnet["uuid"], "allocate_type": 1, "vcpu": 1, "ram": 0.0625, "sys_restore": restore,
                    "data_restore": 0, "desktop_type": desktop_type, "instance_num": 1, "prefix": f"it{name}{run}",
                    "postfix": 2, "create_info": {HOST: 1}, **extra}}

            static = await ok(api, "POST", GROUPS, group_body("own", 2, 0, group_uuid=staff["uuid"], allocates=[
                {"user_uuid": staff_user["uuid"], "name": f"itown{run}01"}]))
            groups.append(static)
            shared = await ok(api, "POST", GROUPS, group_body("lab", 1, 1, groups=[students["uuid"]]))
            groups.append(shared)

            # Each user gets their desktop through the portal, which starts it; the marker goes in.
            kept = await portal_desktop(api, "st1")
            taken = await portal_desktop(api, "s1")
            assert (kept["name"], taken["name"]) == (f"itown{run}01", f"itlab{run}01")
            for desktop in (kept, taken):
                assert (await domain_state(api, node, desktop)) == "running"
                write_marker(libvirtd, desktop["uuid"])
                assert has_marker(overlay_of(storage, desktop))

            desktops = api.core.store.collection("desktops")
            events = api.core.extensions["nodes"].events  # every event the agent posted

            async def restored_after_its_guest_reboot(desktop: dict) -> None:
                """The guest reboots itself, which ends a restore desktop's domain (on_reboot=destroy); the
                controller sees it stop and brings it back restored (a new up_at)."""
                before = await desktops.find_one({"uuid": desktop["uuid"]})

                async def stopped_by_its_guest() -> bool:
                    return any(e.get("uuid") == desktop["uuid"] and e.get("event") == "stopped" for e in list(events))

                async def back() -> bool:
                    current = await desktops.find_one({"uuid": desktop["uuid"]})
                    return (current["up_at"] != before["up_at"] and current["status"] == "active"
                            and current["uuid"] not in api.core.extensions.get("desktops.busy", set()))

                await reset_guest(libvirtd, desktop["uuid"], stopped_by_its_guest)
                await until(back, f"{desktop['name']}'s restart after its guest's reboot", timeout=BOOT_WAIT)

            # The static desktop's guest reboots in place (libvirt restarts it: no restore).
            await reboot_in_place(libvirtd, kept["uuid"])
            assert (await domain_state(api, node, kept)) == "running"
            assert (await desktops.find_one({"uuid": kept["uuid"]}))["status"] == "active"
            assert has_marker(overlay_of(storage, kept)), "a static desktop lost its disk across a guest reboot"
            await restored_after_its_guest_reboot(taken)
            assert (await domain_state(api, node, taken)) == "running"
            assert not has_marker(overlay_of(storage, taken)), "a restore desktop kept its overlay across a guest reboot"
            assert has_marker(overlay_of(storage, kept))
        finally:
            deleted = await api.call("DELETE", GROUPS, {"desktops": [{"uuid": g["uuid"], "name": g["name"]} for g in groups]})
            await api.core.extensions["desktops.broker"].settled()
            for template in templates:
                await api.call("DELETE", "/education/template", {"templates": [{"uuid": template["uuid"],
                                                                                "name": template["name"]}]})
            await distributor.stopService()
        assert deleted[0] == 200, deleted
        assert await api.core.store.collection("desktops").count({}) == 0
