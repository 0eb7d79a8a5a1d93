"""Upload bodies are streamed to disk, and every bad upload is a clear 4xx envelope that leaves nothing.

Cases that depend on how bytes arrive (a body cut off, one over the limit, a refusal while the client is
still sending) run over a real loopback port with a bare TCP client; the rest go through StubTreq.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import defer

from kvmdesk.plugins.storage.uploads import FormUpload, safe_file_name
from kvmdesk.testing.api import listening_api, multipart_body
from storage_testlib import (
    RawHTTP,
    controller,
    files_in,
    iso_bytes,
    md5_of,
    multipart_parts,
    parse_response,
    request_head,
    small_qcow2,
    with_timeout,
)

MiB = 1 << 20


def upload_path(api) -> str:
    return f"/resource_mgr/resource_pools/{api.pool}/base_images"


def image_dir(api) -> Path:
    return api.core.extensions["storage.settings"].base_image_dir


async def nothing_left(api) -> None:
    assert files_in(image_dir(api)) == [], "an upload left a file behind"
    assert await api.core.store.collection("base_images").count({}) == 0, "an upload left a record behind"


class UploadSpy:
    """Signals when the server-side upload sink has stored ``threshold`` file bytes, and when it aborts."""

    def __init__(self, monkeypatch, threshold: int):
        self.stored: defer.Deferred = defer.Deferred()
        self.aborted: defer.Deferred = defer.Deferred()
        file_data, abort = FormUpload._file_data, FormUpload.abort

        def spy_file_data(upload, data):
            file_data(upload, data)
            if upload.file_size >= threshold and not self.stored.called:
                self.stored.callback(upload.temp)

        def spy_abort(upload, reason):
            abort(upload, reason)
            if not self.aborted.called:
                self.aborted.callback(None)  # (a Failure given to callback() would be an errback)

        monkeypatch.setattr(FormUpload, "_file_data", spy_file_data)
        monkeypatch.setattr(FormUpload, "abort", spy_abort)


# -- through StubTreq ----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_upload_stores_under_a_server_chosen_name(tmp_path, clock):
    image = small_qcow2(tmp_path / "x.qcow2")
    async with controller(tmp_path, clock) as api:
        status, body = await api.upload(upload_path(api), {"name": "../../etc/passwd", "os_type": "Windows 10"},
                                        {"file": ("win10.qcow2", image.read_bytes())})
        assert status == 200, body
        data = body["data"]
        assert data["name"] == "../../etc/passwd"  # a display name, never a path
        assert (data["format"], data["os_type_simple"], data["md5_sum"]) == ("qcow2", "win10", md5_of(image))
        assert files_in(image_dir(api)) == [data["uuid"]]
        assert "file" not in data


@pytest_twisted.ensureDeferred
async def test_an_upload_is_fsynced_before_it_is_recorded(tmp_path, clock, monkeypatch):
    import os

    from kvmdesk.plugins.storage import uploads

    synced: list[str] = []
    real_fsync = os.fsync

    def spy_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(uploads.os, "fsync", spy_fsync)
    image = small_qcow2(tmp_path / "x.qcow2")
    async with controller(tmp_path, clock) as api:
        status, body = await api.upload(upload_path(api), {"name": "synced", "os_type": "Linux"},
                                        {"file": ("x.qcow2", image.read_bytes())})
        assert status == 200, body
        assert len(synced) == 1 and synced[0].startswith(str(image_dir(api))), synced  # the temporary file
        api.core.config.set("storage.fsync", False)
        api.core.extensions.pop("storage.settings")
        status, body = await api.upload(upload_path(api), {"name": "unsynced", "os_type": "Linux"},
                                        {"file": ("x.qcow2", image.read_bytes())})
        assert status == 200 and len(synced) == 1


@pytest_twisted.ensureDeferred
async def test_name_and_os_type_may_come_in_the_query_string(tmp_path, clock):
    image = small_qcow2(tmp_path / "x.qcow2")
    async with controller(tmp_path, clock) as api:
        status, body = await api.upload(upload_path(api) + "?name=test&os_type=windows7",
                                        files={"file": ("x.qcow2", image.read_bytes())})
        assert status == 200, body
        assert (body["data"]["name"], body["data"]["os_type"]) == ("test", "windows7")


@pytest.mark.parametrize("filename", ["../evil.qcow2", "..\\evil.qcow2", "/etc/passwd", "a/../../b", "..", ".",
                                      "bad\x01name", " padded"])
@pytest_twisted.ensureDeferred
async def test_a_file_name_with_a_path_is_refused(tmp_path, clock, filename):
    image = small_qcow2(tmp_path / "x.qcow2")
    async with controller(tmp_path, clock) as api:
        status, body = await api.upload(upload_path(api), {"name": "n", "os_type": "win7"},
                                        {"file": (filename, image.read_bytes())})
        assert status == 400 and body["code"] == 4004, body
        await nothing_left(api)


@pytest_twisted.ensureDeferred
async def test_a_raw_disk_image_is_accepted(tmp_path, clock):
    # a boot sector (binary code, the 0x55AA signature) and binary data: what a raw disk looks like
    disk = bytes(range(256)) * 2
    disk = disk[:510] + b"\x55\xaa" + hashlib.sha256(b"disk").digest() * 128
    async with controller(tmp_path, clock) as api:
        status, body = await api.upload(upload_path(api), {"name": "raw-disk", "os_type": "win7"},
                                        {"file": ("disk.img", disk)})
        assert status == 200 and body["data"]["format"] == "raw", body


def tar_bytes() -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as archive:
        info = tarfile.TarInfo("disk.img")
        info.size = 1024
        archive.addfile(info, io.BytesIO(b"\0" * 1024))
    return out.getvalue()


def zip_bytes() -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        archive.writestr("disk.img", b"\1" * 4000)
    data = out.getvalue()
    return data + b"\0" * (-len(data) % 512)


@pytest.mark.parametrize("content, reason", [
    (b"just some text\n" * 100, "sectors"),
    (iso_bytes(0x9000 + 512 * 8), "ISO"),
    (b"\x00" * 0, None),
    # qemu-img calls each of these "raw"; each is a whole number of sectors
    (b"# not a disk\n" + b"x" * 498 + b"\n" * 1, "text"),
    ("Notizen: Größe, 大小\n".encode() * 512, "text"),
    (gzip.compress(b"\0" * 100000, mtime=0).ljust(1024, b"\0"), "gzip"),
    (tar_bytes(), "tar"),
    (zip_bytes(), "zip"),
])
@pytest_twisted.ensureDeferred
async def test_a_non_image_is_refused(tmp_path, clock, content, reason):
    async with controller(tmp_path, clock) as api:
        status, body = await api.upload(upload_path(api), {"name": "n", "os_type": "win7"},
                                        {"file": ("notes.qcow2", content)})
        assert status == 400, body
        if reason is None:
            assert body["code"] == 4008  # empty file
        else:
            assert body["code"] == 4005 and reason in body["msg"], body
        await nothing_left(api)


@pytest_twisted.ensureDeferred
async def test_a_qcow2_with_a_backing_file_is_refused(tmp_path, clock):
    backing = small_qcow2(tmp_path / "backing.qcow2")
    overlay = tmp_path / "overlay.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(backing), str(overlay)],
                   check=True)
    async with controller(tmp_path, clock) as api:
        status, body = await api.upload(upload_path(api), {"name": "n", "os_type": "win7"},
                                        {"file": ("overlay.qcow2", overlay.read_bytes())})
        assert status == 400 and body["code"] == 4005 and "backing" in body["msg"], body
        await nothing_left(api)


@pytest.mark.parametrize("fields, files, field", [
    ({"os_type": "win7"}, True, "name"),
    ({"name": "n"}, True, "os_type"),
    ({"name": "n", "os_type": "win7"}, False, "file"),
    ({"name": "", "os_type": "win7"}, True, "name"),
])
@pytest_twisted.ensureDeferred
async def test_a_missing_form_field_is_named(tmp_path, clock, fields, files, field):
    image = small_qcow2(tmp_path / "x.qcow2")
    async with controller(tmp_path, clock) as api:
        status, body = await api.upload(upload_path(api), fields,
                                        {"file": ("x.qcow2", image.read_bytes())} if files else {})
        assert status == 400 and body["code"] == 1002, body
        assert body["data"] is None or body["data"][0]["field"] == field
        assert field in body["msg"]
        await nothing_left(api)


@pytest_twisted.ensureDeferred
async def test_unknown_or_repeated_fields_and_broken_forms_are_refused(tmp_path, clock):
    image = small_qcow2(tmp_path / "x.qcow2").read_bytes()
    async with controller(tmp_path, clock) as api:
        status, body = await api.upload(upload_path(api), {"name": "n", "os_type": "w", "colour": "red"},
                                        {"file": ("x.qcow2", image)})
        assert status == 400 and body["code"] == 4003 and "colour" in body["msg"]
        twice, content_type = multipart_body({"name": "n", "os_type": "w"}, {"file": ("x.qcow2", image)})
        boundary = content_type.split("boundary=")[1]
        doubled = twice.replace(f"--{boundary}--".encode(), b"") + twice.split(b"\r\n", 1)[0] + \
            b'\r\nContent-Disposition: form-data; name="file"; filename="y"\r\n\r\nzz\r\n' + f"--{boundary}--\r\n".encode()
        status, body = await api.call("POST", upload_path(api), data=doubled, headers={"Content-Type": content_type})
        assert status == 400 and body["code"] == 4003, body
        truncated = twice[: len(twice) // 2]
        status, body = await api.call("POST", upload_path(api), data=truncated, headers={"Content-Type": content_type})
        assert status == 400 and body["code"] == 4002, body
        status, body = await api.call("POST", upload_path(api), data=image, headers={"Content-Type": "application/octet-stream"})
        assert status == 415 and body["code"] == 4013, body
        status, body = await api.call("POST", upload_path(api), data=twice, headers={"Content-Type": "multipart/form-data"})
        assert status == 415 and body["code"] == 4013, body
        await nothing_left(api)


@pytest_twisted.ensureDeferred
async def test_over_the_limit_through_stubtreq(tmp_path, clock):
    async with controller(tmp_path, clock, config={"storage": {"max_upload": 4096}}) as api:
        status, body = await api.upload(upload_path(api), {"name": "n", "os_type": "w"}, {"file": ("x", b"x" * 8192)})
        assert status == 413 and body["code"] == 4001, body
        await nothing_left(api)


@pytest_twisted.ensureDeferred
async def test_duplicate_name_in_a_pool_is_a_conflict(tmp_path, clock):
    image = small_qcow2(tmp_path / "x.qcow2").read_bytes()
    async with controller(tmp_path, clock) as api:
        status, first = await api.upload(upload_path(api), {"name": "n", "os_type": "w"}, {"file": ("x", image)})
        assert status == 200
        status, body = await api.upload(upload_path(api), {"name": "n", "os_type": "w"}, {"file": ("x", image)})
        assert status == 409 and body["code"] == 1013, body
        assert files_in(image_dir(api)) == [first["data"]["uuid"]]


@pytest_twisted.ensureDeferred
async def test_unknown_pool_is_a_404_and_leaves_nothing(tmp_path, clock):
    image = small_qcow2(tmp_path / "x.qcow2").read_bytes()
    async with controller(tmp_path, clock) as api:
        status, body = await api.upload("/resource_mgr/resource_pools/nope/base_images", {"name": "n", "os_type": "w"},
                                        {"file": ("x", image)})
        assert status == 404 and body["code"] == 1012, body
        await nothing_left(api)


def test_safe_file_name_keeps_ordinary_names():
    assert safe_file_name("cn_windows_7 (x64).iso") == "cn_windows_7 (x64).iso"
    assert safe_file_name("镜像.qcow2") == "镜像.qcow2"


# -- over a real port ----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_declared_length_over_the_limit_is_refused_before_the_body_is_sent(tmp_path, clock):
    async with controller(tmp_path, clock, config={"storage": {"max_upload": MiB}}) as api:
        async with listening_api(api.core) as base_url:
            port = int(base_url.split(":")[2].split("/")[0])
            client = await RawHTTP().connect("127.0.0.1", port)
            boundary = "b0undary"
            client.send(request_head("POST", f"/api/v1.0{upload_path(api)}", {
                "Authorization": f"Bearer {api.token}", "Content-Length": str(50 * MiB),
                "Content-Type": f"multipart/form-data; boundary={boundary}"}))
            # Not one byte of the body is sent: the answer comes from the headers alone.
            status, headers, body = parse_response(await with_timeout(client.closed, what="413"))
            assert status == 413 and body["code"] == 4001 and headers["connection"] == "close"
            assert str(MiB) in body["msg"]
        await nothing_left(api)


@pytest_twisted.ensureDeferred
async def test_expect_100_continue_gets_the_refusal_instead_of_continue(tmp_path, clock):
    async with controller(tmp_path, clock, config={"storage": {"max_upload": MiB}}) as api:
        async with listening_api(api.core) as base_url:
            port = int(base_url.split(":")[2].split("/")[0])
            client = await RawHTTP().connect("127.0.0.1", port)
            client.send(request_head("POST", f"/api/v1.0{upload_path(api)}", {
                "Authorization": f"Bearer {api.token}", "Content-Length": str(50 * MiB), "Expect": "100-continue",
                "Content-Type": "multipart/form-data; boundary=x"}))
            raw = await with_timeout(client.closed, what="413")
            assert not raw.startswith(b"HTTP/1.1 100")
            assert parse_response(raw)[0] == 413


@pytest_twisted.ensureDeferred
async def test_chunked_body_is_refused_as_soon_as_it_passes_the_limit(tmp_path, clock, monkeypatch):
    spy = UploadSpy(monkeypatch, threshold=1)
    async with controller(tmp_path, clock, config={"storage": {"max_upload": MiB}}) as api:
        async with listening_api(api.core) as base_url:
            port = int(base_url.split(":")[2].split("/")[0])
            client = await RawHTTP().connect("127.0.0.1", port)
            before, _ = multipart_parts("bnd", {"name": "n", "os_type": "w"}, "big.qcow2")
            client.send(request_head("POST", f"/api/v1.0{upload_path(api)}", {
                "Authorization": f"Bearer {api.token}", "Transfer-Encoding": "chunked",
                "Content-Type": "multipart/form-data; boundary=bnd"}))
            chunk = b"\x07" * (256 << 10)
            client.send(b"%x\r\n%s\r\n" % (len(before), before))
            client.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            temp = await with_timeout(spy.stored, what="stored bytes")
            assert temp.exists(), "the file is not being written as it arrives"
            for _ in range(11):  # 3 MiB > 1 MiB + the form's allowance; the client never ends the body
                client.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            status, _, body = parse_response(await with_timeout(client.first_bytes, what="413"))
            assert status == 413 and body["code"] == 4001
            await with_timeout(spy.aborted, what="abort")
            client.abort()
        await nothing_left(api)


@pytest_twisted.ensureDeferred
async def test_upload_cut_off_mid_stream_leaves_nothing(tmp_path, clock, monkeypatch):
    spy = UploadSpy(monkeypatch, threshold=2 * MiB)
    async with controller(tmp_path, clock) as api:
        async with listening_api(api.core) as base_url:
            port = int(base_url.split(":")[2].split("/")[0])
            client = await RawHTTP().connect("127.0.0.1", port)
            before, after = multipart_parts("bnd", {"name": "n", "os_type": "w"}, "big.qcow2")
            total = len(before) + 8 * MiB + len(after)
            client.send(request_head("POST", f"/api/v1.0{upload_path(api)}", {
                "Authorization": f"Bearer {api.token}", "Content-Length": str(total),
                "Content-Type": "multipart/form-data; boundary=bnd"}))
            client.send(before + b"\x01" * (3 * MiB))
            temp = await with_timeout(spy.stored, what="stored bytes")
            assert temp.exists() and temp.parent == image_dir(api) and temp.name.startswith(".upload-")
            client.abort()
            await with_timeout(spy.aborted, what="abort")
        await nothing_left(api)


@pytest_twisted.ensureDeferred
async def test_unauthenticated_upload_is_refused_while_it_is_being_sent(tmp_path, clock, monkeypatch):
    spy = UploadSpy(monkeypatch, threshold=1)
    async with controller(tmp_path, clock) as api:
        async with listening_api(api.core) as base_url:
            port = int(base_url.split(":")[2].split("/")[0])
            client = await RawHTTP().connect("127.0.0.1", port)
            before, _ = multipart_parts("bnd", {"name": "n", "os_type": "w"}, "x.qcow2")
            client.send(request_head("POST", f"/api/v1.0{upload_path(api)}", {
                "Authorization": "Bearer not-a-token", "Content-Length": str(100 * MiB),
                "Content-Type": "multipart/form-data; boundary=bnd"}))
            client.send(before + b"\x01" * MiB)
            status, _, body = parse_response(await with_timeout(client.first_bytes, what="401"))
            assert status == 401 and body["code"] == 1008
            client.abort()
        # Authentication comes before the upload's sink exists: not one byte was stored.
        assert not spy.stored.called
        await nothing_left(api)


@pytest_twisted.ensureDeferred
async def test_streamed_upload_over_a_real_port_succeeds_with_chunked_encoding(tmp_path, clock):
    image = small_qcow2(tmp_path / "x.qcow2").read_bytes()
    async with controller(tmp_path, clock) as api:
        async with listening_api(api.core) as base_url:
            port = int(base_url.split(":")[2].split("/")[0])
            client = await RawHTTP().connect("127.0.0.1", port)
            before, after = multipart_parts("bnd", {"name": "chunky", "os_type": "Ubuntu 22.04"}, "x.qcow2")
            client.send(request_head("POST", f"/api/v1.0{upload_path(api)}", {
                "Authorization": f"Bearer {api.token}", "Transfer-Encoding": "chunked", "Connection": "close",
                "Content-Type": "multipart/form-data; boundary=bnd"}))
            body = before + image + after
            for start in range(0, len(body), 7000):
                piece = body[start:start + 7000]
                client.send(b"%x\r\n%s\r\n" % (len(piece), piece))
            client.send(b"0\r\n\r\n")
            status, _, answer = parse_response(await with_timeout(client.closed, what="answer"))
            assert status == 200, answer
            assert answer["data"]["os_type_simple"] == "ubuntu" and answer["data"]["size_bytes"] == len(image)
