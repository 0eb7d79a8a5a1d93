"""What templates left on nodes that could not be reached when it should have gone.

Deleting a template removes its version files from every node of its pool; a node that does not
answer then keeps them.  A create or copy cut short leaves its disk files and domain definition
(:mod:`.intents`).  What a node keeps is recorded (collection :data:`schema.LEFTOVERS`, one row per
template and node) and removed when the node answers again: from the reconcile loop and when the
node comes back online.  Each removal is reported (logged; the reconciler lists it among its findings).
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

from twisted.logger import Logger

from kvmdesk.core.errors import ApiError
from kvmdesk.core.records import new_record
from kvmdesk.plugins.templates import nodes, schema

log = Logger(namespace="kvmdesk.templates.leftovers")


def collection(core: Any) -> Any:
    return core.store.collection(schema.LEFTOVERS)


async def remove_files(core: Any, node: Mapping[str, Any], files: list[dict], template_name: str) -> list[dict]:
    """Remove ``files`` (``{file_id, role}``) from ``node``; answers those it could not remove (from the
    first failure on: a node that stops answering is not asked again for each file)."""
    for position, f in enumerate(files):
        try:
            await nodes.call(core, node, "DELETE", f"/disks/template/{f['file_id']}", params={"role": f["role"]},
                             template_name=template_name)
        except ApiError as exc:
            log.warn("could not remove versions of template {t} from node {node}: {why}", t=template_name,
                     node=node.get("ip"), why=exc.message("en"))
            return [{**r, "error": exc.message("en")} for r in files[position:]]
    return []


async def record(core: Any, template_uuid: str, template_name: str, node_uuid: str, files: list[dict], *,
                 error: str, cause: str = "delete", domain: Optional[str] = None) -> None:
    """Remember that ``node_uuid`` keeps ``files`` (``{file_id, role}``) and, if named, ``domain``;
    ``cause``: the template's ``delete``, or its ``create`` or ``copy`` cut short."""
    await collection(core).insert_one(new_record(
        core.clock, template_uuid=template_uuid, template_name=template_name, node_uuid=node_uuid,
        files=[{"file_id": f["file_id"], "role": f["role"]} for f in files], domain=domain, cause=cause,
        error=error))


async def remove_versions(core: Any, template: Mapping[str, Any]) -> list[str]:
    """Remove every version file of a template from every node of its pool; what a node could not
    remove is recorded for later.  Answers the addresses of the nodes that kept files."""
    files = [{"file_id": f["file_id"], "role": f["role"]} for v in template.get("versions") or [] for f in v["files"]]
    if not files:
        return []
    kept = []
    for node in await core.store.collection(schema.NODES).find({"resource_pool_uuid": template["pool_uuid"]},
                                                                sort=[("id", 1)]):
        if not node.get("agent_secret"):
            continue
        left = await remove_files(core, node, files, template["name"])
        if left:
            await record(core, template["uuid"], template["name"], node["uuid"], left, error=left[0]["error"])
            kept.append(node.get("ip") or node["uuid"])
    return kept


async def clean_node(core: Any, node: Mapping[str, Any]) -> list[dict]:
    """Remove what templates left on ``node`` (a record with its agent secret); answers one finding
    ``{"kind": "leftover_removed", "template", "detail"}`` per template whose leftovers went."""
    removed = []
    for row in await collection(core).find({"node_uuid": node["uuid"]}, sort=[("id", 1)]):
        if row.get("domain"):
            try:
                await nodes.call(core, node, "DELETE", f"/domains/{row['domain']}/definition",
                                 template_name=row["template_name"], missing_ok=True)
            except ApiError as exc:
                log.warn("could not remove the domain of template {t} from node {node}: {why}",
                         t=row["template_name"], node=node.get("ip"), why=exc.message("en"))
                break  # the node stopped answering: the next round
            await collection(core).update_one({"uuid": row["uuid"]}, {"$set": {"domain": None}})
        left = await remove_files(core, node, row["files"], row["template_name"])
        if left:
            await collection(core).update_one({"uuid": row["uuid"]}, {"$set": {
                "files": [{"file_id": f["file_id"], "role": f["role"]} for f in left], "error": left[0]["error"]}})
            break  # the node stopped answering: the next round
        await collection(core).delete_one({"uuid": row["uuid"]})
        if row.get("cause", "delete") == "delete":
            detail = (f"removed {len(row['files'])} version file(s) of deleted template {row['template_name']} "
                      f"left on the node since it was unreachable")
        else:
            domain = "its domain and " if row.get("domain") else ""
            detail = (f"removed what the {row['cause']} of template {row['template_name']}, cut short, made on "
                      f"the node: {domain}{len(row['files'])} disk file(s)")
        log.info("node {node}: {detail}", node=node.get("ip"), detail=detail)
        removed.append({"kind": "leftover_removed", "template": row["template_uuid"], "detail": detail})
    return removed


async def forget_node(core: Any, node_uuid: str) -> int:
    """A node was removed: what it kept is no one's to clean any more."""
    return await collection(core).delete_many({"node_uuid": node_uuid})
