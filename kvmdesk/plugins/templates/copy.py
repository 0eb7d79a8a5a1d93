"""#71 copy: a new template from another one's disks, in a pool/network/subnet of its own.

The source must be shut down (its disks are read whole).  Each disk is flattened on the source's node
into a standalone qcow2 (no base image behind it); when the copy lands on another node, that node
fetches the flattened files from the source's agent on a controller ticket and the source's node
forgets them.  The copy gets its own address, MAC, VNC password and domain.
"""
from __future__ import annotations

import uuid as uuidlib
from typing import Any

from kvmdesk.core import errors as core_errors
from kvmdesk.core.errors import ApiError
from kvmdesk.core.records import new_record, now_text
from kvmdesk.core.store import DuplicateKeyError
from kvmdesk.plugins.templates import errors, intents, nodes, schema
from kvmdesk.plugins.templates.models import TemplateCopy
from kvmdesk.plugins.templates.publish import FETCH_TIMEOUT, ticket
from kvmdesk.plugins.templates.service import (RESOURCE, Undo, claim_ip, domain_state, files_of, random_mac,
                                               refuse_if_updating, refuse_taken_name, spec_of, template_or_404,
                                               templates, vnc_password)

COPIED = ("desc", "os_type", "os_type_simple", "classify", "vcpu", "ram")


async def copy(core: Any, body: TemplateCopy, owner: str) -> dict:
    source = await template_or_404(core, body.template_uuid)
    refuse_if_updating(source)
    pool = await core.store.collection(schema.POOLS).find_one({"uuid": body.pool_uuid})
    if pool is None:
        raise ApiError(core_errors.NOT_FOUND, resource=schema.POOL, key=body.pool_uuid)
    network, subnet, nic = await nodes.network_nic(core, body.network_uuid, body.subnet_uuid)
    await refuse_taken_name(core, body.name)
    source_node = await nodes.host_of(core, source)
    if await domain_state(core, source, source_node) != schema.INACTIVE:
        raise ApiError(errors.TEMPLATE_STATE, name=source["name"], reason="shut it down before copying")
    target = await nodes.pick_node(core, pool["uuid"], None)

    record = new_record(core.clock, **{k: source.get(k) for k in COPIED})
    record.update(name=body.name, desc=body.desc if body.desc is not None else source.get("desc", ""),
                  pool_uuid=pool["uuid"], network_uuid=network["uuid"], subnet_uuid=subnet["uuid"],
                  base_image_uuid=None, host_uuid=target["uuid"], nic=nic, mac=random_mac(),
                  vnc_password=vnc_password(), status=schema.INACTIVE, owner=owner, version=0, iso_uuid=None,
                  updated_time=now_text(core.clock), copied_from=source["uuid"])
    record["devices"] = []
    for device in source["devices"]:
        disk = str(uuidlib.uuid4())
        record["devices"].append({**{k: device[k] for k in ("type", "role", "device_name", "boot_index", "size")},
                                  "uuid": disk, "file_id": disk})
    made = files_of(record["devices"])
    intent = await intents.begin(core, "copy", record, {source_node["uuid"]: made, target["uuid"]: made})
    undo = Undo()
    try:
        allocation = await claim_ip(core, subnet["uuid"], body.bind_ip, f"template:{record['uuid']}")
        undo.push("the address", lambda: core.extensions["ipam"].release(subnet["uuid"], allocation["ip"]))
        record["bind_ip"] = allocation["ip"]
        for old, new in zip(source["devices"], record["devices"]):
            await copy_disk(core, source, source_node, target, old, new, undo)
        await nodes.call(core, target, "PUT", f"/domains/{record['uuid']}/spec", spec_of(core, record),
                         template_name=body.name)
        undo.push("the domain", lambda: nodes.call(core, target, "DELETE", f"/domains/{record['uuid']}/definition"))
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


async def copy_disk(core: Any, source: dict, source_node: dict, target: dict, old: dict, new: dict, undo: Undo) -> None:
    """Flatten ``old`` on the source's node as ``new``; move it to ``target`` when that is another node."""
    role, name = old["role"], new["file_id"]
    same_node = source_node["uuid"] == target["uuid"]
    # Each removal is pushed before the step that makes the file: a step cut short may leave part of it.
    undo.push(f"disk {name} on the source's node", lambda: nodes.call(
        core, source_node, "DELETE", f"/disks/template/{name}", params={"role": role}))
    made = await nodes.call(core, source_node, "POST", f"/disks/template/{old['file_id']}/copy",
                            {"role": role, "to": {"kind": "template", "role": role, "file_id": name},
                             **({} if same_node else {"version": 1})},
                            template_name=source["name"], field="template_uuid")
    if same_node:
        return
    undo.push(f"disk {name}", lambda: nodes.call(core, target, "DELETE", f"/disks/template/{name}",
                                                  params={"role": role}))
    url, headers = ticket(core, source_node, role, name)
    await nodes.call(core, target, "POST", f"/images/template/{name}/fetch",
                     {"role": role, "digest": made["digest"], "total": made["size"], "version": 1, "url": url,
                      "ticket": headers}, template_name=source["name"], timeout=FETCH_TIMEOUT)
    await nodes.call(core, source_node, "DELETE", f"/disks/template/{name}", params={"role": role})
