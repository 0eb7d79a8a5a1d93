"""Hook implementations of the ``storage`` plugin."""
from __future__ import annotations

from typing import Any, Mapping, Optional

from twisted.internet import defer
from twisted.logger import Logger

from kvmdesk import hookimpl
from kvmdesk.core.errors import Resource
from kvmdesk.plugins.storage import base_images, distribution, isos, placement, template_images
from kvmdesk.plugins.storage.settings import DEFAULTS, settings
from kvmdesk.plugins.storage.uploads import sweep_temporaries

__all__ = [
    "kvmdesk_config_defaults",
    "kvmdesk_node_status_changed",
    "kvmdesk_routes",
    "kvmdesk_services",
    "kvmdesk_startup",
    "kvmdesk_store_indexes",
    "kvmdesk_usage",
]

log = Logger(namespace="kvmdesk.storage")


@hookimpl
def kvmdesk_config_defaults():
    return DEFAULTS


@hookimpl
def kvmdesk_store_indexes():
    return [*distribution.INDEXES, *base_images.INDEXES, *isos.INDEXES, *template_images.INDEXES]


@hookimpl
def kvmdesk_routes(router, core) -> None:
    base_images.register_routes(router)
    template_images.register_routes(router)
    isos.register_routes(router)


@hookimpl
def kvmdesk_services(core):
    config = core.config
    distributor = distribution.Distributor(
        core,
        max_streams=int(config.get("storage.max_streams")),
        retry_initial=float(config.get("storage.retry_initial")),
        retry_max=float(config.get("storage.retry_max")),
        retry_limit=int(config.get("storage.retry_limit")),
        reconcile_interval=float(config.get("storage.reconcile_interval")),
        stall_timeout=float(config.get("storage.stall_timeout")),
        chunk_size=int(config.get("storage.chunk_size")),
        direct_io=bool(config.get("storage.direct_io")),
    )
    core.extensions["storage.distributor"] = distributor
    core.extensions[placement.EXTENSION] = placement.make_place_file(core)
    return [distributor]


@hookimpl
def kvmdesk_startup(core):
    async def prepare() -> None:
        paths = settings(core)
        for directory in (paths.base_image_dir, paths.iso_dir):
            directory.mkdir(parents=True, exist_ok=True)
            removed = sweep_temporaries(directory)
            if removed:
                log.info("removed {n} unfinished upload(s) from {dir}", n=removed, dir=str(directory))

    return prepare()


@hookimpl
def kvmdesk_usage(core: Any, kind: str, uuid: str):
    if kind != "resource_pool":
        return None

    async def images_in_pool() -> Optional[Resource]:
        count = await core.store.collection(distribution.BASE_IMAGES).count({"resource_pool_uuid": uuid})
        return Resource(f"还有 {count} 个基础镜像", f"{count} base images in it") if count else None

    return images_in_pool()


@hookimpl
def kvmdesk_node_status_changed(core: Any, node: Mapping[str, Any], old: Optional[str], new: str) -> None:
    # A node seen online (for the first time, or again) gets the pool's images and its failed transfers
    # are retried now rather than at the end of their backoff.
    if new != "online" or old == "online":
        return
    distributor = core.extensions.get("storage.distributor")
    if distributor is None or not distributor.running:
        return
    d = defer.ensureDeferred(distributor.node_online(node["uuid"]))
    d.addErrback(lambda f: log.failure("catching up node {node} failed", f, node=node.get("uuid")))
