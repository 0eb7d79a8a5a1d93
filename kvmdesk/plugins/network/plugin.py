"""Hook implementations of the ``network`` plugin."""
from __future__ import annotations

from kvmdesk import hookimpl
from kvmdesk.plugins.network import dataplane, ipam, manage, networks, nics, node_routes, schema, switches, sync

__all__ = ["kvmdesk_config_defaults", "kvmdesk_configure", "kvmdesk_node_removed", "kvmdesk_node_removing", "kvmdesk_node_status_changed", "kvmdesk_routes",
           "kvmdesk_services", "kvmdesk_startup", "kvmdesk_store_indexes"]


@hookimpl
def kvmdesk_config_defaults():
    # [network] sync_interval: seconds between sweeps that bring out-of-step nodes in step (sync.py)
    return sync.DEFAULTS


@hookimpl
def kvmdesk_configure(core) -> None:
    core.extensions[ipam.EXTENSION] = ipam.IPAM(core)
    core.extensions[nics.EXTENSION] = nics.NodeNetworks(core)
    interval = float(core.config.get("network.sync_interval", 30.0))
    core.extensions[sync.EXTENSION] = sync.NodeSync(core, interval=interval)
    core.extensions["default_switch"] = switches.default_switch_view


@hookimpl
def kvmdesk_store_indexes():
    return schema.INDEXES


@hookimpl
def kvmdesk_routes(router, core) -> None:
    switches.register_routes(router)
    networks.register_routes(router)
    node_routes.register_routes(router)
    manage.register_routes(router)


@hookimpl
def kvmdesk_startup(core):
    return switches.ensure_default_switch(core)


@hookimpl
def kvmdesk_services(core):
    return [core.extensions[sync.EXTENSION]]


@hookimpl
def kvmdesk_node_removing(core, node):
    # the node's bridges (and their ports) go while its agent still answers the controller
    return dataplane.remove_node_bridges(core, node)


@hookimpl
def kvmdesk_node_removed(core, node):
    return core.extensions[nics.EXTENSION].forget_node(node["uuid"])


@hookimpl
def kvmdesk_node_status_changed(core, node, old, new) -> None:
    core.extensions[sync.EXTENSION].node_changed(node, old, new)
