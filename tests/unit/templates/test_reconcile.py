"""The reconcile loop: a domain gone behind the controller's back (defined again when its disks are
there), a state that differs, an unknown template domain; rounds run on the injected clock."""
from __future__ import annotations

import uuid

import pytest_twisted

from kvmdesk.agent.testdriver import domain_xml
from kvmdesk.plugins.templates import reconcile


@pytest_twisted.ensureDeferred
async def test_drift_is_repaired_or_reported(world):
    one = await world.create()
    two = await world.create(name="template2")
    agent_one, agent_two = world.agent_of(one), world.agent_of(two)
    templates = world.core.store.collection("templates")
    await templates.update_one({"uuid": one["uuid"]}, {"$set": {"status": "active"}})  # as if an event was lost
    await agent_two.hypervisor.undefine(two["uuid"])
    stray = str(uuid.uuid4())
    await agent_one.hypervisor.define(domain_xml(f"tpl-{stray}", uuid=stray))

    reconciler = world.core.extensions[reconcile.EXTENSION]
    reconciler.startService()  # the first round runs at once
    try:
        await check(world, reconciler, templates, one, two, stray, agent_one)
    finally:
        await reconciler.stopService()


async def check(world, reconciler, templates, one, two, stray, agent_one):
    if reconciler.current_round is not None:
        await reconciler.current_round
    assert (await templates.find_one({"uuid": one["uuid"]}))["status"] == "inactive"
    assert (await templates.find_one({"uuid": two["uuid"]}))["status"] == "inactive"
    kinds = {(f["kind"], f["template"]) for findings in reconciler.drift.values() for f in findings}
    assert kinds == {("state_differs", one["uuid"]), ("domain_redefined", two["uuid"]), ("unknown_domain", stray)}
    assert stray in {d["uuid"] for d in await agent_one.hypervisor.list_domains()}  # reported, not removed
    # the domain defined again is the template's: its name, CPUs, memory and disks
    status, body = await world.act("start", two)
    assert status == 200 and body["data"]["success_num"] == 1, body
    (again,) = [d for d in await world.agent_of(two).hypervisor.list_domains() if d["uuid"] == two["uuid"]]
    assert (again["name"], again["vcpus"], again["state"]) == (f"tpl-{two['uuid']}", 2, "running")

    # the next round comes from the clock
    await templates.update_one({"uuid": one["uuid"]}, {"$set": {"status": "active"}})
    world.core.clock.advance(reconciler.interval)
    if reconciler.current_round is not None:
        await reconciler.current_round
    assert (await templates.find_one({"uuid": one["uuid"]}))["status"] == "inactive"


@pytest_twisted.ensureDeferred
async def test_a_lifecycle_event_sets_the_status_the_domain_has_now(world):
    from kvmdesk.plugins.templates import plugin

    template = await world.create()
    agent = world.agent_of(template)
    await agent.hypervisor.start(template["uuid"])  # behind the controller's back
    node = {k: v for k, v in (await world.core.store.collection("nodes").find_one(
        {"uuid": template["host_uuid"]})).items() if k != "agent_secret"}  # as the hook gets it
    templates = world.core.store.collection("templates")
    await templates.update_one({"uuid": template["uuid"]}, {"$set": {"status": "inactive"}})
    # a late "stopped" event of a domain that runs again leaves it active
    await plugin.kvmdesk_domain_event(world.core, node, {"uuid": template["uuid"], "name": "x", "event": "stopped",
                                                         "detail": "destroyed"})
    assert (await templates.find_one({"uuid": template["uuid"]}))["status"] == "active"
    assert plugin.kvmdesk_domain_event(world.core, node, {"uuid": template["uuid"], "event": "defined"}) is None


@pytest_twisted.ensureDeferred
async def test_a_version_file_gone_from_a_node_is_sent_again(world):
    template = await world.create()
    await world.api.call("POST", "/education/template", {"action": "save", "param": {"name": "t",
                                                                                     "uuid": template["uuid"]}})
    other = next(n for n in world.nodes if n["uuid"] != template["host_uuid"])
    agent = world.agents[[n["uuid"] for n in world.nodes].index(other["uuid"])]
    lost = agent.data_dir / "storage" / "instances" / "_template" / f"{template['devices'][1]['uuid']}.v1"
    content = lost.read_bytes()
    lost.unlink()
    reconciler = world.core.extensions[reconcile.EXTENSION]
    node = await world.core.store.collection("nodes").find_one({"uuid": other["uuid"]})
    findings = await reconciler.reconcile_node(node)
    assert [f["kind"] for f in findings] == ["version_missing"]
    assert lost.read_bytes() == content
    assert await reconciler.reconcile_node(node) == []


@pytest_twisted.ensureDeferred
async def test_a_disk_file_gone_from_the_node_is_reported_and_the_template_marked_error(world):
    template = await world.create()
    stored = await world.core.store.collection("templates").find_one({"uuid": template["uuid"]})
    data = stored["devices"][1]
    agent = world.agent_of(template)
    (lost,) = [p for p in (agent.data_dir / "storage").rglob(data["file_id"]) if p.is_file()]
    lost.unlink()
    node = await world.core.store.collection("nodes").find_one({"uuid": template["host_uuid"]})
    findings = await world.core.extensions[reconcile.EXTENSION].reconcile_node(node)
    assert [(f["kind"], f["template"]) for f in findings] == [("disk_missing", template["uuid"])]
    assert "vdb" in findings[0]["detail"]
    assert (await world.core.store.collection("templates").find_one({"uuid": template["uuid"]}))["status"] == "error"


@pytest_twisted.ensureDeferred
async def test_a_domain_gone_with_its_disks_is_reported_and_the_template_marked_error(world):
    template = await world.create()
    agent = world.agent_of(template)
    await agent.hypervisor.undefine(template["uuid"])
    for path in [p for p in (agent.data_dir / "storage").rglob(template["devices"][0]["uuid"]) if p.is_file()]:
        path.unlink()
    node = await world.core.store.collection("nodes").find_one({"uuid": template["host_uuid"]})
    findings = await world.core.extensions[reconcile.EXTENSION].reconcile_node(node)
    assert [(f["kind"], f["template"]) for f in findings] == [("domain_missing", template["uuid"])]
    assert "vda" in findings[0]["detail"]
    assert (await world.core.store.collection("templates").find_one({"uuid": template["uuid"]}))["status"] == "error"
    assert template["uuid"] not in {d["uuid"] for d in await agent.hypervisor.list_domains()}
