"""The API's access log: a file of its own (rotated, a bounded number kept), the main log, or none;
and the numeric settings that size it."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from kvmdesk.api.router import Router
from kvmdesk.api.streaming import make_site
from kvmdesk.core.config import Config, ConfigError


def _router() -> Router:
    router = Router(SimpleNamespace(config=Config()))

    @router.endpoint("GET", "/ping", summary="ping", auth=False)
    async def ping(req):
        return {"pong": True}

    return router


def _get(site, path: bytes) -> bytes:
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = StringTransport(hostAddress=IPv4Address("TCP", "127.0.0.1", 50004),
                                peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
    channel.makeConnection(transport)
    channel.dataReceived(b"GET " + path + b" HTTP/1.1\r\nHost: kvmdesk.test\r\n\r\n")
    return transport.value()


def test_the_access_log_file_is_rotated_and_old_files_are_bounded(tmp_path):
    site = make_site(_router(), access_log=str(tmp_path / "access.log"), rotate_bytes=400, keep=2)
    site.startFactory()
    try:
        for n in range(40):
            assert _get(site, b"/api/v1.0/ping?n=%d" % n).startswith(b"HTTP/1.1 200")
    finally:
        site.stopFactory()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["access.log", "access.log.1", "access.log.2"]
    newest = (tmp_path / "access.log").read_text().splitlines()
    assert newest and all('"GET /api/v1.0/ping?n=' in line and '" 200 ' in line for line in newest)
    assert newest[-1].split('"GET ')[1].startswith("/api/v1.0/ping?n=39 ")
    assert all(p.stat().st_size <= 400 + 200 for p in tmp_path.iterdir())


def test_no_access_log_writes_nothing_anywhere(tmp_path, monkeypatch):
    from twisted.python import log as legacy_log

    written: list[str] = []
    monkeypatch.setattr(legacy_log, "logfile", SimpleNamespace(write=written.append, flush=lambda: None))
    quiet = make_site(_router(), access_log="")
    quiet.startFactory()
    assert _get(quiet, b"/api/v1.0/ping").startswith(b"HTTP/1.1 200")
    quiet.stopFactory()
    assert written == [] and list(tmp_path.iterdir()) == []

    main = make_site(_router(), access_log="-")  # the main log, through twisted's legacy log file
    main.startFactory()
    _get(main, b"/api/v1.0/ping")
    main.stopFactory()
    assert len(written) == 1 and '"GET /api/v1.0/ping HTTP/1.1" 200' in written[0]


def test_numeric_settings_are_checked_and_named():
    config = Config([{"controller": {"a": 10, "b": 0.5, "text": "big", "flag": True, "low": -1}}])
    assert config.number("controller.a", 1) == 10
    assert config.number("controller.b", 1) == 0.5
    assert config.number("controller.missing", 7) == 7
    for key in ("text", "flag", "low"):
        with pytest.raises(ConfigError, match=f"controller.{key} must be a number"):
            config.number(f"controller.{key}", 1)
    with pytest.raises(ConfigError, match="at least 1"):
        config.number("controller.b", 1, minimum=1)


def test_signed_links_are_logged_without_their_signature(tmp_path):
    """Issue 14 defect 2: a signed export link in the access log was usable by whoever read the log."""
    site = make_site(_router(), access_log=str(tmp_path / "access.log"))
    site.startFactory()
    try:
        _get(site, b"/api/v1.0/ping?file=ab12&name=x.xlsx&expires=99&sig=SIGNATURE-VALUE&n=1")
        _get(site, b"/api/v1.0/ping?token=TOKEN-VALUE")
    finally:
        site.stopFactory()
    text = (tmp_path / "access.log").read_text()
    assert "SIGNATURE-VALUE" not in text and "TOKEN-VALUE" not in text
    assert '"GET /api/v1.0/ping?file=ab12&name=x.xlsx&expires=99&sig=-&n=1 HTTP/1.1" 200' in text
