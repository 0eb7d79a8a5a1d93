"""Templates on a real libvirtd + QEMU: create from a small real qcow2 base image (distributed to the
node), start, read the VNC port, insert and eject an ISO while it runs, ctrl+alt+del, stop, grow a
disk, save a version and see it arrive md5-identical on a second agent (on the test driver), copy the
template there, delete both and see every file and domain gone."""
from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree as ET

import pytest
import pytest_twisted

from kvmdesk.core.records import new_record
from kvmdesk.testing.agents import AGENT_PASSWORD, free_port, nodes_controller, running_agent

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit" / "storage"))
from storage_testlib import md5_of, wait_all  # noqa: E402

pytestmark = pytest.mark.integration
IP = "127.0.0.2"
SECOND = "127.0.0.3"
POOLS = "/resource_mgr/resource_pools"
T = "/education/template"
ROLES = ("template_sys", "template_data", "instance_sys", "instance_data")


@pytest_twisted.ensureDeferred
async def test_a_template_on_qemu(libvirtd, image_dir, tmp_path):
    base = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "1G"], check=True, timeout=60)
    iso_file = tmp_path / "tools.iso"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(iso_file), "1M"], check=True, timeout=60)
    port = free_port(IP, SECOND)
    agent_settings = {"libvirt_uri": libvirtd, "storage": {role: str(image_dir) for role in ROLES}}
    async with running_agent(tmp_path / "agent", IP, port, agent=agent_settings) as agent, \
            running_agent(tmp_path / "agent-b", SECOND, port) as second, \
            nodes_controller(tmp_path / "controller", port, config={"templates": {"nic_kind": "user"}}) as api:
        status, body = await api.call("GET", POOLS)
        pool = body["data"]["results"][0]["uuid"]
        added = []
        for ip in (IP, SECOND):
            status, body = await api.call("POST", f"{POOLS}/{pool}/nodes", {"ip": ip, "password": AGENT_PASSWORD})
            assert status == 200, body
            added.append(await api.core.store.collection("nodes").find_one({"uuid": body["data"]["uuid"]}))
        node, second_node = added
        distributor = api.core.extensions["storage.distributor"]
        distributor.startService()
        try:
            arrived = wait_all(distributor, "done", [n["uuid"] for n in added])
            status, body = await api.upload(f"{POOLS}/{pool}/base_images", {"name": "tiny", "os_type": "Linux"},
                                            {"file": ("tiny.qcow2", base.read_bytes())})
            assert status == 200, body
            image = body["data"]
            await arrived
            status, body = await api.call("POST", "/resource_mgr/vswitchs", {"name": "sw", "type": "flat",
                                                                               "uplinks": []})
            assert status == 200, body
            status, body = await api.call("POST", "/resource_mgr/data_networks", {
                "name": "net", "switch_uuid": body["data"]["uuid"],
                "subnet_info": {"name": "s", "start_ip": "10.9.0.10", "end_ip": "10.9.0.20", "netmask": "255.255.255.0",
                                "gateway": "10.9.0.1", "dns1": "10.9.0.1"}})
            assert status == 200, body
            network = body["data"]
            subnet = await api.core.store.collection("subnets").find_one({"network_uuid": network["uuid"]})

            status, body = await api.call("POST", T, {"action": "create", "param": {
                "name": "it-template", "os_type": "Linux", "classify": 1, "pool_uuid": pool,
                "network_uuid": network["uuid"], "subnet_uuid": subnet["uuid"], "vcpu": 1, "ram": 0.0625,
                "system_disk": {"image_id": image["uuid"], "size": 1}, "data_disks": [{"inx": 0, "size": 1}]}})
            assert status == 200, body
            template = body["data"]
            ref = {"name": template["name"], "uuid": template["uuid"]}
            agents = api.core.extensions["agents"]

            status, body = await api.call("POST", T, {"action": "edit", "param": ref})
            assert status == 200 and body["data"]["status"] == "active", body
            vnc = await agents.call(node, "GET", f"/domains/{template['uuid']}/vnc")
            assert vnc["listen"] == "127.0.0.1" and vnc["port"] >= 5900 and len(vnc["password"]) == 8

            iso = await api.core.store.collection("isos").insert_one(new_record(
                api.core.clock, name="tools", file=str(iso_file), size_bytes=iso_file.stat().st_size,
                md5=hashlib.md5(iso_file.read_bytes()).hexdigest()))
            status, body = await api.call("POST", T, {"action": "attach_source",
                                                      "param": {**ref, "iso_uuid": iso["uuid"]}})
            assert status == 200, body
            live = ET.fromstring(await agent.hypervisor.domain_xml(template["uuid"]))
            media = live.find("./devices/disk[@device='cdrom']/source").get("file")
            assert media == str(image_dir / "instances" / "_iso" / iso["uuid"])
            status, body = await api.call("POST", T, {"action": "detach_source", "param": ref})
            assert status == 200, body
            live = ET.fromstring(await agent.hypervisor.domain_xml(template["uuid"]))
            source = live.find("./devices/disk[@device='cdrom']/source")
            assert source is None or source.get("file") is None

            status, body = await api.call("POST", T, {"action": "send_key", "param": ref})
            assert status == 200, body
            status, body = await api.call("POST", T, {"action": "hard_stop", "param": {"templates": [ref]}})
            assert status == 200 and body["data"]["success_num"] == 1, body

            status, body = await api.call("GET", T, params={"name": "it-template", "searchtype": "single"})
            devices = body["data"]["devices"]
            status, body = await api.call("PUT", T, {**ref, "value": {"devices": [{**devices[0], "size": 2},
                                                                                   devices[1]]}})
            assert status == 200, body
            system = await agents.call(node, "GET", f"/disks/template/{devices[0]['uuid']}", params={"role": 1})
            assert system["virtual_size"] == 2 << 30

            assert template["host_uuid"] == node["uuid"]
            status, body = await api.call("POST", T, {"action": "save", "param": ref})
            assert status == 200 and body["data"]["version"] == 1, body
            assert {s["status"] for s in body["data"]["publish"].values()} == {0}
            theirs = second.data_dir / "storage" / "instances" / "_template"
            for device in devices:
                ours = image_dir / "instances" / "_template" / f"{device['uuid']}.v1"
                assert md5_of(ours) == md5_of(theirs / f"{device['uuid']}.v1")

            status, body = await api.call("POST", T, {"action": "copy", "param": {
                "template_uuid": template["uuid"], "name": "it-copy", "pool_uuid": pool,
                "network_uuid": network["uuid"], "subnet_uuid": subnet["uuid"]}})
            assert status == 200, body
            copied = body["data"]
            assert copied["host_uuid"] == second_node["uuid"]
            assert copied["uuid"] in {d["uuid"] for d in await second.hypervisor.list_domains()}

            status, body = await api.call("DELETE", T, {"templates": [ref, {"name": "it-copy",
                                                                             "uuid": copied["uuid"]}]})
            assert status == 200 and body["data"]["success_num"] == 2, body
            assert template["uuid"] not in {d["uuid"] for d in await agent.hypervisor.list_domains()}
            assert await second.hypervisor.list_domains() == []
            assert not any(p.is_file() for p in (image_dir / "instances" / "_template").rglob("*"))
            assert not any(p.is_file() for p in theirs.rglob("*"))
        finally:
            await distributor.stopService()
