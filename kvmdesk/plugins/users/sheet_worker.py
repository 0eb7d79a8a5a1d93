"""The worker process that reads and writes the users' .xlsx files (run by :mod:`.sheet_jobs`).

Run as a script, by path: it loads :mod:`.sheets` by path too, so the worker imports only openpyxl
and the standard library, not the controller (start-up in a fraction of a second).

    python sheet_worker.py write                       stdin: {"path", "users", "groups"} as JSON
    python sheet_worker.py read MAX_ROWS MAX_UNPACKED  stdin: the .xlsx bytes

Answers one JSON document on stdout: ``{"ok": result}`` or ``{"error": {"kind", "params"}}`` for a
file that cannot be used (see :class:`~.sheets.SheetError`).  Any other failure exits non-zero.
The address space can be capped with the environment variable ``KVMDESK_SHEET_MEMORY`` (bytes).
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _load_sheets():
    spec = importlib.util.spec_from_file_location("kvmdesk_user_sheets", HERE / "sheets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _limit_memory() -> None:
    limit = int(os.environ.get("KVMDESK_SHEET_MEMORY", "0") or 0)
    if limit > 0:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def main(argv: list[str]) -> int:
    if sys.path and Path(sys.path[0] or ".").resolve() == HERE:
        del sys.path[0]  # the plugin's modules are not importable as top-level names here
    _limit_memory()
    sheets = _load_sheets()
    command = argv[1] if len(argv) > 1 else ""
    try:
        if command == "write":
            job = json.load(sys.stdin)
            groups = job["groups"]
            rows = (sheets.export_row(user, groups.get(user.get("group") or "", "")) for user in job["users"])
            result = {"size": sheets.write_users(Path(job["path"]), rows)}
        elif command == "read":
            data = sys.stdin.buffer.read()
            try:
                result = {"rows": sheets.read_users(data, max_rows=int(argv[2]), max_unpacked=int(argv[3]))}
            except MemoryError:
                raise sheets.SheetError("not_xlsx", reason="too large once unpacked") from None
        else:
            print(f"usage: {argv[0]} write | read MAX_ROWS MAX_UNPACKED", file=sys.stderr)
            return 2
    except sheets.SheetError as exc:
        answer = {"error": {"kind": exc.kind, "params": exc.params}}
    else:
        answer = {"ok": result}
    sys.stdout.buffer.write(json.dumps(answer).encode("ascii"))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
