"""Terminals: the classroom's thin clients, counted per teaching group (#82's ``terminal_count``) and on
the dashboard (#2's ``sum_terminal_cnt``, ``online_terminal_cnt``).

The contract lists terminal counts but no terminal endpoint: a terminal here is a record a thin client
(or whatever manages them) writes by announcing itself, ``POST /education/terminal`` with its MAC, its
address and a name, again every so often; the MAC identifies it.  A teaching group's terminals are those
whose address lies in the group's preset terminal range (``start_ip``-``end_ip``), counted when asked, so
editing a range or deleting a group never leaves a count behind.  A terminal is online while its last
announcement is younger than ``[desktops] terminal_online_seconds``.  Listing and deleting (batch) are
for administrators; every endpoint needs a token like the rest of the API.
"""
from __future__ import annotations

import ipaddress
from typing import Any, Mapping

from twisted.internet import defer

from kvmdesk.api.router import ApiRequest, Router
from kvmdesk.core.errors import ApiError, Resource
from kvmdesk.core import errors
from kvmdesk.core.jobs import run_batch
from kvmdesk.core.paging import paged_search
from kvmdesk.core.records import new_record, now_text
from kvmdesk.core.store import DuplicateKeyError
from kvmdesk.plugins.desktops import schema
from kvmdesk.plugins.desktops.models import TerminalAnnounce, TerminalsDelete

BASE = "/education/terminal"
TAGS = ("terminals",)
TERMINAL = Resource("终端", "terminal")
SEARCH_FIELDS = {"uuid": str, "name": str, "mac": str, "ip": str}
ONLINE_SECONDS = "desktops.terminal_online_seconds"


def ip_number(ip: str) -> int:
    return int(ipaddress.IPv4Address(ip))


def in_range(group: Mapping[str, Any]) -> dict:
    """The store filter of the terminals in a teaching group's terminal range."""
    return {"ip_num": {"$gte": ip_number(group["start_ip"]), "$lte": ip_number(group["end_ip"])}}


def online_since(core: Any) -> float:
    return core.clock.seconds() - float(core.config.get(ONLINE_SECONDS, 180.0))


async def count_in_groups(core: Any, groups: list[Mapping[str, Any]]) -> dict[str, int]:
    """``{teaching group uuid: terminals in its range}`` (one count per group: a page of groups)."""
    terminals = core.store.collection(schema.TERMINALS)
    counts = await defer.gatherResults([defer.ensureDeferred(terminals.count(in_range(g))) for g in groups])
    return {g["uuid"]: n for g, n in zip(groups, counts)}


async def resource_counts(core: Any) -> dict[str, int]:
    """The dashboard's terminal counts (``kvmdesk_resource_counts``)."""
    terminals = core.store.collection(schema.TERMINALS)
    return {"sum_terminal_cnt": await terminals.count({}),
            "online_terminal_cnt": await terminals.count({"last_seen_at": {"$gte": online_since(core)}})}


async def with_groups(core: Any, terminals: list[dict]) -> list[dict]:
    """Add ``online`` and the teaching group whose terminal range holds each terminal (first by id)."""
    groups = await core.store.collection(schema.TEACHING_GROUPS).find(
        {}, projection=["uuid", "name", "start_ip", "end_ip"], sort=[("id", 1)])
    ranges = [(ip_number(g["start_ip"]), ip_number(g["end_ip"]), g) for g in groups]
    since = online_since(core)
    shown = []
    for terminal in terminals:
        group = next((g for start, end, g in ranges if start <= terminal["ip_num"] <= end), None)
        shown.append({**{k: v for k, v in terminal.items() if k != "ip_num"},
                      "online": terminal.get("last_seen_at", 0) >= since,
                      "group_uuid": group["uuid"] if group else None, "group_name": group["name"] if group else None})
    return shown


async def announce(req: ApiRequest) -> dict:
    """Create the terminal of this MAC or refresh it (address, name, last seen)."""
    body: TerminalAnnounce = req.body
    core = req.core
    terminals = core.store.collection(schema.TERMINALS)
    changes = {"ip": body.ip, "ip_num": ip_number(body.ip), "last_seen_at": core.clock.seconds(),
               "last_seen": now_text(core.clock), "updated_at": now_text(core.clock)}
    if body.name:
        changes["name"] = body.name
    req.oplog_detail = f"{body.name or body.mac} {body.ip}"
    updated = await terminals.find_one_and_update({"mac": body.mac}, {"$set": changes})
    if updated is None:
        try:
            updated = await terminals.insert_one(new_record(core.clock, mac=body.mac, **{"name": body.mac, **changes}))
        except DuplicateKeyError:  # announced twice at once: the other request made it
            updated = await terminals.find_one_and_update({"mac": body.mac}, {"$set": changes})
    return (await with_groups(core, [updated]))[0]


async def delete(req: ApiRequest) -> dict:
    terminals = req.core.store.collection(schema.TERMINALS)

    async def delete_one(ref: dict) -> None:
        if not await terminals.delete_one({"uuid": ref["uuid"]}):
            raise ApiError(errors.NOT_FOUND, resource=TERMINAL, key=ref["uuid"])

    refs = list({t.uuid: {"uuid": t.uuid, "name": t.name} for t in req.body.terminals}.values())
    req.oplog_detail = ", ".join(r["name"] or r["uuid"] for r in refs[:10])
    return await run_batch(req, refs, delete_one)


def register_routes(router: Router) -> None:
    router.endpoint("POST", BASE, summary="A terminal (thin client) announces itself: MAC, address, name (beyond the contract)",
                    body=TerminalAnnounce, tags=TAGS, oplog="终端上报")(announce)
    router.endpoint("DELETE", BASE, summary="Delete terminals (batch)", body=TerminalsDelete, tags=TAGS,
                    oplog="删除终端")(delete)

    @router.endpoint("GET", BASE, summary="Query terminals, paged, with their teaching group and whether online",
                     tags=TAGS, search_fields=SEARCH_FIELDS)
    async def list_terminals(req: ApiRequest) -> Any:
        return await paged_search(req, req.core.store.collection(schema.TERMINALS), SEARCH_FIELDS,
                                  sort=[("id", 1)], decorate=lambda found: with_groups(req.core, found),
                                  resource=TERMINAL)
