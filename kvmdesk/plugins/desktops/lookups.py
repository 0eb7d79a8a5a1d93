"""Reading the records this plugin refers to (its own and other plugins'), answering 404 when missing."""
from __future__ import annotations

from typing import Any

from kvmdesk.core import errors
from kvmdesk.core.errors import ApiError, Resource
from kvmdesk.plugins.desktops import schema

#: How answers name each kind of record (the contract's language).
NAMES = {
    schema.TEACHING_GROUPS: Resource("教学分组", "teaching group"),
    schema.DESKTOP_GROUPS: Resource("教学桌面组", "teaching desktop group"),
    schema.DESKTOPS: Resource("教学桌面", "teaching desktop"),
    schema.NETWORKS: Resource("数据网络", "data network"),
    schema.SUBNETS: Resource("子网", "subnet"),
    schema.NODES: Resource("节点", "node"),
    schema.POOLS: Resource("资源池", "resource pool"),
    schema.TEMPLATES: Resource("模板", "template"),
}


async def record_or_404(core: Any, collection: str, uuid: str) -> dict[str, Any]:
    found = await core.store.collection(collection).find_one({"uuid": uuid})
    if found is None:
        raise ApiError(errors.NOT_FOUND, resource=NAMES[collection], key=uuid)
    return found


async def names_of(core: Any, collection: str, uuids: set[str]) -> dict[str, str]:
    """``{uuid: name}`` of the records of ``collection`` among ``uuids`` (one query)."""
    if not uuids:
        return {}
    found = await core.store.collection(collection).find({"uuid": {"$in": sorted(uuids)}}, projection=["uuid", "name"])
    return {r["uuid"]: r.get("name") for r in found}
