"""Host facts: what a machine is (CPU, memory, GPU, OS, virtualization, NICs, storage).

Part of the protocol: the agent answers its node's facts in this shape (``GET /facts``), and the
controller probes its own machine with the same functions for its controller node record, which
must show a controller without an agent the way it shows a node.  One probe, one shape on both sides;
neither side imports the other's modules for it.

Read from psutil, ``/proc``, ``/sys`` and ``/etc/os-release`` directly, never by parsing the output of
commands.  Every function blocks (file-system reads, psutil): call them in a thread.  Each returns
plain JSON-ready values.  The file locations are parameters so tests can point them at fixtures.
"""
from __future__ import annotations

import errno
import ipaddress
import os
import platform
import socket
from pathlib import Path
from typing import Any, Mapping

import psutil

PROC_CPUINFO = "/proc/cpuinfo"
SYS_PCI_DEVICES = "/sys/bus/pci/devices"
OS_RELEASE = ("/etc/os-release", "/usr/lib/os-release")
DEV_KVM = "/dev/kvm"

#: PCI base class 0x03 is "display controller" (VGA, XGA, 3D, other).
_PCI_DISPLAY_CLASS = 0x03


def hostname() -> str:
    """The node's host name."""
    return socket.gethostname()


def _cpuinfo_fields(path: str) -> dict[str, str]:
    """The first processor block of ``/proc/cpuinfo`` (the others repeat model and flags)."""
    fields: dict[str, str] = {}
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if not line.strip():
                if fields:
                    break
                continue
            key, sep, value = line.partition(":")
            if sep:
                fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_flags(cpuinfo_path: str = PROC_CPUINFO) -> set[str]:
    """The CPU feature flags (x86 ``flags``, ARM ``Features``)."""
    fields = _cpuinfo_fields(cpuinfo_path)
    return set((fields.get("flags") or fields.get("Features") or "").split())


def cpu_info(cpuinfo_path: str = PROC_CPUINFO) -> dict[str, Any]:
    """CPU model and counts.

    :returns: ``{"model", "logical_count", "physical_count"}``; a count is ``None`` when unknown.
    """
    fields = _cpuinfo_fields(cpuinfo_path)
    # x86 says "model name"; ARM and others use one of the later keys.
    model = next(
        (fields[key] for key in ("model name", "Model", "cpu model", "Processor", "cpu") if fields.get(key)),
        platform.processor() or platform.machine(),
    )
    return {
        "model": model,
        "logical_count": psutil.cpu_count(logical=True),
        "physical_count": psutil.cpu_count(logical=False),
    }


def memory_info() -> dict[str, int]:
    """Physical memory in bytes: ``{"total", "available"}``."""
    memory = psutil.virtual_memory()
    return {"total": memory.total, "available": memory.available}


def _read_sysfs(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii").strip()
    except OSError:
        return None


def gpus(pci_devices: str = SYS_PCI_DEVICES) -> list[dict[str, Any]]:
    """Display controllers on the PCI bus.

    :returns: one ``{"address", "class", "vendor_id", "device_id", "driver"}`` per GPU (ids as
        ``0x10de``-style hex strings; ``driver`` is ``None`` when unbound); empty without any.
    """
    root = Path(pci_devices)
    try:
        entries = sorted(root.iterdir())
    except OSError:
        return []
    found = []
    for device in entries:
        pci_class = _read_sysfs(device / "class")
        try:
            class_code = int(pci_class or "", 16)
        except ValueError:
            continue
        if class_code >> 16 != _PCI_DISPLAY_CLASS:
            continue
        driver = device / "driver"
        found.append(
            {
                "address": device.name,
                "class": pci_class,
                "vendor_id": _read_sysfs(device / "vendor"),
                "device_id": _read_sysfs(device / "device"),
                "driver": os.path.basename(os.readlink(driver)) if driver.is_symlink() else None,
            }
        )
    return found


def _parse_os_release(text: str) -> dict[str, str]:
    values: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1].replace('\\"', '"').replace("\\\\", "\\")
        values[key.strip()] = value
    return values


def os_info(os_release: str | tuple[str, ...] = OS_RELEASE) -> dict[str, Any]:
    """Operating system and kernel.

    :param os_release: the file, or candidates tried in order (the os-release(5) fallback).
    :returns: ``{"id", "name", "version", "version_id", "pretty_name", "kernel", "arch"}``;
        the os-release fields are ``None`` when no file is readable.
    """
    candidates = (os_release,) if isinstance(os_release, str) else os_release
    values: dict[str, str] = {}
    for candidate in candidates:
        try:
            values = _parse_os_release(Path(candidate).read_text(encoding="utf-8"))
            break
        except OSError:
            continue
    return {
        "id": values.get("ID"),
        "name": values.get("NAME"),
        "version": values.get("VERSION"),
        "version_id": values.get("VERSION_ID"),
        "pretty_name": values.get("PRETTY_NAME"),
        "kernel": platform.release(),
        "arch": platform.machine(),
    }


def _kvm_usable(path: str) -> tuple[bool, str | None]:
    try:
        # Opening read-write is what QEMU does; existence alone says nothing about permissions.
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return False, f"{path} does not exist (kvm module not loaded or no hardware support)"
        return False, f"{path} cannot be opened read-write: {exc.strerror}"
    os.close(fd)
    return True, None


def virtualization(cpuinfo_path: str = PROC_CPUINFO, kvm_path: str = DEV_KVM) -> dict[str, Any]:
    """Hardware virtualization support.

    ``supported`` follows ``/dev/kvm``: it is what QEMU needs, and inside a VM the CPU flag can be
    hidden while nested KVM still works (or be shown while ``/dev/kvm`` is missing).

    :returns: ``{"cpu_flag": "vmx"|"svm"|None, "kvm_device": bool, "kvm_usable": bool,
        "supported": bool, "reason": str|None}``.
    """
    flags = cpu_flags(cpuinfo_path)
    cpu_flag = "vmx" if "vmx" in flags else "svm" if "svm" in flags else None
    usable, reason = _kvm_usable(kvm_path)
    return {
        "cpu_flag": cpu_flag,
        "kvm_device": os.path.exists(kvm_path),
        "kvm_usable": usable,
        "supported": usable,
        "reason": reason,
    }


def _ipv4(address: str, netmask: str | None) -> dict[str, Any]:
    prefix = ipaddress.IPv4Network(f"0.0.0.0/{netmask}").prefixlen if netmask else 32
    return {"address": address, "netmask": netmask or "255.255.255.255", "prefix": prefix}


def network_interfaces() -> list[dict[str, Any]]:
    """Network interfaces, sorted by name.

    :returns: one ``{"name", "mac", "speed_mbps", "up", "mtu", "loopback", "ipv4": [{"address",
        "netmask", "prefix"}]}`` per interface; ``speed_mbps`` is ``None`` when the driver does not
        say (virtual NICs, links that are down).
    """
    addresses = psutil.net_if_addrs()
    stats = psutil.net_if_stats()
    result = []
    for name in sorted(set(addresses) | set(stats)):
        entries = addresses.get(name, [])
        stat = stats.get(name)
        mac = next((a.address for a in entries if a.family == psutil.AF_LINK), None)
        flags = set((getattr(stat, "flags", "") or "").split(","))
        result.append(
            {
                "name": name,
                "mac": mac,
                "speed_mbps": stat.speed if stat and stat.speed > 0 else None,
                "up": bool(stat and stat.isup),
                "mtu": stat.mtu if stat else None,
                "loopback": "loopback" in flags,
                "ipv4": [_ipv4(a.address, a.netmask) for a in entries if a.family == socket.AF_INET],
            }
        )
    return result


def storage_usage(paths: Mapping[str, str]) -> list[dict[str, Any]]:
    """Usage of the storage path configured for each role.

    :param paths: role -> directory, e.g. ``{"template": "/var/lib/kvmdesk/templates"}``.
    :returns: one ``{"role", "path", "total", "used", "free", "usage", "device", "error"}`` per role (bytes;
        ``usage`` is the percentage psutil reports; ``device`` the filesystem's device number, equal
        for paths on one filesystem); a path that cannot be measured has ``None``
        figures and says why in ``error`` instead of failing the whole report.
    """
    result = []
    for role, path in paths.items():
        entry: dict[str, Any] = {"role": role, "path": str(path)}
        try:
            usage = psutil.disk_usage(str(path))
            device = os.stat(path).st_dev
        except OSError as exc:
            entry.update(total=None, used=None, free=None, usage=None, device=None, error=exc.strerror or str(exc))
        else:
            entry.update(total=usage.total, used=usage.used, free=usage.free, usage=usage.percent, device=device,
                         error=None)
        result.append(entry)
    return result


def host_facts(storage_paths: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Everything above in one document (what ``check_node_virt`` and the node detail need)."""
    return {
        "hostname": hostname(),
        "cpu": cpu_info(),
        "memory": memory_info(),
        "gpus": gpus(),
        "os": os_info(),
        "virtualization": virtualization(),
        "network_interfaces": network_interfaces(),
        "storage": storage_usage(storage_paths or {}),
    }
