"""How templates reach the nodes: the agent client (``core.extensions["agents"]``), its failures as
catalogue errors, the node a template lives on, and the NIC of a data network."""
from __future__ import annotations

from typing import Any, Mapping, Optional

from kvmdesk.core import errors as core_errors
from kvmdesk.core.errors import ApiError
from kvmdesk.plugins.templates import errors, schema

#: Agent error codes that mean "not in this state" (DOMAIN_STATE) and "cannot on this driver".
AGENT_DOMAIN_STATE = 2111
#: Agent error codes that mean "no such domain" and "no such disk file".
AGENT_MISSING = (2110, 5102)
AGENT_DISK_NO_SPACE = 5104
AGENT_DISK_SHRINK = 5103
USABLE_STATES = ("online", "warning")


def node_error(exc: Exception, template_name: str, field: Optional[str] = None) -> ApiError:
    """The catalogue error for a failed agent call about a template.

    The agent client's errors carry ``code``/``status``/``msg`` when the agent answered, and an
    ``api_error()`` for the nodes plugin's own codes; anything else means the node was not reached.
    """
    code, msg = getattr(exc, "code", None), getattr(exc, "msg", None) or str(exc)
    if code == AGENT_DOMAIN_STATE:
        return ApiError(errors.TEMPLATE_STATE, name=template_name, reason=msg)
    if code == AGENT_DISK_NO_SPACE:
        return ApiError(errors.NO_SPACE, field=field or "size", reason=msg)
    if isinstance(code, int) and isinstance(getattr(exc, "status", None), int):
        api_error = getattr(exc, "api_error", None)
        return api_error() if callable(api_error) else ApiError(errors.NODE_UNAVAILABLE, name=template_name, reason=msg)
    return ApiError(errors.NODE_UNAVAILABLE, name=template_name, reason=getattr(exc, "reason", None) or str(exc))


async def call(core: Any, node: Mapping[str, Any], method: str, path: str, json: Any = None, *,
               template_name: str = "", field: Optional[str] = None, missing_ok: bool = False, **kwargs: Any) -> Any:
    """A signed call to ``node``'s agent; failures become :func:`node_error`.

    :param missing_ok: a domain or disk that is not there answers ``None`` (removing what is gone).
    """
    try:
        return await core.extensions["agents"].call(node, method, path, json, **kwargs)
    except ApiError:
        raise
    except Exception as exc:
        if missing_ok and getattr(exc, "code", None) in AGENT_MISSING:
            return None
        raise node_error(exc, template_name, field) from None


async def host_of(core: Any, template: Mapping[str, Any]) -> dict:
    """The node record the template's domain is defined on."""
    node = await core.store.collection(schema.NODES).find_one({"uuid": template.get("host_uuid")})
    if node is None:
        raise ApiError(errors.NODE_UNAVAILABLE, name=template["name"], reason="its node was removed")
    return node


async def pick_node(core: Any, pool_uuid: str, base_image_uuid: Optional[str]) -> dict:
    """A usable node of the pool (holding the base image, when one is named); the one with the fewest
    templates."""
    nodes = await core.store.collection(schema.NODES).find({"resource_pool_uuid": pool_uuid}, sort=[("id", 1)])
    if not nodes:
        raise ApiError(errors.NO_NODE, reason="the pool has no node")
    usable = [n for n in nodes if n.get("state") in USABLE_STATES and n.get("agent_secret")]
    if not usable:
        raise ApiError(errors.NO_NODE, reason="no node of the pool is online")
    ready = usable
    if base_image_uuid is not None:
        holding = {t["node_uuid"] for t in await core.store.collection(schema.TRANSFERS).find(
            {"kind": "base", "image_uuid": base_image_uuid, "status": 0})}
        ready = [n for n in usable if n["uuid"] in holding]
    if not ready:
        raise ApiError(errors.NO_NODE, reason="the base image has not reached any online node yet")
    templates = core.store.collection(schema.TEMPLATES)
    loads = [(await templates.count({"host_uuid": n["uuid"]}), i, n) for i, n in enumerate(ready)]
    return min(loads)[2]


async def network_nic(core: Any, network_uuid: str, subnet_uuid: str) -> tuple[dict, dict, dict]:
    """``(network, subnet, nic)`` where ``nic`` is the spec's ``{"kind", "bridge", "vlan_tag"}``.

    The bridge and tag are the ones the network plugin pushes to every node of the switch (its
    ``vswitchs.bridge`` and ``data_networks.tag``), so the domain lands on the network's VLAN.
    """
    network = await core.store.collection(schema.NETWORKS).find_one({"uuid": network_uuid})
    if network is None:
        raise ApiError(core_errors.NOT_FOUND, resource=schema.NETWORK, key=network_uuid)
    subnet = await core.store.collection(schema.SUBNETS).find_one({"uuid": subnet_uuid})
    if subnet is None:
        raise ApiError(core_errors.NOT_FOUND, resource=schema.SUBNET, key=subnet_uuid)
    if subnet.get("network_uuid") != network_uuid:
        raise ApiError(errors.SUBNET_NOT_IN_NETWORK, subnet=subnet.get("name"), network=network.get("name"))
    switch = await core.store.collection(schema.SWITCHES).find_one({"uuid": network.get("switch_uuid")})
    bridge = (switch or {}).get("bridge")
    if not bridge:
        raise ApiError(core_errors.NOT_FOUND, resource=schema.SWITCH, key=network.get("switch_uuid"))
    return network, subnet, {"kind": "ovs", "bridge": bridge, "vlan_tag": int(network.get("tag") or 0)}
