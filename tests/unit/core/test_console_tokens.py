"""Console tokens (kvmdesk.core.console) on a real core and store, with an injected clock."""
from __future__ import annotations

import os
import stat

import pytest
import pytest_twisted
from twisted.internet.task import Clock

from kvmdesk.core import console
from kvmdesk.core.errors import ApiError
from kvmdesk.testing.api import api_client, make_core

NODE, DOMAIN, OTHER = "node-1", "dom-1", "dom-2"


def clock_at(t: float = 1_000_000.0) -> Clock:
    clock = Clock()
    clock.advance(t)
    return clock


async def refused(d, error) -> ApiError:
    with pytest.raises(ApiError) as caught:
        await d
    assert caught.value.error is error, caught.value.error
    return caught.value


@pytest_twisted.ensureDeferred
async def test_a_token_opens_its_domain_until_it_expires(tmp_path):
    clock = clock_at()
    async with api_client(tmp_path, login=False, clock=clock) as api:
        core = api.core
        token = await console.issue(core, NODE, DOMAIN, "admin", "a-1", ttl=30)
        grant = await console.check(core, token)
        assert (grant.node_uuid, grant.domain_uuid, grant.holder_kind, grant.holder_id) == (NODE, DOMAIN, "admin", "a-1")
        assert grant.expires == clock.seconds() + 30 and not grant.single_use
        assert (await console.check(core, token)).jti == grant.jti  # reusable unless single-use
        clock.advance(29.9)
        await console.check(core, token)
        clock.advance(0.1)
        await refused(console.check(core, token), console.TOKEN_EXPIRED)
        # The key file is the controller's alone.
        mode = os.stat(core.data_dir / console.KEY_FILE).st_mode
        assert stat.S_IMODE(mode) == 0o600


@pytest_twisted.ensureDeferred
async def test_the_default_ttl_comes_from_the_configuration(tmp_path):
    clock = clock_at()
    async with api_client(tmp_path, login=False, clock=clock, config={"console": {"token_ttl": 5}}) as api:
        token = await console.issue(api.core, NODE, DOMAIN, "user", "u-1")
        clock.advance(5)
        await refused(console.check(api.core, token), console.TOKEN_EXPIRED)


@pytest_twisted.ensureDeferred
async def test_a_single_use_token_is_refused_the_second_time_even_concurrently(tmp_path):
    async with api_client(tmp_path, login=False, clock=clock_at()) as api:
        core = api.core
        token = await console.issue(core, NODE, DOMAIN, "user", "u-1", single_use=True)
        # Looking at it (the console page's status) does not use it up.
        await console.check(core, token, consume=False)
        first = console.check(core, token)
        second = console.check(core, token)
        from twisted.internet import defer

        outcomes = await defer.DeferredList([defer.ensureDeferred(first), defer.ensureDeferred(second)],
                                            consumeErrors=True)
        ok = [o for good, o in outcomes if good]
        failed = [o.value for good, o in outcomes if not good]
        assert len(ok) == 1 and len(failed) == 1 and failed[0].error is console.TOKEN_USED
        await refused(console.check(core, token, consume=False), console.TOKEN_USED)


@pytest_twisted.ensureDeferred
async def test_foreign_tokens_are_refused(tmp_path):
    async with api_client(tmp_path, login=False, clock=clock_at()) as api:
        core = api.core
        token = await console.issue(core, NODE, DOMAIN, "user", "u-1")
        error = await refused(console.check(core, token, domain_uuid=OTHER), console.TOKEN_FOREIGN)
        assert error.message("en") == "the console token is for another desktop"
        await refused(console.check(core, token, holder_id="u-2"), console.TOKEN_FOREIGN)
        await refused(console.check(core, token, holder_kind="admin"), console.TOKEN_FOREIGN)
        await refused(console.check(core, token, node_uuid="node-2"), console.TOKEN_FOREIGN)
        assert (await console.check(core, token, domain_uuid=DOMAIN, holder_id="u-1")).holder_id == "u-1"
    # Another controller (another key) does not accept it.
    other = await make_core(tmp_path / "other", clock=clock_at())
    try:
        await refused(console.check(other, token), console.TOKEN_MALFORMED)
    finally:
        await other.store.close()


@pytest.mark.parametrize("bad", [
    "", "garbage", "v1.x.y", "v2.a.b", "v1..", "v1.e30.", "x" * 5000, "v1.%%%.%%%", "v1.é.é",
])
@pytest_twisted.ensureDeferred
async def test_malformed_tokens_are_refused(tmp_path, bad):
    async with api_client(tmp_path, login=False, clock=clock_at()) as api:
        await refused(console.check(api.core, bad), console.TOKEN_MALFORMED)


@pytest_twisted.ensureDeferred
async def test_a_tampered_payload_is_refused(tmp_path):
    async with api_client(tmp_path, login=False, clock=clock_at()) as api:
        token = await console.issue(api.core, NODE, DOMAIN, "user", "u-1")
        version, payload, mac = token.split(".")
        forged_payload = payload[:-2] + ("A" if payload[-2] != "A" else "B") + payload[-1]
        await refused(console.check(api.core, f"{version}.{forged_payload}.{mac}"), console.TOKEN_MALFORMED)
        await refused(console.check(api.core, f"{version}.{payload}.{mac[:-1]}"), console.TOKEN_MALFORMED)


@pytest_twisted.ensureDeferred
async def test_revoking_a_domain_refuses_its_earlier_tokens_only(tmp_path):
    async with api_client(tmp_path, login=False, clock=clock_at()) as api:
        core = api.core
        old = await console.issue(core, NODE, DOMAIN, "admin", "a-1")
        other = await console.issue(core, NODE, OTHER, "admin", "a-1")
        assert await console.revoke_domain(core, NODE, DOMAIN) == 1
        await refused(console.check(core, old), console.TOKEN_REVOKED)
        await console.check(core, other)
        new = await console.issue(core, NODE, DOMAIN, "admin", "a-1")
        await console.check(core, new)


@pytest_twisted.ensureDeferred
async def test_an_unknown_holder_kind_is_refused_and_the_key_survives_a_restart(tmp_path):
    async with api_client(tmp_path, login=False, clock=clock_at()) as api:
        await refused(console.issue(api.core, NODE, DOMAIN, "guest", "g"), console.BAD_HOLDER)
        token = await console.issue(api.core, NODE, DOMAIN, "admin", "a-1")
    async with api_client(tmp_path, login=False, clock=clock_at()) as api:
        assert (await console.check(api.core, token)).holder_id == "a-1"


@pytest_twisted.ensureDeferred
async def test_used_single_use_ids_are_purged_after_they_expire(tmp_path):
    clock = clock_at()
    async with api_client(tmp_path, login=False, clock=clock) as api:
        tokens = await console.tokens(api.core)
        tokens.purge_every = 2
        first = await console.issue(api.core, NODE, DOMAIN, "user", "u", ttl=10, single_use=True)
        await console.check(api.core, first)
        clock.advance(11)
        second = await console.issue(api.core, NODE, DOMAIN, "user", "u", ttl=10, single_use=True)
        await console.check(api.core, second)
        used = api.core.store.collection(console.USED)
        assert await used.count() == 1  # the expired id went, the live one stays


def test_console_url_from_a_base_url_and_the_configuration():
    from kvmdesk.core.config import Config

    config = Config([{"console": {"path": "websockify", "port": 6080}}])
    assert console.console_url("http://10.0.0.5:50004", "v1.a.b", config) == "ws://10.0.0.5:6080/websockify/?token=v1.a.b"
    assert console.console_url("https://[::1]:50004", "t", config) == "wss://[::1]:6080/websockify/?token=t"
    same = Config([{"console": {"path": "/vnc/ws/", "port": 0}}])
    assert console.console_url("http://host:50004", "t", same) == "ws://host:50004/vnc/ws/?token=t"
    public = Config([{"console": {"public_url": "wss://vdi.example.org/websockify/"}}])
    assert console.console_url("http://x", "t+/", public) == "wss://vdi.example.org/websockify/?token=t%2B%2F"
    assert console.page_url("wss://vdi.example.org:6080/websockify/?token=t") == "https://vdi.example.org:6080/console?token=t"
    assert console.close_code(console.TOKEN_EXPIRED) == 4081
