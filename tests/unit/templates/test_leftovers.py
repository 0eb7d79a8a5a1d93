"""Version files on a node that was unreachable when its template was deleted: recorded per node, and
removed (and reported) once the node answers again, by the reconcile loop or when the node returns.
The node is a real agent on the test driver, stopped during the delete and started again."""
from __future__ import annotations

import pytest
import pytest_twisted

from kvmdesk.plugins.templates import plugin, reconcile, schema
from kvmdesk.testing.agents import running_agent
from templates_testlib import HOSTS, T


def version_files(agent, template, version: int) -> list:
    root = agent.data_dir / "storage" / "instances" / "_template"
    return sorted(root / f"{d['uuid']}.v{version}" for d in template["devices"])


@pytest.mark.parametrize("path", ["reconcile", "node_returns"])
@pytest_twisted.ensureDeferred
async def test_versions_a_stopped_node_kept_at_delete_go_when_it_is_back(world, path):
    template = await world.create()
    ref = {"name": template["name"], "uuid": template["uuid"]}
    for _ in range(2):
        status, body = await world.api.call("POST", T, {"action": "save", "param": ref})
        assert status == 200, body
    host = world.agent_of(template)
    (other,) = [a for a in world.agents if a is not host]
    ip = HOSTS[world.agents.index(other)]
    kept = version_files(other, template, 1) + version_files(other, template, 2)
    assert all(p.is_file() for p in kept)
    nodes = world.core.store.collection("nodes")
    node = await nodes.find_one({"ip": ip})

    await other.stopService()  # the node is unreachable while the template is deleted
    status, body = await world.api.call("DELETE", T, {"templates": [ref]})
    assert status == 200, body
    (result,) = body["data"]["results"]
    assert result["leftover_nodes"] == [ip], body
    job = (await world.api.call("GET", f"/jobs/{body['data']['job_id']}"))[1]["data"]
    assert job["items"][0]["result"] == {"leftover_nodes": [ip]}
    assert not any(p.exists() for p in version_files(host, template, 1) + version_files(host, template, 2))
    assert all(p.is_file() for p in kept)
    (row,) = await world.core.store.collection(schema.LEFTOVERS).find({})
    assert (row["node_uuid"], row["template_uuid"]) == (node["uuid"], template["uuid"])
    assert sorted(f["file_id"] for f in row["files"]) == sorted(p.name for p in kept) and row["error"]

    reconciler = world.core.extensions[reconcile.EXTENSION]
    assert await reconciler.reconcile_node(node) == []  # still down: kept for later
    assert await world.core.store.collection(schema.LEFTOVERS).count({}) == 1

    directory = world.tmp / ("agent-a", "agent-b")[world.agents.index(other)]
    async with running_agent(directory, ip, world.port):  # the same agent, started again
        if path == "reconcile":
            findings = await reconciler.reconcile_node(node)
            assert [(f["kind"], f["template"]) for f in findings] == [("leftover_removed", template["uuid"])]
            assert "template1" in findings[0]["detail"]
        else:  # the node-returns path: what the watcher's status hook runs (a node record without its secret)
            await plugin.node_returned(world.core, {k: v for k, v in node.items() if k != "agent_secret"})
        assert not any(p.exists() for p in kept)
        assert await world.core.store.collection(schema.LEFTOVERS).count({}) == 0
        assert await reconciler.reconcile_node(node) == []  # nothing left to report


@pytest_twisted.ensureDeferred
async def test_a_removed_node_leaves_nothing_to_clean(world):
    rows = world.core.store.collection(schema.LEFTOVERS)
    node = world.nodes[1]
    await rows.insert_one({"uuid": "row-1", "node_uuid": node["uuid"], "template_uuid": "t", "template_name": "t",
                           "files": [{"file_id": "x.v1", "role": 1}], "error": "unreachable"})
    await plugin.kvmdesk_node_removed(world.core, node)
    assert await rows.count({}) == 0
