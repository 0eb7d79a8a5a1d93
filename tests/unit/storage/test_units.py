"""Smaller pieces: format rules, os_type_simple, the hashing writer, the file producer, retry backoff."""
from __future__ import annotations

import hashlib
import os
import threading

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, threads
from twisted.internet.task import deferLater

from kvmdesk.core.errors import ApiError
from kvmdesk.core import filewriter
from kvmdesk.core.filewriter import HIGH_WATER, WRITE_BEHIND, HashingWriter
from kvmdesk.plugins.storage.agents import AgentUnreachable
from kvmdesk.plugins.storage.formats import check_base_image, image_problem
from kvmdesk.plugins.storage.ostypes import os_type_simple
from kvmdesk.core.directio import RangeReader
from kvmdesk.plugins.storage import producers
from kvmdesk.plugins.storage.producers import FileRangeProducer, SharedReads, SourceChanged
from storage_testlib import add_node, controller, iso_bytes, small_qcow2, with_timeout


@pytest.mark.parametrize("info, size, head, problem", [
    ({"format": "qcow2"}, 1000, b"", None),
    ({"format": "raw"}, 1 << 20, b"\0" * 0x9000, None),
    ({"format": "vmdk"}, 1 << 20, b"", "vmdk"),
    ({"format": "qcow2", "backing-filename": "/etc/shadow"}, 1000, b"", "backing"),
    ({"format": "qcow2", "format-specific": {"data": {"data-file": "/dev/sda"}}}, 1000, b"", "data file"),
    ({"format": "raw"}, 1000, b"", "sectors"),
    ({"format": "raw"}, 0x9000 * 2, iso_bytes(0x9000), "ISO"),
])
def test_image_rules(info, size, head, problem):
    found = image_problem(info, size, head)
    assert found is None if problem is None else problem in found


@pytest_twisted.ensureDeferred
async def test_qemu_img_checks_real_files(tmp_path):
    image = small_qcow2(tmp_path / "ok.qcow2")
    checked = await check_base_image(image, image.stat().st_size, image.read_bytes()[:0x9000], reactor=reactor)
    assert checked == {"format": "qcow2", "virtual_size": 16 << 20}
    with pytest.raises(ApiError) as missing:
        await check_base_image(image, 1, b"", reactor=reactor, qemu_img="/nonexistent/qemu-img")
    assert missing.value.error.code in (4005, 4012)


@pytest.mark.parametrize("os_type, simple", [
    ("Windows 7 bit 64", "win7"), ("Windows7(64bit)", "win7"), ("windows10", "win10"), ("Windows XP", "winxp"),
    ("Windows Server 2008 R2", "win2008"), ("Ubuntu 22.04", "ubuntu"), ("CentOS 7.9", "centos"),
    ("银河麒麟 V10", "kylin"), ("Linux", "linux"), ("Plan 9", "other"),
])
def test_os_type_simple(os_type, simple):
    assert os_type_simple(os_type) == simple


async def write_and_check(path, chunks, **options) -> HashingWriter:
    """Write ``chunks`` through a new HashingWriter into a new file; check the file, its MD5 and the count."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    writer = HashingWriter(fd, reactor=reactor, **options)
    for chunk in chunks:
        writer.write(chunk)
    await writer.flush()
    os.close(fd)
    whole = b"".join(chunks)
    assert path.read_bytes() == whole and writer.hexdigest() == hashlib.md5(whole).hexdigest()
    assert writer.written == len(whole)
    return writer


@pytest.mark.parametrize("threaded", [False, True])
@pytest_twisted.ensureDeferred
async def test_hashing_writer_writes_and_hashes_in_order(tmp_path, threaded):
    await write_and_check(tmp_path / "out", [os.urandom(1000 + i) for i in range(300)], threaded=threaded)


@pytest_twisted.ensureDeferred
async def test_threaded_writer_keeps_order_when_its_threads_take_turns(tmp_path, monkeypatch):
    monkeypatch.setattr(filewriter, "DRAIN_PASS", 10_000)  # a thread gives its pool thread back every ~5 chunks
    requeued = []
    real_start = filewriter.OrderedDrain._start
    monkeypatch.setattr(filewriter.OrderedDrain, "_start", lambda drain: (requeued.append(1), real_start(drain)))
    chunks = [os.urandom(2000 + i) for i in range(400)]
    await write_and_check(tmp_path / "out", chunks, threaded=True)
    # A turn ends after at least 10,000 bytes, at most one chunk more: both drains took many turns.
    assert len(requeued) >= 2 * (sum(map(len, chunks)) // (10_000 + max(map(len, chunks))))


@pytest_twisted.ensureDeferred
async def test_threaded_writer_without_hashing_only_writes(tmp_path):
    path = tmp_path / "out"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    writer = HashingWriter(fd, reactor=reactor, threaded=True, hashing=False)
    for i in range(50):
        writer.write(bytes([i]) * 5000)
    await writer.flush()
    os.close(fd)
    assert path.read_bytes() == b"".join(bytes([i]) * 5000 for i in range(50)) and writer.hexdigest() is None


def stalled_writer(chunk: bytes) -> tuple[int, int, HashingWriter, list[str], int]:
    """A threaded writer into a pipe nobody reads yet (a disk that has stopped: the writing thread
    blocks in os.write), given more than HIGH_WATER bytes of ``chunk``; it has paused the network."""
    read_end, write_end = os.pipe()
    events = []
    writer = HashingWriter(write_end, reactor=reactor, threaded=True, pause=lambda: events.append("pause"),
                           resume=lambda: events.append("resume"))
    count = HIGH_WATER // len(chunk) + 4
    for _ in range(count):
        writer.write(chunk)
    assert events == ["pause"]
    return read_end, write_end, writer, events, count


@pytest_twisted.ensureDeferred
async def test_threaded_writer_pauses_the_network_when_the_disk_falls_behind(tmp_path):
    chunk = os.urandom(1 << 20)
    read_end, write_end, writer, events, count = stalled_writer(chunk)
    received = bytearray()
    reader = threading.Thread(daemon=True, target=lambda: [received.extend(block) for block in iter(
        lambda: os.read(read_end, 1 << 20), b"")])
    reader.start()  # the disk catches up
    await with_timeout(defer.ensureDeferred(writer.flush()))
    assert events == ["pause", "resume"]
    os.close(write_end)
    await with_timeout(threads.deferToThread(reader.join))
    os.close(read_end)
    assert bytes(received) == chunk * count
    assert writer.written == len(chunk) * count and writer.hexdigest() == hashlib.md5(chunk * count).hexdigest()


@pytest_twisted.ensureDeferred
async def test_threaded_writer_stops_at_the_first_write_error_and_resumes_the_network(tmp_path):
    chunk = b"x" * (1 << 20)
    read_end, write_end, writer, events, _ = stalled_writer(chunk)
    os.close(read_end)  # the blocked os.write now fails with EPIPE (Python ignores SIGPIPE)
    with pytest.raises(BrokenPipeError):
        await with_timeout(defer.ensureDeferred(writer.flush()))
    assert events == ["pause", "resume"] and not writer.pending
    with pytest.raises(BrokenPipeError):
        writer.write(chunk)
    os.close(write_end)


@pytest.mark.parametrize("threaded", [False, True])
@pytest.mark.parametrize("write_behind", [False, True])
@pytest_twisted.ensureDeferred
async def test_write_behind_starts_writeback_as_the_file_grows(tmp_path, monkeypatch, threaded, write_behind):
    real = filewriter._sync_file_range_call
    assert real is not None, "glibc's sync_file_range should be found on Linux"
    calls = []

    def spy(fd, offset, length, flags):
        calls.append((fd, offset, length, flags))
        return real(fd, offset, length, flags)

    monkeypatch.setattr(filewriter, "_sync_file_range_call", spy)
    path = tmp_path / "out"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    writer = HashingWriter(fd, reactor=reactor, threaded=threaded, write_behind=write_behind)
    chunk = os.urandom(1 << 20)
    for _ in range(3 * WRITE_BEHIND // len(chunk)):
        writer.write(chunk)
        await writer.flush()  # one chunk per batch, so the count below does not depend on timing
    assert calls == ([(fd, 0, 0, 2)] * 3 if write_behind else [])
    assert real(fd, 0, 0, 2) == 0  # the real call accepts these arguments
    os.close(fd)
    assert path.stat().st_size == 3 * WRITE_BEHIND


@pytest_twisted.ensureDeferred
async def test_hashing_writer_reports_write_errors(tmp_path):
    fd = os.open(tmp_path / "out", os.O_RDONLY | os.O_CREAT)
    writer = HashingWriter(fd, reactor=reactor, threaded=True)
    writer.write(b"data")
    with pytest.raises(OSError):
        await writer.flush()
    os.close(fd)


class Collect:
    def __init__(self):
        self.data = bytearray()

    def write(self, data):
        self.data += data


@pytest.mark.parametrize("direct", [False, True])
@pytest_twisted.ensureDeferred
async def test_file_range_producer_sends_a_range_and_reports_progress(tmp_path, direct):
    path = tmp_path / "f"
    content = os.urandom(3_500_000)
    path.write_bytes(content)
    seen = []
    consumer = Collect()
    # An offset and a chunk size that are no whole number of blocks (direct reads are aligned inside).
    producer = FileRangeProducer(path, 1_000_000, 2_000_000, on_progress=seen.append, chunk_size=300_000,
                                 direct=direct)
    assert producer.length == 2_000_000
    await with_timeout(producer.startProducing(consumer))
    assert bytes(consumer.data) == content[1_000_000:3_000_000]
    assert seen[-1] == 2_000_000 and seen == sorted(seen) and len(seen) == 7

    short = FileRangeProducer(path, 3_000_000, 900_000, chunk_size=300_000, direct=direct)
    with pytest.raises(SourceChanged):
        await with_timeout(short.startProducing(Collect()))


class WatchedReader(RangeReader):
    """A range reader that records the thread of each read and when it is closed; ``gate`` (if set)
    holds a read on its thread until the test sets it."""

    instances: list["WatchedReader"] = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.threads: list[int] = []
        self.reads_done = 0
        self.closed_after: int | None = None
        self.gate: threading.Event | None = None
        self.read_started = threading.Event()
        self.progress = threading.Condition()
        WatchedReader.instances.append(self)

    def reads(self, count: int) -> defer.Deferred:
        """Fires (on the reactor) once ``count`` reads have finished on their threads."""
        def wait() -> None:
            with self.progress:
                assert self.progress.wait_for(lambda: self.reads_done >= count, 30)
        return threads.deferToThread(wait)

    def read(self, offset, size):
        self.threads.append(threading.get_ident())
        self.read_started.set()
        if self.gate is not None:
            self.gate.wait(30)
        data = super().read(offset, size)
        with self.progress:
            self.reads_done += 1
            self.progress.notify_all()
        return data

    def close(self):
        self.closed_after = self.reads_done
        super().close()


@pytest.fixture
def watched(monkeypatch):
    WatchedReader.instances = []
    monkeypatch.setattr(producers, "RangeReader", WatchedReader)
    return WatchedReader.instances


async def turns(n: int = 5) -> None:
    """Let the reactor run ``n`` times round (thread results are delivered through it)."""
    for _ in range(n):
        await deferLater(reactor, 0, lambda: None)


class PausingConsumer(Collect):
    """Pauses its producer after the first chunk, as a transport with a full buffer does."""

    def __init__(self):
        super().__init__()
        self.producer = None
        self.first: defer.Deferred = defer.Deferred()

    def write(self, data):
        super().write(data)
        if not self.first.called:
            self.producer.pauseProducing()
            self.first.callback(None)


async def paused_after_one_chunk(tmp_path, content: bytes) -> tuple[FileRangeProducer, PausingConsumer, defer.Deferred]:
    """A producer of ``content`` in 100,000-byte chunks, paused by its consumer after the first one, once
    the read ahead has finished and reached the reactor."""
    path = tmp_path / "f"
    path.write_bytes(content)
    producer = FileRangeProducer(path, 0, len(content), chunk_size=100_000)
    consumer = PausingConsumer()
    consumer.producer = producer
    done = producer.startProducing(consumer)
    await with_timeout(consumer.first)
    await with_timeout(WatchedReader.instances[0].reads(2))
    await turns()
    return producer, consumer, done


@pytest_twisted.ensureDeferred
async def test_file_range_producer_reads_off_the_reactor_one_chunk_ahead_and_holds_while_paused(tmp_path, watched):
    content = os.urandom(1_000_000)
    producer, consumer, done = await paused_after_one_chunk(tmp_path, content)
    reader = watched[0]
    # Paused after the first chunk: the next one was read ahead, nothing further, nothing written.
    assert len(consumer.data) == 100_000 and reader.reads_done == 2 and len(reader.threads) == 2
    producer.resumeProducing()
    await with_timeout(done)
    assert bytes(consumer.data) == content and reader.reads_done == 10
    assert threading.get_ident() not in reader.threads, "a file read ran on the reactor thread"
    assert reader.closed_after == 10


@pytest_twisted.ensureDeferred
async def test_a_stopped_producer_closes_its_file_only_after_the_read_in_flight(tmp_path, watched):
    producer, consumer, done = await paused_after_one_chunk(tmp_path, os.urandom(500_000))
    reader = watched[0]
    assert reader.reads_done == 2 and len(reader.threads) == 2
    gate = reader.gate = threading.Event()
    reader.read_started.clear()
    producer.resumeProducing()  # writes the second chunk and reads the third ahead, held by the gate
    await threads.deferToThread(reader.read_started.wait, 30)
    producer.stopProducing()
    await turns()
    assert reader.closed_after is None, "the file was closed while a thread was reading it"
    gate.set()
    await with_timeout(reader.reads(3))
    await turns()
    assert reader.closed_after == 3 and len(consumer.data) == 200_000
    outcome = []
    done.addBoth(outcome.append)
    assert outcome == []  # an abandoned body neither finishes nor fails: the client no longer waits for it


@pytest_twisted.ensureDeferred
async def test_producers_of_the_same_file_share_their_reads(tmp_path):
    path = tmp_path / "image"
    content = os.urandom(1_000_000)
    path.write_bytes(content)
    shared = SharedReads()
    consumers = [Collect(), Collect()]
    producers_ = [FileRangeProducer(path, 0, len(content), chunk_size=100_000, shared=shared) for _ in consumers]
    await with_timeout(defer.gatherResults([p.startProducing(c) for p, c in zip(producers_, consumers)]))
    assert [bytes(c.data) for c in consumers] == [content, content]
    assert shared.reads == 10  # each chunk read once for both

    # The file is replaced under the same name: its chunks are not the old file's.
    replacement = tmp_path / "new"
    replacement.write_bytes(os.urandom(1_000_000))
    expected = replacement.read_bytes()
    os.replace(replacement, path)
    consumer = Collect()
    await with_timeout(FileRangeProducer(path, 0, len(expected), chunk_size=100_000, shared=shared)
                       .startProducing(consumer))
    assert bytes(consumer.data) == expected and shared.reads == 20


@pytest_twisted.ensureDeferred
async def test_shared_reads_keep_a_window_of_recent_chunks_and_never_a_failed_read(tmp_path):
    path = tmp_path / "image"
    content = os.urandom(1_000_000)
    path.write_bytes(content)
    shared = SharedReads(window=300_000)
    # The second pass reads everything again: only the last three chunks were kept, and its own first
    # reads push them out before it gets to them.
    for expected_reads in (10, 20):
        consumer = Collect()
        await with_timeout(FileRangeProducer(path, 0, len(content), chunk_size=100_000, shared=shared)
                           .startProducing(consumer))
        assert bytes(consumer.data) == content and shared.reads == expected_reads

    # One read, two waiters, and it fails: both hear of it, and the next ask reads again.
    reading: defer.Deferred = defer.Deferred()
    first = shared.read("key", 10, lambda: reading)
    second = shared.read("key", 10, lambda: pytest.fail("a read in flight was started again"))
    reading.errback(OSError(5, "Input/output error"))
    for waiter in (first, second):
        with pytest.raises(OSError):
            await waiter
    again = shared.read("key", 10, lambda: defer.succeed(b"x" * 10))
    assert await again == b"x" * 10 and shared.reads == 22
    refused = shared.read("other", 10, lambda: defer.fail(OSError(5, "Input/output error")))
    with pytest.raises(OSError):
        await refused
    assert await shared.read("other", 10, lambda: defer.succeed(b"y" * 10)) == b"y" * 10 and shared.reads == 24


class FakeLink:
    """An agent link that fails the first ``failures`` sends, then succeeds."""

    def __init__(self, failures: int):
        self.failures = failures
        self.sends = 0

    def call(self, node, method, path, *, json=None, params=None):
        if method == "GET":
            return defer.succeed({"exists": False, "size": 0, "digest": None, "partial": 0, "path": "/n/" + path})
        return defer.succeed({"removed": True})

    def send(self, node, method, path, body, *, params=None):
        self.sends += 1
        if self.sends <= self.failures:
            return defer.fail(AgentUnreachable("connection refused"))
        return defer.succeed({"path": "/n" + path, "size": body.length, "digest": params["digest"]})


async def upload_one(api, tmp_path):
    image = small_qcow2(tmp_path / "x.qcow2").read_bytes()
    status, body = await api.upload(f"/resource_mgr/resource_pools/{api.pool}/base_images",
                                    {"name": "x", "os_type": "win7"}, {"file": ("x.qcow2", image)})
    assert status == 200, body
    return body["data"]


def events_of(distributor, name):
    seen = []
    distributor.observers.append(lambda event, record: event == name and seen.append(dict(record)))
    return seen


@pytest_twisted.ensureDeferred
async def test_failed_transfers_back_off_exponentially_on_the_clock(tmp_path, clock):
    config = {"storage": {"retry_initial": 5.0, "retry_max": 30.0}}
    async with controller(tmp_path, clock, config=config) as api:
        link = FakeLink(failures=5)
        api.core.extensions["storage.agent_link"] = link
        await add_node(api.core, api.pool, "10.0.0.1", "n1")
        failed, done = events_of(api.distributor, "failed"), events_of(api.distributor, "done")
        api.distributor.startService()
        finished = defer.Deferred()
        api.distributor.observers.append(lambda e, r: e == "done" and not finished.called and finished.callback(r))
        first_failure = defer.Deferred()
        api.distributor.observers.append(lambda e, r: e == "failed" and not first_failure.called and first_failure.callback(r))
        await upload_one(api, tmp_path)
        await with_timeout(first_failure)
        delays = []
        for expected in (5.0, 10.0, 20.0, 30.0, 30.0):
            pending = [c for c in clock.getDelayedCalls() if c.func.__name__ == "_timer_fired"]
            assert len(pending) == 1
            delays.append(pending[0].getTime() - clock.seconds())
            progressed = defer.Deferred()
            api.distributor.observers.append(
                lambda e, r, d=progressed: e in ("failed", "done") and not d.called and d.callback(e))
            clock.advance(expected - 0.25)  # (binary fractions: the clock's sums stay exact)
            assert not progressed.called, "retried before its backoff was over"
            clock.advance(0.25)
            await with_timeout(progressed)
        assert delays == [5.0, 10.0, 20.0, 30.0, 30.0]
        await with_timeout(finished)
        assert [f["attempts"] for f in failed] == [1, 2, 3, 4, 5] and len(done) == 1
        assert done[0]["progress"] == 100 and done[0]["attempts"] == 0 and link.sends == 6


@pytest_twisted.ensureDeferred
async def test_retry_limit_gives_up_until_the_node_returns(tmp_path, clock):
    config = {"storage": {"retry_initial": 1.0, "retry_limit": 2}}
    async with controller(tmp_path, clock, config=config) as api:
        link = FakeLink(failures=2)
        api.core.extensions["storage.agent_link"] = link
        node = await add_node(api.core, api.pool, "10.0.0.1", "n1")
        api.distributor.startService()
        second = defer.Deferred()
        api.distributor.observers.append(
            lambda e, r: e == "failed" and r["attempts"] == 2 and not second.called and second.callback(r))
        first = defer.Deferred()
        api.distributor.observers.append(lambda e, r: e == "failed" and not first.called and first.callback(r))
        await upload_one(api, tmp_path)
        await with_timeout(first)
        clock.advance(1.0)
        gave_up = await with_timeout(second)
        assert gave_up["next_retry_at"] is None and gave_up["status"] == 2
        assert [c for c in clock.getDelayedCalls() if c.func.__name__ == "_timer_fired"] == []
        done = defer.Deferred()
        api.distributor.observers.append(lambda e, r: e == "done" and not done.called and done.callback(r))
        api.core.plugins.hook.kvmdesk_node_status_changed(core=api.core, node=node, old="offline", new="online")
        await with_timeout(done)
        assert link.sends == 3


@pytest_twisted.ensureDeferred
async def test_transfers_interrupted_by_a_controller_restart_resume_at_start(tmp_path, clock):
    async with controller(tmp_path, clock) as api:
        link = FakeLink(failures=0)
        api.core.extensions["storage.agent_link"] = link
        await add_node(api.core, api.pool, "10.0.0.1", "n1")
        await upload_one(api, tmp_path)  # the distributor is not running: the transfer waits
        assert link.sends == 0
        done = defer.Deferred()
        api.distributor.observers.append(lambda e, r: e == "done" and not done.called and done.callback(r))
        api.distributor.startService()
        await with_timeout(done)
        assert link.sends == 1


@pytest_twisted.ensureDeferred
async def test_a_base_image_goes_with_its_md5_digest_even_from_a_transfer_recorded_before_digests(tmp_path, clock):
    class Recording(FakeLink):
        def __init__(self, failures: int):
            super().__init__(failures)
            self.sent_params: list = []

        def send(self, node, method, path, body, *, params=None):
            self.sent_params.append(params)
            return super().send(node, method, path, body, params=params)

    async with controller(tmp_path, clock) as api:
        link = Recording(failures=0)
        api.core.extensions["storage.agent_link"] = link
        await add_node(api.core, api.pool, "10.0.0.1", "n1")
        image = await upload_one(api, tmp_path)  # the distributor is not running: the transfer waits
        transfers = api.core.store.collection("image_transfers")
        (transfer,) = await transfers.find({"image_uuid": image["uuid"]})
        assert transfer["digest"] == "md5:" + image["md5_sum"]
        # what an earlier release stored: the md5 alone
        await transfers.update_one({"uuid": transfer["uuid"]}, {"$unset": {"digest": ""},
                                                                 "$set": {"md5": image["md5_sum"]}})
        done = defer.Deferred()
        api.distributor.observers.append(lambda e, r: e == "done" and not done.called and done.callback(r))
        api.distributor.startService()
        await with_timeout(done)
        assert [p["digest"] for p in link.sent_params] == ["md5:" + image["md5_sum"]]


@pytest_twisted.ensureDeferred
async def test_a_stalled_stream_is_cut_and_retried(tmp_path, clock):
    in_flight = defer.Deferred()

    class Stalling(FakeLink):
        def send(self, node, method, path, body, *, params=None):
            self.sends += 1
            if self.sends == 1:
                # Announced on the next reactor turn: by then the distributor is waiting on this request.
                reactor.callLater(0, in_flight.callback, None)
                return defer.Deferred()  # never answers, never sends a byte
            return super().send(node, method, path, body, params=params)

    config = {"storage": {"stall_timeout": 120.0, "retry_initial": 5.0}}
    async with controller(tmp_path, clock, config=config) as api:
        link = Stalling(failures=0)
        api.core.extensions["storage.agent_link"] = link
        await add_node(api.core, api.pool, "10.0.0.1", "n1")
        api.distributor.startService()
        await upload_one(api, tmp_path)
        await with_timeout(in_flight)
        failed = defer.Deferred()
        api.distributor.observers.append(lambda e, r: e == "failed" and not failed.called and failed.callback(r))
        clock.advance(120)
        record = await with_timeout(failed)
        assert "no progress" in record["error"]
        done = defer.Deferred()
        api.distributor.observers.append(lambda e, r: e == "done" and not done.called and done.callback(r))
        clock.advance(5)
        await with_timeout(done)
