"""The desktop reconcile loop against a real agent (libvirt's test driver with preloaded domains)."""
from __future__ import annotations

import pytest_twisted
from twisted.internet.task import Clock

from kvmdesk.agent.testdriver import DomainSpec
from kvmdesk.core.records import new_record
from kvmdesk.plugins.desktops import power, schema
from kvmdesk.plugins.desktops.reconcile import MISSING, DesktopReconciler
from kvmdesk.testing.agents import AGENT_PASSWORD, free_port, nodes_controller, running_agent

HOST = "127.0.0.2"
UP, DOWN, GONE, BUSY = ("11111111-1111-4111-8111-11111111111" + c for c in "1234")


@pytest_twisted.ensureDeferred
async def test_statuses_are_corrected_and_missing_domains_reported(tmp_path):
    clock = Clock()
    port = free_port(HOST)
    domains = [DomainSpec("pc01", state="running", uuid=UP), DomainSpec("pc02", state="shutoff", uuid=DOWN),
               DomainSpec("pc04", state="running", uuid=BUSY)]
    async with running_agent(tmp_path / "agent", HOST, port, domains=domains), \
            nodes_controller(tmp_path / "controller", port, clock=clock) as api:
        pools = (await api.call("GET", "/resource_mgr/resource_pools"))[1]["data"]["results"]
        status, body = await api.call("POST", f"/resource_mgr/resource_pools/{pools[0]['uuid']}/nodes",
                                      {"ip": HOST, "password": AGENT_PASSWORD})
        assert status == 200, body
        node = body["data"]
        desktops = api.core.store.collection(schema.DESKTOPS)
        for uuid, name, stored in [(UP, "pc01", "inactive"), (DOWN, "pc02", "active"), (GONE, "pc03", "inactive"),
                                   (BUSY, "pc04", "inactive")]:
            await desktops.insert_one({**new_record(clock, name=name, node=node["uuid"], status=stored, message="",
                                                    up_time=None), "uuid": uuid})
        power.busy(api.core).add(BUSY)  # under an operation: left alone
        reconciler = DesktopReconciler(api.core, interval=60.0)
        reconciler.startService()  # the first round runs at once
        await reconciler.current_round
        found = {d["name"]: (d["status"], d["message"]) for d in await desktops.find({})}
        assert found == {"pc01": ("active", ""), "pc02": ("inactive", ""), "pc03": ("error", MISSING),
                         "pc04": ("inactive", "")}
        assert sorted(f["kind"] for f in reconciler.drift[node["uuid"]]) == ["domain_missing", "state_differs",
                                                                             "state_differs"]
        clock.advance(60)  # the next round: nothing differs any more
        await reconciler.current_round
        assert reconciler.drift[node["uuid"]] == []
        await reconciler.stopService()
        assert clock.getDelayedCalls() == []
