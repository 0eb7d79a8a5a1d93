"""No response of any users endpoint carries a password or a password hash.

The test walks every endpoint the plugin registers (every action of the action endpoint too), in
success and in failure, and searches the raw bytes of each response, the operation log and the
exported workbook for the passwords used, their md5 (the contract's ``passwd``) and ``$argon2``.
"""
from __future__ import annotations

import hashlib
import io
import zipfile
from typing import Any, Optional

import orjson
import pytest_twisted

from .conftest import GROUPS, UPLOAD, USERS, multipart_body, relative, xlsx

PASSWORDS = ["Walk-Secret-1", "Bulk-Secret-2", "Update-Secret-3", "Import-Secret-4", "Import-Secret-5"]
FORBIDDEN = [p.encode() for p in PASSWORDS] + [hashlib.md5(p.encode()).hexdigest().encode() for p in PASSWORDS] + [b"$argon2"]
TAGS = {"users", "user_groups"}


class Walker:
    """Sends requests, keeps every response body, and notes which endpoint (and action) it exercised."""

    def __init__(self, api: Any):
        self.api = api
        self.bodies: list[bytes] = []
        self.visited: set[tuple[str, str, Optional[str]]] = set()

    async def send(self, method: str, path: str, json: Any = None, *, endpoint: str, action: Optional[str] = None,
                   data: Optional[bytes] = None, headers: Optional[dict] = None, params: Optional[dict] = None,
                   auth: bool = True) -> tuple[int, Any]:
        sent = {"Host": "kvmdesk.test", **(headers or {})}
        if auth:
            sent["Authorization"] = f"Bearer {self.api.token}"
        if json is not None:
            data = orjson.dumps(json)
            sent["Content-Type"] = "application/json"
        response = await self.api.stub.request(method, "http://kvmdesk.test/api/v1.0" + path, data=data,
                                               headers=sent, params=params)
        content = await response.content()
        self.bodies.append(content)
        self.visited.add((method, endpoint, action))
        try:
            return response.code, orjson.loads(content)
        except orjson.JSONDecodeError:
            return response.code, content

    async def action(self, name: str, param: Any) -> tuple[int, Any]:
        return await self.send("POST", USERS, {"action": name, "param": param}, endpoint="/personal/user/", action=name)


@pytest_twisted.ensureDeferred
async def test_no_response_contains_a_password_or_hash(api):
    walk = Walker(api)
    status, body = await walk.send("POST", GROUPS, {"name": "group1", "group_type": 2, "desc": "d"}, endpoint=GROUPS)
    group = body["data"]
    status, body = await walk.send("POST", GROUPS, {"name": "group2", "group_type": 2}, endpoint=GROUPS)
    other = body["data"]
    await walk.send("PUT", GROUPS, {"uuid": other["uuid"], "name": "group2", "value": {"name": "group3"}}, endpoint=GROUPS)

    create = {"group_uuid": group["uuid"], "user_name": "walker", "passwd": PASSWORDS[0], "name": "W"}
    status, body = await walk.action("single_create", create)
    assert status == 200
    walker = body["data"]
    status, body = await walk.action("single_create", create)  # duplicate: an error that echoes nothing secret
    assert status == 409
    status, body = await walk.action("single_create", {**create, "user_name": "x y"})
    assert status == 400
    status, body = await walk.action("single_create", {**create, "user_name": "long", "passwd": PASSWORDS[0] * 20})
    assert status == 400
    bulk = {"group_uuid": group["uuid"], "prefix": "ctx", "postfix": 2, "postfix_start": 1, "user_num": 3,
            "passwd": PASSWORDS[1], "enabled": 1}
    assert (await walk.action("multi_create", bulk))[0] == 200
    assert (await walk.action("multi_create", bulk))[0] == 200  # all collide: failures listed

    status, body = await walk.send("GET", USERS, params={"group": group["uuid"], "page_size": 100}, endpoint="/personal/user/")
    users = body["data"]["results"]
    ids = [{"uuid": u["uuid"], "user_name": u["user_name"]} for u in users]
    await walk.send("GET", USERS, params={"searchtype": "single", "user_name": "walker"}, endpoint="/personal/user/")
    await walk.send("GET", USERS, params={"searchtype": "contain", "user_name": "ctx"}, endpoint="/personal/user/")
    update = {"uuid": walker["uuid"], "user_name": "walker",
              "value": {"group_uuid": group["uuid"], "user_name": "walker", "passwd": PASSWORDS[2]}}
    assert (await walk.send("PUT", USERS, update, endpoint="/personal/user/"))[0] == 200
    bad_update = {**update, "value": {**update["value"], "group_uuid": "missing"}}
    assert (await walk.send("PUT", USERS, bad_update, endpoint="/personal/user/"))[0] == 404
    assert (await walk.action("disable", {"users": ids[:2]}))[0] == 200
    assert (await walk.action("enable", {"users": ids[:1]}))[0] == 200
    assert (await walk.action("move", {"group_uuid": other["uuid"], "group_name": "group3", "users": ids[-1:]}))[0] == 200
    await walk.send("GET", GROUPS, params={"searchtype": "all", "group_type": 2}, endpoint=GROUPS)
    await walk.send("GET", GROUPS, params={"searchtype": "single", "name": "group1"}, endpoint=GROUPS)

    status, body = await walk.action("export", {"filename": "user", "users": ids})
    assert status == 200
    status, workbook = await walk.send("GET", relative(body["data"]["url"]), endpoint="/personal/user/download", auth=False)
    assert status == 200
    with zipfile.ZipFile(io.BytesIO(workbook)) as package:
        walk.bodies.extend(package.read(name) for name in package.namelist())
    await walk.send("GET", "/personal/user/download?file=0&expires=1&sig=x", endpoint="/personal/user/download", auth=False)

    rows = [("imported", PASSWORDS[3], "", "group1", "", "", ""), ("walker", PASSWORDS[4], "", "group1", "", "", ""),
            ("bad row", PASSWORDS[4], "", "group1", "", "", "")]
    raw, content_type = multipart_body({"enable": "1"}, [("file", "in.xlsx", xlsx(rows))])
    status, body = await walk.send("POST", UPLOAD, data=raw, headers={"Content-Type": content_type}, endpoint=UPLOAD)
    assert status == 200 and (body["data"]["success_num"], body["data"]["failed_num"]) == (1, 2)

    all_ids = ids + [{"uuid": walker["uuid"], "user_name": "walker"}]
    assert (await walk.send("DELETE", USERS, {"users": all_ids}, endpoint="/personal/user/"))[0] == 200
    assert (await walk.send("DELETE", GROUPS, {"groups": [{"uuid": group["uuid"], "name": "group1"}]}, endpoint=GROUPS))[0] == 409

    # Every users endpoint, and every action, was exercised.
    expected = set()
    for spec in api.core.router.registry:
        if TAGS & set(spec.tags):
            if spec.actions is not None:
                expected |= {(spec.method, spec.path, name) for name in spec.actions}
            else:
                expected.add((spec.method, spec.path, None))
    assert walk.visited == expected

    status, body = await api.call("GET", "/index/get_operation_log/", params={"page_size": 100})
    assert status == 200 and body["data"]["count"] >= 15
    walk.bodies.append(orjson.dumps(body))

    for content in walk.bodies:
        for secret in FORBIDDEN:
            assert secret not in content, (secret, content[:500])
