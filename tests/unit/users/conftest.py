"""Fixtures and helpers of the users plugin's API tests.

Each test gets a real core (every built-in plugin, a fresh SQLite store) whose time source is a
:class:`~twisted.internet.task.Clock`: export links expire by advancing it, and teardown checks that
no delayed call was left on it.
"""
from __future__ import annotations

import contextlib
import io
import secrets
from pathlib import Path
from typing import Any, AsyncIterator, Iterable, Optional, Sequence

import pytest
import pytest_twisted
from twisted.internet.task import Clock

from kvmdesk.testing.api import ApiClient, api_client

GROUPS = "/personal/group"
USERS = "/personal/user/"
UPLOAD = "/personal/user/upload"
HEADER = ("用户名", "密码", "姓名", "用户组", "电话", "邮箱", "状态")


@contextlib.asynccontextmanager
async def users_api(tmp_path: Path, clock: Clock, config: Optional[dict] = None) -> AsyncIterator[ApiClient]:
    async with api_client(tmp_path, clock=clock, config=config) as client:
        yield client
    assert clock.getDelayedCalls() == [], "a delayed call was left on the clock"


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest_twisted.async_yield_fixture
async def api(tmp_path: Path, clock: Clock) -> AsyncIterator[ApiClient]:
    async with users_api(tmp_path, clock) as client:
        yield client


def ok(status: int, body: Any) -> Any:
    """The ``data`` of a successful envelope."""
    assert status == 200 and isinstance(body, dict) and body["code"] == 0, (status, body)
    return body["data"]


def failed(status: int, body: Any, expected_status: int, code: int) -> dict:
    assert isinstance(body, dict) and set(body) == {"code", "msg", "data"}, body
    assert (status, body["code"]) == (expected_status, code), (status, body)
    assert body["msg"], body
    return body


async def create_group(api: ApiClient, name: str, desc: str = "") -> dict:
    return ok(*await api.call("POST", GROUPS, {"name": name, "group_type": 2, "desc": desc}))


async def create_user(api: ApiClient, group_uuid: str, user_name: str, passwd: str = "pw-12345", **fields: Any) -> dict:
    param = {"group_uuid": group_uuid, "user_name": user_name, "passwd": passwd, **fields}
    return ok(*await api.call("POST", USERS, {"action": "single_create", "param": param}))


async def multi_create(api: ApiClient, group_uuid: str, prefix: str, count: int, *, postfix: int = 3,
                       start: int = 1, passwd: str = "bulk-pw-1", enabled: Any = 1) -> tuple[int, Any]:
    param = {"group_uuid": group_uuid, "prefix": prefix, "postfix": postfix, "postfix_start": start,
             "user_num": count, "passwd": passwd, "enabled": enabled}
    return await api.call("POST", USERS, {"action": "multi_create", "param": param})


async def group_users(api: ApiClient, group_uuid: str, **params: Any) -> list[dict]:
    data = ok(*await api.call("GET", USERS, params={"group": group_uuid, "page_size": 1000, **params}))
    return data["results"]


async def all_users(api: ApiClient) -> list[dict]:
    return ok(*await api.call("GET", USERS, params={"page_size": 1000}))["results"]


def refs(users: Iterable[dict]) -> list[dict]:
    return [{"uuid": u["uuid"], "user_name": u["user_name"]} for u in users]


def xlsx(rows: Sequence[Sequence[Any]], header: Sequence[str] = HEADER) -> bytes:
    """An .xlsx workbook with ``header`` and ``rows`` on its first sheet."""
    from openpyxl import Workbook

    book = Workbook()
    sheet = book.active
    sheet.append(list(header))
    for row in rows:
        sheet.append(list(row))
    out = io.BytesIO()
    book.save(out)
    return out.getvalue()


def multipart_body(fields: dict[str, str], files: Sequence[tuple[str, str, bytes]]) -> tuple[bytes, str]:
    """A multipart/form-data body and its content type; ``files`` are ``(field, filename, content)``."""
    boundary = "kvmdesk-" + secrets.token_hex(8)
    out = io.BytesIO()
    for name, value in fields.items():
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for field, filename, content in files:
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
                  "Content-Type: application/vnd.openxmlformats-officedocument.spreadsheetml.sheet\r\n\r\n".encode())
        out.write(content)
        out.write(b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


async def upload(api: ApiClient, content: bytes, *, enable: Optional[str] = "1", filename: str = "users.xlsx") -> tuple[int, Any]:
    fields = {} if enable is None else {"enable": enable}
    body, content_type = multipart_body(fields, [("file", filename, content)])
    return await api.call("POST", UPLOAD, data=body, headers={"Content-Type": content_type})


def relative(url: str) -> str:
    """The path and query of a URL the API answered, relative to ``/api/v1.0``."""
    prefix = "http://kvmdesk.test/api/v1.0"
    assert url.startswith(prefix), url
    return url[len(prefix):]


async def download(api: ApiClient, url: str) -> tuple[int, bytes, Any]:
    """Fetch a download URL as a browser would: without the bearer token."""
    response = await api.stub.request("GET", "http://kvmdesk.test/api/v1.0" + relative(url), headers={"Host": "kvmdesk.test"})
    return response.code, await response.content(), response.headers


def sheet_rows(content: bytes) -> list[tuple]:
    from openpyxl import load_workbook

    book = load_workbook(io.BytesIO(content), read_only=True)
    try:
        return [tuple("" if v is None else v for v in row) for row in book.worksheets[0].iter_rows(values_only=True)]
    finally:
        book.close()
