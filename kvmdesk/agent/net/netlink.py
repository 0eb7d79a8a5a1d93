"""A node's NICs, addresses and bonds through netlink (pyroute2), never by parsing command output.

Every change is planned first, as a list of netlink requests (:class:`Step`), from a snapshot of the
interfaces taken in the same netlink session; the plan is then executed in order.  Each step knows
its inverse, so a plan that fails half-way is rolled back in reverse order and the node is left as it
was.  Planning is pure (tests check exactly which requests a bond operation sends); execution runs in
a thread (:class:`Netlink`), never on the reactor, one change at a time.

:class:`MemoryNetlink` executes the same plans against an in-memory model of the kernel, for tests of
the layers above; it answers like the kernel (same ``NetlinkError`` codes) and can be told whether the
bonding driver exists.
"""
from __future__ import annotations

import copy
import ipaddress
import itertools
import socket
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import attrs
from pyroute2.netlink.exceptions import NetlinkError
from twisted.internet import defer, threads

from kvmdesk.agent.net import errors as agent_errors
from kvmdesk.agent.net.errors import net_error
from kvmdesk.core.threadpools import in_reactor_pool

BOND_MODES = {0: "balance-rr", 1: "active-backup", 6: "balance-alb"}
#: Interfaces that are not NICs of the node: OVS bridges and ports, taps of domains, Linux bridges.
NOT_NICS = frozenset({"openvswitch", "tun", "bridge"})
IFNAMSIZ = 15

Snapshot = dict[str, Any]


@attrs.frozen
class Step:
    """One netlink request: ``op`` on interface ``target`` with pyroute2 keyword ``args``.

    Interfaces are named, not indexed (a bond created by an earlier step has no index yet); the
    executor resolves names, including ``args["master"]`` (``None`` releases a slave).
    """

    op: str
    target: str
    args: dict = attrs.field(factory=dict)
    #: the request that undoes this one (``None``: nothing to undo).
    inverse: Optional["Step"] = None

    def describe(self) -> str:
        details = " ".join(f"{k}={v}" for k, v in self.args.items())
        return f"{self.op} {self.target} {details}".strip()


# -- the snapshot and the NIC view -----------------------------------------------------------------


def _network(ip: str, prefixlen: int) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network(f"{ip}/{prefixlen}", strict=False)


def nic_view(snap: Snapshot) -> list[dict]:
    """The agent's answer for ``GET /net/nics``: every NIC (bonds included), sorted by name."""
    links = snap["links"]
    route = snap.get("default_route")
    result = []
    for name in sorted(links):
        link = links[name]
        if link.get("loopback") or link.get("kind") in NOT_NICS or name.startswith("ovs-"):
            continue
        entry = {
            "name": name,
            "mac": link.get("mac"),
            "mtu": link.get("mtu"),
            "up": bool(link.get("up")),
            "operstate": link.get("operstate"),
            "kind": link.get("kind"),
            "master": link.get("master"),
            "speed": link.get("speed") or 0,
            "addresses": [
                {"ip": a["ip"], "prefixlen": a["prefixlen"], "netmask": str(_network(a["ip"], a["prefixlen"]).netmask),
                 "label": a.get("label") or name, "secondary": bool(a.get("secondary"))}
                for a in link.get("addresses", [])
            ],
            "gateway": route["gateway"] if route and route.get("dev") == name else None,
            "bond": None,
        }
        if link.get("kind") == "bond":
            entry["bond"] = {"mode": link.get("bond_mode"),
                             "slaves": sorted(n for n, other in links.items() if other.get("master") == name)}
        result.append(entry)
    return result


def _link(snap: Snapshot, name: str) -> dict:
    link = snap["links"].get(name)
    if link is None:
        raise net_error(agent_errors.NO_SUCH_NIC, nic=name)
    return link


def _holder(snap: Snapshot, ip: str) -> Optional[str]:
    for name, link in snap["links"].items():
        if any(a["ip"] == ip for a in link.get("addresses", [])):
            return name
    return None


def _next_label(link_name: str, link: dict, taken: Iterable[str] = ()) -> Optional[str]:
    """``eth0`` for a NIC's first address, then ``eth0:0``, ``eth0:1``... (None if it would not fit)."""
    labels = {a.get("label") for a in link.get("addresses", [])} | set(taken)
    if not link.get("addresses") and not taken:
        return None
    for n in itertools.count():
        label = f"{link_name}:{n}"
        if len(label) > IFNAMSIZ:
            return None
        if label not in labels:
            return label
    return None  # pragma: no cover - itertools.count never ends


def _addr_add(target: str, ip: str, prefixlen: int, label: Optional[str]) -> Step:
    args = {"address": ip, "prefixlen": prefixlen}
    if label and label != target:
        args["label"] = label
    return Step("addr_add", target, args, Step("addr_del", target, {"address": ip, "prefixlen": prefixlen}))


def _addr_del(target: str, address: dict) -> Step:
    back = {"address": address["ip"], "prefixlen": address["prefixlen"]}
    if address.get("label") and address["label"] != target:
        back["label"] = address["label"]
    return Step("addr_del", target, {"address": address["ip"], "prefixlen": address["prefixlen"]},
                Step("addr_add", target, back))


def _set(target: str, args: dict, before: dict) -> Step:
    return Step("link_set", target, args, Step("link_set", target, before))


def _route_add(dev: str, gateway: str) -> Step:
    args = {"dst": "0.0.0.0/0", "gateway": gateway}
    return Step("route_add", dev, args, Step("route_del", dev, dict(args)))


def _flush(target: str, link: dict) -> list[Step]:
    """Delete every address of a NIC, secondaries first (deleting a primary takes its secondaries)."""
    ordered = sorted(link.get("addresses", []), key=lambda a: not a.get("secondary"))
    return [_addr_del(target, a) for a in ordered]


def _removal(snap: Snapshot, target: str, ip: str) -> list[Step]:
    """Delete one address; a primary's secondaries of the same network are deleted and re-added
    around it, since the kernel (without ``promote_secondaries``) drops them with their primary."""
    link = _link(snap, target)
    address = next((a for a in link.get("addresses", []) if a["ip"] == ip), None)
    if address is None:
        raise net_error(agent_errors.ADDRESS_MISSING, nic=target, ip=ip)
    if address.get("secondary"):
        return [_addr_del(target, address)]
    net = _network(ip, address["prefixlen"])
    followers = [a for a in link["addresses"] if a is not address and a.get("secondary")
                 and ipaddress.IPv4Address(a["ip"]) in net]
    steps = [_addr_del(target, a) for a in followers] + [_addr_del(target, address)]
    return steps + [_addr_add(target, a["ip"], a["prefixlen"], a.get("label")) for a in followers]


def _with_address(snap: Snapshot, target: str, ip: str, prefixlen: int, label: Optional[str]) -> Snapshot:
    """The snapshot as it will be after adding an address (the kernel's secondary rule applied)."""
    snap = copy.deepcopy(snap)
    link = snap["links"][target]
    net = _network(ip, prefixlen)
    secondary = any(ipaddress.IPv4Address(a["ip"]) in net and a["prefixlen"] == prefixlen for a in link["addresses"])
    link["addresses"].append({"ip": ip, "prefixlen": prefixlen, "label": label or target, "secondary": secondary})
    return snap


def _check_free(snap: Snapshot, ip: str, allowed: Iterable[str] = ()) -> None:
    holder = _holder(snap, ip)
    if holder is not None and holder not in set(allowed):
        raise net_error(agent_errors.ADDRESS_EXISTS, ip=ip, nic=holder)


def _gateway_steps(snap: Snapshot, dev: str, gateway: Optional[str], vanishing: Iterable[str] = ()) -> list[Step]:
    """A default route through ``gateway`` on ``dev``, unless the node keeps one it already has.

    The agent never replaces a working default route of the node: only when there is none (or the
    one there goes away with the interfaces in ``vanishing``) is the given gateway installed.
    """
    route = snap.get("default_route")
    if route is not None and route.get("dev") not in set(vanishing):
        return []
    gateway = gateway or (route or {}).get("gateway")
    return [_route_add(dev, gateway)] if gateway else []


# -- plans ---------------------------------------------------------------------------------------------


def plan_add_address(snap: Snapshot, nic: str, ip: str, prefixlen: int, *, label: Optional[str] = None,
                     gateway: Optional[str] = None) -> list[Step]:
    link = _link(snap, nic)
    _check_free(snap, ip)
    label = label or _next_label(nic, link)
    return [_addr_add(nic, ip, prefixlen, label), *_gateway_steps(snap, nic, gateway)]


def plan_remove_address(snap: Snapshot, nic: str, ip: str) -> list[Step]:
    return _removal(snap, nic, ip)


def plan_replace_address(snap: Snapshot, nic: str, old_ip: str, ip: str, prefixlen: int, *,
                         gateway: Optional[str] = None) -> list[Step]:
    """Change an address: the new one is added before the old one goes, so a failure leaves the old."""
    link = _link(snap, nic)
    old = next((a for a in link.get("addresses", []) if a["ip"] == old_ip), None)
    if old is None:
        raise net_error(agent_errors.ADDRESS_MISSING, nic=nic, ip=old_ip)
    if old_ip == ip and old["prefixlen"] == prefixlen:
        return _gateway_steps(snap, nic, gateway)
    if old_ip != ip:
        _check_free(snap, ip)
        label = old.get("label")
        staged = _with_address(snap, nic, ip, prefixlen, label)
        steps = [_addr_add(nic, ip, prefixlen, label), *_removal(staged, nic, old_ip)]
    else:
        # same address, new netmask: it must go before it can come back
        steps = [*_removal(snap, nic, old_ip), _addr_add(nic, ip, prefixlen, old.get("label"))]
    return steps + _gateway_steps(snap, nic, gateway)


def _check_mode(mode: int) -> None:
    if mode not in BOND_MODES:
        raise net_error(agent_errors.BOND_MODE, mode=mode)


def _check_slave(snap: Snapshot, name: str, bond: str) -> dict:
    link = _link(snap, name)
    if link.get("kind") == "bond":
        raise net_error(agent_errors.SLAVE_UNAVAILABLE, nic=name, reason="it is a bond itself")
    if link.get("master") and link["master"] != bond:
        raise net_error(agent_errors.SLAVE_UNAVAILABLE, nic=name, reason=f"it is already enslaved to {link['master']}")
    return link


def _enslave(snap: Snapshot, slave: str, bond: str) -> list[Step]:
    link = snap["links"][slave]
    return [*_flush(slave, link),
            _set(slave, {"state": "down"}, {"state": "up" if link.get("up") else "down"}),
            _set(slave, {"master": bond}, {"master": None})]


def _release(snap: Snapshot, slave: str, bond: str) -> list[Step]:
    return [_set(slave, {"master": None}, {"master": bond}), _set(slave, {"state": "up"}, {"state": "down"})]


def _bond_addresses(bond: str, addresses: Sequence[tuple[str, int]], existing: dict) -> list[Step]:
    steps, labels = [], []
    for i, (ip, prefixlen) in enumerate(addresses):
        label = None if i == 0 and not existing.get("addresses") else _next_label(bond, existing, labels)
        labels.append(label or bond)
        steps.append(_addr_add(bond, ip, prefixlen, label))
    return steps


def plan_create_bond(snap: Snapshot, name: str, mode: int, slaves: Sequence[str], addresses: Sequence[tuple[str, int]],
                     gateway: Optional[str] = None) -> list[Step]:
    """Create a bond, enslave NICs (their addresses are flushed), put ``addresses`` on the bond."""
    _check_mode(mode)
    if name in snap["links"]:
        raise net_error(agent_errors.BOND_EXISTS, nic=name)
    for slave in slaves:
        _check_slave(snap, slave, name)
    for ip, _ in addresses:
        _check_free(snap, ip, allowed=slaves)
    steps = [Step("link_add", name, {"kind": "bond", "bond_mode": mode}, Step("link_del", name))]
    for slave in slaves:
        steps += _enslave(snap, slave, name)
    steps += _bond_addresses(name, addresses, {})
    steps.append(Step("link_set", name, {"state": "up"}))
    steps += [Step("link_set", slave, {"state": "up"}) for slave in slaves]
    return steps + _gateway_steps(snap, name, gateway, vanishing=slaves)


def _bond(snap: Snapshot, name: str) -> dict:
    link = _link(snap, name)
    if link.get("kind") != "bond":
        raise net_error(agent_errors.NOT_A_BOND, nic=name)
    return link


def _slaves_of(snap: Snapshot, bond: str) -> list[str]:
    return sorted(n for n, link in snap["links"].items() if link.get("master") == bond)


def plan_edit_bond(snap: Snapshot, name: str, mode: int, slaves: Sequence[str], addresses: Sequence[tuple[str, int]],
                   gateway: Optional[str] = None) -> list[Step]:
    """Change a bond's mode, slaves and addresses.

    The kernel changes a bond's mode only while it is down and has no slaves, so a mode change
    releases every slave, switches the mode and enslaves the new set.
    """
    _check_mode(mode)
    bond = _bond(snap, name)
    current = _slaves_of(snap, name)
    for slave in slaves:
        _check_slave(snap, slave, name)
    wanted_ips = {ip for ip, _ in addresses}
    for ip, _ in addresses:
        _check_free(snap, ip, allowed=[name, *slaves])
    steps: list[Step] = []
    if mode != bond.get("bond_mode"):
        for slave in current:
            steps += _release(snap, slave, name)[:1]
        steps.append(_set(name, {"state": "down"}, {"state": "up" if bond.get("up") else "down"}))
        steps.append(_set(name, {"kind": "bond", "bond_mode": mode}, {"kind": "bond", "bond_mode": bond.get("bond_mode")}))
        released, joining = current, list(slaves)
        staged = copy.deepcopy(snap)
        for slave in current:
            staged["links"][slave]["master"] = None
        steps += [s for slave in joining for s in _enslave(staged, slave, name)]
        steps += [Step("link_set", slave, {"state": "up"}) for slave in released if slave not in slaves]
    else:
        for slave in current:
            if slave not in slaves:
                steps += _release(snap, slave, name)
        for slave in slaves:
            if slave not in current:
                steps += _enslave(snap, slave, name)
    staged = copy.deepcopy(snap)
    for address in [a for a in bond.get("addresses", []) if a["ip"] not in wanted_ips]:
        removal = _removal(staged, name, address["ip"])
        steps += removal
        staged["links"][name]["addresses"] = [a for a in staged["links"][name]["addresses"] if a["ip"] != address["ip"]]
    kept = {a["ip"] for a in staged["links"][name]["addresses"]}
    steps += _bond_addresses(name, [(ip, p) for ip, p in addresses if ip not in kept], staged["links"][name])
    steps.append(Step("link_set", name, {"state": "up"}))
    steps += [Step("link_set", slave, {"state": "up"}) for slave in slaves]
    # a bond taken down for a mode change loses the routes through it
    vanishing = [name] if mode != bond.get("bond_mode") else []
    return steps + _gateway_steps(snap, name, gateway, vanishing=vanishing)


def plan_delete_bond(snap: Snapshot, name: str, inherit: Sequence[tuple[str, str, int]],
                     gateway: Optional[str] = None) -> list[Step]:
    """Delete a bond; each ``(nic, ip, prefixlen)`` of ``inherit`` puts one of its addresses on a NIC."""
    bond = _bond(snap, name)
    slaves = _slaves_of(snap, name)
    own = {a["ip"] for a in bond.get("addresses", [])}
    for nic, ip, _ in inherit:
        target = _link(snap, nic)
        if target.get("kind") == "bond" or (target.get("master") and target["master"] != name):
            raise net_error(agent_errors.SLAVE_UNAVAILABLE, nic=nic, reason="it cannot take over an address of the bond")
        if ip not in own:
            raise net_error(agent_errors.ADDRESS_MISSING, nic=name, ip=ip)
    steps: list[Step] = []
    for slave in slaves:
        steps.append(_set(slave, {"master": None}, {"master": name}))
    steps.append(Step("link_del", name, {}, Step("link_add", name, {"kind": "bond", "bond_mode": bond.get("bond_mode")})))
    steps += [Step("link_set", slave, {"state": "up"}) for slave in slaves]
    labels: dict[str, list[str]] = {}
    for nic, ip, prefixlen in inherit:
        link = snap["links"][nic] if nic not in slaves else {"addresses": []}
        taken = labels.setdefault(nic, [])
        label = None if not link.get("addresses") and not taken else _next_label(nic, link, taken)
        taken.append(label or nic)
        steps.append(_addr_add(nic, ip, prefixlen, label))
    # The bond's default route goes with it: it moves to the NIC that inherits the gateway's network.
    route = snap.get("default_route")
    if route is None or route.get("dev") == name:
        gateway = gateway or (route or {}).get("gateway")
        gw = ipaddress.IPv4Address(gateway) if gateway else None
        dev = next((nic for nic, ip, p in inherit if gw is not None and gw in _network(ip, p)), None)
        if dev is not None:
            steps.append(_route_add(dev, gateway))
    return steps


# -- execution -------------------------------------------------------------------------------------------


def _translate(step: Step, exc: NetlinkError) -> Exception:
    reason = exc.args[1] if len(exc.args) > 1 and exc.args[1] else str(exc)
    if step.op == "link_add" and step.args.get("kind") == "bond" and (
            exc.code == 95 or "unknown device type" in str(reason).lower()):
        return net_error(agent_errors.BOND_DRIVER_MISSING, bond=step.target, reason=reason)
    if step.op == "addr_add" and exc.code == 17:
        return net_error(agent_errors.ADDRESS_EXISTS, ip=step.args["address"], nic=step.target)
    if step.op == "addr_del" and exc.code == 99:
        return net_error(agent_errors.ADDRESS_MISSING, ip=step.args["address"], nic=step.target)
    if exc.code == 19:
        return net_error(agent_errors.NO_SUCH_NIC, nic=step.target)
    return net_error(agent_errors.NETLINK_FAILED, step=step.describe(), reason=reason)


class _Base:
    """The public operations; subclasses say how a snapshot is taken and a step is executed."""

    def __init__(self) -> None:
        self._lock = defer.DeferredLock()

    # subclasses: run ``work(session)`` where the session offers snapshot() and execute(step)
    def _session(self, work: Callable[[Any], Any]) -> defer.Deferred:  # pragma: no cover - abstract
        raise NotImplementedError

    def _apply(self, session: Any, build: Callable[[Snapshot], list[Step]]) -> list[dict]:
        steps = build(session.snapshot())
        done: list[Step] = []
        for step in steps:
            try:
                session.execute(step)
            except NetlinkError as exc:
                for finished in reversed(done):
                    if finished.inverse is not None:
                        try:
                            session.execute(finished.inverse)
                        except NetlinkError:
                            pass  # best effort: the rest of the rollback still runs
                raise _translate(step, exc) from None
            done.append(step)
        return nic_view(session.snapshot())

    async def _change(self, build: Callable[[Snapshot], list[Step]]) -> list[dict]:
        return await self._lock.run(self._session, lambda session: self._apply(session, build))

    async def plan(self, build: Callable[[Snapshot], list[Step]]) -> list[Step]:
        """The requests a change would send now (nothing is executed)."""
        return await self._session(lambda session: build(session.snapshot()))

    async def nics(self) -> list[dict]:
        """Every NIC of the node with its addresses (``nic_view``)."""
        return await self._session(lambda session: nic_view(session.snapshot()))

    async def add_address(self, nic: str, ip: str, prefixlen: int, *, label: Optional[str] = None,
                          gateway: Optional[str] = None) -> list[dict]:
        return await self._change(lambda s: plan_add_address(s, nic, ip, prefixlen, label=label, gateway=gateway))

    async def replace_address(self, nic: str, old_ip: str, ip: str, prefixlen: int, *,
                              gateway: Optional[str] = None) -> list[dict]:
        return await self._change(lambda s: plan_replace_address(s, nic, old_ip, ip, prefixlen, gateway=gateway))

    async def remove_address(self, nic: str, ip: str) -> list[dict]:
        return await self._change(lambda s: plan_remove_address(s, nic, ip))

    async def create_bond(self, name: str, mode: int, slaves: Sequence[str], addresses: Sequence[tuple[str, int]],
                          gateway: Optional[str] = None) -> list[dict]:
        return await self._change(lambda s: plan_create_bond(s, name, mode, slaves, addresses, gateway))

    async def edit_bond(self, name: str, mode: int, slaves: Sequence[str], addresses: Sequence[tuple[str, int]],
                        gateway: Optional[str] = None) -> list[dict]:
        return await self._change(lambda s: plan_edit_bond(s, name, mode, slaves, addresses, gateway))

    async def delete_bond(self, name: str, inherit: Sequence[tuple[str, str, int]],
                          gateway: Optional[str] = None) -> list[dict]:
        return await self._change(lambda s: plan_delete_bond(s, name, inherit, gateway))


class _IPRouteSession:
    """One pyroute2 session (in a worker thread): snapshots and step execution."""

    def __init__(self, ipr: Any, netns: Optional[str], sys_class_net: Path):
        self.ipr = ipr
        self.netns = netns
        self.sys_class_net = sys_class_net

    def _speed(self, name: str) -> int:
        # /sys shows the namespace that mounted it: only trust it for the agent's own namespace.
        if self.netns is not None:
            return 0
        try:
            return max(int((self.sys_class_net / name / "speed").read_text().strip()), 0)
        except (OSError, ValueError):
            return 0

    def snapshot(self) -> Snapshot:
        ipr = self.ipr
        raw = list(ipr.get_links())
        names = {msg["index"]: msg.get_attr("IFLA_IFNAME") for msg in raw}
        links: dict[str, dict] = {}
        for msg in raw:
            name = names[msg["index"]]
            data = msg.get_nested("IFLA_LINKINFO", "IFLA_INFO_DATA")
            links[name] = {
                "index": msg["index"],
                "kind": msg.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND"),
                "master": names.get(msg.get_attr("IFLA_MASTER")) if msg.get_attr("IFLA_MASTER") else None,
                "up": bool(msg["flags"] & 1),
                "loopback": bool(msg["flags"] & 8),
                "operstate": msg.get_attr("IFLA_OPERSTATE"),
                "mac": msg.get_attr("IFLA_ADDRESS"),
                "mtu": msg.get_attr("IFLA_MTU"),
                "bond_mode": data.get_attr("IFLA_BOND_MODE") if data is not None and hasattr(data, "get_attr") else None,
                "speed": self._speed(name),
                "addresses": [],
            }
        for msg in ipr.get_addr(family=socket.AF_INET):
            name = names.get(msg["index"])
            if name in links:
                links[name]["addresses"].append({
                    "ip": msg.get_attr("IFA_ADDRESS") or msg.get_attr("IFA_LOCAL"),
                    "prefixlen": msg["prefixlen"],
                    "label": msg.get_attr("IFA_LABEL") or name,
                    "secondary": bool(msg["flags"] & 0x01),
                })
        route = None
        for msg in ipr.get_routes(family=socket.AF_INET, table=254):
            if msg["dst_len"] == 0 and msg.get_attr("RTA_GATEWAY"):
                route = {"gateway": msg.get_attr("RTA_GATEWAY"), "dev": names.get(msg.get_attr("RTA_OIF"))}
                break
        return {"links": links, "default_route": route}

    def _index(self, name: str) -> int:
        found = self.ipr.link_lookup(ifname=name)
        if not found:
            raise NetlinkError(19, "No such device")
        return found[0]

    def execute(self, step: Step) -> None:
        ipr, args = self.ipr, dict(step.args)
        if step.op == "link_add":
            ipr.link("add", ifname=step.target, **args)
        elif step.op == "link_del":
            ipr.link("del", index=self._index(step.target))
        elif step.op == "link_set":
            if "master" in args:
                args["master"] = self._index(args["master"]) if args["master"] else 0
            ipr.link("set", index=self._index(step.target), **args)
        elif step.op == "addr_add":
            ipr.addr("add", index=self._index(step.target), **args)
        elif step.op == "addr_del":
            ipr.addr("del", index=self._index(step.target), **args)
        elif step.op in ("route_add", "route_del"):
            ipr.route(step.op[6:], oif=self._index(step.target), **args)
        else:  # pragma: no cover - plans only contain the ops above
            raise ValueError(f"unknown step {step.op}")


class Netlink(_Base):
    """The real thing: pyroute2's ``IPRoute`` in a worker thread, optionally in a network namespace.

    :param netns: a named network namespace (``ip netns add``) to work in instead of the agent's own.
    :param reactor: for the worker threads (default: the global reactor).
    """

    def __init__(self, netns: Optional[str] = None, reactor: Any = None, sys_class_net: str = "/sys/class/net"):
        super().__init__()
        self.netns = netns or None
        self._reactor = reactor
        self._sys = Path(sys_class_net)

    def _open(self) -> Any:
        from pyroute2 import IPRoute

        if self.netns is None:
            return IPRoute(ext_ack=True)
        try:
            # flags=0: never create the namespace by accident
            return IPRoute(netns=self.netns, flags=0, ext_ack=True)
        except FileNotFoundError:
            raise net_error(agent_errors.NETNS_MISSING, netns=self.netns) from None

    def _session(self, work: Callable[[Any], Any]) -> defer.Deferred:
        def run() -> Any:
            with self._open() as ipr:
                return work(_IPRouteSession(ipr, self.netns, self._sys))

        if self._reactor is None:
            return threads.deferToThread(run)
        return in_reactor_pool(self._reactor, run)


class _MemorySession:
    def __init__(self, model: "MemoryNetlink"):
        self.model = model

    def snapshot(self) -> Snapshot:
        return copy.deepcopy({"links": self.model.links, "default_route": self.model.default_route})

    def execute(self, step: Step) -> None:
        self.model.sent.append(step)
        self.model.execute(step)


class MemoryNetlink(_Base):
    """An in-memory kernel for tests: the same plans, executed against dicts, answering like netlink.

    :param links: ``{name: {...}}`` as in a snapshot (``addresses``, ``master``, ``kind``, ``up``...).
    :param bonding: whether the bonding driver "is loaded" (the kernels of these machines lack it).
    """

    def __init__(self, links: Optional[dict] = None, *, default_route: Optional[dict] = None, bonding: bool = True):
        super().__init__()
        self.links: dict[str, dict] = copy.deepcopy(links or {})
        for link in self.links.values():
            link.setdefault("addresses", [])
            link.setdefault("master", None)
            link.setdefault("kind", None)
            link.setdefault("up", True)
        self.default_route = default_route
        self.bonding = bonding
        #: every step executed, rollbacks included
        self.sent: list[Step] = []
        #: a step op+target that fails with this NetlinkError (to test rollbacks)
        self.fail: dict[tuple[str, str], NetlinkError] = {}

    def _session(self, work: Callable[[Any], Any]) -> defer.Deferred:
        return defer.maybeDeferred(work, _MemorySession(self))

    def _get(self, name: str) -> dict:
        if name not in self.links:
            raise NetlinkError(19, "No such device")
        return self.links[name]

    def execute(self, step: Step) -> None:
        failure = self.fail.get((step.op, step.target))
        if failure is not None:
            raise failure
        args = step.args
        if step.op == "link_add":
            if step.target in self.links:
                raise NetlinkError(17, "File exists")
            if args.get("kind") == "bond" and not self.bonding:
                raise NetlinkError(95, "Unknown device type")
            self.links[step.target] = {"kind": args.get("kind"), "bond_mode": args.get("bond_mode"), "master": None,
                                       "up": False, "addresses": [], "mac": "02:00:00:00:00:01", "mtu": 1500}
        elif step.op == "link_del":
            self._get(step.target)
            del self.links[step.target]
            for link in self.links.values():
                if link.get("master") == step.target:
                    link["master"] = None
            self._drop_route(step.target)
        elif step.op == "link_set":
            link = self._get(step.target)
            if "master" in args:
                if args["master"]:
                    self._get(args["master"])
                link["master"] = args["master"]
            if "bond_mode" in args:
                if link.get("up") or any(other.get("master") == step.target for other in self.links.values()):
                    raise NetlinkError(16, "Device or resource busy")
                link["bond_mode"] = args["bond_mode"]
            if "state" in args:
                link["up"] = args["state"] == "up"
                if not link["up"]:
                    self._drop_route(step.target)
        elif step.op == "addr_add":
            link = self._get(step.target)
            if any(a["ip"] == args["address"] for a in link["addresses"]):
                raise NetlinkError(17, "ipv4: Address already assigned")
            net = _network(args["address"], args["prefixlen"])
            secondary = any(ipaddress.IPv4Address(a["ip"]) in net and a["prefixlen"] == args["prefixlen"]
                            for a in link["addresses"])
            link["addresses"].append({"ip": args["address"], "prefixlen": args["prefixlen"],
                                      "label": args.get("label", step.target), "secondary": secondary})
        elif step.op == "addr_del":
            link = self._get(step.target)
            address = next((a for a in link["addresses"] if a["ip"] == args["address"]), None)
            if address is None:
                raise NetlinkError(99, "ipv4: Address not found")
            net = _network(address["ip"], address["prefixlen"])
            link["addresses"] = [a for a in link["addresses"] if a is not address and not (
                not address["secondary"] and a["secondary"] and ipaddress.IPv4Address(a["ip"]) in net)]
        elif step.op == "route_add":
            self._get(step.target)
            if self.default_route is not None:
                raise NetlinkError(17, "File exists")
            self.default_route = {"gateway": args["gateway"], "dev": step.target}
        elif step.op == "route_del":
            if self.default_route is None:
                raise NetlinkError(3, "No such process")
            self.default_route = None

    def _drop_route(self, name: str) -> None:
        if self.default_route is not None and self.default_route.get("dev") == name:
            self.default_route = None
