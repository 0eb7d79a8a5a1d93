"""What uses a template and what a template uses: #78's ``desktop_count``/``instance_count`` and #77's
``bind_desktop`` count the desktops plugin's groups and desktops; every resource a template uses
(base image, ISO, data network, subnet, pool, node) refuses its delete and stays."""
from __future__ import annotations

import hashlib

import pytest_twisted

from kvmdesk.core import errors as core_errors
from kvmdesk.core.records import new_record
from templates_testlib import POOLS, T, assert_error

#: The network and nodes plugins' own codes for these refusals (plugins do not import each other).
SUBNET_HAS_ADDRESSES, NODE_IN_USE = 3008, 2021


async def desktops_on(world, template, node_uuid: str) -> None:
    """A teaching desktop group with two desktops on ``node_uuid`` and a personal group with one (the
    records the desktops plugin keeps: ``template`` on a group, ``desktop_uuid``/``node`` on a desktop)."""
    store, clock = world.core.store, world.core.clock
    teaching = await store.collection("desktop_groups").insert_one(new_record(clock, name="g1",
                                                                             template=template["uuid"]))
    personal = await store.collection("personal_groups").insert_one(new_record(clock, name="p1",
                                                                              template=template["uuid"]))
    for name, group in (("g1-1", teaching), ("g1-2", teaching), ("p1-1", personal)):
        await store.collection("desktops").insert_one(new_record(clock, name=name, desktop_uuid=group["uuid"],
                                                                 node=node_uuid))
    await store.collection("desktop_groups").insert_one(new_record(clock, name="elsewhere", template="other"))


@pytest_twisted.ensureDeferred
async def test_the_query_counts_desktop_groups_and_desktops_and_image_state_says_where_they_are(world):
    template = await world.create()
    lone = await world.create(name="template2", data_disks=[])
    other_node = next(n["uuid"] for n in world.nodes if n["uuid"] != template["host_uuid"])
    await desktops_on(world, template, other_node)

    status, body = await world.api.call("GET", T, params={"searchtype": "all", "classify": 1})
    assert status == 200, body
    counts = {r["name"]: (r["desktop_count"], r["instance_count"]) for r in body["data"]["results"]}
    assert counts == {"template1": (2, 3), "template2": (0, 0)}

    status, body = await world.api.call("GET", f"{T}/image/", params={"pool_uuid": world.pool,
                                                                      "template_uuid": template["uuid"]})
    assert status == 200, body
    bound = {r["uuid"]: {s["bind_desktop"] for s in r["storages"]} for r in body["data"]["results"]}
    assert bound == {other_node: {True}, template["host_uuid"]: {False}}
    status, body = await world.api.call("GET", f"{T}/image/", params={"pool_uuid": world.pool,
                                                                      "template_uuid": lone["uuid"]})
    assert {s["bind_desktop"] for r in body["data"]["results"] for s in r["storages"]} == {False}

    # the desktops plugin's own kvmdesk_usage: a template its groups use is not deleted
    before = await world.snapshot()
    status, body = await world.api.call("DELETE", T, {"templates": [{"name": "template1", "uuid": template["uuid"]}]},
                                        headers={"Accept-Language": "en"})
    assert_error(status, body, 409, core_errors.IN_USE.code, "template1", "p1")
    assert await world.snapshot() == before


async def refused(world, method: str, path: str, body: dict, code: int = core_errors.IN_USE.code,
                  word: str = "template1") -> None:
    before = await world.snapshot()
    status, answer = await world.api.call(method, path, body, headers={"Accept-Language": "en"})
    if status == 200:  # a batch of one may answer per item
        assert answer["data"].get("failed_num") == 1, (path, answer)
        answer = {"code": answer["data"]["failures"][0]["code"], "msg": answer["data"]["failures"][0]["msg"]}
        status = 409
    assert_error(status, answer, 409, code, word)
    assert await world.snapshot() == before, path


@pytest_twisted.ensureDeferred
async def test_every_resource_a_template_uses_refuses_its_delete(world):
    template = await world.create()
    iso_file = world.tmp / "tools.iso"
    iso_file.write_bytes(b"CD001" * 1000)
    iso = await world.core.store.collection("isos").insert_one(new_record(
        world.core.clock, name="tools", file=str(iso_file), md5=hashlib.md5(iso_file.read_bytes()).hexdigest(),
        size_bytes=iso_file.stat().st_size))
    # the test driver cannot change a CD-ROM (tests/integration does it on QEMU): the store says it is in
    await world.core.store.collection("templates").update_one({"uuid": template["uuid"]},
                                                              {"$set": {"iso_uuid": iso["uuid"]}})

    await refused(world, "DELETE", f"{POOLS}/{world.pool}/base_images", {"uuids": [world.base["uuid"]]})
    await refused(world, "DELETE", "/resource_mgr/isos", {"uuids": [iso["uuid"]]})
    await refused(world, "DELETE", "/resource_mgr/data_networks", {"uuids": [world.network["uuid"]]})
    # the network plugin refuses a subnet with allocated addresses before it asks who uses it
    await refused(world, "DELETE", f"/resource_mgr/data_networks/{world.network['uuid']}/sub_networks",
                  {"uuids": [world.subnet["uuid"]]}, code=SUBNET_HAS_ADDRESSES, word=template["bind_ip"])
    # the world's pool is the default one, which is never deleted: its usage is asked as a delete asks it
    assert "template1" in str(await world.core.usage("resource_pool", world.pool))
    await refused(world, "DELETE", "/resource_mgr/nodes", {"uuids": [template["host_uuid"]]}, code=NODE_IN_USE)
    assert await world.core.store.collection("isos").count({"uuid": iso["uuid"]}) == 1
    assert await world.core.store.collection("nodes").count({"uuid": template["host_uuid"]}) == 1
