"""Creates and copies cut short: what they had made on the nodes goes.

A create or a copy records its intent (the new template's uuid and name, each node it works on and
the disk files it makes there) before its first step on a node, and drops it once the template's
record is stored, or once its steps are undone.  An intent is left behind when the controller stops
in the middle (its job is then marked interrupted) or when undoing failed (a node stopped answering):
the address is released, and what the work may have made on each node (the domain's definition, the
disk files) becomes a leftover (:mod:`.leftovers`), removed at once or when the node answers again.
The same is done at every start for the intents the previous run left.
"""
from __future__ import annotations

from typing import Any, Mapping

from twisted.logger import Logger

from kvmdesk.core.records import new_record
from kvmdesk.plugins.templates import leftovers, schema

log = Logger(namespace="kvmdesk.templates.intents")


def collection(core: Any) -> Any:
    return core.store.collection(schema.INTENTS)


async def begin(core: Any, kind: str, template: Mapping[str, Any], nodes: Mapping[str, list[dict]]) -> str:
    """Record that ``kind`` (create, copy) is about to make ``template`` on ``nodes`` (node uuid ->
    the disk files ``{file_id, role}`` it may make there; the domain is defined on the template's
    host).  Returns the intent's uuid."""
    row = await collection(core).insert_one(new_record(
        core.clock, kind=kind, template_uuid=template["uuid"], template_name=template["name"],
        host_uuid=template["host_uuid"], nodes=[{"node_uuid": node, "files": files} for node, files in nodes.items()]))
    return row["uuid"]


async def end(core: Any, uuid: str, *, undone: bool) -> None:
    """The work is over: its template stored, or its steps taken back (``undone`` says whether all of
    them were; if not, the rest is left to :func:`abandon`)."""
    if not undone:
        row = await collection(core).find_one({"uuid": uuid})
        if row is not None:
            await abandon(core, row)
    await collection(core).delete_one({"uuid": uuid})


async def abandon(core: Any, row: Mapping[str, Any]) -> None:
    """The template of ``row`` will not be: its address goes back, and each node's part becomes a leftover."""
    ipam = core.extensions.get("ipam")
    if ipam is not None:  # (the network plugin may be blocked at this start: its addresses then wait)
        await ipam.release_owner(f"template:{row['template_uuid']}")
    for part in row["nodes"]:
        domain = row["template_uuid"] if part["node_uuid"] == row["host_uuid"] else None
        await leftovers.record(core, row["template_uuid"], row["template_name"], part["node_uuid"], part["files"],
                               error=f"its {row['kind']} was cut short", cause=row["kind"], domain=domain)


async def recover(core: Any) -> int:
    """At start: the intents the previous run left.  Returns how many templates were abandoned."""
    abandoned = 0
    for row in await collection(core).find({}, sort=[("id", 1)]):
        made = await core.store.collection(schema.TEMPLATES).find_one({"uuid": row["template_uuid"]})
        if made is None:
            log.warn("the {kind} of template {name} was cut short by a controller stop: what it made on the "
                     "nodes is removed", kind=row["kind"], name=row["template_name"])
            await abandon(core, row)
            abandoned += 1
        await collection(core).delete_one({"uuid": row["uuid"]})
    return abandoned
