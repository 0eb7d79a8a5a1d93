"""Creates and copies cut short: by a controller that stops in the middle, or by a node that stops
answering while the steps are taken back.  What they made on the nodes goes, the address comes back."""
from __future__ import annotations

import pytest_twisted
from twisted.internet import defer

from kvmdesk.core.errors import ApiError
from kvmdesk.plugins.templates import errors, intents, nodes, reconcile, schema, service
from kvmdesk.plugins.templates.models import TemplateCreate
from templates_testlib import restarted


def allocations_of(store, uuid: str):
    return store.collection("ip_allocations").find({"owner": f"template:{uuid}"})


@pytest_twisted.ensureDeferred
async def test_a_create_cut_short_by_a_controller_stop_is_undone_at_the_next_start(world, monkeypatch):
    old, real_call, reached, blocked = world.core, nodes.call, defer.Deferred(), defer.Deferred()

    async def call(core, node, method, path, *args, **kwargs):
        if core is old and method == "PUT" and path.endswith("/spec"):
            reached.callback(None)
            return await blocked  # the controller dies here: its disks are made, its domain is not
        return await real_call(core, node, method, path, *args, **kwargs)

    monkeypatch.setattr(nodes, "call", call)
    body = TemplateCreate.model_validate(world.body())
    creating = defer.ensureDeferred(service.create(old, body, owner="admin"))
    await reached
    (row,) = await old.store.collection(schema.INTENTS).find({})
    assert creating.called is False and row["kind"] == "create" and row["template_name"] == "template1"
    uuid = row["template_uuid"]
    made = [f["file_id"] for f in row["nodes"][0]["files"]]
    host = next(a for a, n in zip(world.agents, world.nodes) if n["uuid"] == row["host_uuid"])
    assert all(any(p.name == f for p in (host.data_dir / "storage").rglob("*")) for f in made)
    assert len(await allocations_of(old.store, uuid)) == 1

    async with restarted(world) as api:
        store = api.core.store
        assert await store.collection(schema.INTENTS).count() == 0  # the start took it over
        assert await allocations_of(store, uuid) == []
        (left,) = await store.collection(schema.LEFTOVERS).find({})
        assert (left["cause"], left["domain"], left["template_uuid"]) == ("create", uuid, uuid)
        node = await store.collection("nodes").find_one({"uuid": row["host_uuid"]})
        findings = await api.core.extensions[reconcile.EXTENSION].reconcile_node(node)
        assert [f["kind"] for f in findings] == ["leftover_removed"] and "create of template template1" in \
            findings[0]["detail"]
        assert not any(p.name in made for p in (host.data_dir / "storage").rglob("*"))
        assert await store.collection(schema.LEFTOVERS).count() == 0
        # the name and the address are free again: the same create succeeds
        created = await service.create(api.core, body, owner="admin")
        assert created["name"] == "template1" and created["bind_ip"]
    blocked.errback(ApiError(errors.NODE_UNAVAILABLE, name="template1", reason="the old controller is gone"))
    try:
        await creating
    except Exception:
        pass  # its undo ran against a closed store


@pytest_twisted.ensureDeferred
async def test_a_copy_whose_undo_fails_leaves_its_files_to_be_removed_when_the_node_answers(world, monkeypatch):
    source = await world.create()
    real_call, refusing = nodes.call, {"on": True}

    async def call(core, node, method, path, *args, **kwargs):
        if refusing["on"] and method == "PUT" and path.endswith("/spec"):
            raise ApiError(errors.NODE_UNAVAILABLE, name="copy1", reason="the node stopped answering")
        if refusing["on"] and method == "DELETE":
            raise ApiError(errors.NODE_UNAVAILABLE, name="copy1", reason="the node stopped answering")
        return await real_call(core, node, method, path, *args, **kwargs)

    monkeypatch.setattr(nodes, "call", call)
    before = world.template_files()
    status, body = await world.api.call("POST", "/education/template", {"action": "copy", "param": {
        "template_uuid": source["uuid"], "name": "copy1", "pool_uuid": world.pool,
        "network_uuid": world.network["uuid"], "subnet_uuid": world.subnet["uuid"]}})
    assert status != 200 and body["code"] == errors.NODE_UNAVAILABLE.code, body
    store = world.core.store
    assert await store.collection(schema.INTENTS).count() == 0
    assert await store.collection("templates").count({"name": "copy1"}) == 0
    rows = await store.collection(schema.LEFTOVERS).find({})
    assert rows and {r["cause"] for r in rows} == {"copy"}
    assert sum(len(files) for files in world.template_files()) > sum(len(files) for files in before)
    assert await allocations_of(store, rows[0]["template_uuid"]) == []

    refusing["on"] = False  # the node answers again
    for row in rows:
        node = await store.collection("nodes").find_one({"uuid": row["node_uuid"]})
        await world.core.extensions[reconcile.EXTENSION].reconcile_node(node)
    assert world.template_files() == before
    assert await store.collection(schema.LEFTOVERS).count() == 0


@pytest_twisted.ensureDeferred
async def test_an_intent_whose_template_was_stored_is_just_dropped(world):
    template = await world.core.store.collection("templates").find_one({"uuid": (await world.create())["uuid"]})
    await intents.begin(world.core, "create", template, {template["host_uuid"]: service.files_of(template["devices"])})
    assert await intents.recover(world.core) == 0
    assert await world.core.store.collection(schema.INTENTS).count() == 0
    assert await world.core.store.collection(schema.LEFTOVERS).count() == 0
    assert await world.core.store.collection("templates").count({"uuid": template["uuid"]}) == 1
