"""Domains from specs on one node: define, undefine with disks, CD-ROM media, VNC details.

The power actions themselves are the hypervisor's (:class:`~kvmdesk.agent.hypervisor.Hypervisor`);
this layer adds what needs the node's storage: resolving the spec's files, checking they exist before
libvirt is asked, and removing a domain's disks with it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Optional
from xml.etree import ElementTree as ET

import attrs

from kvmdesk.agent.domains import xml
from kvmdesk.agent.domains.disks import DISK_NOT_FOUND, DiskError, Disks
from kvmdesk.agent.hypervisor import DomainStateError, Hypervisor
from kvmdesk.core.threadpools import in_reactor_pool
from kvmdesk.protocol.domains import DomainSpec, FileRef

#: libvirt driver names (``getType()``) -> the ``<domain type>`` it takes.
_TEST_DRIVER = "TEST"


def kvm_usable() -> bool:
    return os.access("/dev/kvm", os.R_OK | os.W_OK)


@attrs.define
class Domains:
    """The node's domains as specs.

    :param roots: the storage directories (a disk is removed with its domain only if it lies under one).
    :param vnc_listen: where VNC listens: reachable by the controller's console relay, not by users.
    """

    hypervisor: Hypervisor
    disks: Disks
    resolve: Callable[[FileRef], Path]
    roots: list[Path]
    reactor: Any
    vnc_listen: str = "127.0.0.1"

    async def domain_type(self) -> str:
        info = await self.hypervisor.node_info()
        if info["driver"].upper() == _TEST_DRIVER:
            return "test"
        return "kvm" if kvm_usable() else "qemu"

    def _check_files(self, spec: DomainSpec) -> None:
        refs: list[FileRef] = list(spec.disks) + ([spec.cdrom] if spec.cdrom else [])
        for ref in refs:
            if not self.resolve(ref).is_file():
                raise DiskError(DISK_NOT_FOUND, file=f"{ref.kind}/{ref.file_id}")

    async def render(self, spec: DomainSpec) -> str:
        tree = xml.render(spec, self.resolve, domain_type=await self.domain_type(), vnc_listen=self.vnc_listen)
        return xml.to_text(tree)

    async def define(self, spec: DomainSpec) -> dict[str, Any]:
        """Define (or redefine) the domain of ``spec``; every file it names must exist here."""
        await in_reactor_pool(self.reactor, self._check_files, spec)
        return await self.hypervisor.define(await self.render(spec))

    async def change_media(self, ident: str, media: Optional[FileRef]) -> dict[str, Any]:
        """Insert ``media`` in the CD-ROM (``None``: eject), live on a running domain."""
        path = None
        if media is not None:
            path = self.resolve(media)
            if not await in_reactor_pool(self.reactor, path.is_file):
                raise DiskError(DISK_NOT_FOUND, file=f"{media.kind}/{media.file_id}")
        return await self.hypervisor.update_device(ident, ET.tostring(xml.cdrom_element(path), encoding="unicode"))

    async def vnc(self, ident: str) -> dict[str, Any]:
        """``{"listen", "port", "password"}``; ``port`` is ``None`` while the domain is not running."""
        active, text = await self.hypervisor.secure_xml(ident)
        graphics = ET.fromstring(text).find("./devices/graphics[@type='vnc']")
        if graphics is None:
            return {"listen": None, "port": None, "password": None}
        port = int(graphics.get("port", "-1"))
        return {"listen": graphics.get("listen") or self.vnc_listen, "port": port if active and port > 0 else None,
                "password": graphics.get("passwd")}

    def _owned_disks(self, text: str) -> list[Path]:
        """The disk files of a definition that lie in this node's storage (never anything else)."""
        found = []
        for source in ET.fromstring(text).findall("./devices/disk[@device='disk']/source"):
            path = Path(source.get("file") or "")
            if path.is_absolute() and any(path.resolve().is_relative_to(root.resolve()) for root in self.roots):
                found.append(path)
        return found

    async def undefine(self, ident: str, delete_disks: bool = False) -> dict[str, Any]:
        """Stop (if running) and undefine; with ``delete_disks`` also remove its disk files."""
        text = await self.hypervisor.domain_xml(ident, inactive=True)
        info = await self.hypervisor.domain_info(ident)
        if info["id"] is not None:
            try:
                await self.hypervisor.destroy(ident)
            except DomainStateError:
                # It stopped between the look and the destroy (a guest reset with on_reboot=destroy, a
                # shutdown): stopped is what the undefine needs.
                pass
        result = await self.hypervisor.undefine(ident)
        removed: list[str] = []
        if delete_disks:
            for path in self._owned_disks(text):
                if await in_reactor_pool(self.reactor, self.disks.remove_path, path):
                    removed.append(str(path))
        return {**result, "removed_disks": removed}
