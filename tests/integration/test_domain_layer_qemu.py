"""The agent's domain layer against a real libvirtd + QEMU: a domain from a spec (user-mode NIC, tiny
qcow2 overlay), its VNC port, a CD-ROM inserted and ejected while it runs, ctrl+alt+del, undefine with
its disks."""
from __future__ import annotations

import subprocess
import uuid
from pathlib import Path
from xml.etree import ElementTree as ET

import pytest
import pytest_twisted
from twisted.internet import reactor

from kvmdesk.nodeaccess.client import AgentClient
from kvmdesk.testing.agents import AGENT_PASSWORD, free_port, running_agent

pytestmark = pytest.mark.integration
IP = "127.0.0.2"


@pytest_twisted.ensureDeferred
async def test_domain_from_spec_on_qemu(libvirtd, image_dir, tmp_path):
    port = free_port(IP)
    async with running_agent(tmp_path / "agent", IP, port, agent={"libvirt_uri": libvirtd, "storage": {
            key: str(image_dir) for key in ("template_sys", "template_data", "instance_sys", "instance_data")}}) \
            as agent:
        client = AgentClient(reactor, port, timeout=120)
        answer = await client.enrol(IP, AGENT_PASSWORD, "controller-1", "http://127.0.0.1:9/api/v1.0")
        node = {"ip": IP, "agent_secret": answer["secret"]}

        async def call(method, path, json=None, **kwargs):
            return await client.call(node, method, path, json, **kwargs)

        uid = str(uuid.uuid4())
        name = f"kvmdesk-it-{uid[:8]}"
        try:
            await call("POST", "/disks", {"kind": "base", "role": 1, "file_id": f"{uid}-base", "size_gb": 1})
            overlay = await call("POST", "/disks", {"kind": "template", "role": 1, "file_id": f"{uid}-sys",
                                                    "size_gb": 2, "backing": {"kind": "base", "role": 1,
                                                                              "file_id": f"{uid}-base"}})
            assert overlay["backing"].endswith(f"{uid}-base")
            spec = {"uuid": uid, "name": name, "vcpu": 1, "memory_mb": 64,
                    "disks": [{"kind": "template", "role": 1, "file_id": f"{uid}-sys", "boot_order": 1}],
                    "nic": {"kind": "user", "mac": "52:54:00:10:20:30"}, "vnc": {"password": "pw123456"}}
            await call("PUT", f"/domains/{uid}/spec", spec)
            info = await call("POST", f"/domains/{uid}", {"action": "start"})
            assert info["state"] == "running"
            vnc = await call("GET", f"/domains/{uid}/vnc")
            assert vnc["listen"] == "127.0.0.1" and vnc["port"] >= 5900 and vnc["password"] == "pw123456"

            iso = image_dir / "instances" / "_iso" / f"{uid}.iso"
            iso.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(iso), "1M"], check=True, timeout=60)
            iso.chmod(0o644)
            await call("PUT", f"/domains/{uid}/cdrom", {"media": {"kind": "iso", "role": 1, "file_id": f"{uid}.iso"}})
            live = ET.fromstring((await call("GET", f"/domains/{uid}/xml"))["xml"])
            assert live.find("./devices/disk[@device='cdrom']/source").get("file") == str(iso)
            await call("PUT", f"/domains/{uid}/cdrom", {"media": None})
            live = ET.fromstring((await call("GET", f"/domains/{uid}/xml"))["xml"])
            source = live.find("./devices/disk[@device='cdrom']/source")
            assert source is None or source.get("file") is None  # libvirt may keep an empty <source index=.../>

            assert (await call("POST", f"/domains/{uid}", {"action": "send_key"}))["state"] == "running"
            assert (await call("POST", f"/domains/{uid}", {"action": "reset"}))["state"] == "running"
            assert (await call("POST", f"/domains/{uid}", {"action": "destroy"}))["state"] == "shutoff"
            grown = await call("PUT", f"/disks/template/{uid}-sys/size", {"role": 1, "size_gb": 3})
            assert grown["virtual_size"] == 3 << 30
            removed = await call("DELETE", f"/domains/{uid}/definition", params={"delete_disks": 1})
            assert removed["removed_disks"] == [overlay["path"]]
            assert not Path(overlay["path"]).exists()
        finally:
            try:
                await call("DELETE", f"/domains/{uid}/definition")
            except Exception:
                pass
            await client.close()
