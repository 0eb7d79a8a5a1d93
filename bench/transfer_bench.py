#!/usr/bin/env python3
"""Upload a 1 GB base image to the controller and distribute it to two local agents; print throughputs.

    .venv/bin/python bench/transfer_bench.py [--size-mb 1024] [--rounds 3] [--hash-on-reactor] [--buffered-io]
        [--workdir DIR] [--keep]

What runs (all on this machine, all files on the same disk, in one run):

- ``cp`` of the image file, then ``fsync`` of the copy (the reference throughput of this disk: the
  controller fsyncs an upload, and an agent a received image, before either is answered, so a copy
  that still sits in the page cache would not be the same work);
- the controller (``ControllerService`` from ``kvmdesk.tap``, the production site with streamed uploads)
  as a subprocess, its peak RSS read from ``/proc/<pid>/status`` (VmHWM) after start-up and at the end;
- two agents' image endpoints (``kvmdesk.agent.images.routes`` on the streaming site) as subprocesses
  on 127.0.0.2 and 127.0.0.3;
- the upload with ``curl -F file=@...`` (multipart, streamed from the file), then the distribution
  to both agents, measured until both report the verified file.

Printed: MB/s of cp, of the upload, and of the distribution (bytes written to the agents per second,
both streams together, and per node), each as a fraction of cp; the controller's RSS growth.  For
scale, the same curl command uploading to a socket that throws the body away (what the client alone
reaches on this machine), MD5 alone on one core, and the same curl command uploading to a bare server
that does only what any upload server must (read the socket, MD5 on one thread, write on another,
fsync; no HTTP framework, no form parsing).  The controller cannot beat the bare server on the same
CPUs, so when the bare server is below half of cp the bench says the upload target cannot be met in
that run (on 2 CPUs, curl, the socket reads, the MD5 and the writes share two cores).
Targets: upload and distribution at least 50% of cp; controller RSS growth under 100 MB.
This prints figures; it asserts nothing.

Two cp baselines are taken: one copy (what the upload writes) and two copies at once (what the two
agents write).  Each of ``--rounds`` rounds runs cp, the bare server's upload, the upload, its
distribution and the two-copy cp, then deletes the image; medians are compared (whichever runs second finds the disk still writing
back the first one's gigabytes, so neither always goes first).  ``cp`` copies inside the kernel
(``copy_file_range``: no user-space copy, no hashing), so it bounds what any program that reads a
socket and computes an MD5 can reach; the MD5 rate of one core is printed for scale.
``KVMDESK_BENCH_PROFILE=DIR`` writes cProfile statistics of the controller and agents to ``DIR``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import queue
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
ADMIN_PASSWORD = "bench-admin-password"
MiB = 1 << 20


# -- the processes under test -------------------------------------------------------------------------


def serve_agent(host: str, port: int, data_dir: str, hash_in_thread: bool) -> None:
    """An agent's image endpoints, as the agent application mounts them."""
    from types import SimpleNamespace

    from twisted.internet import reactor

    from kvmdesk.agent.images.routes import register_routes
    from kvmdesk.api.router import Router
    from kvmdesk.api.streaming import make_site

    settings = {"agent.images.hash_in_thread": hash_in_thread}
    agent = SimpleNamespace(config=SimpleNamespace(get=lambda key, default=None: settings.get(key, default)),
                            data_dir=Path(data_dir))
    router = Router(SimpleNamespace(reactor=reactor), prefix="/agent/v1")
    register_routes(router, agent, reactor=reactor)
    reactor.listenTCP(port, make_site(router), interface=host)
    print("READY", flush=True)
    profiled(reactor.run, f"agent-{host}")


def serve_controller(config_json: str) -> None:
    """The production controller service, with a pool and two nodes seeded in its store."""
    from twisted.internet import defer, reactor

    from kvmdesk.core.config import Config
    from kvmdesk.core.records import new_record
    from kvmdesk.tap import ControllerService

    settings = json.loads(config_json)
    os.environ["KVMDESK_ADMIN_PASSWORD"] = ADMIN_PASSWORD
    # The nodes plugin would watch (and enrol) real agents; the bench seeds node records itself.
    os.environ["KVMDESK_BLOCKED_PLUGINS"] = "nodes"
    service = ControllerService(Config([settings["config"]]), reactor)

    async def seed(core):
        pool = await core.store.collection("resource_pools").insert_one(
            new_record(core.clock, name="bench", desc=None, status=0, default=1))
        for i, host in enumerate(settings["agents"]):
            await core.store.collection("nodes").insert_one(new_record(
                core.clock, name=f"bench-node-{i}", hostname=f"bench-node-{i}", ip=host,
                resource_pool_uuid=pool["uuid"], status="online", type=2))
        print("READY", service.port.getHost().port, pool["uuid"], flush=True)

    service.ready.addCallback(lambda core: defer.ensureDeferred(seed(core)))
    service.ready.addErrback(lambda f: (f.printTraceback(), reactor.stop()))
    reactor.callWhenRunning(service.startService)
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    profiled(reactor.run, "controller")


def profiled(run, name: str) -> None:
    """Run the reactor, under cProfile when KVMDESK_BENCH_PROFILE names a directory for the stats."""
    directory = os.environ.get("KVMDESK_BENCH_PROFILE")
    if not directory:
        run()
        return
    import cProfile

    profile = cProfile.Profile()
    profile.runcall(run)
    profile.dump_stats(os.path.join(directory, f"{name}.prof"))


# -- the driver ----------------------------------------------------------------------------------------


def free_port(hosts: list[str]) -> int:
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind((hosts[0], 0))
            port = probe.getsockname()[1]
        try:
            for host in hosts[1:]:
                with socket.socket() as other:
                    other.bind((host, port))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port")


def start(args: list[str], env: dict | None = None) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen([PYTHON, __file__, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env={**os.environ, **(env or {})}, cwd=ROOT, text=True)
    line = process.stdout.readline()
    if not line.startswith("READY"):
        process.kill()
        raise RuntimeError(f"{args[0]} did not start: {line}{process.stderr.read()[-3000:]}")
    return process, line.split()[1:]


def vm(pid: int, field: str) -> int:
    """A ``/proc/<pid>/status`` memory figure, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def warm_memory(directory: Path, size_mb: int) -> float:
    """Write and delete a scratch file of ``size_mb``; returns its MB/s.

    In a VM whose RAM is backed lazily by the host (Firecracker here), the first write into a guest
    page costs a host page fault: a fresh page-cache page fills at ~250 MB/s, a reused one at several
    GB/s.  Without this, whichever of cp, the controller or the agents happens to get never-touched
    pages looks slow for reasons that have nothing to do with it.
    """
    scratch = directory / "warm.scratch"
    block = b"\x5a" * MiB
    fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    started = time.perf_counter()
    try:
        for _ in range(size_mb):
            os.write(fd, block)
    finally:
        os.close(fd)
    elapsed = time.perf_counter() - started
    scratch.unlink()
    return size_mb * MiB / 1e6 / elapsed


def make_image(path: Path, size_mb: int) -> None:
    """A raw disk image of non-repeating data (qemu-img accepts it as raw: whole 512-byte sectors)."""
    with open(path, "wb") as handle:
        for i in range(size_mb):
            handle.write(hashlib.sha256(i.to_bytes(8, "little")).digest() * (MiB // 32))


def api(base: str, method: str, path: str, token: str | None = None, body: dict | None = None) -> dict:
    command = ["curl", "-s", "-X", method, base + path, "-H", "Content-Type: application/json"]
    if token:
        command += ["-H", f"Authorization: Bearer {token}"]
    if body is not None:
        command += ["-d", json.dumps(body)]
    return json.loads(subprocess.run(command, capture_output=True, check=True, text=True).stdout)


def receiving_server(keep: Path | None = None, direct: bool = True) -> tuple[int, threading.Thread]:
    """A socket on 127.0.0.1 that reads one HTTP request's body and answers 200 when it is done.

    With ``keep=None`` the body is thrown away: uploading to it measures the client alone on this
    machine.  With a path, the server does only what every upload must: it MD5-hashes the body on one
    thread and writes it to ``keep`` on another (direct, as the controller does with ``direct_io``, or
    through the page cache), then fsyncs it; no HTTP framework, no form parsing, no records.  That is
    the least work any server does for an upload here, so its throughput bounds the controller's.
    """
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def serve() -> None:
        with listener, listener.accept()[0] as connection:
            head = b""
            while b"\r\n\r\n" not in head:
                head += connection.recv(65536)
            head, body = head.split(b"\r\n\r\n", 1)
            if b"expect: 100-continue" in head.lower():
                connection.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            if keep is None:
                left = length - len(body)
                buffer = bytearray(MiB)
                while left > 0:
                    received = connection.recv_into(buffer)
                    if not received:
                        break
                    left -= received
            else:
                keep_body(connection, body, length - len(body), keep, direct)
            connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener.getsockname()[1], thread


def keep_body(connection: socket.socket, first: bytes, left: int, path: Path, direct: bool) -> None:
    """Hash and write (on two threads) what arrives on ``connection``, then fsync: the bare upload."""
    from kvmdesk.core.directio import DirectWriter, open_for_stream, write_all

    fd, direct = open_for_stream(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600, direct=direct)
    writer = DirectWriter(fd) if direct else None
    queues = [queue.SimpleQueue(), queue.SimpleQueue()]
    md5 = hashlib.md5()

    def drain(chunks: queue.SimpleQueue, work) -> None:
        while (chunk := chunks.get()) is not None:
            work(chunk)

    write = writer.write if writer else (lambda chunk: write_all(fd, chunk))
    threads = [threading.Thread(target=drain, args=(queues[0], md5.update)),
               threading.Thread(target=drain, args=(queues[1], write))]
    for thread in threads:
        thread.start()
    chunk = first
    while True:
        for chunks in queues:
            chunks.put(chunk)
        if left <= 0:
            break
        chunk = connection.recv(MiB)
        if not chunk:
            break
        left -= len(chunk)
    for chunks in queues:
        chunks.put(None)
    for thread in threads:
        thread.join()
    if writer:
        writer.finish()
    os.fsync(fd)
    os.close(fd)
    path.unlink()


def curl_upload(url: str, image: Path, token: str) -> tuple[float, str]:
    """Seconds for ``curl -F`` to upload ``image`` as a base image form, and what it answered."""
    started = time.perf_counter()
    upload = subprocess.run(
        ["curl", "-s", "-H", f"Authorization: Bearer {token}", "-F", "name=bench", "-F", "os_type=Linux",
         "-F", f"file=@{image};type=application/octet-stream", url],
        capture_output=True, check=True, text=True)
    return time.perf_counter() - started, upload.stdout


def settle(seconds: float) -> None:
    """Flush this machine's dirty pages, then give the disk time to finish writing back.

    In a VM the host may take an fsynced gigabyte into its own cache at RAM speed and write it to the
    real disk afterwards; whatever runs next, cp or upload, would pay for that.  Each measurement
    starts after the same pause instead (``--settle``).
    """
    os.sync()
    time.sleep(seconds)


def timed_cp(source: Path, targets: list[Path], settle_seconds: float) -> float:
    """Seconds for ``cp`` of ``source`` to each target at once (one cp process per target), each copy
    then fsynced: on disk, as an upload and a received image are before they are answered."""
    settle(settle_seconds)
    started = time.perf_counter()
    copies = [subprocess.Popen(["cp", str(source), str(target)]) for target in targets]
    for copy in copies:
        if copy.wait() != 0:
            raise RuntimeError("cp failed")
    for target in targets:
        fd = os.open(target, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    elapsed = time.perf_counter() - started
    for target in targets:
        target.unlink()
    return elapsed


def run(options: argparse.Namespace) -> None:
    workdir = Path(options.workdir or tempfile.mkdtemp(prefix="kvmdesk-bench-", dir=options.tmp))
    workdir.mkdir(parents=True, exist_ok=True)
    processes: list[subprocess.Popen] = []
    try:
        image = workdir / "bench.img"
        size = options.size_mb * MiB
        if options.warm_mb:
            rate = warm_memory(workdir, options.warm_mb)
            print(f"warmed {options.warm_mb} MiB of page cache ({rate:.0f} MB/s on first touch)", flush=True)
        print(f"generating a {options.size_mb} MiB image in {workdir} ...", flush=True)
        make_image(image, options.size_mb)
        md5 = hashlib.md5()
        started = time.perf_counter()
        with open(image, "rb") as handle:
            for block in iter(lambda: handle.read(MiB), b""):
                md5.update(block)
        md5_rate = size / 1e6 / (time.perf_counter() - started)

        hosts = ["127.0.0.2", "127.0.0.3"]
        agent_port = free_port(hosts)
        for i, host in enumerate(hosts):
            process, _ = start(["--serve-agent", host, str(agent_port), str(workdir / f"agent-{i}"),
                                "1" if options.hash_in_thread else "0"])
            processes.append(process)
        controller_port = free_port(["127.0.0.1"])
        config = {
            "controller": {"listen": "127.0.0.1", "port": controller_port, "data_dir": str(workdir / "controller")},
            "nodes": {"agent_port": agent_port},
            "storage": {"hash_in_thread": options.hash_in_thread, "max_streams": 2, "max_upload": 4 * size,
                        "direct_io": not options.buffered_io},
        }
        controller, (port, pool) = start(
            ["--serve-controller", json.dumps({"config": config, "agents": hosts})])
        processes.append(controller)
        base = f"http://127.0.0.1:{port}/api/v1.0"
        token = api(base, "POST", "/auth/login", body={"username": "admin", "password": ADMIN_PASSWORD})["data"]["token"]
        rss_start = vm(controller.pid, "VmRSS")
        hwm_start = vm(controller.pid, "VmHWM")

        sink_port, sink = receiving_server()
        client_seconds, _ = curl_upload(f"http://127.0.0.1:{sink_port}/", image, token)
        sink.join()

        def bare_upload() -> float:
            settle(options.settle)
            bare_port, bare = receiving_server(workdir / "bare-upload.img", direct=not options.buffered_io)
            seconds, _ = curl_upload(f"http://127.0.0.1:{bare_port}/", image, token)
            bare.join()
            return seconds

        def upload() -> tuple[float, str]:
            settle(options.settle)
            seconds, answer = curl_upload(f"{base}/resource_mgr/resource_pools/{pool}/base_images", image, token)
            answer = json.loads(answer)
            if answer.get("code") != 0:
                raise RuntimeError(f"upload failed: {answer}")
            assert answer["data"]["md5_sum"] == md5.hexdigest(), "the controller computed another MD5"
            return seconds, answer["data"]["uuid"]

        def distributed(uuid: str) -> None:
            """Until both agents report the verified file (a benchmark may poll; tests never do)."""
            while True:
                detail = api(base, "GET", f"/resource_mgr/resource_pools/{pool}/base_images/{uuid}", token)["data"]
                if detail["publish_count"] == 2 or detail["status"] == 2 and all(d["status"] != 1 for d in detail["detail"]):
                    break
                time.sleep(0.05)
            if detail["publish_count"] != 2:
                raise RuntimeError(f"distribution failed: {detail}")

        # Each round: cp of one copy; the same curl upload into the bare server; the upload (the same bytes
        # once); its distribution to both agents,
        # which starts as the upload answers; cp of two copies at once (what the agents wrote); then the
        # image is deleted everywhere.  Alternating, neither always runs while the disk is still writing
        # back the other's gigabytes; the medians are compared.
        cp_rounds, bare_rounds, upload_rounds, distribution_rounds, cp2_rounds = [], [], [], [], []
        for _ in range(options.rounds):
            cp_rounds.append(timed_cp(image, [workdir / "cp-copy.img"], options.settle))
            bare_rounds.append(bare_upload())
            seconds, uuid = upload()
            answered = time.perf_counter()
            upload_rounds.append(seconds)
            distributed(uuid)
            distribution_rounds.append(time.perf_counter() - answered)
            arrived = [workdir / f"agent-{i}" / "storage" / "instances" / "_base" / uuid for i in range(2)]
            for i, path in enumerate(arrived):
                assert path.stat().st_size == size, f"agent {i} holds {path.stat().st_size} bytes"
            cp2_rounds.append(timed_cp(image, [workdir / "cp-copy-1.img", workdir / "cp-copy-2.img"], options.settle))
            deleted = api(base, "DELETE", f"/resource_mgr/resource_pools/{pool}/base_images", token, {"uuids": [uuid]})
            assert deleted["code"] == 0 and not any(path.exists() for path in arrived), deleted
        hwm_end = vm(controller.pid, "VmHWM")
        agents_hwm = [vm(p.pid, "VmHWM") for p in processes[:2]]

        mb = size / 1e6
        cp_seconds, cp2_seconds = statistics.median(cp_rounds), statistics.median(cp2_rounds)
        upload_seconds, distribution_seconds = statistics.median(upload_rounds), statistics.median(distribution_rounds)
        cp_rate = mb / cp_seconds
        cp2_rate = 2 * mb / cp2_seconds
        upload_rate = mb / upload_seconds
        bare_rate = mb / statistics.median(bare_rounds)
        client_rate = mb / client_seconds
        total_rate = 2 * mb / distribution_seconds
        per_node = mb / distribution_seconds

        def rounds(seconds: list[float], copies: int = 1) -> str:
            return f"median of {len(seconds)}: {', '.join(f'{copies * mb / r:.0f}' for r in seconds)} MB/s"

        load = os.getloadavg()[0]
        print()
        where = "on two worker threads" if options.hash_in_thread else "on the reactor thread"
        print(f"file: {options.size_mb} MiB; chunks hashed and written {where}; controller I/O "
              f"{'through the page cache' if options.buffered_io else 'direct'}; "
              f"{os.cpu_count()} CPUs, load average {load:.1f}; MD5 alone on one core: {md5_rate:.0f} MB/s")
        print(f"{'':34}{'seconds':>9}{'MB/s':>10}{'vs cp':>8}")
        print(f"{'cp + fsync, 1 copy':34}{cp_seconds:9.2f}{cp_rate:10.1f}{'':>8}   ({rounds(cp_rounds)})")
        print(f"{'curl -> a socket that discards':34}{client_seconds:9.2f}{client_rate:10.1f}{client_rate / cp_rate:8.0%}"
              "   (the client alone: no server work)")
        print(f"{'curl -> bare server (MD5, write)':34}{mb / bare_rate:9.2f}{bare_rate:10.1f}{bare_rate / cp_rate:8.0%}"
              f"   ({rounds(bare_rounds)}; the least work of any upload server: see receiving_server)")
        print(f"{'upload (curl -> controller)':34}{upload_seconds:9.2f}{upload_rate:10.1f}{upload_rate / cp_rate:8.0%}"
              f"   ({rounds(upload_rounds)}; {upload_rate / bare_rate:.0%} of the bare server)")
        print(f"{'cp + fsync, 2 copies at once':34}{cp2_seconds:9.2f}{cp2_rate:10.1f}{'':>8}   ({rounds(cp2_rounds, 2)})")
        print(f"{'distribution, 2 agents at once':34}{distribution_seconds:9.2f}{total_rate:10.1f}{total_rate / cp2_rate:8.0%}"
              f"   ({rounds(distribution_rounds, 2)}; {per_node:.1f} MB/s per node, MD5-verified on each)")
        print(f"controller RSS: {rss_start / MiB:.0f} MiB after start-up (VmHWM {hwm_start / MiB:.0f} MiB), "
              f"peak VmHWM {hwm_end / MiB:.0f} MiB: growth {(hwm_end - hwm_start) / MiB:.1f} MiB")
        print(f"agents' peak RSS: {', '.join(f'{h / MiB:.0f} MiB' for h in agents_hwm)}")
        ok = upload_rate >= cp_rate / 2 and total_rate >= cp2_rate / 2 and hwm_end - hwm_start < 100 * MiB
        print(f"targets (>= 50% of cp each, RSS growth < 100 MB): {'met' if ok else 'NOT met'}")
        if bare_rate < cp_rate / 2:
            print(f"  the upload target cannot be met in this run: with the same client on the same {os.cpu_count()}"
                  f" CPUs, a server that only hashes and writes the body reached {bare_rate:.0f} MB/s, below half"
                  f" of cp ({cp_rate / 2:.0f} MB/s)")
    finally:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
        if not options.keep:
            shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve-agent":
        serve_agent(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5] == "1")
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--serve-controller":
        serve_controller(sys.argv[2])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--buffered-io", action="store_true",
                        help="the controller writes uploads and reads images for the agents through the page "
                             "cache ([storage] direct_io = false; the product default is direct I/O)")
    parser.add_argument("--hash-on-reactor", action="store_true",
                        help="write and hash chunks on the reactor thread (the product default is a worker thread)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of cp, upload, distribution and cp of two copies; their medians are compared")
    parser.add_argument("--settle", type=float, default=4.0,
                        help="seconds to wait, after a sync, before each measurement (the disk writes back)")
    parser.add_argument("--workdir", help="where the image, the copies and the data directories go")
    parser.add_argument("--tmp", default=None, help="parent of the temporary work directory")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--warm-mb", type=int, default=0,
                        help="page cache to write and free once before measuring (VMs with lazily backed RAM)")
    options = parser.parse_args()
    options.hash_in_thread = not options.hash_on_reactor
    run(options)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
