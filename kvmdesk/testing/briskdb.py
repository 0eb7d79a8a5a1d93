"""Start the briskdb MongoDB-wire server for tests.

The server runs in a child process, not in the test process.  Its native threads and shutdown then
cannot interfere with the Twisted reactor that pytest-twisted drives, a test can stop it (by pid) to
cut the connection for real, and a crashed test run cannot leave it behind: the child also exits
when its stdin closes, which happens when the parent dies.

Usage::

    uri, stop = start_briskdb(tmp_path / "briskdb")
    store = open_store(uri + "kvmdesk?implicit_session=false")
    ...
    stop()

briskdb has no sessions: connect with ``implicit_session=False`` (see
:mod:`kvmdesk.core.store.mongo`).  Its documents are limited to 512 KiB.
"""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

SHARDS = 2  # briskdb needs a shard count (2..64) to create a data directory
STARTUP_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


def start_briskdb(data_dir: str | os.PathLike[str], *, startup_timeout: float = STARTUP_TIMEOUT) -> tuple[str, Callable[..., None]]:
    """Start a briskdb server on an ephemeral loopback port, with its data in ``data_dir``.

    :returns: ``(uri, stop)``.  ``uri`` is ``mongodb://127.0.0.1:PORT/``; append a database name.
        ``stop(kill=False)`` ends the server: gracefully (SIGTERM), or abruptly with ``kill=True``
        (SIGKILL, like a crash).  Calling ``stop`` again does nothing.
    :raises RuntimeError: the server did not report its address within ``startup_timeout`` seconds.
    """
    Path(data_dir).mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [sys.executable, "-m", __name__, os.fspath(data_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=_child_environment(),
    )
    try:
        address = _read_address(process, startup_timeout)
    except BaseException:
        _stop(process, kill=True)
        raise
    return f"mongodb://{address}/", lambda kill=False: _stop(process, kill=kill)


def _child_environment() -> dict[str, str]:
    # The child imports this module by name: make sure it finds the same kvmdesk package.
    package_root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    return env


def _read_address(process: subprocess.Popen, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    assert process.stdout is not None
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RuntimeError(f"briskdb did not start within {timeout} s")
        ready, _, _ = select.select([process.stdout], [], [], remaining)
        if ready:
            line = process.stdout.readline()
            if not line:
                raise RuntimeError(f"briskdb exited before serving (exit status {process.wait()})")
            return json.loads(line)["mongo"]


def _stop(process: subprocess.Popen, *, kill: bool) -> None:
    if process.poll() is None:
        os.kill(process.pid, signal.SIGKILL if kill else signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
    for pipe in (process.stdin, process.stdout):
        if pipe is not None:
            pipe.close()


def serve(data_dir: str) -> None:
    """Serve ``data_dir`` until SIGTERM or until stdin closes (the child process's main)."""
    import briskdb

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    database = briskdb.open(data_dir, documents=True, shards=SHARDS)
    try:
        server = database.serve(mongo="127.0.0.1:0", admin=None)
        try:
            print(json.dumps({"mongo": server.mongo_address}), flush=True)
            while not stop.wait(0.5):
                pass
        finally:
            server.close()
    finally:
        database.close()


if __name__ == "__main__":
    serve(sys.argv[1])
