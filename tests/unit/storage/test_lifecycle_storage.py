"""Base images and ISOs announce kvmdesk_created/updated/deleted after each change."""
from __future__ import annotations

import pytest_twisted

from kvmdesk.testing.plugins import LifecycleRecorder
from storage_testlib import UsagePlugin, controller, iso_bytes, small_qcow2


class Listening(UsagePlugin, LifecycleRecorder):
    def __init__(self) -> None:
        UsagePlugin.__init__(self)
        LifecycleRecorder.__init__(self)


@pytest_twisted.ensureDeferred
async def test_base_images_and_isos_announce_their_changes(tmp_path, clock):
    plugin = Listening()
    image = small_qcow2(tmp_path / "x.qcow2").read_bytes()
    async with controller(tmp_path, clock, plugin) as api:
        base = f"/resource_mgr/resource_pools/{api.pool}/base_images"
        status, body = await api.upload(base, {"name": "img", "os_type": "Windows 10 x64"},
                                        {"file": ("img.qcow2", image)})
        assert status == 200, body
        uuid = body["data"]["uuid"]
        status, body = await api.call("PUT", f"{base}/{uuid}", {"name": "img2", "os_type": "Windows 10 x64"})
        assert status == 200, body
        status, body = await api.call("DELETE", base, {"uuids": [uuid]})
        assert status == 200, body
        events = plugin.of("base_image")
        assert [(e.hook, e.record["name"]) for e in events] == [("created", "img"), ("updated", "img2"),
                                                                 ("deleted", "img2")]
        assert events[1].changes["name"] == "img2" and all(e.record["uuid"] == uuid for e in events)

        status, body = await api.upload("/resource_mgr/isos", {"iso_type": "3", "os_type": "x"},
                                        {"file": ("a.iso", iso_bytes())})
        assert status == 200, body
        iso = body["data"]["uuid"]
        status, body = await api.call("PUT", f"/resource_mgr/isos/{iso}", {"name": "renamed"})
        assert status == 200, body
        status, body = await api.call("DELETE", "/resource_mgr/isos", {"uuids": [iso]})
        assert status == 200, body
        assert [(e.hook, e.record["uuid"]) for e in plugin.of("iso")] == [("created", iso), ("updated", iso),
                                                                           ("deleted", iso)]
        assert plugin.of("iso", "updated")[0].record["name"] == "renamed"
