"""Thread pools: blocking calls on the reactor's pool, and stopping a service's own pool without blocking
the reactor."""
from __future__ import annotations

import threading
from typing import Any

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool


def in_reactor_pool(reactor: Any, fn: Any, *args: Any, **kwargs: Any) -> defer.Deferred:
    """Run ``fn(*args, **kwargs)`` on ``reactor``'s thread pool (file I/O, hashing); fires on the reactor
    thread."""
    return deferToThreadPool(reactor, reactor.getThreadPool(), fn, *args, **kwargs)


def in_own_thread(reactor: Any, fn: Any, *args: Any, name: str = "kvmdesk-worker") -> defer.Deferred:
    """Run ``fn(*args)`` on a new daemon thread (a call that lasts as long as a transfer, which would hold
    one of the reactor pool's few threads that long); fires on the reactor thread."""
    done: defer.Deferred = defer.Deferred()

    def run() -> None:
        try:
            result = fn(*args)
        except BaseException:
            failure = Failure()
            reactor.callFromThread(done.errback, failure)
        else:
            reactor.callFromThread(done.callback, result)

    threading.Thread(target=run, name=name, daemon=True).start()
    return done


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
