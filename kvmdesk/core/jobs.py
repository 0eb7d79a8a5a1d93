"""Batch operations: run one operation per item and report per-item results, as the contract asks.

With one item, a failure is the answer itself (its code and message); with several, the answer is
``{"success_num", "failed_num", "failures": [{"uuid", "name", "code", "msg"}]}``.  Items whose operation
succeeded with something to say (a mapping) are listed in ``results`` (``[{"uuid", "name", ...}]``).

:func:`run_batch` runs a batch in memory; :meth:`kvmdesk.core.jobqueue.JobService.run_items` runs the
same batch as a persisted job (progress and per-item results at ``/api/v1.0/jobs/{uuid}``) and answers
the same shape plus ``job_id``.  Both use :func:`apply_each` and :func:`batch_answer`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Awaitable, Callable, Mapping, Optional, Sequence

from twisted.internet import defer
from twisted.logger import Logger

from kvmdesk.core import errors
from kvmdesk.core.errors import ApiError

if TYPE_CHECKING:  # pragma: no cover
    from kvmdesk.core.routing import RequestLike

log = Logger(namespace="kvmdesk.jobs")

#: Called as each item finishes: ``(item, None, what the operation returned)`` on success,
#: ``(item, error, None)`` on failure.
ItemDone = Callable[[Any, Optional[ApiError], Any], None]
#: What :func:`apply_each` found: the failures and the results that say something (mappings), in item order.
Outcome = tuple[list[tuple[Any, ApiError]], list[tuple[Any, Mapping[str, Any]]]]


def identity(item: Any) -> dict[str, Any]:
    """``{"uuid", "name"}`` of a batch item (a mapping, or a bare uuid)."""
    if isinstance(item, Mapping):
        return {k: item[k] for k in ("uuid", "name") if k in item}
    return {"uuid": item}


async def apply_each(
    items: Sequence[Any],
    operation: Callable[[Any], Awaitable[Any]],
    *,
    request_id: str,
    concurrency: int = 1,
    on_done: Optional[ItemDone] = None,
    keep_going: Callable[[], bool] = lambda: True,
) -> Outcome:
    """Apply ``operation`` to every item (at most ``concurrency`` at once); return the failures and the
    results that say something (a non-empty mapping), in item order.

    An unexpected exception is logged and reported as an internal error carrying ``request_id``.

    :param on_done: told about each item as it finishes (progress).
    :param keep_going: asked before each item starts; once it answers ``False`` no further item starts
        (cancellation, shutdown); the items not started are neither done nor failed.
    """
    semaphore = defer.DeferredSemaphore(max(1, concurrency))
    outcome: dict[int, ApiError] = {}
    said: dict[int, Mapping[str, Any]] = {}

    async def one(index: int, item: Any) -> None:
        if not keep_going():
            return
        error: Optional[ApiError] = None
        result: Any = None
        try:
            result = await operation(item)
        except ApiError as exc:
            error = exc
        except Exception:
            log.failure("request {rid}: batch item {item!r} failed", rid=request_id, item=item)
            error = ApiError(errors.INTERNAL_ERROR, request_id=request_id)
        if error is not None:
            outcome[index] = error
        elif isinstance(result, Mapping) and result:
            said[index] = result
        if on_done is not None:
            on_done(item, error, result)

    await defer.gatherResults(
        [semaphore.run(lambda i=i, item=item: defer.ensureDeferred(one(i, item))) for i, item in enumerate(items)],
        consumeErrors=True,
    )
    return [(items[i], outcome[i]) for i in sorted(outcome)], [(items[i], said[i]) for i in sorted(said)]


def batch_answer(req: "RequestLike", items: Sequence[Any], failures: Sequence[tuple[Any, ApiError]],
                 results: Sequence[tuple[Any, Mapping[str, Any]]] = ()) -> dict[str, Any]:
    """The contract's answer to a batch; with one item, its failure is raised as the answer itself."""
    if len(items) == 1 and failures:
        raise failures[0][1]
    answer: dict[str, Any] = {
        "success_num": len(items) - len(failures),
        "failed_num": len(failures),
        "failures": [{**identity(item), "code": exc.error.code, "msg": exc.message(req.lang)} for item, exc in failures],
    }
    if results:
        answer["results"] = [{**identity(item), **said} for item, said in results]
    return answer


class BatchProgress:
    """The operation-log entry of a long operation: written when it begins, its ``progress`` kept as
    items are done (a hundred writes at most), so that an interrupted batch says how far it got.

    :param req: the request (its entry is completed by the router at the end).
    :param total: the number of items.
    """

    def __init__(self, req: "RequestLike", total: int):
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

    def wrap(self, operation: Callable[[Any], Awaitable[Any]]) -> Callable[[Any], Awaitable[Any]]:
        """``operation`` that advances this progress as each item ends (done or failed)."""

        async def tracked(item: Any) -> Any:
            try:
                return await operation(item)
            finally:
                await self.advance()

        return tracked


async def run_batch(
    req: "RequestLike",
    items: Sequence[Any],
    operation: Callable[[Any], Awaitable[Any]],
    *,
    concurrency: int = 1,
) -> dict[str, Any]:
    """Apply ``operation`` to every item (at most ``concurrency`` at once), in memory.

    :raises ApiError: no items, or the single item failed.
    """
    if not items:
        raise ApiError(errors.BATCH_EMPTY)
    tracker = BatchProgress(req, len(items))
    await tracker.begin()
    failures, results = await apply_each(items, tracker.wrap(operation), request_id=req.request_id,
                                         concurrency=concurrency)
    return batch_answer(req, items, failures, results)
