"""Export to .xlsx behind a signed, expiring URL, and import of the same format (contract #110, #111)."""
from __future__ import annotations

import io
import zipfile
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest_twisted
from twisted.internet import defer

from kvmdesk.plugins.users import verify_user_password
from kvmdesk.plugins.users.exports import ExportSweeper, exports_of

from .conftest import (
    HEADER,
    UPLOAD,
    USERS,
    all_users,
    create_group,
    create_user,
    download,
    failed,
    group_users,
    multi_create,
    multipart_body,
    ok,
    refs,
    sheet_rows,
    upload,
    users_api,
    xlsx,
)

COMPARED = ("user_name", "name", "phone", "email", "enabled", "group")


async def export(api, users, filename: str = "user") -> dict:
    return ok(*await api.call("POST", USERS, {"action": "export", "param": {"filename": filename, "users": refs(users)}}))


def export_files(api) -> list:
    return sorted(p.name for p in exports_of(api.core).directory.iterdir())


def with_query(url: str, **changes: str) -> str:
    parts = urlsplit(url)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    query.update(changes)
    return f"{parts.scheme}://{parts.netloc}{parts.path}?{urlencode(query)}"


@pytest_twisted.ensureDeferred
async def test_export_answers_a_download_url(api):
    group = await create_group(api, "group1")
    await create_user(api, group["uuid"], "ctx01", name="John", phone="13144556677", email="j@example.com")
    await create_user(api, group["uuid"], "ctx02", enabled=False)
    users = await group_users(api, group["uuid"])
    data = await export(api, users)
    assert data["url"].startswith("http://kvmdesk.test/api/v1.0/personal/user/download?")
    assert (data["success_num"], data["failed_num"]) == (2, 0)
    status, content, headers = await download(api, data["url"])
    assert status == 200
    assert headers.getRawHeaders("content-type") == ["application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"]
    assert 'filename="user.xlsx"' in headers.getRawHeaders("content-disposition")[0]
    assert sheet_rows(content) == [
        HEADER,
        ("ctx01", "", "John", "group1", "13144556677", "j@example.com", "启用"),
        ("ctx02", "", "", "group1", "", "", "禁用"),
    ]


@pytest_twisted.ensureDeferred
async def test_download_links_are_signed_and_expire(api, clock):
    group = await create_group(api, "g")
    user = await create_user(api, group["uuid"], "u")
    url = (await export(api, [user]))["url"]
    query = parse_qs(urlsplit(url).query)
    for forged in (with_query(url, sig="0" * 64), with_query(url, name="other.xlsx"),
                   with_query(url, expires=str(int(query["expires"][0]) + 3600)),
                   with_query(url, file="../../kvmdesk.db"), with_query(url, file="f" * 32)):
        status, content, _ = await download(api, forged)
        assert status == 403, (forged, content)
    assert (await download(api, url))[0] == 200
    clock.advance(601)
    status, content, _ = await download(api, url)
    assert status == 403 and b"7010" in content


@pytest_twisted.ensureDeferred
async def test_export_file_names_are_only_download_names(api):
    group = await create_group(api, "g")
    user = await create_user(api, group["uuid"], "u")
    url = (await export(api, [user], filename="../../etc/用户 列表.XLSX"))["url"]
    status, _, headers = await download(api, url)
    disposition = headers.getRawHeaders("content-disposition")[0]
    assert status == 200 and "filename*=UTF-8''etc_%E7%94%A8%E6%88%B7%20%E5%88%97%E8%A1%A8.xlsx" in disposition
    # On disk the file has a random name inside the exports directory, nothing else.
    (name,) = export_files(api)
    assert len(name) == len("0" * 32 + ".xlsx")


@pytest_twisted.ensureDeferred
async def test_export_of_missing_users(api):
    group = await create_group(api, "g")
    user = await create_user(api, group["uuid"], "u")
    ghost = {"uuid": "gone", "user_name": "gone"}
    failed(*await api.call("POST", USERS, {"action": "export", "param": {"filename": "x", "users": [ghost]}}), 404, 1012)
    data = ok(*await api.call("POST", USERS, {"action": "export", "param": {"filename": "x", "users": [*refs([user]), ghost]}}))
    assert (data["success_num"], data["failed_num"]) == (1, 1)
    status, content, _ = await download(api, data["url"])
    assert [row[0] for row in sheet_rows(content)] == ["用户名", "u"]


@pytest_twisted.ensureDeferred
async def test_expired_exports_are_deleted(api, clock):
    group = await create_group(api, "g")
    user = await create_user(api, group["uuid"], "u")
    await export(api, [user])
    assert len(export_files(api)) == 1
    sweeper = ExportSweeper(api.core, interval=60)
    sweeper.startService()
    try:
        clock.advance(60)
        assert len(export_files(api)) == 1  # not expired yet
        clock.advance(600)  # the round runs the deletion in a thread: wait for it
        assert sweeper.current_round is not None  # the deleting round is in flight
        await sweeper.current_round
        assert export_files(api) == []
    finally:
        await sweeper.stopService()


@pytest_twisted.ensureDeferred
async def test_start_up_purges_left_over_exports(api):
    group = await create_group(api, "g")
    user = await create_user(api, group["uuid"], "u")
    url = (await export(api, [user]))["url"]
    from kvmdesk.plugins.users.plugin import startup

    await startup(api.core)
    assert export_files(api) == []
    assert (await download(api, url))[0] == 404


@pytest_twisted.ensureDeferred
async def test_export_import_round_trip_restores_the_same_users(api):
    first = await create_group(api, "first")
    second = await create_group(api, "second")
    await create_user(api, first["uuid"], "alice", name="Alice Li", phone="13144556677", email="alice@example.com")
    await create_user(api, first["uuid"], "bob", name="=SUM(A1:A2)", enabled=False)
    await create_user(api, second["uuid"], "1001", phone="+86 (10) 1234-5678")
    ok(*await multi_create(api, second["uuid"], "ctx", 3, postfix=2))
    before = sorted(({k: u[k] for k in COMPARED} for u in await all_users(api)), key=lambda u: u["user_name"])
    url = (await export(api, await all_users(api), filename="backup"))["url"]
    status, content, _ = await download(api, url)
    assert status == 200
    ok(*await api.call("DELETE", USERS, {"users": refs(await all_users(api))}))
    assert await all_users(api) == []

    result = ok(*await upload(api, content, enable="1", filename="backup.xlsx"))
    assert (result["success_num"], result["failed_num"], result["failures"]) == (6, 0, [])
    after = sorted(({k: u[k] for k in COMPARED} for u in await all_users(api)), key=lambda u: u["user_name"])
    assert after == before
    # Passwords never leave the controller, so restored users have none until an administrator sets one.
    assert await verify_user_password(api.core, "ctx01", "bulk-pw-1") is None


@pytest_twisted.ensureDeferred
async def test_import_with_passwords(api):
    group = await create_group(api, "class")
    rows = [("s1", "pw-one", "", "class", "", "", ""), ("s2", "pw-two", "", "class", "", "", ""),
            ("s3", "pw-one", "", "class", "", "", "禁用"), ("s4", 123456, "", "class", 13144556677, "", 1)]
    result = ok(*await upload(api, xlsx(rows)))
    assert (result["success_num"], result["failed_num"]) == (4, 0)
    assert await verify_user_password(api.core, "s1", "pw-one") is not None
    assert await verify_user_password(api.core, "s2", "pw-two") is not None
    assert await verify_user_password(api.core, "s2", "pw-one") is None
    assert await verify_user_password(api.core, "s4", "123456") is not None
    users = {u["user_name"]: u for u in await group_users(api, group["uuid"])}
    assert (users["s3"]["enabled"], users["s4"]["phone"]) == (False, "13144556677")


@pytest_twisted.ensureDeferred
async def test_import_disabled(api):
    await create_group(api, "class")
    result = ok(*await upload(api, xlsx([("a", "p", "", "class", "", "", "启用"), ("b", "p", "", "class", "", "", "")]),
                              enable="0"))
    assert result["success_num"] == 2
    assert [u["enabled"] for u in await all_users(api)] == [False, False]
    failed(*await upload(api, xlsx([("c", "p", "", "class", "", "", "")]), enable="maybe"), 400, 1002)
    assert len(await all_users(api)) == 2


@pytest_twisted.ensureDeferred
async def test_import_reports_each_bad_row(api):
    group = await create_group(api, "class")
    await create_user(api, group["uuid"], "taken")
    rows = [
        ("good1", "p", "Good", "class", "", "", ""),            # row 2
        ("taken", "p", "", "class", "", "", ""),                # row 3: exists
        ("good1", "p", "", "class", "", "", ""),                # row 4: repeated in the file
        ("lost", "p", "", "no-such-group", "", "", ""),         # row 5: missing group
        ("bad mail", "p", "", "class", "", "x@", ""),           # row 6: bad name (and mail)
        ("mail", "p", "", "class", "", "not-an-address", ""),   # row 7: bad e-mail
        ("", "p", "", "class", "", "", ""),                     # row 8: no user name
        ("state", "p", "", "class", "", "", "maybe"),           # row 9: unknown status
        ("nogroup", "p", "", "", "", "", ""),                   # row 10: no group
        (None, None, None, None, None, None, None),             # row 11: blank, skipped
        ("good2", "p", "", "class", "010-1234", "g@example.com", "禁用"),  # row 12
    ]
    result = ok(*await upload(api, xlsx(rows)))
    assert (result["success_num"], result["failed_num"]) == (2, 8)
    reasons = {f["row"]: (f["user_name"], f["code"]) for f in result["failures"]}
    assert reasons == {3: ("taken", 1013), 4: ("good1", 7013), 5: ("lost", 1012), 6: ("bad mail", 7014),
                       7: ("mail", 7014), 8: ("", 7014), 9: ("state", 7014), 10: ("nogroup", 7014)}
    assert all(f["msg"] for f in result["failures"])
    assert sorted(u["user_name"] for u in await all_users(api)) == ["good1", "good2", "taken"]


@pytest_twisted.ensureDeferred
async def test_import_finds_columns_by_header(api):
    await create_group(api, "class")
    content = xlsx([("class", "x@example.com", "col")], header=("group", "email", "user_name"))
    assert ok(*await upload(api, content))["success_num"] == 1
    (user,) = await all_users(api)
    assert (user["user_name"], user["email"]) == ("col", "x@example.com")


@pytest_twisted.ensureDeferred
async def test_malformed_files_import_nothing(api):
    await create_group(api, "class")
    good_row = ("u1", "p", "", "class", "", "", "")
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as package:
        package.writestr("readme.txt", "not a workbook")
    cases = [
        (b"user_name,passwd\nu1,p\n", 7006),                                 # a CSV
        (b"\xd0\xcf\x11\xe0" + b"\0" * 512, 7006),                           # an old .xls
        (archive.getvalue(), 7006),                                          # a zip without a workbook
        (xlsx([good_row])[:300], 7006),                                      # a truncated .xlsx
        (xlsx([good_row], header=("用户名", "密码", "颜色")), 7008),           # unknown column
        (xlsx([("u1", "p")], header=("用户名", "密码")), 7008),                # no group column
        (xlsx([]), 7012),                                                    # a header and no users
    ]
    for content, code in cases:
        status, body = await upload(api, content)
        failed(status, body, 400, code)
    assert await all_users(api) == []


@pytest_twisted.ensureDeferred
async def test_bad_uploads_import_nothing(api):
    await create_group(api, "class")
    content = xlsx([("u1", "p", "", "class", "", "", "")])
    status, body = await api.call("POST", UPLOAD, {"file": "u1"})
    failed(status, body, 415, 1016)
    raw, content_type = multipart_body({"enable": "1"}, [])
    failed(*await api.call("POST", UPLOAD, data=raw, headers={"Content-Type": content_type}), 400, 7009)
    raw, content_type = multipart_body({"enable": "1"}, [("file", "u.xlsx", content)])
    broken = raw[: len(raw) // 2]
    failed(*await api.call("POST", UPLOAD, data=broken, headers={"Content-Type": content_type}), 400, 7009)
    api.token = None
    failed(*await upload(api, content), 401, 1008)
    await api.login()
    assert await all_users(api) == []


@pytest_twisted.ensureDeferred
async def test_oversize_uploads_are_refused(tmp_path, clock):
    async with users_api(tmp_path, clock, {"users": {"max_upload": 20000}}) as api:
        await create_group(api, "class")
        rows = [(f"user{n:05d}", f"password-{n}", "x" * 40, "class", "", f"user{n}@example.com", "") for n in range(2000)]
        status, body = await upload(api, xlsx(rows))
        failed(status, body, 413, 7005)
        assert await all_users(api) == []
        assert ok(*await upload(api, xlsx(rows[:3])))["success_num"] == 3


@pytest_twisted.ensureDeferred
async def test_zip_bombs_and_long_files_are_refused(tmp_path, clock):
    config = {"users": {"max_unpacked": 50000, "max_import_rows": 5}}
    async with users_api(tmp_path, clock, config) as api:
        await create_group(api, "class")
        rows = [(f"u{n}", "p", "", "class", "", "", "") for n in range(6)]
        failed(*await upload(api, xlsx(rows)), 400, 7007)
        padded = [(f"u{n}", "p", "y" * 1000, "class", "", "", "") for n in range(5)]
        bomb = io.BytesIO()
        with zipfile.ZipFile(io.BytesIO(xlsx(padded))) as source, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as out:
            for item in source.infolist():
                out.writestr(item, source.read(item))
            out.writestr("xl/media/padding.bin", b"\0" * 100000)
        failed(*await upload(api, bomb.getvalue()), 400, 7006)
        assert await all_users(api) == []
        assert ok(*await upload(api, xlsx(rows[:5])))["success_num"] == 5


@pytest_twisted.ensureDeferred
async def test_import_hashes_a_few_passwords_at_a_time(tmp_path, clock, monkeypatch):
    from kvmdesk.plugins.users import imports

    running = []
    peak = []
    real = imports.hash_password

    async def counting(password):
        running.append(password)
        peak.append(len(running))
        try:
            return await real(password)
        finally:
            running.remove(password)

    monkeypatch.setattr(imports, "hash_password", lambda password: defer.ensureDeferred(counting(password)))
    async with users_api(tmp_path, clock, {"users": {"hash_concurrency": 2}}) as api:
        await create_group(api, "class")
        rows = [(f"u{n}", f"distinct-{n}", "", "class", "", "", "") for n in range(8)]
        assert ok(*await upload(api, xlsx(rows)))["success_num"] == 8
    assert len(peak) == 8 and max(peak) <= 2


@pytest_twisted.ensureDeferred
async def test_a_worker_that_runs_out_of_time_fails_cleanly(tmp_path, clock):
    async with users_api(tmp_path, clock, {"users": {"sheet_timeout": 0}}) as api:
        group = await create_group(api, "class")
        user = await create_user(api, group["uuid"], "u")
        status, body = await upload(api, xlsx([("new", "p", "", "class", "", "", "")]))
        failed(status, body, 400, 7006)
        status, body = await api.call("POST", USERS, {"action": "export", "param": {"filename": "x", "users": refs([user])}})
        failed(status, body, 500, 1015)
        assert [u["user_name"] for u in await all_users(api)] == ["u"]
        assert export_files(api) == []


@pytest_twisted.ensureDeferred
async def test_exports_directory_is_private(api):
    group = await create_group(api, "g")
    user = await create_user(api, group["uuid"], "u")
    await export(api, [user])
    assert exports_of(api.core).directory.stat().st_mode & 0o777 == 0o700


def test_a_chunked_upload_is_refused_once_it_grows_too_large():
    from kvmdesk.api.streaming import StreamContext
    from kvmdesk.core.config import Config
    from kvmdesk.core.errors import ApiError
    from kvmdesk.plugins.users.imports import UploadSink

    class Core:
        config = Config([{"users": {"max_upload": 1000}}])

    class Request:
        @staticmethod
        def getHeader(name):
            return b"multipart/form-data; boundary=b0undary" if name == b"content-type" else None

    sink = UploadSink(StreamContext(request=Request(), path={}, args={}, length=None, core=Core()))
    sink.write(b'--b0undary\r\nContent-Disposition: form-data; name="file"; filename="u.xlsx"\r\n\r\n' + b"x" * 500)
    try:
        sink.write(b"x" * 600)
    except ApiError as exc:
        assert exc.error.code == 7005
    else:
        raise AssertionError("a body over the limit was accepted")
    sink.abort(None)
    assert sink.file == bytearray()


def test_imports_leave_a_core_for_the_reactor(monkeypatch):
    from kvmdesk.core.config import Config
    from kvmdesk.plugins.users import imports

    class Core:
        config = Config([{"users": {"hash_concurrency": 0}}])

    for cores, expected in ((1, 1), (2, 1), (8, 7)):
        monkeypatch.setattr(imports.os, "cpu_count", lambda cores=cores: cores)
        assert imports.hash_concurrency(Core()) == expected
    Core.config.set("users.hash_concurrency", 3)
    assert imports.hash_concurrency(Core()) == 3
