"""Hook implementations of the ``console`` plugin: the relay, its routes or listener, domain events."""
from __future__ import annotations

import tomllib
from importlib import resources
from typing import Any, Optional

from pydantic import Field
from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Site

from kvmdesk import hookimpl
from kvmdesk.api.models import Model
from kvmdesk.api.router import ApiRequest
from kvmdesk.core import console
from kvmdesk.plugins.console.page import ConsolePage
from kvmdesk.plugins.console.relay import ConsoleRelay

__all__ = [
    "kvmdesk_config_defaults",
    "kvmdesk_configure",
    "kvmdesk_domain_event",
    "kvmdesk_node_removed",
    "kvmdesk_routes",
    "kvmdesk_services",
]

log = Logger(namespace="kvmdesk.console")

#: libvirt lifecycle events after which a domain's consoles are closed and its tokens revoked
#: (``stopped`` covers shutdown, destroy, crash, migration away and save).
CLOSING_EVENTS = {"stopped": "the desktop stopped", "shutdown": "the desktop shut down",
                  "undefined": "the desktop was removed", "crashed": "the desktop crashed"}


class IssueBody(Model):
    node_uuid: str = Field(min_length=1, max_length=64)
    domain_uuid: str = Field(min_length=1, max_length=64)
    ttl: Optional[float] = Field(default=None, gt=0, le=3600)
    single_use: Optional[bool] = None


def websockify_path(core: Any) -> str:
    return "/" + str(core.config.get("console.path", "websockify")).strip("/")


@hookimpl
def kvmdesk_config_defaults():
    text = resources.files("kvmdesk.config").joinpath("console-defaults.toml").read_text(encoding="utf-8")
    return tomllib.loads(text)


@hookimpl
def kvmdesk_configure(core) -> None:
    core.extensions["console"] = ConsoleRelay(core)


def _own_port(core: Any) -> int:
    return int(core.config.get("console.port", 0) or 0)


@hookimpl
def kvmdesk_routes(router, core) -> None:
    relay: ConsoleRelay = core.extensions["console"]

    @router.endpoint("POST", "/console/tokens", body=IssueBody, tags=("console",), oplog="打开控制台",
                     summary="A console token and its websockify_url for one domain (administrators)")
    async def issue_token(req: ApiRequest) -> dict:
        body = req.body
        await req.core.extensions["nodes"].node_or_404(body.node_uuid)
        admin = req.admin or {}
        token = await console.issue(req.core, body.node_uuid, body.domain_uuid, "admin",
                                    str(admin.get("uuid") or admin.get("username") or ""),
                                    ttl=body.ttl, single_use=body.single_use)
        url = console.console_url(req, token)
        expires = (await console.tokens(req.core)).decode(token)["e"]  # not check(): a tiny ttl may be over
        return {"token": token, "websockify_url": url, "console_url": console.page_url(url),
                "expires_in": expires - req.core.clock.seconds()}

    if _own_port(core):
        return
    path = websockify_path(core)
    page = ConsolePage(core, path)
    upgrade = relay.resource()
    for variant in (path, path + "/"):
        router.route(variant, endpoint=f"console-websockify {variant}")(lambda request: upgrade)
    router.route("/console", endpoint="console-page", branch=True)(lambda request, **kw: page)


def own_root(core: Any, relay: ConsoleRelay) -> Resource:
    """The resource tree of the relay's own listener: the websocket and the page."""
    root = Resource()
    parent = root
    segments = websockify_path(core).strip("/").split("/")
    for segment in segments[:-1]:
        child = Resource()
        parent.putChild(segment.encode(), child)
        parent = child
    parent.putChild(segments[-1].encode(), relay.resource())
    root.putChild(b"console", ConsolePage(core, websockify_path(core)))
    return root


class RelayService(Service):
    """Closes every console when the controller stops; listens on its own port when configured."""

    name = "console-relay"

    def __init__(self, core: Any, relay: ConsoleRelay):
        self.core = core
        self.relay = relay
        self.port: Any = None

    def startService(self) -> None:
        super().startService()
        port = _own_port(self.core)
        if port:
            listen = self.core.config.get("console.listen") or self.core.config.get("controller.listen") or ""
            site = Site(own_root(self.core, self.relay))
            site.displayTracebacks = False
            self.port = self.core.reactor.listenTCP(port, site, interface=listen)
            address = self.port.getHost()
            log.info("console relay listening on ws://{host}:{port}{path}/", host=address.host, port=address.port,
                     path=websockify_path(self.core))

    def stopService(self) -> defer.Deferred:
        super().stopService()
        self.relay.close_all()
        if self.port is not None:
            port, self.port = self.port, None
            return defer.maybeDeferred(port.stopListening)
        return defer.succeed(None)


@hookimpl
def kvmdesk_services(core):
    return [RelayService(core, core.extensions["console"])]


@hookimpl
def kvmdesk_domain_event(core, node, event):
    reason = CLOSING_EVENTS.get(event.get("event"))
    if reason is None or not event.get("uuid"):
        return None
    if event.get("detail") == "migrated":
        reason = "the desktop moved to another node"
    return core.extensions["console"].close_domain(node["uuid"], event["uuid"], reason)


@hookimpl
def kvmdesk_node_removed(core, node):
    relay: ConsoleRelay = core.extensions["console"]
    closing = [relay.close_domain(n, d, "the desktop's node was removed")
               for (n, d) in list(relay.consoles) if n == node["uuid"]]
    return defer.gatherResults([defer.ensureDeferred(c) for c in closing], consumeErrors=True) if closing else None
