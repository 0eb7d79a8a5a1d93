"""The agent's HTTP API (``/agent/v1``): the shared Router, wrapped in request signing.

Every path but ``/agent/v1/enrol`` is served only to a request signed with the enrolment secret
(:class:`SignedResource`); every answer to a verified request carries the agent's proof header
(:class:`ProvingRequest`), whatever its status, including 404/405 envelopes and streamed bodies.

Optional route modules (networks, images) plug in through :data:`OPTIONAL_ROUTE_MODULES`: each
module that can be imported exposes ``register_routes(router, agent)``.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Optional

from pydantic import Field
from twisted.logger import Logger
from twisted.web.resource import IResource, Resource
from twisted.web.server import Site

from kvmdesk.agent import hypervisor as hv
from kvmdesk.agent import services as sd
from kvmdesk.api.models import Model
from kvmdesk.api.streaming import StreamingRequest
from kvmdesk.api.router import Action, ApiRequest, Router
from kvmdesk.core import agentauth
from kvmdesk.core.errors import ApiError, define

if TYPE_CHECKING:  # pragma: no cover
    from kvmdesk.agent.service import Agent

log = Logger(namespace="kvmdesk.agent.api")

PREFIX = "/agent/v1"
UNSIGNED_PATHS = frozenset({PREFIX + "/enrol", PREFIX + "/enrol/"})

#: Route modules other engineers' plugins add to the agent; missing ones are skipped.
OPTIONAL_ROUTE_MODULES = ("kvmdesk.agent.net.routes", "kvmdesk.agent.images.routes", "kvmdesk.agent.domains.routes",
                          "kvmdesk.agent.console")

# -- error codes (2100-2199: the agent) -------------------------------------------------------------

AGENT_UNAUTHENTICATED = define(2101, 401, "节点代理拒绝了未签名或签名错误的请求: {reason}",
                               "the node agent refused the request signature: {reason}")
ENROL_WRONG_PASSWORD = define(2102, 401, "节点注册密码错误", "wrong enrolment password for this node")
ENROL_CONFLICT = define(2103, 409, "节点已注册到控制器, 需要先在该控制器上删除节点或重置节点代理",
                        "this node is already enrolled with a controller; delete the node there first "
                        "or reset the agent's enrolment")
ENROL_DISABLED = define(2104, 403, "节点代理未设置注册密码", "no enrolment password is set on this node's agent")
ENROL_THROTTLED = define(2105, 429, "注册失败次数过多, 请 {seconds} 秒后再试",
                         "too many failed enrolments, try again in {seconds} seconds")
DOMAIN_NOT_FOUND = define(2110, 404, "虚拟机不存在: {reason}", "no such domain: {reason}")
DOMAIN_STATE = define(2111, 409, "虚拟机当前状态不允许此操作: {reason}", "not possible in the domain's state: {reason}")
DOMAIN_XML = define(2112, 400, "虚拟机定义无效: {reason}", "invalid domain definition: {reason}")
HYPERVISOR_UNAVAILABLE = define(2113, 503, "无法连接虚拟化服务: {reason}", "the hypervisor is unavailable: {reason}")
HYPERVISOR_FAILED = define(2114, 500, "虚拟化操作失败: {reason}", "the hypervisor operation failed: {reason}")
OPERATION_UNSUPPORTED = define(5111, 501, "此节点的虚拟化驱动不支持该操作: {reason}",
                               "this node's hypervisor driver cannot do that: {reason}")
SERVICE_NOT_MANAGED = define(2120, 404, "不是本节点管理的服务: {reason}", "not a managed service of this node: {reason}")
SYSTEMD_UNAVAILABLE = define(2121, 503, "无法管理服务: {reason}", "services cannot be managed here: {reason}")
SERVICE_FAILED = define(2122, 500, "服务操作失败: {reason}", "the service operation failed: {reason}")
POWER_REFUSED = define(2123, 403, "节点拒绝了电源操作: {reason}", "the node refused the power action: {reason}")

_ERRORS: list[tuple[type[Exception], Any]] = [
    (hv.DomainNotFound, DOMAIN_NOT_FOUND),
    (hv.DomainStateError, DOMAIN_STATE),
    (hv.InvalidDomainXML, DOMAIN_XML),
    (hv.HypervisorUnavailable, HYPERVISOR_UNAVAILABLE),
    (hv.OperationUnsupported, OPERATION_UNSUPPORTED),
    (hv.HypervisorError, HYPERVISOR_FAILED),
    (sd.UnitNotManaged, SERVICE_NOT_MANAGED),
    (sd.SystemdUnavailable, SYSTEMD_UNAVAILABLE),
    (sd.PowerActionRefused, POWER_REFUSED),
    (sd.ServiceError, SERVICE_FAILED),
]


async def translated(d: Awaitable[Any]) -> Any:
    """Await ``d``; the hypervisor's and systemd's exceptions become error envelopes."""
    try:
        return await d
    except ApiError:
        raise
    except Exception as exc:
        for kind, error in _ERRORS:
            if isinstance(exc, kind):
                raise ApiError(error, reason=getattr(exc, "message", None) or str(exc)) from None
        raise


# -- signing and proving ----------------------------------------------------------------------------


class ProvingRequest(StreamingRequest):
    """A request that adds the agent's proof header just before its response headers go out.

    It streams the bodies of ``stream=`` endpoints like the controller's requests do; such a body is
    checked by :func:`stream_guard` from its headers (it must be sent as ``UNSIGNED-PAYLOAD``).
    """

    kvmdesk_proof: Optional[tuple[str, str]] = None
    _kvmdesk_received = False

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        self._kvmdesk_received = True
        super().requestReceived(command, path, version)

    def write(self, data: bytes) -> None:
        if not self.startedWriting and self.kvmdesk_proof is not None:
            secret, signature = self.kvmdesk_proof
            self.setHeader(agentauth.H_PROOF, agentauth.proof(secret, signature, self.code))
        super().write(data)


class AgentSite(Site):
    """The agent's site: proving requests, streamed upload bodies routed by ``api_router``."""

    requestFactory = ProvingRequest
    displayTracebacks = False
    api_router: Optional[Router] = None

    def log(self, request: Any) -> None:
        # Heartbeats come every few seconds; the access log keeps everything else.
        if request.method == b"GET" and request.code == 200 and request.path.endswith(b"/status"):
            return
        super().log(request)


def _headers(request: Any) -> dict[str, bytes]:
    return {k.decode("latin-1").lower(): v[-1] for k, v in request.requestHeaders.getAllRawHeaders()}


def _request_line(request: Any) -> tuple[str, str]:
    """``(method, path with query)``; for a streamed request checked before twisted.web parsed its
    request line into the request, from the channel."""
    if getattr(request, "_kvmdesk_received", False) or getattr(request.channel, "_command", None) is None:
        method, target = request.method, request.uri
    else:
        # Before requestReceived twisted.web holds placeholders ("(no method yet)") in the request.
        method, target = request.channel._command, request.channel._path
    return method.decode("latin-1"), target.decode("utf-8", "replace")


def _refusal_log(request: Any, reason: str) -> None:
    peer = getattr(request.getClientAddress(), "host", "?")
    method, target = _request_line(request)
    log.warn("refused {method} {path} from {peer}: {reason}", method=method, path=target.partition("?")[0],
             peer=peer, reason=reason)


def stream_guard(agent: "Agent") -> Callable[[Any], Awaitable[None]]:
    """The router's check of a streamed request, made from its headers before the body is read."""

    async def guard(request: Any) -> None:
        enrolment = agent.enrolments.current
        headers = _headers(request)
        try:
            if headers.get(agentauth.H_CONTENT.lower()) != agentauth.UNSIGNED_PAYLOAD.encode():
                raise agentauth.SignatureError("a streamed body must be signed as UNSIGNED-PAYLOAD")
            method, target = _request_line(request)
            signature = agent.verifier.verify(enrolment.secret if enrolment else None, method, target, headers, None)
        except agentauth.SignatureError as exc:
            _refusal_log(request, str(exc))
            raise ApiError(AGENT_UNAUTHENTICATED, reason=str(exc)) from None
        request.kvmdesk_proof = (enrolment.secret, signature)

    return guard


class SignedResource(Resource):
    """Serves ``inner`` only to requests signed with the enrolment secret.

    The body is hashed here (twisted.web has buffered it) unless it was sent as ``UNSIGNED-PAYLOAD``.
    """

    isLeaf = True

    def __init__(self, inner: IResource, agent: "Agent", router: Router):
        super().__init__()
        self.inner = inner
        self.agent = agent
        self.router = router

    def render(self, request: Any) -> Any:
        path = request.path.decode("utf-8", "replace")
        if path in UNSIGNED_PATHS or getattr(request, "kvmdesk_proof", None) is not None:
            # Enrolment checks its password itself; a streamed request was checked by stream_guard.
            return self.inner.render(request)
        target = request.uri.decode("utf-8", "replace")
        headers = _headers(request)
        content_hash = headers.get(agentauth.H_CONTENT.lower(), b"")
        body = None
        if content_hash != agentauth.UNSIGNED_PAYLOAD.encode() and request.content is not None:
            body = request.content.read()
            request.content.seek(0)
        enrolment = self.agent.enrolments.current
        try:
            signature = self.agent.verifier.verify(
                enrolment.secret if enrolment else None, request.method.decode("latin-1"), target, headers, body
            )
        except agentauth.SignatureError as exc:
            _refusal_log(request, str(exc))
            request.setResponseCode(AGENT_UNAUTHENTICATED.status)
            lang = "en" if (request.getHeader(b"accept-language") or b"").lower().startswith(b"en") else "zh"
            return self.router.render_json(request, {"code": AGENT_UNAUTHENTICATED.code,
                                                     "msg": AGENT_UNAUTHENTICATED.message(lang, {"reason": str(exc)}),
                                                     "data": None})
        request.kvmdesk_proof = (enrolment.secret, signature)
        return self.inner.render(request)


# -- request models ---------------------------------------------------------------------------------


class EnrolBody(Model):
    password: str = Field(max_length=1024)
    controller_id: str = Field(min_length=1, max_length=128)
    controller_url: str = Field(min_length=1, max_length=2048)


class DefineBody(Model):
    xml: str = Field(min_length=1)


# -- routes -----------------------------------------------------------------------------------------


def make_router(agent: "Agent") -> Router:
    """The agent's router with its own routes and the optional modules'."""
    router = Router(agent, prefix=PREFIX, max_body=int(agent.config.get("agent.max_body", 4 << 20)))
    router.stream_guard = stream_guard(agent)
    register_routes(router, agent)
    for name in OPTIONAL_ROUTE_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and (name == exc.name or name.startswith(exc.name + ".")):
                continue
            raise
        module.register_routes(router, agent)
        log.info("agent routes added from {module}", module=name)
    return router


def register_routes(router: Router, agent: "Agent") -> None:
    tags = ("agent",)

    def endpoint(method: str, path: str, summary: str, **kwargs: Any) -> Callable:
        # Authentication is the SignedResource's (every path but enrol); no administrator tokens here.
        return router.endpoint(method, path, summary=summary, auth=False, tags=tags, **kwargs)

    @endpoint("POST", "/enrol", "Enrol a controller with the enrolment password; returns the secret", body=EnrolBody)
    async def enrol(req: ApiRequest) -> dict:
        return agent.enrol(req.http, req.body.password, req.body.controller_id, req.body.controller_url)

    @endpoint("POST", "/unenrol", "Forget the enrolment (the node was deleted on its controller)")
    async def unenrol(req: ApiRequest) -> None:
        agent.unenrol()
        return None

    @endpoint("GET", "/status", "Heartbeat: agent, hypervisor and domain summary, metrics without processes")
    async def status(req: ApiRequest) -> dict:
        return await agent.status()

    @endpoint("GET", "/facts", "Host facts: CPU, memory, GPU, OS, virtualization, NICs, storage")
    async def facts(req: ApiRequest) -> dict:
        return await agent.facts()

    @endpoint("GET", "/metrics", "Metrics since the previous sample, with the busiest processes")
    async def metrics(req: ApiRequest) -> dict:
        with_processes = req.args.get("processes", "1") not in ("0", "false", "no")
        return await agent.metrics(with_processes)

    @endpoint("GET", "/domains", "Every domain and its state")
    async def list_domains(req: ApiRequest) -> list:
        return await translated(agent.hypervisor.list_domains())

    @endpoint("POST", "/domains", "Define (or redefine) a domain from XML", body=DefineBody)
    async def define_domain(req: ApiRequest) -> dict:
        return await translated(agent.hypervisor.define(req.body.xml))

    @endpoint("GET", "/domains/{ident}", "One domain by uuid or name")
    async def get_domain(req: ApiRequest) -> dict:
        return await translated(agent.hypervisor.domain_info(req.path["ident"]))

    @endpoint("GET", "/domains/{ident}/xml", "A domain's XML (inactive=1: the next boot's)")
    async def domain_xml(req: ApiRequest) -> dict:
        inactive = req.args.get("inactive", "0") in ("1", "true", "yes")
        return {"xml": await translated(agent.hypervisor.domain_xml(req.path["ident"], inactive))}

    @endpoint("DELETE", "/domains/{ident}", "Undefine a domain")
    async def undefine_domain(req: ApiRequest) -> dict:
        return await translated(agent.hypervisor.undefine(req.path["ident"]))

    def domain_action(method_name: str) -> Callable[[ApiRequest], Awaitable[Any]]:
        async def act(req: ApiRequest) -> Any:
            return await translated(getattr(agent.hypervisor, method_name)(req.path["ident"]))

        return act

    router.actions(
        "/domains/{ident}",
        {
            "start": Action(domain_action("start"), "Boot the domain"),
            "shutdown": Action(domain_action("shutdown"), "Ask the guest to shut down"),
            "destroy": Action(domain_action("destroy"), "Power the domain off at once"),
            "reboot": Action(domain_action("reboot"), "Ask the guest to reboot"),
            "hard_reboot": Action(domain_action("hard_reboot"), "Power off at once and boot again"),
            "reset": Action(domain_action("reset"), "Reset the domain (no shutdown)"),
            "send_key": Action(domain_action("send_key"), "Press ctrl+alt+del"),
        },
        tags=tags,
        summary="Domain power actions",
        auth=False,
    )

    @endpoint("GET", "/services", "The node's managed services and their states")
    async def list_services(req: ApiRequest) -> list:
        return await translated(agent.node_services.list_services())

    @endpoint("POST", "/services/{name}/restart", "Restart one managed service")
    async def restart_service(req: ApiRequest) -> dict:
        return await translated(agent.node_services.restart(req.path["name"]))

    @endpoint("POST", "/node/reboot", "Reboot the node (refused unless allow_power_actions)")
    async def reboot_node(req: ApiRequest) -> dict:
        return await translated(agent.node_services.reboot_node())

    @endpoint("POST", "/node/shutdown", "Power the node off (refused unless allow_power_actions)")
    async def shutdown_node(req: ApiRequest) -> dict:
        return await translated(agent.node_services.poweroff_node())
