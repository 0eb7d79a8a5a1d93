"""The domain protocol between the controller and a node agent: specs, never XML.

The controller says *what* a domain is (:class:`DomainSpec`); the agent alone turns it into libvirt
XML (:mod:`kvmdesk.agent.domains.xml`), so the controller never touches libvirt.  Disks are named by
where they live on the node (``kind``, ``role``, ``file_id``: the image store's places, see
:mod:`kvmdesk.protocol.images`), never by a path: the agent resolves them under its own
storage directories, so a spec cannot point a domain at a file outside them.

Agent routes (relative to ``/agent/v1``; every answer is the usual envelope):

``PUT /domains/{uuid}/spec`` (body: a :class:`DomainSpec`)
    Define (or redefine) the domain; ``{domain info}``.
``POST /domains/{ident}`` ``{"action": A}``
    ``start``, ``shutdown``, ``destroy``, ``reboot``, ``hard_reboot`` (destroy + start), ``reset``,
    ``send_key`` (ctrl+alt+del); ``{domain info}``.
``DELETE /domains/{ident}/definition?delete_disks=1``
    Undefine (stopping it first), and remove its disk files (those in the node's storage) when asked.
    (``DELETE /domains/{ident}`` undefines only, leaving a running domain running as a transient one.)
``PUT /domains/{ident}/cdrom`` (body: :class:`CdromChange`)
    Change the CD-ROM's media (live on a running domain, and in the definition).
``GET /domains/{ident}/vnc``
    ``{"listen", "port", "password"}``: where the domain's VNC server listens (the agent's
    ``agent.vnc_listen``), its port (``None`` while the domain is not running) and its password.
``POST /disks`` (body: :class:`DiskCreate`), ``GET|DELETE /disks/{kind}/{file_id}?role=R``,
``PUT /disks/{kind}/{file_id}/size`` (body: :class:`DiskResize`), ``POST /disks/{kind}/{file_id}/copy``
(body: :class:`DiskCopy`), ``POST /disks/{kind}/{file_id}/seal?role=R``
    qcow2 files: create (empty or an overlay on a backing file), info, remove, grow, flatten a copy;
    a version file's ``{"digest", "size", "version"}`` (``sha256:<hex>``, see :mod:`kvmdesk.protocol.images`;
    waiting while a ``seal_later`` copy is hashed).
``PUT /disks/sizes`` (body: :class:`DisksGrow`)
    Grow several disks, all or none: every size and the space they need together are checked first;
    answers each disk's info, in order.
"""
from __future__ import annotations

import re
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class Model(BaseModel):
    """Like :class:`kvmdesk.api.models.Model` (unknown fields refused, JSON types taken as they are);
    declared here because the protocol imports nothing of kvmdesk but the error catalogue."""

    model_config = ConfigDict(extra="forbid", strict=True)

#: The image store's file names (see kvmdesk.protocol.images.FILE_ID).
FILE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
MAC_PATTERN = r"^52:54:00(:[0-9a-f]{2}){3}$"
BRIDGE_PATTERN = r"^[A-Za-z0-9_.-]{1,15}$"
#: Where files live on a node: the image store's kinds, plus ``instance`` (desktops' disks) and ``iso``.
DISK_KINDS = ("base", "template", "instance", "iso")
BUSES = ("virtio", "sata", "scsi", "ide")
NIC_MODELS = ("virtio", "e1000", "rtl8139")
#: libvirt's ``<on_reboot>``: desktops use ``destroy`` so a reboot ends in a fresh overlay.
ON_REBOOT = ("restart", "destroy")
MAX_DISK_GB = 64 * 1024


class FileRef(Model):
    """One file of a node's storage: its kind, its storage role (1-4) and its name."""

    kind: Literal["base", "template", "instance", "iso"]
    role: int = Field(ge=1, le=4)
    file_id: str = Field(pattern=FILE_ID_PATTERN)


class DiskSpec(FileRef):
    """A disk of a domain; the agent names the targets (``vda``, ``vdb``...) in list order."""

    boot_order: int = Field(ge=1, le=64)
    bus: Literal["virtio", "sata", "scsi", "ide"] = "virtio"
    format: Literal["qcow2", "raw"] = "qcow2"


class NicSpec(Model):
    """The data-network NIC: ``ovs`` on the switch's bridge with the network's VLAN tag, or ``user``
    (QEMU user-mode networking, for hosts without Open vSwitch: tests, demos)."""

    kind: Literal["ovs", "user"] = "ovs"
    bridge: Optional[str] = Field(default=None, pattern=BRIDGE_PATTERN)
    vlan_tag: Optional[int] = Field(default=None, ge=0, le=4094)
    mac: str = Field(pattern=MAC_PATTERN)
    model: Literal["virtio", "e1000", "rtl8139"] = "virtio"

    @model_validator(mode="after")
    def _bridge_for_ovs(self) -> "NicSpec":
        if self.kind == "ovs" and not self.bridge:
            raise ValueError("an ovs NIC needs its bridge")
        return self


class VncSpec(Model):
    """VNC with a per-domain password (QEMU uses at most 8 characters of it).  The listen address is
    the agent's setting (``agent.vnc_listen``), not the controller's: users must not reach it."""

    password: str = Field(min_length=6, max_length=8, pattern=r"^[\x21-\x7e]+$")


class DomainSpec(Model):
    """Everything the agent needs to define one domain."""

    uuid: str = Field(pattern=r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
    name: str = Field(pattern=NAME_PATTERN)
    title: str = Field(default="", max_length=256)
    vcpu: int = Field(ge=1, le=128)
    memory_mb: int = Field(ge=16, le=4 * 1024 * 1024)
    disks: list[DiskSpec] = Field(min_length=1, max_length=16)
    nic: Optional[NicSpec] = None
    vnc: VncSpec
    #: The CD-ROM's media; ``None``: an empty drive (media can be inserted later, live).
    cdrom: Optional[FileRef] = None
    guest_agent: bool = True
    on_reboot: Literal["restart", "destroy"] = "restart"

    @field_validator("disks")
    @classmethod
    def _distinct(cls, disks: list[DiskSpec]) -> list[DiskSpec]:
        places = [(d.kind, d.role, d.file_id) for d in disks]
        if len(set(places)) != len(places):
            raise ValueError("a file is used by two disks")
        orders = [d.boot_order for d in disks]
        if len(set(orders)) != len(orders):
            raise ValueError("two disks have the same boot_order")
        return disks


class CdromChange(Model):
    """``{"media": FileRef}`` inserts, ``{"media": null}`` ejects."""

    media: Optional[FileRef] = None


class DiskCreate(FileRef):
    """A new qcow2 file of ``size_gb``; with ``backing``, an overlay on that file (at least its size)."""

    size_gb: int = Field(ge=1, le=MAX_DISK_GB)
    backing: Optional[FileRef] = None


class DiskResize(Model):
    role: int = Field(ge=1, le=4)
    size_gb: int = Field(ge=1, le=MAX_DISK_GB)


class DiskGrow(FileRef):
    size_gb: int = Field(ge=1, le=MAX_DISK_GB)


class DisksGrow(Model):
    """Disks to grow together (a template's attributes change, #75): none grows unless all can."""

    disks: list[DiskGrow] = Field(min_length=1, max_length=64)


class DiskCopy(Model):
    """Flatten ``{kind}/{file_id}`` (with its backing chain) into a new standalone qcow2 at ``to``."""

    role: int = Field(ge=1, le=4)
    to: FileRef
    #: Seal the copy as this version of an image file (its SHA-256 digest recorded; peers can fetch it).
    version: Optional[int] = Field(default=None, ge=1)
    #: Answer once the file is in place and compute its digest meanwhile (``POST .../seal`` gives it).
    seal_later: bool = False


def valid_file_id(value: str) -> bool:
    return re.match(FILE_ID_PATTERN, value) is not None
