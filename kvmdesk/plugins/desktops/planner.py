"""Placement and capacity planning of desktops on nodes: pure functions, no I/O.

A desktop group is created with ``create_info`` (node IP -> how many desktops).  Before anything is
made, every entry is checked against the pool's nodes as the node watchers last stored them:

- the node exists, belongs to the pool, and is not offline;
- the node can hold its share on top of the desktops it already has (*committed* resources, running
  or not, since a class starts all its desktops at once): vCPUs up to ``logical CPUs x
  cpu_overcommit``, RAM up to ``total x ram_overcommit - ram_reserve``, and a disk headroom of
  ``disk_per_desktop`` per new overlay within the free space of the node's desktop-disk storage.

Every problem is reported (the answer's ``data.problems`` lists them all; the message is the first).
Names are ``prefix`` + the number zero-padded to ``postfix`` digits, from ``postfix_start``.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional, Sequence

import attrs

from kvmdesk.core.errors import ApiError, ErrorCode
from kvmdesk.plugins.desktops import codes

GIB = 1024**3
OFFLINE = "offline"
#: The storage role whose free space holds desktops' system overlays (protocol.storage.STORAGE_ROLES).
DESKTOP_DISK_ROLE = "instance_sys"


@attrs.frozen
class Limits:
    """How far nodes may be committed (``[desktops]`` settings)."""

    cpu_overcommit: float = 8.0
    ram_overcommit: float = 1.0
    ram_reserve: int = 2 * GIB
    disk_per_desktop: int = 1 * GIB

    @classmethod
    def from_config(cls, config: Any) -> "Limits":
        return cls(
            cpu_overcommit=float(config.get("desktops.cpu_overcommit", 8.0)),
            ram_overcommit=float(config.get("desktops.ram_overcommit", 1.0)),
            ram_reserve=int(float(config.get("desktops.ram_reserve_gib", 2)) * GIB),
            disk_per_desktop=int(float(config.get("desktops.disk_per_desktop_gib", 1)) * GIB),
        )


@attrs.frozen
class Demand:
    """What one desktop of the group needs."""

    vcpu: int
    ram_gib: float

    @property
    def ram(self) -> int:
        return int(self.ram_gib * GIB)


@attrs.frozen
class NodeView:
    """A node as the planner sees it: identity, state, totals from the watchers, committed resources.

    A figure the node has not reported yet is ``None``.
    """

    uuid: str
    ip: str
    name: str
    pool: Optional[str]
    state: Optional[str]
    cpus: Optional[int]
    ram_total: Optional[int]
    disk_free: Optional[int]
    committed_vcpu: int = 0
    committed_ram: int = 0

    @classmethod
    def of(cls, node: Mapping[str, Any], committed_vcpu: int = 0, committed_ram: int = 0) -> "NodeView":
        facts = node.get("facts") or {}
        metrics = node.get("metrics") or {}
        ram_total = (metrics.get("memory") or {}).get("total") or (facts.get("memory") or {}).get("total")
        disk = next((s for s in facts.get("storage") or [] if s.get("role") == DESKTOP_DISK_ROLE), {})
        return cls(
            uuid=node["uuid"], ip=node.get("ip") or "", name=node.get("name") or node.get("hostname") or "",
            pool=node.get("resource_pool_uuid"), state=node.get("state"),
            cpus=(facts.get("cpu") or {}).get("logical_count"), ram_total=ram_total, disk_free=disk.get("free"),
            committed_vcpu=committed_vcpu, committed_ram=committed_ram,
        )


@attrs.frozen
class Problem:
    """One reason a plan is refused: its catalogue entry and message values."""

    error: ErrorCode
    params: Mapping[str, Any]

    def as_error(self) -> ApiError:
        return ApiError(self.error, **self.params)


@attrs.frozen
class Placement:
    node: NodeView
    count: int


def _gib(value: float) -> str:
    return f"{value / GIB:.1f} GiB"


def capacity_problems(node: NodeView, count: int, demand: Demand, limits: Limits) -> list[Problem]:
    """What keeps ``node`` from taking ``count`` more desktops of ``demand`` (empty: it can)."""
    if node.cpus is None or node.ram_total is None or node.disk_free is None:
        return [Problem(codes.NODE_UNMEASURED, {"ip": node.ip})]
    found = []
    cpu_room = int(node.cpus * limits.cpu_overcommit) - node.committed_vcpu
    if count * demand.vcpu > cpu_room:
        found.append(Problem(codes.NODE_CAPACITY, {"ip": node.ip, "resource": "虚拟CPU", "resource_en": "vCPUs",
                                                     "needed": count * demand.vcpu, "free": max(cpu_room, 0)}))
    ram_room = int(node.ram_total * limits.ram_overcommit) - limits.ram_reserve - node.committed_ram
    if count * demand.ram > ram_room:
        found.append(Problem(codes.NODE_CAPACITY, {"ip": node.ip, "resource": "内存", "resource_en": "memory",
                                                     "needed": _gib(count * demand.ram), "free": _gib(max(ram_room, 0))}))
    if count * limits.disk_per_desktop > node.disk_free:
        found.append(Problem(codes.NODE_CAPACITY, {"ip": node.ip, "resource": "磁盘空间", "resource_en": "disk space",
                                                     "needed": _gib(count * limits.disk_per_desktop),
                                                     "free": _gib(node.disk_free)}))
    return found


def plan(create_info: Mapping[str, Any], instance_num: int, pool: Mapping[str, Any], nodes: Iterable[NodeView],
         demand: Demand, limits: Limits) -> list[Placement]:
    """Check ``create_info`` and return where the desktops go, in ``create_info`` order.

    :param nodes: the candidate nodes (at least those whose IP ``create_info`` names).
    :raises ApiError: the first problem; its ``data`` is ``{"problems": [{"code", "msg", "ip"}...]}``
        with every problem found, in English and Chinese order of ``create_info``.
    """
    by_ip = {n.ip: n for n in nodes}
    problems: list[Problem] = []
    placements: list[Placement] = []
    total = 0
    for ip, count in create_info.items():
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            problems.append(Problem(codes.BAD_COUNT, {"ip": ip, "count": count}))
            continue
        total += count
        node = by_ip.get(ip)
        if node is None:
            problems.append(Problem(codes.UNKNOWN_NODE, {"ip": ip}))
        elif node.pool != pool["uuid"]:
            problems.append(Problem(codes.NODE_OUTSIDE_POOL, {"ip": ip, "pool": pool.get("name") or pool["uuid"]}))
        elif node.state == OFFLINE or node.state is None:
            problems.append(Problem(codes.NODE_OFFLINE, {"ip": ip, "state": node.state or "unknown"}))
        else:
            found = capacity_problems(node, count, demand, limits)
            problems.extend(found)
            if not found:
                placements.append(Placement(node, count))
    if not create_info:
        problems.insert(0, Problem(codes.COUNT_MISMATCH, {"total": 0, "count": instance_num}))
    elif total != instance_num and not any(p.error is codes.BAD_COUNT for p in problems):
        problems.insert(0, Problem(codes.COUNT_MISMATCH, {"total": total, "count": instance_num}))
    if problems:
        raise refusal(problems)
    return placements


def refusal(problems: Sequence[Problem]) -> ApiError:
    """The first problem as the error, every problem in its ``data`` (both languages)."""
    listed = [{"code": p.error.code, "msg": p.error.message("zh", p.params), "msg_en": p.error.message("en", p.params),
               **({"ip": p.params["ip"]} if "ip" in p.params else {})} for p in problems]
    first = problems[0]
    return ApiError(first.error, data={"problems": listed}, **first.params)


def desktop_names(prefix: str, postfix: int, start: int, count: int) -> list[str]:
    """``prefix`` + zero-padded numbers ``start``..``start+count-1``.

    :raises ApiError: the last number needs more than ``postfix`` digits (refused, not widened).
    """
    last = start + count - 1
    if len(str(last)) > postfix:
        raise ApiError(codes.POSTFIX_TOO_SHORT, postfix=postfix, last=last)
    return [f"{prefix}{n:0{postfix}d}" for n in range(start, last + 1)]


def spread(placements: Sequence[Placement], names: Sequence[str]) -> list[tuple[str, NodeView]]:
    """Give the names to the nodes: ``count`` consecutive names per placement, in order."""
    assigned = []
    names_left = iter(names)
    for placement in placements:
        for _ in range(placement.count):
            assigned.append((next(names_left), placement.node))
    return assigned
