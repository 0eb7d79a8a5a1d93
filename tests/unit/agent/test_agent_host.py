"""Host facts: real values from this machine for shape and sanity, fixtures for the parsers."""
from __future__ import annotations

import json
import os
import platform
import socket

from kvmdesk.protocol import hostfacts as host

CPUINFO_INTEL = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Gold 6230 CPU @ 2.10GHz
flags\t\t: fpu vme de pse vmx ssse3

processor\t: 1
model name\t: Intel(R) Xeon(R) Gold 6230 CPU @ 2.10GHz
flags\t\t: fpu vme de pse vmx ssse3
"""

CPUINFO_PLAIN = """processor\t: 0
model name\t: Some CPU
flags\t\t: fpu sse2
"""


def test_host_facts_on_this_machine(tmp_path):
    facts = host.host_facts({"system": "/", "images": str(tmp_path), "gone": str(tmp_path / "absent")})
    json.dumps(facts)  # JSON-ready all the way down

    assert facts["hostname"] == socket.gethostname()
    assert facts["cpu"]["logical_count"] == os.cpu_count()
    assert facts["cpu"]["model"]
    assert facts["memory"]["total"] > 0
    assert 0 < facts["memory"]["available"] <= facts["memory"]["total"]
    assert facts["os"]["kernel"] == platform.release()
    assert set(facts["virtualization"]) == {"cpu_flag", "kvm_device", "kvm_usable", "supported", "reason"}
    for gpu in facts["gpus"]:
        assert gpu["class"].startswith("0x03")

    nics = {nic["name"]: nic for nic in facts["network_interfaces"]}
    lo = nics["lo"]
    assert lo["loopback"] and lo["up"]
    assert {"address": "127.0.0.1", "netmask": "255.0.0.0", "prefix": 8} in lo["ipv4"]
    for nic in nics.values():
        assert set(nic) == {"name", "mac", "speed_mbps", "up", "mtu", "loopback", "ipv4"}
        assert nic["speed_mbps"] is None or nic["speed_mbps"] > 0

    storage = {entry["role"]: entry for entry in facts["storage"]}
    system = storage["system"]
    assert system["error"] is None
    assert system["total"] > 0 and 0 <= system["used"] <= system["total"] and 0 <= system["free"] <= system["total"]
    assert 0.0 <= system["usage"] <= 100.0
    assert storage["images"]["total"] == system["total"] or storage["images"]["total"] > 0
    gone = storage["gone"]
    assert gone["total"] is None and gone["usage"] is None
    assert "No such file" in gone["error"]


def test_cpu_model_and_flags_from_cpuinfo(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO_INTEL)
    assert host.cpu_info(str(path))["model"] == "Intel(R) Xeon(R) Gold 6230 CPU @ 2.10GHz"
    assert {"vmx", "ssse3"} <= host.cpu_flags(str(path))


def test_virtualization_supported_when_kvm_opens_read_write(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(CPUINFO_INTEL)
    kvm = tmp_path / "kvm"
    kvm.write_bytes(b"")
    result = host.virtualization(str(cpuinfo), str(kvm))
    assert result == {"cpu_flag": "vmx", "kvm_device": True, "kvm_usable": True, "supported": True, "reason": None}


def test_virtualization_missing_kvm_device(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(CPUINFO_PLAIN)
    result = host.virtualization(str(cpuinfo), str(tmp_path / "no-kvm"))
    assert result["cpu_flag"] is None
    assert result["supported"] is False and result["kvm_device"] is False
    assert "does not exist" in result["reason"]


def test_virtualization_kvm_not_openable(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(CPUINFO_PLAIN)
    # A directory cannot be opened read-write even by root (a mode-0400 file could be).
    kvm = tmp_path / "kvm"
    kvm.mkdir()
    result = host.virtualization(str(cpuinfo), str(kvm))
    assert result["kvm_device"] is True and result["supported"] is False
    assert "read-write" in result["reason"]


def _pci_device(root, address, pci_class, vendor, device, driver=None):
    path = root / address
    path.mkdir()
    (path / "class").write_text(pci_class + "\n")
    (path / "vendor").write_text(vendor + "\n")
    (path / "device").write_text(device + "\n")
    if driver:
        target = root.parent / "drivers" / driver
        target.mkdir(parents=True, exist_ok=True)
        (path / "driver").symlink_to(target)


def test_gpus_are_the_display_class_pci_devices(tmp_path):
    root = tmp_path / "devices"
    root.mkdir()
    _pci_device(root, "0000:00:02.0", "0x030000", "0x8086", "0x3e92", driver="i915")
    _pci_device(root, "0000:01:00.0", "0x030200", "0x10de", "0x1eb8")
    _pci_device(root, "0000:00:03.0", "0x020000", "0x1af4", "0x1041", driver="virtio-pci")
    assert host.gpus(str(root)) == [
        {"address": "0000:00:02.0", "class": "0x030000", "vendor_id": "0x8086", "device_id": "0x3e92", "driver": "i915"},
        {"address": "0000:01:00.0", "class": "0x030200", "vendor_id": "0x10de", "device_id": "0x1eb8", "driver": None},
    ]
    assert host.gpus(str(tmp_path / "no-pci-bus")) == []


def test_os_release_parsing_and_fallback(tmp_path):
    release = tmp_path / "os-release"
    release.write_text('NAME="Rocky Linux"\nVERSION="9.3 (Blue Onyx)"\nID=rocky\n# comment\nVERSION_ID="9.3"\nPRETTY_NAME=\'Rocky 9\'\n')
    info = host.os_info((str(tmp_path / "missing"), str(release)))
    assert (info["id"], info["name"], info["version"], info["version_id"], info["pretty_name"]) == (
        "rocky",
        "Rocky Linux",
        "9.3 (Blue Onyx)",
        "9.3",
        "Rocky 9",
    )
    assert info["kernel"] == platform.release()
    nothing = host.os_info(str(tmp_path / "missing"))
    assert nothing["name"] is None and nothing["kernel"] == platform.release()
