"""What the templates' query (#78) and per-node image state (#77) count of desktops: the
``core.extensions["templates.usage_counts"]`` the templates plugin asks for."""
from __future__ import annotations

from typing import Any, Iterable

from kvmdesk.plugins.desktops import schema
from kvmdesk.plugins.desktops.personal_schema import PERSONAL_GROUPS

#: The extension's name (the templates plugin's ``views.COUNTS``; plugins meet through it, not imports).
EXTENSION = "templates.usage_counts"


async def usage_counts(core: Any, template_uuids: Iterable[str]) -> dict[str, dict]:
    """Per template: ``desktop_count`` (teaching and personal desktop groups on it), ``instance_count``
    (their desktops) and ``nodes`` (the uuids of the nodes those desktops are on)."""
    wanted = sorted(set(template_uuids))
    counts = {uuid: {"desktop_count": 0, "instance_count": 0, "nodes": []} for uuid in wanted}
    template_of: dict[str, str] = {}
    for collection in (schema.DESKTOP_GROUPS, PERSONAL_GROUPS):
        for group in await core.store.collection(collection).find({"template": {"$in": wanted}},
                                                                  projection=["uuid", "template"]):
            template_of[group["uuid"]] = group["template"]
            counts[group["template"]]["desktop_count"] += 1
    if template_of:
        for desktop in await core.store.collection(schema.DESKTOPS).find(
                {"desktop_uuid": {"$in": sorted(template_of)}}, projection=["desktop_uuid", "node"]):
            count = counts[template_of[desktop["desktop_uuid"]]]
            count["instance_count"] += 1
            if desktop.get("node") and desktop["node"] not in count["nodes"]:
                count["nodes"].append(desktop["node"])
    return counts
