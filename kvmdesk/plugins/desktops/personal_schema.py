"""Collections of personal desktops and of the desktop users' portal, and their indexes.

Personal desktops are kept with the teaching desktops (``desktops``, ``desktop_uuid`` naming their
group): the creation, power, events and reconcile modules work on them unchanged.  What is personal:

- ``holder``/``holder_session``/``held_at``: the desktop user a random desktop is held for (``None``
  when free), and the portal session that holds it (released on that session's logout or idle end);
- ``user_uuid``/``user_name``: the user a static desktop is bound to.
"""
from __future__ import annotations

from kvmdesk.core.store import Index
from kvmdesk.plugins.desktops.schema import DESKTOPS

PERSONAL_GROUPS = "personal_groups"
RANDOM_BINDINGS = "random_bindings"
#: Sessions of desktop users (their tokens live apart from the administrators' ``tokens``).
USER_SESSIONS = "desktop_user_sessions"
#: Owned by the users plugin; read here.
USERS = "users"
USER_GROUPS = "user_groups"

RANDOM, STATIC = 1, 2

INDEXES = [
    Index(PERSONAL_GROUPS, ["uuid"], unique=True),
    Index(PERSONAL_GROUPS, ["name"], unique=True),
    Index(PERSONAL_GROUPS, ["template"]),
    Index(PERSONAL_GROUPS, ["subnet"]),
    Index(RANDOM_BINDINGS, ["desktop", "group_uuid"], unique=True),
    Index(RANDOM_BINDINGS, ["group_uuid"]),
    Index(USER_SESSIONS, ["token_hash"], unique=True),
    Index(USER_SESSIONS, ["seen_at"]),
    Index(USER_SESSIONS, ["user_uuid"]),
    Index(DESKTOPS, ["desktop_uuid", "holder"]),
    Index(DESKTOPS, ["holder"]),
    Index(DESKTOPS, ["holder_session"]),
    Index(DESKTOPS, ["user_uuid"]),
]
