"""The agent's network API (under the agent's prefix, ``/agent/v1``): NICs, addresses, bonds, bridges.

The agent's HTTP app calls :func:`register_routes` with its router and the agent object; settings
are read from ``agent.config`` (dotted keys):

- ``network.netns``: work inside this named network namespace instead of the agent's own (tests);
- ``network.ovs_rundir``: where Open vSwitch's ``db.sock`` is (default ``$OVS_RUNDIR`` or
  ``/var/run/openvswitch``);
- ``network.ovs_datapath``: ``system`` (default) or ``netdev`` (userspace, no kernel module);
- ``network.ovs_vsctl``, ``network.ovs_timeout``: the ``ovs-vsctl`` to run and its ``--timeout``.

Endpoints (every body and answer is JSON; answers are the envelope's ``data``):

=======  ======================================  ==================================================
GET      /net/nics                               NICs and bonds with their addresses
POST     /net/nics/{nic}/addresses               add ``{ip, netmask, label?, gateway?}``
PUT      /net/nics/{nic}/addresses/{ip}          change to ``{ip, netmask, gateway?}``
DELETE   /net/nics/{nic}/addresses/{ip}          remove
GET      /net/bonds                              bonds only
POST     /net/bonds                              ``{name, mode, slaves, addresses, gateway?}``
PUT      /net/bonds/{name}                       ``{mode, slaves, addresses, gateway?}``
DELETE   /net/bonds/{name}                       ``{inherit: [{nic, ip, netmask}], gateway?}``
GET      /net/switches                           the kvmdesk bridges
PUT      /net/switches/{switch_uuid}             realise ``{bridge, type, uplink, networks}``
DELETE   /net/switches/{switch_uuid}             remove the bridge
GET      /net/networks/{network_uuid}            ``{bridge, tag, ...}`` for the domain layer
POST     /net/networks/{network_uuid}/ports      attach ``{port}`` as an access port
DELETE   /net/ports/{port}                       detach
=======  ======================================  ==================================================
"""
from __future__ import annotations

import ipaddress
import os
from typing import Any, Optional

import attrs
from pydantic import Field

from kvmdesk.agent.net import errors as agent_errors
from kvmdesk.agent.net.errors import net_error
from kvmdesk.agent.net.netlink import Netlink
from kvmdesk.agent.net.ovs import OvsDriver
from kvmdesk.api.models import Model
from kvmdesk.api.router import ApiRequest, Router
from kvmdesk.core import errors
from kvmdesk.core.errors import ApiError, Resource

TAGS = ("agent-network",)
PORT = Resource("端口", "port")


@attrs.define
class NetAgent:
    """The node's network drivers: netlink for NICs and bonds, Open vSwitch for the bridges."""

    netlink: Any
    ovs: Any

    @classmethod
    def from_config(cls, config: Any, reactor: Any = None) -> "NetAgent":
        netlink = Netlink(netns=config.get("network.netns") or None, reactor=reactor)

        async def nic_addresses(name: str) -> list[str]:
            for nic in await netlink.nics():
                if nic["name"] == name:
                    return [f"{a['ip']}/{a['prefixlen']}" for a in nic["addresses"]]
            return []

        ovs = OvsDriver(
            config.get("network.ovs_rundir") or os.environ.get("OVS_RUNDIR") or "/var/run/openvswitch",
            config.get("network.ovs_datapath", "system"),
            vsctl=config.get("network.ovs_vsctl", "ovs-vsctl"),
            timeout=int(config.get("network.ovs_timeout", 10)),
            reactor=reactor,
            nic_addresses=nic_addresses,
        )
        return cls(netlink, ovs)


# -- request bodies --------------------------------------------------------------------------------------


class Address(Model):
    ip: str
    netmask: str


class AddressAdd(Address):
    label: Optional[str] = Field(default=None, max_length=15)
    gateway: Optional[str] = None


class AddressChange(Address):
    gateway: Optional[str] = None


class BondEdit(Model):
    mode: int
    slaves: list[str] = Field(min_length=1)
    addresses: list[Address] = []
    gateway: Optional[str] = None


class BondCreate(BondEdit):
    name: str = Field(min_length=1, max_length=15)


class Inherit(Address):
    nic: str


class BondDelete(Model):
    inherit: list[Inherit] = []
    gateway: Optional[str] = None


class SwitchState(Model):
    switch_uuid: Optional[str] = None
    bridge: str
    type: str
    uplink: Optional[str] = None
    networks: dict[str, int] = {}


class Attach(Model):
    port: str


def _address(field: str, ip: str, netmask: str) -> tuple[str, int]:
    try:
        interface = ipaddress.IPv4Interface(f"{ip}/{netmask}")
    except ValueError:
        raise net_error(agent_errors.BAD_BRIDGE, field=field,
                        reason=f"{ip}/{netmask} is not an IPv4 address and netmask") from None
    return str(interface.ip), interface.network.prefixlen


def _gateway(value: Optional[str]) -> Optional[str]:
    if not value:
        return None
    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        raise net_error(agent_errors.BAD_BRIDGE, field="gateway", reason=f"{value} is not an IPv4 address") from None


def register_routes(router: Router, agent: Any) -> NetAgent:
    """Register the network endpoints on the agent's router, with drivers built from ``agent.config``.

    The agent's app authenticates every request (its signed-request wrapper), so the endpoints do not
    ask the router for a token.
    """
    net = NetAgent.from_config(agent.config, reactor=getattr(agent, "reactor", None))
    register_net_routes(router, net, auth=False)
    return net


def register_net_routes(router: Router, net: NetAgent, *, auth: bool = False) -> None:
    """Register the network endpoints for given drivers (tests pass in-memory ones).

    :param auth: have the router authenticate each request itself (``router.core.auth``), for an
        app that does not authenticate requests before they reach the router.
    """

    def endpoint(method: str, path: str, summary: str, body: Any = None):
        return router.endpoint(method, path, summary=summary, body=body, auth=auth, tags=TAGS, oplog="")

    @endpoint("GET", "/net/nics", "The node's NICs and bonds with their IPv4 addresses")
    async def nics(req: ApiRequest) -> list:
        return await net.netlink.nics()

    @endpoint("POST", "/net/nics/{nic}/addresses", "Add an address to a NIC", AddressAdd)
    async def add_address(req: ApiRequest) -> list:
        ip, prefixlen = _address("ip", req.body.ip, req.body.netmask)
        return await net.netlink.add_address(req.path["nic"], ip, prefixlen, label=req.body.label,
                                             gateway=_gateway(req.body.gateway))

    @endpoint("PUT", "/net/nics/{nic}/addresses/{ip}", "Change an address of a NIC", AddressChange)
    async def change_address(req: ApiRequest) -> list:
        old, _ = _address("ip", req.path["ip"], "32")
        ip, prefixlen = _address("ip", req.body.ip, req.body.netmask)
        return await net.netlink.replace_address(req.path["nic"], old, ip, prefixlen, gateway=_gateway(req.body.gateway))

    @endpoint("DELETE", "/net/nics/{nic}/addresses/{ip}", "Remove an address from a NIC")
    async def remove_address(req: ApiRequest) -> list:
        ip, _ = _address("ip", req.path["ip"], "32")
        return await net.netlink.remove_address(req.path["nic"], ip)

    @endpoint("GET", "/net/bonds", "The node's bonds")
    async def bonds(req: ApiRequest) -> list:
        return [nic for nic in await net.netlink.nics() if nic["bond"] is not None]

    @endpoint("POST", "/net/bonds", "Create a bond (modes 0, 1, 6)", BondCreate)
    async def create_bond(req: ApiRequest) -> list:
        body = req.body
        addresses = [_address(f"addresses.{i}", a.ip, a.netmask) for i, a in enumerate(body.addresses)]
        return await net.netlink.create_bond(body.name, body.mode, body.slaves, addresses, _gateway(body.gateway))

    @endpoint("PUT", "/net/bonds/{name}", "Change a bond's mode, slaves and addresses", BondEdit)
    async def edit_bond(req: ApiRequest) -> list:
        body = req.body
        addresses = [_address(f"addresses.{i}", a.ip, a.netmask) for i, a in enumerate(body.addresses)]
        return await net.netlink.edit_bond(req.path["name"], body.mode, body.slaves, addresses, _gateway(body.gateway))

    @endpoint("DELETE", "/net/bonds/{name}", "Delete a bond; NICs inherit the named addresses", BondDelete)
    async def delete_bond(req: ApiRequest) -> list:
        inherit = [(i.nic, *_address(f"inherit.{n}", i.ip, i.netmask)) for n, i in enumerate(req.body.inherit)]
        return await net.netlink.delete_bond(req.path["name"], inherit, _gateway(req.body.gateway))

    @endpoint("GET", "/net/switches", "The kvmdesk Open vSwitch bridges of this node")
    async def switches(req: ApiRequest) -> list:
        return await net.ovs.switches()

    @endpoint("PUT", "/net/switches/{switch_uuid}", "Realise one virtual switch as a bridge", SwitchState)
    async def ensure_switch(req: ApiRequest) -> dict:
        state = req.body.model_dump()
        if state["switch_uuid"] not in (None, req.path["switch_uuid"]):
            raise net_error(agent_errors.BAD_BRIDGE, field="switch_uuid", reason="differs from the path")
        state["switch_uuid"] = req.path["switch_uuid"]
        return await net.ovs.ensure_switch(state)

    @endpoint("DELETE", "/net/switches/{switch_uuid}", "Remove a virtual switch's bridge")
    async def delete_switch(req: ApiRequest) -> dict:
        return {"deleted": await net.ovs.delete_switch(req.path["switch_uuid"])}

    @endpoint("GET", "/net/networks/{network_uuid}", "The bridge and VLAN tag of a data network on this node")
    async def binding(req: ApiRequest) -> dict:
        return await net.ovs.binding(req.path["network_uuid"])

    @endpoint("POST", "/net/networks/{network_uuid}/ports", "Attach a port to a data network", Attach)
    async def attach(req: ApiRequest) -> dict:
        return await net.ovs.attach(req.path["network_uuid"], req.body.port)

    @endpoint("DELETE", "/net/ports/{port}", "Detach a port from its bridge")
    async def detach(req: ApiRequest) -> dict:
        if not await net.ovs.detach(req.path["port"]):
            raise ApiError(errors.NOT_FOUND, resource=PORT, key=req.path["port"])
        return {"detached": True}
