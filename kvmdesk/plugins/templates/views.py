"""What the template lists answer: #78 (every field of the document) and #77 (per-node image state)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

from twisted.internet import defer

from kvmdesk.plugins.templates import schema

GIB = 1 << 30
SEARCH_FIELDS = {"uuid": str, "name": str, "classify": int, "pool_uuid": str, "status": str, "os_type": str,
                 "os_type_simple": str, "network_uuid": str, "subnet_uuid": str, "host_uuid": str, "owner": str}
#: #77's rows: one per node; ``pool_uuid`` and ``template_uuid`` (required) are on every row.
IMAGE_FIELDS = {"pool_uuid": str, "template_uuid": str, "uuid": str, "name": str, "ip": str}
#: Internal fields never answered (the VNC password is the console's, through the agent).
HIDDEN = ("vnc_password", "nic", "mac", "deleted", "deleted_at", "base_image_uuid", "versions", "publish",
          "scheduled_save")
DEVICE_FIELDS = ("uuid", "type", "device_name", "boot_index", "size")
#: ``core.extensions[COUNTS]``, when a desktops plugin provides it: ``await f(template_uuids)`` ->
#: ``{uuid: {"desktop_count", "instance_count", "nodes"}}`` (desktop groups and desktops on each template,
#: the uuids of the nodes those desktops are on).
COUNTS = "templates.usage_counts"
IMAGE_OK, IMAGE_SYNCING, IMAGE_ERROR = 0, 1, 2


async def _by_uuid(core: Any, collection: str, uuids: set) -> dict[str, dict]:
    found = await core.store.collection(collection).find({"uuid": {"$in": sorted(u for u in uuids if u)}})
    return {r["uuid"]: r for r in found}


async def _disk_info(core: Any, node: Optional[Mapping[str, Any]], device: Mapping[str, Any]) -> Optional[dict]:
    """The agent's view of one template disk, or ``None`` when the node cannot say (offline, missing)."""
    if node is None:
        return None
    try:
        return await core.extensions["agents"].call(node, "GET", f"/disks/template/{device['file_id']}",
                                                    params={"role": device["role"]})
    except Exception:
        return None


async def usage_counts(core: Any, template_uuids: list[str]) -> dict[str, dict]:
    """What the desktops plugin counts on each template (:data:`COUNTS`); nothing without it."""
    counts_of = core.extensions.get(COUNTS)
    return await counts_of(template_uuids) if counts_of else {}


async def with_details(core: Any, records: list[dict]) -> list[dict]:
    """Names of the pool, node, network and subnet, devices with their used sizes, usage counts."""
    if not records:
        return records
    pools = await _by_uuid(core, schema.POOLS, {r.get("pool_uuid") for r in records})
    hosts = await _by_uuid(core, schema.NODES, {r.get("host_uuid") for r in records})
    networks = await _by_uuid(core, schema.NETWORKS, {r.get("network_uuid") for r in records})
    subnets = await _by_uuid(core, schema.SUBNETS, {r.get("subnet_uuid") for r in records})
    counts = await usage_counts(core, [r["uuid"] for r in records])
    infos = await defer.gatherResults([
        defer.ensureDeferred(_disk_info(core, hosts.get(r.get("host_uuid")), d)) for r in records for d in r["devices"]
    ])
    out, position = [], 0
    for record in records:
        host = hosts.get(record.get("host_uuid")) or {}
        subnet = subnets.get(record.get("subnet_uuid")) or {}
        devices = []
        for device in record["devices"]:
            info = infos[position]
            position += 1
            devices.append({**{k: device.get(k) for k in DEVICE_FIELDS},
                            "used": round(info["actual_size"] / GIB, 2) if info else None})
        view = {k: v for k, v in record.items() if k not in HIDDEN}
        view.update(
            host_ip=host.get("ip"), host_name=host.get("name") or host.get("hostname"),
            pool_name=(pools.get(record.get("pool_uuid")) or {}).get("name"),
            network_name=(networks.get(record.get("network_uuid")) or {}).get("name"),
            subnet_name=subnet.get("name"), subnet_start_ip=subnet.get("start_ip"), subnet_end_ip=subnet.get("end_ip"),
            devices=devices, ram=float(record["ram"]),
            desktop_count=int((counts.get(record["uuid"]) or {}).get("desktop_count", 0)),
            instance_count=int((counts.get(record["uuid"]) or {}).get("instance_count", 0)),
        )
        out.append(view)
    return out


def _role_root(node: Mapping[str, Any], role: int, file_path: Optional[str]) -> Optional[str]:
    """The node's storage directory of ``role``: as the node reports it, else the one holding the file."""
    key = {1: "TEMPLATE_SYS", 2: "TEMPLATE_DATA"}.get(role)
    entry = node.get(key) if key else None
    if isinstance(entry, dict) and entry.get("path"):
        return entry["path"]
    return str(Path(file_path).parents[2]) if file_path else None


async def image_states(core: Any, template: Mapping[str, Any]) -> list[dict]:
    """#77: per node of the template's pool, the state of each template disk there.

    The host node's disks are asked of its agent (0 present, 2 missing or unreachable); on the other
    nodes a disk is what publishing the latest version there gave (0 done, 2 failed), 1 until a
    version has been sent there.  ``bind_desktop``: desktops of the template are on that node.
    """
    bound_nodes = set((await usage_counts(core, [template["uuid"]])).get(template["uuid"], {}).get("nodes") or ())
    pool_nodes = await core.store.collection(schema.NODES).find({"resource_pool_uuid": template["pool_uuid"]},
                                                                 sort=[("id", 1)])
    transfers = await core.store.collection(schema.TRANSFERS).find(
        {"kind": "template", "image_uuid": {"$in": [d["uuid"] for d in template["devices"]]}})
    by_key = {(t["image_uuid"], t["node_uuid"]): t for t in transfers}
    results = []
    for node in pool_nodes:
        storages = []
        for device in template["devices"]:
            if node["uuid"] == template.get("host_uuid"):
                info = await _disk_info(core, node, device)
                status, path = (IMAGE_OK, info["path"]) if info else (IMAGE_ERROR, None)
            elif (template.get("publish") or {}).get(node["uuid"]):
                status, path = template["publish"][node["uuid"]]["status"], None
            else:
                transfer = by_key.get((device["uuid"], node["uuid"]))
                status = transfer["status"] if transfer else IMAGE_SYNCING
                path = (transfer or {}).get("node_path")
            storages.append({"role": device["role"], "path": _role_root(node, device["role"], path),
                             "image_id": device["uuid"], "bind_desktop": node["uuid"] in bound_nodes,
                             "status": status})
        results.append({"name": node.get("name"), "uuid": node["uuid"], "ip": node.get("ip"), "storages": storages})
    return results


async def node_images(core: Any, node: Mapping[str, Any]) -> list[dict]:
    """#34's entries for the templates of ``node``'s pool that have a saved version: each disk of the
    latest version, with its state on this node (0 held, 1 not yet, 2 failed)."""
    found = await core.store.collection(schema.TEMPLATES).find(
        {"pool_uuid": node.get("resource_pool_uuid"), "version": {"$gte": 1}}, sort=[("id", 1)])
    entries = []
    for template in found:
        state = (template.get("publish") or {}).get(node["uuid"]) or {}
        latest = template["versions"][-1]
        status = state.get("status", IMAGE_SYNCING) if state.get("version") == latest["version"] else IMAGE_SYNCING
        entries.append({"name": template["name"], "uuid": template["uuid"], "storages": [
            {"role": f["role"], "path": _role_root(node, f["role"], None), "image_id": f["device_uuid"],
             "version": latest["version"], "status": status} for f in latest["files"]]})
    return entries
