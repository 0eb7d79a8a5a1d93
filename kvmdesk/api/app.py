"""Assembly of the controller's API: the router, the plugins' routes and the OpenAPI document."""
from __future__ import annotations

from typing import TYPE_CHECKING

from kvmdesk.api.openapi import openapi_document
from kvmdesk.api.router import ApiRequest, Router

if TYPE_CHECKING:  # pragma: no cover
    from kvmdesk.core.app import Core


def make_router(core: "Core") -> Router:
    """Create the router, let every plugin add its routes, and add ``/openapi.json``."""
    router = Router(core, max_body=int(core.config.get("api.max_body", 1 << 20)))
    router.recorders.append(core.oplog.record)
    core.plugins.hook.kvmdesk_routes(router=router, core=core)

    @router.endpoint("GET", "/openapi.json", summary="OpenAPI 3 document of this API (the document, not an envelope)",
                     auth=False, tags=("meta",), produces=("application/json",), file_only=True)
    async def openapi(req: ApiRequest) -> bytes:
        req.http.setHeader(b"content-type", b"application/json; charset=utf-8")
        return router.render_json(req.http, openapi_document(router))

    return router
