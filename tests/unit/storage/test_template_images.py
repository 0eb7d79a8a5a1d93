"""Template disk images on nodes (#34-#35): published by the templates plugin, listed per node, resent."""
from __future__ import annotations

import hashlib

import pytest_twisted

from kvmdesk.plugins.storage.template_images import publish_template_image, remove_template_image
from storage_testlib import add_node, controller, md5_of, wait_all, wait_for

SYS_ID = "5f8c1d2e-0000-4000-8000-000000000001"
DATA_ID = "5f8c1d2e-0000-4000-8000-000000000002"
TEMPLATE = "9a9a9a9a-0000-4000-8000-00000000000a"


def template_file(agent, role_dir_file: str):
    return agent.storage / "instances" / "_template" / role_dir_file


@pytest_twisted.ensureDeferred
async def test_published_disks_reach_the_nodes_and_are_listed_per_role(tmp_path, clock, agents):
    system = tmp_path / "sys.qcow2"
    system.write_bytes(b"S" * 3_000_000)
    data = tmp_path / "data.qcow2"
    data.write_bytes(b"D" * 1_000_000)
    config = {"nodes": {"agent_port": agents[0].port}}
    async with controller(tmp_path, clock, config=config, start=True) as api:
        core, distributor = api.core, api.distributor
        nodes = [await add_node(core, api.pool, agent.host, f"node-{i}") for i, agent in enumerate(agents)]
        done = [wait_all(distributor, "done", [n["uuid"] for n in nodes], image) for image in (SYS_ID, DATA_ID)]
        record = await publish_template_image(core, template_uuid=TEMPLATE, template_name="teacher-win7",
                                              pool_uuid=api.pool, image_id=SYS_ID, role=1, version=1, source=system)
        assert record["digest"] == "sha256:" + hashlib.sha256(system.read_bytes()).hexdigest()  # a version: SHA-256
        await publish_template_image(core, template_uuid=TEMPLATE, template_name="teacher-win7", pool_uuid=api.pool,
                                     image_id=DATA_ID, role=2, version=1, source=data)
        for d in done:
            await d
        for agent in agents:
            assert md5_of(template_file(agent, SYS_ID)) == md5_of(system)
            assert md5_of(template_file(agent, DATA_ID)) == md5_of(data)

        status, body = await api.call("GET", f"/resource_mgr/nodes/{nodes[0]['uuid']}/template_images")
        assert status == 200, body
        page = body["data"]
        assert page["count"] == 1
        entry = page["results"][0]
        assert (entry["name"], entry["uuid"]) == ("teacher-win7", TEMPLATE)
        assert entry["storages"] == [
            {"role": 1, "path": str(agents[0].storage), "image_id": SYS_ID, "version": 1, "status": 0},
            {"role": 2, "path": str(agents[0].storage), "image_id": DATA_ID, "version": 1, "status": 0},
        ]

        # Resync with each body shape the contract shows.
        for body_shape in ({"action": "resync", "param": {"role": 1, "image_id": SYS_ID, "path": "/x", "version": 1}},
                           {"data": {"ipaddr": agents[1].host, "role": 1, "image_id": SYS_ID, "version": 1}},
                           {}):
            template_file(agents[1], SYS_ID).unlink()
            resent = wait_for(distributor, lambda e, r: e == "done" and r["node_uuid"] == nodes[1]["uuid"], "resync")
            status, body = await api.call(
                "POST", f"/resource_mgr/nodes/{nodes[1]['uuid']}/template_images/{SYS_ID}/resync", body_shape)
            assert status == 200, body
            await resent
            assert md5_of(template_file(agents[1], SYS_ID)) == md5_of(system)

        status, body = await api.call("POST", f"/resource_mgr/nodes/{nodes[1]['uuid']}/template_images/{SYS_ID}/resync",
                                      {"param": {"role": 2}})
        assert status == 400 and body["code"] == 1002
        status, body = await api.call("POST", f"/resource_mgr/nodes/{nodes[1]['uuid']}/template_images/nope/resync", {})
        assert status == 404
        status, body = await api.call("GET", "/resource_mgr/nodes/nope/template_images")
        assert status == 404

        # A new version replaces the file on every node.
        system.write_bytes(b"T" * 2_500_000)
        renewed = wait_all(distributor, "done", [n["uuid"] for n in nodes], SYS_ID)
        await publish_template_image(core, template_uuid=TEMPLATE, template_name="teacher-win7", pool_uuid=api.pool,
                                     image_id=SYS_ID, role=1, version=2, source=system)
        await renewed
        for agent in agents:
            assert md5_of(template_file(agent, SYS_ID)) == md5_of(system)
        status, body = await api.call("GET", f"/resource_mgr/nodes/{nodes[1]['uuid']}/template_images")
        assert body["data"]["results"][0]["storages"][0]["version"] == 2

        await remove_template_image(core, SYS_ID)
        for agent in agents:
            assert not template_file(agent, SYS_ID).exists() and template_file(agent, DATA_ID).exists()
