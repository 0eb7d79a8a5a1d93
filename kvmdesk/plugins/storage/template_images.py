"""Template disk images on the nodes (contract #34-#35), on the same transfer machinery as base images.

The templates plugin produces a template's disk files on the controller and hands them over with
:func:`publish_template_image` (one call per disk and version); every node of the template's pool then
receives the file into the storage of its role (1 system disks, 2 data disks).  Nodes list what they
hold per template; one file can be sent again.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional


from kvmdesk.api.models import Model
from kvmdesk.api.router import ApiRequest, Router
from kvmdesk.core import errors as core_errors
from kvmdesk.core.errors import ApiError, Resource
from kvmdesk.core.paging import paged_search
from kvmdesk.core.records import new_record, now_text
from kvmdesk.core.store import Index
from kvmdesk.core.threadpools import in_reactor_pool
from kvmdesk.plugins.storage.distribution import NODES, TEMPLATE_IMAGES, TRANSFERS, Target
from kvmdesk.plugins.storage.settings import distributor
from kvmdesk.protocol.images import version_digest

TAGS = ("nodes",)
NODE = Resource("节点", "node")
TEMPLATE_IMAGE = Resource("模板镜像", "template image")
TEMPLATE = Resource("模板", "template")
INDEXES = [Index(TEMPLATE_IMAGES, ["image_id"], unique=True), Index(TEMPLATE_IMAGES, ["template_uuid"])]
ROLE_SYSTEM = 1
ROLE_DATA = 2
#: ``core.extensions[...]``: ``await f(node)`` -> ``[{"name", "uuid", "storages": [...]}]``, the template
#: versions another plugin placed on the node (the templates plugin's node-to-node publishing).
NODE_IMAGES_EXTENSION = "templates.node_images"
#: ``await f(node, image_id, version, role)``: send such a version to the node again (its resync).
RESYNC_EXTENSION = "templates.resync_image"


class ResyncParam(Model):
    """The contract's resync parameters; the path already names the image, so each is optional."""

    ipaddr: Optional[str] = None
    role: Optional[int | str] = None
    image_id: Optional[str] = None
    path: Optional[str] = None
    version: Optional[int] = None


class TemplateResync(Model):
    """Accepts ``{"action": "resync", "param": {...}}`` (the catalogue), ``{"data": {...}}`` (the
    document's example) or the parameters themselves."""

    action: Optional[Literal["resync"]] = None
    param: Optional[ResyncParam] = None
    data: Optional[ResyncParam] = None
    ipaddr: Optional[str] = None
    role: Optional[int | str] = None
    image_id: Optional[str] = None
    path: Optional[str] = None
    version: Optional[int] = None


async def publish_template_image(
    core: Any,
    *,
    template_uuid: str,
    template_name: str,
    pool_uuid: str,
    image_id: str,
    role: int,
    version: int,
    source: str | Path,
    digest: Optional[str] = None,
) -> dict:
    """Register (or replace with a new version) one template disk file and send it to every node of the pool.

    :param image_id: the disk's uuid (the file's name on the nodes).
    :param role: 1 system disk, 2 data disk (the node storage role it goes to).
    :param source: the file on the controller (it must stay there while nodes may need it).
    :param digest: its digest (``sha256:<hex>``) if already known (otherwise computed here, in a thread).
    :returns: the stored record.
    """
    source = Path(source).absolute()
    reactor = core.reactor
    size = source.stat().st_size
    if digest is None:
        digest = await in_reactor_pool(reactor, version_digest, source)
    images = core.store.collection(TEMPLATE_IMAGES)
    fields = dict(template_uuid=template_uuid, template_name=template_name, resource_pool_uuid=pool_uuid,
                  image_id=image_id, file_id=image_id, role=int(role), version=int(version), source=str(source),
                  digest=digest, size_bytes=size)
    existing = await images.find_one({"image_id": image_id})
    dist = distributor(core)
    if existing is None:
        record = await images.insert_one(new_record(core.clock, **fields))
    else:
        if existing.get("resource_pool_uuid") != pool_uuid:
            # The template moved to another pool: the old pool's nodes lose the file.
            await dist.remove_image("template", image_id)
        record = await images.find_one_and_update({"image_id": image_id},
                                                  {"$set": {**fields, "updated_at": now_text(core.clock)}})
        transfers = core.store.collection(TRANSFERS)
        for transfer in await transfers.find({"kind": "template", "image_uuid": image_id}):
            # A new version replaces the file on every node that had the old one.
            await transfers.update_one({"uuid": transfer["uuid"]}, {"$set": {
                "digest": digest, "size_bytes": size, "version": int(version), "source": str(source), "role": int(role),
                "template_name": template_name}})
            await dist.restart(transfer["uuid"], force=False)
    await dist.add(Target.template_image(record))
    return record


async def remove_template_image(core: Any, image_id: str) -> None:
    """Forget a template disk file and delete it from every node."""
    await core.store.collection(TEMPLATE_IMAGES).delete_one({"image_id": image_id})
    await distributor(core).remove_image("template", image_id)


def _role_paths(node: dict) -> dict[int, Optional[str]]:
    """The node's storage directory per role, from the node record when the nodes plugin provides it."""
    keys = {1: "TEMPLATE_SYS", 2: "TEMPLATE_DATA", 3: "INSTANCE_SYS", 4: "INSTANCE_DATA"}
    return {role: (node.get(key) or {}).get("path") if isinstance(node.get(key), dict) else None
            for role, key in keys.items()}


#: Filters of the per-node template image list (one row per template).
TEMPLATE_FIELDS = {"uuid": str, "name": str}


def register_routes(router: Router) -> None:
    base = "/resource_mgr/nodes/{node_uuid}/template_images"

    @router.endpoint("GET", base, summary="Template disk images on a node, per storage role, with version and status",
                     tags=TAGS, search_fields=TEMPLATE_FIELDS, paged=True)
    async def list_template_images(req: ApiRequest) -> dict:
        core = req.core
        node = await core.store.collection(NODES).find_one({"uuid": req.path["node_uuid"]})
        if node is None:
            raise ApiError(core_errors.NOT_FOUND, resource=NODE, key=req.path["node_uuid"])
        transfers = await core.store.collection(TRANSFERS).find({"kind": "template", "node_uuid": node["uuid"]},
                                                                 sort=[("id", 1)])
        roots = _role_paths(node)
        templates: dict[str, dict] = {}
        for t in transfers:
            entry = templates.setdefault(t.get("template_uuid") or t["image_uuid"],
                                         {"name": t.get("template_name"), "uuid": t.get("template_uuid"), "storages": []})
            node_path = t.get("node_path")
            # The storage root: what the node reports for the role, else the directory holding the file.
            root = roots.get(t["role"]) or (str(Path(node_path).parents[2]) if node_path else None)
            entry["storages"].append({"role": t["role"], "path": root, "image_id": t["image_uuid"],
                                      "version": t.get("version"), "status": t["status"]})
        # Versions the templates plugin published node to node (it says what this node holds).
        published = core.extensions.get(NODE_IMAGES_EXTENSION)
        for entry in (await published(node)) if published is not None else []:
            templates.setdefault(entry["uuid"], {"name": entry["name"], "uuid": entry["uuid"], "storages": []})[
                "storages"].extend(entry["storages"])
        return await paged_search(req, list(templates.values()), TEMPLATE_FIELDS, resource=TEMPLATE)

    @router.endpoint("POST", base + "/{image_uuid}/resync", summary="Send one template disk image to the node again",
                     tags=TAGS, body=TemplateResync, oplog="重传模板镜像")
    async def resync_template_image(req: ApiRequest) -> dict:
        core = req.core
        node = await core.store.collection(NODES).find_one({"uuid": req.path["node_uuid"]})
        if node is None:
            raise ApiError(core_errors.NOT_FOUND, resource=NODE, key=req.path["node_uuid"])
        image = await core.store.collection(TEMPLATE_IMAGES).find_one({"image_id": req.path["image_uuid"]})
        param = req.body.param or req.body.data or req.body
        resend = core.extensions.get(RESYNC_EXTENSION)
        if image is None and resend is not None:  # a version the templates plugin published node to node
            if param.image_id and param.image_id != req.path["image_uuid"]:
                raise ApiError(core_errors.INVALID_PARAM, field="image_id", reason="does not match the path")
            req.oplog_detail = f"{req.path['image_uuid']} -> {node.get('name') or node.get('ip')}"
            return await resend(node, req.path["image_uuid"], param.version, param.role)
        if image is None:
            raise ApiError(core_errors.NOT_FOUND, resource=TEMPLATE_IMAGE, key=req.path["image_uuid"])
        if param.image_id and param.image_id != image["image_id"]:
            raise ApiError(core_errors.INVALID_PARAM, field="image_id", reason="does not match the path")
        if param.role is not None and str(param.role) != str(image["role"]):
            raise ApiError(core_errors.INVALID_PARAM, field="role", reason=f"this image has role {image['role']}")
        if node.get("resource_pool_uuid") != image["resource_pool_uuid"]:
            from kvmdesk.plugins.storage import errors

            raise ApiError(errors.NODE_NOT_IN_POOL, node=node.get("name") or node["uuid"])
        req.oplog_detail = f"{image.get('template_name')} {image['image_id']} -> {node.get('name') or node.get('ip')}"
        await distributor(core).resync(Target.template_image(image), node)
        return {"image_id": image["image_id"], "node_uuid": node["uuid"], "status": 1}
