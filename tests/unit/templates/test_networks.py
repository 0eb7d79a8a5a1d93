"""A template moved (#75) or copied (#71) into another data network and subnet: its NIC goes onto that
network's VLAN and its address comes from that subnet (allocated when none is given)."""
from __future__ import annotations

import ipaddress
from xml.etree import ElementTree as ET

import pytest_twisted

from templates_testlib import T


async def second_network(world) -> tuple[dict, dict]:
    status, body = await world.api.call("POST", "/resource_mgr/data_networks", {
        "name": "net2", "switch_uuid": world.network["switch_uuid"], "vlan_id": 102,
        "subnet_info": {"name": "s2", "start_ip": "172.16.2.10", "end_ip": "172.16.2.20",
                        "netmask": "255.255.255.0", "gateway": "172.16.2.254", "dns1": "8.8.8.8"}})
    assert status == 200, body
    subnet = await world.core.store.collection("subnets").find_one({"network_uuid": body["data"]["uuid"]})
    return body["data"], subnet


async def vlan_of(world, template: dict) -> str:
    xml = await world.agent_of(template).hypervisor.domain_xml(template["uuid"], inactive=True)
    return ET.fromstring(xml).find("./devices/interface/vlan/tag").get("id")


def in_s2(ip: str) -> bool:
    return ipaddress.ip_address("172.16.2.10") <= ipaddress.ip_address(ip) <= ipaddress.ip_address("172.16.2.20")


@pytest_twisted.ensureDeferred
async def test_attributes_move_a_template_to_another_network_with_an_address_of_its_subnet(world):
    template = await world.create(bind_ip="172.16.1.15")
    network, subnet = await second_network(world)
    ref = {"uuid": template["uuid"], "name": template["name"]}
    # no bind_ip given: the old address is not the new subnet's, so one of the new subnet is allocated
    status, body = await world.api.call("PUT", T, {**ref, "value": {"network_uuid": network["uuid"],
                                                                    "subnet_uuid": subnet["uuid"]}})
    assert status == 200, body
    moved = body["data"]
    assert (moved["network_name"], moved["subnet_name"]) == ("net2", "s2") and in_s2(moved["bind_ip"]), moved
    assert await vlan_of(world, template) == "102"
    held = {(a["subnet_uuid"], a["ip"]) for a in await world.core.store.collection("ip_allocations").find({})}
    assert held == {(subnet["uuid"], moved["bind_ip"])}  # the old address went back to its subnet

    # an address of the new subnet given with the move is the one it gets
    status, body = await world.api.call("PUT", T, {**ref, "value": {"network_uuid": world.network["uuid"],
                                                                    "subnet_uuid": world.subnet["uuid"],
                                                                    "bind_ip": "172.16.1.19"}})
    assert status == 200 and body["data"]["bind_ip"] == "172.16.1.19", body
    assert await vlan_of(world, template) == "101"
    # an emptied bind_ip ("system allocation", the address deleted): the server allocates one of the subnet
    status, body = await world.api.call("PUT", T, {**ref, "value": {"bind_ip": ""}})
    assert status == 200 and body["data"]["bind_ip"] not in (None, "", "172.16.1.19"), body
    held = {a["ip"] for a in await world.core.store.collection("ip_allocations").find({})}
    assert held == {body["data"]["bind_ip"]}


@pytest_twisted.ensureDeferred
async def test_a_copy_lands_in_the_network_and_subnet_it_names(world):
    source = await world.create()
    network, subnet = await second_network(world)
    status, body = await world.api.call("POST", T, {"action": "copy", "param": {
        "template_uuid": source["uuid"], "name": "copy-net2", "pool_uuid": world.pool,
        "network_uuid": network["uuid"], "subnet_uuid": subnet["uuid"]}})
    assert status == 200, body
    copied = body["data"]
    assert (copied["network_uuid"], copied["subnet_uuid"]) == (network["uuid"], subnet["uuid"])
    assert (copied["network_name"], copied["subnet_name"]) == ("net2", "s2") and in_s2(copied["bind_ip"]), copied
    assert (copied["subnet_start_ip"], copied["subnet_end_ip"]) == ("172.16.2.10", "172.16.2.20")
    assert await vlan_of(world, copied) == "102"
