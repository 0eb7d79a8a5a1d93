"""A node's NICs, addresses and bonds on the controller side (contract #10-#16, #38-#40).

The agent is the authority on what a node has: every change is sent to it first, and the store is
brought in step from the agent's answer (its full list of NICs and addresses).  Records keep their
uuids across changes: NICs are matched by name, addresses by IP, so an address that moves (onto a
bond, back onto a NIC) keeps its uuid and its management/image roles.

Other plugins reach this as ``core.extensions["network"]`` (:class:`NodeNetworks`): the nodes plugin
calls :meth:`NodeNetworks.sync_node` when it adds a node and :meth:`NodeNetworks.node_interfaces` for
the node detail.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional

from twisted.internet import defer
from twisted.logger import Logger

from kvmdesk.core import errors
from kvmdesk.core.errors import ApiError, Resource
from kvmdesk.core.ids import stable_uuid
from kvmdesk.core.records import new_record, now_text
from kvmdesk.plugins.network import addressing, agents, schema
from kvmdesk.plugins.network import errors as net_errors

log = Logger(namespace="kvmdesk.network.nics")

EXTENSION = "network"
NODE = Resource("节点", "node")
NIC = Resource("网卡", "NIC")
IP_INFO = Resource("IP", "IP")
BOND = Resource("bond", "bond")

STATUS_UNKNOWN, STATUS_DOWN, STATUS_UP = 0, 1, 2
TYPE_NIC, TYPE_BOND = 0, 1
ROLES = {"is_manage": "management network", "is_image": "image network"}
IP_FIELDS = ("uuid", "ip", "netmask", "gateway", "dns1", "dns2", "name", "is_manage", "is_image")


def _status(nic: Mapping[str, Any]) -> int:
    if not nic.get("up"):
        return STATUS_DOWN
    return STATUS_UP if nic.get("operstate") in ("UP", "UNKNOWN", None) else STATUS_DOWN


class NodeNetworks:
    """NICs, addresses and bonds of every node, kept in step with the agents.

    :param core: the running core.
    """

    def __init__(self, core: Any):
        self.core = core
        self._locks: dict[str, defer.DeferredLock] = {}

    # -- collections and lookups ------------------------------------------------------------------------

    @property
    def nics(self) -> Any:
        return self.core.store.collection(schema.NICS)

    @property
    def ips(self) -> Any:
        return self.core.store.collection(schema.IP_INFOS)

    def lock(self, node_uuid: str) -> defer.DeferredLock:
        """Changes to one node's network run one at a time (the agent's answers are merged in order)."""
        return self._locks.setdefault(node_uuid, defer.DeferredLock())

    async def serialized(self, node_uuid: str, work: Any) -> Any:
        return await self.lock(node_uuid).run(lambda: defer.ensureDeferred(work()))

    async def node_or_404(self, uuid: str) -> dict:
        node = await self.core.store.collection(schema.NODES).find_one({"uuid": uuid})
        if node is None:
            raise ApiError(errors.NOT_FOUND, resource=NODE, key=uuid)
        return node

    async def nic_or_404(self, node: Mapping[str, Any], uuid: str, *, resource: Resource = NIC) -> dict:
        nic = await self.nics.find_one({"uuid": uuid, "node_uuid": node["uuid"]})
        if nic is None:
            raise ApiError(errors.NOT_FOUND, resource=resource, key=uuid)
        return nic

    # -- keeping the store in step with the agent ---------------------------------------------------------

    async def sync_node(self, node: Mapping[str, Any], reported: Optional[list[dict]] = None) -> list[dict]:
        """Merge the agent's NIC list (asked for when not given) into the store; returns the NIC records.

        :raises ApiError: the agent cannot be asked (when ``reported`` is not given).
        """
        if reported is None:
            reported = await agents.call(self.core, node, "GET", "/net/nics")
        stamp = now_text(self.core.clock)
        node_uuid = node["uuid"]
        existing = {r["nic"]: r for r in await self.nics.find({"node_uuid": node_uuid})}
        records: dict[str, dict] = {}
        for item in reported:
            fields = {"mac": item.get("mac"), "speed": item.get("speed") or 0, "status": _status(item),
                      "type": TYPE_BOND if item.get("bond") else TYPE_NIC, "kind": item.get("kind"), "mtu": item.get("mtu")}
            if item.get("bond"):
                fields["mode"] = item["bond"]["mode"]
            record = existing.get(item["name"])
            if record is None:
                # the same uuid the nodes plugin shows for this NIC (check_node_virt, node detail)
                record = await self.nics.insert_one(new_record(
                    self.core.clock, uuid=stable_uuid(node_uuid, "nic", item["name"]), node_uuid=node_uuid,
                    nic=item["name"], master=None, **fields))
            elif any(record.get(k) != v for k, v in fields.items()):
                record = await self.nics.find_one_and_update({"uuid": record["uuid"]},
                                                             {"$set": {**fields, "updated_at": stamp}})
            records[item["name"]] = record
        # masters and slaves refer to each other by uuid
        for item in reported:
            record = records[item["name"]]
            master = records[item["master"]]["uuid"] if item.get("master") in records else None
            changes: dict[str, Any] = {}
            if record.get("master") != master:
                changes["master"] = master
            if item.get("bond"):
                slaves = [records[s]["uuid"] for s in item["bond"]["slaves"] if s in records]
                if record.get("slaves") != slaves:
                    changes["slaves"] = slaves
            if changes:
                records[item["name"]] = await self.nics.find_one_and_update(
                    {"uuid": record["uuid"]}, {"$set": {**changes, "updated_at": stamp}})
        await self._forget_missing_nics(node_uuid, [r for name, r in existing.items() if name not in records])
        await self._sync_addresses(node, reported, records)
        return list(records.values())

    async def _forget_missing_nics(self, node_uuid: str, gone: list[dict]) -> None:
        """NICs the agent no longer reports are dropped, except switch uplinks (kept, status unknown)."""
        if not gone:
            return
        uplinked = {u["nic_uuid"] for u in await self.core.store.collection(schema.UPLINKS).find(
            {"nic_uuid": {"$in": [g["uuid"] for g in gone]}})}
        for record in gone:
            if record["uuid"] in uplinked:
                await self.nics.update_one({"uuid": record["uuid"]}, {"$set": {"status": STATUS_UNKNOWN}})
            else:
                await self.nics.delete_one({"uuid": record["uuid"]})

    async def _sync_addresses(self, node: Mapping[str, Any], reported: list[dict], records: dict[str, dict]) -> None:
        node_uuid = node["uuid"]
        existing = {r["ip"]: r for r in await self.ips.find({"node_uuid": node_uuid})}
        seen = set()
        for item in reported:
            nic = records[item["name"]]
            for address in item.get("addresses", []):
                seen.add(address["ip"])
                fields = {"nic_uuid": nic["uuid"], "netmask": address["netmask"], "name": address.get("label") or item["name"]}
                record = existing.get(address["ip"])
                if record is None:
                    await self.ips.insert_one(new_record(
                        self.core.clock, uuid=stable_uuid(node_uuid, "nic", item["name"], "ip", address["ip"]),
                        node_uuid=node_uuid, ip=address["ip"], gateway=item.get("gateway") or "",
                        dns1="", dns2="", is_manage=0, is_image=0, **fields))
                elif any(record.get(k) != v for k, v in fields.items()):
                    await self.ips.update_one({"uuid": record["uuid"]}, {"$set": {**fields,
                                                                                  "updated_at": now_text(self.core.clock)}})
        gone = [ip for ip in existing if ip not in seen]
        if gone:
            await self.ips.delete_many({"node_uuid": node_uuid, "ip": {"$in": gone}})
        await self._default_roles(node)

    async def _default_roles(self, node: Mapping[str, Any]) -> None:
        """Roles nobody holds yet: management on the address the node was added by (the controller
        reaches its agent there), image on the first address of the NIC named when it was added
        (``image_interface``), else on the management address too."""
        for role in ROLES:
            if await self.ips.count({"node_uuid": node["uuid"], role: 1}):
                continue
            holder = None
            if role == "is_image" and node.get("image_interface"):
                nic = await self.nics.find_one({"node_uuid": node["uuid"], "$or": [
                    {"nic": node["image_interface"]}, {"uuid": node["image_interface"]}]})
                if nic is not None:
                    holder = await self.ips.find_one({"nic_uuid": nic["uuid"]}, sort=[("id", 1)])
            if holder is None and node.get("ip"):
                holder = await self.ips.find_one({"node_uuid": node["uuid"], "ip": node["ip"]})
            if holder is not None:
                await self.ips.update_one({"uuid": holder["uuid"]}, {"$set": {role: 1}})

    async def check_new_uplinks(self, node: Mapping[str, Any], uplinks: list[dict], field: str = "network") -> None:
        """Check the uplinks a node is being added with (``{"switch_uuid", "interface"}``, the NIC by name)
        before anything is stored: each switch exists, each NIC is one the node's agent reports and can
        carry an uplink (not a bond's slave), no switch or NIC twice.  Called by the nodes plugin.

        :param node: ``ip`` and ``agent_secret`` of the node being added (its agent is asked for its NICs).
        :raises ApiError: 400 naming the field and the switch or NIC.
        """
        if not uplinks:
            return
        switches = self.core.store.collection(schema.SWITCHES)
        for i, uplink in enumerate(uplinks):
            if await switches.find_one({"uuid": uplink.get("switch_uuid")}) is None:
                raise ApiError(net_errors.UPLINK_SWITCH_UNKNOWN, field=f"{field}.{i}.switch_uuid",
                               switch=uplink.get("switch_uuid"))
        reported = {nic["name"]: nic for nic in await agents.call(self.core, node, "GET", "/net/nics")}
        switches_seen: set[str] = set()
        nics_seen: set[str] = set()
        for i, uplink in enumerate(uplinks):
            name = uplink.get("interface")
            nic = reported.get(name) if name else None
            if nic is None or nic.get("master"):
                raise ApiError(net_errors.UPLINK_NIC_UNKNOWN, field=f"{field}.{i}.interface", node=agents.node_label(node),
                               nic=name or "-")
            if uplink["switch_uuid"] in switches_seen or name in nics_seen:
                raise ApiError(errors.INVALID_PARAM, field=f"{field}.{i}",
                               reason="a node has one uplink per switch, and a NIC is the uplink of one switch")
            switches_seen.add(uplink["switch_uuid"])
            nics_seen.add(name)

    async def refresh(self, node: Mapping[str, Any]) -> None:
        """Sync when the agent can be asked; otherwise the stored view is served (logged).

        A node its watcher knows to be offline is not asked (it is synced when it returns).
        """
        if node.get("state") == "offline":
            return
        try:
            await self.serialized(node["uuid"], lambda: self.sync_node(node))
        except ApiError as exc:
            log.info("NICs of node {node} not refreshed: {reason}", node=agents.node_label(node), reason=exc.message("en"))

    async def forget_node(self, node_uuid: str) -> None:
        """Drop what the store knows of a deleted node's network: NICs, addresses, switch uplinks.

        Called through ``kvmdesk_node_removed`` once a node is deleted (its bridges go with the node).
        """
        await self.core.store.collection(schema.UPLINKS).delete_many({"node_uuid": node_uuid})
        await self.ips.delete_many({"node_uuid": node_uuid})
        await self.nics.delete_many({"node_uuid": node_uuid})
        self._locks.pop(node_uuid, None)

    # -- views ----------------------------------------------------------------------------------------------

    async def nic_ids(self, node_uuids: list[str]) -> dict[str, int]:
        """NIC uuid -> record ``id`` for every NIC of ``node_uuids`` (the node list's ``network_interfaces[].id``)."""
        records = await self.nics.find({"node_uuid": {"$in": list(node_uuids)}}, projection=["uuid", "id"])
        return {r["uuid"]: r["id"] for r in records}

    def ip_view(self, record: Mapping[str, Any]) -> dict:
        return {k: record.get(k) for k in IP_FIELDS}

    async def node_interfaces(self, node_uuid: str) -> list[dict]:
        """The contract's NIC list of a node (#12/#40): each NIC with its ``ip_info``; the fields of its
        first address are repeated at the top level, as the compute-node variant of the contract has them."""
        nics = await self.nics.find({"node_uuid": node_uuid}, sort=[("id", 1)])
        ips = await self.ips.find({"node_uuid": node_uuid}, sort=[("id", 1)])
        result = []
        for nic in nics:
            ip_info = [self.ip_view(ip) for ip in ips if ip["nic_uuid"] == nic["uuid"]]
            first = ip_info[0] if ip_info else {}
            view = {k: v for k, v in nic.items() if k not in ("slaves",)}
            view.update({"ip_info": ip_info, "ip": first.get("ip", ""), "netmask": first.get("netmask", ""),
                         "gateway": first.get("gateway", ""), "dns1": first.get("dns1", ""), "dns2": first.get("dns2", ""),
                         "is_manage": int(any(i["is_manage"] for i in ip_info)),
                         "is_image": int(any(i["is_image"] for i in ip_info))})
            result.append(view)
        return result

    async def node_bonds(self, node_uuid: str) -> list[dict]:
        """The contract's bond list of a node (#13)."""
        bonds = await self.nics.find({"node_uuid": node_uuid, "type": TYPE_BOND}, sort=[("id", 1)])
        names = {n["uuid"]: n["nic"] for n in await self.nics.find({"node_uuid": node_uuid})}
        result = []
        for bond in bonds:
            ips = await self.ips.find({"nic_uuid": bond["uuid"]}, sort=[("id", 1)])
            result.append({"uuid": bond["uuid"], "nic": bond["nic"], "status": bond["status"], "mode": bond.get("mode"),
                           "slaves": [{"uuid": s, "nic": names.get(s)} for s in bond.get("slaves", [])],
                           "ip_info": [self.ip_view(ip) for ip in ips], "deleted_at": bond.get("deleted_at"),
                           "created_at": bond["created_at"], "updated_at": bond["updated_at"]})
        return result

    # -- checks -----------------------------------------------------------------------------------------

    async def check_address_free(self, node: Mapping[str, Any], ip: str, *, allowed_nics: Iterable[str] = (),
                                 exclude: Optional[str] = None) -> None:
        """An address may not be another node's management address, nor already on this node
        (except on ``allowed_nics``, whose addresses are moving, or the record ``exclude``)."""
        other = await self.ips.find_one({"ip": ip, "is_manage": 1, "node_uuid": {"$ne": node["uuid"]}})
        holder = None
        if other is not None:
            holder = await self.core.store.collection(schema.NODES).find_one({"uuid": other["node_uuid"]})
        else:
            holder = await self.core.store.collection(schema.NODES).find_one({"ip": ip, "uuid": {"$ne": node["uuid"]}})
        if other is not None or holder is not None:
            raise ApiError(net_errors.MANAGE_IP_CONFLICT, ip=ip, node=agents.node_label(holder or {"uuid": other["node_uuid"]}))
        mine = await self.ips.find_one({"node_uuid": node["uuid"], "ip": ip})
        if mine is not None and mine["uuid"] != exclude and mine["nic_uuid"] not in set(allowed_nics):
            nic = await self.nics.find_one({"uuid": mine["nic_uuid"]})
            raise ApiError(net_errors.IP_ON_NODE, ip=ip, node=agents.node_label(node), nic=nic["nic"] if nic else "?")

    async def check_can_carry_addresses(self, nic: Mapping[str, Any]) -> None:
        if nic.get("master"):
            bond = await self.nics.find_one({"uuid": nic["master"]})
            raise ApiError(net_errors.SLAVE_HAS_NO_ADDRESS, nic=nic["nic"], bond=bond["nic"] if bond else nic["master"])

    async def resolve_slaves(self, node: Mapping[str, Any], slave_uuids: list[str], bond_uuid: Optional[str]) -> list[dict]:
        """The NICs named as a bond's slaves: this node's, plain NICs, free, not switch uplinks."""
        result = []
        for i, uuid in enumerate(slave_uuids):
            field = f"slaves.{i}"
            nic = await self.nics.find_one({"uuid": uuid})
            if nic is None or nic["node_uuid"] != node["uuid"]:
                raise ApiError(net_errors.UPLINK_NIC_NOT_ON_NODE, field=field, nic=nic["nic"] if nic else uuid,
                               node=agents.node_label(node))
            if nic.get("type") == TYPE_BOND:
                raise ApiError(net_errors.NIC_IS_BOND, field=field, nic=nic["nic"])
            if nic.get("master") and nic["master"] != bond_uuid:
                bond = await self.nics.find_one({"uuid": nic["master"]})
                raise ApiError(net_errors.BOND_SLAVE_TAKEN, field=field, nic=nic["nic"], bond=bond["nic"] if bond else "?")
            uplink = await self.core.store.collection(schema.UPLINKS).find_one({"nic_uuid": nic["uuid"]})
            if uplink is not None:
                switch = await self.core.store.collection(schema.SWITCHES).find_one({"uuid": uplink["vswitch_uuid"]})
                raise ApiError(net_errors.UPLINK_IN_BOND, nic=nic["nic"], switch=switch["name"] if switch else "?")
            if any(r["uuid"] == nic["uuid"] for r in result):
                raise ApiError(errors.INVALID_PARAM, field=field, reason=f"{nic['nic']} is listed twice")
            result.append(nic)
        return result

    async def check_roles_kept(self, holders: Iterable[str], kept_ips: set[str], field: str) -> None:
        """Addresses that carry the management or image role must survive a change (be in ``kept_ips``)."""
        for ip in await self.ips.find({"nic_uuid": {"$in": list(holders)}}, sort=[("id", 1)]):
            for role, label in ROLES.items():
                if ip.get(role) and ip["ip"] not in kept_ips:
                    nic = await self.nics.find_one({"uuid": ip["nic_uuid"]})
                    raise ApiError(net_errors.ROLE_WOULD_BE_LOST, ip=ip["ip"], nic=nic["nic"] if nic else "?", role=label,
                                   field=field)

    async def set_ip_details(self, node_uuid: str, ips: Iterable[str], **fields: Any) -> None:
        if fields:
            await self.ips.update_many({"node_uuid": node_uuid, "ip": {"$in": list(ips)}},
                                       {"$set": {**fields, "updated_at": now_text(self.core.clock)}})


def ip_details(body: Any, addresses: list[tuple[addressing.IPv4, int]], field: str = "") -> dict:
    """Gateway and DNS of a request, validated (``""`` for the ones not given)."""
    return {
        "gateway": addressing.check_gateway_reachable(field + "gateway", body.gateway, addresses),
        "dns1": addressing.optional_dns(field + "dns1", body.dns1),
        "dns2": addressing.optional_dns(field + "dns2", body.dns2),
    }
