"""Endpoints for a node's NICs, addresses and bonds (contract #10-#16, the same as #38-#40).

Each change is validated, sent to the node's agent, and only then merged into the store from the
agent's answer (see :class:`~kvmdesk.plugins.network.nics.NodeNetworks`).
"""
from __future__ import annotations

from typing import Any

from kvmdesk.api.router import ApiRequest, Router
from kvmdesk.core import errors
from kvmdesk.core.errors import ApiError
from kvmdesk.plugins.network import addressing, agents, schema
from kvmdesk.plugins.network import errors as net_errors
from kvmdesk.plugins.network.models import BondCreate, BondDelete, BondEdit, IpInfo
from kvmdesk.plugins.network.nics import BOND, EXTENSION, IP_INFO, ROLES, TYPE_BOND, NodeNetworks, ip_details


def _networks(req: ApiRequest) -> NodeNetworks:
    return req.core.extensions[EXTENSION]


def _bond_addresses(body: Any) -> list[tuple[addressing.IPv4, int]]:
    result = []
    for i, item in enumerate(body.ip_list):
        result.append(addressing.interface_address(f"ip_list.{i}.ip", item.ip, f"ip_list.{i}.netmask", item.netmask))
    if len({str(ip) for ip, _ in result}) != len(result):
        raise ApiError(errors.INVALID_PARAM, field="ip_list", reason="an address is listed twice")
    return result


def _wire(addresses: list[tuple[addressing.IPv4, int]]) -> list[dict]:
    return [{"ip": str(ip), "netmask": addressing.netmask_text(prefix)} for ip, prefix in addresses]


async def _ip_info(nn: NodeNetworks, node: dict, nic: dict, uuid: str) -> dict:
    record = await nn.ips.find_one({"uuid": uuid, "node_uuid": node["uuid"], "nic_uuid": nic["uuid"]})
    if record is None:
        raise ApiError(errors.NOT_FOUND, resource=IP_INFO, key=uuid)
    return record


async def _bond(nn: NodeNetworks, node: dict, uuid: str) -> dict:
    bond = await nn.nic_or_404(node, uuid, resource=BOND)
    if bond.get("type") != TYPE_BOND:
        raise ApiError(errors.NOT_FOUND, resource=BOND, key=uuid)
    return bond


async def _refuse_bond_uplink(core: Any, bond: dict) -> None:
    uplink = await core.store.collection(schema.UPLINKS).find_one({"nic_uuid": bond["uuid"]})
    if uplink is not None:
        switch = await core.store.collection(schema.SWITCHES).find_one({"uuid": uplink["vswitch_uuid"]})
        raise ApiError(net_errors.BOND_IS_UPLINK, nic=bond["nic"], switch=switch["name"] if switch else "?")


def register_routes(router: Router) -> None:
    base = "/resource_mgr/nodes/{node_uuid}"
    tags = ("nodes-network",)

    @router.endpoint("GET", base + "/nics", summary="A node's NICs with their addresses", tags=tags)
    async def list_nics(req: ApiRequest) -> list:
        nn = _networks(req)
        node = await nn.node_or_404(req.path["node_uuid"])
        await nn.refresh(node)
        return await nn.node_interfaces(node["uuid"])

    @router.endpoint("POST", base + "/nics/{nic_uuid}/ip_infos", summary="Add a secondary address to a NIC", body=IpInfo,
                     tags=tags, oplog="添加网卡附属IP")
    async def add_ip(req: ApiRequest) -> dict:
        nn, body = _networks(req), req.body
        node = await nn.node_or_404(req.path["node_uuid"])
        nic = await nn.nic_or_404(node, req.path["nic_uuid"])
        req.oplog_detail = f"{agents.node_label(node)} {nic['nic']} {body.ip}"
        ip, prefix = addressing.interface_address("ip", body.ip, "netmask", body.netmask)
        details = ip_details(body, [(ip, prefix)])

        async def work() -> dict:
            await nn.check_can_carry_addresses(nic)
            await nn.check_address_free(node, str(ip))
            answer = await agents.call(req.core, node, "POST", f"/net/nics/{nic['nic']}/addresses",
                                       {"ip": str(ip), "netmask": addressing.netmask_text(prefix),
                                        "gateway": details["gateway"] or None})
            await nn.sync_node(node, answer)
            await nn.set_ip_details(node["uuid"], [str(ip)], **details)
            return nn.ip_view(await nn.ips.find_one({"node_uuid": node["uuid"], "ip": str(ip)}))

        return await nn.serialized(node["uuid"], work)

    @router.endpoint("PUT", base + "/nics/{nic_uuid}/ip_infos/{ip_info_uuid}", summary="Change an address of a NIC",
                     body=IpInfo, tags=tags, oplog="修改网卡附属IP")
    async def change_ip(req: ApiRequest) -> dict:
        nn, body = _networks(req), req.body
        node = await nn.node_or_404(req.path["node_uuid"])
        nic = await nn.nic_or_404(node, req.path["nic_uuid"])
        ip, prefix = addressing.interface_address("ip", body.ip, "netmask", body.netmask)
        details = ip_details(body, [(ip, prefix)])

        async def work() -> dict:
            record = await _ip_info(nn, node, nic, req.path["ip_info_uuid"])
            req.oplog_detail = f"{agents.node_label(node)} {nic['nic']} {record['ip']} -> {ip}"
            if str(ip) != record["ip"] and record.get("is_manage"):
                raise ApiError(net_errors.MANAGE_IP_LOCKED, ip=record["ip"], role=ROLES["is_manage"])
            await nn.check_address_free(node, str(ip), exclude=record["uuid"])
            answer = await agents.call(req.core, node, "PUT", f"/net/nics/{nic['nic']}/addresses/{record['ip']}",
                                       {"ip": str(ip), "netmask": addressing.netmask_text(prefix),
                                        "gateway": details["gateway"] or None})
            # the record follows its address, keeping its uuid and roles
            await nn.ips.update_one({"uuid": record["uuid"]}, {"$set": {"ip": str(ip)}})
            await nn.sync_node(node, answer)
            await nn.set_ip_details(node["uuid"], [str(ip)], **details)
            return nn.ip_view(await nn.ips.find_one({"uuid": record["uuid"]}))

        return await nn.serialized(node["uuid"], work)

    @router.endpoint("DELETE", base + "/nics/{nic_uuid}/ip_infos/{ip_info_uuid}",
                     summary="Remove an address from a NIC (not in the contract; refused for management/image addresses)",
                     tags=tags, oplog="删除网卡附属IP")
    async def remove_ip(req: ApiRequest) -> None:
        nn = _networks(req)
        node = await nn.node_or_404(req.path["node_uuid"])
        nic = await nn.nic_or_404(node, req.path["nic_uuid"])

        async def work() -> None:
            record = await _ip_info(nn, node, nic, req.path["ip_info_uuid"])
            req.oplog_detail = f"{agents.node_label(node)} {nic['nic']} {record['ip']}"
            for role, label in ROLES.items():
                if record.get(role):
                    raise ApiError(net_errors.MANAGE_IP_LOCKED, ip=record["ip"], role=label)
            answer = await agents.call(req.core, node, "DELETE", f"/net/nics/{nic['nic']}/addresses/{record['ip']}")
            await nn.sync_node(node, answer)

        await nn.serialized(node["uuid"], work)
        return None

    @router.endpoint("GET", base + "/bond", summary="A node's bonds", tags=tags)
    async def list_bonds(req: ApiRequest) -> list:
        nn = _networks(req)
        node = await nn.node_or_404(req.path["node_uuid"])
        await nn.refresh(node)
        return await nn.node_bonds(node["uuid"])

    @router.endpoint("POST", base + "/bond", summary="Create a bond (mode 0, 1 or 6) from NICs, with addresses",
                     body=BondCreate, tags=tags, oplog="新增bond")
    async def create_bond(req: ApiRequest) -> dict:
        nn, body = _networks(req), req.body
        node = await nn.node_or_404(req.path["node_uuid"])
        req.oplog_detail = f"{agents.node_label(node)} {body.bond_name}"
        addresses = _bond_addresses(body)
        details = ip_details(body.gate_info, addresses, "gate_info.")

        async def work() -> dict:
            if await nn.nics.find_one({"node_uuid": node["uuid"], "nic": body.bond_name}) is not None:
                raise ApiError(errors.ALREADY_EXISTS, resource=BOND, key=body.bond_name)
            slaves = await nn.resolve_slaves(node, body.slaves, None)
            slave_uuids = [s["uuid"] for s in slaves]
            for ip, _ in addresses:
                await nn.check_address_free(node, str(ip), allowed_nics=slave_uuids)
            await nn.check_roles_kept(slave_uuids, {str(ip) for ip, _ in addresses}, "ip_list")
            answer = await agents.call(req.core, node, "POST", "/net/bonds", {
                "name": body.bond_name, "mode": body.mode, "slaves": [s["nic"] for s in slaves],
                "addresses": _wire(addresses), "gateway": details["gateway"] or None})
            await nn.sync_node(node, answer)
            await nn.set_ip_details(node["uuid"], [str(ip) for ip, _ in addresses], **details)
            bond = await nn.nics.find_one({"node_uuid": node["uuid"], "nic": body.bond_name})
            return next(b for b in await nn.node_bonds(node["uuid"]) if b["uuid"] == bond["uuid"])

        return await nn.serialized(node["uuid"], work)

    @router.endpoint("PUT", base + "/bond/{bond_uuid}", summary="Edit a bond: mode, slaves, addresses", body=BondEdit,
                     tags=tags, oplog="编辑bond")
    async def edit_bond(req: ApiRequest) -> dict:
        nn, body = _networks(req), req.body
        node = await nn.node_or_404(req.path["node_uuid"])
        addresses = _bond_addresses(body)
        details = ip_details(body.gate_info, addresses, "gate_info.")

        async def work() -> dict:
            bond = await _bond(nn, node, req.path["bond_uuid"])
            req.oplog_detail = f"{agents.node_label(node)} {bond['nic']}"
            slaves = await nn.resolve_slaves(node, body.slaves, bond["uuid"])
            joining = [s["uuid"] for s in slaves if s.get("master") != bond["uuid"]]
            for ip, _ in addresses:
                await nn.check_address_free(node, str(ip), allowed_nics=[bond["uuid"], *joining])
            await nn.check_roles_kept([bond["uuid"], *joining], {str(ip) for ip, _ in addresses}, "ip_list")
            answer = await agents.call(req.core, node, "PUT", f"/net/bonds/{bond['nic']}", {
                "mode": body.mode, "slaves": [s["nic"] for s in slaves], "addresses": _wire(addresses),
                "gateway": details["gateway"] or None})
            await nn.sync_node(node, answer)
            await nn.set_ip_details(node["uuid"], [str(ip) for ip, _ in addresses], **details)
            return next(b for b in await nn.node_bonds(node["uuid"]) if b["uuid"] == bond["uuid"])

        return await nn.serialized(node["uuid"], work)

    @router.endpoint("DELETE", base + "/bond/{bond_uuid}", summary="Delete a bond; the named NICs inherit its addresses",
                     body=BondDelete, tags=tags, oplog="删除bond")
    async def delete_bond(req: ApiRequest) -> None:
        nn, core = _networks(req), req.core
        node = await nn.node_or_404(req.path["node_uuid"])

        async def work() -> None:
            bond = await _bond(nn, node, req.path["bond_uuid"])
            req.oplog_detail = f"{agents.node_label(node)} {bond['nic']}"
            await _refuse_bond_uplink(core, bond)
            inherit, kept = [], set()
            for i, item in enumerate(req.body.inherit_infos):
                field = f"inherit_infos.{i}"
                ip = await nn.ips.find_one({"uuid": item.ip_uuid, "nic_uuid": bond["uuid"]})
                if ip is None:
                    raise ApiError(net_errors.INHERIT_INVALID, field=field + ".ip_uuid",
                                   reason=f"{item.ip_uuid} is not an address of bond {bond['nic']}")
                if ip["ip"] in kept:
                    raise ApiError(net_errors.INHERIT_INVALID, field=field + ".ip_uuid", reason=f"{ip['ip']} is inherited twice")
                nic = await nn.nics.find_one({"uuid": item.nic_uuid})
                if nic is None or nic["node_uuid"] != node["uuid"]:
                    raise ApiError(net_errors.UPLINK_NIC_NOT_ON_NODE, field=field + ".nic_uuid",
                                   nic=nic["nic"] if nic else item.nic_uuid, node=agents.node_label(node))
                if nic.get("type") == TYPE_BOND:
                    raise ApiError(net_errors.NIC_IS_BOND, field=field + ".nic_uuid", nic=nic["nic"])
                if nic.get("master") and nic["master"] != bond["uuid"]:
                    other = await nn.nics.find_one({"uuid": nic["master"]})
                    raise ApiError(net_errors.BOND_SLAVE_TAKEN, field=field + ".nic_uuid", nic=nic["nic"],
                                   bond=other["nic"] if other else "?")
                kept.add(ip["ip"])
                inherit.append({"nic": nic["nic"], "ip": ip["ip"], "netmask": ip["netmask"]})
            await nn.check_roles_kept([bond["uuid"]], kept, "inherit_infos")
            answer = await agents.call(core, node, "DELETE", f"/net/bonds/{bond['nic']}", {"inherit": inherit})
            await nn.sync_node(node, answer)

        await nn.serialized(node["uuid"], work)
        return None
