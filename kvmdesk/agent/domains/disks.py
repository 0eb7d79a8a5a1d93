"""qcow2 disk files on a node: create (empty or as an overlay), inspect, grow, flatten, remove.

Every ``qemu-img`` run is a child process (``getProcessOutputAndValue``): the reactor never waits for
it.  Sizes only grow.  A new file is written under a temporary name and renamed into place, so a
failed or interrupted run never leaves a half-made disk where a domain could pick it up.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Optional

import orjson
from twisted.internet import defer
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import Logger

from kvmdesk.agent.images.store import ImageStore
from kvmdesk.protocol import images as image_protocol
from kvmdesk.core.errors import ErrorCode, define
from kvmdesk.core.filemodes import reachable_dirs
from kvmdesk.core.threadpools import in_reactor_pool
from kvmdesk.protocol.domains import FileRef

GIB = 1 << 30
log = Logger(namespace="kvmdesk.agent.disks")

DISK_EXISTS = define(5101, 409, "磁盘文件已存在: {file}", "the disk file already exists: {file}")
DISK_NOT_FOUND = define(5102, 404, "磁盘文件不存在: {file}", "no such disk file: {file}")
DISK_SHRINK = define(5103, 400, "参数错误: {field}: 磁盘只能扩容 (当前 {current} GB, 请求 {requested} GB)",
                     "invalid parameter {field}: disks only grow (now {current} GB, asked for {requested} GB)")
DISK_NO_SPACE = define(5104, 507, "参数错误: {field}: 节点存储空间不足 (需要 {needed} GB, 剩余 {free} GB)",
                       "invalid parameter {field}: not enough space on the node ({needed} GB needed, {free} GB free)")
QEMU_IMG_FAILED = define(5105, 500, "磁盘操作失败: {reason}", "the disk operation failed: {reason}")


class DiskError(Exception):
    """A disk operation failed; carries the catalogue entry and its parameters."""

    def __init__(self, error: ErrorCode, **params: Any):
        super().__init__(error.message("en", params))
        self.error = error
        self.params = params


def _gb(size: int) -> float:
    return round(size / GIB, 2)


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        return orjson.loads(ImageStore.meta_path(path).read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return {}


def _seal(path: Path) -> str:
    """Hash a version file and record its digest (blocking: run in a thread); a file removed meanwhile
    (an undone save) gets no record."""
    digest = image_protocol.version_digest(path)
    meta = _read_meta(path)
    if path.is_file():
        ImageStore.meta_path(path).write_bytes(orjson.dumps({**meta, "digest": digest, "size": path.stat().st_size}))
    return digest


def _log_sealed(file_id: str, flatten_s: float, hashing_s: float) -> None:
    # bench/template_bench.py reads these figures from the agent's log.
    log.info("sealed {file}: flatten {flatten:.3f} s, {algorithm} {hashing:.3f} s", file=file_id, flatten=flatten_s,
             algorithm=image_protocol.VERSION_ALGORITHM, hashing=hashing_s)


class Disks:
    """The qcow2 files of one node.

    :param resolve: a file reference -> its path (the image store's places; validates the reference).
    :param reactor: runs the child processes and the blocking file-system calls (its thread pool).
    :param qemu_img: the ``qemu-img`` executable.
    """

    def __init__(self, resolve: Callable[[FileRef], Path], reactor: Any, qemu_img: str = "qemu-img"):
        self.resolve = resolve
        self.reactor = reactor
        self.qemu_img = shutil.which(qemu_img) or qemu_img
        #: Version files whose digest is being computed (``copy(..., seal_later=True)``), by path.
        self.sealing: dict[Path, defer.Deferred] = {}

    async def _run(self, *args: str) -> str:
        out, err, code = await getProcessOutputAndValue(self.qemu_img, args, env=dict(os.environ), reactor=self.reactor)
        if code != 0:
            reason = (err or out).decode("utf-8", "replace").strip() or f"qemu-img exited with {code}"
            raise DiskError(QEMU_IMG_FAILED, reason=reason)
        return out.decode("utf-8", "replace")

    def _existing(self, ref: FileRef) -> Path:
        path = self.resolve(ref)
        if not path.is_file():
            raise DiskError(DISK_NOT_FOUND, file=f"{ref.kind}/{ref.file_id}")
        return path

    async def _check_space(self, path: Path, needed: int, field: str) -> None:
        await in_reactor_pool(self.reactor, self._check_space_together, [(path, needed, field)])

    async def info(self, ref: FileRef) -> dict[str, Any]:
        """``{"path", "format", "virtual_size", "actual_size", "backing"}`` (sizes in bytes).

        ``-U`` reads a file a running domain holds locked (its sizes may lag the guest's writes)."""
        path = self._existing(ref)
        raw = orjson.loads(await self._run("info", "-U", "--output=json", str(path)))
        return {"path": str(path), "format": raw.get("format"), "virtual_size": int(raw.get("virtual-size", 0)),
                "actual_size": int(raw.get("actual-size", 0)), "backing": raw.get("full-backing-filename")}

    async def create(self, ref: FileRef, size_gb: int, backing: Optional[FileRef] = None) -> dict[str, Any]:
        """A new qcow2 of ``size_gb`` (an overlay on ``backing`` when given, grown to ``size_gb``)."""
        path = self.resolve(ref)
        if path.exists():
            raise DiskError(DISK_EXISTS, file=f"{ref.kind}/{ref.file_id}")
        size = size_gb * GIB
        args = ["create", "-q", "-f", "qcow2"]
        grow = size
        if backing is not None:
            base = await self.info(backing)
            if size < base["virtual_size"]:
                raise DiskError(DISK_SHRINK, field="size_gb", current=_gb(base["virtual_size"]), requested=size_gb)
            grow = size - base["virtual_size"]
            args += ["-b", base["path"], "-F", base["format"] or "qcow2"]
        await in_reactor_pool(self.reactor, reachable_dirs, path.parent)
        await self._check_space(path.parent, grow, "size_gb")
        temporary = path.with_name(f".{path.name}.new")
        try:
            await self._run(*args, str(temporary), str(size))
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)
        return await self.info(ref)

    async def resize(self, ref: FileRef, size_gb: int) -> dict[str, Any]:
        """Grow to ``size_gb``; the same size is a no-op, a smaller one refused (:data:`DISK_SHRINK`)."""
        (grown,) = await self.grow_all([(ref, size_gb)], fields=["size_gb"])
        return grown

    async def grow_all(self, sizes: list[tuple[FileRef, int]], fields: Optional[list[str]] = None) -> list[dict]:
        """Grow each disk to its size, all or none: no size may shrink, and the growth of the disks on
        one file system must fit its free space together, before any disk grows.

        :param fields: how errors name each size (default ``disks.<i>.size_gb``).
        """
        fields = fields or [f"disks.{i}.size_gb" for i in range(len(sizes))]
        current = [await self.info(ref) for ref, _ in sizes]
        growth: list[tuple[Path, int, str]] = []
        for (ref, size_gb), info, field in zip(sizes, current, fields):
            if size_gb * GIB < info["virtual_size"]:
                raise DiskError(DISK_SHRINK, field=field, current=_gb(info["virtual_size"]), requested=size_gb)
            if size_gb * GIB > info["virtual_size"]:
                growth.append((Path(info["path"]).parent, size_gb * GIB - info["virtual_size"], field))
        await in_reactor_pool(self.reactor, self._check_space_together, growth)
        grown = []
        for (ref, size_gb), info in zip(sizes, current):
            if size_gb * GIB > info["virtual_size"]:
                await self._run("resize", "-q", info["path"], str(size_gb * GIB))
                info = await self.info(ref)
            grown.append(info)
        return grown

    @staticmethod
    def _check_space_together(growth: list[tuple[Path, int, str]]) -> None:
        """Sum the growth per file system (blocking: ``stat`` and ``statvfs``)."""
        needed: dict[int, list] = {}
        for directory, size, field in growth:
            entry = needed.setdefault(directory.stat().st_dev, [directory, 0, field])
            entry[1] += size
        for directory, size, field in needed.values():
            free = shutil.disk_usage(directory).free
            if size > free:
                raise DiskError(DISK_NO_SPACE, field=field, needed=_gb(size), free=_gb(free))

    async def copy(self, ref: FileRef, to: FileRef, version: Optional[int] = None,
                   seal_later: bool = False) -> dict[str, Any]:
        """Flatten ``ref`` (and its backing chain) into a standalone qcow2 at ``to``.

        With ``version`` the copy is sealed as an image file of that version: its digest (SHA-256) is
        computed (in a thread) and recorded like a received image's, so peers can fetch and verify it.
        With ``seal_later`` the answer comes as soon as the file is in place (``digest`` ``None``) and the
        digest is computed meanwhile, while peers already fetch the file; :meth:`seal` gives it."""
        source = await self.info(ref)
        target = self.resolve(to)
        if target.exists():
            raise DiskError(DISK_EXISTS, file=f"{to.kind}/{to.file_id}")
        await in_reactor_pool(self.reactor, reachable_dirs, target.parent)
        await self._check_space(target.parent, source["actual_size"], "to")
        temporary = target.with_name(f".{target.name}.new")
        digest = None
        try:
            started = time.perf_counter()
            await self._run("convert", "-U", "-O", "qcow2", source["path"], str(temporary))
            flattened = time.perf_counter()
            if version is not None and not seal_later:
                digest = await in_reactor_pool(self.reactor, image_protocol.version_digest, temporary)
                _log_sealed(to.file_id, flattened - started, time.perf_counter() - flattened)
            if version is not None:
                size = temporary.stat().st_size
                ImageStore.meta_path(target).write_bytes(orjson.dumps({"digest": digest, "size": size,
                                                                              "version": version}))
            os.replace(temporary, target)
        finally:
            temporary.unlink(missing_ok=True)
        if version is not None and seal_later:
            self._start_sealing(target, to.file_id, flattened - started)
        return {**await self.info(to), "digest": digest, "size": target.stat().st_size}

    def _start_sealing(self, path: Path, file_id: str, flatten_s: float) -> None:
        started = time.perf_counter()

        def sealed(digest: str) -> str:
            _log_sealed(file_id, flatten_s, time.perf_counter() - started)
            return digest

        sealing = in_reactor_pool(self.reactor, _seal, path).addCallback(sealed)
        self.sealing[path] = sealing

        def done(result: Any) -> Any:
            if self.sealing.get(path) is sealing:
                del self.sealing[path]
            return result

        sealing.addBoth(done)
        sealing.addErrback(lambda f: log.failure("sealing {path} failed", f, path=str(path)))

    async def seal(self, ref: FileRef) -> dict[str, Any]:
        """``{"digest", "size", "version"}`` of a version file: recorded (``md5:<hex>`` for one sealed
        before versions were sealed with SHA-256), being computed (:meth:`copy`'s ``seal_later``: waits
        for it), or computed now (say the agent restarted meanwhile)."""
        path = self._existing(ref)
        sealing = self.sealing.get(path)
        if sealing is not None:
            waiter: defer.Deferred = defer.Deferred()
            sealing.addBoth(lambda result: (waiter.callback(None), result)[1])
            await waiter
        meta = await in_reactor_pool(self.reactor, _read_meta, path)
        digest = image_protocol.recorded_digest(meta)
        if not digest:
            digest = await in_reactor_pool(self.reactor, _seal, path)
        return {"digest": digest, "size": path.stat().st_size, "version": meta.get("version")}

    async def remove(self, ref: FileRef) -> bool:
        """Remove the file (and an image file's record of its digest); ``False`` if it was not there."""
        path = self.resolve(ref)
        return await in_reactor_pool(self.reactor, self.remove_path, path)

    def remove_path(self, path: Path) -> bool:
        """Remove a disk file named by path, with its digest record (blocking)."""
        ImageStore.meta_path(path).unlink(missing_ok=True)
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        return True
