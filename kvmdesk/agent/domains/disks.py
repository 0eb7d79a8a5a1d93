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
from kvmdesk.protocol.storage import md5_file
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
    """Hash a version file and record its MD5 (blocking: run in a thread); a file removed meanwhile
    (an undone save) gets no record."""
    md5 = md5_file(path).hexdigest()
    meta = _read_meta(path)
    if path.is_file():
        ImageStore.meta_path(path).write_bytes(orjson.dumps({**meta, "md5": md5, "size": path.stat().st_size}))
    return md5


def _log_sealed(file_id: str, flatten_s: float, md5_s: float) -> None:
    # bench/template_bench.py reads these figures from the agent's log.
    log.info("sealed {file}: flatten {flatten:.3f} s, md5 {hashing:.3f} s", file=file_id, flatten=flatten_s,
             hashing=md5_s)


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
        #: Version files whose MD5 is being computed (``copy(..., seal_later=True)``), by path.
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
        usage = await in_reactor_pool(self.reactor, shutil.disk_usage, path)
        if needed > usage.free:
            raise DiskError(DISK_NO_SPACE, field=field, needed=_gb(needed), free=_gb(usage.free))

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
        current = await self.info(ref)
        size = size_gb * GIB
        if size < current["virtual_size"]:
            raise DiskError(DISK_SHRINK, field="size_gb", current=_gb(current["virtual_size"]), requested=size_gb)
        if size == current["virtual_size"]:
            return current
        await self._check_space(Path(current["path"]).parent, size - current["virtual_size"], "size_gb")
        await self._run("resize", "-q", current["path"], str(size))
        return await self.info(ref)

    async def copy(self, ref: FileRef, to: FileRef, version: Optional[int] = None,
                   seal_later: bool = False) -> dict[str, Any]:
        """Flatten ``ref`` (and its backing chain) into a standalone qcow2 at ``to``.

        With ``version`` the copy is sealed as an image file of that version: its MD5 is computed (in a
        thread) and recorded like a received image's, so peers can fetch and verify it.  With
        ``seal_later`` the answer comes as soon as the file is in place (``md5`` ``None``) and the MD5
        is computed meanwhile, while peers already fetch the file; :meth:`seal` gives it."""
        source = await self.info(ref)
        target = self.resolve(to)
        if target.exists():
            raise DiskError(DISK_EXISTS, file=f"{to.kind}/{to.file_id}")
        await in_reactor_pool(self.reactor, reachable_dirs, target.parent)
        await self._check_space(target.parent, source["actual_size"], "to")
        temporary = target.with_name(f".{target.name}.new")
        md5 = None
        try:
            started = time.perf_counter()
            await self._run("convert", "-U", "-O", "qcow2", source["path"], str(temporary))
            flattened = time.perf_counter()
            if version is not None and not seal_later:
                md5 = (await in_reactor_pool(self.reactor, md5_file, temporary)).hexdigest()
                _log_sealed(to.file_id, flattened - started, time.perf_counter() - flattened)
            if version is not None:
                size = temporary.stat().st_size
                ImageStore.meta_path(target).write_bytes(orjson.dumps({"md5": md5, "size": size, "version": version}))
            os.replace(temporary, target)
        finally:
            temporary.unlink(missing_ok=True)
        if version is not None and seal_later:
            self._start_sealing(target, to.file_id, flattened - started)
        return {**await self.info(to), "md5": md5, "size": target.stat().st_size}

    def _start_sealing(self, path: Path, file_id: str, flatten_s: float) -> None:
        started = time.perf_counter()

        def sealed(md5: str) -> str:
            _log_sealed(file_id, flatten_s, time.perf_counter() - started)
            return md5

        sealing = in_reactor_pool(self.reactor, _seal, path).addCallback(sealed)
        self.sealing[path] = sealing

        def done(result: Any) -> Any:
            if self.sealing.get(path) is sealing:
                del self.sealing[path]
            return result

        sealing.addBoth(done)
        sealing.addErrback(lambda f: log.failure("sealing {path} failed", f, path=str(path)))

    async def seal(self, ref: FileRef) -> dict[str, Any]:
        """``{"md5", "size"}`` of a version file: recorded, being computed (:meth:`copy`'s
        ``seal_later``: waits for it), or computed now (say the agent restarted meanwhile)."""
        path = self._existing(ref)
        sealing = self.sealing.get(path)
        if sealing is not None:
            waiter: defer.Deferred = defer.Deferred()
            sealing.addBoth(lambda result: (waiter.callback(None), result)[1])
            await waiter
        meta = await in_reactor_pool(self.reactor, _read_meta, path)
        md5 = meta.get("md5")
        if not md5:
            md5 = await in_reactor_pool(self.reactor, _seal, path)
        return {"md5": md5, "size": path.stat().st_size, "version": meta.get("version")}

    async def remove(self, ref: FileRef) -> bool:
        """Remove the file (and an image file's record of its MD5); ``False`` if it was not there."""
        path = self.resolve(ref)
        return await in_reactor_pool(self.reactor, self.remove_path, path)

    def remove_path(self, path: Path) -> bool:
        """Remove a disk file named by path, with its MD5 record (blocking)."""
        ImageStore.meta_path(path).unlink(missing_ok=True)
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        return True
