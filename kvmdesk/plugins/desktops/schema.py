"""Collections of the desktops plugin, their indexes, and the shared collections it reads."""
from __future__ import annotations

from kvmdesk.core import group_names
from kvmdesk.core.store import Index

TEACHING_GROUPS = "teaching_groups"
DESKTOP_GROUPS = "desktop_groups"
DESKTOPS = "desktops"
#: Thin clients, announced by themselves (:mod:`.terminals`); a teaching group counts those in its range.
TERMINALS = "terminals"

#: Owned by other plugins; read here (the same convention as the network plugin's schema).
NETWORKS = "data_networks"
SUBNETS = "subnets"
SWITCHES = "vswitchs"
NODES = "nodes"
POOLS = "resource_pools"
TEMPLATES = "templates"

#: The kind of a teaching group in the shared name registry (:mod:`kvmdesk.core.group_names`).
TEACHING_KIND = "teaching_group"
#: The kinds of ``kvmdesk_usage`` and of the lifecycle hooks for desktop groups and desktops.
DESKTOP_GROUP_KIND = "desktop_group"
DESKTOP_KIND = "desktop"
#: Never announced to other plugins (the VNC password of a desktop's console).
HIDDEN_FIELDS = ("vnc_password",)
#: The contract's ``group_type`` of a teaching group (2 is a user group).
TEACHING_TYPE = 1

INDEXES = [
    Index(TEACHING_GROUPS, ["uuid"], unique=True),
    Index(TEACHING_GROUPS, ["name"], unique=True),
    Index(TEACHING_GROUPS, ["subnet"]),
    Index(TEACHING_GROUPS, ["network"]),
    Index(DESKTOP_GROUPS, ["uuid"], unique=True),
    Index(DESKTOP_GROUPS, ["name"], unique=True),
    Index(DESKTOP_GROUPS, ["group"]),
    Index(DESKTOP_GROUPS, ["template"]),
    Index(DESKTOP_GROUPS, ["pool"]),
    Index(DESKTOP_GROUPS, ["subnet"]),
    Index(DESKTOPS, ["uuid"], unique=True),
    # Desktop names are the domains' names: unique across every group and node.
    Index(DESKTOPS, ["name"], unique=True),
    Index(DESKTOPS, ["desktop_uuid"]),
    Index(DESKTOPS, ["desktop_uuid", "status"]),
    Index(DESKTOPS, ["node"]),
    Index(TERMINALS, ["uuid"], unique=True),
    Index(TERMINALS, ["mac"], unique=True),
    Index(TERMINALS, ["ip_num"]),
    Index(TERMINALS, ["last_seen_at"]),
    *group_names.INDEXES,
]


def lesson_keys(group_uuid: str) -> tuple[str, str]:
    """The scheduler keys of a desktop group's timetable: its weekly starts and stops (:mod:`.timetables`)."""
    return f"desktops.lesson_start:{group_uuid}", f"desktops.lesson_stop:{group_uuid}"
