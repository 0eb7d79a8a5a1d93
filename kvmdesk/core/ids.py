"""Ids derived from names, the same on every call: parts of a node (NICs, addresses, storage paths,
services) that the agent reports by name but the API shows with a uuid.

Only the controller computes them (the agent knows names, never these uuids), from the node's uuid and
the part's name, so every plugin that shows the same part (nodes, network) gives it the same id.
"""
from __future__ import annotations

import uuid as uuidlib

_NAMESPACE = uuidlib.UUID("5b0c3a8e-1d7f-4a59-9a55-6b1c2f9a0d11")


def stable_uuid(node_uuid: str, *names: str) -> str:
    """A uuid that stays the same for the same node and name (NIC, IP, path, service)."""
    return str(uuidlib.uuid5(_NAMESPACE, "/".join((node_uuid, *names))))
