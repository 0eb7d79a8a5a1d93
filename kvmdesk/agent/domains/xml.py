"""The one renderer of libvirt domain XML, from a :class:`~kvmdesk.protocol.domains.DomainSpec`.

Built with :mod:`xml.etree.ElementTree`, so every value is escaped by the serialiser, never by hand.
"""
from __future__ import annotations

import string
from pathlib import Path
from typing import Callable, Optional
from xml.etree import ElementTree as ET

from kvmdesk.protocol.domains import DiskSpec, DomainSpec, FileRef

#: Resolves a file of the node's storage to its path (the agent's image store).
Resolve = Callable[[FileRef], Path]

#: Target prefixes per bus.
_PREFIX = {"virtio": "vd", "sata": "sd", "scsi": "sd", "ide": "hd"}
#: The CD-ROM sits on SATA (Q35 and i440fx both have it; IDE is absent on Q35): ``sdz`` stays clear
#: of disk targets.
CDROM_TARGET = "sdz"
GUEST_AGENT_CHANNEL = "org.qemu.guest_agent.0"


def _sub(parent: ET.Element, tag: str, text: Optional[str] = None, **attrs: str) -> ET.Element:
    element = ET.SubElement(parent, tag, {k.rstrip("_"): v for k, v in attrs.items()})
    if text is not None:
        element.text = text
    return element


def disk_targets(disks: list[DiskSpec]) -> list[str]:
    """``vda``, ``vdb``... per bus, in list order."""
    used: dict[str, int] = {}
    targets = []
    for disk in disks:
        prefix = _PREFIX[disk.bus]
        index = used.get(prefix, 0)
        used[prefix] = index + 1
        targets.append(prefix + string.ascii_lowercase[index])
    return targets


def cdrom_element(media: Optional[Path]) -> ET.Element:
    """The CD-ROM device, empty when ``media`` is ``None`` (also what a live media change sends)."""
    disk = ET.Element("disk", {"type": "file", "device": "cdrom"})
    _sub(disk, "driver", name="qemu", type="raw")
    if media is not None:
        _sub(disk, "source", file=str(media))
    _sub(disk, "target", dev=CDROM_TARGET, bus="sata")
    _sub(disk, "readonly")
    return disk


def render(spec: DomainSpec, resolve: Resolve, *, domain_type: str = "kvm", vnc_listen: str = "127.0.0.1",
           arch: str = "x86_64") -> ET.Element:
    """The ``<domain>`` tree of ``spec``.

    :param resolve: turns each disk's (and the CD-ROM's) file reference into its path on this node.
    :param domain_type: ``kvm``, ``qemu`` (no /dev/kvm) or ``test`` (libvirt's test driver).
    :param vnc_listen: the address VNC listens on (the agent's ``agent.vnc_listen``).
    """
    domain = ET.Element("domain", {"type": domain_type})
    _sub(domain, "name", spec.name)
    _sub(domain, "uuid", spec.uuid)
    if spec.title:
        _sub(domain, "title", spec.title)
    _sub(domain, "memory", str(spec.memory_mb), unit="MiB")
    _sub(domain, "currentMemory", str(spec.memory_mb), unit="MiB")
    _sub(domain, "vcpu", str(spec.vcpu), placement="static")
    os_ = _sub(domain, "os")
    _sub(os_, "type", "hvm", arch=arch)
    features = _sub(domain, "features")
    _sub(features, "acpi")
    _sub(features, "apic")
    if domain_type == "kvm":
        _sub(domain, "cpu", mode="host-passthrough")
    _sub(domain, "clock", offset="utc")
    _sub(domain, "on_poweroff", "destroy")
    _sub(domain, "on_reboot", spec.on_reboot)
    _sub(domain, "on_crash", "destroy")
    devices = _sub(domain, "devices")
    for disk, target in zip(spec.disks, disk_targets(spec.disks)):
        element = _sub(devices, "disk", type="file", device="disk")
        _sub(element, "driver", name="qemu", type=disk.format, cache="none", discard="unmap")
        _sub(element, "source", file=str(resolve(disk)))
        _sub(element, "target", dev=target, bus=disk.bus)
        _sub(element, "boot", order=str(disk.boot_order))
    devices.append(cdrom_element(resolve(spec.cdrom) if spec.cdrom else None))
    if spec.nic is not None:
        nic = spec.nic
        if nic.kind == "ovs":
            interface = _sub(devices, "interface", type="bridge")
            _sub(interface, "source", bridge=nic.bridge or "")
            _sub(interface, "virtualport", type="openvswitch")
            if nic.vlan_tag:
                vlan = _sub(interface, "vlan")
                _sub(vlan, "tag", id=str(nic.vlan_tag))
        else:
            interface = _sub(devices, "interface", type="user")
        _sub(interface, "mac", address=nic.mac)
        _sub(interface, "model", type=nic.model)
    graphics = _sub(devices, "graphics", type="vnc", port="-1", autoport="yes", listen=vnc_listen,
                    passwd=spec.vnc.password)
    _sub(graphics, "listen", type="address", address=vnc_listen)
    _sub(devices, "video").append(ET.Element("model", {"type": "virtio" if domain_type != "test" else "vga"}))
    _sub(devices, "input", type="tablet", bus="usb")
    if spec.guest_agent:
        channel = _sub(devices, "channel", type="unix")
        _sub(channel, "target", type="virtio", name=GUEST_AGENT_CHANNEL)
    return domain


def to_text(tree: ET.Element) -> str:
    """The XML text libvirt is given."""
    ET.indent(tree)
    return ET.tostring(tree, encoding="unicode")
