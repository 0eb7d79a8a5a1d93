"""User import (contract #111): a multipart upload of an .xlsx in the export's format, plus ``enable``.

The file is refused as a whole, importing nothing, when the request is not multipart, holds no file,
is larger than ``[users] max_upload`` bytes, is not an .xlsx workbook (or unpacks to more than
``[users] max_unpacked`` bytes), has a bad header, no rows, or more than ``[users] max_import_rows``.
Otherwise every row is checked on its own and the answer counts successes and failures, each failure
with its row number and reason: a bad field, a name repeated in the file, a name that exists, a group
that does not exist.

``enable`` (``1``/``0``, ``true``/``false``; default enabled) decides whether the imported users are
enabled; with ``enable`` on, a row whose status column says disabled stays disabled, so an export of
mixed users comes back as it was.  With ``enable`` off every imported user is disabled.

Passwords: the distinct passwords of the file are hashed in the hashing pool, a few at a time (one
per core but one, :func:`hash_concurrency`), so a concurrent login still gets a hashing thread within
one hash's time and a core stays free for the reactor; rows that share a password share its hash, as
a ``multi_create`` batch does.
"""
from __future__ import annotations

import os
import time
from typing import Any, Optional

import multipart
from twisted.internet import defer, task
from twisted.logger import Logger

from kvmdesk.api.models import validate
from kvmdesk.api.router import ApiRequest, Router
from kvmdesk.core import errors
from kvmdesk.core.errors import ApiError
from kvmdesk.core.jobs import BatchProgress
from kvmdesk.core.logtext import escaped
from kvmdesk.core.passwords import hash_password
from kvmdesk.core.store import DuplicateKeyError
from kvmdesk.plugins.users import codes, sheet_jobs, sheets
from kvmdesk.plugins.users.accounts import GROUP, GROUPS, USER, USER_KIND, USERS, find_by
from kvmdesk.plugins.users.models import ImportRow
from kvmdesk.plugins.users.users import INSERT_CHUNK, user_record

log = Logger(namespace="kvmdesk.users.imports")

UPLOAD_PATH = "/personal/user/upload"
_COLUMN_LABELS = dict(sheets.COLUMNS)
#: Rows validated per turn of the event loop (about 4 ms of work).
VALIDATE_CHUNK = 500
#: Parts a form may have (the file, ``enable``, and a few a browser may add).
MAX_PARTS = 16


class Upload:
    """What the multipart body held: the first file and the ``enable`` field."""

    def __init__(self, filename: str, data: bytes, enable: Optional[str]):
        self.filename = filename
        self.data = data
        self.enable = enable

    def release(self) -> None:
        self.data = b""


class UploadSink:
    """Parses the multipart body as it arrives (:mod:`kvmdesk.api.streaming`), keeping only the file.

    The body is refused the moment it is known to be too large (a declared length, or the bytes
    received so far), before it is stored; a body that is not multipart is refused from its headers.
    """

    def __init__(self, context: Any):
        self.limit = int(context.core.config.get("users.max_upload", 10 << 20))
        header = (context.request.getHeader(b"content-type") or b"").decode("latin-1")
        kind, options = multipart.parse_options_header(header)
        if kind.lower() != "multipart/form-data" or not options.get("boundary"):
            raise ApiError(errors.UNSUPPORTED_MEDIA, content_type=kind or "(none)")
        if context.length is not None and context.length > self.limit:
            raise ApiError(codes.UPLOAD_TOO_LARGE, limit=self.limit)
        self.parser = multipart.PushMultipartParser(
            options["boundary"], content_length=-1 if context.length is None else context.length,
            max_segment_count=MAX_PARTS, max_segment_size=self.limit,
        )
        self.received = 0
        self.filename: Optional[str] = None
        self.file = bytearray()
        self.enable: Optional[bytearray] = None
        self._target: Optional[bytearray] = None

    def write(self, data: bytes) -> None:
        self.received += len(data)
        if self.received > self.limit:
            raise ApiError(codes.UPLOAD_TOO_LARGE, limit=self.limit)
        try:
            for event in self.parser.parse(data):
                if isinstance(event, multipart.MultipartSegment):
                    self._target = self._part(event)
                elif event is None:
                    self._target = None
                elif self._target is not None:
                    self._target += event
                    if self.enable is not None and len(self.enable) > 16:
                        raise ApiError(errors.INVALID_PARAM, field="enable", reason="expected true/false or 1/0")
        except multipart.ParserLimitReached:
            raise ApiError(codes.UPLOAD_TOO_LARGE, limit=self.limit) from None
        except multipart.MultipartError as exc:
            raise ApiError(codes.NO_FILE, reason=f"malformed multipart body ({exc})") from None

    def _part(self, segment: Any) -> Optional[bytearray]:
        if segment.filename is not None:
            if self.filename is None:
                self.filename = segment.filename
                return self.file
            return None  # only the first file counts
        if segment.name == "enable":
            self.enable = bytearray()
            return self.enable
        return None

    def finish(self) -> Upload:
        try:
            self.parser.close()
        except multipart.MultipartError as exc:
            raise ApiError(codes.NO_FILE, reason=f"malformed multipart body ({exc})") from None
        if self.filename is None:
            raise ApiError(codes.NO_FILE, reason="no part with a file name")
        enable = self.enable.decode("utf-8", "replace") if self.enable is not None else None
        upload = Upload(self.filename, bytes(self.file), enable)
        self.file = bytearray()
        return upload

    def abort(self, reason: Any) -> None:
        self.file = bytearray()
        self.parser.close(check_complete=False)


def _enable_flag(raw: Optional[str]) -> bool:
    if raw is None or raw.strip() == "":
        return True
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes"):
        return True
    if lowered in ("0", "false", "no"):
        return False
    raise ApiError(errors.INVALID_PARAM, field="enable", reason="expected true/false or 1/0")


async def check_rows(core: Any, rows: list[tuple[int, dict[str, str]]]) -> tuple[list[tuple[int, ImportRow]], list[tuple[int, str, ApiError]]]:
    """Validate every row: the valid ones, and failures with their reason.

    Validation runs on the reactor (the models are the API's own), a bounded chunk of rows at a time
    with a return to the event loop in between.
    """
    valid: list[tuple[int, ImportRow]] = []
    failures: list[tuple[int, str, ApiError]] = []
    for start in range(0, len(rows), VALIDATE_CHUNK):
        if start:
            await task.deferLater(core.reactor, 0, lambda: None)
        for number, cells in rows[start : start + VALIDATE_CHUNK]:
            status = cells.pop("enabled", "")
            enabled = sheets.parse_enabled(status)
            try:
                if enabled is None:
                    raise ApiError(codes.BAD_CELL, column=_COLUMN_LABELS["enabled"], reason=f"unknown status {status!r}")
                cells["enabled"] = enabled
                valid.append((number, validate(ImportRow, cells)))
            except ApiError as exc:
                if exc.error is errors.INVALID_PARAM:
                    field = exc.params.get("field", "")
                    exc = ApiError(codes.BAD_CELL, column=_COLUMN_LABELS.get(field, field), reason=exc.params.get("reason"))
                failures.append((number, str(cells.get("user_name", "")).strip(), exc))
    return valid, failures


def hash_concurrency(core: Any) -> int:
    """Hashes one import runs at once: ``[users] hash_concurrency``, by default one per core but one.

    Argon2 is memory-hard by design: every hashing thread keeps a core busy and streams 19 MiB
    through the caches, which slows everything else on that core, the reactor included.  Leaving
    one core out keeps the API answering within its latency budget during a long import.
    """
    configured = int(core.config.get("users.hash_concurrency", 0))
    return configured if configured > 0 else max(1, (os.cpu_count() or 1) - 1)


async def hash_all(passwords: list[str], concurrency: int) -> dict[str, str]:
    """Hash each distinct password in the hashing pool, ``concurrency`` at a time.

    ``concurrency`` workers each take the next password when their last hash is done: the pool's
    queue never holds more than ``concurrency`` of ours, so another caller (a login) waits for at most
    one hash, and the reactor does a constant amount of work per hash.
    """
    hashed: dict[str, str] = {}
    pending = iter(passwords)

    async def worker() -> None:
        for password in pending:
            hashed[password] = await hash_password(password)

    await defer.gatherResults([defer.ensureDeferred(worker()) for _ in range(max(1, concurrency))], consumeErrors=True)
    return hashed


async def import_users(req: ApiRequest, upload: Upload, enable: bool) -> dict[str, Any]:
    core = req.core
    started = time.monotonic()
    rows = await sheet_jobs.read_import(core, upload.data, int(core.config.get("users.max_import_rows", 10000)),
                                        int(core.config.get("users.max_unpacked", 100 << 20)))
    read_done = time.monotonic()
    valid, bad = await check_rows(core, rows)
    failures: list[tuple[int, str, ApiError]] = list(bad)

    first_row: dict[str, int] = {}
    unique: list[tuple[int, ImportRow]] = []
    for number, row in valid:
        if row.user_name in first_row:
            failures.append((number, row.user_name, ApiError(codes.DUPLICATE_IN_FILE, first=first_row[row.user_name])))
        else:
            first_row[row.user_name] = number
            unique.append((number, row))
    groups = {g["name"]: g["uuid"] for g in
              await find_by(core, GROUPS, "name", sorted({row.group for _, row in unique}), ["uuid", "name"])}
    existing = {u["user_name"] for u in await find_by(core, USERS, "user_name", list(first_row), ["user_name"])}
    accepted: list[tuple[int, ImportRow]] = []
    for number, row in unique:
        if row.group not in groups:
            failures.append((number, row.user_name, ApiError(errors.NOT_FOUND, resource=GROUP, key=row.group)))
        elif row.user_name in existing:
            failures.append((number, row.user_name, ApiError(errors.ALREADY_EXISTS, resource=USER, key=row.user_name)))
        else:
            accepted.append((number, row))
    checks_done = time.monotonic()

    passwords = sorted({row.passwd for _, row in accepted if row.passwd})
    hashes = await hash_all(passwords, hash_concurrency(core))
    hashing_done = time.monotonic()

    created = 0
    users = core.store.collection(USERS)
    tracker = BatchProgress(req, len(accepted))
    await tracker.begin()
    for start in range(0, len(accepted), INSERT_CHUNK):
        part = accepted[start : start + INSERT_CHUNK]
        records = [
            user_record(core, user_name=row.user_name, password_hash=hashes.get(row.passwd) if row.passwd else None,
                        group=groups[row.group], enabled=enable and row.enabled is not False,
                        name=row.name, phone=row.phone, email=row.email)
            for _, row in part
        ]
        for (number, row), outcome in zip(part, await users.insert_many(records)):
            if isinstance(outcome, DuplicateKeyError):
                failures.append((number, row.user_name, ApiError(errors.ALREADY_EXISTS, resource=USER, key=row.user_name)))
            else:
                created += 1
                await core.created(USER_KIND, outcome)
        await tracker.advance(len(part))
    finished = time.monotonic()
    log.info(
        "imported {created} users from '{filename}', {failed} rows failed; read {read:.2f}s, checks {checks:.2f}s, "
        "hashing {hashing:.2f}s ({hashes} hashes), store {store:.2f}s",
        created=created, filename=escaped(upload.filename), failed=len(failures), read=read_done - started,
        checks=checks_done - read_done, hashing=hashing_done - checks_done, hashes=len(passwords),
        store=finished - hashing_done, timings={
            "read": read_done - started, "checks": checks_done - read_done,
            "hashing": hashing_done - checks_done, "store": finished - hashing_done, "hashes": len(passwords),
        },
    )
    failures.sort(key=lambda failure: failure[0])
    return {
        "success_num": created,
        "failed_num": len(failures),
        "failures": [{"row": number, "user_name": name, "code": exc.error.code, "msg": exc.message(req.lang)}
                     for number, name, exc in failures],
    }


def register_routes(router: Router) -> None:
    @router.endpoint("POST", UPLOAD_PATH, summary="Import users from an .xlsx file (multipart: file, enable)",
                     stream=UploadSink, tags=("users",), oplog="导入用户")
    async def upload(req: ApiRequest) -> dict:
        received: Upload = req.stream
        enable = _enable_flag(received.enable)
        req.oplog_detail = received.filename
        answer = await import_users(req, received, enable)
        req.oplog_detail = f"{received.filename}: {answer['success_num']} / {answer['success_num'] + answer['failed_num']}"
        return answer
