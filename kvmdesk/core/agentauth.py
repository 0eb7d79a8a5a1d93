"""Mutual authentication between the controller and a node agent, with a per-node secret.

Every request the controller sends to an agent is signed::

    X-Kvmdesk-Timestamp: <unix seconds>
    X-Kvmdesk-Nonce: <32 hex characters, never reused>
    X-Kvmdesk-Content-Sha256: <hex SHA-256 of the body> | UNSIGNED-PAYLOAD
    X-Kvmdesk-Signature: hex HMAC-SHA256(secret, canonical request)

where the canonical request is the lines ``kvmdesk-v1``, the direction (``to-agent`` for the
controller's requests, ``to-controller`` for the events an agent posts), the method, the path with
its query string, the timestamp, the nonce and the body hash.  ``UNSIGNED-PAYLOAD`` is for streamed
uploads: their integrity is checked by the digest carried with them (kvmdesk.protocol.images), and the
signature still covers everything else.

The receiver refuses (HTTP 401) a missing or wrong signature, a timestamp more than
:data:`MAX_SKEW` seconds from its own clock, and a nonce it has already seen within that window.

The agent proves in return that it holds the secret too: every answer carries
``X-Kvmdesk-Proof: hex HMAC-SHA256(secret, "agent:" + request signature + ":" + status)``, which the
controller checks before it believes the answer (:func:`check_proof`).

Enrolment (how the secret is established) is the agent's business; the comparison of enrolment
passwords is here (:func:`password_matches`) so both sides use the same constant-time rule.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Any, Mapping, Optional

from twisted.internet.interfaces import IReactorTime

SCHEME = "kvmdesk-v1"
TO_AGENT = "to-agent"
TO_CONTROLLER = "to-controller"
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"

H_TIMESTAMP = "X-Kvmdesk-Timestamp"
H_NONCE = "X-Kvmdesk-Nonce"
H_CONTENT = "X-Kvmdesk-Content-Sha256"
H_SIGNATURE = "X-Kvmdesk-Signature"
H_PROOF = "X-Kvmdesk-Proof"
#: Sent by an agent posting events: which enrolment (agent id) signed the request.
H_AGENT = "X-Kvmdesk-Agent"

#: Seconds a signed request may be early or late.
MAX_SKEW = 300.0
#: Upper bound on remembered nonces; beyond it the oldest are dropped (they are near expiry anyway).
MAX_NONCES = 200_000


class SignatureError(Exception):
    """A request's signature was refused; the message says why (never the secret)."""


def new_secret() -> str:
    """A fresh long-term secret (256 random bits, URL-safe text)."""
    return secrets.token_urlsafe(32)


def _key(secret: str) -> bytes:
    return secret.encode("utf-8")


def body_hash(body: Optional[bytes]) -> str:
    """Hex SHA-256 of a body (an absent body hashes as the empty one)."""
    return hashlib.sha256(body or b"").hexdigest()


def canonical(direction: str, method: str, target: str, timestamp: str, nonce: str, content: str) -> bytes:
    """The bytes that are signed (see the module docstring)."""
    return "\n".join([SCHEME, direction, method.upper(), target, timestamp, nonce, content]).encode("utf-8")


def signature(secret: str, direction: str, method: str, target: str, timestamp: str, nonce: str, content: str) -> str:
    return hmac.new(_key(secret), canonical(direction, method, target, timestamp, nonce, content), hashlib.sha256).hexdigest()


def sign(
    secret: str,
    method: str,
    target: str,
    body: Optional[bytes],
    *,
    now: float,
    direction: str = TO_AGENT,
    unsigned_payload: bool = False,
    nonce: Optional[str] = None,
) -> dict[str, str]:
    """The headers that sign one request.

    :param target: the path with its query string, exactly as sent (``/agent/v1/x?y=1``).
    :param body: the body bytes (ignored with ``unsigned_payload``).
    :param now: current Unix time (the sender's clock).
    :param unsigned_payload: streamed bodies: sign ``UNSIGNED-PAYLOAD`` instead of the body hash.
    :returns: header name -> value; :data:`H_SIGNATURE` is the request signature to check the proof with.
    """
    timestamp = str(int(now))
    nonce = nonce or secrets.token_hex(16)
    content = UNSIGNED_PAYLOAD if unsigned_payload else body_hash(body)
    return {
        H_TIMESTAMP: timestamp,
        H_NONCE: nonce,
        H_CONTENT: content,
        H_SIGNATURE: signature(secret, direction, method, target, timestamp, nonce, content),
    }


def proof(secret: str, request_signature: str, status: int) -> str:
    """The agent's answer proof for a request it verified."""
    message = f"agent:{request_signature}:{int(status)}".encode("utf-8")
    return hmac.new(_key(secret), message, hashlib.sha256).hexdigest()


def check_proof(secret: str, request_signature: str, status: int, header: Optional[str]) -> bool:
    """Whether ``header`` is the right proof for this request and status (constant time)."""
    if not header:
        return False
    return hmac.compare_digest(proof(secret, request_signature, status), header.strip())


def password_matches(given: str, expected: str) -> bool:
    """Compare an enrolment password in constant time (hashes first, so lengths do not leak)."""
    if not expected:
        return False
    a = hashlib.sha256(given.encode("utf-8")).digest()
    b = hashlib.sha256(expected.encode("utf-8")).digest()
    return hmac.compare_digest(a, b)


def _header(headers: Mapping[str, Any], name: str) -> Optional[str]:
    value = headers.get(name.lower())
    if value is None:
        value = headers.get(name)
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    return value


class Verifier:
    """Checks signed requests for one direction: signature, clock skew and replays.

    :param clock: the receiver's time (``IReactorTime``); injected in tests.
    :param direction: :data:`TO_AGENT` on the agent, :data:`TO_CONTROLLER` on the controller.
    :param max_skew: seconds a timestamp may be away from the clock.
    """

    def __init__(self, clock: IReactorTime, direction: str = TO_AGENT, max_skew: float = MAX_SKEW):
        self.clock = clock
        self.direction = direction
        self.max_skew = max_skew
        self._nonces: dict[str, float] = {}

    def _remember(self, nonce: str, now: float) -> None:
        if nonce in self._nonces:
            raise SignatureError("replayed request (nonce already used)")
        nonces = self._nonces
        if len(nonces) >= 1024 and len(nonces) % 1024 == 0:
            horizon = now - 2 * self.max_skew
            for key in [k for k, seen in nonces.items() if seen < horizon]:
                del nonces[key]
            while len(nonces) >= MAX_NONCES:
                del nonces[next(iter(nonces))]
        nonces[nonce] = now

    def verify(
        self, secret: Optional[str], method: str, target: str, headers: Mapping[str, Any], body: Optional[bytes]
    ) -> str:
        """Check one request.

        :param secret: the shared secret (``None``: not enrolled, every request is refused).
        :param headers: request headers (names in any case; str or bytes values).
        :param body: the body bytes, read only when the body hash is signed.
        :returns: the request signature (for the answer's proof).
        :raises SignatureError: with the reason.
        """
        timestamp = _header(headers, H_TIMESTAMP)
        nonce = _header(headers, H_NONCE)
        content = _header(headers, H_CONTENT)
        given = _header(headers, H_SIGNATURE)
        if not (timestamp and nonce and content and given):
            raise SignatureError("request is not signed")
        if secret is None:
            raise SignatureError("this agent is not enrolled")
        try:
            sent = int(timestamp)
        except ValueError:
            raise SignatureError("malformed timestamp") from None
        if not 8 <= len(nonce) <= 128:
            raise SignatureError("malformed nonce")
        now = self.clock.seconds()
        if abs(now - sent) > self.max_skew:
            raise SignatureError(f"stale request (timestamp {int(now - sent)} s away from this clock)")
        if content != UNSIGNED_PAYLOAD and not hmac.compare_digest(content, body_hash(body)):
            raise SignatureError("body does not match its signed hash")
        expected = signature(secret, self.direction, method, target, timestamp, nonce, content)
        if not hmac.compare_digest(expected, given):
            raise SignatureError("wrong signature")
        self._remember(nonce, now)
        return given
