"""The operation log: every state-changing request is recorded by the router, not by handlers.

Records follow the contract's shape (``user_name``, ``user_ip``, ``content``, ``result``, ``module``,
``created_at``...).  A handler may set ``req.oplog_detail`` to describe what it touched; otherwise
the names and uuids of the request are used.  Secrets in bodies never reach the log.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

from kvmdesk.core.records import new_record
from kvmdesk.core.store import Index, Store

if TYPE_CHECKING:  # pragma: no cover
    from kvmdesk.core.routing import EndpointLike, RequestLike

COLLECTION = "operation_logs"
INDEXES = [Index(COLLECTION, ["-created_at"])]
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
    """Writes one record per state-changing request."""

    def __init__(self, store: Store, clock: Any):
        self.collection = store.collection(COLLECTION)
        self.clock = clock

    async def record(self, req: "RequestLike", spec: "EndpointLike", code: int, msg: str) -> None:
        label = (req.action.oplog or req.action.summary) if req.action else (spec.oplog or spec.summary)
        detail = describe(req)
        admin = req.admin or {}
        await self.collection.insert_one(
            new_record(
                self.clock,
                user_id=admin.get("id"),
                user_name=admin.get("username") or getattr(req.body, "username", None),
                user_ip=req.client_ip,
                content=f"{label}: {detail}" if detail else label,
                result=msg,
                code=code,
                module=spec.tags[0] if spec.tags else "default",
            )
        )
