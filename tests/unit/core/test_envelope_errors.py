"""The envelope, the error catalogue, languages and HTTP statuses."""
from __future__ import annotations

import pytest
import pytest_twisted

from core_testlib import POOLS, assert_error, plugins_with, raw_call, running_api
from kvmdesk import hookimpl
from kvmdesk.core import errors
from kvmdesk.core.errors import ApiError, ErrorCode, define

MISSING = "0c0ffee0-0000-4000-8000-000000000000"


@pytest_twisted.ensureDeferred
async def test_success_envelope(api):
    status, body = await api.call("GET", POOLS)
    assert status == 200
    assert set(body) == {"code", "msg", "data"}
    assert body["code"] == 0 and body["msg"] == "成功"


@pytest_twisted.ensureDeferred
async def test_success_message_in_english(api):
    status, body = await api.call("GET", POOLS, headers={"Accept-Language": "en-US,en;q=0.9"})
    assert (status, body["code"], body["msg"]) == (200, 0, "success")


@pytest_twisted.ensureDeferred
async def test_error_message_zh_by_default(api):
    status, body = await api.call("PUT", f"{POOLS}/{MISSING}", {"name": "x"})
    assert_error(status, body, 404, errors.NOT_FOUND.code)
    assert body["msg"] == f"资源池不存在: {MISSING}"


@pytest.mark.parametrize(
    "header, expected",
    [("en", "en"), ("en-GB", "en"), ("EN-us, zh;q=0.5", "en"), ("zh-CN", "zh"), ("zh-CN,en;q=0.8", "zh"), ("fr", "zh")],
)
@pytest_twisted.ensureDeferred
async def test_accept_language_picks_the_message(api, header, expected):
    status, body = await api.call("PUT", f"{POOLS}/{MISSING}", {"name": "x"}, headers={"Accept-Language": header})
    assert_error(status, body, 404, errors.NOT_FOUND.code)
    if expected == "en":
        assert "not found" in body["msg"] and MISSING in body["msg"]
    else:
        assert body["msg"].startswith("资源池不存在")


@pytest_twisted.ensureDeferred
async def test_http_status_follows_the_class_of_error(api):
    """400 validation, 401, 404, 405, 409, 413 each come with their catalogue code."""
    cases = [
        (("POST", POOLS, b"{"), {}, 400, errors.INVALID_JSON),
        (("POST", POOLS, b'{"name": 1, "desc": ""}'), {}, 400, errors.INVALID_PARAM),
        (("GET", POOLS, None), {"auth": False}, 401, errors.UNAUTHENTICATED),
        (("GET", "/no/such/thing", None), {}, 404, errors.ROUTE_NOT_FOUND),
        (("PATCH", POOLS, None), {}, 405, errors.METHOD_NOT_ALLOWED),
        (("POST", POOLS, b'{"name": "default", "desc": ""}'), {}, 409, errors.ALREADY_EXISTS),
        (("POST", POOLS, b'{"name": "' + b"x" * (1 << 20) + b'", "desc": ""}'), {}, 413, errors.BODY_TOO_LARGE),
    ]
    for (method, path, data), kwargs, status_expected, error in cases:
        status, body, headers = await raw_call(api, method, path, data, **kwargs)
        assert_error(status, body, status_expected, error.code)
        assert error.status == status_expected
        assert headers.getRawHeaders(b"content-type") == [b"application/json; charset=utf-8"]


class _Failing:
    """A plugin whose handler fails unexpectedly and another that raises a plugin-defined code."""

    CODE = define(9901, 418, "测试错误 {what}", "test error {what}")

    @hookimpl
    def kvmdesk_routes(self, router, core):
        @router.endpoint("GET", "/test/boom", summary="fails", tags=("test",))
        async def boom(req):
            raise RuntimeError("secret internals")

        @router.endpoint("GET", "/test/teapot", summary="plugin error", tags=("test",))
        async def teapot(req):
            raise ApiError(self.CODE, data={"detail": 1}, what="teapot")


@pytest_twisted.ensureDeferred
async def test_unexpected_failure_is_a_500_envelope_with_request_id(tmp_path, clock):
    async with running_api(tmp_path, clock, plugins=plugins_with((_Failing(), "failing"))) as api:
        status, body, headers = await raw_call(api, "GET", "/test/boom")
        assert_error(status, body, 500, errors.INTERNAL_ERROR.code)
        assert "secret internals" not in body["msg"] and "Traceback" not in body["msg"]
        request_id = body["msg"].rsplit(" ", 1)[-1]
        assert len(request_id) == 12 and int(request_id, 16) >= 0
        status, body, _ = await raw_call(api, "GET", "/test/boom", headers={"Accept-Language": "en"})
        assert body["msg"].startswith("internal error, request id ")


@pytest_twisted.ensureDeferred
async def test_plugin_error_code_and_data(tmp_path, clock):
    async with running_api(tmp_path, clock, plugins=plugins_with((_Failing(), "failing"))) as api:
        status, body, _ = await raw_call(api, "GET", "/test/teapot")
        assert (status, body) == (418, {"code": 9901, "msg": "测试错误 teapot", "data": {"detail": 1}})
        status, body, _ = await raw_call(api, "GET", "/test/teapot", headers={"Accept-Language": "en"})
        assert body["msg"] == "test error teapot"


def test_catalogue_entries_are_complete():
    assert errors.CATALOGUE[0] is errors.SUCCESS and errors.SUCCESS.status == 200
    for code, entry in errors.CATALOGUE.items():
        assert entry.code == code
        assert entry.zh and entry.en, entry
        if code:
            assert 400 <= entry.status <= 599, entry
    core_codes = {c: e.status for c, e in errors.CATALOGUE.items() if 1000 <= c < 2000}
    assert core_codes[errors.INVALID_PARAM.code] == 400
    assert core_codes[errors.UNAUTHENTICATED.code] == 401
    assert core_codes[errors.FORBIDDEN.code] == 403
    assert core_codes[errors.NOT_FOUND.code] == 404
    assert core_codes[errors.ALREADY_EXISTS.code] == 409
    assert core_codes[errors.INTERNAL_ERROR.code] == 500


def test_duplicate_code_definition_is_refused(monkeypatch):
    monkeypatch.setattr(errors, "CATALOGUE", dict(errors.CATALOGUE))
    first = define(9950, 400, "甲", "a")
    assert define(9950, 400, "甲", "a") == first  # re-importing the same module is harmless
    with pytest.raises(ValueError, match="9950"):
        define(9950, 400, "乙", "b")
    with pytest.raises(ValueError, match="1012"):
        define(errors.NOT_FOUND.code, 404, "别的", "something else")
    assert errors.CATALOGUE[9950] == first


def test_message_with_a_missing_placeholder_never_raises():
    entry = ErrorCode(9990, 400, "缺少 {thing}", "missing {thing}")
    assert entry.message("en") == "missing {thing}"
    assert entry.message("zh", {"thing": "名称"}) == "缺少 名称"
    exc = ApiError(entry, thing="x")
    assert (exc.message("en"), exc.message()) == ("missing x", "缺少 x")


def test_resources_are_named_in_the_language_of_the_answer():
    from kvmdesk.core.errors import ALREADY_EXISTS, IN_USE, ApiError, Resource

    pool = Resource("资源池", "resource pool")
    error = ApiError(ALREADY_EXISTS, resource=pool, key="lab")
    assert (error.message("zh"), error.message("en")) == ("资源池已存在: lab", "resource pool already exists: lab")
    in_use = ApiError(IN_USE, resource=pool.named("lab"), reason=Resource("还有 2 个计算节点", "2 nodes in it"))
    assert in_use.message("en") == "resource pool lab is in use and cannot be deleted: 2 nodes in it"
    assert in_use.message("zh") == "资源池 lab正在使用中, 不能删除: 还有 2 个计算节点"


def test_no_plugin_names_a_resource_in_one_language_only():
    """Every ``resource=`` given to an error is a Resource (both languages), never a bare string."""
    import re
    from pathlib import Path

    import kvmdesk

    root = Path(kvmdesk.__file__).parent
    offenders = [f"{path.relative_to(root)}:{number}" for path in root.rglob("*.py")
                 for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
                 if re.search(r"""resource=f?["']""", line) or re.search(r"""^[A-Z_]*RESOURCE = ["']""", line)]
    assert offenders == []
