"""The agent's side of a transfer: verified before visible, resumable, safe names, removal."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.web.server import Site

from kvmdesk.agent.images.routes import register_routes
from kvmdesk.agent.images.store import ImageReceiver
from kvmdesk.api.router import Router
from kvmdesk.core import errors as core_errors
from kvmdesk.core.errors import ApiError
from storage_testlib import InProcessAgent, RawHTTP, decode, files_in, http_client, parse_response, request_head, with_timeout

CONTENT = b"".join(hashlib.sha256(str(i).encode()).digest() for i in range(40000))  # 1.28 MB
MD5_HEX = hashlib.md5(CONTENT).hexdigest()
#: Base images are sent with their MD5 (the API's md5_sum); template versions with SHA-256.
DIGEST = f"md5:{MD5_HEX}"
SHA256 = f"sha256:{hashlib.sha256(CONTENT).hexdigest()}"
FILE_ID = "0b7c6a7e-1111-4c3e-9a55-4b2b3a0c9d01"


def url(agent: InProcessAgent, path: str) -> str:
    return f"http://{agent.host}:{agent.port}/agent/v1{path}"


async def put(agent, body: bytes, *, offset: int = 0, total: int = len(CONTENT), digest: str = DIGEST,
              file_id: str = FILE_ID, kind: str = "base", role: int = 1) -> tuple[int, dict]:
    response = await http_client().put(url(agent, f"/images/{kind}/{file_id}"), data=body,
                                       params={"role": role, "offset": offset, "total": total, "digest": digest})
    return await decode(response)


async def state(agent, file_id: str = FILE_ID, digest: str = DIGEST) -> dict:
    status, body = await decode(await http_client().get(url(agent, f"/images/base/{file_id}"),
                                                        params={"role": 1, "digest": digest}))
    assert status == 200, body
    return body["data"]


async def cut_after(agent, count: int, offset: int = 0, digest: str = DIGEST) -> None:
    """Send a PUT that declares the rest of the file but stops after ``count`` bytes (a broken link)."""
    stored: defer.Deferred = defer.Deferred()
    write = ImageReceiver.write

    def spy(receiver, data):
        write(receiver, data)
        if receiver.offset + receiver.received >= offset + count and not stored.called:
            stored.callback(None)

    ImageReceiver.write = spy
    try:
        client = await RawHTTP().connect(agent.host, agent.port)
        path = f"/agent/v1/images/base/{FILE_ID}?role=1&offset={offset}&total={len(CONTENT)}&digest={digest}"
        client.send(request_head("PUT", path, {"Content-Length": str(len(CONTENT) - offset)}))
        client.send(CONTENT[offset:offset + count])
        await with_timeout(stored, what="the bytes on the agent")  # written: now the link breaks
        client.abort()
        await with_timeout(client.closed, what="close")
    finally:
        ImageReceiver.write = write


@pytest.fixture
def agent(agents):
    return agents[0]


@pytest_twisted.ensureDeferred
async def test_a_complete_transfer_is_verified_then_visible(agent):
    assert (await state(agent))["exists"] is False
    status, body = await put(agent, CONTENT)
    assert status == 200, body
    final = agent.base_image(FILE_ID)
    assert body["data"] == {"path": str(final), "size": len(CONTENT), "digest": DIGEST}
    assert final.read_bytes() == CONTENT
    assert files_in(final.parent) == sorted([FILE_ID, f".{FILE_ID}.json"])
    now = await state(agent)
    assert (now["exists"], now["digest"], now["size"], now["partial"]) == (True, DIGEST, len(CONTENT), 0)
    status, body = await decode(await http_client().get(url(agent, "/images/base"), params={"role": 1}))
    assert [f["file_id"] for f in body["data"]] == [FILE_ID] and body["data"][0]["digest"] == DIGEST


@pytest_twisted.ensureDeferred
async def test_a_sha256_digest_is_verified_and_recorded(agent):
    corrupt = bytearray(CONTENT)
    corrupt[70_000] ^= 0x01
    status, body = await put(agent, bytes(corrupt), digest=SHA256)
    assert status == 422 and body["code"] == 4043 and SHA256 in body["msg"], body
    assert files_in(agent.base_image(FILE_ID).parent) == []
    status, body = await put(agent, CONTENT, digest=SHA256)
    assert status == 200 and body["data"]["digest"] == SHA256, body
    assert (await state(agent, digest=SHA256))["digest"] == SHA256
    # The right bytes announced with a wrong SHA-256 are refused too.
    assert (await put(agent, CONTENT, digest="sha256:" + "0" * 64))[1]["code"] == 4043


@pytest_twisted.ensureDeferred
async def test_a_sha256_transfer_resumes_where_it_stopped(agent):
    await cut_after(agent, 400_000, digest=SHA256)
    assert (await state(agent, digest=DIGEST))["partial"] == 0  # another content's partial is not offered
    have = (await state(agent, digest=SHA256))["partial"]
    assert have >= 400_000 and agent.images.partials[agent.base_image(FILE_ID)].hasher.name == "sha256"
    status, body = await put(agent, CONTENT[have:], offset=have, digest=SHA256)
    assert status == 200 and body["data"]["digest"] == SHA256, body
    assert agent.base_image(FILE_ID).read_bytes() == CONTENT


@pytest_twisted.ensureDeferred
async def test_files_recorded_with_an_md5_before_digests_stay_verifiable(agent):
    """Metadata an agent wrote before digests named their algorithm holds ``md5``: read as ``md5:<hex>``."""
    final = agent.base_image(FILE_ID)
    final.parent.mkdir(parents=True, exist_ok=True)
    final.write_bytes(CONTENT)
    final.with_name(f".{FILE_ID}.json").write_bytes(b'{"md5": "%s", "size": %d}' % (MD5_HEX.encode(), len(CONTENT)))
    now = await state(agent)
    assert (now["exists"], now["digest"]) == (True, DIGEST)
    status, body = await decode(await http_client().get(url(agent, "/images/base"), params={"role": 1}))
    assert body["data"][0]["digest"] == DIGEST
    # An interrupted transfer recorded the same way resumes, and is checked by its MD5.
    other = "2b7c6a7e-1111-4c3e-9a55-4b2b3a0c9d03"
    part = final.with_name(f".{other}.part")
    part.write_bytes(CONTENT[:300_000])
    final.with_name(f".{other}.part.json").write_bytes(b'{"md5": "%s", "total": %d}' % (MD5_HEX.encode(), len(CONTENT)))
    assert (await state(agent, file_id=other))["partial"] == 300_000
    status, body = await put(agent, CONTENT[300_000:], offset=300_000, file_id=other)
    assert status == 200 and body["data"]["digest"] == DIGEST, body


@pytest_twisted.ensureDeferred
async def test_a_received_image_is_fsynced_before_it_is_visible(agent, monkeypatch):
    from kvmdesk.agent.images import store

    synced: list[tuple[str, bool]] = []
    real_fsync = os.fsync
    final = agent.base_image(FILE_ID)

    def spy_fsync(fd: int) -> None:
        synced.append((os.readlink(f"/proc/self/fd/{fd}"), final.exists()))
        real_fsync(fd)

    monkeypatch.setattr(store.os, "fsync", spy_fsync)
    status, body = await put(agent, CONTENT)
    assert status == 200, body
    assert [visible for _, visible in synced] == [False]  # synced while still hidden
    assert synced[0][0].startswith(str(final.parent)) and synced[0][0] != str(final)


@pytest_twisted.ensureDeferred
async def test_wrong_content_is_refused_and_leaves_nothing(agent):
    corrupt = bytearray(CONTENT)
    corrupt[1000] ^= 0xFF
    status, body = await put(agent, bytes(corrupt))
    assert status == 422 and body["code"] == 4043, body
    assert files_in(agent.base_image(FILE_ID).parent) == []


@pytest_twisted.ensureDeferred
async def test_an_interrupted_transfer_resumes_where_it_stopped(agent, monkeypatch):
    from kvmdesk.agent.images import store

    opened = []
    real_open = store.open_for_stream
    monkeypatch.setattr(store, "open_for_stream", lambda *args, direct: (opened.append(direct), real_open(
        *args, direct=direct))[1])
    await cut_after(agent, 500_000)
    seen = await state(agent)
    # The partial file holds exactly what arrived: the direct writer's tail was written and cut to length.
    assert seen["exists"] is False and seen["partial"] >= 500_000
    assert store.ImageStore.part_path(agent.base_image(FILE_ID)).stat().st_size == seen["partial"]
    status, body = await put(agent, CONTENT[seen["partial"]:], offset=seen["partial"])
    assert status == 200, body
    assert agent.base_image(FILE_ID).read_bytes() == CONTENT
    assert opened == [True, False]  # direct I/O for a new file, not for appending at an unaligned offset


@pytest_twisted.ensureDeferred
async def test_a_restarted_agent_resumes_from_disk_and_hashes_the_whole_file(agents):
    agent = agents[0]
    await cut_after(agent, 700_000)
    await agent.stop()
    agents[0] = agent = InProcessAgent(agent.host, agent.data_dir, port=agent.port).start()
    assert agent.images.partials == {}
    seen = await state(agent)
    assert seen["partial"] >= 700_000
    status, body = await put(agent, CONTENT[seen["partial"]:], offset=seen["partial"])
    assert status == 200 and body["data"]["digest"] == DIGEST


@pytest_twisted.ensureDeferred
async def test_a_resumed_transfer_with_a_corrupted_prefix_is_caught(agents):
    agent = agents[0]
    await cut_after(agent, 600_000)
    await agent.stop()
    part = agent.base_image(FILE_ID).with_name(f".{FILE_ID}.part")
    with open(part, "r+b") as handle:
        handle.seek(10)
        handle.write(b"\x00\x00\x00")
    agents[0] = agent = InProcessAgent(agent.host, agent.data_dir, port=agent.port).start()
    offset = (await state(agent))["partial"]
    status, body = await put(agent, CONTENT[offset:], offset=offset)
    assert status == 422 and body["code"] == 4043
    assert (await state(agent))["partial"] == 0 and not agent.base_image(FILE_ID).exists()


@pytest_twisted.ensureDeferred
async def test_a_wrong_offset_is_answered_with_what_is_there(agent):
    await cut_after(agent, 300_000)
    have = (await state(agent))["partial"]
    status, body = await put(agent, CONTENT[have + 10:], offset=have + 10)
    assert status == 409 and body["code"] == 4042 and body["data"] == {"partial": have}
    # A partial file of other content is never resumed.
    status, body = await put(agent, CONTENT[have:], offset=have, digest="md5:" + "0" * 32)
    assert status == 409 and body["data"] == {"partial": 0}


@pytest.mark.parametrize("file_id, kind, code", [
    ("..", "base", 4041), (".hidden", "base", 4041), ("a..b", "base", 4041), ("x" * 200, "base", 4041),
    (FILE_ID, "etc", 4040),
])
@pytest_twisted.ensureDeferred
async def test_names_outside_the_image_directories_are_refused(agent, file_id, kind, code):
    status, body = await put(agent, CONTENT, file_id=file_id, kind=kind)
    assert status == 400 and body["code"] == code, body
    assert files_in(agent.storage) == []


@pytest_twisted.ensureDeferred
async def test_encoded_slashes_do_not_reach_the_file_system(agent):
    response = await http_client().put(url(agent, "/images/base/..%2F..%2Fescape"), data=CONTENT,
                                       params={"role": 1, "offset": 0, "total": len(CONTENT), "digest": DIGEST})
    status, body = await decode(response)
    assert status in (400, 404) and isinstance(body, dict) and body["code"] != 0
    assert not (agent.data_dir / "escape").exists() and not (agent.storage / "escape").exists()


@pytest.mark.parametrize("params, reason", [
    ({"offset": 0, "total": 10, "digest": DIGEST}, "body of"),
    ({"offset": 0, "total": len(CONTENT), "digest": "xyz"}, "digest"),
    ({"offset": 0, "total": len(CONTENT), "digest": MD5_HEX}, "digest"),  # the algorithm must be named
    ({"offset": 0, "total": len(CONTENT), "digest": DIGEST.upper()}, "digest"),
    ({"offset": 0, "total": len(CONTENT), "digest": "sha1:" + "0" * 40}, "digest"),
    ({"offset": 0, "total": len(CONTENT), "digest": "sha256:" + "0" * 32}, "digest"),
    ({"offset": 0, "total": len(CONTENT), "md5": MD5_HEX}, "digest"),  # the parameter before digests
    ({"offset": 5, "total": 2, "digest": DIGEST}, "offset"),
    ({"offset": 0, "digest": DIGEST}, "total"),
    ({"offset": 0, "total": len(CONTENT), "digest": DIGEST, "role": 9}, "role"),
])
@pytest_twisted.ensureDeferred
async def test_bad_transfer_parameters_are_refused(agent, params, reason):
    params = {"role": 1, **params}
    response = await http_client().put(url(agent, f"/images/base/{FILE_ID}"), data=CONTENT, params=params)
    status, body = await decode(response)
    assert status == 400 and body["code"] == 4045 and reason in body["msg"], body
    assert files_in(agent.base_image(FILE_ID).parent) == []


@pytest_twisted.ensureDeferred
async def test_delete_removes_the_file_and_any_partial(agent):
    assert (await put(agent, CONTENT))[0] == 200
    other = "1b7c6a7e-1111-4c3e-9a55-4b2b3a0c9d02"
    status, _ = await put(agent, CONTENT[:100], total=len(CONTENT), file_id=other)  # declared longer than sent
    assert status == 400
    for file_id, removed in ((FILE_ID, True), (other, False)):
        status, body = await decode(await http_client().delete(url(agent, f"/images/base/{file_id}"),
                                                               params={"role": 1}))
        assert status == 200 and body["data"] == {"removed": removed}
    assert files_in(agent.base_image(FILE_ID).parent) == []


@pytest_twisted.ensureDeferred
async def test_stream_guard_refuses_before_anything_is_written(agent):
    async def guard(request):
        if request.getHeader(b"x-signature") != b"good":
            raise ApiError(core_errors.UNAUTHENTICATED)

    agent.site.api_router.stream_guard = guard
    client = await RawHTTP().connect(agent.host, agent.port)
    path = f"/agent/v1/images/base/{FILE_ID}?role=1&offset=0&total={len(CONTENT)}&digest={DIGEST}"
    client.send(request_head("PUT", path, {"Content-Length": str(len(CONTENT))}) + CONTENT[:1000])
    status, _, body = parse_response(await with_timeout(client.first_bytes, what="401"))
    assert status == 401 and body["code"] == 1008
    client.abort()
    await with_timeout(client.closed, what="close")
    assert not agent.base_image(FILE_ID).exists()
    assert agent.images.partials == {} and agent.images.active == {}
    response = await http_client().put(url(agent, f"/images/base/{FILE_ID}"), data=CONTENT, headers={"X-Signature": "good"},
                                       params={"role": 1, "offset": 0, "total": len(CONTENT), "digest": DIGEST})
    assert response.code == 200


@pytest_twisted.ensureDeferred
async def test_routes_work_on_a_site_without_streaming(tmp_path):
    """An agent application that builds a plain Site still gets verified transfers (buffered body)."""
    router = Router(SimpleNamespace(reactor=reactor), prefix="/agent/v1")
    agent = SimpleNamespace(config=SimpleNamespace(get=lambda key, default=None: default), data_dir=tmp_path)
    register_routes(router, agent, reactor=reactor)
    port = reactor.listenTCP(0, Site(router.resource()), interface="127.0.0.1")
    try:
        target = f"http://127.0.0.1:{port.getHost().port}/agent/v1/images/template/{FILE_ID}"
        response = await http_client().put(target, data=CONTENT,
                                           params={"role": 2, "offset": 0, "total": len(CONTENT), "digest": DIGEST})
        status, body = await decode(response)
        assert status == 200, body
        assert Path(body["data"]["path"]) == tmp_path / "storage" / "instances" / "_template" / FILE_ID
        assert Path(body["data"]["path"]).read_bytes() == CONTENT
    finally:
        await port.stopListening()


def test_storage_roots_follow_the_agent_configuration(tmp_path):
    from kvmdesk.agent.images.store import ImageStore

    configured = {"agent.storage.template_data": str(tmp_path / "slow")}
    agent = SimpleNamespace(config=SimpleNamespace(get=lambda key, default=None: configured.get(key, default)),
                            data_dir=tmp_path / "data")
    store = ImageStore.for_agent(agent, reactor)
    assert store.directory("base", 1) == tmp_path / "data" / "storage" / "instances" / "_base"
    assert store.directory("template", 2) == tmp_path / "slow" / "instances" / "_template"
    assert os.path.isabs(store.roots[3])
