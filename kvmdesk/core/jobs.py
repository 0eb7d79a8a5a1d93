"""Batch operations: run one operation per item and report per-item results, as the contract asks.

With one item, a failure is the answer itself (its code and message); with several, the answer is
``{"success_num", "failed_num", "failures": [{"uuid", "name", "code", "msg"}]}``.  Items whose operation
succeeded with something to say (a mapping) are listed in ``results`` (``[{"uuid", "name", ...}]``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Awaitable, Callable, Mapping, Sequence

from twisted.internet import defer
from twisted.logger import Logger

from kvmdesk.core import errors
from kvmdesk.core.errors import ApiError

if TYPE_CHECKING:  # pragma: no cover
    from kvmdesk.core.routing import RequestLike

log = Logger(namespace="kvmdesk.jobs")


def _identity(item: Any) -> dict[str, Any]:
    if isinstance(item, Mapping):
        return {k: item[k] for k in ("uuid", "name") if k in item}
    return {"uuid": item}


class BatchProgress:
    """The operation-log entry of a long operation: written when it begins, its ``progress`` kept as
    items are done (a hundred writes at most), so that an interrupted batch says how far it got.

    :param req: the request (its entry is completed by the router at the end).
    :param total: the number of items.
    """

    def __init__(self, req: "ApiRequest", total: int):
        self.req = req
        self.total = total
        self.done = 0
        self.step = max(1, total // 100)
        self.oplog = getattr(getattr(req, "core", None), "oplog", None)

    async def begin(self) -> None:
        """Write the entry now (a single item is not a long operation: its entry is written at the end)."""
        if self.oplog is not None and self.total > 1:
            await self.oplog.begin(self.req, self.total)

    async def advance(self, count: int = 1) -> None:
        """``count`` more items are done."""
        before, self.done = self.done, self.done + count
        if self.oplog is not None and (self.done // self.step != before // self.step or self.done >= self.total):
            await self.oplog.progress(self.req, self.done, self.total)


async def run_batch(
    req: "RequestLike",
    items: Sequence[Any],
    operation: Callable[[Any], Awaitable[Any]],
    *,
    concurrency: int = 1,
) -> dict[str, Any]:
    """Apply ``operation`` to every item (at most ``concurrency`` at once).

    :raises ApiError: no items, or the single item failed.
    """
    if not items:
        raise ApiError(errors.BATCH_EMPTY)
    semaphore = defer.DeferredSemaphore(max(1, concurrency))
    failures: list[tuple[Any, ApiError]] = []
    results: list[dict[str, Any]] = []
    tracker = BatchProgress(req, len(items))
    await tracker.begin()

    async def one(item: Any) -> None:
        try:
            said = await operation(item)
            if isinstance(said, Mapping) and said:
                results.append({**_identity(item), **said})
        except ApiError as exc:
            failures.append((item, exc))
        except Exception:
            log.failure("request {rid}: batch item {item!r} failed", rid=req.request_id, item=item)
            failures.append((item, ApiError(errors.INTERNAL_ERROR, request_id=req.request_id)))
        await tracker.advance()

    await defer.gatherResults(
        [semaphore.run(lambda item=item: defer.ensureDeferred(one(item))) for item in items], consumeErrors=True
    )
    if len(items) == 1 and failures:
        raise failures[0][1]
    answer: dict[str, Any] = {
        "success_num": len(items) - len(failures),
        "failed_num": len(failures),
        "failures": [
            {**_identity(item), "code": exc.error.code, "msg": exc.message(req.lang)} for item, exc in failures
        ],
    }
    if results:
        answer["results"] = results
    return answer
