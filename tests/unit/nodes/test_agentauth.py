"""The signature scheme between the controller and an agent (pure functions, injected clock)."""
from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from kvmdesk.core import agentauth
from kvmdesk.core.agentauth import SignatureError, Verifier

SECRET = "s3cret-for-tests"
NOW = 1_800_000_000.0


def signed(method="POST", target="/agent/v1/domains?x=1", body=b'{"a": 1}', **kwargs):
    return agentauth.sign(SECRET, method, target, body, now=NOW, **kwargs)


def verifier(at: float = NOW) -> Verifier:
    clock = Clock()
    clock.advance(at)
    return Verifier(clock)


def test_a_signed_request_verifies_and_returns_its_signature():
    headers = signed()
    assert verifier().verify(SECRET, "POST", "/agent/v1/domains?x=1", headers, b'{"a": 1}') == headers[agentauth.H_SIGNATURE]


@pytest.mark.parametrize(
    "change",
    [
        {"secret": "another-secret"},
        {"method": "DELETE"},
        {"target": "/agent/v1/domains?x=2"},
        {"target": "/agent/v1/domain"},
        {"body": b'{"a": 2}'},
    ],
)
def test_any_change_breaks_the_signature(change):
    headers = signed()
    args = {"secret": SECRET, "method": "POST", "target": "/agent/v1/domains?x=1", "body": b'{"a": 1}', **change}
    with pytest.raises(SignatureError):
        verifier().verify(args["secret"], args["method"], args["target"], headers, args["body"])


def test_missing_headers_and_no_secret_are_refused():
    with pytest.raises(SignatureError, match="not signed"):
        verifier().verify(SECRET, "GET", "/agent/v1/status", {}, b"")
    headers = signed()
    del headers[agentauth.H_NONCE]
    with pytest.raises(SignatureError, match="not signed"):
        verifier().verify(SECRET, "POST", "/agent/v1/domains?x=1", headers, b'{"a": 1}')
    with pytest.raises(SignatureError, match="not enrolled"):
        verifier().verify(None, "POST", "/agent/v1/domains?x=1", signed(), b'{"a": 1}')


@pytest.mark.parametrize("offset,ok", [(-300, True), (300, True), (-301, False), (301, False), (-3600, False)])
def test_timestamps_within_300_seconds_of_the_clock_are_accepted(offset, ok):
    check = verifier(NOW + offset)
    if ok:
        check.verify(SECRET, "POST", "/agent/v1/domains?x=1", signed(), b'{"a": 1}')
    else:
        with pytest.raises(SignatureError, match="stale"):
            check.verify(SECRET, "POST", "/agent/v1/domains?x=1", signed(), b'{"a": 1}')


def test_a_replayed_nonce_is_refused():
    check = verifier()
    headers = signed()
    check.verify(SECRET, "POST", "/agent/v1/domains?x=1", headers, b'{"a": 1}')
    with pytest.raises(SignatureError, match="replayed"):
        check.verify(SECRET, "POST", "/agent/v1/domains?x=1", headers, b'{"a": 1}')


def test_the_nonce_cache_forgets_only_what_is_too_old_to_replay():
    clock = Clock()
    clock.advance(NOW)
    check = Verifier(clock)
    first = agentauth.sign(SECRET, "GET", "/agent/v1/status", b"", now=NOW)
    check.verify(SECRET, "GET", "/agent/v1/status", first, b"")
    for i in range(3000):
        clock.advance(1)
        headers = agentauth.sign(SECRET, "GET", "/agent/v1/status", b"", now=clock.seconds())
        check.verify(SECRET, "GET", "/agent/v1/status", headers, b"")
    assert len(check._nonces) < 3001  # old nonces were purged
    with pytest.raises(SignatureError):  # and the purged one is stale anyway
        check.verify(SECRET, "GET", "/agent/v1/status", first, b"")


def test_unsigned_payload_signs_everything_but_the_body():
    headers = signed(body=None, unsigned_payload=True)
    assert headers[agentauth.H_CONTENT] == agentauth.UNSIGNED_PAYLOAD
    verifier().verify(SECRET, "POST", "/agent/v1/domains?x=1", headers, b"any body at all")
    with pytest.raises(SignatureError):
        verifier().verify(SECRET, "PUT", "/agent/v1/domains?x=1", headers, None)


def test_directions_do_not_mix():
    headers = signed(direction=agentauth.TO_CONTROLLER)
    with pytest.raises(SignatureError, match="wrong signature"):
        verifier().verify(SECRET, "POST", "/agent/v1/domains?x=1", headers, b'{"a": 1}')
    check = Verifier(verifier().clock, agentauth.TO_CONTROLLER)
    check.verify(SECRET, "POST", "/agent/v1/domains?x=1", headers, b'{"a": 1}')


def test_the_proof_binds_secret_signature_and_status():
    sig = signed()[agentauth.H_SIGNATURE]
    proof = agentauth.proof(SECRET, sig, 200)
    assert agentauth.check_proof(SECRET, sig, 200, proof)
    assert not agentauth.check_proof(SECRET, sig, 500, proof)
    assert not agentauth.check_proof("other", sig, 200, proof)
    assert not agentauth.check_proof(SECRET, "0" * 64, 200, proof)
    assert not agentauth.check_proof(SECRET, sig, 200, None)
    assert not agentauth.check_proof(SECRET, sig, 200, "")


def test_password_comparison():
    assert agentauth.password_matches("pw", "pw")
    assert not agentauth.password_matches("pw ", "pw")
    assert not agentauth.password_matches("", "")  # no configured password: nothing matches
    assert len(agentauth.new_secret()) >= 40 and agentauth.new_secret() != agentauth.new_secret()
