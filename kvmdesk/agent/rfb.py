"""The parts of RFB (VNC, RFC 6143) the console tunnel speaks: both sides of the security handshake.

The agent authenticates to a domain's VNC server itself (:class:`VncLogin`: VNC authentication, the
DES challenge-response, with the password from the domain's XML) and then presents the console to the
controller as a server that asks for no authentication (:class:`NoAuthGreeting`), so the password
never leaves the node.  After the security handshake both sides speak the same protocol (ClientInit,
ServerInit, messages), whatever version the viewer chose, and the bytes are passed through unread.
"""
from __future__ import annotations

import struct
from typing import Optional

from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, modes

VERSION_3_3 = b"RFB 003.003\n"
VERSION_3_7 = b"RFB 003.007\n"
VERSION_3_8 = b"RFB 003.008\n"
SEC_NONE = 1
SEC_VNC_AUTH = 2
#: Longest server message read during the handshake (a refusal reason).
MAX_REASON = 4096


class RfbError(Exception):
    """The handshake failed; the message says why (e.g. the server's own reason)."""


class AuthenticationFailed(RfbError):
    """The VNC server refused the password."""


def _reverse_bits(byte: int) -> int:
    return int(f"{byte:08b}"[::-1], 2)


def vnc_auth_response(password: str, challenge: bytes) -> bytes:
    """The answer to a VNC authentication challenge.

    VNC uses the password (cut or zero-padded to 8 bytes) as a DES key with the bits of every byte
    reversed, and encrypts the 16-byte challenge with it (ECB).  Triple DES with the same key three
    times is single DES, which is what ``cryptography`` still offers.
    """
    key = bytes(_reverse_bits(b) for b in password.encode("latin-1", "replace")[:8].ljust(8, b"\0"))
    encryptor = Cipher(TripleDES(key * 3), modes.ECB()).encryptor()
    return encryptor.update(challenge) + encryptor.finalize()


class _Reader:
    """A byte buffer that hands out exact-length reads as data arrives."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    def feed(self, data: bytes) -> None:
        self.buffer += data

    def take(self, size: int) -> Optional[bytes]:
        if len(self.buffer) < size:
            return None
        out = bytes(self.buffer[:size])
        del self.buffer[:size]
        return out

    def peek_reason(self, offset: int) -> Optional[str]:
        """A length-prefixed reason string at ``offset`` (``None`` while incomplete)."""
        if len(self.buffer) < offset + 4:
            return None
        (length,) = struct.unpack(">I", self.buffer[offset:offset + 4])
        length = min(length, MAX_REASON)
        if len(self.buffer) < offset + 4 + length:
            return None
        return bytes(self.buffer[offset + 4:offset + 4 + length]).decode("utf-8", "replace")


class VncLogin:
    """The client side of the handshake with a VNC server, as a state machine fed with bytes.

    :meth:`feed` returns what to send back; :attr:`done` turns true once the server accepted the
    security handshake (the next message is the viewer's ClientInit).  Raises :class:`RfbError` or
    :class:`AuthenticationFailed`.

    :param password: the VNC password (``None``: the server must offer no authentication).
    """

    def __init__(self, password: Optional[str]):
        self.password = password
        self.reader = _Reader()
        self.state = "version"
        self.version = VERSION_3_8
        self.done = False

    def feed(self, data: bytes) -> bytes:
        self.reader.feed(data)
        out = b""
        while not self.done:
            step = getattr(self, "_" + self.state)()
            if step is None:
                break
            out += step
        return out

    def _version(self) -> Optional[bytes]:
        greeting = self.reader.take(12)
        if greeting is None:
            return None
        if not greeting.startswith(b"RFB ") or greeting[-1:] != b"\n":
            raise RfbError("not a VNC server")
        # 3.3 servers choose the security type themselves; anything newer gets 3.8.
        self.version = VERSION_3_3 if greeting < VERSION_3_7 else VERSION_3_8
        self.state = "types" if self.version == VERSION_3_8 else "type33"
        return self.version

    def _refused(self, offset: int) -> Optional[bytes]:
        reason = self.reader.peek_reason(offset)
        if reason is None:
            return None
        raise RfbError(f"the VNC server refused the connection: {reason}")

    def _types(self) -> Optional[bytes]:
        buf = self.reader.buffer
        if not buf:
            return None
        if buf[0] == 0:
            return self._refused(1)
        if len(buf) < 1 + buf[0]:
            return None
        offered = set(self.reader.take(1 + buf[0])[1:])
        return self._choose(offered, send=True)

    def _type33(self) -> Optional[bytes]:
        buf = self.reader.buffer
        if len(buf) < 4:
            return None
        (chosen,) = struct.unpack(">I", buf[:4])
        if chosen == 0:
            return self._refused(4)
        self.reader.take(4)
        return self._choose({chosen}, send=False)

    def _choose(self, offered: set, send: bool) -> bytes:
        if SEC_VNC_AUTH in offered and self.password is not None:
            self.state = "challenge"
            return bytes([SEC_VNC_AUTH]) if send else b""
        if SEC_NONE in offered:
            self.state = "result" if self.version == VERSION_3_8 else "finished"
            if self.state == "finished":
                self.done = True
            return bytes([SEC_NONE]) if send else b""
        raise RfbError(f"no supported VNC security type offered ({sorted(offered)})")

    def _challenge(self) -> Optional[bytes]:
        challenge = self.reader.take(16)
        if challenge is None:
            return None
        self.state = "result"
        return vnc_auth_response(self.password or "", challenge)

    def _result(self) -> Optional[bytes]:
        buf = self.reader.buffer
        if len(buf) < 4:
            return None
        (status,) = struct.unpack(">I", buf[:4])
        if status == 0:
            self.reader.take(4)
            self.done = True
            return b""
        if self.version == VERSION_3_8:
            reason = self.reader.peek_reason(4)
            if reason is None:
                return None
        else:
            reason = "authentication failed"
        raise AuthenticationFailed(f"the VNC server refused the password: {reason}")

    def _finished(self) -> Optional[bytes]:
        return None


class NoAuthGreeting:
    """The server side of a handshake that asks for no authentication (what a viewer sees).

    :attr:`greeting` is sent first; :meth:`feed` returns the answers to send, and :attr:`done`
    turns true when the viewer may send its ClientInit.  :attr:`reader` then holds what came early.
    """

    greeting = VERSION_3_8

    def __init__(self) -> None:
        self.reader = _Reader()
        self.version: Optional[bytes] = None
        self.done = False

    def feed(self, data: bytes) -> bytes:
        self.reader.feed(data)
        if self.version is None:
            version = self.reader.take(12)
            if version is None:
                return b""
            if not version.startswith(b"RFB 003.") or version[-1:] != b"\n":
                raise RfbError("the viewer did not send an RFB version")
            self.version = min(max(version, VERSION_3_3), VERSION_3_8)
            if self.version < VERSION_3_7:
                self.done = True
                return struct.pack(">I", SEC_NONE)
            return bytes([1, SEC_NONE])
        if self.done:
            return b""
        chosen = self.reader.take(1)
        if chosen is None:
            return b""
        if chosen[0] != SEC_NONE:
            raise RfbError(f"the viewer chose security type {chosen[0]}, not None")
        self.done = True
        # 3.8 confirms even "None" with a SecurityResult; 3.7 goes straight to ClientInit.
        return struct.pack(">I", 0) if self.version == VERSION_3_8 else b""
