"""Version files left on nodes that could not be reached when their template was deleted.

Deleting a template removes its version files from every node of its pool; a node that does not
answer then keeps them.  What it keeps is recorded (collection :data:`schema.LEFTOVERS`, one row per
template and node) and removed when the node answers again: from the reconcile loop and when the
node comes back online.  Each removal is reported (logged; the reconciler lists it among its findings).
"""
from __future__ import annotations

from typing import Any, Mapping

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
            await collection(core).insert_one(new_record(
                core.clock, template_uuid=template["uuid"], template_name=template["name"], node_uuid=node["uuid"],
                files=[{"file_id": f["file_id"], "role": f["role"]} for f in left], error=left[0]["error"]))
            kept.append(node.get("ip") or node["uuid"])
    return kept


async def clean_node(core: Any, node: Mapping[str, Any]) -> list[dict]:
    """Remove what deleted templates left on ``node`` (a record with its agent secret); answers one
    finding ``{"kind": "leftover_removed", "template", "detail"}`` per template whose files went."""
    removed = []
    for row in await collection(core).find({"node_uuid": node["uuid"]}, sort=[("id", 1)]):
        left = await remove_files(core, node, row["files"], row["template_name"])
        if left:
            await collection(core).update_one({"uuid": row["uuid"]}, {"$set": {
                "files": [{"file_id": f["file_id"], "role": f["role"]} for f in left], "error": left[0]["error"]}})
            break  # the node stopped answering: the next round
        await collection(core).delete_one({"uuid": row["uuid"]})
        detail = (f"removed {len(row['files'])} version file(s) of deleted template {row['template_name']} "
                  f"left on the node since it was unreachable")
        log.info("node {node}: {detail}", node=node.get("ip"), detail=detail)
        removed.append({"kind": "leftover_removed", "template": row["template_uuid"], "detail": detail})
    return removed


async def forget_node(core: Any, node_uuid: str) -> int:
    """A node was removed: what it kept is no one's to clean any more."""
    return await collection(core).delete_many({"node_uuid": node_uuid})
