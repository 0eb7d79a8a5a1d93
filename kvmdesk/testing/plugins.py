"""A plugin manager with the plugins a test chooses, without touching the process environment.

Usage::

    from kvmdesk.testing.plugins import plugin_manager

    manager = plugin_manager(my_plugin)                       # every installed plugin + mine
    manager = plugin_manager((my_plugin, "tags"), only=["admin"])  # admin + mine, under the name "tags"
    manager = plugin_manager(blocked=["nodes"])               # every installed plugin but nodes

then ``make_core(tmp_path, plugins=manager)`` or ``api_client(tmp_path, plugins=manager)``.
:class:`LifecycleRecorder` is a plugin that records the lifecycle hooks, to check what a change announced.
"""
from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any, Iterable, Mapping, Optional

import attrs
import pluggy

from kvmdesk import hookimpl
from kvmdesk.core.plugins import ENTRY_POINT_GROUP, make_plugin_manager


def plugin_manager(
    *plugins: Any, only: Optional[Iterable[str]] = None, blocked: Iterable[str] = ()
) -> pluggy.PluginManager:
    """The production plugin manager with a chosen set of plugins.

    :param plugins: extra plugins (modules or objects) registered by hand, each alone (named by its
        ``__name__``) or as a ``(plugin, name)`` pair.
    :param only: the installed plugins (entry-point names) to load; ``None`` loads all of them.
    :param blocked: names not to load (installed or extra), as ``[plugins] blocked`` does.
    :raises KeyError: a name in ``only`` is not an installed plugin.
    """
    blocked = set(blocked)
    if only is None:
        manager = make_plugin_manager(blocked, load_entry_points=True)
    else:
        manager = make_plugin_manager(blocked, load_entry_points=False)
        installed = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
        for name in only:
            if name not in blocked:
                manager.register(installed[name].load(), name=name)
    for entry in plugins:
        plugin, name = entry if isinstance(entry, tuple) else (entry, None)
        manager.register(plugin, name=name or getattr(plugin, "__name__", None))
    manager.check_pending()
    return manager


@attrs.define
class LifecycleEvent:
    """One call of a lifecycle hook, as :class:`LifecycleRecorder` saw it."""

    hook: str  # "created", "updated" or "deleted"
    kind: str
    record: dict[str, Any]
    changes: Optional[dict[str, Any]] = None


class LifecycleRecorder:
    """A plugin that records every ``kvmdesk_created/updated/deleted`` call (register it, act, read ``events``)."""

    def __init__(self) -> None:
        self.events: list[LifecycleEvent] = []

    def of(self, kind: str, hook: Optional[str] = None) -> list[LifecycleEvent]:
        """The events of ``kind`` (and of ``hook``, if given), in order."""
        return [e for e in self.events if e.kind == kind and (hook is None or e.hook == hook)]

    @hookimpl
    def kvmdesk_created(self, core: Any, kind: str, record: Mapping[str, Any]) -> None:
        self.events.append(LifecycleEvent("created", kind, dict(record)))

    @hookimpl
    def kvmdesk_updated(self, core: Any, kind: str, record: Mapping[str, Any], changes: Mapping[str, Any]) -> None:
        self.events.append(LifecycleEvent("updated", kind, dict(record), dict(changes)))

    @hookimpl
    def kvmdesk_deleted(self, core: Any, kind: str, record: Mapping[str, Any]) -> None:
        self.events.append(LifecycleEvent("deleted", kind, dict(record)))
