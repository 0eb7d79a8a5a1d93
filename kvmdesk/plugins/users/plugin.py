"""Hook implementations of the ``users`` plugin."""
from __future__ import annotations

from typing import Any

from twisted.logger import Logger

from kvmdesk import hookimpl
from kvmdesk.core import group_names
from kvmdesk.core.logtext import escaped
from kvmdesk.plugins.users import exports, groups, imports, users
from kvmdesk.plugins.users.accounts import GROUP_KIND, GROUPS, INDEXES

__all__ = [
    "kvmdesk_config_defaults",
    "kvmdesk_configure",
    "kvmdesk_routes",
    "kvmdesk_services",
    "kvmdesk_startup",
    "kvmdesk_store_indexes",
]

log = Logger(namespace="kvmdesk.users")

DEFAULTS = {
    "users": {
        # Most users one request may create (multi_create) or touch (delete, enable, move, export).
        "max_batch": 10000,
        # Users listed inside each group of the group query; the full list is GET /personal/user/?group=.
        "group_users_limit": 1000,
        # Seconds an export's download link (and its file) lives.
        "export_ttl": 600,
        # Largest import upload (the whole multipart body), in bytes.
        "max_upload": 10 * 1024 * 1024,
        # Largest total unpacked size of the .xlsx package of an import, in bytes (zip bombs).
        "max_unpacked": 100 * 1024 * 1024,
        # Most user rows in one imported file.
        "max_import_rows": 10000,
        # Passwords of one import hashed at once; 0: one per core, leaving one core free.
        "hash_concurrency": 0,
        # Seconds the worker process that reads or writes an .xlsx may run before it is killed.
        "sheet_timeout": 120,
        # Address-space limit of that worker process, in bytes.
        "sheet_memory": 1024 * 1024 * 1024,
    }
}


@hookimpl
def kvmdesk_config_defaults():
    return DEFAULTS


@hookimpl
def kvmdesk_configure(core: Any) -> None:
    directory = core.data_dir / "exports"
    ttl = float(core.config.get("users.export_ttl", 600))
    core.extensions[exports.EXTENSION] = exports.Exports(directory, core.clock, ttl)


@hookimpl
def kvmdesk_store_indexes():
    return INDEXES


@hookimpl
def kvmdesk_routes(router, core) -> None:
    groups.register_routes(router)
    users.register_routes(router)
    exports.register_routes(router)
    imports.register_routes(router)


@hookimpl
def kvmdesk_startup(core: Any):
    return startup(core)


async def startup(core: Any) -> None:
    """Delete left-over export files; make the group-name claims match the user groups."""
    await exports.exports_of(core).purge(core)
    found = await core.store.collection(GROUPS).find({}, projection=["uuid", "name"])
    conflicts = await group_names.reconcile(core.store, GROUP_KIND, {g["uuid"]: g["name"] for g in found})
    for name in conflicts:
        log.warn("user group '{name}' shares its name with another kind of group; rename one of them", name=escaped(name))


@hookimpl
def kvmdesk_services(core: Any):
    ttl = float(core.config.get("users.export_ttl", 600))
    return [exports.ExportSweeper(core, interval=max(1.0, min(ttl / 2, 300.0)))]
