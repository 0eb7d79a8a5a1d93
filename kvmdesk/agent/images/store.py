"""The agent's image files: where each kind lives, partial transfers, verification, removal.

A transfer writes ``.<file_id>.part`` next to its final place, with ``.<file_id>.part.json`` saying
which content (digest, total size) it belongs to.  Only when every byte is in and the digest of the
whole file matches is the file renamed to ``<file_id>`` (atomic on one file system), with
``.<file_id>.json`` recording its digest and size.  A digest names its algorithm
(:data:`~kvmdesk.protocol.images.DIGEST`: SHA-256 for template versions, MD5 for base images and ISOs);
records written before that hold an ``md5`` and are read as ``md5:<hex>``.  An interrupted transfer
leaves the partial file for the next attempt to resume from; the hash state of the bytes already
received is kept in memory, so a resume within the same agent process needs no re-reading (after a
restart the prefix is hashed once, in a thread, at the end).
"""
from __future__ import annotations

import errno
import hashlib
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import attrs
import orjson
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from kvmdesk.protocol import images as protocol
from kvmdesk.protocol.storage import hash_file
from kvmdesk.core.directio import open_for_stream
from kvmdesk.core.errors import ApiError
from kvmdesk.core.filemodes import reachable_dirs
from kvmdesk.core.filewriter import HashingWriter
from kvmdesk.core.threadpools import in_reactor_pool

log = Logger(namespace="kvmdesk.agent.images")

def _read_json(path: Path) -> Optional[dict]:
    try:
        return orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None


def _unlink(path: Path) -> bool:
    try:
        path.unlink()
        return True
    except FileNotFoundError:
        return False


@attrs.define
class Partial:
    """An interrupted transfer this process remembers: its hash state and how many bytes it covers."""

    hasher: Any
    size: int


class ImageStore:
    """The image files of one agent.

    :param roots: storage role (1-4) -> directory.
    :param threaded: write and hash received chunks on a worker thread.
    :param fsync: fsync a received image before it is verified and made visible.
    :param direct_io: write new image files with O_DIRECT (:mod:`kvmdesk.core.directio`).
    """

    def __init__(self, roots: dict[int, Path], *, reactor: Any, threaded: bool = False, fsync: bool = False,
                 direct_io: bool = False):
        self.roots = roots
        self.reactor = reactor
        self.threaded = threaded
        self.fsync = fsync
        self.direct_io = direct_io
        self.partials: dict[Path, Partial] = {}
        #: Receivers in progress by final path: a new transfer of the same file supersedes the old one.
        self.active: dict[Path, "ImageReceiver"] = {}
        #: Interrupted receivers still writing their last chunks (worker thread) before they keep the partial.
        self.settling: dict[Path, defer.Deferred] = {}

    @classmethod
    def for_agent(cls, agent: Any, reactor: Any) -> "ImageStore":
        """Storage directories from the agent's configuration (``[agent.storage]``, default ``<data_dir>/storage``)."""
        config = agent.config
        data_dir = Path(getattr(agent, "data_dir", None) or config.get("agent.data_dir", ".")).absolute()
        default = data_dir / "storage"
        roots = {}
        for role, key in protocol.ROLES.items():
            configured = config.get(f"agent.storage.{key}") or ""
            roots[role] = Path(configured).absolute() if configured else default
        return cls(roots, reactor=reactor, threaded=bool(config.get("agent.images.hash_in_thread", True)),
                   fsync=bool(config.get("agent.images.fsync", True)),
                   direct_io=bool(config.get("agent.images.direct_io", True)))

    # -- locations -------------------------------------------------------------------------------

    def directory(self, kind: str, role: int) -> Path:
        if kind not in protocol.KINDS:
            raise ApiError(protocol.UNKNOWN_KIND, kind=kind)
        if role not in self.roots:
            raise ApiError(protocol.BAD_TRANSFER, reason=f"unknown storage role {role}")
        return self.roots[role] / protocol.KINDS[kind]

    def final_path(self, kind: str, role: int, file_id: str) -> Path:
        if not protocol.FILE_ID.match(file_id) or ".." in file_id:
            raise ApiError(protocol.BAD_FILE_ID, file_id=file_id)
        return self.directory(kind, role) / file_id

    @staticmethod
    def part_path(final: Path) -> Path:
        return final.with_name(f".{final.name}.part")

    @staticmethod
    def part_meta_path(final: Path) -> Path:
        return final.with_name(f".{final.name}.part.json")

    @staticmethod
    def meta_path(final: Path) -> Path:
        return final.with_name(f".{final.name}.json")

    # -- queries -----------------------------------------------------------------------------------

    def state(self, kind: str, role: int, file_id: str, digest: Optional[str] = None) -> dict[str, Any]:
        """What this node holds of one image (blocking file-system reads: small).

        ``partial`` counts an interrupted transfer of the content with ``digest`` (any, without one)."""
        final = self.final_path(kind, role, file_id)
        meta = _read_json(self.meta_path(final)) or {}
        exists = final.is_file()
        partial = 0
        part_meta = _read_json(self.part_meta_path(final)) or {}
        part = self.part_path(final)
        if part.is_file() and (digest is None or protocol.recorded_digest(part_meta) in (digest, None)):
            partial = part.stat().st_size
        return {
            "exists": exists,
            "size": final.stat().st_size if exists else 0,
            "digest": protocol.recorded_digest(meta) if exists else None,
            "version": meta.get("version") if exists else None,
            "path": str(final),
            "partial": partial,
        }

    def listing(self, kind: str, role: int) -> list[dict[str, Any]]:
        directory = self.directory(kind, role)
        found = []
        if directory.is_dir():
            for entry in sorted(directory.iterdir()):
                if entry.name.startswith(".") or not entry.is_file():
                    continue
                meta = _read_json(self.meta_path(entry)) or {}
                found.append({"file_id": entry.name, "size": entry.stat().st_size,
                              "digest": protocol.recorded_digest(meta),
                              "version": meta.get("version"), "path": str(entry)})
        return found

    def settled(self, final: Path) -> defer.Deferred:
        """Fires once an interrupted transfer of ``final`` has written what it received (at once if none)."""
        settling = self.settling.get(final)
        if settling is None:
            return defer.succeed(None)
        waiter: defer.Deferred = defer.Deferred()
        settling.addBoth(lambda result: (waiter.callback(None), result)[1])
        return waiter

    async def drain(self) -> None:
        """Wait until every interrupted transfer has written what it received (the agent stops)."""
        while self.settling:
            await self.settled(next(iter(self.settling)))

    def forget(self, final: Path) -> None:
        """Stop any transfer of ``final`` and drop its remembered state (reactor thread)."""
        receiver = self.active.pop(final, None)
        if receiver is not None:
            receiver.superseded()
        self.partials.pop(final, None)

    def remove_files(self, final: Path) -> bool:
        """Delete ``final`` and its partial/metadata files (blocking: run in a thread)."""
        removed = _unlink(final)
        for extra in (self.meta_path(final), self.part_path(final), self.part_meta_path(final)):
            _unlink(extra)
        return removed

    # -- receiving -------------------------------------------------------------------------------

    def receiver(self, context: Any, kind: str, role: int, file_id: str, offset: int, total: int,
                 digest: Optional[str], version: Optional[int] = None) -> "ImageReceiver":
        """Prepare to receive bytes ``offset..total-1`` of a file whose ``digest`` is ``algorithm:hex``.

        ``digest`` ``None`` (a peer fetch of a version still being sealed at its source): the bytes are
        received and hashed (:data:`~kvmdesk.protocol.images.VERSION_ALGORITHM`) but only a later
        transfer that knows the digest can :meth:`~ImageReceiver.commit`.

        Only checks (and reads) here: nothing is written until the first byte of an authenticated
        body arrives (:meth:`ImageReceiver.open`).
        """
        final = self.final_path(kind, role, file_id)
        if digest is not None and not protocol.DIGEST.match(digest):
            raise ApiError(protocol.BAD_TRANSFER, reason="digest must be sha256:<64 lowercase hex digits> or "
                                                         "md5:<32 lowercase hex digits>")
        if total < 0 or not 0 <= offset <= total:
            raise ApiError(protocol.BAD_TRANSFER, reason=f"offset {offset} and total {total} do not fit")
        if context.length is not None and context.length != total - offset:
            raise ApiError(protocol.BAD_TRANSFER,
                           reason=f"body of {context.length} bytes for range {offset}..{total}")
        part = self.part_path(final)
        meta = _read_json(self.part_meta_path(final)) or {}
        # A partial received before its digest was known (None) is of the same file: the check of the
        # whole, at the commit, decides whether its bytes are right.
        same_content = meta.get("total") == total and (digest is None
                                                       or protocol.recorded_digest(meta) in (digest, None))
        have = part.stat().st_size if same_content and part.is_file() else 0
        if offset != have:
            raise ApiError(protocol.OFFSET_MISMATCH, data={"partial": have}, offset=offset, partial=have)
        reachable_dirs(final.parent)
        free = shutil.disk_usage(final.parent).free
        if total - offset > free:
            raise ApiError(protocol.STORAGE_FULL, needed=total - offset, free=free)
        return ImageReceiver(self, context, final, offset, total, digest, version)


class ImageReceiver:
    """The body sink of one PUT: appends to the partial file, verifies, and renames into place."""

    def __init__(self, store: ImageStore, context: Any, final: Path, offset: int, total: int,
                 digest: Optional[str], version: Optional[int]):
        self.store = store
        self.context = context
        self.final = final
        self.fd: Optional[int] = None
        self.offset = offset
        self.total = total
        self.digest = digest
        self.algorithm = protocol.algorithm_of(digest) if digest else protocol.VERSION_ALGORITHM
        self.version = version
        self.received = 0
        self.writer: Optional[HashingWriter] = None
        self._superseded = False

    def open(self) -> None:
        """Take over the partial file (a transfer of the same file still running is superseded)."""
        store, final = self.store, self.final
        previous = store.active.pop(final, None)
        if previous is not None:
            previous.superseded()
        store.part_meta_path(final).write_bytes(orjson.dumps({"digest": self.digest, "total": self.total,
                                                                 "version": self.version}))
        flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if self.offset else os.O_TRUNC)
        # Direct I/O from offset 0 only: a resumed file ends anywhere, and O_DIRECT wants aligned offsets.
        self.fd, direct = open_for_stream(self.part, flags, 0o640, direct=store.direct_io and not self.offset)
        remembered = store.partials.pop(final, None)
        hasher = None
        if self.offset == 0:
            hasher = hashlib.new(self.algorithm)
        elif remembered is not None and remembered.size == self.offset and remembered.hasher.name == self.algorithm:
            hasher = remembered.hasher
        # Without the hash state of the bytes already here (a resume after a restart), the whole file is
        # hashed once at the end instead.
        self.writer = HashingWriter(self.fd, reactor=store.reactor, hasher=hasher, hashing=hasher is not None,
                                    threaded=store.threaded, pause=self.context.pause, resume=self.context.resume,
                                    write_behind=store.fsync, direct=direct)
        store.active[final] = self

    @property
    def part(self) -> Path:
        return self.store.part_path(self.final)

    def write(self, data: bytes) -> None:
        if self.writer is None:
            self.open()
        if self._superseded:
            raise ApiError(protocol.BAD_TRANSFER, reason="superseded by a newer transfer of the same file")
        if self.offset + self.received + len(data) > self.total:
            raise ApiError(protocol.BAD_TRANSFER, reason=f"more than {self.total} bytes")
        try:
            self.writer.write(data)
        except OSError as exc:
            raise self._write_error(exc) from None
        self.received += len(data)

    def _write_error(self, exc: OSError) -> ApiError:
        if exc.errno == errno.ENOSPC:
            return ApiError(protocol.STORAGE_FULL, needed=self.total - self.offset - self.received, free=0)
        return ApiError(protocol.WRITE_FAILED, reason=exc.strerror or str(exc))

    def _close(self) -> None:
        if self.fd is not None:
            try:
                os.close(self.fd)
            finally:
                self.fd = None

    def superseded(self) -> None:
        """A newer transfer of the same file took over (or the file was deleted): stop writing."""
        self._superseded = True

    def abort(self, reason: Failure) -> None:
        """Connection lost: keep the partial file (and its hash state) for the next attempt."""
        d = defer.ensureDeferred(self._keep_partial())
        d.addErrback(lambda f: log.failure("keeping a partial transfer of {path} failed", f, path=str(self.final)))
        if not d.called:
            settling = self.store.settling

            def settled(result: Any) -> Any:
                if settling.get(self.final) is d:
                    del settling[self.final]
                return result

            settling[self.final] = d
            d.addBoth(settled)

    async def _keep_partial(self) -> None:
        if self.writer is None:
            return
        try:
            await self.writer.flush()
        except OSError:
            pass
        finally:
            self._close()
        if self.store.active.get(self.final) is self:
            del self.store.active[self.final]
            if self.writer.hasher is not None and self.writer.error is None:
                self.store.partials[self.final] = Partial(self.writer.hasher, self.offset + self.writer.written)

    async def finish(self) -> "ImageReceiver":
        """Every byte of the body is in: flush it.  Nothing becomes visible before :meth:`commit`."""
        if self.writer is None:
            self.open()  # an empty body: the file was complete already, only the commit is left
        try:
            await self.writer.flush(fsync=self.fsync)
        except OSError as exc:
            self._close()
            raise self._write_error(exc) from None
        self._close()
        if self._superseded or self.store.active.get(self.final) is not self:
            raise ApiError(protocol.BAD_TRANSFER, reason="superseded by a newer transfer of the same file")
        del self.store.active[self.final]
        size = self.offset + self.received
        if self.writer.hasher is not None:
            self.store.partials[self.final] = Partial(self.writer.hasher, size)
        if size != self.total:
            raise ApiError(protocol.TRANSFER_INCOMPLETE, received=size, total=self.total)
        return self

    async def received_digest(self) -> str:
        """The digest (``algorithm:hex``) of the whole partial file, once :meth:`finish` has it complete
        (kept for the commit).  Hashed again from the file when the state in memory is not of it (an agent
        restart) or of another algorithm (a version sealed with MD5 before, received while unsealed)."""
        remembered = self.store.partials.get(self.final)
        if remembered is None or remembered.size != self.total or remembered.hasher.name != self.algorithm:
            remembered = Partial(await self._in_thread(hash_file, self.part, self.algorithm), self.total)
            self.store.partials[self.final] = remembered
        return protocol.digest_of(self.algorithm, remembered.hasher.hexdigest())

    async def commit(self) -> dict[str, Any]:
        """Verify the digest of the whole file, then rename it into place (called by the authenticated handler)."""
        if self.digest is None:
            raise ApiError(protocol.BAD_TRANSFER, reason="no digest to verify the file against")
        actual = await self.received_digest()
        self.store.partials.pop(self.final, None)
        if actual != self.digest:
            _unlink(self.part)
            _unlink(self.store.part_meta_path(self.final))
            raise ApiError(protocol.DIGEST_MISMATCH, expected=self.digest, actual=actual)
        meta = orjson.dumps({"digest": self.digest, "size": self.total, "version": self.version})
        self.store.meta_path(self.final).write_bytes(meta)
        os.replace(self.part, self.final)
        _unlink(self.store.part_meta_path(self.final))
        return {"path": str(self.final), "size": self.total, "digest": actual}

    @property
    def fsync(self) -> bool:
        return self.store.fsync

    def _in_thread(self, fn: Any, *args: Any) -> defer.Deferred:
        reactor = self.store.reactor
        return in_reactor_pool(reactor, fn, *args)
