"""Awaiting several operations at once."""
from __future__ import annotations

from typing import Any, Awaitable

from twisted.internet import defer


async def both(first: Awaitable[Any], second: Awaitable[Any]) -> tuple[Any, Any]:
    """Await two coroutines at once (two round trips in flight, one wait); the first error is raised
    as itself (not wrapped in ``FirstError``)."""
    try:
        a, b = await defer.gatherResults([defer.ensureDeferred(first), defer.ensureDeferred(second)],
                                         consumeErrors=True)
    except defer.FirstError as failure:
        failure.subFailure.raiseException()
    return a, b
