"""The node loads admission control reads: node records this plugin has seen, with the watchers'
latest sample of each (``core.extensions["nodes"].latest``, refreshed every heartbeat)."""
from __future__ import annotations

from typing import Any, Mapping

from kvmdesk.plugins.desktops.admission import NodeLoad, load_from


class NodeLoads:
    """``load_of(node_uuid)`` for :class:`~kvmdesk.plugins.desktops.admission.StartAdmission`."""

    def __init__(self, core: Any):
        self.core = core
        self.records: dict[str, Mapping[str, Any]] = {}

    def remember(self, node: Mapping[str, Any]) -> None:
        """Keep the record (its facts: CPU count) of a node desktops are about to start on."""
        self.records[node["uuid"]] = node

    def __call__(self, node_uuid: str) -> NodeLoad:
        nodes = self.core.extensions.get("nodes")
        latest = getattr(nodes, "latest", {}).get(node_uuid) if nodes is not None else None
        return load_from(dict(self.records.get(node_uuid) or {}), latest, self.core.clock.seconds())
