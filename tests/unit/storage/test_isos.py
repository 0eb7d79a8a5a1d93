"""The ISO library (#59-#63): upload, list with filters, edit, download with Range, delete."""
from __future__ import annotations

import fcntl
import hashlib
import os
import threading
from urllib.parse import urlsplit

import pytest
import pytest_twisted
import treq

from twisted.internet import defer, reactor

from kvmdesk.core.directio import RangeReader, enable_direct
from kvmdesk.core.errors import ApiError
from kvmdesk.plugins.storage import producers, uploads
from kvmdesk.protocol.ranges import byte_range
from kvmdesk.testing.api import listening_api
from storage_testlib import (
    RawHTTP,
    UsagePlugin,
    controller,
    files_in,
    http_client,
    iso_bytes,
    multipart_parts,
    parse_response,
    request_head,
    with_timeout,
)

ISOS = "/resource_mgr/isos"
ISO = iso_bytes(0x9000 + 4096, label=b"WIN7")


def iso_dir(api):
    return api.core.extensions["storage.settings"].iso_dir


async def upload(api, filename="cn_windows_7.iso", content=ISO, **fields):
    form = {"iso_type": "3", "os_type": "Windows7(64bit)", **fields}
    return await api.upload(ISOS, form, {"file": (filename, content)})


@pytest_twisted.ensureDeferred
async def test_upload_list_filter_edit(tmp_path, clock):
    async with controller(tmp_path, clock) as api:
        status, body = await upload(api)
        assert status == 200, body
        iso = body["data"]
        assert (iso["name"], iso["type"], iso["os_type"], iso["status"]) == ("cn_windows_7", 3, "Windows7(64bit)", 0)
        assert iso["size_bytes"] == len(ISO) and iso["md5"] == hashlib.md5(ISO).hexdigest()
        assert iso["path"].endswith(f"{iso['uuid']}.iso") and files_in(iso_dir(api)) == [f"{iso['uuid']}.iso"]
        assert "file" not in iso
        await upload(api, "virtio-win.iso", iso_type="2", os_type="")
        await upload(api, "office.iso", iso_type="1", os_type="")

        status, body = await api.call("GET", ISOS, params={"page_size": 2})
        assert body["data"]["count"] == 3 and len(body["data"]["results"]) == 2 and body["data"]["next"]
        status, body = await api.call("GET", ISOS, params={"name": "WIN"})
        assert sorted(i["name"] for i in body["data"]["results"]) == ["cn_windows_7", "virtio-win"]
        status, body = await api.call("GET", ISOS, params={"name": "win", "type": "2"})
        assert [i["name"] for i in body["data"]["results"]] == ["virtio-win"]
        status, body = await api.call("GET", ISOS, params={"colour": "red"})
        assert status == 400 and body["code"] == 1003
        status, body = await api.call("GET", ISOS, params={"type": "7"})
        assert status == 400 and body["code"] == 1002

        status, body = await api.call("PUT", f"{ISOS}/{iso['uuid']}", {"name": "win7-sp1", "os_type": "Windows 7"})
        assert status == 200 and (body["data"]["name"], body["data"]["os_type"]) == ("win7-sp1", "Windows 7")
        status, body = await api.call("PUT", f"{ISOS}/{iso['uuid']}", {"name": None})
        assert status == 400
        status, body = await api.call("PUT", f"{ISOS}/nope", {"name": "x"})
        assert status == 404 and body["code"] == 1012


@pytest_twisted.ensureDeferred
async def test_with_direct_io_an_upload_is_written_past_the_page_cache_to_its_exact_length(tmp_path, clock,
                                                                                        monkeypatch):
    switched = []

    def spy(fd):
        direct = enable_direct(fd)
        switched.append((direct, bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)))
        return direct

    monkeypatch.setattr(uploads, "enable_direct", spy)
    content = iso_bytes(0x9000 + 3 * 4096 + 1234, label=b"ODD")  # not a whole number of blocks
    async with controller(tmp_path, clock, config={"storage": {"direct_io": True}}) as api:
        status, body = await upload(api, "odd.iso", content=content)
        assert status == 200, body
        assert switched == [(True, True)]
        iso = body["data"]
        assert iso["size_bytes"] == len(content) and iso["md5"] == hashlib.md5(content).hexdigest()
        assert (iso_dir(api) / f"{iso['uuid']}.iso").read_bytes() == content


@pytest.mark.parametrize("content, filename, fields, code", [
    (b"MZ" + b"\x00" * 0x9000, "setup.iso", {}, 4006),         # not ISO 9660
    (b"tiny", "tiny.iso", {}, 4006),                           # too short to carry the signature
    (ISO, "../../x.iso", {}, 4004),
    (ISO, "x.iso", {"iso_type": "9"}, 1002),
    (ISO, "x.iso", {"iso_type": "soft"}, 1002),
])
@pytest_twisted.ensureDeferred
async def test_bad_iso_uploads(tmp_path, clock, content, filename, fields, code):
    async with controller(tmp_path, clock) as api:
        status, body = await upload(api, filename, content, **fields)
        assert 400 <= status < 500 and body["code"] == code, body
        assert files_in(iso_dir(api)) == []
        assert await api.core.store.collection("isos").count({}) == 0


@pytest_twisted.ensureDeferred
async def test_a_non_iso_is_refused_while_it_is_being_sent(tmp_path, clock):
    async with controller(tmp_path, clock) as api:
        async with listening_api(api.core) as base_url:
            port = int(base_url.split(":")[2].split("/")[0])
            client = await RawHTTP().connect("127.0.0.1", port)
            before, _ = multipart_parts("bnd", {"iso_type": "3"}, "fake.iso")
            client.send(request_head("POST", f"/api/v1.0{ISOS}", {
                "Authorization": f"Bearer {api.token}", "Content-Length": str(4 << 30),
                "Content-Type": "multipart/form-data; boundary=bnd"}))
            client.send(before + b"\x00" * 0x9000)  # 36 KiB of a "4 GiB" upload, without CD001
            status, _, body = parse_response(await with_timeout(client.first_bytes, what="refusal"))
            assert status == 400 and body["code"] == 4006
            client.abort()
        assert files_in(iso_dir(api)) == []


@pytest_twisted.ensureDeferred
async def test_download_streams_with_headers_and_ranges(tmp_path, clock):
    async with controller(tmp_path, clock) as api:
        status, body = await upload(api, "系统盘.iso")
        iso = body["data"]
        async with listening_api(api.core) as base_url:
            headers = {"Authorization": f"Bearer {api.token}"}
            response = await http_client().get(f"{base_url}{ISOS}/{iso['uuid']}/download", headers=headers)
            assert response.code == 200
            assert await treq.content(response) == ISO
            assert response.length == len(ISO)  # Content-Length (the client keeps it out of .headers)
            disposition = response.headers.getRawHeaders("content-disposition")[0]
            assert disposition.startswith("attachment;") and "filename*=UTF-8''%E7%B3%BB%E7%BB%9F%E7%9B%98.iso" in disposition
            assert response.headers.getRawHeaders("accept-ranges") == ["bytes"]

            # A client resuming after 0x8000 bytes gets the rest, 206.
            response = await http_client().get(f"{base_url}{ISOS}/{iso['uuid']}/download",
                                               headers={**headers, "Range": "bytes=32768-"})
            assert response.code == 206
            assert await treq.content(response) == ISO[0x8000:]
            assert response.headers.getRawHeaders("content-range") == [f"bytes 32768-{len(ISO) - 1}/{len(ISO)}"]

            response = await http_client().get(f"{base_url}{ISOS}/{iso['uuid']}/download",
                                               headers={**headers, "Range": f"bytes={len(ISO) + 10}-"})
            assert response.code == 416
            envelope = await response.json()
            assert envelope["code"] == 4009 and str(len(ISO)) in envelope["msg"]

            response = await http_client().get(f"{base_url}{ISOS}/no-such-iso/download", headers=headers)
            assert response.code == 404 and (await response.json())["code"] == 1012
            response = await http_client().get(f"{base_url}{ISOS}/{iso['uuid']}/download")
            assert response.code == 401 and (await response.json())["code"] == 1008

            # The file vanished from disk: an envelope, not twisted.web's HTML page.
            (iso_dir(api) / f"{iso['uuid']}.iso").unlink()
            response = await http_client().get(f"{base_url}{ISOS}/{iso['uuid']}/download", headers=headers)
            assert response.code == 410 and (await response.json())["code"] == 4011


@pytest_twisted.ensureDeferred
async def test_the_detail_path_answers_json_and_gives_the_file_when_accept_asks_for_it(tmp_path, clock):
    async with controller(tmp_path, clock) as api:
        status, body = await upload(api, "tools.iso")
        iso = body["data"]
        status, body = await api.call("GET", f"{ISOS}/{iso['uuid']}")
        assert status == 200 and body["code"] == 0 and body["data"] == iso
        status, body = await api.call("GET", f"{ISOS}/{iso['uuid']}", headers={"Accept": "application/json, */*"})
        assert status == 200 and body["data"]["uuid"] == iso["uuid"]
        for accept in ("application/octet-stream", "application/x-iso9660-image",
                       "application/json;q=0.5, application/octet-stream"):
            response = await api.raw("GET", f"{ISOS}/{iso['uuid']}", headers={"Accept": accept})
            assert response.code == 200 and await response.content() == ISO, accept
        status, body = await api.call("GET", f"{ISOS}/ghost")
        assert status == 404 and body["code"] == 1012
        status, doc = await api.call("GET", "/openapi.json", auth=False)
        detail = doc["paths"]["/api/v1.0/resource_mgr/isos/{iso_uuid}"]["get"]["responses"]["200"]["content"]
        assert {"application/json", "application/octet-stream"} <= set(detail)
        download = doc["paths"]["/api/v1.0/resource_mgr/isos/{iso_uuid}/download"]["get"]["responses"]["200"]["content"]
        assert "application/json" not in download and "application/x-iso9660-image" in download


@pytest.mark.parametrize("header, size, expected", [
    (None, 100, None),
    (b"bytes=0-9", 100, (0, 9)),
    (b"bytes=90-", 100, (90, 99)),
    (b"bytes=90-500", 100, (90, 99)),
    (b"bytes=-10", 100, (90, 99)),
    (b"bytes=-500", 100, (0, 99)),
    (b"bytes=0-9,20-29", 100, None),   # several ranges: the whole file
    (b"bytes=-", 100, None),           # malformed: ignored
    (b"bytes=a-b", 100, None),
    (b"items=0-9", 100, None),         # not a byte range
    (b"bytes=200-", 100, "416"),
    (b"bytes=50-40", 100, "416"),
    (b"bytes=-0", 100, "416"),
    (b"bytes=0-", 0, "416"),
])
def test_byte_ranges(header, size, expected):
    if expected == "416":
        with pytest.raises(ApiError) as refused:
            byte_range(header, size)
        assert refused.value.error.status == 416
    else:
        assert byte_range(header, size) == expected


@pytest_twisted.ensureDeferred
async def test_downloads_read_the_file_off_the_reactor_and_answer_single_ranges(tmp_path, clock, monkeypatch):
    read_on = []

    class Recording(RangeReader):
        def read(self, offset, size):
            read_on.append(threading.get_ident())
            return super().read(offset, size)

    monkeypatch.setattr(producers, "RangeReader", Recording)
    async with controller(tmp_path, clock) as api:
        status, body = await upload(api)
        url = f"{ISOS}/{body['data']['uuid']}/download"
        async with listening_api(api.core) as base_url:
            headers = {"Authorization": f"Bearer {api.token}"}
            for asked, code, expected in [
                ("bytes=0-99", 206, ISO[:100]),
                ("bytes=-100", 206, ISO[-100:]),
                (f"bytes=100-{2 * len(ISO)}", 206, ISO[100:]),
                ("bytes=0-9,20-29", 200, ISO),
            ]:
                response = await http_client().get(base_url + url, headers={**headers, "Range": asked})
                assert (response.code, await treq.content(response)) == (code, expected), asked
                if code == 206:
                    first = len(ISO) - len(expected) if asked.startswith("bytes=-") else int(asked[6:].split("-")[0])
                    assert response.headers.getRawHeaders("content-range") == [
                        f"bytes {first}-{first + len(expected) - 1}/{len(ISO)}"]
                assert response.headers.getRawHeaders("last-modified")
    assert read_on and threading.get_ident() not in read_on, "a download read the file on the reactor thread"


@pytest_twisted.ensureDeferred
async def test_a_client_leaving_mid_download_stops_the_reads_and_closes_the_file(tmp_path, clock, monkeypatch):
    closed: defer.Deferred = defer.Deferred()
    first_read: defer.Deferred = defer.Deferred()
    reads = []

    class Watched(RangeReader):
        def read(self, offset, size):
            if not reads:
                reactor.callFromThread(first_read.callback, None)
            reads.append(offset)
            return super().read(offset, size)

        def close(self):
            super().close()
            closed.callback(None)

    monkeypatch.setattr(producers, "RangeReader", Watched)
    big = iso_bytes(32 << 20)  # more than the sockets on both sides hold
    async with controller(tmp_path, clock) as api:
        status, body = await upload(api, "big.iso", content=big)
        assert status == 200, body
        async with listening_api(api.core) as base_url:
            where = urlsplit(base_url)
            client = await RawHTTP().connect(where.hostname, where.port)
            client.protocol.transport.pauseProducing()  # reads nothing: the server's socket fills up
            client.send(f"GET {where.path}{ISOS}/{body['data']['uuid']}/download HTTP/1.1\r\nHost: x\r\n"
                        f"Authorization: Bearer {api.token}\r\n\r\n".encode())
            await with_timeout(first_read)
            client.abort()
            await with_timeout(closed)
    assert len(reads) < len(big) // (1 << 20), "the whole file was read for a client that had left"


@pytest_twisted.ensureDeferred
async def test_delete_is_refused_while_attached_and_removes_the_file_otherwise(tmp_path, clock):
    usage = UsagePlugin()
    async with controller(tmp_path, clock, usage) as api:
        attached = (await upload(api, "a.iso"))[1]["data"]
        loose = (await upload(api, "b.iso"))[1]["data"]
        usage.in_use[("iso", attached["uuid"])] = "模板 t1 已挂载"
        status, body = await api.call("DELETE", ISOS, {"uuids": [attached["uuid"]]})
        assert status == 409 and body["code"] == 1019 and "t1" in body["msg"]
        status, body = await api.call("DELETE", ISOS, {"uuids": [attached["uuid"], loose["uuid"], "ghost"]})
        assert status == 200
        assert (body["data"]["success_num"], body["data"]["failed_num"]) == (1, 2)
        assert {f["uuid"]: f["code"] for f in body["data"]["failures"]} == {attached["uuid"]: 1019, "ghost": 1012}
        assert files_in(iso_dir(api)) == [f"{attached['uuid']}.iso"]
        status, body = await api.call("GET", ISOS)
        assert [i["uuid"] for i in body["data"]["results"]] == [attached["uuid"]]
