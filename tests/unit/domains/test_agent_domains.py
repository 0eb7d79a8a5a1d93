"""The agent's domain layer over its signed HTTP API, on libvirt's test driver: qcow2 disks through
qemu-img, domains defined from specs, power actions, VNC details, undefine with disks."""
from __future__ import annotations

import shutil
import uuid
from xml.etree import ElementTree as ET

import pytest
import pytest_twisted

from kvmdesk.agent import api as agent_api
from kvmdesk.agent.domains import disks
from kvmdesk.core import errors
from kvmdesk.nodeaccess.client import AgentCallError

GIB = 1 << 30


async def refused(call, code: int, *words: str) -> AgentCallError:
    with pytest.raises(AgentCallError) as caught:
        await call
    assert caught.value.code == code, caught.value.msg
    for word in words:
        assert word in caught.value.msg, (word, caught.value.msg)
    return caught.value


def spec(uid: str, **changes) -> dict:
    fields = {"uuid": uid, "name": f"template-{uid[:8]}", "vcpu": 2, "memory_mb": 1024,
              "disks": [{"kind": "template", "role": 1, "file_id": f"{uid}-sys", "boot_order": 1}],
              "nic": {"kind": "ovs", "bridge": "kd-test", "vlan_tag": 12, "mac": "52:54:00:aa:bb:cc"},
              "vnc": {"password": "pw123456"}}
    fields.update(changes)
    return fields


@pytest_twisted.ensureDeferred
async def test_disks_created_as_overlays_grow_only_and_flatten(node):
    base = await node.call("POST", "/disks", {"kind": "base", "role": 1, "file_id": "base-1", "size_gb": 2})
    assert base["format"] == "qcow2" and base["virtual_size"] == 2 * GIB and base["backing"] is None
    overlay = await node.call("POST", "/disks", {"kind": "template", "role": 1, "file_id": "t-sys", "size_gb": 5,
                                                 "backing": {"kind": "base", "role": 1, "file_id": "base-1"}})
    assert overlay["virtual_size"] == 5 * GIB and overlay["backing"] == base["path"]
    assert overlay["path"].startswith(str(node.storage()))

    grown = await node.call("PUT", "/disks/template/t-sys/size", {"role": 1, "size_gb": 7})
    assert grown["virtual_size"] == 7 * GIB
    error = await refused(node.call("PUT", "/disks/template/t-sys/size", {"role": 1, "size_gb": 6}),
                          disks.DISK_SHRINK.code, "size_gb")
    assert error.status == 400
    assert (await node.call("GET", "/disks/template/t-sys", params={"role": 1}))["virtual_size"] == 7 * GIB

    # an overlay smaller than its base, an existing file, a size beyond the node's free space
    await refused(node.call("POST", "/disks", {"kind": "template", "role": 1, "file_id": "t-small", "size_gb": 1,
                                               "backing": {"kind": "base", "role": 1, "file_id": "base-1"}}),
                  disks.DISK_SHRINK.code, "size_gb")
    await refused(node.call("POST", "/disks", {"kind": "template", "role": 1, "file_id": "t-sys", "size_gb": 9}),
                  disks.DISK_EXISTS.code)
    await refused(node.call("POST", "/disks", {"kind": "template", "role": 2, "file_id": "huge", "size_gb": 60000}),
                  disks.DISK_NO_SPACE.code, "size_gb")
    assert not any(p.name.startswith(("t-small", "huge", ".")) for p in node.storage().rglob("*") if p.is_file()
                   and "_template" in str(p))

    flat = await node.call("POST", "/disks/template/t-sys/copy",
                           {"role": 1, "to": {"kind": "template", "role": 1, "file_id": "t-sys.v1"}})
    assert flat["backing"] is None and flat["virtual_size"] == 7 * GIB
    assert (await node.call("DELETE", "/disks/template/t-sys.v1", params={"role": 1})) == {"removed": True}
    assert (await node.call("DELETE", "/disks/template/t-sys.v1", params={"role": 1})) == {"removed": False}
    await refused(node.call("GET", "/disks/template/nope", params={"role": 1}), disks.DISK_NOT_FOUND.code)
    await refused(node.call("GET", "/disks/etc/passwd", params={"role": 1}), errors.INVALID_PARAM.code, "kind")


@pytest_twisted.ensureDeferred
async def test_disks_grown_together_grow_all_or_none(node):
    for role, name in ((1, "t-a"), (2, "t-b")):
        await node.call("POST", "/disks", {"kind": "template", "role": role, "file_id": name, "size_gb": 1})
    a, b = ({"kind": "template", "role": 1, "file_id": "t-a"}, {"kind": "template", "role": 2, "file_id": "t-b"})

    async def sizes() -> list[int]:
        return [(await node.call("GET", f"/disks/template/{d['file_id']}", params={"role": d["role"]}))[
            "virtual_size"] for d in (a, b)]

    # each fits the free space alone, not both: the first must not grow before the second is refused
    each = int(0.6 * shutil.disk_usage(node.storage()).free / GIB) + 1
    await refused(node.call("PUT", "/disks/sizes", {"disks": [{**a, "size_gb": each}, {**b, "size_gb": each}]}),
                  disks.DISK_NO_SPACE.code, "disks.0.size_gb")
    await refused(node.call("PUT", "/disks/sizes", {"disks": [{**a, "size_gb": 2}, {**b, "size_gb": 0}]}),
                  errors.INVALID_PARAM.code, "disks.1.size_gb")
    await refused(node.call("PUT", "/disks/sizes", {"disks": []}), errors.INVALID_PARAM.code, "disks")
    assert await sizes() == [GIB, GIB]

    grown = await node.call("PUT", "/disks/sizes", {"disks": [{**a, "size_gb": 3}, {**b, "size_gb": 1}]})
    assert [d["virtual_size"] for d in grown] == [3 * GIB, GIB] == await sizes()
    # a shrink anywhere in the list: nothing grows
    await refused(node.call("PUT", "/disks/sizes", {"disks": [{**b, "size_gb": 4}, {**a, "size_gb": 2}]}),
                  disks.DISK_SHRINK.code, "disks.1.size_gb")
    assert await sizes() == [3 * GIB, GIB]


@pytest_twisted.ensureDeferred
async def test_domain_from_spec_power_actions_vnc_and_undefine_with_disks(node):
    uid = str(uuid.uuid4())
    await node.call("POST", "/disks", {"kind": "template", "role": 1, "file_id": f"{uid}-sys", "size_gb": 1})
    # a disk that does not exist is named before libvirt is asked
    missing = spec(uid, disks=[{"kind": "template", "role": 1, "file_id": "absent", "boot_order": 1}])
    await refused(node.call("PUT", f"/domains/{uid}/spec", missing), disks.DISK_NOT_FOUND.code, "absent")
    await refused(node.call("PUT", f"/domains/{uuid.uuid4()}/spec", spec(uid)), errors.INVALID_PARAM.code, "uuid")
    await refused(node.call("PUT", f"/domains/{uid}/spec", spec(uid, vcpu=0)), errors.INVALID_PARAM.code, "vcpu")
    assert await node.call("GET", "/domains") == []

    info = await node.call("PUT", f"/domains/{uid}/spec", spec(uid))
    assert (info["uuid"], info["state"], info["vcpus"]) == (uid, "shutoff", 2)
    text = (await node.call("GET", f"/domains/{uid}/xml", params={"inactive": 1}))["xml"]
    tree = ET.fromstring(text)
    assert tree.find("./devices/interface/virtualport").get("type") == "openvswitch"
    assert tree.find("./devices/disk/source").get("file").endswith(f"{uid}-sys")
    assert "pw123456" not in text  # the password is served only by /display

    vnc = await node.call("GET", f"/domains/{uid}/display")
    assert vnc == {"listen": "127.0.0.1", "port": None, "password": "pw123456"}
    for action, state in [("start", "running"), ("hard_reboot", "running"), ("reset", "running"),
                          ("destroy", "shutoff"), ("hard_reboot", "running")]:
        info = await node.call("POST", f"/domains/{uid}", {"action": action})
        assert info["state"] == state, action
    await refused(node.call("POST", f"/domains/{uid}", {"action": "start"}), agent_api.DOMAIN_STATE.code)
    # redefining with more memory keeps the domain (same uuid)
    await node.call("PUT", f"/domains/{uid}/spec", spec(uid, memory_mb=2048))
    assert len(await node.call("GET", "/domains")) == 1

    result = await node.call("DELETE", f"/domains/{uid}/definition", params={"delete_disks": 1})
    assert result["uuid"] == uid and result["removed_disks"][0].endswith(f"{uid}-sys")
    assert await node.call("GET", "/domains") == []
    assert not any(p.name == f"{uid}-sys" for p in node.storage().rglob("*"))
    await refused(node.call("GET", f"/domains/{uid}/display"), agent_api.DOMAIN_NOT_FOUND.code)


@pytest_twisted.ensureDeferred
async def test_send_key_and_cdrom_media_on_the_test_driver(node):
    uid = str(uuid.uuid4())
    await node.call("POST", "/disks", {"kind": "template", "role": 1, "file_id": f"{uid}-sys", "size_gb": 1})
    await node.call("PUT", f"/domains/{uid}/spec", spec(uid))
    await node.call("POST", f"/domains/{uid}", {"action": "start"})
    assert (await node.call("POST", f"/domains/{uid}", {"action": "send_key"}))["state"] == "running"
    await refused(node.call("PUT", f"/domains/{uid}/cdrom", {"media": {"kind": "iso", "role": 1, "file_id": "x.iso"}}),
                  disks.DISK_NOT_FOUND.code, "iso/x.iso")
    iso = node.storage() / "instances" / "_iso" / "x.iso"
    iso.parent.mkdir(parents=True)
    iso.write_bytes(b"\0" * 4096)
    try:
        await node.call("PUT", f"/domains/{uid}/cdrom", {"media": {"kind": "iso", "role": 1, "file_id": "x.iso"}})
    except AgentCallError as exc:  # the test driver cannot change devices: it must say so clearly
        assert exc.code == agent_api.OPERATION_UNSUPPORTED.code and exc.status == 501, exc.msg
    else:
        text = (await node.call("GET", f"/domains/{uid}/xml", params={"inactive": 1}))["xml"]
        assert ET.fromstring(text).find("./devices/disk[@device='cdrom']/source").get("file") == str(iso)
