"""Placing one controller file on one node, now: what attaching an ISO to a running domain needs.

Other plugins reach it as ``core.extensions["storage.place_file"]``::

    path = await place_file(node, kind="iso", file_id=iso_uuid, role=1, source=Path(iso["file"]), md5=iso["md5"])

The node keeps a file it already holds with that MD5 (sent as the digest ``md5:<hex>``); otherwise it
is streamed (off the reactor, by :class:`~kvmdesk.plugins.storage.producers.FileRangeProducer`) and
verified by the agent before it appears.  Unlike the distributor's transfers nothing is persisted: the caller waits for the answer.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from kvmdesk.plugins.storage.agents import agent_link
from kvmdesk.plugins.storage.producers import FileRangeProducer
from kvmdesk.protocol.images import digest_of

EXTENSION = "storage.place_file"


def make_place_file(core: Any) -> Any:
    async def place_file(node: Mapping[str, Any], *, kind: str, file_id: str, role: int, source: Path,
                         md5: str) -> str:
        """Make sure ``node`` holds ``source`` as ``kind/file_id`` in storage ``role``; returns its path there."""
        link = agent_link(core)
        path = f"/images/{kind}/{file_id}"
        size = Path(source).stat().st_size
        digest = digest_of("md5", md5)
        state = await link.call(node, "GET", path, params={"role": role, "digest": digest})
        if state.get("exists") and state.get("digest") == digest and state.get("size") == size:
            return state["path"]
        offset = min(int(state.get("partial") or 0), size)
        producer = FileRangeProducer(Path(source), offset, size - offset, reactor=core.reactor)
        answer = await link.send(node, "PUT", path, producer,
                                 params={"role": role, "offset": offset, "total": size, "digest": digest})
        return answer["path"]

    return place_file
