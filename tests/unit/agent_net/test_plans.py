"""The netlink requests the agent builds, checked request by request (bonds cannot be created on these
machines' kernels, so this is where bond operations are covered down to what is sent)."""
import pytest
import pytest_twisted
from pyroute2.netlink.exceptions import NetlinkError

from kvmdesk.agent.net import errors as agent_errors
from kvmdesk.agent.net import netlink as nl
from kvmdesk.core.errors import ApiError


def snapshot(**extra):
    snap = {
        "links": {
            "eth0": {"kind": None, "up": True, "master": None,
                     "addresses": [{"ip": "10.0.0.5", "prefixlen": 24, "label": "eth0", "secondary": False}]},
            "eth1": {"kind": None, "up": True, "master": None,
                     "addresses": [{"ip": "192.168.1.10", "prefixlen": 24, "label": "eth1", "secondary": False},
                                   {"ip": "192.168.1.12", "prefixlen": 24, "label": "eth1:0", "secondary": True}]},
            "eth2": {"kind": None, "up": False, "master": None, "addresses": []},
            "eth3": {"kind": None, "up": True, "master": None, "addresses": []},
        },
        "default_route": {"gateway": "10.0.0.1", "dev": "eth0"},
    }
    snap.update(extra)
    return snap


def with_bond(mode=1, route_dev="eth0"):
    snap = snapshot()
    snap["links"]["bond0"] = {"kind": "bond", "bond_mode": mode, "up": True, "master": None,
                              "addresses": [{"ip": "192.168.1.76", "prefixlen": 24, "label": "bond0", "secondary": False},
                                            {"ip": "192.168.1.77", "prefixlen": 24, "label": "bond0:0", "secondary": True}]}
    for slave in ("eth2", "eth3"):
        snap["links"][slave]["master"] = "bond0"
    snap["default_route"] = {"gateway": "192.168.1.254" if route_dev == "bond0" else "10.0.0.1", "dev": route_dev}
    return snap


def described(steps):
    return [s.describe() for s in steps]


def refused(error, call, *args, **kwargs):
    with pytest.raises(ApiError) as caught:
        call(*args, **kwargs)
    assert caught.value.error == error
    return caught.value.message("en")


def test_create_bond_requests():
    steps = nl.plan_create_bond(snapshot(), "bond0", 1, ["eth1", "eth2"], [("192.168.1.10", 24), ("192.168.1.11", 24)])
    assert described(steps) == [
        "link_add bond0 kind=bond bond_mode=1",
        # the slave's addresses go first, the secondary before its primary
        "addr_del eth1 address=192.168.1.12 prefixlen=24",
        "addr_del eth1 address=192.168.1.10 prefixlen=24",
        "link_set eth1 state=down",
        "link_set eth1 master=bond0",
        "link_set eth2 state=down",
        "link_set eth2 master=bond0",
        "addr_add bond0 address=192.168.1.10 prefixlen=24",
        "addr_add bond0 address=192.168.1.11 prefixlen=24 label=bond0:0",
        "link_set bond0 state=up",
        "link_set eth1 state=up",
        "link_set eth2 state=up",
    ]
    # every change knows how it is undone
    inverses = {s.describe(): s.inverse.describe() for s in steps if s.inverse is not None}
    assert inverses["link_add bond0 kind=bond bond_mode=1"] == "link_del bond0"
    assert inverses["addr_del eth1 address=192.168.1.12 prefixlen=24"] == \
        "addr_add eth1 address=192.168.1.12 prefixlen=24 label=eth1:0"
    assert inverses["link_set eth1 master=bond0"] == "link_set eth1 master=None"
    assert inverses["link_set eth2 state=down"] == "link_set eth2 state=down"  # it was down before


def test_create_bond_moves_the_default_route_of_a_slave():
    snap = snapshot(default_route={"gateway": "192.168.1.254", "dev": "eth1"})
    steps = nl.plan_create_bond(snap, "bond0", 0, ["eth1"], [("192.168.1.10", 24)])
    assert described(steps)[-1] == "route_add bond0 dst=0.0.0.0/0 gateway=192.168.1.254"
    # a node's working default route elsewhere is never replaced
    steps = nl.plan_create_bond(snapshot(), "bond0", 6, ["eth2"], [("192.168.2.10", 24)], gateway="192.168.2.1")
    assert not any(s.op == "route_add" for s in steps)
    steps = nl.plan_create_bond(snapshot(default_route=None), "bond0", 6, ["eth2"], [("192.168.2.10", 24)],
                                gateway="192.168.2.1")
    assert described(steps)[-1] == "route_add bond0 dst=0.0.0.0/0 gateway=192.168.2.1"


def test_create_bond_refusals():
    snap = snapshot()
    assert "mode 2" in refused(agent_errors.BOND_MODE, nl.plan_create_bond, snap, "bond0", 2, ["eth2"], [])
    assert "eth9" in refused(agent_errors.NO_SUCH_NIC, nl.plan_create_bond, snap, "bond0", 1, ["eth9"], [])
    assert "eth0" in refused(agent_errors.BOND_EXISTS, nl.plan_create_bond, snap, "eth0", 1, ["eth2"], [])
    message = refused(agent_errors.ADDRESS_EXISTS, nl.plan_create_bond, snap, "bond0", 1, ["eth2"], [("10.0.0.5", 24)])
    assert "10.0.0.5" in message and "eth0" in message
    snap = with_bond()
    assert "bond0" in refused(agent_errors.SLAVE_UNAVAILABLE, nl.plan_create_bond, snap, "bond1", 1, ["eth2"], [])
    assert "bond itself" in refused(agent_errors.SLAVE_UNAVAILABLE, nl.plan_create_bond, snap, "bond1", 1, ["bond0"], [])


def test_edit_bond_mode_change_releases_and_reenslaves():
    steps = nl.plan_edit_bond(with_bond(mode=1), "bond0", 6, ["eth2", "eth1"], [("192.168.1.76", 24)])
    assert described(steps) == [
        "link_set eth2 master=None",
        "link_set eth3 master=None",
        "link_set bond0 state=down",
        "link_set bond0 kind=bond bond_mode=6",
        "link_set eth2 state=down",
        "link_set eth2 master=bond0",
        "addr_del eth1 address=192.168.1.12 prefixlen=24",
        "addr_del eth1 address=192.168.1.10 prefixlen=24",
        "link_set eth1 state=down",
        "link_set eth1 master=bond0",
        "link_set eth3 state=up",
        "addr_del bond0 address=192.168.1.77 prefixlen=24",
        "link_set bond0 state=up",
        "link_set eth2 state=up",
        "link_set eth1 state=up",
    ]


def test_edit_bond_same_mode_changes_only_the_difference():
    steps = nl.plan_edit_bond(with_bond(mode=0), "bond0", 0, ["eth2"], [("192.168.1.77", 24), ("192.168.1.80", 24)])
    assert described(steps) == [
        "link_set eth3 master=None",
        "link_set eth3 state=up",
        # deleting the primary takes its secondary along: it is put back (the kernel promotes nothing)
        "addr_del bond0 address=192.168.1.77 prefixlen=24",
        "addr_del bond0 address=192.168.1.76 prefixlen=24",
        "addr_add bond0 address=192.168.1.77 prefixlen=24 label=bond0:0",
        "addr_add bond0 address=192.168.1.80 prefixlen=24 label=bond0:1",
        "link_set bond0 state=up",
        "link_set eth2 state=up",
    ]
    assert "bond" in refused(agent_errors.NOT_A_BOND, nl.plan_edit_bond, snapshot(), "eth1", 0, ["eth2"], [])


def test_delete_bond_hands_addresses_and_route_to_the_named_nics():
    steps = nl.plan_delete_bond(with_bond(route_dev="bond0"), "bond0",
                                [("eth2", "192.168.1.76", 24), ("eth3", "192.168.1.77", 24)])
    assert described(steps) == [
        "link_set eth2 master=None",
        "link_set eth3 master=None",
        "link_del bond0",
        "link_set eth2 state=up",
        "link_set eth3 state=up",
        "addr_add eth2 address=192.168.1.76 prefixlen=24",
        "addr_add eth3 address=192.168.1.77 prefixlen=24",
        "route_add eth2 dst=0.0.0.0/0 gateway=192.168.1.254",
    ]
    assert steps[2].inverse.describe() == "link_add bond0 kind=bond bond_mode=1"
    message = refused(agent_errors.ADDRESS_MISSING, nl.plan_delete_bond, with_bond(), "bond0", [("eth2", "10.0.0.5", 24)])
    assert "10.0.0.5" in message


def test_address_plans():
    snap = snapshot()
    assert described(nl.plan_add_address(snap, "eth1", "192.168.1.20", 24)) == [
        "addr_add eth1 address=192.168.1.20 prefixlen=24 label=eth1:1"]
    assert described(nl.plan_add_address(snap, "eth2", "172.16.0.2", 16, gateway="172.16.0.1")) == [
        "addr_add eth2 address=172.16.0.2 prefixlen=16"]
    assert described(nl.plan_remove_address(snap, "eth1", "192.168.1.10")) == [
        "addr_del eth1 address=192.168.1.12 prefixlen=24",
        "addr_del eth1 address=192.168.1.10 prefixlen=24",
        "addr_add eth1 address=192.168.1.12 prefixlen=24 label=eth1:0"]
    # a changed address: the new one is in place before the old one goes
    assert described(nl.plan_replace_address(snap, "eth1", "192.168.1.12", "192.168.1.13", 24)) == [
        "addr_add eth1 address=192.168.1.13 prefixlen=24 label=eth1:0",
        "addr_del eth1 address=192.168.1.12 prefixlen=24"]
    assert "eth0" in refused(agent_errors.ADDRESS_EXISTS, nl.plan_add_address, snap, "eth1", "10.0.0.5", 24)
    assert "eth7" in refused(agent_errors.NO_SUCH_NIC, nl.plan_add_address, snap, "eth7", "10.0.0.9", 24)


@pytest_twisted.ensureDeferred
async def test_a_failed_step_rolls_back_everything_before_it():
    memory = nl.MemoryNetlink(snapshot()["links"], default_route={"gateway": "10.0.0.1", "dev": "eth0"})
    before = await memory.nics()
    memory.fail[("link_set", "eth2")] = NetlinkError(16, "Device or resource busy")
    with pytest.raises(ApiError) as caught:
        await memory.create_bond("bond0", 1, ["eth1", "eth2"], [("192.168.1.10", 24)])
    assert caught.value.error == agent_errors.NETLINK_FAILED
    assert "link_set eth2 state=down" in caught.value.message("en") and "busy" in caught.value.message("en")
    assert await memory.nics() == before
    assert [s.describe() for s in memory.sent][-3:] == [
        "addr_add eth1 address=192.168.1.10 prefixlen=24",
        "addr_add eth1 address=192.168.1.12 prefixlen=24 label=eth1:0",
        "link_del bond0"]


@pytest_twisted.ensureDeferred
async def test_memory_bond_lifecycle_with_the_driver_present():
    memory = nl.MemoryNetlink(snapshot()["links"], default_route={"gateway": "10.0.0.1", "dev": "eth0"})
    nics = await memory.create_bond("bond0", 6, ["eth1", "eth2"], [("192.168.1.10", 24)])
    bond = next(n for n in nics if n["name"] == "bond0")
    assert bond["bond"] == {"mode": 6, "slaves": ["eth1", "eth2"]}
    assert [a["ip"] for a in bond["addresses"]] == ["192.168.1.10"]
    assert next(n for n in nics if n["name"] == "eth1")["addresses"] == []
    nics = await memory.edit_bond("bond0", 1, ["eth2", "eth3"], [("192.168.1.10", 24), ("192.168.1.11", 24)])
    bond = next(n for n in nics if n["name"] == "bond0")
    assert bond["bond"] == {"mode": 1, "slaves": ["eth2", "eth3"]} and len(bond["addresses"]) == 2
    nics = await memory.delete_bond("bond0", [("eth2", "192.168.1.10", 24), ("eth3", "192.168.1.11", 24)])
    assert "bond0" not in {n["name"] for n in nics}
    assert {n["name"]: [a["ip"] for a in n["addresses"]] for n in nics if n["name"] in ("eth2", "eth3")} == {
        "eth2": ["192.168.1.10"], "eth3": ["192.168.1.11"]}


def test_a_mode_change_puts_back_the_default_route_through_the_bond():
    steps = nl.plan_edit_bond(with_bond(mode=1, route_dev="bond0"), "bond0", 0, ["eth2", "eth3"],
                              [("192.168.1.76", 24), ("192.168.1.77", 24)])
    assert "link_set bond0 state=down" in described(steps)
    assert described(steps)[-1] == "route_add bond0 dst=0.0.0.0/0 gateway=192.168.1.254"
    # without a mode change the bond stays up and keeps its route
    steps = nl.plan_edit_bond(with_bond(mode=1, route_dev="bond0"), "bond0", 1, ["eth2", "eth3"],
                              [("192.168.1.76", 24), ("192.168.1.77", 24)])
    assert not any(s.op == "route_add" for s in steps)
