"""Base images travel to every node of the pool through real agent endpoints on loopback addresses.

A 200 MB image is uploaded over a real port (streamed by treq), distributed to two agents at once,
held halfway so progress can be watched in the list endpoint, and checked byte for byte (MD5) on
arrival; an agent killed mid-transfer gets the rest of the file after it returns; a delete removes
the file everywhere.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import defer

from kvmdesk.testing.api import listening_api
from storage_testlib import (
    Gate,
    InProcessAgent,
    add_node,
    controller,
    decode,
    files_in,
    http_client,
    make_qcow2,
    md5_of,
    wait_all,
    wait_for,
    with_timeout,
)

IMAGE_MB = 200


@pytest.fixture(scope="module")
def big_image(tmp_path_factory) -> Path:
    return make_qcow2(tmp_path_factory.mktemp("images") / "win7.qcow2", IMAGE_MB)


async def upload_streamed(base_url: str, token: str, pool: str, image: Path, name: str) -> tuple[int, dict]:
    """POST the image as a multipart form over a real socket; treq reads the file as it sends it."""
    with open(image, "rb") as handle:
        response = await http_client().post(
            f"{base_url}/resource_mgr/resource_pools/{pool}/base_images",
            data={"name": name, "os_type": "Windows 7 bit 64"},
            files={"file": (image.name, "application/octet-stream", handle)},
            headers={"Authorization": f"Bearer {token}"},
        )
        return await decode(response)


def progress_at_least(node: dict, percent: int):
    return lambda event, record: (event == "progress" and record["node_uuid"] == node["uuid"]
                                  and record["progress"] >= percent)


@pytest_twisted.ensureDeferred
async def test_upload_reaches_both_agents_with_rising_progress_then_delete_removes_it(
        tmp_path, clock, agents, big_image):
    config = {"nodes": {"agent_port": agents[0].port}}
    async with controller(tmp_path, clock, config=config, start=True) as api:
        core, distributor = api.core, api.distributor
        gate = Gate(0.5)
        distributor.producer_factory = gate
        nodes = [await add_node(core, api.pool, agent.host, f"node-{i}") for i, agent in enumerate(agents)]
        halfway = [wait_for(distributor, progress_at_least(node, 45), "progress at 45%") for node in nodes]
        async with listening_api(core) as base_url:
            status, body = await upload_streamed(base_url, api.token, api.pool, big_image, "win7")
        assert status == 200, body
        image = body["data"]
        assert image["md5_sum"] == md5_of(big_image)
        assert image["size_bytes"] == big_image.stat().st_size
        assert image["count"] == 2 and image["os_type_simple"] == "win7"
        done = wait_all(distributor, "done", [n["uuid"] for n in nodes], image["uuid"])
        for d in halfway:
            await d

        # Both transfers are held at 50%: the list shows them in progress.
        status, body = await api.call("GET", f"/resource_mgr/resource_pools/{api.pool}/base_images")
        assert status == 200
        listed = body["data"]["results"][0]
        assert (listed["status"], listed["count"], listed["publish_count"]) == (1, 2, 0)
        assert {d["host_uuid"] for d in listed["detail"]} == {n["uuid"] for n in nodes}
        for entry in listed["detail"]:
            assert 45 <= entry["progress"] <= 99 and entry["status"] == 1, entry
            assert set(entry) == {"host_name", "ipaddr", "host_uuid", "progress", "status"}
        assert distributor.active_streams == 2

        gate.release()
        await done
        status, body = await api.call("GET", f"/resource_mgr/resource_pools/{api.pool}/base_images/{image['uuid']}")
        assert (body["data"]["status"], body["data"]["publish_count"]) == (0, 2)
        assert [(d["progress"], d["status"]) for d in body["data"]["detail"]] == [(100, 0), (100, 0)]
        assert body["data"]["path"] == str(agents[0].base_image(image["uuid"]))
        for agent in agents:
            arrived = agent.base_image(image["uuid"])
            assert md5_of(arrived) == image["md5_sum"]
            assert files_in(arrived.parent) == sorted([image["uuid"], f".{image['uuid']}.json"])
        assert [offset for offset, _ in gate.offsets] == [0, 0]

        controller_copy = core.extensions["storage.settings"].base_image_dir / image["uuid"]
        assert controller_copy.exists()
        status, body = await api.call("DELETE", f"/resource_mgr/resource_pools/{api.pool}/base_images",
                                      {"uuids": [image["uuid"]]})
        assert status == 200, body
        for agent in agents:
            assert files_in(agent.base_image(image["uuid"]).parent) == []
        assert not controller_copy.exists()
        assert await core.store.collection("image_transfers").count({}) == 0
        status, body = await api.call("GET", f"/resource_mgr/resource_pools/{api.pool}/base_images/{image['uuid']}")
        assert status == 404 and body["code"] == 1012


@pytest.mark.parametrize("direct_io", [False, True], ids=["page-cache", "direct-io"])
@pytest_twisted.ensureDeferred
async def test_agent_killed_mid_transfer_gets_the_rest_after_it_returns(tmp_path, clock, agents, big_image, direct_io):
    # With direct I/O the controller writes the upload, and reads it for both transfers and the resumed
    # one, past the page cache.
    config = {"nodes": {"agent_port": agents[0].port}, "storage": {"direct_io": direct_io}}
    async with controller(tmp_path, clock, config=config, start=True) as api:
        core, distributor = api.core, api.distributor
        gate = Gate(0.5)
        distributor.producer_factory = gate
        node_a = await add_node(core, api.pool, agents[0].host, "node-a")
        node_b = await add_node(core, api.pool, agents[1].host, "node-b")
        halfway = [wait_for(distributor, progress_at_least(n, 45), "progress at 45%") for n in (node_a, node_b)]
        async with listening_api(core) as base_url:
            status, body = await upload_streamed(base_url, api.token, api.pool, big_image, "win10")
        assert status == 200, body
        image = body["data"]
        for d in halfway:
            await d

        # Node B's agent dies with the transfer half done; A goes on.
        failed_b = wait_for(distributor, lambda e, r: e == "failed" and r["node_uuid"] == node_b["uuid"], "failure")
        done_a = wait_for(distributor, lambda e, r: e == "done" and r["node_uuid"] == node_a["uuid"], "A done")
        await agents[1].kill()
        failed = await failed_b
        assert failed["status"] == 2 and failed["attempts"] == 1 and failed["error"]
        gate.release()
        await done_a
        status, body = await api.call("GET", f"/resource_mgr/resource_pools/{api.pool}/base_images/{image['uuid']}")
        states = {d["host_uuid"]: (d["progress"], d["status"]) for d in body["data"]["detail"]}
        assert states[node_a["uuid"]] == (100, 0)
        assert states[node_b["uuid"]][1] == 2 and 0 < states[node_b["uuid"]][0] < 100
        assert (body["data"]["status"], body["data"]["publish_count"]) == (2, 1)
        partial = agents[1].base_image(image["uuid"]).with_name(f".{image['uuid']}.part")
        kept = partial.stat().st_size
        assert 0 < kept < image["size_bytes"]
        assert not agents[1].base_image(image["uuid"]).exists()

        # The agent comes back (a new process: only what is on disk); the retry is due after 5 s.
        agents[1] = InProcessAgent(agents[1].host, agents[1].data_dir, port=agents[1].port).start()
        done_b = wait_for(distributor, lambda e, r: e == "done" and r["node_uuid"] == node_b["uuid"], "B done")
        clock.advance(4.75)
        assert len(gate.offsets) == 2, "retried before the backoff was over"
        clock.advance(0.25)
        await done_b
        assert gate.offsets[-1] == (kept, image["size_bytes"] - kept), "the transfer did not resume"
        assert md5_of(agents[1].base_image(image["uuid"])) == image["md5_sum"]
        assert not partial.exists()
        status, body = await api.call("GET", f"/resource_mgr/resource_pools/{api.pool}/base_images/{image['uuid']}")
        assert (body["data"]["status"], body["data"]["publish_count"]) == (0, 2)


@pytest_twisted.ensureDeferred
async def test_node_added_later_receives_the_pools_images(tmp_path, clock, agents):
    small = make_qcow2(tmp_path / "small.qcow2", 3)
    config = {"nodes": {"agent_port": agents[0].port}}
    async with controller(tmp_path, clock, config=config, start=True) as api:
        core, distributor = api.core, api.distributor
        node_a = await add_node(core, api.pool, agents[0].host, "node-a")
        first = wait_for(distributor, lambda e, r: e == "done" and r["node_uuid"] == node_a["uuid"], "A done")
        status, body = await api.upload(f"/resource_mgr/resource_pools/{api.pool}/base_images",
                                        {"name": "small", "os_type": "ubuntu 22.04"},
                                        {"file": ("small.qcow2", small.read_bytes())})
        assert status == 200, body
        image = body["data"]
        await first
        # A second node joins the pool; its first "online" report brings it the pool's images.
        node_b = await add_node(core, api.pool, agents[1].host, "node-b")
        arrived = wait_for(distributor, lambda e, r: e == "done" and r["node_uuid"] == node_b["uuid"], "B done")
        core.plugins.hook.kvmdesk_node_status_changed(core=core, node=node_b, old=None, new="online")
        await arrived
        assert md5_of(agents[1].base_image(image["uuid"])) == image["md5_sum"]


@pytest_twisted.ensureDeferred
async def test_periodic_reconcile_catches_a_node_without_any_hook(tmp_path, clock, agents):
    small = make_qcow2(tmp_path / "small.qcow2", 2)
    config = {"nodes": {"agent_port": agents[0].port}, "storage": {"reconcile_interval": 60.0}}
    async with controller(tmp_path, clock, config=config, start=True) as api:
        core, distributor = api.core, api.distributor
        status, body = await api.upload(f"/resource_mgr/resource_pools/{api.pool}/base_images",
                                        {"name": "small", "os_type": "CentOS 7"},
                                        {"file": ("small.qcow2", small.read_bytes())})
        assert status == 200 and body["data"]["count"] == 0
        node = await add_node(core, api.pool, agents[0].host, "late")
        arrived = wait_for(distributor, lambda e, r: e == "done" and r["node_uuid"] == node["uuid"], "done")
        await distributor.reconciled()  # the start-up pass is over: the next one is due at 60 s
        clock.advance(60)
        await arrived
        assert md5_of(agents[0].base_image(body["data"]["uuid"])) == body["data"]["md5_sum"]


@pytest_twisted.ensureDeferred
async def test_concurrency_is_bounded_by_max_streams(tmp_path, clock, agents):
    small = make_qcow2(tmp_path / "small.qcow2", 4)
    config = {"nodes": {"agent_port": agents[0].port}, "storage": {"max_streams": 1}}
    async with controller(tmp_path, clock, config=config, start=True) as api:
        core, distributor = api.core, api.distributor
        gate = Gate(0.5)
        distributor.producer_factory = gate
        nodes = [await add_node(core, api.pool, agent.host, f"node-{i}") for i, agent in enumerate(agents)]
        held = wait_for(distributor, lambda e, r: e == "progress" and r["progress"] >= 45, "progress")
        status, body = await api.upload(f"/resource_mgr/resource_pools/{api.pool}/base_images",
                                        {"name": "small", "os_type": "win7"},
                                        {"file": ("small.qcow2", small.read_bytes())})
        assert status == 200, body
        done = wait_all(distributor, "done", [n["uuid"] for n in nodes], body["data"]["uuid"])
        await held
        # One stream is held halfway; the other node waits its turn with 0%.
        assert distributor.active_streams == 1 and len(gate.offsets) == 1
        status, body = await api.call("GET", f"/resource_mgr/resource_pools/{api.pool}/base_images")
        progress = sorted(d["progress"] for d in body["data"]["results"][0]["detail"])
        assert progress[0] == 0 and progress[1] >= 45
        gate.release()
        await done
        assert len(gate.offsets) == 2


@pytest_twisted.ensureDeferred
async def test_resync_sends_the_image_again_to_one_node(tmp_path, clock, agents):
    small = make_qcow2(tmp_path / "small.qcow2", 2)
    config = {"nodes": {"agent_port": agents[0].port}}
    async with controller(tmp_path, clock, config=config, start=True) as api:
        core, distributor = api.core, api.distributor
        nodes = [await add_node(core, api.pool, agent.host, f"node-{i}") for i, agent in enumerate(agents)]
        arrived = wait_all(distributor, "done", [n["uuid"] for n in nodes])
        status, body = await api.upload(f"/resource_mgr/resource_pools/{api.pool}/base_images",
                                        {"name": "small", "os_type": "win7"},
                                        {"file": ("small.qcow2", small.read_bytes())})
        image = body["data"]
        await arrived
        # The node lost its copy; a resync sends it again (only to that node).
        agents[1].base_image(image["uuid"]).unlink()
        resent = wait_for(distributor, lambda e, r: e == "done" and r["node_uuid"] == nodes[1]["uuid"], "resync")
        started = []
        distributor.observers.append(lambda e, r: e == "started" and started.append(r["node_uuid"]))
        status, body = await api.call("POST", f"/resource_mgr/resource_pools/{api.pool}/base_images/"
                                              f"{image['uuid']}/resync", {"node_uuid": nodes[1]["uuid"]})
        assert status == 200, body
        await resent
        assert started == [nodes[1]["uuid"]]
        assert md5_of(agents[1].base_image(image["uuid"])) == image["md5_sum"]

        status, body = await api.call("POST", f"/resource_mgr/resource_pools/{api.pool}/base_images/"
                                              f"{image['uuid']}/resync", {"node_uuid": "no-such-node"})
        assert status == 404 and body["code"] == 1012


@pytest_twisted.ensureDeferred
async def test_delete_while_a_node_is_down_removes_the_file_once_it_returns(tmp_path, clock, agents):
    small = make_qcow2(tmp_path / "small.qcow2", 2)
    config = {"nodes": {"agent_port": agents[0].port}, "storage": {"agent_timeout": 5.0}}
    async with controller(tmp_path, clock, config=config, start=True) as api:
        core, distributor = api.core, api.distributor
        nodes = [await add_node(core, api.pool, agent.host, f"node-{i}") for i, agent in enumerate(agents)]
        arrived = wait_all(distributor, "done", [n["uuid"] for n in nodes])
        status, body = await api.upload(f"/resource_mgr/resource_pools/{api.pool}/base_images",
                                        {"name": "small", "os_type": "win7"},
                                        {"file": ("small.qcow2", small.read_bytes())})
        image = body["data"]
        await arrived
        await agents[1].kill()
        status, body = await api.call("DELETE", f"/resource_mgr/resource_pools/{api.pool}/base_images",
                                      {"uuids": [image["uuid"]]})
        assert status == 200, body
        assert not agents[0].base_image(image["uuid"]).exists()
        assert agents[1].base_image(image["uuid"]).exists()
        assert await core.store.collection("image_removals").count({}) == 1
        agents[1] = InProcessAgent(agents[1].host, agents[1].data_dir, port=agents[1].port).start()
        await with_timeout(defer.ensureDeferred(distributor.node_online(nodes[1]["uuid"])), what="node catch-up")
        assert not agents[1].base_image(image["uuid"]).exists()
        assert await core.store.collection("image_removals").count({}) == 0
