"""The seam between desktops and their domains: every call this plugin makes to a node's agent.

It speaks the domain protocol of :mod:`kvmdesk.protocol.domains` (domain specs, never XML; disks named
by kind, storage role and file id, never by path):

- a desktop's disks are qcow2 overlays (``kind="instance"``, role 3 system / 4 data) on the files of
  its template's version on the same node (``kind="template"``, the version's ``file_id``s);
- restore = remove the overlay and make a fresh one on the template's *current* version;
- the domain of a desktop with ``sys_restore`` or ``data_restore`` is defined with
  ``on_reboot="destroy"``: a guest-initiated reboot ends the domain, the lifecycle event reaches the
  controller (:mod:`.events`), which restores the overlays and starts it again.
"""
from __future__ import annotations

import os
import secrets
from typing import Any, Mapping, Optional

from kvmdesk.core.errors import ApiError
from kvmdesk.plugins.desktops import codes, schema

#: Agent error codes for "no such domain" and "no such disk file" (removing what is gone is fine).
AGENT_MISSING = (2110, 5102)
ROLE_SYSTEM, ROLE_DATA = 3, 4
#: Template disk roles (1 system, 2 data) -> the roles of the desktop overlays on them.
OVERLAY_ROLE = {1: ROLE_SYSTEM, 2: ROLE_DATA}
#: libvirt states (as the agent names them) -> the contract's desktop status.
STATES = {"running": "active", "blocked": "active", "paused": "active", "pmsuspended": "active",
          "shutoff": "inactive", "shutdown": "inactive", "crashed": "error"}


def random_mac() -> str:
    return "52:54:00:" + ":".join(f"{b:02x}" for b in os.urandom(3))


def vnc_password() -> str:
    return secrets.token_urlsafe(6)[:8]


def restores(group: Mapping[str, Any]) -> bool:
    return bool(group.get("sys_restore") or group.get("data_restore"))


def version_files(template: Mapping[str, Any], version: Optional[int] = None) -> list[dict]:
    """The files of a template version (the current one by default), system disk first."""
    wanted = version if version is not None else template.get("version")
    entry = next((v for v in template.get("versions") or [] if v.get("version") == wanted), None)
    files = list((entry or {}).get("files") or [])
    return sorted(files, key=lambda f: f.get("role", 1))


def overlay_id(desktop_uuid: str, index: int) -> str:
    return f"{desktop_uuid}-{index}"


def overlays(desktop: Mapping[str, Any], template: Mapping[str, Any]) -> list[dict]:
    """The desktop's disk files (``DiskCreate`` bodies), one per file of its template version."""
    sizes = {d.get("uuid"): d.get("size") for d in template.get("devices") or []}
    made = []
    for index, source in enumerate(version_files(template, desktop.get("template_version"))):
        made.append({"kind": "instance", "role": OVERLAY_ROLE.get(source["role"], ROLE_DATA),
                     "file_id": overlay_id(desktop["uuid"], index), "size_gb": max(1, int(sizes.get(source.get("device_uuid")) or 1)),
                     "backing": {"kind": "template", "role": source["role"], "file_id": source["file_id"]}})
    return made


def spec_of(desktop: Mapping[str, Any], group: Mapping[str, Any], template: Mapping[str, Any],
            nic: Optional[Mapping[str, Any]]) -> dict:
    """The desktop's :class:`~kvmdesk.protocol.domains.DomainSpec` (as JSON)."""
    disks = [{"kind": d["kind"], "role": d["role"], "file_id": d["file_id"], "boot_order": i + 1}
             for i, d in enumerate(overlays(desktop, template))]
    return {"uuid": desktop["uuid"], "name": desktop["name"], "title": f"{group['name']}/{desktop['name']}",
            "vcpu": int(group["vcpu"]), "memory_mb": max(16, int(round(float(group["ram"]) * 1024))), "disks": disks,
            "nic": {**nic, "mac": desktop["mac"]} if nic else None, "vnc": {"password": desktop["vnc_password"]},
            "cdrom": None, "guest_agent": True, "on_reboot": "destroy" if restores(group) else "restart"}


async def network_nic(core: Any, network_uuid: str) -> dict:
    """The NIC of a data network: its switch's bridge and its VLAN tag (``[desktops] nic_kind = "user"``:
    QEMU user-mode networking, for hosts without Open vSwitch)."""
    if core.config.get("desktops.nic_kind", "ovs") == "user":
        return {"kind": "user"}
    network = await core.store.collection(schema.NETWORKS).find_one({"uuid": network_uuid}) or {}
    switch = await core.store.collection(schema.SWITCHES).find_one({"uuid": network.get("switch_uuid")}) or {}
    return {"kind": "ovs", "bridge": switch.get("bridge"), "vlan_tag": int(network.get("tag") or 0)}


class DomainOps:
    """Domain and disk operations of desktops on their nodes, through ``core.extensions["agents"]``."""

    def __init__(self, core: Any):
        self.core = core

    async def call(self, node: Mapping[str, Any], desktop: Mapping[str, Any], method: str, path: str, json: Any = None,
                   *, missing_ok: bool = False, **kwargs: Any) -> Any:
        """A signed call to the desktop's node; a failure is the catalogue error 6040 naming both."""
        try:
            return await self.core.extensions["agents"].call(node, method, path, json, **kwargs)
        except ApiError:
            raise
        except Exception as exc:
            if missing_ok and getattr(exc, "code", None) in AGENT_MISSING:
                return None
            reason = getattr(exc, "reason", None) or str(exc)
            raise ApiError(codes.DESKTOP_NODE_FAILED, name=desktop.get("name"), ip=node.get("ip"), reason=reason) from None

    async def make_disks(self, node: Mapping[str, Any], desktop: Mapping[str, Any], template: Mapping[str, Any]) -> None:
        for disk in overlays(desktop, template):
            await self.call(node, desktop, "POST", "/disks", disk)

    async def remove_disks(self, node: Mapping[str, Any], desktop: Mapping[str, Any], template: Mapping[str, Any],
                           roles: tuple[int, ...] = (ROLE_SYSTEM, ROLE_DATA)) -> None:
        for disk in overlays(desktop, template):
            if disk["role"] in roles:
                await self.call(node, desktop, "DELETE", f"/disks/instance/{disk['file_id']}", params={"role": disk["role"]},
                                missing_ok=True)

    async def create(self, node: Mapping[str, Any], desktop: Mapping[str, Any], group: Mapping[str, Any],
                     template: Mapping[str, Any], nic: Optional[Mapping[str, Any]]) -> None:
        """Make the overlays and define the domain (undone by :meth:`remove` if it fails half-way)."""
        await self.make_disks(node, desktop, template)
        await self.call(node, desktop, "PUT", f"/domains/{desktop['uuid']}/spec", spec_of(desktop, group, template, nic))

    async def redefine(self, node: Mapping[str, Any], desktop: Mapping[str, Any], group: Mapping[str, Any],
                       template: Mapping[str, Any], nic: Optional[Mapping[str, Any]]) -> None:
        """Define the domain again (e.g. restore flags changed: ``on_reboot`` follows them)."""
        await self.call(node, desktop, "PUT", f"/domains/{desktop['uuid']}/spec", spec_of(desktop, group, template, nic))

    async def restore(self, node: Mapping[str, Any], desktop: Mapping[str, Any], group: Mapping[str, Any],
                      template: Mapping[str, Any]) -> None:
        """Fresh overlays (system with ``sys_restore``, data with ``data_restore``) on the stopped domain."""
        roles = tuple(r for r, flag in ((ROLE_SYSTEM, group.get("sys_restore")), (ROLE_DATA, group.get("data_restore"))) if flag)
        if not roles:
            return
        await self.remove_disks(node, desktop, template, roles)
        for disk in overlays(desktop, template):
            if disk["role"] in roles:
                await self.call(node, desktop, "POST", "/disks", disk)

    async def state(self, node: Mapping[str, Any], desktop: Mapping[str, Any]) -> str:
        """The contract's status of the domain now (``active``/``inactive``/``error``)."""
        info = await self.call(node, desktop, "GET", f"/domains/{desktop['uuid']}")
        return STATES.get((info or {}).get("state"), "error")

    async def power(self, node: Mapping[str, Any], desktop: Mapping[str, Any], action: str) -> Any:
        """``start``, ``shutdown``, ``destroy``, ``reboot``... (the agent's domain actions)."""
        return await self.call(node, desktop, "POST", f"/domains/{desktop['uuid']}", {"action": action})

    async def remove(self, node: Mapping[str, Any], desktop: Mapping[str, Any],
                     template: Optional[Mapping[str, Any]] = None) -> None:
        """Undefine the domain (stopping it first) and remove its disk files; gone already is fine.

        :param template: also remove overlays no domain names (a create that failed before the define).
        """
        await self.call(node, desktop, "DELETE", f"/domains/{desktop['uuid']}/definition", params={"delete_disks": 1},
                        missing_ok=True)
        if template is not None:
            await self.remove_disks(node, desktop, template)
