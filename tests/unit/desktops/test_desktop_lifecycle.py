"""Desktop groups on real agents (libvirt's test driver, two in-process agents): create over two
nodes, start through admission, reboot onto fresh overlays, a guest stop that comes back restored,
stop, delete; a create that fails on one node leaves nothing on any node.

Runs on the templates plugin's world (agents, controller, base image, network); skipped where the
domain layer (kvmdesk.protocol.domains) is not installed."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.internet.task import Clock

pytest.importorskip("kvmdesk.protocol.domains")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "templates"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "storage"))

from templates_testlib import HOSTS, T, world_of  # noqa: E402

from kvmdesk.plugins.desktops import power, schema  # noqa: E402

from .conftest import DESKTOP_GROUPS, EN, INSTANCES, failed, ok  # noqa: E402


async def saved_template(world) -> dict:
    template = await world.create(data_disks=[])
    ok(*await world.api.call("POST", T, {"action": "save", "param": {"name": template["name"], "uuid": template["uuid"]}}))
    return await world.core.store.collection("templates").find_one({"uuid": template["uuid"]})


async def teaching_group(world) -> dict:
    return ok(*await world.api.call("POST", "/education/group", {
        "name": "class1", "group_type": 1, "desc": "", "network_uuid": world.network["uuid"],
        "subnet_uuid": world.subnet["uuid"], "start_ip": "172.16.1.100", "end_ip": "172.16.1.120"}))


def create_body(world, teaching, template, name="dg1", create_info=None, sys_restore=1) -> dict:
    create_info = create_info or {HOSTS[0]: 2, HOSTS[1]: 1}
    return {"action": "create", "param": {
        "name": name, "group_uuid": teaching["uuid"], "template_uuid": template["uuid"], "pool_uuid": world.pool,
        "network_uuid": world.network["uuid"], "subnet_uuid": world.subnet["uuid"], "vcpu": 1, "ram": 0.25,
        "sys_restore": sys_restore, "data_restore": 0, "instance_num": sum(create_info.values()), "prefix": name + "pc",
        "postfix": 2, "postfix_start": 1, "create_info": create_info}}


def overlay_paths(world) -> list[Path]:
    return [p for agent in world.agents for p in (agent.data_dir / "storage").rglob("*") if p.is_file() and "_instance" in str(p)]


def mark_overlays(world) -> set[str]:
    """Put a marker on every overlay (an mtime of 1970): a fresh overlay is a new file without it."""
    for path in overlay_paths(world):
        os.utime(path, (1, 1))
    return marked(world)


def marked(world) -> set[str]:
    return {p.name for p in overlay_paths(world) if p.stat().st_mtime == 1}


async def guest_stops(world, desktop: dict) -> None:
    """The guest ends its domain (a reboot under on_reboot=destroy); the agent's event reaches the controller."""
    agent = world.agents[HOSTS.index(desktop["node_ip"])]
    await agent.hypervisor.destroy(desktop["uuid"])
    node = next(n for n in world.nodes if n["ip"] == desktop["node_ip"])
    stored = await world.core.store.collection("nodes").find_one({"uuid": node["uuid"]})
    await world.core.extensions["nodes"].receive_events(stored, [{"uuid": desktop["uuid"], "name": desktop["name"],
                                                                  "event": "stopped", "detail": "destroyed", "seq": 1,
                                                                  "at": 0}])
    # The agent posts the same event over HTTP too: whichever came first is handled, the other finds the
    # desktop busy or back on; wait for the desktop's operation in progress, if any.
    await power.locks(world.core).run(desktop["uuid"], lambda: defer.succeed(None))


def overlay_files(world) -> list[list[str]]:
    return [sorted(p.name for p in (agent.data_dir / "storage").rglob("*") if p.is_file() and "_instance" in str(p))
            for agent in world.agents]


async def domain_states(world) -> dict[str, str]:
    return {d["name"]: d["state"] for agent in world.agents for d in await agent.hypervisor.list_domains()
            if not d["name"].startswith("tpl-")}


async def desktops_of(world, group_uuid) -> list[dict]:
    return await world.core.store.collection(schema.DESKTOPS).find({"desktop_uuid": group_uuid}, sort=[("name", 1)])


@pytest_twisted.ensureDeferred
async def test_a_restore_group_from_create_to_delete(tmp_path):
    clock = Clock()
    async with world_of(tmp_path, clock) as world:
        template = await saved_template(world)
        teaching = await teaching_group(world)
        group = ok(*await world.api.call("POST", DESKTOP_GROUPS, create_body(world, teaching, template)))
        assert (group["instance_num"], group["inactive_count"], group["active"]) == (3, 3, True)
        desktops = await desktops_of(world, group["uuid"])
        assert [(d["name"], d["node_ip"]) for d in desktops] == [("dg1pc01", HOSTS[0]), ("dg1pc02", HOSTS[0]),
                                                                  ("dg1pc03", HOSTS[1])]
        assert len({d["ipaddr"] for d in desktops}) == 3
        assert await domain_states(world) == {"dg1pc01": "shutoff", "dg1pc02": "shutoff", "dg1pc03": "shutoff"}
        files_before = overlay_files(world)
        assert [len(f) for f in files_before] == [2, 1]

        ref = {"desktops": [{"uuid": group["uuid"], "name": "dg1"}]}
        ok(*await world.api.call("POST", DESKTOP_GROUPS, {"action": "start", "param": ref}))
        assert set((await domain_states(world)).values()) == {"running"}
        (shown,) = ok(*await world.api.call("GET", DESKTOP_GROUPS))["results"]
        assert (shown["active_count"], shown["inactive_count"]) == (3, 0)
        figures = world.core.extensions["start_admission"].figures()
        assert all(f["peak"] <= f["limit_at_peak"] and f["worst_excess"] <= 0 for f in figures.values()), figures

        # reboot of a restore group: off, fresh overlays, on
        assert len(mark_overlays(world)) == 3
        ok(*await world.api.call("POST", DESKTOP_GROUPS, {"action": "reboot", "param": ref}))
        assert set((await domain_states(world)).values()) == {"running"}
        assert marked(world) == set() and len(overlay_paths(world)) == 3

        # the guest of dg1pc02 reboots (on_reboot=destroy ends the domain): it comes back on a fresh overlay
        everything = mark_overlays(world)
        await guest_stops(world, desktops[1])
        assert (await domain_states(world))["dg1pc02"] == "running"
        assert everything - marked(world) == {f"{desktops[1]['uuid']}-0"}

        # one desktop: stop, then start again; the listing shows it
        one = desktops[0]
        param = {"desktop_uuid": group["uuid"], "desktop_name": "dg1", "desktop_type": 1,
                 "instances": [{"uuid": one["uuid"], "name": one["name"]}]}
        ok(*await world.api.call("POST", INSTANCES, {"action": "stop", "param": param}))
        assert (await domain_states(world))["dg1pc01"] == "shutoff"
        page = ok(*await world.api.call("GET", INSTANCES, params={"desktop_uuid": group["uuid"]}))
        assert [d["status"] for d in page["results"]] == ["inactive", "active", "active"]

        # deactivated groups do not start; reactivated they do
        ok(*await world.api.call("POST", DESKTOP_GROUPS, {"action": "inactive", "param": ref}))
        status, body = await world.api.call("POST", INSTANCES, {"action": "start", "param": param}, headers=EN)
        failed(status, body, 409, 6044)
        ok(*await world.api.call("POST", DESKTOP_GROUPS, {"action": "active", "param": ref}))
        ok(*await world.api.call("POST", INSTANCES, {"action": "start", "param": param}))
        assert (await domain_states(world))["dg1pc01"] == "running"

        # add one desktop on the second node: named after the highest number
        added = ok(*await world.api.call("POST", INSTANCES, {"action": "create", "param": {
            "desktop_uuid": group["uuid"], "desktop_name": "dg1", "desktop_type": 1, "instance_num": 1,
            "create_info": {HOSTS[1]: 1}}}))
        assert [d["name"] for d in added["instances"]] == ["dg1pc04"]

        # delete a running desktop: it is stopped first, its address given back
        ok(*await world.api.call("DELETE", INSTANCES, {**param, "instances": param["instances"]}))
        assert "dg1pc01" not in await domain_states(world)
        owners = [a["owner"] for a in await world.core.extensions["ipam"].allocations(world.subnet["uuid"])]
        assert f"desktop:{one['uuid']}" not in owners

        # stop the group (#85): every desktop is off (restore desktops are destroyed) and stays off
        answer = ok(*await world.api.call("POST", DESKTOP_GROUPS, {"action": "stop", "param": ref}))
        assert (answer["success_num"], answer["failed_num"]) == (1, 0)
        assert set((await domain_states(world)).values()) == {"shutoff"}
        (shown,) = ok(*await world.api.call("GET", DESKTOP_GROUPS))["results"]
        assert (shown["active_count"], shown["inactive_count"]) == (0, 3)
        assert {(d["status"], d["power"]) for d in await desktops_of(world, group["uuid"])} == {("inactive", "off")}

        # delete the group: every domain, overlay, address and record goes
        ok(*await world.api.call("DELETE", DESKTOP_GROUPS, ref))
        assert await domain_states(world) == {}
        assert overlay_files(world) == [[], []]
        owners = [a["owner"] for a in await world.core.extensions["ipam"].allocations(world.subnet["uuid"])]
        assert not [o for o in owners if o.startswith("desktop:")]
        assert await world.core.store.collection(schema.DESKTOPS).count({}) == 0


@pytest_twisted.ensureDeferred
async def test_a_group_without_restore_keeps_its_disks(tmp_path):
    clock = Clock()
    async with world_of(tmp_path, clock) as world:
        template = await saved_template(world)
        teaching = await teaching_group(world)
        group = ok(*await world.api.call("POST", DESKTOP_GROUPS, create_body(world, teaching, template, "keep",
                                                                            {HOSTS[0]: 1}, sys_restore=0)))
        ref = {"desktops": [{"uuid": group["uuid"], "name": "keep"}]}
        ok(*await world.api.call("POST", DESKTOP_GROUPS, {"action": "start", "param": ref}))
        kept = mark_overlays(world)
        ok(*await world.api.call("POST", DESKTOP_GROUPS, {"action": "reboot", "param": ref}))
        assert marked(world) == kept and len(kept) == 1
        (desktop,) = await desktops_of(world, group["uuid"])
        await guest_stops(world, desktop)
        assert await domain_states(world) == {"keeppc01": "shutoff"}
        assert marked(world) == kept
        (desktop,) = await desktops_of(world, group["uuid"])
        assert (desktop["status"], desktop["power"]) == ("inactive", "off")

        # restore turned on: the domain is defined again, ending in destroy at a guest reboot
        agent = world.agents[0]
        assert "<on_reboot>restart</on_reboot>" in await agent.hypervisor.domain_xml(desktop["uuid"])
        ok(*await world.api.call("PUT", DESKTOP_GROUPS, {"uuid": group["uuid"], "name": "keep",
                                                          "value": {"sys_restore": 1}}))
        assert "<on_reboot>destroy</on_reboot>" in await agent.hypervisor.domain_xml(desktop["uuid"])


@pytest_twisted.ensureDeferred
async def test_a_create_that_fails_on_one_node_leaves_nothing_anywhere(tmp_path):
    clock = Clock()
    async with world_of(tmp_path, clock) as world:
        template = await saved_template(world)
        teaching = await teaching_group(world)
        # the second node loses the template's version file: its overlays cannot be made
        for path in (world.agents[1].data_dir / "storage").rglob("*.v1"):
            path.unlink()
        before_alloc = await world.core.extensions["ipam"].allocations(world.subnet["uuid"])
        status, body = await world.api.call("POST", DESKTOP_GROUPS, create_body(world, teaching, template), headers=EN)
        failed(status, body, 502, 6040, HOSTS[1])
        assert await domain_states(world) == {}
        assert overlay_files(world) == [[], []]
        assert await world.core.extensions["ipam"].allocations(world.subnet["uuid"]) == before_alloc
        assert await world.core.store.collection(schema.DESKTOPS).count({}) == 0
        assert await world.core.store.collection(schema.DESKTOP_GROUPS).count({}) == 0


@pytest_twisted.ensureDeferred
async def test_a_node_offline_or_unreachable_fails_its_desktops_and_the_others_go_on(tmp_path):
    clock = Clock()
    async with world_of(tmp_path, clock) as world:
        template = await saved_template(world)
        teaching = await teaching_group(world)
        group = ok(*await world.api.call("POST", DESKTOP_GROUPS, create_body(world, teaching, template,
                                                                            create_info={HOSTS[0]: 2, HOSTS[1]: 2})))
        desktops = await desktops_of(world, group["uuid"])
        param = {"desktop_uuid": group["uuid"], "desktop_name": "dg1", "desktop_type": 1,
                 "instances": [{"uuid": d["uuid"], "name": d["name"]} for d in desktops]}
        nodes = world.core.store.collection("nodes")
        second = next(n for n in world.nodes if n["ip"] == HOSTS[1])

        # the watchers saw the second node go offline: its desktops fail at once, clearly
        await nodes.update_one({"uuid": second["uuid"]}, {"$set": {"state": "offline"}})
        answer = ok(*await world.api.call("POST", INSTANCES, {"action": "start", "param": param}, headers=EN))
        assert (answer["success_num"], answer["failed_num"]) == (2, 2)
        assert {f["code"] for f in answer["failures"]} == {6048} and all(HOSTS[1] in f["msg"] for f in answer["failures"])
        assert await domain_states(world) == {"dg1pc01": "running", "dg1pc02": "running", "dg1pc03": "shutoff",
                                              "dg1pc04": "shutoff"}

        # the store still says online, but its agent is gone: the calls fail, named, and the others run
        await nodes.update_one({"uuid": second["uuid"]}, {"$set": {"state": "online"}})
        await world.agents[1].stopService()
        answer = ok(*await world.api.call("POST", INSTANCES, {"action": "reboot", "param": param}, headers=EN))
        assert (answer["success_num"], answer["failed_num"]) == (2, 2)
        assert {f["code"] for f in answer["failures"]} == {6040} and all(HOSTS[1] in f["msg"] for f in answer["failures"])
        running = {d["name"]: d["status"] for d in await desktops_of(world, group["uuid"])}
        assert running == {"dg1pc01": "active", "dg1pc02": "active", "dg1pc03": "error", "dg1pc04": "error"}
        page = ok(*await world.api.call("GET", INSTANCES, params={"desktop_uuid": group["uuid"], "status": "error"}))
        assert page["count"] == 2 and all(HOSTS[1] in d["message"] for d in page["results"])
