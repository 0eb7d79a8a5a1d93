"""The plugin manager: built-in and third-party plugins are found the same way.

Every plugin, built-in or not, is an entry point of the ``kvmdesk.plugins`` group (built-ins are
declared in kvmdesk's own ``setup.cfg``).  A plugin is blocked by its entry-point name through the
configuration (``[plugins] blocked``) or ``KVMDESK_BLOCKED_PLUGINS``.
"""
from __future__ import annotations

import os
from importlib.metadata import entry_points
from typing import Any, Awaitable, Iterable

import pluggy
from twisted.internet import defer

from kvmdesk import PROJECT_NAME
from kvmdesk.core import hookspecs
from kvmdesk.core.errors import CodeClash

ENTRY_POINT_GROUP = "kvmdesk.plugins"


class PluginConflict(RuntimeError):
    """Two plugins cannot be loaded together; the message names both (a start-up error)."""


def blocked_names(configured: Iterable[str] = ()) -> set[str]:
    """Plugin names blocked by the configuration plus ``KVMDESK_BLOCKED_PLUGINS``."""
    names = {name.strip() for name in configured if name.strip()}
    names |= {name.strip() for name in os.environ.get("KVMDESK_BLOCKED_PLUGINS", "").split(",") if name.strip()}
    return names


def make_plugin_manager(blocked: Iterable[str] = (), *, load_entry_points: bool = True) -> pluggy.PluginManager:
    """Create the manager, block plugins by name, load entry points and check every implementation.

    :param blocked: names not to load.
    :param load_entry_points: tests that register plugins by hand pass ``False``.
    :raises pluggy.PluginValidationError: a plugin implements a hook that does not exist.
    :raises PluginConflict: two plugins define the same error code.
    """
    manager = pluggy.PluginManager(PROJECT_NAME)
    manager.add_hookspecs(hookspecs)
    for name in blocked:
        manager.set_blocked(name)
    if load_entry_points:
        try:
            manager.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        except CodeClash as clash:
            raise PluginConflict(clash_message(clash, manager)) from clash
    manager.check_pending()
    return manager


def plugin_of_module(module: str, manager: pluggy.PluginManager | None = None) -> str:
    """The name of the plugin a module belongs to (its entry point, or its registered name).

    A module outside every plugin is named as it is (e.g. ``kvmdesk.core.errors``).
    """
    owners = {ep.module: ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)}
    if manager is not None:
        owners.update({getattr(plugin, "__name__", ""): name for name, plugin in manager.list_name_plugin() if plugin})
    # The longest matching package wins (a plugin nested in another's package is its own).
    for package in sorted(owners, key=len, reverse=True):
        if package and (module == package or module.startswith(package + ".")):
            return owners[package]
    return module


def clash_message(clash: CodeClash, manager: pluggy.PluginManager | None = None) -> str:
    """One line naming both plugins that define the same error code."""
    first, second = plugin_of_module(clash.first, manager), plugin_of_module(clash.second, manager)
    return (f"plugins {first!r} ({clash.first}) and {second!r} ({clash.second}) both define error code "
            f"{clash.code}; each plugin must use its own range of codes (see docs/plugins.md)")


def loaded_and_blocked(manager: pluggy.PluginManager) -> tuple[list[str], list[str]]:
    """The names of the plugins registered and of those blocked, sorted (for the start-up log)."""
    pairs = manager.list_name_plugin()
    return sorted(name for name, plugin in pairs if plugin is not None), sorted(n for n, p in pairs if p is None)


def gather_hook(results: Iterable[Any]) -> defer.Deferred:
    """Wait for every (possibly asynchronous) result of a non-firstresult hook.

    Coroutines and Deferreds are awaited together; the first failure is re-raised once all finish.
    """
    deferreds = [defer.ensureDeferred(r) if _is_coroutine(r) else defer.maybeDeferred(lambda r=r: r) for r in results]

    def collect(outcomes: list[tuple[bool, Any]]) -> Any:
        for succeeded, value in outcomes:
            if not succeeded:
                return value  # the first Failure, now that every result is in
        return [value for _, value in outcomes]

    # Not gatherResults: it fires at the first failure, while other hooks may still be running
    # (build_core would then close the store under a start-up hook still writing to it).
    return defer.DeferredList(deferreds, consumeErrors=True).addCallback(collect)


def _is_coroutine(value: Any) -> bool:
    return isinstance(value, Awaitable) and not isinstance(value, defer.Deferred)
