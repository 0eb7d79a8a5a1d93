"""HTTP byte ranges of resumable file transfers, the same on the controller and on the agent.

A server that sends a file (the controller's ISO and template downloads, an agent's image content for
its peers) reads the request's ``Range`` with :func:`byte_range` and answers 206 with
:func:`content_range`; an agent resuming a fetch asks with :func:`resume_headers` and learns from
:func:`resumed_at` where the answer starts.
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Optional

from kvmdesk.core.errors import ApiError, ErrorCode, define

RANGE_NOT_SATISFIABLE = define(
    4009, 416, "请求的范围无效 (文件大小 {size} 字节)", "requested range not satisfiable (file size {size} bytes)"
)

_BYTES = re.compile(r"^bytes=(.+)$")
_SPEC = re.compile(r"^(\d*)-(\d*)$")


def byte_range(header: Optional[bytes], size: int) -> Optional[tuple[int, int]]:
    """The first and last byte a ``Range`` header asks for, or ``None`` for the whole file.

    A header that is absent, not a byte range, malformed, or asks for several ranges is answered with
    the whole file (RFC 9110 allows ignoring Range; one range is what a resuming client sends).

    :raises ApiError: :data:`RANGE_NOT_SATISFIABLE`: no byte of the range is in the file.
    """
    if not header:
        return None
    found = _BYTES.match(header.decode("latin-1").strip())
    if not found:
        return None
    specs = [_SPEC.match(spec.strip()) for spec in found.group(1).split(",")]
    if any(spec is None or spec.group(0) == "-" for spec in specs):
        return None
    ranges = []
    for spec in specs:
        first, last = spec.group(1), spec.group(2)
        if first == "":  # the last N bytes
            if int(last) > 0 and size > 0:
                ranges.append((max(0, size - int(last)), size - 1))
        elif int(first) < size and (last == "" or int(last) >= int(first)):
            ranges.append((int(first), size - 1 if last == "" else min(int(last), size - 1)))
    if not ranges:
        raise ApiError(RANGE_NOT_SATISFIABLE, size=size)
    return ranges[0] if len(specs) == 1 else None


def content_range(first: int, last: int, size: int) -> bytes:
    """The ``Content-Range`` value of a 206 answer."""
    return b"bytes %d-%d/%d" % (first, last, size)


def resume_headers(headers: Mapping[str, str], offset: int) -> dict[str, list[str]]:
    """``headers`` (say a ticket's) for a GET of the rest of a file from byte ``offset`` (treq's form)."""
    found = {k: [v] for k, v in headers.items()}
    if offset:
        found["Range"] = [f"bytes={offset}-"]
    return found


async def resumed_at(response: Any, offset: int, error: ErrorCode) -> int:
    """Where the answer to a :func:`resume_headers` GET starts: ``offset`` (206) or 0 (200: the whole file,
    a server that ignored the range).

    :raises ApiError: ``error`` with the server's status and the start of its body, on any other status.
    """
    if response.code == 206:
        answered = (response.headers.getRawHeaders("content-range") or [""])[0]
        if answered.startswith(f"bytes {offset}-"):
            return offset
        raise ApiError(error, reason=f"asked for bytes from {offset}, the source sent {answered!r}")
    if response.code == 200:
        return 0
    body = await response.content()
    raise ApiError(error, reason=f"the source answered HTTP {response.code}: {body[:300].decode('utf-8', 'replace')}")
