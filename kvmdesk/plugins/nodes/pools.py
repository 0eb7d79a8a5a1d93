"""Resource pools: list, create, edit, delete (contract #17-#20)."""
from __future__ import annotations

from typing import Any, Optional

from pydantic import Field

from kvmdesk.api.models import Model, Name, Uuids
from kvmdesk.api.router import ApiRequest, Router
from kvmdesk.core import errors
from kvmdesk.core.errors import ApiError, Resource, define
from kvmdesk.core.jobs import run_batch
from kvmdesk.core.paging import paged_search
from kvmdesk.core.records import new_record, now_text
from kvmdesk.core.store import DuplicateKeyError, Index

POOLS = "resource_pools"
NODES = "nodes"
RESOURCE = Resource("资源池", "resource pool")
#: The kind other plugins see in kvmdesk_usage and the lifecycle hooks.
KIND = "resource_pool"
SEARCH_FIELDS = {"uuid": str, "name": str, "desc": str, "status": int, "default": int}
INDEXES = [Index(POOLS, ["name"], unique=True), Index(POOLS, ["uuid"], unique=True), Index(NODES, ["resource_pool_uuid"])]

DEFAULT_POOL_UNDELETABLE = define(2001, 409, "默认资源池不能删除", "the default resource pool cannot be deleted")

STATUS_NORMAL = 0


class PoolCreate(Model):
    name: Name
    desc: Optional[str] = Field(max_length=1024)


class PoolEdit(Model):
    name: Optional[Name] = None
    desc: Optional[str] = Field(default=None, max_length=1024)


async def ensure_default_pool(core: Any) -> None:
    """The ``default`` pool exists from the first start on."""
    pools = core.store.collection(POOLS)
    if await pools.find_one({"default": 1}) is None:
        try:
            await pools.insert_one(new_record(core.clock, name="default", desc=None, status=STATUS_NORMAL, default=1))
        except DuplicateKeyError:
            # A pool the administrator named "default" becomes the default one.
            await pools.update_one({"name": "default"}, {"$set": {"default": 1}})


async def pool_or_404(core: Any, uuid: str) -> dict:
    pool = await core.store.collection(POOLS).find_one({"uuid": uuid})
    if pool is None:
        raise ApiError(errors.NOT_FOUND, resource=RESOURCE, key=uuid)
    return pool


async def with_host_counts(core: Any, pools: list[dict]) -> list[dict]:
    """Add ``host_count`` to each pool with one grouped count."""
    counts = await core.store.collection(NODES).count_by(
        "resource_pool_uuid", {"resource_pool_uuid": {"$in": [p["uuid"] for p in pools]}}
    )
    for pool in pools:
        pool["host_count"] = counts.get(pool["uuid"], 0)
    return pools


def register_routes(router: Router) -> None:
    base = "/resource_mgr/resource_pools"
    tags = ("resource_pools",)

    @router.endpoint("GET", base, summary="List resource pools, paged", tags=tags, search_fields=SEARCH_FIELDS)
    async def list_pools(req: ApiRequest) -> Any:
        return await paged_search(req, req.core.store.collection(POOLS), SEARCH_FIELDS, sort=[("id", 1)],
                                  decorate=lambda pools: with_host_counts(req.core, pools), resource=RESOURCE)

    @router.endpoint("POST", base, summary="Create a resource pool", body=PoolCreate, tags=tags, oplog="新增资源池")
    async def create_pool(req: ApiRequest) -> dict:
        record = new_record(req.core.clock, name=req.body.name, desc=req.body.desc, status=STATUS_NORMAL, default=0)
        try:
            created = await req.core.store.collection(POOLS).insert_one(record)
        except DuplicateKeyError:
            raise ApiError(errors.ALREADY_EXISTS, resource=RESOURCE, key=req.body.name) from None
        await req.core.created(KIND, created)
        created["host_count"] = 0
        return created

    @router.endpoint("PUT", base + "/{pool_uuid}", summary="Edit a resource pool", body=PoolEdit, tags=tags,
                     oplog="编辑资源池")
    async def edit_pool(req: ApiRequest) -> dict:
        changes = req.body.model_dump(exclude_unset=True)
        if "name" in changes and changes["name"] is None:
            raise ApiError(errors.INVALID_PARAM, field="name", reason="must not be null")
        pool = await pool_or_404(req.core, req.path["pool_uuid"])
        req.oplog_detail = pool["name"]
        if not changes:
            return (await with_host_counts(req.core, [pool]))[0]
        changes["updated_at"] = now_text(req.core.clock)
        try:
            updated = await req.core.store.collection(POOLS).find_one_and_update({"uuid": pool["uuid"]}, {"$set": changes})
        except DuplicateKeyError:
            raise ApiError(errors.ALREADY_EXISTS, resource=RESOURCE, key=changes["name"]) from None
        if updated is None:
            raise ApiError(errors.NOT_FOUND, resource=RESOURCE, key=pool["uuid"])
        await req.core.updated(KIND, updated, changes)
        return (await with_host_counts(req.core, [updated]))[0]

    @router.endpoint("DELETE", base, summary="Delete resource pools (batch)", body=Uuids, tags=tags,
                     oplog="删除资源池")
    async def delete_pools(req: ApiRequest) -> dict:
        async def delete_one(uuid: str) -> None:
            pool = await pool_or_404(req.core, uuid)
            if pool.get("default"):
                raise ApiError(DEFAULT_POOL_UNDELETABLE)
            await req.core.refuse_if_used(KIND, uuid, RESOURCE.named(pool['name']))
            if await req.core.store.collection(POOLS).delete_one({"uuid": uuid}):
                await req.core.deleted(KIND, pool)

        return await run_batch(req, list(dict.fromkeys(req.body.uuids)), delete_one)
