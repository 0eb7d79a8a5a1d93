"""User export (contract #110): an .xlsx file behind an expiring, signed download URL.

- The file is written by openpyxl in a worker process (:mod:`.sheet_jobs`) into ``<data_dir>/exports/<random id>.xlsx``; the name
  the administrator chose is only the download name (``Content-Disposition``), never a path.
- The URL carries the file id, the download name, the expiry time and an HMAC-SHA256 over the three,
  keyed with a random secret of this process: a browser can fetch it without the bearer token, nobody
  can forge or extend one, and a restart invalidates every outstanding link.
- Files are deleted once expired (a sweeper service, and each new export); at start-up every left-over
  file is deleted, since no link to it can be valid any more.
"""
from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import unicodedata
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import attrs
from twisted.internet import defer
from twisted.logger import Logger

from kvmdesk.api.router import API_PREFIX, Action, ApiRequest, Router
from kvmdesk.core.errors import ApiError
from kvmdesk.core.periodic import PeriodicService
from kvmdesk.core.records import format_time
from kvmdesk.core.threadpools import in_reactor_pool
from kvmdesk.plugins.users import codes, sheet_jobs
from kvmdesk.plugins.users.accounts import GROUPS, find_by
from kvmdesk.plugins.users.batch import batch_answer, describe_users, resolve_users
from kvmdesk.plugins.users.models import ExportParam

log = Logger(namespace="kvmdesk.users.exports")

EXTENSION = "users.exports"
DOWNLOAD_PATH = "/personal/user/download"
XLSX_TYPE = b"application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
_FILE_ID = re.compile(r"^[0-9a-f]{32}$")
_UNSAFE = re.compile(r'[\x00-\x1f\x7f/\\:*?"<>|]+')


def download_name(filename: str) -> str:
    """The chosen file name made safe for a ``Content-Disposition``, always ending in ``.xlsx``."""
    name = _UNSAFE.sub("_", unicodedata.normalize("NFC", filename)).strip(" ._")
    if name.lower().endswith(".xlsx"):
        name = name[:-5].rstrip(" ._")
    return (name[:100] or "users") + ".xlsx"


def content_disposition(name: str) -> bytes:
    fallback = name.encode("ascii", "replace").decode("ascii").replace("?", "_")
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(name, safe='')}".encode("ascii")


def run_blocking(core: Any, fn: Any, *args: Any) -> defer.Deferred:
    """Run ``fn`` in the reactor's thread pool (short blocking file work)."""
    return in_reactor_pool(core.reactor, fn, *args)


class Exports:
    """The export files of this process: where they live, their signatures, their expiry.

    :param directory: ``<data_dir>/exports``.
    :param clock: the core's time source (expiry follows it).
    :param ttl: seconds a download link and its file live.
    """

    def __init__(self, directory: Path, clock: Any, ttl: float):
        self.directory = directory
        self.clock = clock
        self.ttl = ttl
        self._key = secrets.token_bytes(32)
        self._expiry: dict[str, float] = {}

    def signature(self, file_id: str, expires: int, name: str) -> str:
        message = f"{file_id}\n{expires}\n{name}".encode("utf-8")
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()

    def path(self, file_id: str) -> Path:
        if not _FILE_ID.match(file_id):
            raise ValueError(f"bad export file id {file_id!r}")
        return self.directory / f"{file_id}.xlsx"

    def reserve(self) -> tuple[str, int]:
        """A new file id and its expiry (seconds on the core's clock)."""
        file_id = secrets.token_hex(16)
        expires = int(self.clock.seconds() + self.ttl)
        self._expiry[file_id] = expires
        return file_id, expires

    def query(self, file_id: str, expires: int, name: str) -> str:
        return urlencode({"file": file_id, "name": name, "expires": expires,
                          "sig": self.signature(file_id, expires, name)})

    def check(self, args: dict[str, str]) -> tuple[Path, str]:
        """The file and download name of a signed download request.

        :raises ApiError: a bad or expired signature (403), or a file already swept (404).
        """
        file_id, name, raw_expires, sig = (args.get(k, "") for k in ("file", "name", "expires", "sig"))
        if not (_FILE_ID.match(file_id) and raw_expires.isdigit() and sig):
            raise ApiError(codes.DOWNLOAD_DENIED)
        expires = int(raw_expires)
        if not hmac.compare_digest(self.signature(file_id, expires, name), sig):
            raise ApiError(codes.DOWNLOAD_DENIED)
        if expires <= self.clock.seconds():
            raise ApiError(codes.DOWNLOAD_DENIED)
        return self.path(file_id), name

    def expired(self) -> list[str]:
        now = self.clock.seconds()
        gone = [file_id for file_id, expires in self._expiry.items() if expires <= now]
        for file_id in gone:
            del self._expiry[file_id]
        return gone

    async def sweep(self, core: Any) -> int:
        """Delete the files whose links expired; returns how many."""
        paths = [self.path(file_id) for file_id in self.expired()]
        if paths:
            await run_blocking(core, _unlink_all, paths)
        return len(paths)

    async def purge(self, core: Any) -> None:
        """Delete every file in the directory (start-up: no old link can be valid)."""
        self._expiry.clear()
        await run_blocking(core, _reset_directory, self.directory)


def _unlink_all(paths: list[Path]) -> None:
    for path in paths:
        for candidate in (path, path.with_name(path.name + ".part")):
            try:
                candidate.unlink()
            except FileNotFoundError:
                pass


def _make_directory(directory: Path) -> None:
    # Exports hold personal data (names, phone numbers, e-mail addresses): owner only.
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)


def _reset_directory(directory: Path) -> None:
    _make_directory(directory)
    for entry in directory.iterdir():
        if entry.is_file() and (entry.suffix == ".xlsx" or entry.name.endswith(".xlsx.part")):
            entry.unlink()


def exports_of(core: Any) -> Exports:
    return core.extensions[EXTENSION]


def base_url(req: ApiRequest) -> str:
    host = (req.http.getHeader(b"host") or b"").decode("latin-1")
    if not host:
        address = req.http.getHost()
        host = f"{address.host}:{address.port}"
    scheme = "https" if req.http.isSecure() else "http"
    prefix = getattr(req.core.router, "prefix", API_PREFIX)
    return f"{scheme}://{host}{prefix}"


async def export(req: ApiRequest) -> dict:
    """Write the chosen users to an .xlsx file; answer its download URL and the per-user results."""
    body: ExportParam = req.body
    exports = exports_of(req.core)
    users, failures = await resolve_users(req, body.users, ["name", "group", "phone", "email", "enabled"])
    req.oplog_detail = f"{body.filename}: {describe_users(users or [f[0] for f in failures])}"
    if not users:
        raise failures[0][1]
    groups = await find_by(req.core, GROUPS, "uuid", sorted({u.get("group") for u in users if u.get("group")}), ["uuid", "name"])
    await exports.sweep(req.core)
    await run_blocking(req.core, _make_directory, exports.directory)
    file_id, expires = exports.reserve()
    await sheet_jobs.write_export(req.core, exports.path(file_id), users, {g["uuid"]: g["name"] for g in groups})
    name = download_name(body.filename)
    answer = batch_answer(req, len(users) + len(failures), failures)
    return {
        "url": f"{base_url(req)}{DOWNLOAD_PATH}?{exports.query(file_id, expires, name)}",
        "expires_at": format_time(expires),
        **answer,
    }


ACTION = Action(export, "Export users to an .xlsx file; answers a download URL", ExportParam, "导出用户")


def register_routes(router: Router) -> None:
    @router.endpoint("GET", DOWNLOAD_PATH, summary="Download an exported .xlsx (signed, expiring URL from export)",
                     auth=False, tags=("users",))
    async def download(req: ApiRequest) -> bytes:
        path, name = exports_of(req.core).check(req.args)
        try:
            content = await run_blocking(req.core, path.read_bytes)
        except FileNotFoundError:
            raise ApiError(codes.EXPORT_GONE) from None
        req.http.setHeader(b"content-type", XLSX_TYPE)
        req.http.setHeader(b"content-disposition", content_disposition(name))
        req.http.setHeader(b"cache-control", b"no-store")
        return content


@attrs.define(eq=False)
class ExportSweeper(PeriodicService):
    """Deletes expired export files every ``interval`` seconds; a failed round is logged, not fatal.

    :param core: its clock drives the loop (tests advance a ``Clock``); ``stopService`` waits for the
        round in progress.
    """

    what = "deleting expired user exports"
    at_start = False
    name = "users-export-sweeper"

    async def sweep(self) -> None:
        await exports_of(self.core).sweep(self.core)
