"""The agent's image endpoints (see :mod:`kvmdesk.protocol.images`), on the agent's router.

The agent's HTTP application calls :func:`register_routes` with its :class:`~kvmdesk.api.router.Router`
(prefix ``/agent/v1``).  The PUT streams its body into the partial file as it arrives when the agent's
site has the streaming request factory (:func:`kvmdesk.api.streaming.make_site` /
``install_streaming``); on any other site the router feeds the buffered body through the same sink.
The agent authenticates every request before routing, so these endpoints are registered with
``auth=False``; a router that can check a request from its headers alone sets ``router.stream_guard``
so that unauthenticated bodies are refused before they are written.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional


from pydantic import Field

from kvmdesk.agent.images import peers
from kvmdesk.agent.images.store import ImageStore
from kvmdesk.api.downloads import FileDownload
from kvmdesk.api.models import Model
from kvmdesk.api.router import ApiRequest, Router
from kvmdesk.api.streaming import StreamContext
from kvmdesk.core.errors import ApiError
from kvmdesk.core.producers import SharedReads
from kvmdesk.core.threadpools import in_reactor_pool
from kvmdesk.protocol import images as protocol
from kvmdesk.protocol.ranges import byte_range

TAGS = ("images",)


def _int_arg(args: Mapping[str, str], name: str, default: Optional[int] = None) -> int:
    raw = args.get(name)
    if raw is None or raw == "":
        if default is None:
            raise ApiError(protocol.BAD_TRANSFER, reason=f"{name} is required")
        return default
    try:
        return int(raw)
    except ValueError:
        raise ApiError(protocol.BAD_TRANSFER, reason=f"{name} must be an integer") from None


class FetchBody(Model):
    """Where to fetch a file from: the source agent's content URL and the signed headers (the ticket)."""

    role: int = Field(ge=1, le=4)
    #: ``algorithm:hex`` (:data:`~kvmdesk.protocol.images.DIGEST`).  ``None``: the source is still sealing
    #: it; the file is received but not committed (fetch it again with the digest to verify and commit it:
    #: the bytes are not sent again).
    digest: Optional[str] = Field(default=None, pattern=protocol.DIGEST.pattern)
    total: int = Field(ge=0)
    version: Optional[int] = None
    url: str = Field(pattern=r"^https?://", max_length=2048)
    ticket: dict[str, str]


def register_routes(router: Router, agent: Any, *, reactor: Any = None, store: Optional[ImageStore] = None) -> ImageStore:
    """Add the image endpoints to the agent's router; returns the :class:`ImageStore` they use.

    :param agent: the agent (its ``config`` gives ``[agent.storage]`` paths, ``data_dir`` the default).
    :param store: an :class:`ImageStore` to use instead of one built from the agent's configuration.
    """
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    images = store if store is not None else ImageStore.for_agent(agent, reactor)
    if hasattr(agent, "drains"):
        agent.drains.append(images.drain)

    def in_thread(fn: Any, *args: Any) -> Any:
        return in_reactor_pool(reactor, fn, *args)

    def receive(context: StreamContext) -> Any:
        args = context.args
        return images.receiver(
            context,
            context.path["kind"],
            _int_arg(args, "role", 1),
            context.path["file_id"],
            offset=_int_arg(args, "offset", 0),
            total=_int_arg(args, "total"),
            digest=args.get("digest", ""),
            version=_int_arg(args, "version", 0) or None,
        )

    base = "/images/{kind}/{file_id}"
    shared = SharedReads()

    @router.endpoint("GET", base + "/content", summary="The bytes of an image file (Range: bytes=N- resumes); "
                     "peers fetch with a controller ticket", tags=TAGS, auth=False)
    async def image_content(req: ApiRequest) -> Any:
        role = _int_arg(req.args, "role", 1)
        final = images.final_path(req.path["kind"], role, req.path["file_id"])
        state = await in_thread(images.state, req.path["kind"], role, req.path["file_id"])
        if not state["exists"]:
            raise ApiError(protocol.IMAGE_NOT_FOUND, file_id=req.path["file_id"])
        wanted = byte_range(req.http.getHeader(b"range"), state["size"])
        return FileDownload(final, state["size"], b"application/octet-stream", wanted=wanted, reactor=reactor,
                            shared=shared)

    @router.endpoint("POST", base + "/fetch", summary="Fetch an image file from a peer agent on a controller ticket",
                     tags=TAGS, auth=False, body=FetchBody, oplog="")
    async def image_fetch(req: ApiRequest) -> dict:
        body: FetchBody = req.body
        images.final_path(req.path["kind"], body.role, req.path["file_id"])  # validates before any I/O
        return await peers.fetch(images, req.path["kind"], body.role, req.path["file_id"], digest=body.digest,
                                 total=body.total, version=body.version, url=body.url, ticket=body.ticket,
                                 reactor=reactor)

    @router.endpoint("GET", base, summary="State of one image file on this node", tags=TAGS, auth=False)
    async def image_state(req: ApiRequest) -> dict:
        role = _int_arg(req.args, "role", 1)
        final = images.final_path(req.path["kind"], role, req.path["file_id"])  # validates before touching the disk
        await images.settled(final)  # an interrupted transfer's last chunks count as what is here
        return await in_thread(images.state, req.path["kind"], role, req.path["file_id"],
                               req.args.get("digest"))

    @router.endpoint("PUT", base, summary="Receive (or resume) an image file; its digest verified before it appears",
                     tags=TAGS, auth=False, oplog="", stream=receive)
    async def image_put(req: ApiRequest) -> dict:
        return await req.stream.commit()

    @router.endpoint("DELETE", base, summary="Remove an image file and any partial transfer of it", tags=TAGS,
                     auth=False, oplog="")
    async def image_delete(req: ApiRequest) -> dict:
        final = images.final_path(req.path["kind"], _int_arg(req.args, "role", 1), req.path["file_id"])
        images.forget(final)
        return {"removed": await in_thread(images.remove_files, final)}

    @router.endpoint("GET", "/images/{kind}", summary="Complete image files of a kind in a storage role", tags=TAGS,
                     auth=False)
    async def image_list(req: ApiRequest) -> list:
        role = _int_arg(req.args, "role", 1)
        images.directory(req.path["kind"], role)
        return await in_thread(images.listing, req.path["kind"], role)

    return images
