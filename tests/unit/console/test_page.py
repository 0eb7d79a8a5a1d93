"""The console page, its token status answer and noVNC files, on the API's port and on a port of its own."""
from __future__ import annotations

import json

import pytest_twisted
import treq
from twisted.internet.task import Clock

from kvmdesk.core import console
from kvmdesk.testing.agents import free_port
from kvmdesk.testing.api import api_client, listening_api
from kvmdesk.testing.vnc import Viewer


def fake_novnc(tmp_path):
    directory = tmp_path / "novnc"
    (directory / "core").mkdir(parents=True)
    (directory / "core" / "rfb.js").write_text("export default class RFB {}\n")
    return directory


async def get(url: str, **headers: str) -> tuple[int, bytes, dict]:
    response = await treq.get(url, headers=headers)
    body = await response.content()
    return response.code, body, {k.lower(): v for k, v in response.headers.getAllRawHeaders()}


@pytest_twisted.ensureDeferred
async def test_the_page_and_the_token_status_on_the_api_port(tmp_path):
    clock = Clock()
    clock.advance(1000)
    config = {"console": {"novnc_dir": str(fake_novnc(tmp_path))}, "agent": {"local": False}}
    async with api_client(tmp_path, config=config, clock=clock) as api, listening_api(api.core) as base:
        root = base.rsplit("/api/", 1)[0]
        code, body, headers = await get(f"{root}/console?token=x")
        assert code == 200 and b'import RFB from "/console/novnc/core/rfb.js"' in body
        assert b'"websockify": "/websockify/"' in body and b"Ctrl+Alt+Del" in body and b"Full screen" in body
        assert headers[b"referrer-policy"] == [b"no-referrer"] and headers[b"cache-control"] == [b"no-store"]
        code, body, _ = await get(f"{root}/console/novnc/core/rfb.js")
        assert code == 200 and body == b"export default class RFB {}\n"

        token = await console.issue(api.core, "n", "d", "admin", "a", ttl=30, single_use=True)
        code, body, _ = await get(f"{root}/console/status?token={token}")
        answer = json.loads(body)
        assert code == 200 and answer["code"] == 0 and answer["data"] == {"expires_in": 30.0, "single_use": True}
        await console.check(api.core, token, consume=False)  # the status did not use it up
        clock.advance(30)
        code, body, _ = await get(f"{root}/console/status?token={token}", **{"Accept-Language": "en-US,en"})
        assert code == 401 and json.loads(body) == {"code": 1081, "msg": console.TOKEN_EXPIRED.en, "data": None}
        code, body, _ = await get(f"{root}/console/status?token=nonsense", **{"Accept-Language": "zh-CN"})
        assert code == 400 and json.loads(body)["msg"] == console.TOKEN_MALFORMED.zh

        # The websocket is on the API port too, with or without the trailing slash.
        ws = root.replace("http://", "ws://")
        for path in ("/websockify/", "/websockify"):
            viewer = await Viewer.connect(f"{ws}{path}?token=nonsense")
            assert await viewer.closed == (4080, console.TOKEN_MALFORMED.en)

        # Administrators get a token and both URLs for a domain of an existing node only.
        status, body = await api.call("POST", "/console/tokens", {"node_uuid": "nope", "domain_uuid": "d"})
        assert status == 404
        status, body = await api.call("POST", "/console/tokens", {"node_uuid": "n", "domain_uuid": "d", "ttl": 0})
        assert status == 400 and "ttl" in body["msg"]


@pytest_twisted.ensureDeferred
async def test_a_missing_novnc_is_said_plainly(tmp_path):
    config = {"console": {"novnc_dir": str(tmp_path / "nowhere")}, "agent": {"local": False}}
    async with api_client(tmp_path, config=config) as api, listening_api(api.core) as base:
        code, body, _ = await get(base.rsplit("/api/", 1)[0] + "/console?token=x")
        assert code == 503 and b"apt-get install novnc" in body


@pytest_twisted.ensureDeferred
async def test_a_relay_on_its_own_port_serves_the_websocket_and_the_page(tmp_path):
    port = free_port("127.0.0.1")
    config = {"console": {"port": port, "listen": "127.0.0.1", "path": "vnc/websockify",
                          "novnc_dir": str(fake_novnc(tmp_path))}, "agent": {"local": False}}
    async with api_client(tmp_path, config=config) as api, listening_api(api.core) as base:
        service = api.core.services.getServiceNamed("console-relay")
        service.startService()
        try:
            code, body, _ = await get(f"http://127.0.0.1:{port}/console?token=x")
            assert code == 200 and b'"websockify": "/vnc/websockify/"' in body
            viewer = await Viewer.connect(f"ws://127.0.0.1:{port}/vnc/websockify/?token=nonsense")
            assert await viewer.closed == (4080, console.TOKEN_MALFORMED.en)
            # Not on the API's port then.
            code, _, _ = await get(base.rsplit("/api/", 1)[0] + "/console?token=x")
            assert code == 404
            token = await console.issue(api.core, "n", "d", "admin", "a")
            assert console.console_url("http://10.1.2.3:50004", token, api.core.config).startswith(
                f"ws://10.1.2.3:{port}/vnc/websockify/?token=v1.")
        finally:
            await service.stopService()
