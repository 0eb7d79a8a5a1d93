"""Hook implementations of the ``nodes`` plugin."""
from __future__ import annotations

from typing import Any, Optional

from kvmdesk import hookimpl
from kvmdesk.plugins.nodes import pools

__all__ = ["kvmdesk_routes", "kvmdesk_startup", "kvmdesk_store_indexes", "kvmdesk_usage"]


@hookimpl
def kvmdesk_store_indexes():
    return pools.INDEXES


@hookimpl
def kvmdesk_routes(router, core) -> None:
    pools.register_routes(router)


@hookimpl
def kvmdesk_startup(core):
    return pools.ensure_default_pool(core)


@hookimpl
def kvmdesk_usage(core: Any, kind: str, uuid: str):
    if kind != "resource_pool":
        return None

    async def nodes_in_pool() -> Optional[str]:
        count = await core.store.collection(pools.NODES).count({"resource_pool_uuid": uuid})
        return f"还有 {count} 个计算节点 ({count} nodes)" if count else None

    return nodes_in_pool()
