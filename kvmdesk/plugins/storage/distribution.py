"""Distribution of image files to the nodes of a pool, through their agents.

One transfer record (collection ``image_transfers``) per image and node says how far that node is:
``status`` 0 done, 1 in progress (or waiting for a stream), 2 failed (retried with backoff);
``progress`` 0-100 and ``bytes_done``.  The :class:`Distributor` service

- sends each file from the controller's copy with a streamed body (:class:`FileRangeProducer`: never
  in memory), at most ``max_streams`` at once over the whole controller; transfers of the same file
  share the chunks they read (:class:`SharedReads`), so the file is read about once, not once per node;
- asks the agent first what it already has, so an interrupted transfer resumes where it stopped and a
  node that already holds the verified file is not sent it again (the agent checks the digest of the
  whole file before the file appears under its name: ``md5:<hex>`` for base images, the md5 the API
  shows; ``sha256:<hex>`` for template disk images);
- retries a failed transfer after ``retry_initial`` seconds, doubling up to ``retry_max`` (on the
  injected clock), and at once when the node comes back online;
- reconciles every ``reconcile_interval`` seconds and at start: every node of a pool gets a record
  for every image of the pool (a node added later receives the pool's images), transfers interrupted
  by a controller restart resume, records of nodes that left are dropped.

Base images and template disk images use the same machinery; they differ only in where the agent
puts the file (``kind``, ``role``) and where the list of images comes from (:meth:`Distributor.targets`).
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional

import attrs
from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger

from kvmdesk.protocol import images as protocol
from kvmdesk.core.records import new_record, now_text
from kvmdesk.core.store import DuplicateKeyError, Index
from kvmdesk.plugins.storage.agents import AgentError, AgentLink, agent_link
from kvmdesk.plugins.storage.producers import FileRangeProducer, SharedReads

log = Logger(namespace="kvmdesk.storage.distribution")

TRANSFERS = "image_transfers"
REMOVALS = "image_removals"
NODES = "nodes"
BASE_IMAGES = "base_images"
TEMPLATE_IMAGES = "template_images"

STATUS_OK = 0
STATUS_SYNCING = 1
STATUS_ERROR = 2

#: Storage role base images live in (template system disks).
BASE_IMAGE_ROLE = 1

INDEXES = [
    Index(TRANSFERS, ["kind", "image_uuid", "node_uuid"], unique=True),
    Index(TRANSFERS, ["uuid"], unique=True),
    Index(TRANSFERS, ["node_uuid"]),
    Index(TRANSFERS, ["image_uuid"]),
    Index(REMOVALS, ["node_uuid"]),
]

Observer = Callable[[str, Mapping[str, Any]], None]


@attrs.frozen
class Target:
    """An image file that every node of a pool must hold."""

    kind: str
    image_uuid: str
    file_id: str
    role: int
    source: str
    #: ``algorithm:hex`` (:data:`kvmdesk.protocol.images.DIGEST`).
    digest: str
    size: int
    pool_uuid: str
    version: Optional[int] = None
    template_uuid: Optional[str] = None
    template_name: Optional[str] = None

    @classmethod
    def base_image(cls, image: Mapping[str, Any]) -> "Target":
        return cls("base", image["uuid"], image["uuid"], BASE_IMAGE_ROLE, image["file"],
                   protocol.digest_of("md5", image["md5_sum"]),
                   image["size_bytes"], image["resource_pool_uuid"])

    @classmethod
    def template_image(cls, image: Mapping[str, Any]) -> "Target":
        return cls("template", image["image_id"], image["file_id"], image["role"], image["source"],
                   protocol.recorded_digest(image),
                   image["size_bytes"], image["resource_pool_uuid"], image.get("version"), image.get("template_uuid"),
                   image.get("template_name"))

    def record(self, clock: Any, node: Mapping[str, Any]) -> dict[str, Any]:
        return new_record(
            clock, kind=self.kind, image_uuid=self.image_uuid, file_id=self.file_id, role=self.role,
            source=self.source, digest=self.digest, size_bytes=self.size, pool_uuid=self.pool_uuid, version=self.version,
            template_uuid=self.template_uuid, template_name=self.template_name, node_uuid=node["uuid"],
            status=STATUS_SYNCING, progress=0, bytes_done=0, attempts=0, error=None, force=False, node_path=None,
            next_retry_at=None,
        )


def agent_path(record: Mapping[str, Any]) -> str:
    return f"/images/{record['kind']}/{record['file_id']}"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, AgentError):
        return exc.msg
    return str(exc) or exc.__class__.__name__


class _Stalled(Exception):
    """No byte went out for ``stall_timeout`` seconds."""


class Distributor(Service):
    """Sends images to nodes; see the module docstring.

    :param link: how agents are reached; ``None``: :func:`~kvmdesk.plugins.storage.agents.agent_link`
        (looked up when needed, so tests and the nodes plugin may set it after start-up).
    :param producer_factory: builds the body of a transfer ``(path, offset, length, on_progress=,
        chunk_size=)``; tests wrap it to hold a transfer at a given byte.
    """

    name = "storage-distributor"

    def __init__(
        self,
        core: Any,
        *,
        link: Optional[AgentLink] = None,
        clock: Any = None,
        max_streams: int = 2,
        retry_initial: float = 5.0,
        retry_max: float = 300.0,
        retry_limit: int = 0,
        reconcile_interval: float = 60.0,
        stall_timeout: float = 300.0,
        chunk_size: int = 1 << 20,
        producer_factory: Callable[..., Any] = FileRangeProducer,
        direct_io: bool = False,
    ):
        self.core = core
        self._link = link
        self.clock = clock if clock is not None else core.clock
        self.max_streams = max(1, int(max_streams))
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.retry_limit = retry_limit
        self.reconcile_interval = reconcile_interval
        self.stall_timeout = stall_timeout
        self.chunk_size = chunk_size
        self.producer_factory = producer_factory
        self.direct_io = direct_io
        #: chunks read for one transfer, kept for the others sending the same file at the same time
        self.shared_reads = SharedReads()
        self.transfers = core.store.collection(TRANSFERS)
        self.observers: list[Observer] = []
        self._semaphore = defer.DeferredSemaphore(self.max_streams)
        self._tasks: dict[str, defer.Deferred] = {}
        self._timers: dict[str, Any] = {}
        self._rerun: set[str] = set()
        self._pending_progress: dict[str, tuple[int, int]] = {}
        self._progress_writes: dict[str, defer.Deferred] = {}
        self._reconcile_call: Any = None
        self._reconciling: Optional[defer.Deferred] = None
        #: Streams currently sending (for tests and the benchmark).
        self.active_streams = 0

    @property
    def link(self) -> AgentLink:
        return self._link if self._link is not None else agent_link(self.core)

    # -- service -----------------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._reconcile_tick()

    def stopService(self) -> defer.Deferred:
        super().stopService()
        return defer.ensureDeferred(self._stop())

    async def _stop(self) -> None:
        if self._reconcile_call is not None and self._reconcile_call.active():
            self._reconcile_call.cancel()
        self._reconcile_call = None
        for uuid in list(self._timers):
            self._cancel_timer(uuid)
        if self._reconciling is not None:
            await _quietly(self._reconciling)
        tasks = list(self._tasks.values())
        for d in tasks:
            d.cancel()
        for d in tasks:
            await _quietly(d)
        for d in list(self._progress_writes.values()):
            await _quietly(d)

    def _reconcile_tick(self) -> None:
        self._reconcile_call = None
        if not self.running:
            return
        if self._reconciling is None:
            self._reconciling = defer.ensureDeferred(self.reconcile())
            self._reconciling.addErrback(lambda f: log.failure("reconciling image transfers failed", f))
            self._reconciling.addBoth(self._reconciled)

    async def reconciled(self) -> None:
        """Wait for the reconciliation in progress, if any (the next one is then on the clock)."""
        if self._reconciling is not None:
            await _quietly(self._reconciling)

    def _reconciled(self, _: Any) -> None:
        self._reconciling = None
        if self.running and self.reconcile_interval > 0:
            self._reconcile_call = self.clock.callLater(self.reconcile_interval, self._reconcile_tick)

    # -- events --------------------------------------------------------------------------------------

    def _emit(self, event: str, record: Mapping[str, Any]) -> None:
        for observer in list(self.observers):
            try:
                observer(event, record)
            except Exception:
                log.failure("a transfer observer failed")

    # -- what should be where ------------------------------------------------------------------------

    async def targets(self) -> list[Target]:
        """Every image file that must be on the nodes of its pool."""
        store = self.core.store
        base = await store.collection(BASE_IMAGES).find({})
        templates = await store.collection(TEMPLATE_IMAGES).find({})
        return [*(Target.base_image(i) for i in base), *(Target.template_image(i) for i in templates)]

    async def ensure(self, targets: Iterable[Target], nodes: Iterable[Mapping[str, Any]]) -> list[dict]:
        """Create the missing transfer records of ``targets`` on the ``nodes`` of their pool; schedule them."""
        nodes_by_pool: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
        for node in nodes:
            nodes_by_pool[node.get("resource_pool_uuid")].append(node)
        created = []
        for target in targets:
            for node in nodes_by_pool.get(target.pool_uuid, []):
                try:
                    created.append(await self.transfers.insert_one(target.record(self.clock, node)))
                except DuplicateKeyError:
                    continue
        for record in created:
            self.schedule(record["uuid"])
        return created

    async def add(self, target: Target) -> list[dict]:
        """A new image: every node of its pool gets it."""
        nodes = await self.core.store.collection(NODES).find({"resource_pool_uuid": target.pool_uuid})
        return await self.ensure([target], nodes)

    async def reconcile(self, node_uuid: Optional[str] = None) -> None:
        """Bring the transfer records in line with images and nodes (all nodes, or one), and resume work."""
        store = self.core.store
        node_filter = {"uuid": node_uuid} if node_uuid else {}
        nodes = await store.collection(NODES).find(node_filter)
        node_pools = {n["uuid"]: n.get("resource_pool_uuid") for n in nodes}
        targets = await self.targets()
        wanted = {(t.kind, t.image_uuid): t for t in targets}
        records = await self.transfers.find({"node_uuid": node_uuid} if node_uuid else {})
        for record in records:
            target = wanted.get((record["kind"], record["image_uuid"]))
            pool = node_pools.get(record["node_uuid"], "\0gone")
            if target is not None and pool == target.pool_uuid:
                continue
            await self._drop(record, remove_files=pool != "\0gone")
        await self.ensure(targets, nodes)
        now = self.clock.seconds()
        for record in await self.transfers.find({"node_uuid": node_uuid} if node_uuid else {"status": {"$ne": STATUS_OK}}):
            if record["status"] == STATUS_SYNCING:
                self.schedule(record["uuid"])
            elif record["status"] == STATUS_ERROR and record.get("next_retry_at") is not None:
                self.schedule(record["uuid"], max(0.0, record["next_retry_at"] - now))
        await self.retry_removals(node_uuid)

    async def node_online(self, node_uuid: str) -> None:
        """A node came (back) online: it gets what it lacks, and its failed transfers are retried now."""
        await self.transfers.update_many(
            {"node_uuid": node_uuid, "status": STATUS_ERROR}, {"$set": {"attempts": 0, "next_retry_at": None}}
        )
        for record in await self.transfers.find({"node_uuid": node_uuid, "status": STATUS_ERROR}):
            self._cancel_timer(record["uuid"])
            await self.transfers.update_one({"uuid": record["uuid"]}, {"$set": {"status": STATUS_SYNCING}})
        await self.reconcile(node_uuid)

    # -- scheduling ----------------------------------------------------------------------------------

    def schedule(self, uuid: str, delay: float = 0.0) -> None:
        """Run the transfer ``uuid`` (after ``delay`` seconds of the clock); once at a time per transfer."""
        if not self.running:
            return
        if delay > 0:
            if uuid not in self._timers:
                self._timers[uuid] = self.clock.callLater(delay, self._timer_fired, uuid)
            return
        self._cancel_timer(uuid)
        if uuid in self._tasks:
            return
        d = self._semaphore.run(lambda: defer.ensureDeferred(self._run(uuid)))
        self._tasks[uuid] = d
        d.addBoth(self._task_done, uuid)

    def _timer_fired(self, uuid: str) -> None:
        self._timers.pop(uuid, None)
        if uuid in self._tasks:
            self._rerun.add(uuid)
        else:
            self.schedule(uuid)

    def _cancel_timer(self, uuid: str) -> None:
        timer = self._timers.pop(uuid, None)
        if timer is not None and timer.active():
            timer.cancel()

    def _task_done(self, result: Any, uuid: str) -> None:
        self._tasks.pop(uuid, None)
        if isinstance(result, defer.Failure) and not result.check(defer.CancelledError):
            log.failure("transfer {uuid} failed unexpectedly", result, uuid=uuid)
        if uuid in self._rerun:
            self._rerun.discard(uuid)
            self.schedule(uuid)

    async def resync(self, target: Target, node: Mapping[str, Any]) -> None:
        """Send ``target`` to ``node`` again (a node of its pool), creating the transfer if it had none."""
        await self.ensure([target], [node])
        transfer = await self.transfers.find_one(
            {"kind": target.kind, "image_uuid": target.image_uuid, "node_uuid": node["uuid"]})
        await self.restart(transfer["uuid"])

    async def restart(self, uuid: str, *, force: bool = True) -> None:
        """Send a transfer again now (resync): a running attempt is stopped and started over."""
        await self.transfers.update_one(
            {"uuid": uuid},
            {"$set": {"status": STATUS_SYNCING, "progress": 0, "bytes_done": 0, "attempts": 0, "error": None,
                      "force": force, "next_retry_at": None, "updated_at": now_text(self.clock)}},
        )
        self._cancel_timer(uuid)
        running = self._tasks.get(uuid)
        if running is not None:
            self._rerun.add(uuid)
            running.cancel()
        else:
            self.schedule(uuid)

    async def stop(self, uuid: str) -> None:
        """Stop a transfer (queued, waiting or running) and wait until it has stopped."""
        self._cancel_timer(uuid)
        self._rerun.discard(uuid)
        running = self._tasks.get(uuid)
        if running is not None:
            running.cancel()
            await _quietly(running)

    # -- one transfer ----------------------------------------------------------------------------------

    async def _run(self, uuid: str) -> None:
        record = await self.transfers.find_one({"uuid": uuid})
        if record is None or (record["status"] == STATUS_OK and not record.get("force")):
            return
        node = await self.core.store.collection(NODES).find_one({"uuid": record["node_uuid"]})
        if node is None:
            await self.transfers.delete_one({"uuid": uuid})
            return
        record = await self._set(uuid, status=STATUS_SYNCING, error=None, next_retry_at=None) or record
        self._emit("started", record)
        try:
            await self._transfer(record, node)
        except defer.CancelledError:
            raise
        except Exception as exc:
            await self._failed(record, exc)

    async def _transfer(self, record: dict, node: Mapping[str, Any]) -> None:
        path = agent_path(record)
        # (transfer records written before digests named their algorithm hold an md5)
        size, digest = record["size_bytes"], protocol.recorded_digest(record)
        state = await self.link.call(node, "GET", path, params={"role": record["role"], "digest": digest})
        force = bool(record.get("force"))
        if not force and state.get("exists") and state.get("digest") == digest and state.get("size") == size:
            await self._completed(record, state.get("path"))
            return
        offset = 0 if force else min(int(state.get("partial") or 0), size)
        if force:
            await self._set(record["uuid"], force=False)
        for attempt in range(3):
            try:
                result = await self._send(record, node, offset)
                break
            except AgentError as exc:
                if exc.code != protocol.OFFSET_MISMATCH.code or attempt == 2:
                    raise
                offset = min(int((exc.data or {}).get("partial") or 0), size)
        await self._completed(record, result.get("path"))

    async def _send(self, record: dict, node: Mapping[str, Any], offset: int) -> dict:
        size = record["size_bytes"]
        source = Path(record["source"])
        if not source.is_file():
            raise FileNotFoundError(f"the controller's copy {source} is missing")
        progress = _Progress(self, record["uuid"], offset, size)
        producer = self.producer_factory(source, offset, size - offset, on_progress=progress.sent,
                                         chunk_size=self.chunk_size, reactor=self.core.reactor,
                                         direct=self.direct_io, shared=self.shared_reads)
        params = {"role": record["role"], "offset": offset, "total": size,
                  "digest": protocol.recorded_digest(record)}
        if record.get("version") is not None:
            params["version"] = record["version"]
        sending = self.link.send(node, "PUT", agent_path(record), producer, params=params)
        watchdog = _Watchdog(self, progress, sending)
        self.active_streams += 1
        try:
            return await sending
        except defer.CancelledError:
            if watchdog.fired:
                raise _Stalled(f"no progress for {self.stall_timeout:g} s") from None
            raise
        finally:
            self.active_streams -= 1
            watchdog.stop()

    def _progress(self, uuid: str, done: int, percent: int) -> None:
        self._pending_progress[uuid] = (done, percent)
        if uuid not in self._progress_writes:
            d = defer.ensureDeferred(self._write_progress(uuid))
            self._progress_writes[uuid] = d
            d.addErrback(lambda f: log.failure("recording progress of {uuid} failed", f, uuid=uuid))

    async def _write_progress(self, uuid: str) -> None:
        try:
            while uuid in self._pending_progress:
                done, percent = self._pending_progress.pop(uuid)
                record = await self.transfers.find_one_and_update(
                    {"uuid": uuid, "status": STATUS_SYNCING}, {"$set": {"bytes_done": done, "progress": percent}}
                )
                if record is not None:
                    self._emit("progress", record)
        finally:
            self._progress_writes.pop(uuid, None)

    async def _settle_progress(self, uuid: str) -> None:
        self._pending_progress.pop(uuid, None)
        writing = self._progress_writes.get(uuid)
        if writing is not None:
            await _quietly(writing)

    async def _completed(self, record: dict, node_path: Optional[str]) -> None:
        await self._settle_progress(record["uuid"])
        done = await self._set(
            record["uuid"], status=STATUS_OK, progress=100, bytes_done=record["size_bytes"], error=None, attempts=0,
            force=False, node_path=node_path, next_retry_at=None,
        )
        if done is not None:
            self._emit("done", done)

    async def _failed(self, record: dict, exc: BaseException) -> None:
        await self._settle_progress(record["uuid"])
        current = await self.transfers.find_one({"uuid": record["uuid"]})
        if current is None:
            return
        attempts = int(current.get("attempts") or 0) + 1
        give_up = self.retry_limit > 0 and attempts >= self.retry_limit
        delay = min(self.retry_initial * (2 ** (attempts - 1)), self.retry_max)
        log.warn("transfer of {kind} {image} to node {node} failed (attempt {n}): {why}", kind=record["kind"],
                 image=record["image_uuid"], node=record["node_uuid"], n=attempts, why=_describe(exc))
        failed = await self._set(
            record["uuid"], status=STATUS_ERROR, error=_describe(exc)[:500], attempts=attempts,
            next_retry_at=None if give_up else self.clock.seconds() + delay,
        )
        if not give_up:
            self.schedule(record["uuid"], delay)
        if failed is not None:
            self._emit("failed", failed)

    async def _set(self, uuid: str, **fields: Any) -> Optional[dict]:
        fields["updated_at"] = now_text(self.clock)
        return await self.transfers.find_one_and_update({"uuid": uuid}, {"$set": fields})

    # -- removal -------------------------------------------------------------------------------------

    async def remove_image(self, kind: str, image_uuid: str) -> None:
        """Stop an image's transfers, delete its file on every node that may hold it, drop the records.

        Nodes that cannot be reached now are remembered and cleaned up when they are reachable again.
        """
        records = await self.transfers.find({"kind": kind, "image_uuid": image_uuid})
        for record in records:
            await self.stop(record["uuid"])
        await defer.gatherResults(
            [defer.ensureDeferred(self._drop(record, remove_files=True)) for record in records], consumeErrors=True
        )

    async def _drop(self, record: Mapping[str, Any], *, remove_files: bool) -> None:
        await self.stop(record["uuid"])
        if remove_files:
            node = await self.core.store.collection(NODES).find_one({"uuid": record["node_uuid"]})
            if node is not None:
                await self._remove_on_node(node, record["kind"], record["role"], record["file_id"])
        await self.transfers.delete_one({"uuid": record["uuid"]})

    async def _remove_on_node(self, node: Mapping[str, Any], kind: str, role: int, file_id: str) -> bool:
        try:
            await self.link.call(node, "DELETE", f"/images/{kind}/{file_id}", params={"role": role})
            return True
        except defer.CancelledError:
            raise
        except Exception as exc:
            log.warn("could not remove {kind} {file} from node {node} now ({why}); will retry", kind=kind,
                     file=file_id, node=node["uuid"], why=_describe(exc))
            await self.core.store.collection(REMOVALS).update_one(
                {"node_uuid": node["uuid"], "kind": kind, "file_id": file_id},
                {"$set": {"role": role, "updated_at": now_text(self.clock)}}, upsert=True,
            )
            return False

    async def retry_removals(self, node_uuid: Optional[str] = None) -> None:
        removals = self.core.store.collection(REMOVALS)
        pending = await removals.find({"node_uuid": node_uuid} if node_uuid else {})
        for item in pending:
            node = await self.core.store.collection(NODES).find_one({"uuid": item["node_uuid"]})
            if node is None or await self._remove_on_node(node, item["kind"], item["role"], item["file_id"]):
                await removals.delete_one({"node_uuid": item["node_uuid"], "kind": item["kind"],
                                           "file_id": item["file_id"]})


class _Progress:
    """Turns bytes sent into a stored percentage, written only when the whole percent changes."""

    def __init__(self, distributor: Distributor, uuid: str, offset: int, size: int):
        self.distributor = distributor
        self.uuid = uuid
        self.offset = offset
        self.size = max(1, size)
        self.percent = offset * 100 // self.size
        self.last_activity = distributor.clock.seconds()

    def sent(self, count: int) -> None:
        self.last_activity = self.distributor.clock.seconds()
        done = self.offset + count
        # 100 is reported only once the agent has verified the file.
        percent = min(99, done * 100 // self.size)
        if percent > self.percent:
            self.percent = percent
            self.distributor._progress(self.uuid, done, percent)


class _Watchdog:
    """Cancels a transfer whose stream made no progress for ``stall_timeout`` seconds of the clock."""

    def __init__(self, distributor: Distributor, progress: _Progress, sending: defer.Deferred):
        self.distributor = distributor
        self.progress = progress
        self.sending = sending
        self.fired = False
        self.call = None
        if distributor.stall_timeout > 0:
            self.call = distributor.clock.callLater(distributor.stall_timeout, self._check)

    def _check(self) -> None:
        timeout = self.distributor.stall_timeout
        idle = self.distributor.clock.seconds() - self.progress.last_activity
        if idle >= timeout:
            self.call = None
            self.fired = True
            self.sending.cancel()
        else:
            self.call = self.distributor.clock.callLater(timeout - idle, self._check)

    def stop(self) -> None:
        if self.call is not None and self.call.active():
            self.call.cancel()
        self.call = None


async def _quietly(d: defer.Deferred) -> None:
    try:
        await d
    except BaseException:
        pass
