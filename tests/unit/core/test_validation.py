"""Request bodies are validated into models before any handler logic; a 400 envelope names the field."""
from __future__ import annotations

import pytest
import pytest_twisted
from pydantic import Field

from core_testlib import POOLS, assert_error, raw_call, running_api, snapshot
from kvmdesk.api.models import Model, Uuids, field_name, validate
from kvmdesk.core import errors
from kvmdesk.core.errors import ApiError

EN = {"Accept-Language": "en"}


@pytest.mark.parametrize(
    "body, field",
    [
        (b'{"desc": "d"}', "name"),  # missing
        (b'{"name": "p"}', "desc"),  # missing (the contract marks desc required)
        (b"{}", "name"),
        (b"", "name"),  # an empty body is an empty object
        (b'{"name": 5, "desc": "d"}', "name"),  # wrong type: strict, no coercion
        (b'{"name": ["p"], "desc": "d"}', "name"),
        (b'{"name": "p", "desc": 1.5}', "desc"),
        (b'{"name": "p", "desc": "d", "colour": "red"}', "colour"),  # unknown
        (b'{"name": "", "desc": "d"}', "name"),  # too short
        (b'{"name": "' + b"n" * 65 + b'", "desc": "d"}', "name"),  # too long
        (b'[{"name": "p", "desc": "d"}]', "body"),  # not an object
        (b"null", "body"),
        (b'"text"', "body"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_bad_create_body_names_the_field(api, body, field):
    before = await snapshot(api.core)
    status, envelope, _ = await raw_call(api, "POST", POOLS, body, headers=EN)
    assert_error(status, envelope, 400, errors.INVALID_PARAM.code)
    assert envelope["msg"].startswith(f"invalid parameter {field}:"), envelope["msg"]
    assert envelope["data"][0]["field"] == field and envelope["data"][0]["reason"]
    assert await snapshot(api.core) == before


@pytest_twisted.ensureDeferred
async def test_message_names_the_field_in_chinese_too(api):
    status, envelope, _ = await raw_call(api, "POST", POOLS, b'{"desc": "d"}')
    assert status == 400 and envelope["msg"].startswith("参数错误: name:")


@pytest_twisted.ensureDeferred
async def test_every_problem_is_listed(api):
    status, envelope, _ = await raw_call(api, "POST", POOLS, b'{"name": 1, "desc": 2, "x": 3}')
    assert status == 400
    assert {p["field"] for p in envelope["data"]} == {"name", "desc", "x"}


@pytest.mark.parametrize("body", [b'{"uuids": [1]}', b'{"uuids": ["a", null]}', b'{"uuids": "a"}'])
@pytest_twisted.ensureDeferred
async def test_nested_field_paths(api, body):
    status, envelope, _ = await raw_call(api, "DELETE", POOLS, body, headers=EN)
    assert_error(status, envelope, 400, errors.INVALID_PARAM.code)
    assert envelope["data"][0]["field"].startswith("uuids")
    if body.startswith(b'{"uuids": [1]'):
        assert envelope["data"][0]["field"] == "uuids.0"


@pytest.mark.parametrize(
    "body",
    [b"{", b'{"name": "p",}', b"{'name': 'p'}", b'{"name": NaN}', b"\xff\xfe{}", b"[" * 5000 + b"]" * 5000,
     b'{"name": "p"} trailing'],
)
@pytest_twisted.ensureDeferred
async def test_malformed_json(api, body):
    before = await snapshot(api.core)
    status, envelope, _ = await raw_call(api, "POST", POOLS, body)
    assert_error(status, envelope, 400, errors.INVALID_JSON.code)
    assert envelope["msg"].startswith("请求体不是有效的JSON")
    assert await snapshot(api.core) == before


@pytest_twisted.ensureDeferred
async def test_oversize_body_at_the_default_limit(api):
    limit = api.core.router.max_body
    assert limit == 1 << 20
    padding = b"x" * (limit - len(b'{"name": "big", "desc": ""}'))
    exactly = b'{"name": "big", "desc": "' + padding + b'"}'
    assert len(exactly) == limit
    status, envelope, _ = await raw_call(api, "POST", POOLS, exactly, headers=EN)
    # At the limit the body is parsed (and the 1024-character desc is what fails).
    assert_error(status, envelope, 400, errors.INVALID_PARAM.code)
    assert envelope["data"][0]["field"] == "desc"
    status, envelope, _ = await raw_call(api, "POST", POOLS, exactly + b" ", headers=EN)
    assert_error(status, envelope, 413, errors.BODY_TOO_LARGE.code)
    assert envelope["msg"] == f"request body too large (limit {limit} bytes)"


@pytest_twisted.ensureDeferred
async def test_oversize_body_with_a_configured_limit(tmp_path, clock):
    async with running_api(tmp_path, clock, config={"api": {"max_body": 64}}) as api:
        before = await snapshot(api.core)
        status, envelope, _ = await raw_call(api, "POST", POOLS, b'{"name": "ok", "desc": "fits"}')
        assert (status, envelope["code"]) == (200, 0)
        status, envelope, _ = await raw_call(api, "POST", POOLS, b'{"name": "no", "desc": "' + b"d" * 64 + b'"}')
        assert_error(status, envelope, 413, errors.BODY_TOO_LARGE.code)
        assert len(await snapshot(api.core)) == len(before) + 1


class _Nested(Model):
    class Inner(Model):
        x: int = Field(ge=0)

    items: list[Inner]


def test_validate_reports_paths_with_a_prefix():
    with pytest.raises(ApiError) as raised:
        validate(_Nested, {"items": [{"x": 1}, {"x": -1}]}, ("param",))
    assert raised.value.params["field"] == "param.items.1.x"
    assert raised.value.data == [{"field": "param.items.1.x", "reason": raised.value.params["reason"]}]
    assert validate(Uuids, {"uuids": ["a"]}).uuids == ["a"]
    assert field_name(()) == "body"
