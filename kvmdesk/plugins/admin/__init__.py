"""Built-in plugin: administrator login/logout and the operation log (contract #3)."""
from __future__ import annotations

from pydantic import Field

from kvmdesk import hookimpl
from kvmdesk.api.models import Model
from kvmdesk.api.router import ApiRequest, Router
from kvmdesk.core import oplog
from kvmdesk.core.errors import Resource
from kvmdesk.core.paging import paged_search

OPLOG = Resource("操作日志", "operation log entry")
OPLOG_FIELDS = {"user_name": str, "user_ip": str, "content": str, "result": str, "module": str}


class Login(Model):
    username: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=256)


@hookimpl
def kvmdesk_routes(router: Router, core) -> None:
    @router.endpoint("POST", "/auth/login", summary="Log in; returns a bearer token", body=Login, auth=False,
                     tags=("auth",), oplog="管理员登录")
    async def login(req: ApiRequest) -> dict:
        return await req.core.auth.login(req.body.username, req.body.password, req.client_ip)

    @router.endpoint("POST", "/auth/logout", summary="Revoke the token of this request", tags=("auth",),
                     oplog="管理员退出")
    async def logout(req: ApiRequest) -> None:
        await req.core.auth.logout(req.http.getHeader(b"authorization"))
        return None

    @router.endpoint("GET", "/index/get_operation_log/", summary="Operation log, newest first, paged",
                     tags=("index",), search_fields=OPLOG_FIELDS)
    async def operation_log(req: ApiRequest) -> dict:
        return await paged_search(req, req.core.store.collection(oplog.COLLECTION), OPLOG_FIELDS,
                                  sort=[("id", -1)], resource=OPLOG)
