"""A real QEMU domain's console through the relay: the RFB handshake and a framebuffer update over the
websocket, bad tokens refused, the console closed when the domain stops, and the noVNC page in a
real headless Chromium (Debian's ``chromium`` + ``chromium-driver``, driven by selenium)."""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any, AsyncIterator

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.threads import deferToThread

from kvmdesk.core import console
from kvmdesk.testing.agents import added_node, free_port, nodes_controller, running_agent
from kvmdesk.testing.guests import tiny_domain_xml
from kvmdesk.testing.vnc import Viewer

pytestmark = pytest.mark.integration

VNC_PASSWORD = "s3cr3t!v"  # QEMU takes at most 8 characters
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
BROWSER_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage")


class Running:
    def __init__(self, api: Any, node: dict, name: str, uuid: str):
        self.api, self.node, self.name, self.uuid = api, node, name, uuid
        self.agents = api.core.extensions["agents"]
        self.base = f"http://127.0.0.1:{api.core.config.get('controller.port')}"

    async def token(self, **kwargs: Any) -> str:
        status, body = await self.api.call("POST", "/console/tokens",
                                           {"node_uuid": self.node["uuid"], "domain_uuid": self.uuid, **kwargs})
        assert status == 200, body
        return body["data"]["token"]

    def url(self, token: str) -> str:
        return console.console_url(self.base, token, self.api.core.config)


@contextlib.asynccontextmanager
async def qemu_domain(libvirtd: str, image_dir: Path, tmp_path: Path) -> AsyncIterator[Running]:
    disk = image_dir / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True, timeout=60)
    name = f"kvmdesk-console-{image_dir.name[-8:]}"
    port = free_port("127.0.0.2")
    async with running_agent(tmp_path / "agent", "127.0.0.2", port, agent={"libvirt_uri": libvirtd}), \
            nodes_controller(tmp_path / "controller", port) as api:
        node = await added_node(api, "127.0.0.2")
        agents = api.core.extensions["agents"]
        defined = await agents.call(node, "POST", "/domains", {"xml": tiny_domain_xml(name, disk, vnc_password=VNC_PASSWORD)})
        try:
            await agents.call(node, "POST", f"/domains/{name}", {"action": "start"})
            yield Running(api, node, name, defined["uuid"])
        finally:
            with contextlib.suppress(Exception):
                await agents.call(node, "POST", f"/domains/{name}", {"action": "destroy"})
            await agents.call(node, "DELETE", f"/domains/{name}")
            api.core.extensions["console"].close_all()


def stopped_event_handled(vm: Running) -> defer.Deferred:
    """Fires once the relay has closed the domain's consoles for its lifecycle event (the real one,
    observed on the real relay object: nothing is replaced)."""
    relay = vm.api.core.extensions["console"]
    handled: defer.Deferred = defer.Deferred()
    close_domain = relay.close_domain

    async def observed(node_uuid: str, domain_uuid: str, reason: str) -> int:
        closed = await close_domain(node_uuid, domain_uuid, reason)
        if domain_uuid == vm.uuid and not handled.called:
            handled.callback(None)
        return closed

    relay.close_domain = observed
    return handled.addTimeout(60, reactor)


@pytest_twisted.ensureDeferred
async def test_a_qemu_console_through_the_relay(libvirtd, image_dir, tmp_path):
    async with qemu_domain(libvirtd, image_dir, tmp_path) as vm:
        # The display needs the password: a plain VNC client gets only "VNC authentication" offered.
        viewer = await Viewer.connect(vm.url(await vm.token()))
        width, height, bpp, name = await viewer.handshake()  # None security: the agent logged in
        assert width >= 320 and height >= 200 and bpp in (16, 32), (width, height, bpp)
        assert name == f"QEMU ({vm.name})"
        pixels = await viewer.framebuffer(width, height, bpp)
        assert len(pixels) == width * height * bpp // 8

        assert (await (await Viewer.connect(vm.url("v1.bad.token"))).closed)[0] == 4080
        once = await vm.token(single_use=True)
        opened = await Viewer.connect(vm.url(once))
        await opened.handshake()
        assert (await (await Viewer.connect(vm.url(once))).closed)[0] == 4082
        expired = await vm.token(ttl=0.001)
        assert (await (await Viewer.connect(vm.url(expired))).closed)[0] == 4081
        foreign = vm.url(await vm.token()) + "&domain=" + "0" * 32
        assert (await (await Viewer.connect(foreign)).closed)[0] == 4083

        stop_handled = stopped_event_handled(vm)
        await vm.agents.call(vm.node, "POST", f"/domains/{vm.name}", {"action": "destroy"})
        for open_viewer in (viewer, opened):
            code, reason = await open_viewer.closed
            # QEMU's display goes with its process, mostly before the agent's "stopped" event is in.
            assert code == 4088 and reason.startswith("the console was closed: the desktop"), (code, reason)
        # A console opened before the controller has handled the "stopped" event would be closed by it
        # (4088); once it has, a new one is refused because the domain is off.
        await stop_handled
        refused = await Viewer.connect(vm.url(await vm.token()))
        # The domain is off (4085); a "stopped" event that arrives twice (libvirt's, then the agent's own)
        # revokes again and may catch a token issued in between (4084): refused either way.
        assert (await refused.closed)[0] in (4084, 4085)


def _browser() -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # selenium must never fetch a driver or a browser
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in BROWSER_FLAGS:
        options.add_argument(flag)
    options.add_argument("--window-size=1024,768")
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


CANVAS_NOT_BLANK = """
const canvas = document.querySelector('#screen canvas');
if (!canvas || !canvas.width || !canvas.height) return false;
const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
const first = [data[0], data[1], data[2]];
for (let i = 0; i < data.length; i += 4) {
  if (data[i] !== first[0] || data[i + 1] !== first[1] || data[i + 2] !== first[2]) return true;
}
return false;
"""


def _browse(page: str, expired_page: str, screenshot: Path) -> dict:
    from selenium.webdriver.support.ui import WebDriverWait

    driver = _browser()
    try:
        driver.get(page)
        wait = WebDriverWait(driver, 60, poll_frequency=0.2)
        wait.until(lambda d: d.execute_script("return document.body.dataset.state") in ("connected", "failed"))
        state = driver.execute_script("return document.body.dataset.state")
        message = driver.execute_script("return document.getElementById('message').textContent")
        assert state == "connected", message
        # SeaBIOS writes its boot messages: the canvas holds more than one colour.
        wait.until(lambda d: d.execute_script(CANVAS_NOT_BLANK))
        driver.find_element("id", "cad").click()  # Ctrl+Alt+Del goes out without breaking the console
        assert driver.execute_script("return document.body.dataset.state") == "connected"
        driver.save_screenshot(str(screenshot))
        driver.get(expired_page)
        wait.until(lambda d: d.execute_script("return document.body.dataset.state") == "failed")
        return {"expired_message": driver.execute_script("return document.getElementById('message').textContent")}
    finally:
        driver.quit()


@pytest.mark.skipif(not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)),
                    reason="Debian's chromium and chromium-driver are not installed (quickstart.sh test installs them)")
@pytest_twisted.ensureDeferred
async def test_the_console_page_shows_the_domain_in_a_real_browser(libvirtd, image_dir, tmp_path):
    if not Path("/usr/share/novnc/core/rfb.js").is_file():
        pytest.skip("Debian's novnc is not installed (quickstart.sh installs it)")
    async with qemu_domain(libvirtd, image_dir, tmp_path) as vm:
        page = console.page_url(vm.url(await vm.token()))
        expired = console.page_url(vm.url(await vm.token(ttl=0.001)))
        # selenium blocks: it runs in a thread while the reactor serves the page and the relay.
        seen = await deferToThread(_browse, page, expired, tmp_path / "console.png")
        assert seen["expired_message"] == console.TOKEN_EXPIRED.en
        assert (tmp_path / "console.png").stat().st_size > 1000
