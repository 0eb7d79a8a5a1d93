"""Ending a twistd process that cannot do its job, with an exit status a service manager sees."""
from __future__ import annotations

import os
from typing import Any


def exit_after_shutdown(reactor: Any, status: int = 1) -> None:
    """Stop the reactor (services stop cleanly) and exit with ``status`` once it has shut down.

    twistd offers no way to set the exit status; a service manager must see that the start failed.
    """
    def stop() -> None:
        reactor.addSystemEventTrigger("after", "shutdown", os._exit, status)
        reactor.stop()

    reactor.callWhenRunning(stop)


def listen_failure_line(what: str, host: str, port: int, reason: Any) -> str:
    """The one line that says why a port could not be opened."""
    detail = getattr(reason, "socketError", None) or reason
    return f"{what} cannot listen on {host or '0.0.0.0'}:{port}: {detail}"
