"""Thread pools owned by services: stopping one without blocking the reactor."""
from __future__ import annotations

import threading
from typing import Any

from twisted.internet import defer
from twisted.python.threadpool import ThreadPool


def stop_pool(reactor: Any, pool: ThreadPool, name: str) -> defer.Deferred:
    """Stop ``pool`` from a thread of its own; fires on the reactor once its workers are joined.

    ``ThreadPool.stop`` joins the workers, which may be in the middle of a slow call: done on the
    reactor thread, it would block everything else until they finish.
    """
    done: defer.Deferred = defer.Deferred()

    def stop() -> None:
        try:
            pool.stop()
        finally:
            reactor.callFromThread(done.callback, None)

    threading.Thread(target=stop, name=name, daemon=True).start()
    return done
