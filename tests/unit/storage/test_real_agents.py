"""The whole chain with the real node agent (issue 3's ``Agent`` service, in-process on loopback
addresses) and the nodes plugin: nodes enrolled through the API, transfers signed by the controller's
agent client, bodies streamed into the agent's signed, proving site."""
from __future__ import annotations

import contextlib

import pytest_twisted
from twisted.internet.task import Clock

from kvmdesk.testing.agents import AGENT_PASSWORD, free_port, nodes_controller, running_agent
from storage_testlib import Gate, make_qcow2, md5_of, wait_all, wait_for

HOSTS = ("127.0.0.2", "127.0.0.3")
POOLS = "/resource_mgr/resource_pools"


def base_image(agent, uuid: str):
    return agent.data_dir / "storage" / "instances" / "_base" / uuid


def cut_connections(agent) -> None:
    """What a killed agent process does to its open connections."""
    for protocol in list(agent.site.protocols):
        transport = getattr(getattr(protocol, "_channel", protocol), "transport", None)
        if transport is not None:
            transport.abortConnection()


@contextlib.asynccontextmanager
async def chain(tmp_path, clock):
    port = free_port(*HOSTS)
    async with running_agent(tmp_path / "agent-a", HOSTS[0], port) as first, \
            running_agent(tmp_path / "agent-b", HOSTS[1], port) as second, \
            nodes_controller(tmp_path / "controller", port, clock=clock) as api:
        status, body = await api.call("GET", POOLS)
        pool = body["data"]["results"][0]["uuid"]
        nodes = []
        for host in HOSTS:
            status, body = await api.call("POST", f"{POOLS}/{pool}/nodes", {"ip": host, "password": AGENT_PASSWORD})
            assert status == 200, body
            nodes.append(body["data"])
        distributor = api.core.extensions["storage.distributor"]
        distributor.startService()
        try:
            yield api, pool, nodes, [first, second], port
        finally:
            await distributor.stopService()
    assert clock.getDelayedCalls() == [], "a delayed call was left on the clock"


@pytest_twisted.ensureDeferred
async def test_upload_distribute_and_delete_with_real_agents(tmp_path):
    image = make_qcow2(tmp_path / "win7.qcow2", 8)
    async with chain(tmp_path, Clock()) as (api, pool, nodes, agents, _):
        distributor = api.core.extensions["storage.distributor"]
        assert type(distributor.link).__name__ == "ClientAgentLink"  # the nodes plugin's signed client
        arrived = wait_all(distributor, "done", [n["uuid"] for n in nodes])
        status, body = await api.upload(f"{POOLS}/{pool}/base_images", {"name": "win7", "os_type": "Windows 7"},
                                        {"file": ("win7.qcow2", image.read_bytes())})
        assert status == 200, body
        uploaded = body["data"]
        await arrived
        for agent in agents:
            assert md5_of(base_image(agent, uploaded["uuid"])) == uploaded["md5_sum"] == md5_of(image)
        status, body = await api.call("GET", f"{POOLS}/{pool}/base_images/{uploaded['uuid']}")
        assert (body["data"]["publish_count"], body["data"]["status"]) == (2, 0)
        assert {d["ipaddr"] for d in body["data"]["detail"]} == set(HOSTS)

        status, body = await api.call("DELETE", f"{POOLS}/{pool}/base_images", {"uuids": [uploaded["uuid"]]})
        assert status == 200, body
        for agent in agents:
            assert not base_image(agent, uploaded["uuid"]).exists()


@pytest_twisted.ensureDeferred
async def test_real_agent_stopped_mid_transfer_resumes_after_restart(tmp_path):
    clock = Clock()
    image = make_qcow2(tmp_path / "big.qcow2", 48)
    async with chain(tmp_path, clock) as (api, pool, nodes, agents, port):
        distributor = api.core.extensions["storage.distributor"]
        gate = Gate(0.5)
        distributor.producer_factory = gate
        halfway = wait_for(distributor, lambda e, r: e == "progress" and r["node_uuid"] == nodes[1]["uuid"]
                           and r["progress"] >= 45, "progress on B")
        status, body = await api.upload(f"{POOLS}/{pool}/base_images", {"name": "big", "os_type": "Linux"},
                                        {"file": ("big.qcow2", image.read_bytes())})
        assert status == 200, body
        uploaded = body["data"]
        await halfway
        failed = wait_for(distributor, lambda e, r: e == "failed" and r["node_uuid"] == nodes[1]["uuid"], "failure")
        done_a = wait_for(distributor, lambda e, r: e == "done" and r["node_uuid"] == nodes[0]["uuid"], "A done")
        cut_connections(agents[1])
        await agents[1].stopService()
        await failed
        gate.release()
        await done_a

        # The same node comes back (its enrolment and partial file are on disk); the retry resumes.
        async with running_agent(tmp_path / "agent-b", HOSTS[1], port) as restarted:
            done = wait_for(distributor, lambda e, r: e == "done" and r["node_uuid"] == nodes[1]["uuid"], "B done")
            clock.advance(5)
            await done
            assert gate.offsets[-1][0] > 0, "the transfer started over instead of resuming"
            assert md5_of(base_image(restarted, uploaded["uuid"])) == uploaded["md5_sum"]
