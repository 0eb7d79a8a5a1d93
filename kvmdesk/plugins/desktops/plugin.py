"""Hook implementations of the ``desktops`` plugin."""
from __future__ import annotations

from typing import Any, Optional

from twisted.logger import Logger

from kvmdesk import hookimpl
from kvmdesk.core import group_names
from kvmdesk.plugins.desktops import schema, teaching_groups

__all__ = ["kvmdesk_routes", "kvmdesk_startup", "kvmdesk_store_indexes", "kvmdesk_usage"]

log = Logger(namespace="kvmdesk.desktops")


@hookimpl
def kvmdesk_store_indexes():
    return schema.INDEXES


@hookimpl
def kvmdesk_routes(router, core) -> None:
    teaching_groups.register_routes(router)


@hookimpl
def kvmdesk_startup(core: Any):
    return startup(core)


async def startup(core: Any) -> None:
    """Make the group-name claims match the teaching groups (repairs a crash between two steps)."""
    found = await core.store.collection(schema.TEACHING_GROUPS).find({}, projection=["uuid", "name"])
    conflicts = await group_names.reconcile(core.store, schema.TEACHING_KIND, {g["uuid"]: g["name"] for g in found})
    for name in conflicts:
        log.warn("teaching group {name!r} shares its name with another kind of group; rename one of them", name=name)


@hookimpl
def kvmdesk_usage(core: Any, kind: str, uuid: str) -> Optional[Any]:
    return teaching_groups.usage(core, kind, uuid)
