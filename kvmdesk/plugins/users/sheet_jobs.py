"""Runs :mod:`.sheet_worker` in a child process and turns its answer into results or API errors.

Why a process and not a thread: openpyxl is pure Python, so a thread would hold the GIL for long
stretches; on a busy machine the reactor thread then waited 50-170 ms at a time for it (measured).
A child process leaves the reactor's process to I/O; its start-up costs about 0.1-0.2 s, little
beside a bulk import or export.  The child gets a time limit (``[users] sheet_timeout``) and an
address-space cap (``[users] sheet_memory``).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import orjson
from twisted.internet import defer, error, protocol
from twisted.logger import Logger

from kvmdesk.core.errors import ApiError
from kvmdesk.plugins.users import codes

log = Logger(namespace="kvmdesk.users.sheets")

WORKER = Path(__file__).with_name("sheet_worker.py")
_ERRORS = {
    "not_xlsx": codes.NOT_XLSX,
    "bad_columns": codes.BAD_COLUMNS,
    "too_many_rows": codes.TOO_MANY_ROWS,
    "empty": codes.IMPORT_EMPTY,
}


class WorkerFailed(Exception):
    """The worker crashed, was killed or answered nonsense."""


class _Collect(protocol.ProcessProtocol):
    def __init__(self, payload: bytes):
        self.payload = payload
        self.out: list[bytes] = []
        self.err = b""
        self.done: defer.Deferred = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.payload)
        self.transport.closeStdin()

    def outReceived(self, data: bytes) -> None:
        self.out.append(data)

    def errReceived(self, data: bytes) -> None:
        self.err = (self.err + data)[-4096:]

    def processEnded(self, reason: Any) -> None:
        code = reason.value.exitCode if reason.check(error.ProcessTerminated) else 0
        signal = getattr(reason.value, "signal", None)
        self.done.callback((code, signal, b"".join(self.out), self.err))


async def run_worker(core: Any, arguments: Sequence[str], payload: bytes) -> Any:
    """Run the worker with ``arguments`` and ``payload`` on its stdin.

    :returns: the worker's result.
    :raises ApiError: the worker refused the file (a :class:`~.sheets.SheetError`).
    :raises WorkerFailed: it crashed, ran out of time or memory, or answered nonsense.
    """
    reactor = core.reactor
    timeout = float(core.config.get("users.sheet_timeout", 120))
    env = dict(os.environ)
    env["KVMDESK_SHEET_MEMORY"] = str(int(core.config.get("users.sheet_memory", 1 << 30)))
    collector = _Collect(payload)
    process = reactor.spawnProcess(collector, sys.executable, [sys.executable, str(WORKER), *arguments], env=env)
    killer: Optional[Any] = reactor.callLater(timeout, _kill, process)
    try:
        code, signal, out, err = await collector.done
    finally:
        if killer.active():
            killer.cancel()
    if code != 0 or signal:
        log.error("the sheet worker ({arguments}) failed: exit {code}, signal {signal}: {err}",
                  arguments=" ".join(arguments), code=code, signal=signal, err=err.decode("utf-8", "replace"))
        raise WorkerFailed(f"the sheet worker ended with exit status {code}, signal {signal}")
    try:
        answer = orjson.loads(out)
    except orjson.JSONDecodeError:
        raise WorkerFailed("the sheet worker answered no JSON") from None
    if "error" in answer:
        problem = answer["error"]
        raise ApiError(_ERRORS.get(problem.get("kind"), codes.NOT_XLSX), **(problem.get("params") or {}))
    return answer["ok"]


def _kill(process: Any) -> None:
    try:
        process.signalProcess("KILL")
    except error.ProcessExitedAlready:
        pass


async def write_export(core: Any, path: Path, users: list[dict], groups: dict[str, str]) -> int:
    """Write ``users`` (group uuids resolved through ``groups``) to ``path``; returns the file size."""
    payload = orjson.dumps({"path": str(path), "users": users, "groups": groups})
    return (await run_worker(core, ["write"], payload))["size"]


async def read_import(core: Any, data: bytes, max_rows: int, max_unpacked: int) -> list[tuple[int, dict[str, str]]]:
    """The rows of an uploaded workbook: ``(row number, {field: text})``.

    :raises ApiError: the file is refused as a whole (including a worker that crashed or ran out
        of time or memory on it: the file is what made it fail).
    """
    try:
        rows = await run_worker(core, ["read", str(max_rows), str(max_unpacked)], data)
    except WorkerFailed as exc:
        raise ApiError(codes.NOT_XLSX, reason=f"the file could not be read ({exc})") from None
    return [(int(number), cells) for number, cells in rows["rows"]]
