"""Hook implementations of the ``monitoring`` plugin."""
from __future__ import annotations

from typing import Any

from kvmdesk import hookimpl
from kvmdesk.plugins.monitoring import alarm_routes, alarms, dashboard, perf, prometheus, rollups
from kvmdesk.plugins.monitoring.monitor import DEFAULTS, EXTENSION, Monitor, Settings

__all__ = [
    "kvmdesk_config_defaults",
    "kvmdesk_configure",
    "kvmdesk_login_refused",
    "kvmdesk_node_metrics",
    "kvmdesk_node_removed",
    "kvmdesk_resource_counts",
    "kvmdesk_routes",
    "kvmdesk_services",
    "kvmdesk_startup",
    "kvmdesk_store_indexes",
]


@hookimpl
def kvmdesk_config_defaults():
    return DEFAULTS


@hookimpl
def kvmdesk_configure(core: Any) -> None:
    core.extensions[EXTENSION] = Monitor(core, Settings.from_config(core.config))


@hookimpl
def kvmdesk_store_indexes():
    return [*rollups.INDEXES, *alarms.INDEXES]


@hookimpl
def kvmdesk_routes(router, core) -> None:
    dashboard.register_routes(router)
    perf.register_routes(router)
    alarm_routes.register_routes(router)
    prometheus.register_routes(router)


@hookimpl
def kvmdesk_startup(core: Any):
    return core.extensions[EXTENSION].start()


@hookimpl
def kvmdesk_services(core: Any):
    return [core.extensions[EXTENSION].services()]


@hookimpl
def kvmdesk_node_metrics(core: Any, node: Any, sample: Any) -> None:
    core.extensions[EXTENSION].receive(node, sample)


@hookimpl
def kvmdesk_node_removed(core: Any, node: Any) -> None:
    core.extensions[EXTENSION].forget(node["uuid"])


@hookimpl
def kvmdesk_login_refused(core: Any, username: str, address: str, reason: str) -> None:
    core.extensions[EXTENSION].alarms.login_refused(core.clock.seconds(), username, address)


@hookimpl
def kvmdesk_resource_counts(core: Any):
    return dashboard.instance_counts(core)
