"""The controller's core: configuration, store, plugins, router and services, assembled in order.

The core lies below the HTTP layer (:mod:`kvmdesk.api`) and never imports it: the router is made by the
factory the caller passes (``make_router``), which the controller's assembly (:mod:`kvmdesk.tap`) and the
test kit (:mod:`kvmdesk.testing.api`) take from :func:`kvmdesk.api.app.make_router`.
"""
from __future__ import annotations

import gc
from pathlib import Path
from typing import Any, Optional

import attrs
import pluggy
from twisted.application.service import MultiService
from twisted.logger import Logger

from kvmdesk.core import auth, console, errors, oplog
from kvmdesk.core.config import Config
from kvmdesk.core.errors import ApiError, Resource
from kvmdesk.core.filemodes import restrict_tree
from kvmdesk.core.plugins import blocked_names, gather_hook, loaded_and_blocked, make_plugin_manager
from kvmdesk.core.records import SECRET_FIELDS, without
from kvmdesk.core.routing import MakeRouter, RouterLike
from kvmdesk.core.store import Store, open_store
from kvmdesk.core.threadpools import in_reactor_pool

log = Logger(namespace="kvmdesk.core")


@attrs.define(eq=False)
class Core:
    """Everything a plugin needs, handed to its hooks.

    :ivar reactor: the real reactor (threads, network).
    :ivar clock: the time source (the reactor, or an injected ``Clock`` in tests); use it, never ``time.time``.
    """

    config: Config
    store: Store
    plugins: pluggy.PluginManager
    reactor: Any
    data_dir: Path
    auth: auth.Authenticator
    oplog: oplog.OperationLog
    clock: Any = None
    services: MultiService = attrs.field(factory=MultiService)
    router: Optional[RouterLike] = None
    #: Free-form room for plugins to share objects (e.g. the node agents' client).
    extensions: dict[str, Any] = attrs.field(factory=dict)

    async def usage(self, kind: str, uuid: str) -> Optional[Resource | str]:
        """Ask every plugin whether ``kind``/``uuid`` is still in use; return the first reason."""
        reasons = await gather_hook(self.plugins.hook.kvmdesk_usage(core=self, kind=kind, uuid=uuid))
        return next((r for r in reasons if r), None)

    async def refuse_if_used(self, kind: str, uuid: str, resource: Resource | str) -> None:
        """Raise the 409 "in use, cannot be deleted" error if any plugin says ``kind``/``uuid`` is in use.

        :param resource: how the answer names it (e.g. ``POOL.named("lab-1")``).
        """
        reason = await self.usage(kind, uuid)
        if reason:
            raise ApiError(errors.IN_USE, resource=resource, reason=reason)

    # -- after a change: the lifecycle hooks -------------------------------------------------------

    async def created(self, kind: str, record: Any) -> None:
        """Tell every plugin that a ``kind`` record was created (``kvmdesk_created``).

        Call it after the change is stored; secrets are left out of what plugins see, and a plugin
        that fails is logged without undoing the change.
        """
        await self._announce(self.plugins.hook.kvmdesk_created, "created", kind, record=without(record, SECRET_FIELDS))

    async def updated(self, kind: str, record: Any, changes: Any) -> None:
        """Tell every plugin that a ``kind`` record changed (``kvmdesk_updated``); ``changes``: the fields set."""
        await self._announce(self.plugins.hook.kvmdesk_updated, "updated", kind, record=without(record, SECRET_FIELDS),
                             changes=without(changes, SECRET_FIELDS))

    async def deleted(self, kind: str, record: Any) -> None:
        """Tell every plugin that a ``kind`` record was deleted (``kvmdesk_deleted``), with the record as it was."""
        await self._announce(self.plugins.hook.kvmdesk_deleted, "deleted", kind, record=without(record, SECRET_FIELDS))

    async def _announce(self, hook: Any, what: str, kind: str, **kwargs: Any) -> None:
        if not hook.get_hookimpls():
            return  # nobody listens: bulk operations (10,000 users) pay nothing
        try:
            await gather_hook(hook(core=self, kind=kind, **kwargs))
        except Exception:
            # The change is done and answered; a listener's failure is its own to repair (kvmdesk_reconcile).
            log.failure("a plugin failed after {kind} {uuid} was {what}", kind=kind, what=what,
                        uuid=kwargs["record"].get("uuid"))


def store_uri(config: Config, data_dir: Path) -> str:
    uri = config.get("store.uri") or ""
    return uri or f"sqlite://{data_dir / 'kvmdesk.db'}"


def freeze_startup_heap() -> None:
    """Move everything built so far (modules, routes, plugins) out of the garbage collector's reach.

    It lives as long as the process; left in the collector's generations, every full collection walks
    it again (60-110 ms on a core with every plugin: pauses that stall the reactor).  Call it once the
    core is built, before serving.
    """
    gc.collect()
    gc.freeze()


async def reconcile(core: Core) -> None:
    """Run every plugin's ``kvmdesk_reconcile``; a failure is logged, start-up goes on."""
    try:
        await gather_hook(core.plugins.hook.kvmdesk_reconcile(core=core))
    except Exception:
        log.failure("a plugin's start-up reconcile failed")


async def build_core(
    config: Config,
    reactor: Any,
    plugins: Optional[pluggy.PluginManager] = None,
    clock: Any = None,
    *,
    make_router: MakeRouter,
) -> Core:
    """Open the store, load plugins, create indexes, seed data, register routes and services.

    :param plugins: a ready plugin manager (tests); by default entry points are loaded.
    :param clock: time source for records, tokens and watchers (default: the reactor).
    :param make_router: builds the API router once the plugins are loaded (they add their routes):
        :func:`kvmdesk.api.app.make_router` (:func:`kvmdesk.testing.api.make_core` passes it for tests).
    """
    clock = clock if clock is not None else reactor
    if plugins is None:
        plugins = make_plugin_manager(blocked_names(config.get("plugins.blocked", [])))
    # Plugins registered by hand after make_plugin_manager() (tests, embedders) are checked too.
    plugins.check_pending()
    loaded, blocked = loaded_and_blocked(plugins)
    log.info("plugins loaded: {loaded}; blocked: {blocked}", loaded=", ".join(loaded) or "none",
             blocked=", ".join(blocked) or "none")
    for defaults in plugins.hook.kvmdesk_config_defaults():
        config.add_defaults(defaults or {})
    data_dir = Path(config.get("controller.data_dir")).absolute()
    data_dir.mkdir(parents=True, exist_ok=True)
    # New files are private by the service's umask; this brings what an older version left.
    await in_reactor_pool(reactor, restrict_tree, data_dir)
    store = open_store(store_uri(config, data_dir), reactor=reactor, timeout=float(config.get("store.timeout", 10)),
                       inline_read_ms=float(config.get("store.inline_read_ms", 1.0)))
    try:
        await store.ping()
        core = Core(
            config=config,
            store=store,
            plugins=plugins,
            reactor=reactor,
            clock=clock,
            data_dir=data_dir,
            auth=auth.Authenticator(store, clock, config),
            oplog=oplog.OperationLog(store, clock),
        )
        core.auth.on_refused = lambda username, address, reason: plugins.hook.kvmdesk_login_refused(
            core=core, username=username, address=address, reason=reason)
        plugins.hook.kvmdesk_configure.call_historic(kwargs={"core": core})
        indexes = [*auth.INDEXES, *oplog.INDEXES, *console.INDEXES]
        for declared in plugins.hook.kvmdesk_store_indexes():
            indexes.extend(declared or [])
        await store.ensure_indexes(indexes)
        await core.oplog.interrupt_running()
        core.router = make_router(core)
        await gather_hook(plugins.hook.kvmdesk_startup(core=core))
        await reconcile(core)
        await core.auth.ensure_first_admin(data_dir, config.get("auth.first_admin_password") or None)
        for services in plugins.hook.kvmdesk_services(core=core):
            for service in services or []:
                service.setServiceParent(core.services)
    except BaseException:
        await store.close()
        raise
    return core
