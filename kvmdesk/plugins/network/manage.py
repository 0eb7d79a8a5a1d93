"""Management and image networks per node (contract #56-#58).

Each node has one address that carries management traffic (the controller reaches its agent there;
it is the node's ``ip``) and one that carries image transfers.  Either role moves to another address
of the same node; the agent confirms first:

- management: the agent is asked *at the new address* and must report it on one of its NICs; only
  then do the roles and the node's ``ip`` change, so the controller never loses its node;
- image: the agent (at its usual address) must report the new address on one of its NICs.
"""
from __future__ import annotations

from typing import Any

from kvmdesk.api.router import ApiRequest, Router
from kvmdesk.core import errors
from kvmdesk.core.errors import ApiError
from kvmdesk.core.paging import paged_search
from kvmdesk.core.records import now_text
from kvmdesk.plugins.network import agents, schema
from kvmdesk.plugins.network import errors as net_errors
from kvmdesk.plugins.network.models import RoleMoves
from kvmdesk.plugins.network.nics import EXTENSION, IP_INFO, NODE, ROLES


#: Filters of the list: fields of the node records it shows (``uuid`` is the rows' ``node_uuid``).
NODE_FIELDS = {"uuid": str, "name": str, "hostname": str, "ip": str, "type": int}


async def with_roles(core: Any, nodes: list[dict]) -> list[dict]:
    """One row per node: hostname, type, and the NIC/address of each role."""
    store = core.store
    uuids = [n["uuid"] for n in nodes]
    ips = await store.collection(schema.IP_INFOS).find(
        {"node_uuid": {"$in": uuids}, "$or": [{"is_manage": 1}, {"is_image": 1}]})
    nics = {n["uuid"]: n for n in await store.collection(schema.NICS).find({"uuid": {"$in": [i["nic_uuid"] for i in ips]}})}
    rows = []
    for node in nodes:
        row = {"hostname": node.get("hostname") or node.get("name"), "name": node.get("name"), "type": node.get("type"),
               "node_uuid": node["uuid"], "ip": node.get("ip")}
        for role, key in (("is_manage", "manage"), ("is_image", "image")):
            ip = next((i for i in ips if i["node_uuid"] == node["uuid"] and i.get(role)), None)
            nic = nics.get(ip["nic_uuid"], {}) if ip else {}
            row[key] = {
                f"{key}_network": f"{nic.get('nic')}/{ip['ip']}" if ip else None,
                f"{key}_network_uuid": nic.get("uuid"),
                f"{key}_network_interface_uuid": ip["uuid"] if ip else None,
            }
        rows.append(row)
    return rows


def _reports(nics: list[dict], ip: str) -> bool:
    return any(a["ip"] == ip for nic in nics or [] for a in nic.get("addresses", []))


async def move_roles(req: ApiRequest, role: str) -> None:
    """Move ``role`` (``is_manage`` or ``is_image``) as each ``{old_ip_uuid, new_ip_uuid}`` says.

    Every move is checked before any is made; each is confirmed by its agent before the store changes.
    """
    core, nn = req.core, req.core.extensions[EXTENSION]
    label = ROLES[role]
    moves = []
    for i, move in enumerate(req.body.uplinks):
        field = f"uplinks.{i}"
        old = await nn.ips.find_one({"uuid": move.old_ip_uuid})
        if old is None:
            raise ApiError(errors.NOT_FOUND, resource=IP_INFO, key=move.old_ip_uuid)
        if not old.get(role):
            raise ApiError(errors.INVALID_PARAM, field=field + ".old_ip_uuid",
                           reason=f"{old['ip']} does not carry the {label}")
        node = await nn.node_or_404(old["node_uuid"])
        if move.node_uuid not in (None, node["uuid"]):
            raise ApiError(errors.INVALID_PARAM, field=field + ".node_uuid", reason="is not the node of old_ip_uuid")
        new = await nn.ips.find_one({"uuid": move.new_ip_uuid})
        if new is None or new["node_uuid"] != node["uuid"]:
            raise ApiError(net_errors.IP_NOT_ON_NODE, field=field + ".new_ip_uuid",
                           ip=new["ip"] if new else move.new_ip_uuid, node=agents.node_label(node))
        if move.nic_uuid not in (None, new["nic_uuid"]):
            raise ApiError(errors.INVALID_PARAM, field=field + ".nic_uuid", reason="is not the NIC of new_ip_uuid")
        if role == "is_manage":
            await nn.check_address_free(node, new["ip"], allowed_nics=[new["nic_uuid"]], exclude=new["uuid"])
        moves.append((node, old, new))
    req.oplog_detail = ", ".join(f"{agents.node_label(n)}: {o['ip']} -> {w['ip']}" for n, o, w in moves)
    for node, old, new in moves:
        # management: ask the agent where the controller will reach it from now on
        target = {**node, "ip": new["ip"]} if role == "is_manage" else node
        reported = await agents.call(core, target, "GET", "/net/nics")
        if not _reports(reported, new["ip"]):
            raise ApiError(net_errors.IP_NOT_ON_NODE, field="uplinks.new_ip_uuid", ip=new["ip"], node=agents.node_label(node))
        stamp = now_text(core.clock)
        await nn.ips.update_one({"uuid": old["uuid"]}, {"$set": {role: 0, "updated_at": stamp}})
        await nn.ips.update_one({"uuid": new["uuid"]}, {"$set": {role: 1, "updated_at": stamp}})
        if role == "is_manage":
            await core.store.collection(schema.NODES).update_one({"uuid": node["uuid"]},
                                                                 {"$set": {"ip": new["ip"], "updated_at": stamp}})


def register_routes(router: Router) -> None:
    base = "/resource_mgr/manage_networks"
    tags = ("manage_networks",)

    @router.endpoint("GET", base, summary="Per node: the NIC/address of the management and image networks, paged",
                     tags=tags, search_fields=NODE_FIELDS)
    async def list_roles(req: ApiRequest) -> dict:
        return await paged_search(req, req.core.store.collection(schema.NODES), NODE_FIELDS, sort=[("id", 1)],
                                  decorate=lambda nodes: with_roles(req.core, nodes), resource=NODE)

    @router.endpoint("PUT", base + "/mn_node_map", summary="Move a node's management role to another of its addresses",
                     body=RoleMoves, tags=tags, oplog="修改管理网络")
    async def move_manage(req: ApiRequest) -> None:
        await move_roles(req, "is_manage")
        return None

    @router.endpoint("PUT", base + "/in_node_map", summary="Move a node's image-network role to another of its addresses",
                     body=RoleMoves, tags=tags, oplog="修改镜像网络")
    async def move_image(req: ApiRequest) -> None:
        await move_roles(req, "is_image")
        return None
