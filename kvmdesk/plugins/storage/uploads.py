"""Streaming ``multipart/form-data`` uploads: one file part straight to a temporary file, plus small fields.

:class:`FormUpload` is the body sink of the upload endpoints (see :mod:`kvmdesk.api.streaming`).  The
file part goes to ``.upload-<random>.part`` in the destination directory as it arrives (never into
memory; its MD5 is computed on the way); text fields are kept (a few KiB at most).  The handler gets an
:class:`UploadedFile` and either :meth:`~UploadedFile.commit`\\ s it under a server-chosen name or lets
the router release it (the temporary file is deleted).  A refused or interrupted upload deletes it at once.
"""
from __future__ import annotations

import errno
import os
import shutil
import uuid as uuidlib
from pathlib import Path
from typing import Any, Awaitable, Callable, Optional

import attrs
import multipart
from twisted.logger import Logger
from twisted.python.failure import Failure

from kvmdesk.api.streaming import StreamContext
from kvmdesk.core import errors as core_errors
from kvmdesk.core.directio import enable_direct
from kvmdesk.core.errors import ApiError
from kvmdesk.core.filewriter import HashingWriter
from kvmdesk.plugins.storage import errors

log = Logger(namespace="kvmdesk.storage.uploads")

TEMP_PREFIX = ".upload-"
TEMP_SUFFIX = ".part"
#: Room for the form's own bytes (boundaries, part headers, text fields) above the file size limit.
FORM_OVERHEAD = 1 << 20
#: Largest text field value.
MAX_FIELD = 4096
#: Bytes kept from the start of the file for format sniffing (an ISO's signature is at 0x8001).
HEAD_SIZE = 0x8800
_FORBIDDEN_NAME_CHARS = set('/\\\x00')


def safe_file_name(name: str) -> str:
    """A client's file name fit for display: no directory part, no control characters.

    The name is never used as a path (files are stored under server-chosen names); one that carries a
    path (``../x``, ``C:\\x``) is refused rather than silently cut, so the client learns its mistake.

    :raises ApiError: :data:`~kvmdesk.plugins.storage.errors.BAD_FILE_NAME`.
    """
    if (not name or name in (".", "..") or len(name) > 255 or _FORBIDDEN_NAME_CHARS & set(name)
            or any(ord(c) < 32 or ord(c) == 127 for c in name) or name.strip() != name):
        raise ApiError(errors.BAD_FILE_NAME, name=name[:200])
    return name


@attrs.define(eq=False)
class UploadedFile:
    """A complete upload waiting for its handler.

    :ivar path: the temporary file; :ivar size: bytes; :ivar md5: hex digest; :ivar head: first bytes;
    :ivar filename: the client's (validated) file name or ``None``; :ivar fields: the text fields.
    """

    path: Path
    size: int
    md5: str
    head: bytes
    filename: Optional[str]
    fields: dict[str, str]
    committed: bool = False

    def commit(self, destination: Path) -> Path:
        """Move the file to its final place (same directory tree: an atomic rename)."""
        os.replace(self.path, destination)
        self.committed = True
        return destination

    def release(self) -> None:
        """Delete the temporary file unless it was committed (idempotent)."""
        if not self.committed:
            self.committed = True
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass


@attrs.define
class FormSpec:
    """What one upload endpoint accepts.

    :ivar directory: where the temporary (and final) file goes.
    :ivar fields: names of the accepted text fields.
    :ivar max_file: largest file, in bytes.
    :ivar sniff: called once with the first :data:`HEAD_SIZE` bytes (or the whole, smaller file) to
        refuse a wrong file type early; raises :class:`ApiError`.
    :ivar precheck: asynchronous check run while the body is arriving (e.g. the pool exists).
    """

    directory: Path
    fields: frozenset[str]
    max_file: int
    file_field: str = "file"
    sniff: Optional[Callable[[bytes], None]] = None
    precheck: Optional[Callable[[], Awaitable[None]]] = None
    threaded: bool = False
    #: fsync the file (off the reactor) before it is handed over.
    fsync: bool = False
    #: write the file with ``O_DIRECT`` where the filesystem allows it (:mod:`kvmdesk.core.directio`).
    direct: bool = False


class FormUpload:
    """The body sink of an upload endpoint."""

    def __init__(self, context: StreamContext, spec: FormSpec):
        self.context = context
        self.spec = spec
        content_type = context.request.getHeader(b"content-type") or b""
        kind, options = multipart.parse_options_header(content_type.decode("latin-1"))
        if kind != "multipart/form-data" or not options.get("boundary"):
            raise ApiError(errors.NOT_MULTIPART, content_type=content_type.decode("latin-1")[:100] or "-")
        limit = spec.max_file + FORM_OVERHEAD
        if context.length is not None and context.length > limit:
            raise ApiError(errors.UPLOAD_TOO_LARGE, limit=spec.max_file)
        spec.directory.mkdir(parents=True, exist_ok=True)
        if context.length is not None:
            free = shutil.disk_usage(spec.directory).free
            if context.length > free:
                raise ApiError(errors.NO_SPACE, needed=context.length, free=free)
        try:
            self.parser = multipart.PushMultipartParser(
                options["boundary"], content_length=-1 if context.length is None else context.length,
                max_header_size=4096, max_header_count=8, max_segment_count=16,
            )
        except multipart.MultipartError as exc:
            raise ApiError(errors.BAD_FORM, reason=str(exc)) from None
        self.received = 0
        self.fields: dict[str, bytearray] = {}
        self.filename: Optional[str] = None
        self.temp: Optional[Path] = None
        self.fd: Optional[int] = None
        self.writer: Optional[HashingWriter] = None
        self.file_size = 0
        self.file_seen = False
        self.head = bytearray()
        self.sniffed = False
        self._current: Optional[str] = None
        self._closed = False

    # -- BodySink ----------------------------------------------------------------------------------

    def precheck(self) -> Optional[Awaitable[None]]:
        return self.spec.precheck() if self.spec.precheck is not None else None

    def write(self, data: bytes) -> None:
        self.received += len(data)
        if self.context.length is None and self.received > self.spec.max_file + FORM_OVERHEAD:
            raise ApiError(errors.UPLOAD_TOO_LARGE, limit=self.spec.max_file)
        try:
            for event in self.parser.parse(data):
                self._event(event)
        except multipart.ParserLimitReached as exc:
            raise ApiError(errors.BAD_FORM, reason=str(exc)) from None
        except multipart.MultipartError as exc:
            raise ApiError(errors.BAD_FORM, reason=str(exc)) from None

    async def finish(self) -> UploadedFile:
        try:
            try:
                self.parser.close(check_complete=True)
            except multipart.MultipartError as exc:
                raise ApiError(errors.UPLOAD_INCOMPLETE, reason=str(exc)) from None
            if not self.file_seen:
                raise ApiError(core_errors.INVALID_PARAM, field=self.spec.file_field, reason="a file is required")
            await self.writer.flush(fsync=self.spec.fsync)
            self._close_fd()
            if self.file_size == 0:
                raise ApiError(errors.EMPTY_FILE)
            if not self.sniffed:
                self._sniff()
            fields = {}
            for name, value in self.fields.items():
                try:
                    fields[name] = value.decode("utf-8")
                except UnicodeDecodeError:
                    raise ApiError(core_errors.INVALID_PARAM, field=name, reason="not UTF-8 text") from None
            return UploadedFile(path=self.temp, size=self.file_size, md5=self.writer.hexdigest(), head=bytes(self.head),
                                filename=self.filename, fields=fields)
        except OSError as exc:
            self._discard()
            raise ApiError(errors.NO_SPACE, needed=self.file_size, free=0) if exc.errno == errno.ENOSPC else exc
        except BaseException:
            self._discard()
            raise

    def abort(self, reason: Failure) -> None:
        self._discard()

    # -- parsing -------------------------------------------------------------------------------------

    def _event(self, event: Any) -> None:
        if isinstance(event, multipart.MultipartSegment):
            self._segment(event)
        elif event is None:
            self._current = None
        elif self._current == self.spec.file_field:
            self._file_data(event)
        else:
            buffer = self.fields[self._current]
            buffer += event
            if len(buffer) > MAX_FIELD:
                raise ApiError(core_errors.INVALID_PARAM, field=self._current, reason=f"longer than {MAX_FIELD} bytes")

    def _segment(self, segment: multipart.MultipartSegment) -> None:
        name = segment.name or ""
        if name == self.spec.file_field:
            if self.file_seen:
                raise ApiError(errors.BAD_FORM, reason=f"more than one {name!r} part")
            if segment.filename is not None:
                self.filename = safe_file_name(segment.filename)
            self.file_seen = True
            self._open_temp()
        elif name in self.spec.fields:
            if name in self.fields:
                raise ApiError(errors.BAD_FORM, reason=f"field {name!r} given twice")
            self.fields[name] = bytearray()
        else:
            raise ApiError(errors.BAD_FORM, reason=f"unknown field {name!r} (expected {', '.join(self._expected())})")
        self._current = name

    def _expected(self) -> list[str]:
        return [self.spec.file_field, *sorted(self.spec.fields)]

    def _open_temp(self) -> None:
        self.temp = self.spec.directory / f"{TEMP_PREFIX}{uuidlib.uuid4().hex}{TEMP_SUFFIX}"
        self.fd = os.open(self.temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        direct = self.spec.direct and enable_direct(self.fd)
        self.writer = HashingWriter(self.fd, reactor=self.context.core.reactor, threaded=self.spec.threaded,
                                    pause=self.context.pause, resume=self.context.resume,
                                    write_behind=self.spec.fsync, direct=direct)

    def _file_data(self, data: bytes) -> None:
        self.file_size += len(data)
        if self.file_size > self.spec.max_file:
            raise ApiError(errors.UPLOAD_TOO_LARGE, limit=self.spec.max_file)
        if len(self.head) < HEAD_SIZE:
            self.head += data[: HEAD_SIZE - len(self.head)]
            if len(self.head) >= HEAD_SIZE:
                self._sniff()
        try:
            self.writer.write(data)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise ApiError(errors.NO_SPACE, needed=self.file_size, free=0) from None
            raise

    def _sniff(self) -> None:
        self.sniffed = True
        if self.spec.sniff is not None:
            self.spec.sniff(bytes(self.head))

    # -- cleanup ---------------------------------------------------------------------------------------

    def _close_fd(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)

    def _discard(self) -> None:
        if self._closed:
            return
        self._closed = True
        # The name goes at once (the refusal is answered with nothing left in the directory); the
        # descriptor stays open until the worker thread has finished the batch it may be writing.
        if self.temp is not None:
            try:
                self.temp.unlink()
            except FileNotFoundError:
                pass
        if self.writer is not None and self.writer.pending:
            from twisted.internet import defer

            defer.ensureDeferred(self._close_when_written())
            return
        self._close_quietly()

    async def _close_when_written(self) -> None:
        try:
            await self.writer.flush()
        except OSError:
            pass
        self._close_quietly()

    def _close_quietly(self) -> None:
        try:
            self._close_fd()
        except OSError:
            log.failure("closing an upload's temporary file failed")


def sweep_temporaries(directory: Path) -> int:
    """Delete upload temporaries left by a crash (at start-up, before any upload can be running)."""
    removed = 0
    if directory.is_dir():
        for entry in directory.iterdir():
            if entry.name.startswith(TEMP_PREFIX) and entry.name.endswith(TEMP_SUFFIX):
                try:
                    entry.unlink()
                    removed += 1
                except FileNotFoundError:
                    pass
    return removed
