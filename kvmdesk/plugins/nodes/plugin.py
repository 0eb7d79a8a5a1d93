"""Hook implementations of the ``nodes`` plugin: pools, compute and controller nodes, watchers, local agent."""
from __future__ import annotations

import tomllib
from importlib import resources
from typing import Any, Optional

from kvmdesk import hookimpl
from kvmdesk.core.errors import Resource
from kvmdesk.plugins.nodes import compute, controllers, manager, pools

__all__ = [
    "kvmdesk_config_defaults",
    "kvmdesk_configure",
    "kvmdesk_routes",
    "kvmdesk_services",
    "kvmdesk_startup",
    "kvmdesk_store_indexes",
    "kvmdesk_usage",
]


@hookimpl
def kvmdesk_config_defaults():
    text = resources.files("kvmdesk.config").joinpath("nodes-defaults.toml").read_text(encoding="utf-8")
    return tomllib.loads(text)


@hookimpl
def kvmdesk_configure(core) -> None:
    nodes = manager.NodeManager(core)
    core.extensions["nodes"] = nodes
    core.extensions["agents"] = nodes.client


@hookimpl
def kvmdesk_store_indexes():
    return [*pools.INDEXES, *manager.INDEXES]


@hookimpl
def kvmdesk_routes(router, core) -> None:
    pools.register_routes(router)
    compute.register_routes(router)
    controllers.register_routes(router)


@hookimpl
def kvmdesk_startup(core):
    async def startup() -> None:
        await pools.ensure_default_pool(core)
        await controllers.ensure_controller_node(core)

    return startup()


@hookimpl
def kvmdesk_services(core):
    services: list[Any] = [core.extensions["nodes"].watchers]
    if core.config.get("agent.local", True):
        from kvmdesk.plugins.nodes.local import LocalAgent

        local = LocalAgent(core)
        core.extensions["local_agent"] = local
        services.append(local)
    return services


@hookimpl
def kvmdesk_usage(core: Any, kind: str, uuid: str):
    if kind != "resource_pool":
        return None

    async def nodes_in_pool() -> Optional[Resource]:
        count = await core.store.collection(pools.NODES).count({"resource_pool_uuid": uuid})
        return Resource(f"还有 {count} 个计算节点", f"{count} nodes in it") if count else None

    return nodes_in_pool()
