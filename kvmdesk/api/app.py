"""Assembly of the controller's API: the router, the plugins' routes and the OpenAPI document."""
from __future__ import annotations

from importlib import resources
from typing import TYPE_CHECKING

from kvmdesk.api.openapi import openapi_document
from kvmdesk.api.router import ApiRequest, Router

if TYPE_CHECKING:  # pragma: no cover
    from kvmdesk.core.app import Core

#: A self-contained page (no CDN: users' browsers may have no internet) that renders /openapi.json.
DOCS_PAGE = resources.files("kvmdesk.api").joinpath("static", "docs.html")


def make_router(core: "Core") -> Router:
    """Create the router, let every plugin add its routes, and add ``/openapi.json``."""
    router = Router(core, max_body=int(core.config.get("api.max_body", 1 << 20)))
    router.recorders.append(core.oplog.record)
    core.plugins.hook.kvmdesk_routes(router=router, core=core)

    # The API's description is public (no token), like the login: it holds no data, and a client
    # needs it before it has a token.  README.md "API conventions" says so.
    @router.endpoint("GET", "/openapi.json", summary="OpenAPI 3 document of this API (the document, not an envelope)",
                     auth=False, tags=("meta",), produces=("application/json",), file_only=True)
    async def openapi(req: ApiRequest) -> bytes:
        req.http.setHeader(b"content-type", b"application/json; charset=utf-8")
        return router.render_json(req.http, openapi_document(router))

    @router.endpoint("GET", "/docs", summary="The OpenAPI document as a browsable page", auth=False, tags=("meta",),
                     produces=("text/html",), file_only=True)
    async def docs(req: ApiRequest) -> bytes:
        req.http.setHeader(b"content-type", b"text/html; charset=utf-8")
        return DOCS_PAGE.read_bytes()

    return router
