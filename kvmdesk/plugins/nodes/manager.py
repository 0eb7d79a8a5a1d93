"""The nodes plugin's state: the agent client, the watchers, enrolment and the node records.

One :class:`NodeManager` per core, at ``core.extensions["nodes"]``; its client is also
``core.extensions["agents"]`` for other plugins.
"""
from __future__ import annotations

import collections
import socket
import uuid as uuidlib
from typing import Any, Callable, Mapping, Optional

from twisted.logger import Logger

from kvmdesk.core import agentauth, errors
from kvmdesk.core.errors import ApiError, Resource, define
from kvmdesk.core.logtext import escaped
from kvmdesk.core.plugins import gather_hook
from kvmdesk.core.records import new_record, now_text, without
from kvmdesk.core.store import DuplicateKeyError, Index
from kvmdesk.nodeaccess.client import AgentClient, AgentError
from kvmdesk.plugins.nodes.views import (
    COMPUTE_TYPES,
    NODES,
    render,
    ONLINE,
    STATUS_CODES,
    TYPE_COMPUTE,
    WITHOUT_COMPUTE,
)
from kvmdesk.plugins.nodes.watchers import NodeWatchers, WatchSettings

log = Logger(namespace="kvmdesk.nodes")

#: Secrets obtained by ``check_node_virt`` (or left by a node deleted while its agent was down):
#: needed to sign the re-enrolment that "add node" makes.
ENROLMENTS = "node_enrolments"
SETTINGS = "node_settings"
INDEXES = [
    Index(NODES, ["uuid"], unique=True),
    Index(NODES, ["ip"], unique=True),
    Index(NODES, ["agent_id"]),
    Index(NODES, ["type"]),
    Index(ENROLMENTS, ["ip"], unique=True),
    Index(SETTINGS, ["key"], unique=True),
]

RESOURCE = Resource("节点", "node")
#: The kind other plugins see in kvmdesk_usage and the lifecycle hooks.
KIND = "node"
#: Never handed to other plugins' hooks (they read the record from the store if they must call the agent).
SECRET_FIELDS = ("agent_secret",)

NO_VIRTUALIZATION = define(2020, 400, "节点 {ip} 不支持虚拟化: {reason}", "node {ip} cannot run virtual machines: {reason}")
NODE_IN_USE = define(2021, 409, "节点 {name} 正在使用中, 不能删除: {reason}", "node {name} is in use and cannot be deleted: {reason}")
NO_AGENT = define(2022, 409, "节点 {name} 没有可用的代理 (未注册)", "node {name} has no enrolled agent")
NOT_COMPUTE = define(2023, 404, "不是计算节点: {key}", "not a compute node: {key}")
NOT_CONTROLLER = define(2024, 404, "不是控制节点: {key}", "not a controller node: {key}")


def agent_failure(exc: AgentError) -> ApiError:
    return exc.api_error()


class NodeManager:
    """Enrols, adds, removes and watches nodes.

    :param core: the controller core.
    """

    def __init__(self, core: Any):
        self.core = core
        config = core.config
        self.client = AgentClient(
            core.reactor,
            int(config.get("nodes.agent_port", 50005)),
            timeout=float(config.get("nodes.agent_timeout", 30.0)),
            connect_timeout=float(config.get("nodes.agent_connect_timeout", 5.0)),
        )
        self.settings = WatchSettings.from_config(config)
        self.watchers = NodeWatchers(self, self.settings)
        #: node uuid -> the latest heartbeat sample (``{"at", "agent", "hypervisor", "metrics"}``).
        self.latest: dict[str, dict[str, Any]] = {}
        #: The latest domain events received from agents (newest last), for diagnostics.
        self.events: collections.deque = collections.deque(maxlen=1000)
        self.event_verifier = agentauth.Verifier(core.reactor, agentauth.TO_CONTROLLER)
        self._controller_id: Optional[str] = None

    @property
    def nodes(self) -> Any:
        return self.core.store.collection(NODES)

    # -- identity --

    async def controller_id(self) -> str:
        """This controller (cluster)'s id, created on first use and kept in the store."""
        if self._controller_id is None:
            settings = self.core.store.collection(SETTINGS)
            found = await settings.find_one({"key": "controller_id"})
            if found is None:
                try:
                    found = await settings.insert_one({"key": "controller_id", "value": str(uuidlib.uuid4())})
                except DuplicateKeyError:
                    found = await settings.find_one({"key": "controller_id"})
            self._controller_id = found["value"]
        return self._controller_id

    def controller_url(self) -> str:
        """The API base URL the agents post events to."""
        configured = self.core.config.get("nodes.controller_url") or ""
        if configured:
            return configured.rstrip("/")
        host = self.core.config.get("controller.listen") or "127.0.0.1"
        if host in ("0.0.0.0", "::", ""):
            host = socket.getfqdn()
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.core.config.get('controller.port')}/api/v1.0"

    # -- lookups --

    async def node_or_404(self, uuid: str) -> dict:
        node = await self.nodes.find_one({"uuid": uuid})
        if node is None:
            raise ApiError(errors.NOT_FOUND, resource=RESOURCE, key=uuid)
        return node

    async def compute_node_or_404(self, uuid: str) -> dict:
        node = await self.node_or_404(uuid)
        if node.get("type") not in COMPUTE_TYPES:
            raise ApiError(NOT_COMPUTE, key=uuid)
        return node

    def live(self, uuid: str) -> Optional[dict]:
        return self.latest.get(uuid)

    async def render(self, nodes: list[dict], *, controller_view: bool = False) -> list[dict]:
        """The contract's view of ``nodes`` (see :func:`~kvmdesk.plugins.nodes.views.render`).

        A NIC's ``id`` is the id of its record in the network plugin (``core.extensions["network"]``,
        the same NIC that ``/nodes/{uuid}/nics`` lists), looked up once for the whole page.
        """
        network = self.core.extensions.get("network")
        nic_ids = await network.nic_ids([n["uuid"] for n in nodes]) if network is not None and nodes else {}
        return [render(n, self.live(n["uuid"]), controller_view=controller_view, nic_ids=nic_ids) for n in nodes]

    # -- agent calls that answer with API errors --

    async def call(self, node: Mapping[str, Any], method: str, path: str, json: Any = None, **kwargs: Any) -> Any:
        """An agent call whose failures are API errors (for handlers)."""
        if not node.get("agent_secret"):
            raise ApiError(NO_AGENT, name=escaped(node.get("name")) or node.get("ip"))
        try:
            return await self.client.call(node, method, path, json, **kwargs)
        except AgentError as exc:
            raise agent_failure(exc) from None

    # -- enrolment --

    async def enrol(self, ip: str, password: str) -> dict[str, Any]:
        """Enrol with the agent at ``ip``; the secret is kept as a pending enrolment until the node is added.

        :raises ApiError: unreachable, wrong password, enrolled with another controller.
        """
        pending = await self.core.store.collection(ENROLMENTS).find_one({"ip": ip})
        try:
            answer = await self.client.enrol(ip, password, await self.controller_id(), self.controller_url(),
                                             current_secret=pending["agent_secret"] if pending else None)
        except AgentError as exc:
            raise agent_failure(exc) from None
        await self.core.store.collection(ENROLMENTS).update_one(
            {"ip": ip},
            {"$set": {"ip": ip, "agent_secret": answer["secret"], "agent_id": answer["agent_id"],
                      "updated_at": now_text(self.core.clock)}},
            upsert=True,
        )
        log.info("enrolled the agent at {ip} (agent id {agent_id})", ip=ip, agent_id=answer["agent_id"])
        return answer

    async def probe(self, ip: str, password: str, *, require_virt: bool = True) -> tuple[dict, dict]:
        """Enrol and read the host facts: ``(enrolment answer, facts)``.

        :param require_virt: refuse a host without usable KVM (unless its agent runs the demo driver).
        """
        answer = await self.enrol(ip, password)
        facts = await self.call({"ip": ip, "agent_secret": answer["secret"]}, "GET", "/facts")
        virtualization = facts.get("virtualization") or {}
        hypervisor = facts.get("hypervisor") or {}
        if require_virt and not virtualization.get("supported") and not hypervisor.get("demo"):
            raise ApiError(NO_VIRTUALIZATION, ip=ip, reason=virtualization.get("reason") or "no usable /dev/kvm")
        return answer, facts

    def _agent_fields(self, answer: Mapping[str, Any], facts: Mapping[str, Any]) -> dict[str, Any]:
        stamp = now_text(self.core.clock)
        return {
            "agent_secret": answer["secret"],
            "agent_id": answer["agent_id"],
            "agent_version": answer.get("version"),
            "enrolled_at": stamp,
            "facts": dict(facts),
            "facts_at": stamp,
            "hypervisor": facts.get("hypervisor"),
            "hostname": facts.get("hostname"),
            "state": ONLINE,
            "status": STATUS_CODES[ONLINE],
            "status_reason": None,
            "status_changed_at": stamp,
            "last_seen_at": stamp,
        }

    async def add_node(self, ip: str, password: str, pool_uuid: str, *, node_type: int = TYPE_COMPUTE,
                       prepare: Optional[Callable[[dict], Mapping[str, Any]]] = None) -> dict:
        """Enrol the agent at ``ip`` and insert its node record into ``pool_uuid``; start watching it.

        An add that fails after the enrolment leaves both sides as they were: an agent this add
        enrolled is released again; one a ``check_node_virt`` had enrolled stays enrolled with the
        (rotated) secret in the pending enrolment, so that a retry works.

        :param prepare: given the host facts, returns extra fields for the record (or raises ApiError);
            they win over the defaults (e.g. the ``name`` given instead of the host name).
        """
        if await self.nodes.find_one({"ip": ip}) is not None:
            raise ApiError(errors.ALREADY_EXISTS, resource=RESOURCE, key=ip)
        checked_before = await self.core.store.collection(ENROLMENTS).find_one({"ip": ip}) is not None
        try:
            answer, facts = await self.probe(ip, password)
            fields = {"name": facts.get("hostname") or ip, "ip": ip, "type": node_type,
                      "resource_pool_uuid": pool_uuid, **self._agent_fields(answer, facts)}
            fields.update(prepare(facts) if prepare else {})
            await self._check_uplinks(ip, answer, fields.get("uplinks"))
            try:
                created = await self.nodes.insert_one(new_record(self.core.clock, **fields))
            except DuplicateKeyError:
                raise ApiError(errors.ALREADY_EXISTS, resource=RESOURCE, key=ip) from None
        except BaseException:
            if not checked_before:
                await self._release_pending(ip)
            raise
        await self.core.store.collection(ENROLMENTS).delete_many({"ip": ip})
        log.info("added node {name} ({ip}) to pool {pool}", name=escaped(created["name"]), ip=ip, pool=pool_uuid)
        await self.core.created(KIND, created)
        self.announce(created, None, ONLINE)
        if self.watchers.running:
            self.watchers.watch(created)
        return created

    async def _release_pending(self, ip: str) -> None:
        """Undo an enrolment made for an add that failed: unenrol the agent, forget the secret.

        Nothing is done when a node record holds that agent (a concurrent add won); when the agent
        cannot be reached its secret is kept as a pending enrolment (a later add re-enrols with it).
        """
        pending = await self.core.store.collection(ENROLMENTS).find_one({"ip": ip})
        if pending is None or await self.nodes.find_one({"ip": ip}) is not None:
            return
        try:
            await self.client.call({"ip": ip, "agent_secret": pending["agent_secret"]}, "POST", "/unenrol", timeout=10)
        except AgentError as exc:
            log.warn("the add of node {ip} failed and its agent could not be released ({reason}); its secret is "
                     "kept so that the node can be added again", ip=ip, reason=exc.reason)
            return
        await self.core.store.collection(ENROLMENTS).delete_many({"ip": ip})
        log.info("the add of node {ip} failed: its agent was released", ip=ip)

    async def _check_uplinks(self, ip: str, answer: Mapping[str, Any], uplinks: Optional[list[dict]]) -> None:
        """Uplinks on a switch or NIC that does not exist are refused before the node is stored (the network
        plugin, ``core.extensions["network"]``, knows switches and asks the agent for its NICs)."""
        network = self.core.extensions.get("network")
        if uplinks and network is not None:
            await network.check_new_uplinks({"ip": ip, "agent_secret": answer["secret"], "agent_id": answer["agent_id"]},
                                            uplinks)

    async def attach_agent(self, node: Mapping[str, Any], ip: str, password: str, changes: Mapping[str, Any]) -> dict:
        """Enrol the agent at ``ip`` for an existing record (the controller's own node)."""
        answer, facts = await self.probe(ip, password, require_virt=False)
        fields = {**self._agent_fields(answer, facts), "ip": ip, "updated_at": now_text(self.core.clock), **changes}
        updated = await self.nodes.find_one_and_update({"uuid": node["uuid"]}, {"$set": fields})
        await self.core.store.collection(ENROLMENTS).delete_many({"ip": ip})
        if updated is not None:
            self.announce(updated, None, ONLINE)
            if self.watchers.running:
                self.watchers.watch(updated)
        return updated

    async def remove_node(self, node: Mapping[str, Any]) -> Optional[dict]:
        """Delete a compute node (a controller node only loses its compute role).

        Before its agent is released, plugins remove what they made on the node (``kvmdesk_node_removing``).

        :returns: ``{"not_removed": [...]}`` when something stayed on the node (each with a ``reason``).
        :raises ApiError: the node still hosts something (``core.usage("node", uuid)``).
        """
        reason = await self.core.usage("node", node["uuid"])
        if reason:
            raise ApiError(NODE_IN_USE, name=escaped(node.get("name")), reason=reason)
        if node.get("type") in WITHOUT_COMPUTE:
            changes = {"type": WITHOUT_COMPUTE[node["type"]], "resource_pool_uuid": None,
                       "updated_at": now_text(self.core.clock)}
            updated = await self.nodes.find_one_and_update({"uuid": node["uuid"]}, {"$set": changes})
            if updated is not None:
                await self.core.updated(KIND, updated, changes)
            return
        await self.watchers.forget(node["uuid"])
        not_removed = [item for found in await gather_hook(self.core.plugins.hook.kvmdesk_node_removing(
            core=self.core, node=without(node, SECRET_FIELDS))) for item in found or []]
        for item in not_removed:
            log.warn("node {name} ({ip}): left on the node: {item!r}", name=node.get("name"), ip=node.get("ip"), item=item)
        released = False
        if node.get("agent_secret"):
            try:
                await self.client.call(node, "POST", "/unenrol", timeout=10)
                released = True
            except AgentError as exc:
                log.warn("could not release the agent of node {name} ({ip}): {reason}; its secret is kept so "
                         "the node can be added again", name=escaped(node.get("name")), ip=node.get("ip"), reason=exc.reason)
        if not released and node.get("agent_secret"):
            await self.core.store.collection(ENROLMENTS).update_one(
                {"ip": node["ip"]},
                {"$set": {"ip": node["ip"], "agent_secret": node["agent_secret"], "agent_id": node.get("agent_id"),
                          "updated_at": now_text(self.core.clock)}},
                upsert=True,
            )
        await self.nodes.delete_one({"uuid": node["uuid"]})
        log.info("deleted node {name} ({ip})", name=escaped(node.get("name")), ip=node.get("ip"))
        await gather_hook(self.core.plugins.hook.kvmdesk_node_removed(core=self.core, node=without(node, SECRET_FIELDS)))
        await self.core.deleted(KIND, node)
        return {"not_removed": not_removed} if not_removed else None

    # -- status hook --

    def announce(self, node: Mapping[str, Any], old: Optional[str], new: str) -> None:
        """Fire ``kvmdesk_node_status_changed`` (with the record minus its secret)."""
        try:
            self.core.plugins.hook.kvmdesk_node_status_changed(core=self.core, node=without(node, SECRET_FIELDS),
                                                               old=old, new=new)
        except Exception:
            log.failure("a kvmdesk_node_status_changed implementation failed")

    def publish_metrics(self, node: Mapping[str, Any], sample: dict[str, Any]) -> None:
        """Fire ``kvmdesk_node_metrics`` with a heartbeat's sample; a failing plugin costs no heartbeat."""
        try:
            self.core.plugins.hook.kvmdesk_node_metrics(core=self.core, node=without(node, SECRET_FIELDS), sample=sample)
        except Exception:
            log.failure("a kvmdesk_node_metrics implementation failed")

    # -- events --

    async def receive_events(self, node: Mapping[str, Any], events: list[dict[str, Any]]) -> int:
        """Hand an agent's events to ``kvmdesk_domain_event``, one at a time, in order."""
        node = without(node, SECRET_FIELDS)
        for event in events:
            self.events.append({"node_uuid": node["uuid"], **event})
            try:
                await gather_hook(self.core.plugins.hook.kvmdesk_domain_event(core=self.core, node=node, event=event))
            except Exception:
                log.failure("a kvmdesk_domain_event implementation failed for {event!r}", event=event)
        return len(events)

    async def close(self) -> None:
        """Close the agent connections (when the controller stops)."""
        await self.client.close()

