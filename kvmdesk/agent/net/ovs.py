"""Open vSwitch on a node: one bridge per virtual switch, a VLAN tag per data network.

The driver runs ``ovs-vsctl`` asynchronously (``getProcessOutputAndValue``: a child process, never a
blocking call on the reactor) against the OVSDB socket under ``OVS_RUNDIR``.  ``ovs-vsctl`` can exit 0
although ovs-vswitchd could not set a port up (it only prints a warning), so after every change the
driver reads each touched interface's ``ofport`` and ``error`` columns and treats ``ofport == -1`` or
an ``error`` as the failure it is, undoing the change.

What the bridges mean lives in OVSDB itself, so it survives agent restarts:

- Bridge ``external_ids``: ``kvmdesk-switch`` (the switch uuid), ``kvmdesk-type`` (flat/vlan) and
  ``kvmdesk-networks`` (``<network uuid>=<tag>,...``).
- Port ``external_ids``: ``kvmdesk-role`` (``uplink`` or ``access``) and, for access ports,
  ``kvmdesk-network``.

The uplink NIC is a trunk port (no ``tag``); a data network's ports are access ports with the
network's tag, and a flat network's ports get access tag 0 (an untagged port would be a trunk and
could reach every VLAN of the bridge).  Domains attach later through libvirt's
``<virtualport type='openvswitch'/>`` with the bridge and tag from :meth:`OvsDriver.binding`.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any, Mapping, Optional

from twisted.internet import defer
from twisted.internet.utils import getProcessOutputAndValue

from kvmdesk.agent.net import errors as agent_errors
from kvmdesk.agent.net.errors import net_error

SWITCH_KEY = "kvmdesk-switch"
TYPE_KEY = "kvmdesk-type"
NETWORKS_KEY = "kvmdesk-networks"
ROLE_KEY = "kvmdesk-role"
NETWORK_KEY = "kvmdesk-network"
DATAPATHS = ("system", "netdev")
_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,15}$")
_UUID = re.compile(r"^[A-Za-z0-9-]{1,64}$")


def _atom(value: Any) -> Any:
    """Decode OVSDB's JSON data format: ``["map", [[k, v]...]]``, ``["set", [...]]``, ``["uuid", u]``."""
    if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
        kind, body = value
        if kind == "map":
            return {k: _atom(v) for k, v in body}
        if kind == "set":
            items = [_atom(v) for v in body]
            return items if len(items) != 1 else items[0]
        if kind in ("uuid", "named-uuid"):
            return body
    return value


def encode_networks(networks: Mapping[str, int]) -> str:
    return ",".join(f"{uuid}={tag}" for uuid, tag in sorted(networks.items()))


def decode_networks(text: str) -> dict[str, int]:
    result = {}
    for item in (text or "").split(","):
        uuid, sep, tag = item.partition("=")
        if sep and tag.strip().lstrip("-").isdigit():
            result[uuid.strip()] = int(tag)
    return result


def _quoted(text: str) -> str:
    """An OVSDB string atom (the value of ``key="..."``), whatever it contains."""
    return json.dumps(text)


def check_state(state: Mapping[str, Any]) -> dict:
    """Validate what the controller asks for (``switch_uuid, bridge, type, uplink, networks``)."""
    def bad(field: str, reason: str) -> Exception:
        return net_error(agent_errors.BAD_BRIDGE, field=field, reason=reason)

    if not isinstance(state.get("switch_uuid"), str) or not _UUID.match(state["switch_uuid"]):
        raise bad("switch_uuid", "expected a uuid")
    if not isinstance(state.get("bridge"), str) or not _NAME.match(state["bridge"]):
        raise bad("bridge", "expected an interface name of at most 15 characters")
    if state.get("type") not in ("flat", "vlan"):
        raise bad("type", "expected flat or vlan")
    uplink = state.get("uplink")
    if uplink is not None and (not isinstance(uplink, str) or not _NAME.match(uplink)):
        raise bad("uplink", "expected an interface name")
    networks = state.get("networks") or {}
    if not isinstance(networks, Mapping):
        raise bad("networks", "expected {network uuid: tag}")
    for uuid, tag in networks.items():
        if not _UUID.match(str(uuid)) or not isinstance(tag, int) or isinstance(tag, bool) or not 0 <= tag <= 4094:
            raise bad("networks", f"{uuid}: expected a tag from 0 to 4094")
    return {"switch_uuid": state["switch_uuid"], "bridge": state["bridge"], "type": state["type"], "uplink": uplink,
            "networks": {str(k): v for k, v in networks.items()}}


class OvsDriver:
    """Drives the node's Open vSwitch through ``ovs-vsctl``.

    :param rundir: ``OVS_RUNDIR``: where ``db.sock`` is (``/var/run/openvswitch`` on a stock node).
    :param datapath: ``system`` (kernel module) or ``netdev`` (userspace, where the kernel lacks it).
    :param nic_addresses: async callable ``name -> [addresses]`` used to refuse an uplink that still
        carries the node's addresses on the ``system`` datapath (they would stop working).
    """

    def __init__(self, rundir: str, datapath: str = "system", *, vsctl: str = "ovs-vsctl", timeout: int = 10,
                 reactor: Any = None, nic_addresses: Any = None):
        if datapath not in DATAPATHS:
            raise ValueError(f"network.ovs_datapath must be one of {', '.join(DATAPATHS)}, not {datapath!r}")
        self.rundir = rundir
        self.datapath = datapath
        self.db = f"unix:{os.path.join(rundir, 'db.sock')}"
        self.vsctl = shutil.which(vsctl) or vsctl
        self.timeout = timeout
        self.reactor = reactor
        self.nic_addresses = nic_addresses
        self._lock = defer.DeferredLock()

    # -- running ovs-vsctl ---------------------------------------------------------------------------

    async def run(self, *args: str, what: str) -> str:
        """``ovs-vsctl --db=... --timeout=N args``; returns stdout.

        :raises ApiError: OVS unreachable (503) or the command failed (500), with ovs-vsctl's words.
        """
        if not os.path.isabs(self.vsctl):
            raise net_error(agent_errors.OVS_UNAVAILABLE, db=self.db, reason=f"{self.vsctl} is not installed")
        env = {**os.environ, "OVS_RUNDIR": self.rundir}
        argv = [f"--db={self.db}", f"--timeout={self.timeout}", *args]
        kwargs = {"env": env}
        if self.reactor is not None:
            kwargs["reactor"] = self.reactor
        out, err, code = await getProcessOutputAndValue(self.vsctl, argv, **kwargs)
        text = err.decode("utf-8", "replace").strip()
        if code != 0:
            if "database connection failed" in text or "timed out" in text.lower():
                raise net_error(agent_errors.OVS_UNAVAILABLE, db=self.db, reason=_last_line(text))
            raise net_error(agent_errors.OVS_FAILED, what=what, reason=_last_line(text) or f"exit status {code}")
        return out.decode("utf-8", "replace")

    async def _list(self, table: str, columns: list[str], *records: str) -> list[dict]:
        out = await self.run("--format=json", "--data=json", f"--columns={','.join(columns)}", "list", table, *records,
                             what=f"list {table}")
        parsed = json.loads(out)
        return [{h: _atom(v) for h, v in zip(parsed["headings"], row)} for row in parsed["data"]]

    async def _interface_problem(self, name: str) -> Optional[str]:
        """Why an interface does not work (``error`` column, ``ofport`` -1), or ``None`` if it does."""
        rows = await self._list("Interface", ["name", "ofport", "error"], name)
        if not rows:
            return "the interface is missing from OVSDB"
        row = rows[0]
        if row["error"] not in ([], None, ""):
            return str(row["error"])
        if row["ofport"] in (-1, [], None):
            return "Open vSwitch gave it no OpenFlow port (ofport -1)"
        return None

    # -- reading -----------------------------------------------------------------------------------------

    async def _bridges(self) -> list[dict]:
        bridges = await self._list("Bridge", ["name", "external_ids", "datapath_type", "ports"])
        ports = {p["_uuid"]: p for p in await self._list("Port", ["_uuid", "name", "tag", "external_ids"])}
        result = []
        for bridge in bridges:
            ids = bridge["external_ids"] or {}
            port_ids = bridge["ports"] if isinstance(bridge["ports"], list) else [bridge["ports"]]
            members = [ports[p] for p in port_ids if p in ports]
            uplink = next((p["name"] for p in members if (p["external_ids"] or {}).get(ROLE_KEY) == "uplink"), None)
            result.append({
                "bridge": bridge["name"],
                "switch_uuid": ids.get(SWITCH_KEY) if isinstance(ids, dict) else None,
                "type": ids.get(TYPE_KEY) if isinstance(ids, dict) else None,
                "datapath_type": bridge["datapath_type"] or "system",
                "uplink": uplink,
                "networks": decode_networks(ids.get(NETWORKS_KEY, "") if isinstance(ids, dict) else ""),
                "ports": sorted(({"name": p["name"], "tag": p["tag"] if isinstance(p["tag"], int) else None,
                                  "role": (p["external_ids"] or {}).get(ROLE_KEY),
                                  "network_uuid": (p["external_ids"] or {}).get(NETWORK_KEY)} for p in members
                                 if p["name"] != bridge["name"]), key=lambda p: p["name"]),
            })
        return result

    async def switches(self) -> list[dict]:
        """The kvmdesk bridges of this node (bridges without a switch id are not ours)."""
        return [b for b in await self._bridges() if b["switch_uuid"]]

    async def binding(self, network_uuid: str) -> dict:
        """Where a data network lives here: ``{"network_uuid", "switch_uuid", "bridge", "tag", "datapath_type"}``.

        This is what the domain layer puts in ``<source bridge/>`` and ``<vlan><tag id/></vlan>``.
        """
        for bridge in await self.switches():
            if network_uuid in bridge["networks"]:
                return {"network_uuid": network_uuid, "switch_uuid": bridge["switch_uuid"], "bridge": bridge["bridge"],
                        "tag": bridge["networks"][network_uuid], "datapath_type": bridge["datapath_type"]}
        raise net_error(agent_errors.NO_SUCH_NETWORK, network=network_uuid)

    # -- changing ----------------------------------------------------------------------------------------

    async def ensure_switch(self, state: Mapping[str, Any]) -> dict:
        """Make the bridge of one switch exactly ``state`` (idempotent).

        Creates the bridge if missing, sets its datapath type and meaning, puts the uplink NIC in as a
        trunk (the old uplink leaves only once the new one works), retags the access ports of networks
        whose tag changed and removes those of networks that left.

        :raises ApiError: the uplink does not work (``error``/``ofport``), or OVS refused.
        """
        state = check_state(state)
        return await self._lock.run(lambda: defer.ensureDeferred(self._ensure(state)))

    async def _ensure(self, state: dict) -> dict:
        bridge, uplink = state["bridge"], state["uplink"]
        if uplink and self.datapath == "system" and self.nic_addresses is not None:
            addresses = await self.nic_addresses(uplink)
            if addresses:
                raise net_error(agent_errors.UPLINK_HAS_ADDRESSES, nic=uplink, addresses=", ".join(addresses))
        current = {b["bridge"]: b for b in await self._bridges()}
        existing = current.get(bridge) or next(
            (b for b in current.values() if b["switch_uuid"] == state["switch_uuid"]), None)
        if existing is not None and existing["bridge"] != bridge:
            await self.run("del-br", existing["bridge"], what=f"rename bridge {existing['bridge']}")
            existing = None
        args = ["--may-exist", "add-br", bridge, "--", "set", "Bridge", bridge, f"datapath_type={self.datapath}",
                f"external_ids:{SWITCH_KEY}={_quoted(state['switch_uuid'])}", f"external_ids:{TYPE_KEY}={_quoted(state['type'])}",
                f"external_ids:{NETWORKS_KEY}={_quoted(encode_networks(state['networks']))}"]
        old_uplink = existing["uplink"] if existing else None
        new_uplink = uplink if uplink and uplink != old_uplink else None
        if new_uplink:
            args += ["--", "--if-exists", "del-port", new_uplink, "--", "add-port", bridge, new_uplink,
                     "--", "set", "Port", new_uplink, f"external_ids:{ROLE_KEY}=uplink"]
        for port in (existing or {}).get("ports", []):
            if port["role"] != "access":
                continue
            if port["network_uuid"] not in state["networks"]:
                args += ["--", "--if-exists", "del-port", bridge, port["name"]]
            elif port["tag"] != state["networks"][port["network_uuid"]]:
                args += ["--", "set", "Port", port["name"], f"tag={state['networks'][port['network_uuid']]}"]
        await self.run(*args, what=f"set up bridge {bridge}")
        if new_uplink:
            problem = await self._interface_problem(new_uplink)
            if problem is not None:
                undo = ["--if-exists", "del-port", bridge, new_uplink]
                if existing is None:
                    undo = ["--if-exists", "del-br", bridge]
                await self.run(*undo, what=f"undo bridge {bridge}")
                raise net_error(agent_errors.OVS_PORT_FAILED, port=new_uplink, bridge=bridge, reason=problem)
        if old_uplink and old_uplink != uplink:
            await self.run("--if-exists", "del-port", bridge, old_uplink, what=f"remove old uplink {old_uplink}")
        return next(b for b in await self.switches() if b["bridge"] == bridge)

    async def delete_switch(self, switch_uuid: str) -> bool:
        """Remove the bridge of a switch (and every port on it); ``False`` if there was none."""
        async def work() -> bool:
            for bridge in await self.switches():
                if bridge["switch_uuid"] == switch_uuid:
                    await self.run("--if-exists", "del-br", bridge["bridge"], what=f"delete bridge {bridge['bridge']}")
                    return True
            return False

        return await self._lock.run(lambda: defer.ensureDeferred(work()))

    async def attach(self, network_uuid: str, port: str) -> dict:
        """Put ``port`` (a tap or veth of this node) on a data network: an access port with its tag.

        :raises ApiError: no such network here (404), or the port does not work (it is removed again).
        """
        if not _NAME.match(port or ""):
            raise net_error(agent_errors.BAD_BRIDGE, field="port", reason="expected an interface name")

        async def work() -> dict:
            where = await self.binding(network_uuid)
            bridge, tag = where["bridge"], where["tag"]
            await self.run("--if-exists", "del-port", port, "--", "add-port", bridge, port, f"tag={tag}",
                           "--", "set", "Port", port, f"external_ids:{ROLE_KEY}=access",
                           f"external_ids:{NETWORK_KEY}={_quoted(network_uuid)}", what=f"attach {port} to {bridge}")
            problem = await self._interface_problem(port)
            if problem is not None:
                await self.run("--if-exists", "del-port", bridge, port, what=f"undo attach {port}")
                raise net_error(agent_errors.OVS_PORT_FAILED, port=port, bridge=bridge, reason=problem)
            (row,) = await self._list("Interface", ["ofport"], port)
            return {**where, "port": port, "ofport": row["ofport"]}

        return await self._lock.run(lambda: defer.ensureDeferred(work()))

    async def detach(self, port: str) -> bool:
        """Take ``port`` off its bridge; ``False`` if it was on none."""
        if not _NAME.match(port or ""):
            raise net_error(agent_errors.BAD_BRIDGE, field="port", reason="expected an interface name")
        rows = await self._list("Port", ["name"])
        if not any(r["name"] == port for r in rows):
            return False
        await self.run("--if-exists", "del-port", port, what=f"detach {port}")
        return True


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip() and "default log directory" not in line]
    return lines[-1].removeprefix("ovs-vsctl: ") if lines else text


class MemoryOvs:
    """An in-memory Open vSwitch for tests of the layers above: the same methods and answers.

    :param devices: the interface names that exist; a port on any other name fails the way
        ovs-vswitchd reports it (``could not open network device ...``). ``None``: every name exists.
    """

    def __init__(self, datapath: str = "netdev", devices: Optional[set[str]] = None):
        self.datapath = datapath
        self.devices = devices
        self.bridges: dict[str, dict] = {}
        #: every call, for assertions: (method, args)
        self.calls: list[tuple[str, Any]] = []

    def _problem(self, name: str) -> Optional[str]:
        if self.devices is not None and name not in self.devices:
            return f"could not open network device {name} (No such device)"
        return None

    def _view(self, name: str, b: dict) -> dict:
        ports = [{"name": p, **info} for p, info in b["ports"].items()]
        if b["uplink"]:
            ports.append({"name": b["uplink"], "tag": None, "role": "uplink", "network_uuid": None})
        return {"bridge": name, "switch_uuid": b["switch_uuid"], "type": b["type"], "datapath_type": self.datapath,
                "uplink": b["uplink"], "networks": dict(b["networks"]), "ports": sorted(ports, key=lambda p: p["name"])}

    async def switches(self) -> list[dict]:
        return [self._view(n, b) for n, b in sorted(self.bridges.items())]

    async def binding(self, network_uuid: str) -> dict:
        for name, b in self.bridges.items():
            if network_uuid in b["networks"]:
                return {"network_uuid": network_uuid, "switch_uuid": b["switch_uuid"], "bridge": name,
                        "tag": b["networks"][network_uuid], "datapath_type": self.datapath}
        raise net_error(agent_errors.NO_SUCH_NETWORK, network=network_uuid)

    async def ensure_switch(self, state: Mapping[str, Any]) -> dict:
        state = check_state(state)
        self.calls.append(("ensure_switch", state))
        name, uplink = state["bridge"], state["uplink"]
        for other, b in list(self.bridges.items()):
            if b["switch_uuid"] == state["switch_uuid"] and other != name:
                del self.bridges[other]
        if uplink:
            problem = self._problem(uplink)
            if problem is not None:
                raise net_error(agent_errors.OVS_PORT_FAILED, port=uplink, bridge=name, reason=problem)
        b = self.bridges.setdefault(name, {"ports": {}})
        b.update(switch_uuid=state["switch_uuid"], type=state["type"], uplink=uplink, networks=dict(state["networks"]))
        for port, info in list(b["ports"].items()):
            if info["network_uuid"] not in b["networks"]:
                del b["ports"][port]
            else:
                info["tag"] = b["networks"][info["network_uuid"]]
        return self._view(name, b)

    async def delete_switch(self, switch_uuid: str) -> bool:
        self.calls.append(("delete_switch", switch_uuid))
        for name, b in list(self.bridges.items()):
            if b["switch_uuid"] == switch_uuid:
                del self.bridges[name]
                return True
        return False

    async def attach(self, network_uuid: str, port: str) -> dict:
        where = await self.binding(network_uuid)
        problem = self._problem(port)
        if problem is not None:
            raise net_error(agent_errors.OVS_PORT_FAILED, port=port, bridge=where["bridge"], reason=problem)
        for b in self.bridges.values():
            b["ports"].pop(port, None)
        self.bridges[where["bridge"]]["ports"][port] = {"tag": where["tag"], "role": "access", "network_uuid": network_uuid}
        return {**where, "port": port, "ofport": len(self.bridges[where["bridge"]]["ports"])}

    async def detach(self, port: str) -> bool:
        for b in self.bridges.values():
            if b["ports"].pop(port, None) is not None:
                return True
        return False
