"""Node records and how the API shows them (every field of the contract's node list and detail).

A node record keeps what the agent reported (``facts``: hardware, NICs, storage; ``hypervisor``: the
domain summary; ``metrics``: the last stored sample) and the controller's own fields (``type``,
``state``/``status``, the pool).  :func:`render` derives the contract's fields from them, preferring
the watcher's in-memory sample when there is a newer one.  ``agent_secret`` is never shown.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

from kvmdesk.core.ids import stable_uuid
from kvmdesk.protocol.storage import STORAGE_ROLES

NODES = "nodes"

#: Node types of the contract.
TYPE_COMPUTE_MASTER = 1
TYPE_COMPUTE_BACKUP = 2
TYPE_MASTER = 3
TYPE_BACKUP = 4
TYPE_COMPUTE = 5
COMPUTE_TYPES = (TYPE_COMPUTE_MASTER, TYPE_COMPUTE_BACKUP, TYPE_COMPUTE)
CONTROLLER_TYPES = (TYPE_COMPUTE_MASTER, TYPE_COMPUTE_BACKUP, TYPE_MASTER, TYPE_BACKUP)
#: A controller type with the compute role added, and a compute+controller type without it.
WITH_COMPUTE = {TYPE_MASTER: TYPE_COMPUTE_MASTER, TYPE_BACKUP: TYPE_COMPUTE_BACKUP}
WITHOUT_COMPUTE = {v: k for k, v in WITH_COMPUTE.items()}

#: Watcher states and the contract's compute-node ``status`` (0 normal, 1 warning, 2 off).
ONLINE, WARNING, OFFLINE = "online", "warning", "offline"
STATUS_CODES = {ONLINE: 0, WARNING: 1, OFFLINE: 2}
#: The controller-node list shows ``status`` as text (``active`` / ``shutdown``).
CONTROLLER_STATUS = {ONLINE: "active", WARNING: "active", OFFLINE: "shutdown"}

#: Fields the API never returns.
HIDDEN = frozenset({"agent_secret", "facts", "metrics", "hypervisor", "_id"})

GIB = 1024 ** 3
ROLE_VIEWS = {"template_sys": "TEMPLATE_SYS", "template_data": "TEMPLATE_DATA",
              "instance_sys": "INSTANCE_SYS", "instance_data": "INSTANCE_DATA"}
SYSTEM_ROLES = ("template_sys", "instance_sys")
DATA_ROLES = ("template_data", "instance_data")


def percent(part: float, whole: float) -> str:
    """The contract's usage strings: a percentage with two decimals."""
    return f"{(part / whole * 100.0) if whole else 0.0:.2f}"


def _round_gib(value: Optional[float]) -> float:
    return round((value or 0) / GIB, 2)


def storages(node_uuid: str, facts: Mapping[str, Any]) -> tuple[list[dict], dict[str, dict]]:
    """The node's storages (one per distinct path, roles joined) and the per-role views."""
    by_path: dict[str, dict[str, Any]] = {}
    role_of_path: dict[str, str] = {}
    for entry in facts.get("storage") or []:
        role = entry.get("role")
        number = STORAGE_ROLES.get(role)
        if number is None:
            continue
        path = entry.get("path")
        item = by_path.get(path)
        if item is None:
            item = by_path[path] = {
                "uuid": stable_uuid(node_uuid, "storage", path),
                "path": path,
                "used": entry.get("used"),
                "total": entry.get("total"),
                "usage": percent(entry.get("used") or 0, entry.get("total") or 0),
                "roles": [],
                "error": entry.get("error"),
            }
        item["roles"].append(number)
        role_of_path[role] = path
    result = []
    for item in by_path.values():
        roles = sorted(item.pop("roles"))
        item["role"] = ",".join(str(r) for r in roles)
        result.append(item)
    views = {ROLE_VIEWS[role]: by_path[path] for role, path in role_of_path.items()}
    return result, views


def _sum_distinct(views: Mapping[str, dict], roles: tuple[str, ...], key: str) -> int:
    seen = {views[ROLE_VIEWS[r]]["path"]: views[ROLE_VIEWS[r]] for r in roles if ROLE_VIEWS[r] in views}
    return sum(int(v.get(key) or 0) for v in seen.values())


def network_interfaces(node: Mapping[str, Any], facts: Mapping[str, Any],
                       nic_ids: Optional[Mapping[str, int]] = None) -> list[dict]:
    """NICs with their IPs (``ip_info``) as the contract shows them; loopback is left out.

    ``status``: 2 link up, 0 down (the contract's examples show 2 for a working NIC).

    :param nic_ids: NIC uuid -> the ``id`` of its record (the network plugin's); ``id`` is null for a NIC
        not recorded yet (a node whose NICs were not synced, or no network plugin).
    """
    nic_ids = nic_ids or {}
    node_uuid = node["uuid"]
    manage = node.get("manage_interface")
    image = node.get("image_interface")
    stamp = node.get("facts_at") or node.get("updated_at")
    result = []
    for nic in facts.get("network_interfaces") or []:
        if nic.get("loopback"):
            continue
        name = nic.get("name")
        nic_uuid = stable_uuid(node_uuid, "nic", name)
        is_manage = int(name == manage or nic_uuid == manage or (manage is None and _has_ip(nic, node.get("ip"))))
        is_image = int(name == image or nic_uuid == image or (image is None and _has_ip(nic, node.get("ip"))))
        result.append(
            {
                "id": nic_ids.get(nic_uuid),
                "uuid": nic_uuid,
                "nic": name,
                "mac": nic.get("mac"),
                "speed": nic.get("speed_mbps") or 0,
                "status": 2 if nic.get("up") else 0,
                "type": 0,
                "mtu": nic.get("mtu"),
                "deleted_at": None,
                "created_at": node.get("created_at"),
                "updated_at": stamp,
                "ip_info": [
                    {
                        "uuid": stable_uuid(node_uuid, "nic", name, "ip", addr["address"]),
                        "ip": addr["address"],
                        "netmask": addr.get("netmask"),
                        "gateway": None,
                        "dns1": None,
                        "dns2": None,
                        "is_manage": is_manage,
                        "is_image": is_image,
                    }
                    for addr in nic.get("ipv4") or []
                ],
            }
        )
    return result


def _has_ip(nic: Mapping[str, Any], ip: Optional[str]) -> bool:
    return bool(ip) and any(a.get("address") == ip for a in nic.get("ipv4") or [])


def _cpu_text(facts: Mapping[str, Any]) -> Optional[str]:
    cpu = facts.get("cpu") or {}
    if not cpu.get("model"):
        return None
    return f"{cpu['model']} x {cpu.get('logical_count') or '?'}"


def _gpu_text(facts: Mapping[str, Any]) -> Optional[str]:
    gpus = facts.get("gpus") or []
    if not gpus:
        return None
    return ", ".join(f"{g.get('vendor_id')}:{g.get('device_id')} ({g.get('driver') or 'no driver'})" for g in gpus)


def _server_text(facts: Mapping[str, Any]) -> Optional[str]:
    os_info = facts.get("os") or {}
    if not os_info:
        return None
    return " ".join(p for p in (os_info.get("pretty_name"), os_info.get("kernel"), os_info.get("arch")) if p) or None


def render(node: Mapping[str, Any], live: Optional[Mapping[str, Any]] = None, *, controller_view: bool = False,
           nic_ids: Optional[Mapping[str, int]] = None) -> dict:
    """The contract's view of a node record.

    :param live: the watcher's latest sample (``{"metrics", "hypervisor"}``), newer than the record's.
    :param controller_view: the controller-node list (``status`` as ``active``/``shutdown``).
    :param nic_ids: NIC uuid -> record id (see :func:`network_interfaces`).
    """
    facts: Mapping[str, Any] = node.get("facts") or {}
    hypervisor: Mapping[str, Any] = (live or {}).get("hypervisor") or node.get("hypervisor") or {}
    metrics: Mapping[str, Any] = (live or {}).get("metrics") or node.get("metrics") or {}
    hv_node = hypervisor.get("node") or {}
    total_vcpus = int(hv_node.get("cpus") or (facts.get("cpu") or {}).get("logical_count") or 0)
    running_vcpus = int(hypervisor.get("vcpus_running") or 0)
    total_mem_bytes = (hv_node.get("memory_kib") or 0) * 1024 or (facts.get("memory") or {}).get("total") or 0
    running_mem_bytes = (hypervisor.get("memory_running_kib") or 0) * 1024
    storage_list, views = storages(node["uuid"], facts)
    total_sys = _sum_distinct(views, SYSTEM_ROLES, "total")
    used_sys = _sum_distinct(views, SYSTEM_ROLES, "used")
    total_data = _sum_distinct(views, DATA_ROLES, "total")
    used_data = _sum_distinct(views, DATA_ROLES, "used")
    memory_percent = (metrics.get("memory") or {}).get("percent")
    cpu_percent = (metrics.get("cpu") or {}).get("percent")
    state = node.get("state") or ONLINE
    view = {k: v for k, v in node.items() if k not in HIDDEN}
    view.update(
        {
            "hostname": node.get("hostname") or facts.get("hostname"),
            "server_version_info": _server_text(facts),
            "cpu_info": _cpu_text(facts),
            "mem_info": f"{_round_gib((facts.get('memory') or {}).get('total'))}G" if facts.get("memory") else None,
            "gpu_info": _gpu_text(facts),
            "status": CONTROLLER_STATUS[state] if controller_view else STATUS_CODES.get(state, 1),
            "state": state,
            "total_vcpus": total_vcpus,
            "running_vcpus": running_vcpus,
            "usage_vcpus": percent(running_vcpus, total_vcpus),
            "usage_vcpu": percent(running_vcpus, total_vcpus),
            "cpu_usage": f"{cpu_percent:.2f}" if cpu_percent is not None else None,
            "total_mem": _round_gib(total_mem_bytes),
            "running_mem": _round_gib(running_mem_bytes),
            "usage_mem": f"{memory_percent:.2f}" if memory_percent is not None else percent(running_mem_bytes,
                                                                                              total_mem_bytes),
            "total_vm": int(hypervisor.get("domains_total") or 0),
            "running_vm": int(hypervisor.get("domains_running") or 0),
            "network_interfaces": network_interfaces(node, facts, nic_ids),
            "storages": storage_list,
            "TEMPLATE_SYS": views.get("TEMPLATE_SYS"),
            "TEMPLATE_DATA": views.get("TEMPLATE_DATA"),
            "INSTANCE_SYS": views.get("INSTANCE_SYS"),
            "INSTANCE_DATA": views.get("INSTANCE_DATA"),
            "usage_sys": percent(used_sys, total_sys),
            "usage_data": percent(used_data, total_data),
            "total_sys": total_sys,
            "used_sys": used_sys,
            "total_data": total_data,
            "used_data": used_data,
            "deleted": node.get("deleted", 0),
            "deleted_at": node.get("deleted_at"),
            "demo_hypervisor": bool(hypervisor.get("demo")),
            "hypervisor_warning": (
                "演示虚拟化 (libvirt test driver): 不能运行真实的虚拟机 / demo hypervisor: no real virtual machines"
                if hypervisor.get("demo") else hypervisor.get("error")
            ),
            "virtualization": facts.get("virtualization"),
        }
    )
    return view


def check_view(node_uuid: str, facts: Mapping[str, Any]) -> dict:
    """``check_node_virt``'s ``interface_list`` and ``storage_list``."""
    interfaces = []
    for nic in facts.get("network_interfaces") or []:
        if nic.get("loopback"):
            continue
        first = (nic.get("ipv4") or [{}])[0]
        interfaces.append(
            {
                "uuid": stable_uuid(node_uuid, "nic", nic.get("name")),
                "interface": nic.get("name"),
                "ip": first.get("address"),
                "mask": first.get("netmask"),
                "mac": nic.get("mac"),
                "speed": nic.get("speed_mbps") or 0,
                "stat": 1 if nic.get("up") else 0,
                "ip_list": [{"ip": a["address"], "mask": a.get("netmask")} for a in nic.get("ipv4") or []],
            }
        )
    storage_list, _ = storages(node_uuid, facts)
    return {
        "interface_list": interfaces,
        "storage_list": [
            {
                "path": s["path"],
                "total": s["total"],
                "used": s["used"],
                "type": int(s["role"].split(",")[0]) if s["role"] else None,
                "role": s["role"],
                "utilization": float(s["usage"]),
            }
            for s in storage_list
        ],
    }
