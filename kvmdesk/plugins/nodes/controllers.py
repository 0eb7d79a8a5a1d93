"""Controller nodes (contract #4-#7): list, rename (optionally adding the compute role), reboot, shut down.

The controller records itself as a node at start-up (type 3, master controller), keyed by its host
name.  Until an agent is enrolled for it (the all-in-one local agent, or an administrator adding the
compute role) its facts are read in-process, once.
"""
from __future__ import annotations

import ipaddress
import socket
from typing import Any, Optional

from twisted.logger import Logger

from kvmdesk.api.models import Model, Name
from kvmdesk.api.router import ApiRequest, Router
from kvmdesk.core import errors
from kvmdesk.core.errors import ApiError, Resource
from kvmdesk.core.paging import paged_search
from kvmdesk.core.records import new_record, now_text
from kvmdesk.core.store import DuplicateKeyError
from kvmdesk.core.threadpools import in_reactor_pool
from kvmdesk.plugins.nodes import pools
from kvmdesk.plugins.nodes.compute import SEARCH_FIELDS, manager_of
from kvmdesk.plugins.nodes.manager import NO_AGENT, NOT_CONTROLLER, NodeManager
from kvmdesk.plugins.nodes.views import (
    CONTROLLER_TYPES,
    ONLINE,
    STATUS_CODES,
    TYPE_MASTER,
    WITH_COMPUTE,
)
from kvmdesk.protocol import hostfacts

log = Logger(namespace="kvmdesk.nodes.controllers")
CONTROLLER = Resource("控制节点", "controller node")


class ControllerEdit(Model):
    name: Optional[Name] = None
    add_compute_function: bool = False


def _first_address(facts: dict) -> Optional[str]:
    for nic in facts.get("network_interfaces") or []:
        if nic.get("loopback"):
            continue
        for address in nic.get("ipv4") or []:
            return address["address"]
    return None


def _controller_ip(core: Any, facts: dict) -> str:
    listen = core.config.get("controller.listen") or ""
    try:
        if listen and not ipaddress.ip_address(listen).is_unspecified:
            return listen
    except ValueError:
        pass
    return _first_address(facts) or "127.0.0.1"


async def ensure_controller_node(core: Any) -> dict:
    """This controller's node record (created on first start)."""
    manager: NodeManager = core.extensions["nodes"]
    hostname = socket.gethostname()
    existing = await manager.nodes.find_one({"controller_host": hostname})
    if existing is not None:
        return existing
    facts = await in_reactor_pool(core.reactor, hostfacts.host_facts, {})
    stamp = now_text(core.clock)
    record = new_record(
        core.clock,
        name=hostname,
        hostname=hostname,
        ip=_controller_ip(core, facts),
        type=TYPE_MASTER,
        controller_host=hostname,
        resource_pool_uuid=None,
        facts=facts,
        facts_at=stamp,
        state=ONLINE,
        status=STATUS_CODES[ONLINE],
        status_reason=None,
        status_changed_at=stamp,
    )
    try:
        return await manager.nodes.insert_one(record)
    except DuplicateKeyError:
        # Another record has that IP (a compute node added under the controller's address).
        log.warn("the controller's address {ip} already belongs to a node; recording the controller without it",
                 ip=record["ip"])
        record["ip"] = f"controller:{hostname}"
        return await manager.nodes.insert_one(record)


async def controller_or_404(manager: NodeManager, uuid: str) -> dict:
    node = await manager.node_or_404(uuid)
    if node.get("type") not in CONTROLLER_TYPES:
        raise ApiError(NOT_CONTROLLER, key=uuid)
    return node


def register_routes(router: Router) -> None:
    tags = ("controller_nodes",)
    base = "/resource_mgr/controller_nodes"

    @router.endpoint("GET", base, summary="List controller nodes", tags=tags, search_fields=SEARCH_FIELDS, paged=True)
    async def list_controllers(req: ApiRequest) -> Any:
        manager = manager_of(req)

        async def decorate(nodes: list[dict]) -> list[dict]:
            return await manager.render(nodes, controller_view=True)

        return await paged_search(req, manager.nodes, SEARCH_FIELDS, fixed={"type": {"$in": list(CONTROLLER_TYPES)}},
                                  sort=[("id", 1)], decorate=decorate, resource=CONTROLLER)

    @router.endpoint("PUT", base + "/{uuid}", summary="Rename a controller node; optionally add the compute role",
                     body=ControllerEdit, tags=tags, oplog="编辑控制节点")
    async def edit_controller(req: ApiRequest) -> dict:
        manager = manager_of(req)
        node = await controller_or_404(manager, req.path["uuid"])
        req.oplog_detail = node.get("name")
        changes: dict[str, Any] = {}
        if req.body.name is not None:
            changes["name"] = req.body.name
        if req.body.add_compute_function and node["type"] in WITH_COMPUTE:
            if not node.get("agent_secret"):
                raise ApiError(NO_AGENT, name=node.get("name"))
            changes["type"] = WITH_COMPUTE[node["type"]]
            if not node.get("resource_pool_uuid"):
                default_pool = await req.core.store.collection(pools.POOLS).find_one({"default": 1})
                changes["resource_pool_uuid"] = default_pool["uuid"] if default_pool else None
        if changes:
            changes["updated_at"] = now_text(req.core.clock)
            node = await manager.nodes.find_one_and_update({"uuid": node["uuid"]}, {"$set": changes})
            if node is None:
                raise ApiError(errors.NOT_FOUND, resource=CONTROLLER, key=req.path["uuid"])
        return (await manager.render([node], controller_view=True))[0]

    def power(action: str, agent_path: str, label: str) -> None:
        @router.endpoint("POST", base + "/{uuid}/" + action, summary=f"{action.capitalize()} a controller node",
                         tags=tags, oplog=label)
        async def act(req: ApiRequest) -> None:
            manager = manager_of(req)
            node = await controller_or_404(manager, req.path["uuid"])
            req.oplog_detail = node.get("name")
            await manager.call(node, "POST", agent_path, headers={"Accept-Language": req.lang})
            return None

    power("reboot", "/node/reboot", "重启控制节点")
    power("shutdown", "/node/shutdown", "关闭控制节点")
