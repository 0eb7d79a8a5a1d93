"""Trailing-slash tolerance and 404/405 answers: always the JSON envelope, never Klein's HTML."""
from __future__ import annotations

import pytest
import pytest_twisted

from core_testlib import POOLS, assert_error, raw_call
from kvmdesk.core import errors


@pytest.mark.parametrize(
    "path", [POOLS, POOLS + "/", "/index/get_operation_log/", "/index/get_operation_log"]
)
@pytest_twisted.ensureDeferred
async def test_list_paths_with_and_without_trailing_slash(api, path):
    status, body = await api.call("GET", path)
    assert (status, body["code"]) == (200, 0)
    assert {"count", "next", "previous", "results"} <= set(body["data"])


@pytest_twisted.ensureDeferred
async def test_write_paths_with_and_without_trailing_slash(api):
    status, body = await api.call("POST", POOLS + "/", {"name": "slash", "desc": ""})
    assert (status, body["code"]) == (200, 0)
    uuid = body["data"]["uuid"]
    status, body = await api.call("PUT", f"{POOLS}/{uuid}/", {"desc": "edited"})
    assert (status, body["data"]["desc"]) == (200, "edited")
    status, body = await api.call("DELETE", POOLS + "/", {"uuids": [uuid]})
    assert (status, body["code"]) == (200, 0)


@pytest.mark.parametrize(
    "path",
    ["/no/such/endpoint", "/resource_mgr/resource_pools/a/b/c", "/", "/resource_mgr"],
)
@pytest.mark.parametrize("with_token", [True, False])
@pytest_twisted.ensureDeferred
async def test_unknown_path_is_a_404_envelope(api, path, with_token):
    status, body, headers = await raw_call(api, "GET", path, auth=with_token)
    assert_error(status, body, 404, errors.ROUTE_NOT_FOUND.code)
    assert headers.getRawHeaders(b"content-type") == [b"application/json; charset=utf-8"]


@pytest_twisted.ensureDeferred
async def test_path_outside_the_api_prefix_is_a_404_envelope(api):
    response = await api.stub.request("GET", "http://kvmdesk.test/index.html", headers={"Host": "kvmdesk.test"})
    content = await response.content()
    assert response.code == 404 and b"<html" not in content.lower()
    assert response.headers.getRawHeaders(b"content-type") == [b"application/json; charset=utf-8"]


@pytest_twisted.ensureDeferred
async def test_404_message_in_english(api):
    status, body, _ = await raw_call(api, "GET", "/nope", headers={"Accept-Language": "en"})
    assert body["msg"] == "no such endpoint: /api/v1.0/nope"


@pytest.mark.parametrize(
    "method, path, allowed",
    [
        ("PATCH", POOLS, {"GET", "POST", "DELETE"}),
        ("PUT", POOLS + "/", {"GET", "POST", "DELETE"}),
        ("GET", POOLS + "/some-uuid", {"PUT"}),
        ("DELETE", "/auth/login", {"POST"}),
        ("OPTIONS", "/openapi.json", {"GET"}),
    ],
)
@pytest_twisted.ensureDeferred
async def test_wrong_method_is_a_405_envelope(api, method, path, allowed):
    status, body, headers = await raw_call(api, method, path, b"{}")
    assert_error(status, body, 405, errors.METHOD_NOT_ALLOWED.code)
    assert method in body["msg"]
    assert headers.getRawHeaders(b"content-type") == [b"application/json; charset=utf-8"]
    advertised = {m.strip() for m in headers.getRawHeaders(b"allow")[0].decode().split(",")}
    assert allowed <= advertised
