"""The "tags" plugin of docs/plugins.md: labels an administrator puts on resource pools.

Everything here uses only what docs/plugins.md lists as kvmdesk's public plugin API:

- a configuration section (``[tags] max_per_pool``) through ``kvmdesk_config_defaults``;
- a collection with a unique index (``kvmdesk_store_indexes``);
- CRUD under ``/api/v1.0/tags`` (``Router.endpoint``: paged list with the generic search, create,
  detail, edit, batch delete through ``run_batch``) and an ``{"action", "param"}`` endpoint
  (``Router.actions``: attach / detach a pool);
- a query-string model (``GET /tags/suggest?prefix=...&limit=...``);
- its own error codes (9100-9199, the block docs/plugins.md reserves for it) and bilingual names;
- a veto (``kvmdesk_usage``): a pool that carries a *locked* tag cannot be deleted;
- lifecycle hooks: when a pool is deleted (``kvmdesk_deleted``) its uuid leaves every tag, and
  ``kvmdesk_reconcile`` repairs what happened while the plugin was blocked.

A package ships it as an entry point of the ``kvmdesk.plugins`` group (``pyproject.toml`` beside this
file); the tests register it with ``kvmdesk.testing.plugins.plugin_manager``.
"""
from __future__ import annotations

import re
from typing import Any, Optional

from pydantic import Field

from kvmdesk import hookimpl
from kvmdesk.api.models import Model, Uuids
from kvmdesk.api.router import Action, ApiRequest, Router
from kvmdesk.core import errors
from kvmdesk.core.errors import ApiError, Resource, define
from kvmdesk.core.jobs import run_batch
from kvmdesk.core.paging import paged_search
from kvmdesk.core.records import new_record, now_text
from kvmdesk.core.store import DuplicateKeyError, Index

TAGS = "tags"  # the collection
TAG = Resource("标签", "tag")
POOL_KIND = "resource_pool"
SEARCH_FIELDS = {"uuid": str, "name": str, "locked": bool}

TAG_LOCKED = define(9101, 409, "标签 {name} 已锁定, 不能删除", "tag {name} is locked and cannot be deleted")
TOO_MANY_TAGS = define(9102, 409, "资源池最多 {limit} 个标签", "a resource pool takes at most {limit} tags")


class TagCreate(Model):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[^\x00-\x1f\x7f]+$")
    color: str = Field(default="#808080", pattern=r"^#[0-9a-fA-F]{6}$")
    locked: bool = False


class TagEdit(Model):
    name: Optional[str] = Field(default=None, min_length=1, max_length=64, pattern=r"^[^\x00-\x1f\x7f]+$")
    color: Optional[str] = Field(default=None, pattern=r"^#[0-9a-fA-F]{6}$")
    locked: Optional[bool] = None


class PoolParam(Model):
    pool_uuid: str


class Suggest(Model):
    """``GET /tags/suggest`` query: names starting with ``prefix``."""

    prefix: str = Field(min_length=1, max_length=64)
    limit: int = Field(default=5, ge=1, le=50)


# -- hooks -------------------------------------------------------------------------------------------


@hookimpl
def kvmdesk_config_defaults() -> dict:
    return {"tags": {"max_per_pool": 5}}


@hookimpl
def kvmdesk_store_indexes() -> list[Index]:
    return [Index(TAGS, ["name"], unique=True)]


def carrying(pool_uuid: str) -> dict:
    """The filter of the tags on a pool (``pools`` is a list: the store's ``$elemMatch``)."""
    return {"pools": {"$elemMatch": {"$eq": pool_uuid}}}


@hookimpl
def kvmdesk_usage(core: Any, kind: str, uuid: str) -> Any:
    """The veto: a pool with a locked tag on it is in use."""
    if kind != POOL_KIND:
        return None

    async def locked_tags() -> Optional[Resource]:
        found = await core.store.collection(TAGS).find({**carrying(uuid), "locked": True}, projection=["name"])
        names = ", ".join(t["name"] for t in found)
        return Resource(f"有锁定的标签 {names}", f"locked tags {names}") if found else None

    return locked_tags()


@hookimpl
async def kvmdesk_deleted(core: Any, kind: str, record: dict) -> None:
    """A pool went: it leaves every tag."""
    if kind == POOL_KIND:
        await core.store.collection(TAGS).update_many(carrying(record["uuid"]), {"$pull": {"pools": record["uuid"]}})


@hookimpl
async def kvmdesk_reconcile(core: Any) -> None:
    """Pools deleted while this plugin was blocked sent no kvmdesk_deleted: drop them now.

    Reads the pools' collection (``resource_pools``), a documented name of the built-in store.
    """
    tags = core.store.collection(TAGS)
    referenced = {p for tag in await tags.find({}, projection=["pools"]) for p in tag.get("pools", [])}
    if not referenced:
        return
    existing = {p["uuid"] for p in await core.store.collection("resource_pools").find(
        {"uuid": {"$in": sorted(referenced)}}, projection=["uuid"])}
    for gone in referenced - existing:
        await tags.update_many(carrying(gone), {"$pull": {"pools": gone}})


@hookimpl
def kvmdesk_routes(router: Router, core: Any) -> None:
    base = "/tags"
    tags = ("tags",)

    async def tag_or_404(req: ApiRequest, uuid: str) -> dict:
        tag = await req.core.store.collection(TAGS).find_one({"uuid": uuid})
        if tag is None:
            raise ApiError(errors.NOT_FOUND, resource=TAG, key=uuid)
        return tag

    @router.endpoint("GET", base, summary="List tags, paged", tags=tags, search_fields=SEARCH_FIELDS)
    async def list_tags(req: ApiRequest) -> Any:
        return await paged_search(req, req.core.store.collection(TAGS), SEARCH_FIELDS, sort=[("id", 1)], resource=TAG)

    @router.endpoint("GET", base + "/suggest", summary="Tag names starting with a prefix", tags=tags, query=Suggest)
    async def suggest(req: ApiRequest) -> list[str]:
        found = await req.core.store.collection(TAGS).find(
            {"name": {"$regex": "^" + re.escape(req.query.prefix)}}, sort=[("name", 1)], limit=req.query.limit)
        return [t["name"] for t in found]

    @router.endpoint("POST", base, summary="Create a tag", body=TagCreate, tags=tags, oplog="新增标签")
    async def create_tag(req: ApiRequest) -> dict:
        req.oplog_detail = req.body.name
        record = new_record(req.core.clock, **req.body.model_dump(), pools=[])
        try:
            created = await req.core.store.collection(TAGS).insert_one(record)
        except DuplicateKeyError:
            raise ApiError(errors.ALREADY_EXISTS, resource=TAG, key=req.body.name) from None
        await req.core.created("tag", created)
        return created

    @router.endpoint("GET", base + "/{uuid}", summary="A tag", tags=tags)
    async def tag_detail(req: ApiRequest) -> dict:
        return await tag_or_404(req, req.path["uuid"])

    @router.endpoint("PUT", base + "/{uuid}", summary="Edit a tag", body=TagEdit, tags=tags, oplog="编辑标签")
    async def edit_tag(req: ApiRequest) -> dict:
        tag = await tag_or_404(req, req.path["uuid"])
        req.oplog_detail = tag["name"]
        changes = req.body.model_dump(exclude_none=True)
        if not changes:
            return tag
        changes["updated_at"] = now_text(req.core.clock)
        try:
            updated = await req.core.store.collection(TAGS).find_one_and_update({"uuid": tag["uuid"]}, {"$set": changes})
        except DuplicateKeyError:
            raise ApiError(errors.ALREADY_EXISTS, resource=TAG, key=changes["name"]) from None
        if updated is None:
            raise ApiError(errors.NOT_FOUND, resource=TAG, key=tag["uuid"])
        await req.core.updated("tag", updated, changes)
        return updated

    @router.endpoint("DELETE", base, summary="Delete tags (batch); locked tags are refused", body=Uuids, tags=tags,
                     oplog="删除标签")
    async def delete_tags(req: ApiRequest) -> dict:
        async def delete_one(uuid: str) -> None:
            tag = await tag_or_404(req, uuid)
            if tag["locked"]:
                raise ApiError(TAG_LOCKED, name=tag["name"])
            if await req.core.store.collection(TAGS).delete_one({"uuid": uuid}):
                await req.core.deleted("tag", tag)

        return await run_batch(req, list(dict.fromkeys(req.body.uuids)), delete_one)

    async def attach(req: ApiRequest) -> dict:
        tag = await tag_or_404(req, req.path["uuid"])
        pool = await req.core.store.collection("resource_pools").find_one({"uuid": req.body.pool_uuid})
        if pool is None:
            raise ApiError(errors.NOT_FOUND, resource=Resource("资源池", "resource pool"), key=req.body.pool_uuid)
        limit = int(req.core.config.get("tags.max_per_pool"))
        if await req.core.store.collection(TAGS).count({**carrying(pool["uuid"]), "uuid": {"$ne": tag["uuid"]}}) >= limit:
            raise ApiError(TOO_MANY_TAGS, limit=limit)
        return await set_pools(req, tag, [*(p for p in tag["pools"] if p != pool["uuid"]), pool["uuid"]])

    async def detach(req: ApiRequest) -> dict:
        tag = await tag_or_404(req, req.path["uuid"])
        return await set_pools(req, tag, [p for p in tag["pools"] if p != req.body.pool_uuid])

    router.actions(
        base + "/{uuid}/pools",
        {"attach": Action(attach, "Put the tag on a resource pool", PoolParam, oplog="标签关联资源池"),
         "detach": Action(detach, "Take the tag off a resource pool", PoolParam, oplog="标签取消关联资源池")},
        tags=tags,
        summary="Attach or detach resource pools",
    )


async def set_pools(req: ApiRequest, tag: dict, pools: list[str]) -> dict:
    changes = {"pools": pools, "updated_at": now_text(req.core.clock)}
    updated = await req.core.store.collection(TAGS).find_one_and_update({"uuid": tag["uuid"]}, {"$set": changes})
    if updated is None:
        raise ApiError(errors.NOT_FOUND, resource=TAG, key=tag["uuid"])
    await req.core.updated("tag", updated, changes)
    return updated
