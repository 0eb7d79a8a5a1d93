"""Base images of a resource pool (contract #21-#26): upload, list, detail, edit, delete, resync.

An uploaded image is checked (``qemu-img info``: qcow2 or raw, self-contained), kept on the controller
under its uuid, and distributed to every node of the pool (:mod:`.distribution`); the list and the
detail show each node's progress.
"""
from __future__ import annotations

from typing import Any, Optional

from pydantic import Field

from kvmdesk.api.models import Model, Name, Uuids, validate
from kvmdesk.api.router import ApiRequest, Router
from kvmdesk.api.streaming import StreamContext
from kvmdesk.core import errors as core_errors
from kvmdesk.core.errors import ApiError, Resource
from kvmdesk.core.jobs import run_batch
from kvmdesk.core.paging import paged_search
from kvmdesk.core.records import new_record, now_text
from kvmdesk.core.store import DuplicateKeyError, Index
from kvmdesk.core.threadpools import in_reactor_pool
from kvmdesk.plugins.storage import errors
from kvmdesk.plugins.storage.distribution import (
    BASE_IMAGES,
    NODES,
    STATUS_ERROR,
    STATUS_OK,
    STATUS_SYNCING,
    TRANSFERS,
    Target,
)
from kvmdesk.plugins.storage.formats import check_base_image
from kvmdesk.plugins.storage.ostypes import os_type_simple
from kvmdesk.plugins.storage.settings import distributor, settings
from kvmdesk.plugins.storage.uploads import FormSpec, FormUpload

POOLS = "resource_pools"
RESOURCE = Resource("基础镜像", "base image")
#: The kind other plugins see in kvmdesk_usage and the lifecycle hooks.
KIND = "base_image"
POOL = Resource("资源池", "resource pool")
NODE = Resource("节点", "node")
SEARCH_FIELDS = {"uuid": str, "name": str, "os_type": str, "os_type_simple": str, "md5_sum": str}
INDEXES = [
    Index(BASE_IMAGES, ["uuid"], unique=True),
    Index(BASE_IMAGES, ["resource_pool_uuid", "name"], unique=True),
]
#: Bookkeeping fields never shown by the API.
HIDDEN = ("file", "node_path")
TAGS = ("base_images",)


class BaseImageForm(Model):
    """The upload form (multipart): the file plus its name and system type (also accepted in the query)."""

    file: bytes = Field(description="the image (qcow2 or raw)", json_schema_extra={"format": "binary"})
    name: Name
    os_type: str = Field(min_length=1, max_length=64)


class BaseImageFields(Model):
    name: Name
    os_type: str = Field(min_length=1, max_length=64)


class BaseImageEdit(Model):
    name: Name
    os_type: str = Field(min_length=1, max_length=64)


class Resync(Model):
    node_uuid: str = Field(min_length=1)


async def pool_or_404(core: Any, uuid: str) -> dict:
    pool = await core.store.collection(POOLS).find_one({"uuid": uuid})
    if pool is None:
        raise ApiError(core_errors.NOT_FOUND, resource=POOL, key=uuid)
    return pool


async def image_or_404(core: Any, pool_uuid: str, uuid: str) -> dict:
    image = await core.store.collection(BASE_IMAGES).find_one({"uuid": uuid, "resource_pool_uuid": pool_uuid})
    if image is None:
        raise ApiError(core_errors.NOT_FOUND, resource=RESOURCE, key=uuid)
    return image


def node_view(node: dict, transfer: Optional[dict]) -> dict:
    """One entry of an image's ``detail``: a node and how far the image got there."""
    return {
        "host_name": node.get("name") or node.get("hostname"),
        "ipaddr": node.get("ip"),
        "host_uuid": node["uuid"],
        "progress": transfer["progress"] if transfer else 0,
        "status": transfer["status"] if transfer else STATUS_SYNCING,
    }


def overall_status(details: list[dict]) -> int:
    statuses = {d["status"] for d in details}
    if STATUS_ERROR in statuses:
        return STATUS_ERROR
    return STATUS_SYNCING if STATUS_SYNCING in statuses else STATUS_OK


async def with_sync_state(core: Any, images: list[dict]) -> list[dict]:
    """Add ``count``, ``publish_count``, ``status`` and the per-node ``detail`` (three queries per page)."""
    if not images:
        return images
    store = core.store
    pools = sorted({i["resource_pool_uuid"] for i in images})
    nodes = await store.collection(NODES).find({"resource_pool_uuid": {"$in": pools}}, sort=[("id", 1)])
    transfers = await store.collection(TRANSFERS).find(
        {"kind": "base", "image_uuid": {"$in": [i["uuid"] for i in images]}}
    )
    by_key = {(t["image_uuid"], t["node_uuid"]): t for t in transfers}
    out = []
    for image in images:
        pool_nodes = [n for n in nodes if n.get("resource_pool_uuid") == image["resource_pool_uuid"]]
        detail = [node_view(n, by_key.get((image["uuid"], n["uuid"]))) for n in pool_nodes]
        node_paths = [t.get("node_path") for t in transfers if t["image_uuid"] == image["uuid"] and t.get("node_path")]
        view = {k: v for k, v in image.items() if k not in HIDDEN}
        view.update(
            path=node_paths[0] if node_paths else image.get("file"),
            count=len(detail),
            publish_count=sum(1 for d in detail if d["status"] == STATUS_OK),
            status=overall_status(detail),
            detail=detail,
        )
        out.append(view)
    return out


def _upload_sink(context: StreamContext) -> FormUpload:
    core = context.core
    config = settings(core)

    async def pool_exists() -> None:
        await pool_or_404(core, context.path["pool_uuid"])

    spec = FormSpec(directory=config.base_image_dir, fields=frozenset({"name", "os_type"}),
                    max_file=config.max_upload, precheck=pool_exists, threaded=config.hash_in_thread,
                    fsync=config.fsync, direct=config.direct_io)
    return FormUpload(context, spec)


def register_routes(router: Router) -> None:
    base = "/resource_mgr/resource_pools/{pool_uuid}/base_images"

    @router.endpoint("GET", base, summary="List a pool's base images with per-node sync progress, paged", tags=TAGS,
                     search_fields=SEARCH_FIELDS)
    async def list_images(req: ApiRequest) -> Any:
        await pool_or_404(req.core, req.path["pool_uuid"])
        return await paged_search(req, req.core.store.collection(BASE_IMAGES), SEARCH_FIELDS,
                                  fixed={"resource_pool_uuid": req.path["pool_uuid"]}, sort=[("id", 1)],
                                  decorate=lambda images: with_sync_state(req.core, images), resource=RESOURCE)

    @router.endpoint("POST", base, summary="Upload a base image (multipart form: file, name, os_type)", tags=TAGS,
                     body=BaseImageForm, stream=_upload_sink, oplog="上传基础镜像")
    async def upload_image(req: ApiRequest) -> dict:
        core = req.core
        upload = req.stream
        pool = await pool_or_404(core, req.path["pool_uuid"])
        given = {k: v for k, v in req.args.items() if k in ("name", "os_type")}
        given.update(upload.fields)
        fields = validate(BaseImageFields, given)
        req.oplog_detail = fields.name
        checked = await check_base_image(upload.path, upload.size, upload.head, reactor=core.reactor,
                                         qemu_img=settings(core).qemu_img)
        record = new_record(
            core.clock, name=fields.name, os_type=fields.os_type, os_type_simple=os_type_simple(fields.os_type),
            md5_sum=upload.md5, size=f"{upload.size / (1 << 30):.2f}", size_bytes=upload.size,
            format=checked["format"], virtual_size=checked["virtual_size"], resource_pool_uuid=pool["uuid"],
        )
        destination = settings(core).base_image_dir / record["uuid"]
        record["file"] = str(destination)
        upload.commit(destination)
        try:
            created = await core.store.collection(BASE_IMAGES).insert_one(record)
        except BaseException as exc:
            destination.unlink(missing_ok=True)
            if isinstance(exc, DuplicateKeyError):
                raise ApiError(core_errors.ALREADY_EXISTS, resource=RESOURCE, key=fields.name) from None
            raise
        await core.created(KIND, created)
        await distributor(core).add(Target.base_image(created))
        return (await with_sync_state(core, [created]))[0]

    @router.endpoint("GET", base + "/{image_uuid}", summary="Base image detail with per-node sync state", tags=TAGS)
    async def image_detail(req: ApiRequest) -> dict:
        image = await image_or_404(req.core, req.path["pool_uuid"], req.path["image_uuid"])
        return (await with_sync_state(req.core, [image]))[0]

    @router.endpoint("PUT", base + "/{image_uuid}", summary="Edit a base image's name and system type", tags=TAGS,
                     body=BaseImageEdit, oplog="编辑基础镜像")
    async def edit_image(req: ApiRequest) -> dict:
        image = await image_or_404(req.core, req.path["pool_uuid"], req.path["image_uuid"])
        req.oplog_detail = image["name"]
        changes = {"name": req.body.name, "os_type": req.body.os_type,
                   "os_type_simple": os_type_simple(req.body.os_type), "updated_at": now_text(req.core.clock)}
        try:
            updated = await req.core.store.collection(BASE_IMAGES).find_one_and_update(
                {"uuid": image["uuid"]}, {"$set": changes})
        except DuplicateKeyError:
            raise ApiError(core_errors.ALREADY_EXISTS, resource=RESOURCE, key=req.body.name) from None
        if updated is None:
            raise ApiError(core_errors.NOT_FOUND, resource=RESOURCE, key=image["uuid"])
        await req.core.updated(KIND, updated, changes)
        return (await with_sync_state(req.core, [updated]))[0]

    @router.endpoint("DELETE", base, summary="Delete base images (batch); removed from every node", tags=TAGS,
                     body=Uuids, oplog="删除基础镜像")
    async def delete_images(req: ApiRequest) -> dict:
        core = req.core
        await pool_or_404(core, req.path["pool_uuid"])

        async def delete_one(uuid: str) -> None:
            image = await image_or_404(core, req.path["pool_uuid"], uuid)
            await core.refuse_if_used(KIND, uuid, RESOURCE.named(image['name']))
            await delete_base_image(core, image)

        return await run_batch(req, list(dict.fromkeys(req.body.uuids)), delete_one)

    @router.endpoint("POST", base + "/{image_uuid}/resync", summary="Send a base image to one node again",
                     tags=TAGS, body=Resync, oplog="重传基础镜像")
    async def resync_image(req: ApiRequest) -> dict:
        core = req.core
        image = await image_or_404(core, req.path["pool_uuid"], req.path["image_uuid"])
        node = await core.store.collection(NODES).find_one({"uuid": req.body.node_uuid})
        if node is None:
            raise ApiError(core_errors.NOT_FOUND, resource=NODE, key=req.body.node_uuid)
        if node.get("resource_pool_uuid") != image["resource_pool_uuid"]:
            raise ApiError(errors.NODE_NOT_IN_POOL, node=node.get("name") or node["uuid"])
        req.oplog_detail = f"{image['name']} -> {node.get('name') or node.get('ip')}"
        await distributor(core).resync(Target.base_image(image), node)
        return (await with_sync_state(core, [image]))[0]


async def delete_base_image(core: Any, image: dict) -> None:
    """Forget a base image, remove it from every node, then delete the controller's copy."""
    from pathlib import Path

    await core.store.collection(BASE_IMAGES).delete_one({"uuid": image["uuid"]})
    await core.deleted(KIND, image)
    await distributor(core).remove_image("base", image["uuid"])
    path = Path(image["file"])
    await in_reactor_pool(core.reactor, path.unlink, True)
