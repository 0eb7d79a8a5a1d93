"""The one renderer of domain XML: every device the spec asks for, escaped, validated before rendering."""
from __future__ import annotations

import uuid
from pathlib import Path
from xml.etree import ElementTree as ET

import pytest
from pydantic import ValidationError

from kvmdesk.agent.domains import xml
from kvmdesk.protocol.domains import DomainSpec


def spec(**changes) -> DomainSpec:
    fields = {
        "uuid": str(uuid.uuid4()), "name": "template-1", "title": "Win7 <lab> & \"co\"", "vcpu": 2, "memory_mb": 2048,
        "disks": [{"kind": "template", "role": 1, "file_id": "sys-1", "boot_order": 1},
                  {"kind": "template", "role": 2, "file_id": "data-1", "boot_order": 2}],
        "nic": {"kind": "ovs", "bridge": "kd-abc", "vlan_tag": 101, "mac": "52:54:00:12:34:56"},
        "vnc": {"password": "s3cr<t&"},
    }
    fields.update(changes)
    return DomainSpec.model_validate(fields)


def resolve(ref) -> Path:
    return Path("/srv/storage") / ref.kind / str(ref.role) / ref.file_id


def test_every_device_of_the_spec_is_rendered():
    tree = ET.fromstring(xml.to_text(xml.render(spec(), resolve, vnc_listen="10.0.0.5")))
    assert tree.get("type") == "kvm"
    assert tree.findtext("title") == "Win7 <lab> & \"co\""  # escaped by the serialiser, read back intact
    assert tree.findtext("memory") == "2048" and tree.find("memory").get("unit") == "MiB"
    assert tree.findtext("vcpu") == "2"
    disks = tree.findall("./devices/disk[@device='disk']")
    assert [d.find("source").get("file") for d in disks] == ["/srv/storage/template/1/sys-1",
                                                             "/srv/storage/template/2/data-1"]
    assert [d.find("target").get("dev") for d in disks] == ["vda", "vdb"]
    assert [d.find("boot").get("order") for d in disks] == ["1", "2"]
    assert all(d.find("driver").get("type") == "qcow2" for d in disks)
    cdrom = tree.find("./devices/disk[@device='cdrom']")
    assert cdrom is not None and cdrom.find("source") is None  # empty: media can be inserted live
    nic = tree.find("./devices/interface")
    assert nic.get("type") == "bridge" and nic.find("source").get("bridge") == "kd-abc"
    assert nic.find("virtualport").get("type") == "openvswitch"
    assert nic.find("vlan/tag").get("id") == "101"
    assert nic.find("mac").get("address") == "52:54:00:12:34:56"
    graphics = tree.find("./devices/graphics")
    assert (graphics.get("type"), graphics.get("listen"), graphics.get("passwd")) == ("vnc", "10.0.0.5", "s3cr<t&")
    assert graphics.get("autoport") == "yes"
    channel = tree.find("./devices/channel/target")
    assert channel.get("name") == "org.qemu.guest_agent.0"
    assert tree.findtext("on_reboot") == "restart"


def test_user_networking_cdrom_media_and_destroy_on_reboot():
    tree = xml.render(spec(nic={"kind": "user", "mac": "52:54:00:00:00:01"}, on_reboot="destroy", guest_agent=False,
                           cdrom={"kind": "iso", "role": 1, "file_id": "win.iso"}), resolve, domain_type="qemu")
    assert tree.get("type") == "qemu"
    nic = tree.find("./devices/interface")
    assert nic.get("type") == "user" and nic.find("virtualport") is None
    assert tree.find("./devices/disk[@device='cdrom']/source").get("file") == "/srv/storage/iso/1/win.iso"
    assert tree.findtext("on_reboot") == "destroy"
    assert tree.find("./devices/channel") is None


def test_flat_network_has_no_vlan():
    tree = xml.render(spec(nic={"kind": "ovs", "bridge": "kd-flat", "vlan_tag": 0, "mac": "52:54:00:00:00:02"}),
                      resolve)
    assert tree.find("./devices/interface/vlan") is None


@pytest.mark.parametrize("changes, field", [
    ({"name": "../etc"}, "name"),
    ({"vcpu": 0}, "vcpu"),
    ({"nic": {"kind": "ovs", "mac": "52:54:00:00:00:01"}}, "nic"),
    ({"nic": {"kind": "ovs", "bridge": "br0", "vlan_tag": 5000, "mac": "52:54:00:00:00:01"}}, "nic.vlan_tag"),
    ({"disks": [{"kind": "template", "role": 1, "file_id": "../../etc/passwd", "boot_order": 1}]}, "disks.0.file_id"),
    ({"disks": [{"kind": "etc", "role": 1, "file_id": "x", "boot_order": 1}]}, "disks.0.kind"),
    ({"disks": [{"kind": "template", "role": 1, "file_id": "a", "boot_order": 1},
                {"kind": "template", "role": 1, "file_id": "b", "boot_order": 1}]}, "disks"),
    ({"vnc": {"password": "12"}}, "vnc.password"),
])
def test_bad_specs_are_refused_naming_the_field(changes, field):
    with pytest.raises(ValidationError) as caught:
        spec(**changes)
    assert ".".join(str(p) for p in caught.value.errors()[0]["loc"]) == field
