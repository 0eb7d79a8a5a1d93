"""The console page: noVNC (Debian's ``novnc`` package, not copied here) opened on a token.

``GET /console?token=...`` serves a small page that asks ``GET /console/status?token=...`` whether the
token is still good (without using it up), then opens ``/websockify/?token=...`` with noVNC's RFB
client from ``/console/novnc/`` (``[console] novnc_dir``, default ``/usr/share/novnc``).  It has
Ctrl+Alt+Del and full-screen buttons, and says in plain words why a console cannot open or closed:
the relay's close reason, or the status answer (e.g. an expired token).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from twisted.web import static
from twisted.web.resource import Resource

from kvmdesk.core import console
from kvmdesk.core.errors import ApiError

NOVNC_DIR = "/usr/share/novnc"

PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>kvmdesk console</title>
<style>
  html, body { margin: 0; height: 100%; background: #202124; color: #eee; font: 14px sans-serif; }
  #bar { display: flex; gap: 8px; align-items: center; padding: 6px 10px; background: #303134; }
  #status { flex: 1; }
  #screen { position: absolute; top: 40px; bottom: 0; left: 0; right: 0; }
  #message { display: none; margin: 80px auto; max-width: 36em; padding: 16px 20px; background: #5c2b29;
             border-radius: 6px; font-size: 16px; }
  button { padding: 4px 10px; }
</style></head>
<body>
<div id="bar"><span id="status">Connecting...</span>
  <button id="cad" disabled>Ctrl+Alt+Del</button><button id="full">Full screen</button></div>
<div id="message" role="alert"></div>
<div id="screen"></div>
<script type="module">
import RFB from "__NOVNC__/core/rfb.js";
const settings = __SETTINGS__;
const token = new URLSearchParams(location.search).get("token") || "";
const status = document.getElementById("status");
const message = document.getElementById("message");
const cad = document.getElementById("cad");
function explain(text) {
  message.textContent = text; message.style.display = "block";
  document.getElementById("screen").style.display = "none";
  status.textContent = "Disconnected"; cad.disabled = true;
  document.body.dataset.state = "failed";
}
async function tokenStatus() {
  try {
    const answer = await fetch(settings.status + "?token=" + encodeURIComponent(token));
    return await answer.json();
  } catch (e) { return {code: -1, msg: "the console service cannot be reached"}; }
}
async function start() {
  const checked = await tokenStatus();
  if (checked.code !== 0) { explain(checked.msg); return; }
  const scheme = location.protocol === "https:" ? "wss://" : "ws://";
  const socket = new WebSocket(scheme + location.host + settings.websockify + "?token=" + encodeURIComponent(token),
                               ["binary"]);
  let closed = null;
  socket.addEventListener("close", (e) => { closed = e; });
  const rfb = new RFB(document.getElementById("screen"), socket, {shared: true});
  rfb.scaleViewport = true;
  rfb.addEventListener("connect", () => {
    status.textContent = "Connected: " + (rfb._fbName || "desktop"); cad.disabled = false;
    document.body.dataset.state = "connected";
  });
  rfb.addEventListener("disconnect", async () => {
    if (closed && closed.code >= 4000 && closed.reason) { explain(closed.reason); return; }
    const again = await tokenStatus();
    explain(again.code !== 0 ? again.msg : "The console was disconnected.");
  });
  cad.addEventListener("click", () => rfb.sendCtrlAltDel());
  window.kvmdeskRfb = rfb;
}
document.getElementById("full").addEventListener("click", () => {
  if (document.fullscreenElement) document.exitFullscreen(); else document.documentElement.requestFullscreen();
});
start();
</script>
</body></html>
"""


def render_page(websockify_path: str, status_path: str, novnc_path: str) -> bytes:
    settings = json.dumps({"websockify": websockify_path, "status": status_path})
    return PAGE.replace("__NOVNC__", novnc_path).replace("__SETTINGS__", settings).encode("utf-8")


class ConsolePage(Resource):
    """``GET /console``: the page (``/console/status`` and ``/console/novnc/`` are its children)."""

    def __init__(self, core: Any, websockify_path: str):
        super().__init__()
        novnc_dir = Path(core.config.get("console.novnc_dir", NOVNC_DIR) or NOVNC_DIR)
        self.page = render_page(websockify_path + "/", "/console/status", "/console/novnc")
        self.novnc_ok = (novnc_dir / "core" / "rfb.js").is_file()
        self.putChild(b"status", TokenStatus(core))
        self.putChild(b"novnc", static.File(str(novnc_dir)) if self.novnc_ok else _Missing(novnc_dir))
        self.putChild(b"", self)

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"referrer-policy", b"no-referrer")  # the URL holds the token
        if not self.novnc_ok:
            request.setResponseCode(503)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"noVNC is not installed on the controller (Debian: apt-get install novnc)\n"
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        return self.page


class _Missing(Resource):
    isLeaf = True

    def __init__(self, path: Path):
        super().__init__()
        self.path = path

    def render_GET(self, request: Any) -> bytes:
        request.setResponseCode(404)
        return f"noVNC not found in {self.path}\n".encode()


class TokenStatus(Resource):
    """``GET /console/status?token=...``: whether a console token would open, without using it up.

    The token is the credential here (the page has nothing else); the answer is an envelope that
    names no domain, only how long the token is still good.
    """

    isLeaf = True

    def __init__(self, core: Any):
        super().__init__()
        self.core = core

    def render_GET(self, request: Any) -> Any:
        from twisted.internet import defer
        from twisted.web.server import NOT_DONE_YET

        token = (request.args.get(b"token") or [b""])[-1].decode("utf-8", "replace")
        lang = "en" if (request.getHeader(b"accept-language") or b"en").lower().startswith(b"en") else "zh"

        async def answer() -> None:
            try:
                grant = await console.check(self.core, token, consume=False)
                body = {"code": 0, "msg": "ok", "data": {"expires_in": max(0.0, grant.expires - self.core.clock.seconds()),
                                                        "single_use": grant.single_use}}
            except ApiError as exc:
                request.setResponseCode(exc.error.status)
                body = {"code": exc.error.code, "msg": exc.message(lang), "data": None}
            if not getattr(request, "_disconnected", False):
                request.setHeader(b"content-type", b"application/json; charset=utf-8")
                request.setHeader(b"cache-control", b"no-store")
                request.write(json.dumps(body, ensure_ascii=False).encode("utf-8"))
                request.finish()

        defer.ensureDeferred(answer()).addErrback(lambda f: (request.processingFailed(f), None)[1])
        return NOT_DONE_YET
