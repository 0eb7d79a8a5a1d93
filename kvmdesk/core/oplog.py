"""The operation log: every state-changing request is recorded by the router, not by handlers.

Records follow the contract's shape (``user_name``, ``user_ip``, ``content``, ``result``, ``module``,
``created_at``...).  A handler may set ``req.oplog_detail`` to describe what it touched; otherwise
the names and uuids of the request are used.  Secrets in bodies never reach the log.

A long operation (a batch) writes its entry when it begins (:meth:`OperationLog.begin`, ``state``
``running``), records its ``progress`` (``{"done", "total"}``) as it goes, and the router completes
the entry at the end (``state`` ``done``).  An entry still ``running`` when the controller starts
again was cut off (killed, crashed): :meth:`OperationLog.interrupt_running` marks it ``interrupted``
with what was done.
"""
from __future__ import annotations

import socket
from typing import TYPE_CHECKING, Any, Iterable, Optional

from twisted.logger import Logger

from kvmdesk.core.errors import OPERATION_INTERRUPTED
from kvmdesk.core.logtext import escaped
from kvmdesk.core.records import new_record, now_text
from kvmdesk.core.store import Index, Store

if TYPE_CHECKING:  # pragma: no cover
    from kvmdesk.core.routing import EndpointLike, RequestLike

COLLECTION = "operation_logs"
INDEXES = [Index(COLLECTION, ["-created_at"]), Index(COLLECTION, ["state"])]
#: ``state`` of an entry.
RUNNING, DONE, INTERRUPTED = "running", "done", "interrupted"

log = Logger(namespace="kvmdesk.oplog")
_IDENTIFYING = ("name", "username", "user_name", "uuid", "uuids")
_SECRET_HINTS = ("password", "passwd", "pwd", "secret", "token")


def _describe_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(_describe_value(v) for v in value[:10]) + (" ..." if len(value) > 10 else "")
    if isinstance(value, dict):
        return _describe_value(value.get("name") or value.get("uuid") or "")
    return str(value)


def _identifiers(source: Any) -> Iterable[str]:
    if hasattr(source, "model_dump"):
        source = source.model_dump()
    if not isinstance(source, dict):
        return []
    found = []
    for key, value in source.items():
        if any(hint in key.lower() for hint in _SECRET_HINTS):
            continue
        if key in _IDENTIFYING and value not in (None, "", []):
            found.append(_describe_value(value))
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            found.append(_describe_value(value))
    return found


def describe(req: "RequestLike") -> str:
    """A short, secret-free description of what the request touched."""
    if req.oplog_detail:
        return req.oplog_detail
    parts = [*_identifiers(req.body), *(v for v in req.path.values())]
    return ", ".join(p for p in parts if p)


class OperationLog:
    """Writes one record per state-changing request.

    :param host: names this controller in the entries it begins, so that at start-up it marks only
        its own cut-off entries (other controllers sharing a MongoDB store may still be running theirs).
    """

    def __init__(self, store: Store, clock: Any, host: Optional[str] = None):
        self.collection = store.collection(COLLECTION)
        self.clock = clock
        self.host = host or socket.gethostname()

    def _fields(self, req: "RequestLike", spec: "EndpointLike") -> dict[str, Any]:
        label = (req.action.oplog or req.action.summary) if req.action else (spec.oplog or spec.summary)
        detail = describe(req)
        admin = req.admin or {}
        return {
            "user_id": admin.get("id"),
            "user_name": admin.get("username") or getattr(req.body, "username", None),
            "user_ip": req.client_ip,
            "content": f"{label}: {detail}" if detail else label,
            "module": spec.tags[0] if spec.tags else "default",
        }

    async def begin(self, req: "ApiRequest", total: Optional[int] = None) -> None:
        """Write the entry of ``req`` now, ``running``, before a long operation starts its work.

        Does nothing for requests that are not recorded (reads, unauthenticated) or already begun.
        """
        spec = req.endpoint
        if req.oplog_uuid is not None or spec is None or not spec.records_operation or (spec.auth and req.admin is None):
            return
        created = await self.collection.insert_one(new_record(
            self.clock, **self._fields(req, spec), result=None, code=None, state=RUNNING, host=self.host,
            progress={"done": 0, "total": total}))
        req.oplog_uuid = created["uuid"]

    async def progress(self, req: "ApiRequest", done: int, total: Optional[int]) -> None:
        """Record how much of a begun operation is done (what an interruption will report)."""
        if req.oplog_uuid is not None:
            await self.collection.update_one({"uuid": req.oplog_uuid},
                                             {"$set": {"progress": {"done": done, "total": total}}})

    async def record(self, req: "ApiRequest", spec: "Endpoint", code: int, msg: str) -> None:
        """The request's outcome: completes a begun entry, or writes the entry."""
        fields = {**self._fields(req, spec), "result": msg, "code": code, "state": DONE}
        if req.oplog_uuid is not None:
            await self.collection.update_one({"uuid": req.oplog_uuid},
                                             {"$set": {**fields, "updated_at": now_text(self.clock)}})
        else:
            await self.collection.insert_one(new_record(self.clock, **fields))

    async def interrupt_running(self) -> int:
        """At start-up: mark this controller's entries left ``running`` as ``interrupted``; returns how many."""
        cut_off = await self.collection.find({"state": RUNNING, "host": self.host})
        for entry in cut_off:
            progress = entry.get("progress") or {}
            params = {"done": progress.get("done", 0), "total": progress.get("total") or "?"}
            await self.collection.update_one(
                {"uuid": entry["uuid"], "state": RUNNING},
                {"$set": {"state": INTERRUPTED, "code": OPERATION_INTERRUPTED.code,
                          "result": OPERATION_INTERRUPTED.message("zh", params), "updated_at": now_text(self.clock)}})
            log.warn("operation '{content}' by {user} was interrupted by the last stop after {done}/{total}",
                     content=escaped(entry.get("content") or ""), user=escaped(entry.get("user_name") or "-"),
                     **params)
        return len(cut_off)
