"""The placement and capacity planner (pure) and provisioning's address allocation (real IPAM)."""
from __future__ import annotations

import pytest
import pytest_twisted

from kvmdesk.core.errors import ApiError
from kvmdesk.core.records import new_record
from kvmdesk.plugins.desktops import planner, provisioning, schema
from kvmdesk.plugins.desktops.planner import GIB, Demand, Limits, NodeView
from kvmdesk.testing.network import add_node

from .conftest import make_network

POOL = {"uuid": "pool-1", "name": "lab"}
LIMITS = Limits(cpu_overcommit=2.0, ram_overcommit=1.0, ram_reserve=2 * GIB, disk_per_desktop=1 * GIB)
SMALL = Demand(vcpu=2, ram_gib=2)


def node(ip: str, *, pool: str = "pool-1", state: str = "online", cpus: int = 8, ram: int = 34 * GIB,
         disk: int = 100 * GIB, **committed: int) -> NodeView:
    return NodeView(uuid=f"u-{ip}", ip=ip, name=f"n-{ip}", pool=pool, state=state, cpus=cpus, ram_total=ram,
                    disk_free=disk, **committed)


def refused(create_info, count, nodes, demand=SMALL) -> ApiError:
    with pytest.raises(ApiError) as caught:
        planner.plan(create_info, count, POOL, nodes, demand, LIMITS)
    return caught.value


def test_a_plan_that_fits_keeps_create_info_order():
    nodes = [node("10.0.0.1"), node("10.0.0.2")]
    placed = planner.plan({"10.0.0.2": 3, "10.0.0.1": 5}, 8, POOL, nodes, SMALL, LIMITS)
    assert [(p.node.ip, p.count) for p in placed] == [("10.0.0.2", 3), ("10.0.0.1", 5)]


def test_capacity_edges_cpu_ram_disk_and_committed_resources():
    # 8 cpus x 2 = 16 vCPUs: 8 desktops of 2 fit, 9 do not
    assert planner.plan({"a": 8}, 8, POOL, [node("a", ram=100 * GIB)], SMALL, LIMITS)
    error = refused({"a": 9}, 9, [node("a", ram=100 * GIB)])
    assert error.error.code == 6014 and "vCPUs" in error.message("en") and "18 needed, 16 free" in error.message("en")
    # RAM: 34 GiB - 2 GiB reserve - 20 GiB committed = 12 GiB: 6 desktops of 2 GiB, not 7
    busy = node("a", cpus=64, committed_ram=20 * GIB)
    assert planner.plan({"a": 6}, 6, POOL, [busy], SMALL, LIMITS)
    assert "memory" in refused({"a": 7}, 7, [busy]).message("en")
    # committed vCPUs count too
    assert "vCPUs" in refused({"a": 1}, 1, [node("a", committed_vcpu=15)]).message("en")
    # disk: 1 GiB headroom per overlay
    assert "disk space" in refused({"a": 4}, 4, [node("a", disk=3 * GIB)]).message("en")


def test_every_problem_is_listed_first_one_is_the_message():
    nodes = [node("in-pool"), node("other-pool", pool="pool-2"), node("down", state="offline"),
             NodeView(uuid="u", ip="new", name="n", pool="pool-1", state="online", cpus=None, ram_total=None, disk_free=None)]
    error = refused({"ghost": 1, "other-pool": 1, "down": 1, "new": 1, "in-pool": 1}, 5, nodes)
    assert error.error.code == 6010 and "ghost" in error.message("en")
    assert [(p["code"], p["ip"]) for p in error.data["problems"]] == [
        (6010, "ghost"), (6011, "other-pool"), (6012, "down"), (6015, "new")]
    assert all(p["msg"] and p["msg_en"] for p in error.data["problems"])


def test_counts_must_add_up_and_be_positive():
    assert refused({"a": 2}, 3, [node("a")]).error.code == 6013
    assert refused({}, 3, [node("a")]).error.code == 6013
    for bad in (0, -1, True, "2", 1.5):
        assert refused({"a": bad}, 1, [node("a")]).error.code == 6019


def test_node_view_reads_what_the_watchers_store():
    record = {"uuid": "n1", "ip": "10.0.0.1", "name": "node1", "resource_pool_uuid": "p", "state": "warning",
              "facts": {"cpu": {"logical_count": 12}, "memory": {"total": 8 * GIB},
                        "storage": [{"role": "template_sys", "free": 1}, {"role": "instance_sys", "free": 50 * GIB}]},
              "metrics": {"memory": {"total": 16 * GIB, "available": 3 * GIB}}}
    view = NodeView.of(record, 4, GIB)
    assert (view.cpus, view.ram_total, view.disk_free, view.state) == (12, 16 * GIB, 50 * GIB, "warning")
    assert (view.committed_vcpu, view.committed_ram) == (4, GIB)
    bare = NodeView.of({"uuid": "n2", "ip": "10.0.0.2"})
    assert (bare.cpus, bare.ram_total, bare.disk_free) == (None, None, None)


def test_names_are_zero_padded_and_never_widened():
    assert planner.desktop_names("pc", 3, 5, 3) == ["pc005", "pc006", "pc007"]
    assert planner.desktop_names("pc", 2, 0, 100)[-1] == "pc99"
    with pytest.raises(ApiError) as caught:
        planner.desktop_names("pc", 2, 1, 100)
    assert caught.value.error.code == 6016 and "100" in caught.value.message("en")


def test_spread_gives_consecutive_names_per_node():
    a, b = node("a"), node("b")
    placed = [planner.Placement(a, 2), planner.Placement(b, 1)]
    assert [(name, n.ip) for name, n in planner.spread(placed, ["x1", "x2", "x3"])] == [("x1", "a"), ("x2", "a"), ("x3", "b")]


@pytest_twisted.ensureDeferred
async def test_node_views_count_committed_desktops_and_plan_from_the_store(api):
    core = api.core
    pool = await core.store.collection(schema.POOLS).find_one({"default": 1})
    stored = await add_node(core, "n1", "192.0.2.11", pool=pool)
    await core.store.collection(schema.NODES).update_one({"uuid": stored["uuid"]}, {"$set": {
        "state": "online", "facts": {"cpu": {"logical_count": 4}, "memory": {"total": 12 * GIB},
                                     "storage": [{"role": "instance_sys", "free": 40 * GIB}]}}})
    for i in range(3):
        await core.store.collection(schema.DESKTOPS).insert_one(
            new_record(core.clock, name=f"old{i}", node=stored["uuid"], vcpu=2, ram=1.5))
    (view,) = await provisioning.node_views(core, ["192.0.2.11", "192.0.2.99"])
    assert (view.committed_vcpu, view.committed_ram) == (6, int(4.5 * GIB))
    placed = await provisioning.plan_placement(core, {"192.0.2.11": 2}, 2, pool, Demand(1, 1))
    assert [(p.node.uuid, p.count) for p in placed] == [(stored["uuid"], 2)]
    # 12 GiB - 2 reserve - 4.5 committed = 5.5 GiB: 6 desktops of 1 GiB do not fit
    with pytest.raises(ApiError) as caught:
        await provisioning.plan_placement(core, {"192.0.2.11": 6}, 6, pool, Demand(1, 1))
    assert caught.value.error.code == 6014
    with pytest.raises(ApiError) as caught:
        await provisioning.check_names_free(core, ["new1", "old1", "old2"])
    assert caught.value.error.code == 6017 and caught.value.data == {"names": ["old1", "old2"]}
    await provisioning.check_names_free(core, ["new1", "new2"])


@pytest_twisted.ensureDeferred
async def test_addresses_are_taken_all_or_none(api):
    core = api.core
    network, subnet = await make_network(api, start="172.16.1.10", end="172.16.1.14")
    ipam = core.extensions["ipam"]
    addresses = await provisioning.allocate_addresses(core, subnet, ["d1", "d2", "d3"])
    assert sorted(addresses) == ["172.16.1.10", "172.16.1.11", "172.16.1.12"]
    with pytest.raises(ApiError) as caught:
        await provisioning.allocate_addresses(core, subnet, ["d4", "d5", "d6"])
    assert caught.value.error.code == 6018 and "2" in caught.value.message("en")
    assert len(await ipam.allocations(subnet["uuid"])) == 3

    # a failure half-way (someone else took the last addresses meanwhile) gives back what was taken
    real_allocate = ipam.allocate
    calls = []

    async def racing_allocate(subnet_uuid, ip=None, *, owner=""):
        calls.append(owner)
        if len(calls) == 2:
            await real_allocate(subnet_uuid, owner="someone-else")
        return await real_allocate(subnet_uuid, ip, owner=owner)

    ipam.allocate = racing_allocate
    try:
        with pytest.raises(ApiError) as caught:
            await provisioning.allocate_addresses(core, subnet, ["d4", "d5"])
    finally:
        ipam.allocate = real_allocate
    assert caught.value.error.code == 3010
    owners = sorted(a["owner"] for a in await ipam.allocations(subnet["uuid"]))
    assert owners == ["desktop:d1", "desktop:d2", "desktop:d3", "someone-else"]
    await provisioning.release_addresses(core, ["d1", "d2", "d3"])
    assert [a["owner"] for a in await ipam.allocations(subnet["uuid"])] == ["someone-else"]
