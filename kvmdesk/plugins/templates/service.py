"""Template operations: create (#64), power (#65-#67), delete (#68), edit (#69), media (#73),
send_key (#74), attributes (#75).

Every operation checks everything it can before it changes anything; what it then changes on a node
is undone if a later step fails, so a refused request leaves the store and the nodes as they were.
"""
from __future__ import annotations

import os
import secrets
import uuid as uuidlib
from pathlib import Path
from typing import Any, Mapping, Optional

from twisted.logger import Logger

from kvmdesk.core import errors as core_errors
from kvmdesk.core.errors import ApiError
from kvmdesk.core.ostypes import os_type_simple
from kvmdesk.core.records import new_record, now_text
from kvmdesk.core.store import DuplicateKeyError
from kvmdesk.plugins.templates import errors, intents, leftovers, nodes, schema
from kvmdesk.plugins.templates.models import ExistingDevice, NewDataDisk, TemplateCreate, TemplateValue

log = Logger(namespace="kvmdesk.templates")
RESOURCE = schema.TEMPLATE
GIB = 1 << 30
#: The agent's libvirt states -> the contract's template status.
STATES = {"running": schema.ACTIVE, "blocked": schema.ACTIVE, "paused": schema.ACTIVE, "pmsuspended": schema.ACTIVE,
          "shutoff": schema.INACTIVE, "shutdown": schema.INACTIVE, "crashed": schema.ERROR}
#: Contract actions -> the agent's domain actions.
POWER_ACTIONS = {"start": "start", "stop": "shutdown", "hard_stop": "destroy", "reboot": "reboot",
                 "hard_reboot": "hard_reboot", "reset": "reset", "send_key": "send_key"}


def domain_name(uuid: str) -> str:
    return f"tpl-{uuid}"


def random_mac() -> str:
    return "52:54:00:" + ":".join(f"{b:02x}" for b in os.urandom(3))


def vnc_password() -> str:
    return secrets.token_urlsafe(6)[:8]


def ram_mb(ram_gb: float) -> int:
    return max(16, int(round(ram_gb * 1024)))


def disk_ref(device: Mapping[str, Any]) -> dict:
    return {"kind": "template", "role": device["role"], "file_id": device["file_id"]}


def templates(core: Any) -> Any:
    return core.store.collection(schema.TEMPLATES)


async def template_or_404(core: Any, uuid: str) -> dict:
    template = await templates(core).find_one({"uuid": uuid})
    if template is None:
        raise ApiError(core_errors.NOT_FOUND, resource=RESOURCE, key=uuid)
    return template


def refuse_if_updating(template: Mapping[str, Any]) -> None:
    if template.get("status") == schema.UPDATING:
        raise ApiError(errors.UPDATING, name=template["name"])


async def refuse_taken_name(core: Any, name: str, own_uuid: Optional[str] = None) -> None:
    found = await templates(core).find_one({"name": name})
    if found is not None and found["uuid"] != own_uuid:
        raise ApiError(core_errors.ALREADY_EXISTS, resource=RESOURCE, key=name)


async def claim_ip(core: Any, subnet_uuid: str, ip: Optional[str], owner: str) -> dict:
    """An address of the subnet from the IPAM: ``ip``, or the next free one; errors name ``bind_ip``."""
    try:
        return await core.extensions["ipam"].allocate(subnet_uuid, ip, owner=owner)
    except ApiError as exc:
        if ip is None or exc.error.status == 404:
            raise
        error = errors.BIND_IP_TAKEN if exc.error.status == 409 else errors.BIND_IP_INVALID
        raise ApiError(error, reason=exc.message("en")) from None


def spec_of(core: Any, template: Mapping[str, Any], *, iso: Optional[str] = None) -> dict:
    """The domain spec of a template (see :class:`kvmdesk.protocol.domains.DomainSpec`); plugins adjust
    it through ``kvmdesk_domain_spec`` before it is sent."""
    disks = [{**disk_ref(d), "boot_order": i + 1} for i, d in enumerate(sorted(template["devices"],
                                                                               key=lambda d: d["boot_index"]))]
    nic = dict(template["nic"])
    if core.config.get("templates.nic_kind", "ovs") == "user":
        nic = {"kind": "user"}
    spec = {"uuid": template["uuid"], "name": domain_name(template["uuid"]), "title": template["name"],
            "vcpu": template["vcpu"], "memory_mb": ram_mb(template["ram"]), "disks": disks,
            "nic": {**nic, "mac": template["mac"]}, "vnc": {"password": template["vnc_password"]},
            "cdrom": {"kind": "iso", "role": schema.ROLE_SYSTEM, "file_id": iso} if iso else None,
            "guest_agent": True, "on_reboot": "restart"}
    core.plugins.hook.kvmdesk_domain_spec(core=core, spec=spec, owner={"kind": "template", **template})
    return spec


class Undo:
    """Steps to take back, newest first, when a later step fails."""

    def __init__(self) -> None:
        self.steps: list[tuple[str, Any]] = []

    def push(self, what: str, step: Any) -> None:
        self.steps.append((what, step))

    async def run(self) -> bool:
        """Take every step back; ``False`` if one of them failed (it is logged)."""
        undone = True
        for what, step in reversed(self.steps):
            try:
                await step()
            except Exception:
                log.failure("undoing {what} failed", what=what)
                undone = False
        return undone


async def create(core: Any, body: TemplateCreate, owner: str) -> dict:
    """#64: the template's disks (system: an overlay on the base image grown to ``size``; data: empty),
    its address and its domain on a node of the pool, then its record."""
    store = core.store
    pool = await store.collection(schema.POOLS).find_one({"uuid": body.pool_uuid})
    if pool is None:
        raise ApiError(core_errors.NOT_FOUND, resource=schema.POOL, key=body.pool_uuid)
    base = await store.collection(schema.BASE_IMAGES).find_one({"uuid": body.system_disk.image_id,
                                                                 "resource_pool_uuid": body.pool_uuid})
    if base is None:
        raise ApiError(core_errors.NOT_FOUND, resource=schema.BASE_IMAGE, key=body.system_disk.image_id)
    base_gb = int(base.get("virtual_size") or 0) / GIB
    if body.system_disk.size < base_gb:
        raise ApiError(errors.DISK_SHRINK, field="system_disk.size", current=round(base_gb, 2),
                       requested=body.system_disk.size)
    inxs = [d.inx for d in body.data_disks]
    if len(set(inxs)) != len(inxs):
        raise ApiError(core_errors.INVALID_PARAM, field="data_disks", reason="two data disks have the same inx")
    network, subnet, nic = await nodes.network_nic(core, body.network_uuid, body.subnet_uuid)
    await refuse_taken_name(core, body.name)
    node = await nodes.pick_node(core, body.pool_uuid, base["uuid"])

    record = new_record(core.clock, name=body.name, desc=body.desc or "", os_type=body.os_type,
                        os_type_simple=os_type_simple(body.os_type), classify=body.classify, pool_uuid=pool["uuid"],
                        network_uuid=network["uuid"], subnet_uuid=subnet["uuid"], vcpu=body.vcpu, ram=float(body.ram),
                        base_image_uuid=base["uuid"], host_uuid=node["uuid"], nic=nic, mac=random_mac(),
                        vnc_password=vnc_password(), status=schema.INACTIVE, owner=owner, version=0, iso_uuid=None,
                        updated_time=now_text(core.clock))
    uuid = record["uuid"]
    record["devices"] = [{"uuid": str(uuidlib.uuid4()), "type": "system", "role": schema.ROLE_SYSTEM, "device_name": "vda",
                          "boot_index": 0, "size": body.system_disk.size}]
    for i, disk in enumerate(sorted(body.data_disks, key=lambda d: d.inx)):
        record["devices"].append({"uuid": str(uuidlib.uuid4()), "type": "data", "role": schema.ROLE_DATA,
                                  "device_name": "vd" + "bcdefghijklmnop"[i], "boot_index": i + 1, "size": disk.size})
    for device in record["devices"]:
        device["file_id"] = device["uuid"]

    intent = await intents.begin(core, "create", record, {node["uuid"]: files_of(record["devices"])})
    undo = Undo()
    try:
        allocation = await claim_ip(core, subnet["uuid"], body.bind_ip, f"template:{uuid}")
        undo.push("the address", lambda: core.extensions["ipam"].release(subnet["uuid"], allocation["ip"]))
        record["bind_ip"] = allocation["ip"]
        await create_disks(core, node, record, record["devices"], undo, base_uuid=base["uuid"])
        await nodes.call(core, node, "PUT", f"/domains/{uuid}/spec", spec_of(core, record), template_name=body.name)
        undo.push("the domain", lambda: nodes.call(core, node, "DELETE", f"/domains/{uuid}/definition"))
        try:
            created = await templates(core).insert_one(record)
        except DuplicateKeyError:
            raise ApiError(core_errors.ALREADY_EXISTS, resource=RESOURCE, key=body.name) from None
    except BaseException:
        await intents.end(core, intent, undone=await undo.run())
        raise
    await intents.end(core, intent, undone=True)
    await core.created(schema.KIND, created)
    return created


def files_of(devices: list[dict]) -> list[dict]:
    """The disk files of ``devices``: ``{file_id, role}``."""
    return [{"file_id": d["file_id"], "role": d["role"]} for d in devices]


async def create_disks(core: Any, node: Mapping[str, Any], template: Mapping[str, Any], devices: list[dict],
                       undo: Undo, *, base_uuid: Optional[str] = None) -> None:
    """Create ``devices`` on the node (the system disk as an overlay on the base image)."""
    for device in devices:
        body: dict[str, Any] = {**disk_ref(device), "size_gb": device["size"]}
        field = "system_disk.size" if device["type"] == "system" else f"data_disks.{device['boot_index'] - 1}.size"
        if device["type"] == "system" and base_uuid:
            body["backing"] = {"kind": "base", "role": schema.ROLE_SYSTEM, "file_id": base_uuid}
        await nodes.call(core, node, "POST", "/disks", body, template_name=template["name"], field=field)
        undo.push(f"disk {device['file_id']}", lambda d=device: nodes.call(
            core, node, "DELETE", f"/disks/template/{d['file_id']}", params={"role": d["role"]}))


async def domain_state(core: Any, template: Mapping[str, Any], node: Optional[Mapping[str, Any]] = None) -> str:
    node = node or await nodes.host_of(core, template)
    info = await nodes.call(core, node, "GET", f"/domains/{template['uuid']}", template_name=template["name"])
    return STATES.get(info["state"], schema.ERROR)


async def set_status(core: Any, uuid: str, status: str) -> None:
    await templates(core).update_one({"uuid": uuid, "status": {"$ne": schema.UPDATING}},
                                     {"$set": {"status": status, "updated_at": now_text(core.clock)}})


async def power(core: Any, uuid: str, action: str) -> dict:
    """#65-#67, #74: one power action (or ctrl+alt+del) on the template's domain."""
    template = await template_or_404(core, uuid)
    refuse_if_updating(template)
    node = await nodes.host_of(core, template)
    info = await nodes.call(core, node, "POST", f"/domains/{uuid}", {"action": POWER_ACTIONS[action]},
                            template_name=template["name"])
    status = STATES.get(info["state"], schema.ERROR)
    await set_status(core, uuid, status)
    return {"uuid": uuid, "name": template["name"], "status": status}


async def edit(core: Any, uuid: str) -> dict:
    """#69: online editing: the template's domain runs, for changes through the console."""
    template = await template_or_404(core, uuid)
    refuse_if_updating(template)
    if await domain_state(core, template) != schema.ACTIVE:
        return await power(core, uuid, "start")
    return {"uuid": uuid, "name": template["name"], "status": schema.ACTIVE}


async def delete(core: Any, uuid: str) -> Optional[dict]:
    """#68: refused while something uses it; its domain and disks go from its node, its versions from
    every node of its pool (what an unreachable node keeps is removed when it answers again), its
    address back, its pending ``run_date`` save cancelled.  Answers ``{"leftover_nodes": [ip]}`` when
    a node kept version files."""
    template = await template_or_404(core, uuid)
    refuse_if_updating(template)
    await core.refuse_if_used(schema.KIND, uuid, RESOURCE.named(template["name"]))
    node = await core.store.collection(schema.NODES).find_one({"uuid": template.get("host_uuid")})
    if node is not None:
        await nodes.call(core, node, "DELETE", f"/domains/{uuid}/definition", params={"delete_disks": 1},
                         template_name=template["name"], missing_ok=True)
        for device in template["devices"]:  # a disk the domain no longer named (or no domain at all)
            await nodes.call(core, node, "DELETE", f"/disks/template/{device['file_id']}",
                             params={"role": device["role"]}, template_name=template["name"])
    kept = await leftovers.remove_versions(core, template)
    await core.extensions["ipam"].release_owner(f"template:{uuid}")
    await core.scheduler.cancel(schema.save_key(uuid))
    await templates(core).delete_one({"uuid": uuid})
    await core.deleted(schema.KIND, template)
    return {"leftover_nodes": kept} if kept else None


async def change_media(core: Any, uuid: str, iso_uuid: Optional[str]) -> dict:
    """#73: place the ISO on the template's node, then change the CD-ROM (live while it runs)."""
    template = await template_or_404(core, uuid)
    refuse_if_updating(template)
    node = await nodes.host_of(core, template)
    media = None
    if iso_uuid is not None:
        iso = await core.store.collection(schema.ISOS).find_one({"uuid": iso_uuid})
        if iso is None:
            raise ApiError(core_errors.NOT_FOUND, resource=schema.ISO, key=iso_uuid)
        place = core.extensions.get("storage.place_file")
        if place is None:
            raise ApiError(errors.NODE_UNAVAILABLE, name=template["name"], reason="the storage plugin is not loaded")
        try:
            await place(node, kind="iso", file_id=iso_uuid, role=schema.ROLE_SYSTEM, source=Path(iso["file"]),
                        md5=iso["md5"])
        except ApiError:
            raise
        except Exception as exc:
            raise nodes.node_error(exc, template["name"]) from None
        media = {"kind": "iso", "role": schema.ROLE_SYSTEM, "file_id": iso_uuid}
    await nodes.call(core, node, "PUT", f"/domains/{uuid}/cdrom", {"media": media}, template_name=template["name"])
    changes = {"iso_uuid": iso_uuid, "updated_at": now_text(core.clock)}
    updated = await templates(core).find_one_and_update({"uuid": uuid}, {"$set": changes})
    if updated is not None:
        await core.updated(schema.KIND, updated, changes)
    return {"uuid": uuid, "name": template["name"], "iso_uuid": iso_uuid}


async def change_attributes(core: Any, uuid: str, value: TemplateValue) -> dict:
    """#75: name, desc, network/subnet/IP, vCPU, RAM, grow disks, add data disks; the domain is
    redefined (CPU, memory and NIC apply at its next boot)."""
    template = await template_or_404(core, uuid)
    refuse_if_updating(template)
    given = value.model_dump(exclude_unset=True)
    changes: dict[str, Any] = {}
    if "name" in given and value.name != template["name"]:
        await refuse_taken_name(core, value.name, uuid)
        changes["name"] = value.name
    if "desc" in given:
        changes["desc"] = value.desc or ""
    for key in ("vcpu", "ram"):
        if given.get(key) is not None:
            changes[key] = float(given[key]) if key == "ram" else given[key]

    grow, added = plan_devices(template, value.devices)
    network_uuid = value.network_uuid or template["network_uuid"]
    subnet_uuid = value.subnet_uuid or template["subnet_uuid"]
    moving = (network_uuid, subnet_uuid) != (template["network_uuid"], template["subnet_uuid"])
    # No bind_ip with a move: the old address belongs to the old subnet, so the new subnet allocates one.
    new_ip = value.bind_ip if "bind_ip" in given else (None if moving else template.get("bind_ip"))
    readdress = moving or new_ip != template.get("bind_ip")
    if moving:
        network, subnet, nic = await nodes.network_nic(core, network_uuid, subnet_uuid)
        changes.update(network_uuid=network_uuid, subnet_uuid=subnet_uuid, nic=nic)
    node = await nodes.host_of(core, template)
    if (grow or added) and await domain_state(core, template, node) != schema.INACTIVE:
        raise ApiError(errors.MUST_BE_STOPPED, field="value.devices", name=template["name"])

    undo = Undo()
    try:
        if readdress:
            allocation = await claim_ip(core, subnet_uuid, new_ip if new_ip else None, f"template:{uuid}")
            undo.push("the new address", lambda: core.extensions["ipam"].release(subnet_uuid, allocation["ip"]))
            changes["bind_ip"] = allocation["ip"]
        devices = [dict(d) for d in template["devices"]]
        if added:
            start = len(devices)
            for i, disk in enumerate(added):
                file_id = str(uuidlib.uuid4())
                devices.append({"uuid": file_id, "file_id": file_id, "type": "data", "role": schema.ROLE_DATA,
                                "device_name": "vd" + "abcdefghijklmnop"[start + i], "boot_index": start + i,
                                "size": disk.size})
            await create_disks(core, node, template, devices[start:], undo)
        growing = [d for d in devices if d["uuid"] in grow]
        if growing:  # all or none: the agent checks every size and the space they need together first
            await nodes.call(core, node, "PUT", "/disks/sizes", {"disks": [
                {**disk_ref(d), "size_gb": grow[d["uuid"]]} for d in growing]}, template_name=template["name"],
                field="value.devices")
            for device in growing:
                device["size"] = grow[device["uuid"]]
        if grow or added:
            changes["devices"] = devices
        updated = {**template, **changes}
        if changes.keys() & {"vcpu", "ram", "devices", "nic", "name"}:
            await nodes.call(core, node, "PUT", f"/domains/{uuid}/spec", spec_of(core, updated, iso=template.get(
                "iso_uuid")), template_name=template["name"])
        changes["updated_time"] = changes["updated_at"] = now_text(core.clock)
        try:
            result = await templates(core).find_one_and_update({"uuid": uuid}, {"$set": changes})
        except DuplicateKeyError:
            raise ApiError(core_errors.ALREADY_EXISTS, resource=RESOURCE, key=changes.get("name")) from None
    except BaseException:
        await undo.run()
        raise
    if readdress and template.get("bind_ip"):
        await core.extensions["ipam"].release(template["subnet_uuid"], template["bind_ip"])
    if result is not None:
        await core.updated(schema.KIND, result, changes)
    return result


def plan_devices(template: Mapping[str, Any], devices: Optional[list]) -> tuple[dict[str, int], list[NewDataDisk]]:
    """``(uuid -> new size of disks that grow, data disks to add)``; a shrink or an unknown disk is refused."""
    if devices is None:
        return {}, []
    current = {d["uuid"]: d for d in template["devices"]}
    grow: dict[str, int] = {}
    added: list[NewDataDisk] = []
    for i, device in enumerate(devices):
        if isinstance(device, NewDataDisk):
            added.append(device)
            continue
        assert isinstance(device, ExistingDevice)
        known = current.get(device.uuid)
        if known is None:
            raise ApiError(core_errors.NOT_FOUND, resource=schema.DISK, key=f"value.devices.{i}.uuid {device.uuid}")
        if device.size < known["size"]:
            raise ApiError(errors.DISK_SHRINK, field=f"value.devices.{i}.size", current=known["size"],
                           requested=device.size)
        if device.size > known["size"]:
            grow[device.uuid] = device.size
    if len(current) + len(added) > 16:
        raise ApiError(core_errors.INVALID_PARAM, field="value.devices", reason="at most 16 disks")
    return grow, added
