"""Compute nodes (contract #8-#9, #27-#33, #36-#37, #41) and the agents' event endpoint."""
from __future__ import annotations

import ipaddress
from typing import Annotated, Any, Mapping, Optional

from pydantic import AfterValidator, Field, WithJsonSchema

from kvmdesk.api.models import Model, Name, OptionalName, Uuids
from kvmdesk.api.router import ApiRequest, Router
from kvmdesk.core import agentauth, errors
from kvmdesk.core.errors import ApiError, Resource, define
from kvmdesk.core.ids import stable_uuid
from kvmdesk.core.jobs import run_batch
from kvmdesk.core.paging import paged_search
from kvmdesk.core.records import now_text
from kvmdesk.plugins.nodes import pools
from kvmdesk.plugins.nodes.manager import KIND, RESOURCE, NodeManager
from kvmdesk.plugins.nodes.views import check_view

EVENTS_REFUSED = define(2025, 401, "节点事件的签名无效: {reason}", "the node event signature was refused: {reason}")
UNKNOWN_INTERFACE = define(2026, 400, "节点 {ip} 没有网卡 {interface}", "node {ip} has no network interface {interface}")

SERVICE = Resource("服务", "service")
SEARCH_FIELDS = {"uuid": str, "name": str, "hostname": str, "ip": str, "status": int, "type": int, "state": str}
SERVICE_FIELDS = {"uuid": str, "name": str, "status": int, "state": str, "sub_state": str}

#: Service ``status`` in the contract's service list: 0 running, 1 stopped, 2 failed, 3 unknown.
SERVICE_STATUS = {"active": 0, "reloading": 0, "activating": 0, "inactive": 1, "deactivating": 1, "failed": 2}


def _ip(value: str) -> str:
    try:
        return str(ipaddress.IPv4Address(value.strip()))
    except ValueError:
        raise ValueError("not an IPv4 address") from None


#: Nodes are reached over IPv4 (their networks, the IPAM and the agents' addresses are IPv4).
IpAddress = Annotated[str, AfterValidator(_ip), WithJsonSchema({"type": "string", "format": "ipv4"})]


class CheckNode(Model):
    ip: IpAddress
    root_pwd: str = Field(min_length=1, max_length=1024)


class Uplink(Model):
    switch_uuid: str = Field(min_length=1, max_length=64)
    interface: Optional[str] = Field(default=None, max_length=64)
    interface_uuid: Optional[str] = Field(default=None, max_length=64)


class AddNode(Model):
    ip: IpAddress
    password: str = Field(min_length=1, max_length=1024)
    name: Optional[Name] = None
    network: list[Uplink] = Field(default_factory=list)
    manage_interface: Optional[str] = Field(default=None, max_length=64)
    image_interface: Optional[str] = Field(default=None, max_length=64)
    manage_interface_uuid: Optional[str] = Field(default=None, max_length=64)
    image_interface_uuid: Optional[str] = Field(default=None, max_length=64)


class Rename(Model):
    name: Name


class NodeRef(Model):
    uuid: str = Field(min_length=1, max_length=64)
    name: Optional[OptionalName] = None


class NodeBatch(Model):
    nodes: Optional[list[NodeRef]] = None


class AgentEvents(Model):
    agent_id: str = Field(min_length=1, max_length=64)
    events: list[dict[str, Any]] = Field(max_length=1000)
    model_config = {"extra": "forbid", "strict": True}


def manager_of(req: ApiRequest) -> NodeManager:
    return req.core.extensions["nodes"]


def _interface_resolver(ip: str, facts: Mapping[str, Any]):
    """Resolve a NIC given by name, or by the uuid ``check_node_virt`` showed for it."""
    names = {nic.get("name") for nic in facts.get("network_interfaces") or [] if nic.get("name")}
    hint = check_uuid(ip)

    def resolve(name: Optional[str], uuid: Optional[str]) -> Optional[str]:
        if name is None and uuid is None:
            return None
        if name is not None:
            if name not in names:
                raise ApiError(UNKNOWN_INTERFACE, ip=ip, interface=name)
            return name
        for candidate in names:
            if stable_uuid(hint, "nic", candidate) == uuid:
                return candidate
        raise ApiError(UNKNOWN_INTERFACE, ip=ip, interface=uuid)

    return resolve


def check_uuid(ip: str) -> str:
    """The provisional node uuid that ``check_node_virt`` derives its NIC uuids from."""
    return stable_uuid("check", ip)


def service_rows(node_uuid: str, services: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "uuid": stable_uuid(node_uuid, "service", s["name"]),
            "name": s["name"],
            "status": SERVICE_STATUS.get(s.get("state") or "", 3),
            "state": s.get("state"),
            "sub_state": s.get("sub_state"),
            "description": s.get("description"),
            "enabled": s.get("enabled"),
            "since": s.get("since"),
            "reason": s.get("reason"),
        }
        for s in services
    ]


def register_routes(router: Router) -> None:
    tags = ("nodes",)

    async def decorate(req: ApiRequest, nodes: list[dict]) -> list[dict]:
        return await manager_of(req).render(nodes)

    @router.endpoint("POST", "/resource_mgr/check_node_virt", summary="Check a prospective node through its agent",
                     body=CheckNode, tags=tags, oplog="检测节点")
    async def check_node_virt(req: ApiRequest) -> dict:
        manager = manager_of(req)
        ip = req.body.ip
        req.oplog_detail = ip
        if await manager.nodes.find_one({"ip": ip}) is not None:
            raise ApiError(errors.ALREADY_EXISTS, resource=RESOURCE, key=ip)
        _answer, facts = await manager.probe(ip, req.body.root_pwd)
        data = check_view(check_uuid(ip), facts)
        default_switch = req.core.extensions.get("default_switch")
        data["virtual_switch_list"] = await default_switch(req.core) if default_switch else None
        data["default_network_info"] = {"network_info": None, "virtual_switch": data["virtual_switch_list"]}
        hypervisor = facts.get("hypervisor") or {}
        data.update(
            hostname=facts.get("hostname"),
            virtualization=facts.get("virtualization"),
            demo_hypervisor=bool(hypervisor.get("demo")),
        )
        return data

    @router.endpoint("GET", "/resource_mgr/resource_pools/{pool_uuid}/nodes", summary="List a pool's compute nodes",
                     tags=tags, search_fields=SEARCH_FIELDS, paged=True)
    async def list_pool_nodes(req: ApiRequest) -> Any:
        pool = await pools.pool_or_404(req.core, req.path["pool_uuid"])
        return await paged_search(req, manager_of(req).nodes, SEARCH_FIELDS,
                                  fixed={"resource_pool_uuid": pool["uuid"]}, sort=[("id", 1)],
                                  decorate=lambda nodes: decorate(req, nodes), resource=RESOURCE)

    @router.endpoint("POST", "/resource_mgr/resource_pools/{pool_uuid}/nodes", summary="Add a node to a pool",
                     body=AddNode, tags=tags, oplog="新增计算节点")
    async def add_node(req: ApiRequest) -> dict:
        manager = manager_of(req)
        pool = await pools.pool_or_404(req.core, req.path["pool_uuid"])
        body: AddNode = req.body
        req.oplog_detail = body.name or body.ip

        def prepare(facts: Mapping[str, Any]) -> dict[str, Any]:
            # NICs may be named, or given by the uuids check_node_virt showed.
            resolve = _interface_resolver(body.ip, facts)
            uplinks = [{"switch_uuid": u.switch_uuid, "interface": resolve(u.interface, u.interface_uuid)}
                       for u in body.network]
            extra = {
                "uplinks": uplinks,
                "manage_interface": resolve(body.manage_interface, body.manage_interface_uuid),
                "image_interface": resolve(body.image_interface, body.image_interface_uuid),
            }
            if body.name:
                extra["name"] = body.name
            return extra

        created = await manager.add_node(body.ip, body.password, pool["uuid"], prepare=prepare)
        return (await manager.render([created]))[0]

    @router.endpoint("GET", "/resource_mgr/nodes/{node_uuid}", summary="Node detail", tags=tags)
    async def node_detail(req: ApiRequest) -> dict:
        manager = manager_of(req)
        node = await manager.node_or_404(req.path["node_uuid"])
        return (await manager.render([node]))[0]

    @router.endpoint("PUT", "/resource_mgr/nodes/{node_uuid}", summary="Rename a node", body=Rename, tags=tags,
                     oplog="修改节点名称")
    async def rename_node(req: ApiRequest) -> dict:
        manager = manager_of(req)
        node = await manager.node_or_404(req.path["node_uuid"])
        req.oplog_detail = f"{node.get('name')} -> {req.body.name}"
        updated = await manager.nodes.find_one_and_update(
            {"uuid": node["uuid"]}, {"$set": {"name": req.body.name, "updated_at": now_text(req.core.clock)}}
        )
        if updated is None:
            raise ApiError(errors.NOT_FOUND, resource=RESOURCE, key=node["uuid"])
        await req.core.updated(KIND, updated, {"name": req.body.name})
        watcher = manager.watchers.watcher(node["uuid"])
        if watcher is not None:
            watcher.node["name"] = req.body.name
        return (await manager.render([updated]))[0]

    def power_endpoint(action: str, agent_path: str, label: str) -> None:
        @router.endpoint("POST", "/resource_mgr/nodes/{node_uuid}/" + action, summary=f"{action.capitalize()} nodes",
                         body=NodeBatch, tags=tags, oplog=label)
        async def power(req: ApiRequest) -> dict:
            manager = manager_of(req)
            refs = req.body.nodes if req.body.nodes else [NodeRef(uuid=req.path["node_uuid"])]
            req.oplog_detail = ", ".join(r.name or r.uuid for r in refs)

            async def one(ref: NodeRef) -> None:
                node = await manager.compute_node_or_404(ref.uuid)
                await manager.call(node, "POST", agent_path, headers={"Accept-Language": req.lang})

            return await run_batch(req, [r.model_dump() for r in refs], lambda item: one(NodeRef(**item)),
                                   concurrency=10)

    power_endpoint("reboot", "/node/reboot", "重启计算节点")
    power_endpoint("shutdown", "/node/shutdown", "关闭计算节点")

    @router.endpoint("DELETE", "/resource_mgr/nodes", summary="Delete nodes", body=Uuids, tags=tags,
                     oplog="删除计算节点")
    async def delete_nodes(req: ApiRequest) -> dict:
        manager = manager_of(req)

        async def delete_one(uuid: str) -> Optional[dict]:
            node = await manager.node_or_404(uuid)
            return await manager.remove_node(node)

        return await run_batch(req, list(dict.fromkeys(req.body.uuids)), delete_one)

    @router.endpoint("GET", "/resource_mgr/nodes/{node_uuid}/services", summary="A node's services, paged",
                     tags=tags, search_fields=SERVICE_FIELDS, paged=True)
    async def list_services(req: ApiRequest) -> dict:
        manager = manager_of(req)
        node = await manager.node_or_404(req.path["node_uuid"])

        async def services() -> list[dict]:
            return service_rows(node["uuid"], await manager.call(node, "GET", "/services"))

        return await paged_search(req, services, SERVICE_FIELDS, resource=SERVICE)

    @router.endpoint("POST", "/resource_mgr/nodes/{node_uuid}/services/{service_uuid}/reboot",
                     summary="Restart one of a node's services", tags=tags, oplog="重启节点服务")
    async def restart_service(req: ApiRequest) -> dict:
        manager = manager_of(req)
        node = await manager.node_or_404(req.path["node_uuid"])
        services = service_rows(node["uuid"], await manager.call(node, "GET", "/services"))
        match = next((s for s in services if s["uuid"] == req.path["service_uuid"]), None)
        if match is None:
            raise ApiError(errors.NOT_FOUND, resource=SERVICE, key=req.path["service_uuid"])
        req.oplog_detail = f"{node.get('name')}: {match['name']}"
        return await manager.call(node, "POST", f"/services/{match['name']}/restart",
                                  headers={"Accept-Language": req.lang})

    @router.endpoint("POST", "/agent/events", summary="Domain lifecycle events posted by node agents (signed)",
                     body=AgentEvents, auth=False, tags=("agent",), oplog="")
    async def agent_events(req: ApiRequest) -> dict:
        manager = manager_of(req)
        agent_id = (req.http.getHeader(agentauth.H_AGENT.encode()) or b"").decode("latin-1")
        node = await manager.nodes.find_one({"agent_id": agent_id}) if agent_id else None
        req.http.content.seek(0)
        raw = req.http.content.read()
        headers = {k.decode("latin-1").lower(): v[-1] for k, v in req.http.requestHeaders.getAllRawHeaders()}
        try:
            if node is None or agent_id != req.body.agent_id:
                raise agentauth.SignatureError("unknown agent")
            manager.event_verifier.verify(node.get("agent_secret"), "POST", req.http.uri.decode("utf-8", "replace"),
                                          headers, raw)
        except agentauth.SignatureError as exc:
            raise ApiError(EVENTS_REFUSED, reason=str(exc)) from None
        return {"accepted": await manager.receive_events(node, req.body.events)}
