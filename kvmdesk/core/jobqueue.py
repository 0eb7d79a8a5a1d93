"""Persisted jobs: long or node-wide work with an id, a state, progress and per-item results.

The :class:`JobService` is ``core.jobs``.  A plugin declares a kind of job once (in
``kvmdesk_configure``)::

    core.jobs.register("template.publish", publish, on_restart="resume")

    async def publish(core, job):              # job: a Job (below)
        await job.for_each(send_to_node)        # runs the items not finished yet; progress saved
        return {"version": 3}                   # kept as the job's ``result``

and starts one with ``await core.jobs.submit(kind, title=..., items=[{"uuid", "name", ...}], params={})``
(answers the record at once) or ``await core.jobs.run(...)`` (waits for the end).  A batch endpoint
is one line: ``return await core.jobs.run_items(req, "pool.delete", refs, delete_one)`` answers what
:func:`kvmdesk.core.jobs.run_batch` answers, plus ``job_id``.

A job record (collection ``jobs``; ``GET /api/v1.0/jobs/{uuid}``)::

    {uuid, kind, title, state, progress (0-100), total, done, success_num, failed_num,
     items: [{uuid, name, state, code, msg, result (what a successful operation said, if anything),
     ...the item's own fields}], params, result, error,
     admin, created_at, started_at, finished_at, resumed}

``state`` is ``running`` (a job starts as it is stored), then one of ``succeeded``, ``failed`` (every item failed, or the
runner raised), ``partial`` (some items failed), ``cancelled`` or ``interrupted``.

After a controller restart (:meth:`JobService.startService`) a job left ``running`` is run
again if its kind was registered with ``on_restart="resume"`` (its runner sees the items already
finished and :meth:`Job.for_each` skips them), otherwise it is ``interrupted``: its unfinished items
and the job carry :data:`JOB_INTERRUPTED` ("interrupted by a controller restart"), its finished items
keep their results.  Nothing stays ``running`` forever.  ``stopService`` lets the items in progress
finish, starts no further item, and leaves the job for the next start to resume or fail.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Literal, Mapping, Optional, Sequence

import attrs
import orjson
from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.logger import Logger

from kvmdesk.core import errors
from kvmdesk.core.errors import ApiError
from kvmdesk.core.jobs import apply_each, batch_answer, identity
from kvmdesk.core.records import format_time, new_record
from kvmdesk.core.store import Index

if TYPE_CHECKING:  # pragma: no cover
    from kvmdesk.core.routing import RequestLike

log = Logger(namespace="kvmdesk.jobqueue")

COLLECTION = "jobs"
INDEXES = [
    Index(COLLECTION, ["uuid"], unique=True),
    Index(COLLECTION, ["state"]),
    Index(COLLECTION, ["kind"]),
    Index(COLLECTION, ["finished_time"]),
]
ACTIVE = ("queued", "running")
FINISHED = ("succeeded", "failed", "partial", "cancelled", "interrupted")
#: Item states; ``pending`` items are the ones a resumed job still runs.
ITEM_PENDING, ITEM_SUCCEEDED, ITEM_FAILED = "pending", "succeeded", "failed"
ITEM_CANCELLED, ITEM_INTERRUPTED = "cancelled", "interrupted"
#: Fields of an item that the job service owns (an item's own fields must not use them).
ITEM_STATUS_FIELDS = ("state", "code", "msg", "result")
#: Fields of a job record that change while it runs (written by every progress save).
MUTABLE = ("state", "progress", "done", "success_num", "failed_num", "items", "result", "error", "started_at",
           "finished_at", "finished_time", "updated_at", "cancel_requested", "resumed")
#: Filterable fields of the job list (``GET /jobs``).
SEARCH_FIELDS = {"uuid": str, "kind": str, "state": str, "title": str, "admin": str}
RESOURCE = errors.Resource("任务", "job")

JOB_INTERRUPTED = errors.define(
    1062, 503, "任务因控制器重启或停止而中断", "interrupted by a controller restart")
JOB_CANCELLED = errors.define(1063, 409, "任务已取消", "cancelled")
JOB_FINISHED = errors.define(1064, 409, "任务已结束, 不能取消: {uuid}", "the job has finished and cannot be cancelled: {uuid}")

Runner = Callable[[Any, "Job"], Awaitable[Any]]
OnRestart = Literal["resume", "fail"]


@attrs.frozen
class JobKind:
    """A registered kind of job: its runner and what a restart does to it."""

    name: str
    runner: Runner
    on_restart: OnRestart = "fail"


def jsonable(value: Any) -> Any:
    """``value`` if the store can keep it as it is, else its ``repr`` (a result must never fail a save)."""
    try:
        orjson.dumps(value)
    except TypeError:
        return repr(value)
    return value


def item_record(item: Any) -> dict[str, Any]:
    """A job item from a batch item: a mapping keeps its fields, anything else is its uuid."""
    if isinstance(item, Mapping):
        clash = [f for f in ITEM_STATUS_FIELDS if f in item]
        if clash:
            raise ValueError(f"job items must not carry {', '.join(clash)} (the job service owns them)")
        record = dict(item)
    else:
        record = {"uuid": str(item)}
    record.setdefault("name", None)
    record.update(state=ITEM_PENDING, code=None, msg=None)
    return record


def error_of(exc: ApiError, lang: str) -> dict[str, Any]:
    return {"code": exc.error.code, "msg": exc.message(lang)}


@attrs.define(eq=False)
class Job:
    """A job while it runs, as its runner sees it.

    :ivar record: the job record (kept in memory, saved as it changes).
    :ivar errors: the :class:`ApiError` of each failed item, by index in ``items`` (this run only).
    """

    service: "JobService"
    record: dict[str, Any]
    runner: Runner
    errors: dict[int, ApiError] = attrs.field(factory=dict)
    #: What successful items' operations said (non-empty mappings), by index in ``items`` (this run only).
    results: dict[int, Mapping[str, Any]] = attrs.field(factory=dict)
    finished: defer.Deferred = attrs.field(factory=defer.Deferred)
    #: How many times the record was written during this run (items that finish during a write share
    #: the next one).
    saves: int = 0
    _dirty: bool = False
    _writing: bool = False
    _timer: Any = None
    _last_save: float = float("-inf")
    _flush_waiters: list = attrs.field(factory=list)

    @property
    def uuid(self) -> str:
        return self.record["uuid"]

    @property
    def params(self) -> dict[str, Any]:
        return self.record["params"]

    @property
    def items(self) -> list[dict[str, Any]]:
        return self.record["items"]

    @property
    def cancel_requested(self) -> bool:
        return bool(self.record.get("cancel_requested"))

    def keep_going(self) -> bool:
        """``False`` once the job is cancelled or the controller is stopping: start no further work."""
        return not self.cancel_requested and not self.service.stopping

    def pending_items(self) -> list[dict[str, Any]]:
        """The items not finished yet (all of them on a first run)."""
        return [item for item in self.items if item["state"] == ITEM_PENDING]

    async def for_each(self, operation: Callable[[dict[str, Any]], Awaitable[Any]],
                       *, concurrency: Optional[int] = None) -> None:
        """Run ``operation`` on every pending item (at most ``concurrency`` at once: the job's by
        default), recording each item's result and the job's progress as items finish.

        An :class:`ApiError` fails its item with its code and message; any other exception is logged
        and fails the item as an internal error.  Once the job is cancelled no further item starts
        and the items left are ``cancelled``; when the controller stops they stay ``pending``.
        """
        pending = self.pending_items()
        index = {id(item): position for position, item in enumerate(self.items)}
        limit = concurrency if concurrency is not None else self.record.get("concurrency") or 1
        await apply_each(pending, operation, request_id=self.record.get("request_id") or self.uuid,
                         concurrency=limit, keep_going=self.keep_going,
                         on_done=lambda item, error, said: self.item_finished(index[id(item)], error, said))
        if self.cancel_requested and not self.service.stopping:
            for item in self.pending_items():
                self.item_finished(index[id(item)], ApiError(JOB_CANCELLED), state=ITEM_CANCELLED)
        await self.flush()

    def item_finished(self, position: int, error: Optional[ApiError], said: Any = None, *,
                      state: Optional[str] = None) -> None:
        """Record the outcome of ``items[position]`` (saved soon after, with others that finish meanwhile);
        what a successful operation said (a non-empty mapping) is kept as the item's ``result``."""
        item, record = self.items[position], self.record
        if error is None:
            item.update(state=state or ITEM_SUCCEEDED, code=errors.SUCCESS.code, msg=None)
            if isinstance(said, Mapping) and said:
                item["result"] = jsonable(dict(said))
                self.results[position] = said
            record["success_num"] += 1
        else:
            item.update(state=state or ITEM_FAILED, **error_of(error, record["lang"]))
            record["failed_num"] += 1
            self.errors[position] = error
        record["done"] += 1
        record["progress"] = math.floor(record["done"] * 100 / max(1, record["total"]))
        self.changed()

    def set_progress(self, percent: float) -> None:
        """Progress of a job without items (0-100); saved soon after."""
        self.record["progress"] = max(0, min(100, int(percent)))
        self.changed()

    # -- saving: one write at a time, at most one every [jobs] save_interval seconds (a flush at once);
    #    whatever changes meanwhile goes in the next write, so 500 items never mean 500 writes --------

    def changed(self) -> None:
        """Note a change; it is saved within ``[jobs] save_interval`` seconds."""
        self._dirty = True
        if self._writing or self._timer is not None:
            return
        wait = self._last_save + self.service.save_interval - self.service.clock.seconds()
        if wait > 0 and not self._flush_waiters:
            self._timer = self.service.clock.callLater(wait, self._timer_fired)
            return
        # a flag, not the Deferred: the loop may finish before ensureDeferred returns
        self._writing = True
        defer.ensureDeferred(self._write_loop())

    def _timer_fired(self) -> None:
        self._timer = None
        self.changed()

    def flush(self) -> defer.Deferred:
        """Save the record now; fires once what changed so far is written."""
        waiter: defer.Deferred = defer.Deferred()
        self._flush_waiters.append(waiter)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.changed()
        return waiter

    async def _write_loop(self) -> None:
        collection, clock = self.service.collection, self.service.clock
        written: list[defer.Deferred] = []
        try:
            while self._dirty and (self._flush_waiters or clock.seconds() >= self._last_save + self.service.save_interval):
                self._dirty = False
                waiters, self._flush_waiters = self._flush_waiters, []
                self._last_save = clock.seconds()
                self.record["updated_at"] = format_time(self._last_save)
                # a copy: the SQLite writer thread encodes it while items keep finishing here
                snapshot = {k: self.record.get(k) for k in MUTABLE}
                snapshot["items"] = [dict(item) for item in self.items]
                self.saves += 1
                try:
                    await collection.update_one({"uuid": self.uuid}, {"$set": snapshot})
                except Exception:
                    log.failure("could not save the progress of job {uuid}", uuid=self.uuid)
                written.extend(waiters)
        finally:
            self._writing = False
        if self._dirty:
            self.changed()  # changed during the last write: saved after the interval
        # told last, so that whoever waited sees the saver at rest
        for waiter in written:
            waiter.callback(None)

    def snapshot(self) -> dict[str, Any]:
        """A copy of the record as it is now."""
        return {**self.record, "items": [dict(item) for item in self.items]}

    def done(self) -> defer.Deferred:
        """Fires with the record once this run of the job has ended (finished, or stopped by shutdown)."""
        waiter: defer.Deferred = defer.Deferred()
        if self.finished.called:
            waiter.callback(self.snapshot())
        else:
            self.finished.addBoth(lambda result: (waiter.callback(self.snapshot()), result)[1])
        return waiter


@attrs.define(eq=False)
class JobService(Service):
    """Runs jobs, keeps their records, and resumes or fails those a restart interrupted.

    :param core: gives runners the core; its ``store``, ``clock`` and ``config`` (``[jobs]``) are used.
    """

    core: Any
    kinds: dict[str, JobKind] = attrs.field(factory=dict)
    #: Jobs running in this process, by uuid.
    active: dict[str, Job] = attrs.field(factory=dict)
    stopping: bool = False
    #: Fires once the jobs a previous run left unfinished are resumed (started) or marked interrupted.
    recovered: Optional[defer.Deferred] = None
    #: The last sweep for old jobs (tests wait for it).
    pruning: Optional[defer.Deferred] = None
    _tasks: set = attrs.field(factory=set)
    _prune_loop: Optional[task.LoopingCall] = None
    name = "jobs"

    @property
    def collection(self) -> Any:
        return self.core.store.collection(COLLECTION)

    @property
    def clock(self) -> Any:
        return self.core.clock

    @property
    def save_interval(self) -> float:
        return self.core.config.number("jobs.save_interval", 1.0)

    def register(self, kind: str, runner: Runner, *, on_restart: OnRestart = "fail") -> None:
        """Declare a kind of job.

        :param runner: ``async (core, job) -> result``; ``job`` is a :class:`Job`.  What it returns is
            kept as the record's ``result``; an :class:`ApiError` it raises fails the job with that error.
            A runner without items that sees ``job.keep_going()`` turn ``False`` while the controller
            stops raises ``ApiError(JOB_INTERRUPTED)``: the job is then left for the next start.
        :param on_restart: ``"resume"``: run it again after a restart (the runner must be idempotent;
            :meth:`Job.for_each` skips finished items); ``"fail"``: mark it ``interrupted``.
        """
        if on_restart not in ("resume", "fail"):
            raise ValueError(f"on_restart must be 'resume' or 'fail', not {on_restart!r}")
        if kind in self.kinds and self.kinds[kind].runner is not runner:
            raise ValueError(f"job kind {kind!r} is already registered")
        self.kinds[kind] = JobKind(kind, runner, on_restart)

    async def submit(self, kind: str, *, title: str, items: Sequence[Any] = (), params: Optional[Mapping] = None,
                     admin: Optional[str] = None, concurrency: Optional[int] = None, lang: str = "zh",
                     request_id: Optional[str] = None, runner: Optional[Runner] = None) -> dict[str, Any]:
        """Persist a new job and start it; answers its record (``running``) at once.

        :param items: ``{"uuid", "name", ...}`` mappings (or bare uuids): what per-item results are about.
        :param concurrency: items run at once by :meth:`Job.for_each` (default ``[jobs] concurrency``).
        :param lang: language of the items' stored messages (``zh`` or ``en``).
        :param runner: run this instead of the kind's registered runner (such a job cannot resume
            after a restart: it is ``interrupted``).
        """
        job = await self._submit(kind, title=title, items=items, params=params, admin=admin,
                                 concurrency=concurrency, lang=lang, request_id=request_id, runner=runner)
        return job.snapshot()

    async def run(self, kind: str, **kwargs: Any) -> dict[str, Any]:
        """:meth:`submit`, then :meth:`wait`: answers the finished record."""
        job = await self._submit(kind, **kwargs)
        return await job.done()

    async def wait(self, job_id: str) -> dict[str, Any]:
        """The record once the job has ended here (at once for a finished job).

        :raises ApiError: no such job (404).
        """
        job = self.active.get(job_id)
        if job is not None:
            return await job.done()
        return await self.get(job_id)

    async def get(self, job_id: str) -> dict[str, Any]:
        """The record as it is now (a running job's from memory: fresher than the store).

        :raises ApiError: no such job (404).
        """
        job = self.active.get(job_id)
        if job is not None:
            return job.snapshot()
        record = await self.collection.find_one({"uuid": job_id})
        if record is None:
            raise ApiError(errors.NOT_FOUND, resource=RESOURCE, key=job_id)
        return record

    async def cancel(self, job_id: str) -> dict[str, Any]:
        """Ask a job to stop: no further item starts; the items left end ``cancelled``.

        Cooperative: a runner without items stops where it checks :meth:`Job.keep_going`.

        :raises ApiError: no such job (404); the job has already ended (409).
        """
        record = await self.get(job_id)
        if record["state"] in FINISHED:
            raise ApiError(JOB_FINISHED, uuid=job_id)
        job = self.active.get(job_id)
        if job is None:
            # queued or running in another controller process (or not resumed yet): it reads the flag
            await self.collection.update_one({"uuid": job_id}, {"$set": {"cancel_requested": True}})
            return {**record, "cancel_requested": True}
        job.record["cancel_requested"] = True
        await job.flush()
        return job.snapshot()

    async def run_items(self, req: "RequestLike", kind: str, items: Sequence[Any],
                        operation: Optional[Callable[[Any], Awaitable[Any]]] = None, *, concurrency: int = 1,
                        title: Optional[str] = None, params: Optional[Mapping] = None) -> dict[str, Any]:
        """Run a batch as a job and answer as :func:`kvmdesk.core.jobs.run_batch` does, plus ``job_id``.

        ``operation`` gets each item as given.  Without ``operation`` the kind's registered runner runs
        the job (the items, mappings, are stored whole): a kind registered ``on_restart="resume"`` then
        resumes after a restart.  With one item its failure is raised as the answer.

        :raises ApiError: no items; the single item failed; the controller stopped before the end.
        """
        if not items:
            raise ApiError(errors.BATCH_EMPTY)
        given = list(items)

        async def one_off(core: Any, job: Job) -> None:
            originals = {id(record): item for record, item in zip(job.items, given)}
            await job.for_each(lambda record: operation(originals[id(record)]))  # type: ignore[misc]

        admin = (req.admin or {}).get("username")
        # a one-off operation gets the item itself: the job keeps each item's uuid and name only
        runner = one_off if operation is not None else None
        stored = given if runner is None else [identity(item) for item in given]
        job = await self._submit(kind, title=title or kind, items=stored, params=params, admin=admin,
                                 concurrency=concurrency, lang=req.lang, request_id=req.request_id, runner=runner)
        record = await job.done()
        if record["state"] not in FINISHED:
            raise ApiError(JOB_INTERRUPTED)
        answer = batch_answer(req, given, [(given[i], job.errors[i]) for i in sorted(job.errors)],
                              [(given[i], job.results[i]) for i in sorted(job.results)])
        answer["job_id"] = job.uuid
        return answer

    # -- running ---------------------------------------------------------------------------------

    async def _submit(self, kind: str, *, title: str, items: Sequence[Any] = (), params: Optional[Mapping] = None,
                      admin: Optional[str] = None, concurrency: Optional[int] = None, lang: str = "zh",
                      request_id: Optional[str] = None, runner: Optional[Runner] = None) -> Job:
        registered = self.kinds.get(kind)
        if runner is None:
            if registered is None:
                raise ValueError(f"unknown job kind {kind!r} (register it first)")
            runner = registered.runner
        records = [item_record(item) for item in items]
        if concurrency is None:
            concurrency = int(self.core.config.get("jobs.concurrency", 4))
        record = new_record(
            # it starts at once: inserted running (one write fewer than queued-then-running)
            self.clock, kind=kind, title=title, state="running", progress=0, total=len(records), done=0,
            success_num=0, failed_num=0, items=records, params=dict(params or {}), result=None, error=None,
            admin=admin, lang=lang, request_id=request_id, concurrency=max(1, concurrency),
            started_at=format_time(self.clock.seconds()),
            finished_at=None, finished_time=None, cancel_requested=False, resumed=0,
            # a one-off runner (run_items' closure) is gone after a restart: such a job cannot resume
            custom_runner=registered is None or runner is not registered.runner,
        )
        record = await self.collection.insert_one(record)
        job = Job(self, record, runner)
        self._start(job)
        return job

    def _start(self, job: Job) -> None:
        self.active[job.uuid] = job
        running = defer.ensureDeferred(self._execute(job))
        self._tasks.add(running)
        running.addBoth(lambda _: self._tasks.discard(running))

    async def _execute(self, job: Job) -> None:
        record = job.record
        try:
            stopped_early = False
            try:
                result = await job.runner(self.core, job)
            except ApiError as exc:
                stopped_early = exc.error is JOB_INTERRUPTED and self.stopping
                record["error"] = None if stopped_early else error_of(exc, record["lang"])
            except Exception:
                log.failure("job {uuid} ({kind}) failed", uuid=job.uuid, kind=record["kind"])
                internal = ApiError(errors.INTERNAL_ERROR, request_id=record.get("request_id") or job.uuid)
                record["error"] = error_of(internal, record["lang"])
            else:
                record["result"] = jsonable(result)
            if self.stopping and (stopped_early or job.pending_items()):
                log.info("job {uuid} stopped with the controller; the next start resumes or fails it", uuid=job.uuid)
            else:
                self._finish(record)
            await job.flush()
        finally:
            self.active.pop(job.uuid, None)
            job.finished.callback(None)

    def _finish(self, record: dict[str, Any]) -> None:
        if record["error"] is not None:
            state = "failed"
        elif record.get("cancel_requested") and any(i["state"] == ITEM_CANCELLED for i in record["items"]):
            state = "cancelled"
        elif record["failed_num"] and record["success_num"]:
            state = "partial"
        elif record["failed_num"]:
            state = "failed"
        else:
            state = "succeeded"
        now = self.clock.seconds()
        record.update(state=state, finished_at=format_time(now), finished_time=now)
        if state == "succeeded":
            record["progress"] = 100

    # -- restart, retention ------------------------------------------------------------------------

    async def recover(self) -> None:
        """Resume or fail every job a previous run of the controller left unfinished."""
        for record in await self.collection.find({"state": {"$in": list(ACTIVE)}}, sort=[("id", 1)]):
            if record["uuid"] in self.active:
                continue
            kind = self.kinds.get(record["kind"])
            if kind is not None and kind.on_restart == "resume" and not record.get("custom_runner"):
                record["resumed"] = record.get("resumed", 0) + 1
                log.info("resuming job {uuid} ({kind}) after a restart", uuid=record["uuid"], kind=record["kind"])
                self._start(Job(self, record, kind.runner))
            else:
                await self._interrupt(record)

    async def _interrupt(self, record: dict[str, Any]) -> None:
        lang = record.get("lang", "zh")
        reason = error_of(ApiError(JOB_INTERRUPTED), lang)
        for item in record["items"]:
            if item["state"] == ITEM_PENDING:
                item.update(state=ITEM_INTERRUPTED, **reason)
                record["failed_num"] += 1
        now = self.clock.seconds()
        record.update(state="interrupted", error=reason, finished_at=format_time(now), finished_time=now,
                      updated_at=format_time(now))
        log.warn("job {uuid} ({kind}) was interrupted by a controller restart", uuid=record["uuid"], kind=record["kind"])
        await self.collection.update_one({"uuid": record["uuid"]}, {"$set": {k: record.get(k) for k in MUTABLE}})

    async def prune(self) -> int:
        """Delete jobs that finished more than ``[jobs] retention_days`` ago (0 keeps them all)."""
        days = self.core.config.number("jobs.retention_days", 30)
        if not days:
            return 0
        cutoff = self.clock.seconds() - days * 86400
        return await self.collection.delete_many({"state": {"$in": list(FINISHED)}, "finished_time": {"$lt": cutoff}})

    async def _prune_round(self) -> None:
        try:
            await self.prune()
        except Exception:
            log.failure("could not delete old jobs")

    def _start_prune(self) -> None:
        self.pruning = self._track(self._prune_round(), "pruning old jobs")

    def _track(self, work: Awaitable[Any], what: str) -> defer.Deferred:
        running = defer.ensureDeferred(work)
        running.addErrback(lambda failure: log.failure("{what} failed", failure, what=what))
        self._tasks.add(running)
        running.addBoth(lambda _: self._tasks.discard(running))
        return running

    def startService(self) -> None:
        super().startService()
        self.stopping = False
        recovering = self._track(self.recover(), "resuming interrupted jobs")
        self.recovered = defer.Deferred()
        recovering.addBoth(lambda _: self.recovered.callback(None))
        self._prune_loop = task.LoopingCall(self._start_prune)
        self._prune_loop.clock = self.clock
        self._prune_loop.start(self.core.config.number("jobs.prune_interval", 3600.0, minimum=1), now=True)

    def stopService(self) -> defer.Deferred:
        """Start no further item; wait for the items and runners in progress (see the module doc)."""
        super().stopService()
        self.stopping = True
        if self._prune_loop is not None and self._prune_loop.running:
            self._prune_loop.stop()
        self._prune_loop = None
        return defer.gatherResults(list(self._tasks), consumeErrors=True).addCallback(lambda _: None)
