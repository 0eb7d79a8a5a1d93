"""The IP allocator: specific and next-free addresses, concurrency, release, restart."""
import ipaddress

import pytest
import pytest_twisted
from twisted.internet import defer

from kvmdesk.core import errors
from kvmdesk.core.errors import ApiError
from kvmdesk.plugins.network import errors as net_errors
from kvmdesk.plugins.network import schema
from kvmdesk.testing.network import subnet_body
from kvmdesk.testing.api import api_client, make_core


async def make_subnet(api, start="10.1.0.1", end="10.1.0.100", name="pool100"):
    status, body = await api.call("POST", "/resource_mgr/vswitchs", {"name": "sw", "type": "vlan", "uplinks": []})
    switch = body["data"]
    status, body = await api.call("POST", "/resource_mgr/data_networks", {
        "name": "n", "switch_uuid": switch["uuid"], "vlan_id": 7,
        "subnet_info": subnet_body(name, start, end, "255.255.255.0", "10.1.0.254")})
    assert status == 200, body
    return await api.core.store.collection(schema.SUBNETS).find_one({"name": name})


async def outcome(d):
    try:
        return await d
    except ApiError as exc:
        return exc


async def allocate_in_flight(ipam, subnet, count, owner):
    """``count`` allocations started at once; returns (addresses handed out, refusals)."""
    results = await defer.gatherResults([
        defer.ensureDeferred(outcome(ipam.allocate(subnet["uuid"], owner=f"{owner}:{i}"))) for i in range(count)])
    return [r["ip"] for r in results if isinstance(r, dict)], [r for r in results if isinstance(r, ApiError)]


async def check_burst(core, subnet, in_flight):
    """``in_flight`` simultaneous allocations from ``subnet``: exactly as many distinct addresses as
    it has are handed out and the rest refused clearly; released addresses can be had again."""
    size = int(ipaddress.IPv4Address(subnet["end_ip"])) - int(ipaddress.IPv4Address(subnet["start_ip"])) + 1
    ipam = core.extensions["ipam"]
    won, lost = await allocate_in_flight(ipam, subnet, in_flight, "desktop")
    assert len(won) == size and len(set(won)) == size and len(lost) == in_flight - size
    assert set(won) == {f"10.1.0.{i}" for i in range(1, size + 1)}
    assert {e.error for e in lost} == {net_errors.ADDRESS_EXHAUSTED}
    assert "no free address left" in lost[0].message("en") and subnet["name"] in lost[0].message("en")
    assert await core.store.collection(schema.ALLOCATIONS).count({"subnet_uuid": subnet["uuid"]}) == size

    # releasing makes addresses available again, to concurrent requests too
    released = sorted(won, key=ipaddress.IPv4Address)[::2]
    assert all(await defer.gatherResults([defer.ensureDeferred(ipam.release(subnet["uuid"], ip)) for ip in released]))
    again, refused = await allocate_in_flight(ipam, subnet, len(released) + 5, "second")
    assert sorted(again, key=ipaddress.IPv4Address) == released and len(refused) == 5


@pytest_twisted.ensureDeferred
async def test_200_concurrent_allocations_from_100_addresses(tmp_path):
    async with api_client(tmp_path) as api:
        await check_burst(api.core, await make_subnet(api, "10.1.0.1", "10.1.0.100"), 200)


@pytest_twisted.ensureDeferred
async def test_concurrent_allocations_on_the_mongodb_backend(tmp_path):
    """The same guarantee through txmongo, against briskdb's MongoDB wire server (slow with many writes
    in flight, ~0.2 s a write: a small burst, and only the allocator on the store, not a whole controller)."""
    from types import SimpleNamespace

    from twisted.internet import reactor

    from kvmdesk.core.records import new_record
    from kvmdesk.plugins.network.addressing import subnet_spec
    from kvmdesk.plugins.network.ipam import IPAM
    from kvmdesk.testing.stores import open_test_store

    try:
        store, cleanup = await open_test_store("briskdb", tmp_path)
    except Exception as exc:
        pytest.skip(f"briskdb (the test MongoDB-wire server) is not available: {exc}")
    try:
        await store.ensure_indexes([i for i in schema.INDEXES if i.collection in (schema.ALLOCATIONS, schema.CURSORS)])
        core = SimpleNamespace(store=store, clock=reactor, extensions={})
        core.extensions["ipam"] = IPAM(core)
        spec = subnet_spec({"name": "pool4", "start_ip": "10.1.0.1", "end_ip": "10.1.0.4", "netmask": "24",
                            "gateway": "10.1.0.254", "dns1": "8.8.8.8"})
        subnet = await store.collection(schema.SUBNETS).insert_one(new_record(reactor, network_uuid="n", **spec.fields()))
        await check_burst(core, subnet, 8)
    finally:
        await cleanup()


@pytest_twisted.ensureDeferred
async def test_specific_addresses(tmp_path):
    async with api_client(tmp_path) as api:
        subnet = await make_subnet(api, "10.1.0.10", "10.1.0.20")
        ipam = api.core.extensions["ipam"]
        got = await ipam.allocate(subnet["uuid"], "10.1.0.15", owner="template:t1")
        assert (got["ip"], got["owner"], got["network_uuid"]) == ("10.1.0.15", "template:t1", subnet["network_uuid"])
        for ip, error, words in [
            ("10.1.0.15", net_errors.ADDRESS_TAKEN, ["10.1.0.15", "pool100"]),
            ("10.1.0.9", net_errors.OUTSIDE_RANGE, ["10.1.0.9", "10.1.0.10-10.1.0.20"]),
            ("10.1.0.254", net_errors.OUTSIDE_RANGE, ["10.1.0.254"]),
            ("10.1.0", net_errors.BAD_ADDRESS, ["10.1.0"]),
        ]:
            with pytest.raises(ApiError) as caught:
                await ipam.allocate(subnet["uuid"], ip)
            assert caught.value.error == error
            assert all(w in caught.value.message("en") for w in words)
        with pytest.raises(ApiError) as caught:
            await ipam.allocate("nope")
        assert caught.value.error == errors.NOT_FOUND

        # next-free skips what was taken specifically
        taken = {(await ipam.allocate(subnet["uuid"], owner="template:t1"))["ip"] for _ in range(10)}
        assert "10.1.0.15" not in taken and len(taken) == 10
        with pytest.raises(ApiError):
            await ipam.allocate(subnet["uuid"])
        assert await ipam.release_owner("template:t1") == 11
        assert await ipam.release(subnet["uuid"], "10.1.0.15") is False
        assert await ipam.allocations(subnet["uuid"]) == []


@pytest_twisted.ensureDeferred
async def test_allocations_survive_a_restart(tmp_path):
    async with api_client(tmp_path) as api:
        subnet = await make_subnet(api, "10.1.0.1", "10.1.0.3")
        ipam = api.core.extensions["ipam"]
        first = [(await ipam.allocate(subnet["uuid"], owner="a"))["ip"] for _ in range(2)]
    core = await make_core(tmp_path)
    try:
        ipam = core.extensions["ipam"]
        assert [a["ip"] for a in await ipam.allocations(subnet["uuid"])] == first
        last = await ipam.allocate(subnet["uuid"], owner="b")
        assert last["ip"] not in first
        with pytest.raises(ApiError) as caught:
            await ipam.allocate(subnet["uuid"])
        assert caught.value.error == net_errors.ADDRESS_EXHAUSTED
    finally:
        await core.store.close()
