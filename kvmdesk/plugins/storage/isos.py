"""The ISO library (contract #59-#63): upload, list, edit, download (with Range), delete.

ISOs stay on the controller (templates attach them from there).  An upload is refused as soon as its
first 34 KiB show it is not an ISO 9660 image.  Downloads are streamed off the reactor
(:class:`~kvmdesk.api.downloads.FileDownload`), with Range requests (206) so a client can resume.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional
from urllib.parse import quote

from pydantic import Field

from kvmdesk.api.downloads import FileDownload
from kvmdesk.api.models import Model, Uuids, name_type, validate
from kvmdesk.api.router import ApiRequest, Router
from kvmdesk.api.streaming import StreamContext
from kvmdesk.core import errors as core_errors
from kvmdesk.core.errors import ApiError, Resource
from kvmdesk.core.jobs import run_batch
from kvmdesk.core.paging import Choice, paged_search
from kvmdesk.core.records import new_record, now_text
from kvmdesk.core.store import Index
from kvmdesk.core.threadpools import in_reactor_pool
from kvmdesk.plugins.storage import errors
from kvmdesk.protocol.ranges import byte_range
from kvmdesk.plugins.storage.formats import ISO_MIN_SIZE, looks_like_iso
from kvmdesk.plugins.storage.settings import settings, size_in_gb
from kvmdesk.plugins.storage.uploads import FormSpec, FormUpload

ISOS = "isos"
RESOURCE = Resource("ISO", "ISO")
#: The kind other plugins see in kvmdesk_usage and the lifecycle hooks.
KIND = "iso"
TAGS = ("isos",)
INDEXES = [Index(ISOS, ["uuid"], unique=True), Index(ISOS, ["type"])]
ISO_TYPES = (1, 2, 3)  # 1 software, 2 tools, 3 operating system
HIDDEN = ("file",)
ISO_MEDIA = "application/x-iso9660-image"
#: What a client asks for in ``Accept`` to be given the file at the detail path (the contract's download).
FILE_MEDIA = (ISO_MEDIA, "application/octet-stream")


#: ISO names come from the uploaded file name: longer than other names.
IsoName = name_type(128)


class IsoNames(Model):
    """The name and file name an upload gives (from the form or the file's name), checked like any name."""

    name: IsoName
    filename: IsoName


class IsoForm(Model):
    """The upload form (multipart)."""

    file: bytes = Field(description="the ISO 9660 image", json_schema_extra={"format": "binary"})
    iso_type: int = Field(description="1 software, 2 tools, 3 operating system")
    os_type: str = Field(default="", max_length=64)


class IsoEdit(Model):
    name: Optional[IsoName] = None
    os_type: Optional[str] = Field(default=None, max_length=64)
    type: Optional[int] = Field(default=None, ge=1, le=3)
    desc: Optional[str] = Field(default=None, max_length=1024)


def public(iso: dict) -> dict:
    return {k: v for k, v in iso.items() if k not in HIDDEN}


async def iso_or_404(core: Any, uuid: str) -> dict:
    iso = await core.store.collection(ISOS).find_one({"uuid": uuid})
    if iso is None:
        raise ApiError(core_errors.NOT_FOUND, resource=RESOURCE, key=uuid)
    return iso


def wants_file(accept: Optional[bytes]) -> bool:
    """Whether an ``Accept`` header asks for the ISO file rather than its JSON detail.

    The file when it names one of :data:`FILE_MEDIA` and JSON is neither named nor ranked higher;
    no header, ``*/*`` or JSON first: the detail.
    """
    ranked: dict[str, float] = {}
    for part in (accept or b"").decode("latin-1").lower().split(","):
        media, _, params = part.strip().partition(";")
        quality = 1.0
        for param in params.split(";"):
            name, _, value = param.strip().partition("=")
            if name == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        if media:
            ranked[media.strip()] = max(quality, ranked.get(media.strip(), 0.0))
    best_file = max((ranked.get(m, 0.0) for m in FILE_MEDIA), default=0.0)
    return best_file > 0 and best_file > ranked.get("application/json", 0.0)


def _sniff_iso(head: bytes) -> None:
    if len(head) < ISO_MIN_SIZE or not looks_like_iso(head):
        raise ApiError(errors.NOT_AN_ISO)


def _upload_sink(context: StreamContext) -> FormUpload:
    config = settings(context.core)
    spec = FormSpec(directory=config.iso_dir, fields=frozenset({"iso_type", "os_type", "name", "desc"}),
                    max_file=config.max_upload, sniff=_sniff_iso, threaded=config.hash_in_thread,
                    fsync=config.fsync, direct=config.direct_io)
    return FormUpload(context, spec)


def _parse_type(raw: Optional[str], field: str) -> int:
    try:
        value = int(raw or "")
    except ValueError:
        raise ApiError(core_errors.INVALID_PARAM, field=field, reason="expected 1, 2 or 3") from None
    if value not in ISO_TYPES:
        raise ApiError(core_errors.INVALID_PARAM, field=field, reason="expected 1, 2 or 3")
    return value


#: Filters of the list; ``name`` is matched by substring whatever the searchtype (the contract's
#: "ISO文件名字模糊查询").
SEARCH_FIELDS = {"uuid": str, "name": str, "type": Choice(int, ISO_TYPES), "os_type": str, "desc": str, "status": int}


def register_routes(router: Router) -> None:
    base = "/resource_mgr/isos"

    @router.endpoint("GET", base, summary="List ISOs, paged; name (substring) and type filters", tags=TAGS,
                     search_fields=SEARCH_FIELDS, paged=True)
    async def list_isos(req: ApiRequest) -> Any:
        async def shown(isos: list[dict]) -> list[dict]:
            return [public(i) for i in isos]

        return await paged_search(req, req.core.store.collection(ISOS), SEARCH_FIELDS, sort=[("id", -1)],
                                  decorate=shown, resource=RESOURCE, substring=("name",))

    @router.endpoint("POST", base, summary="Upload an ISO (multipart form: file, iso_type, os_type)", tags=TAGS,
                     body=IsoForm, stream=_upload_sink, oplog="上传ISO")
    async def upload_iso(req: ApiRequest) -> dict:
        core = req.core
        upload = req.stream
        fields = dict(upload.fields)
        iso_type = _parse_type(fields.get("iso_type") or req.args.get("iso_type"), "iso_type")
        os_type = fields.get("os_type", req.args.get("os_type", ""))
        if len(os_type) > 64:
            raise ApiError(core_errors.INVALID_PARAM, field="os_type", reason="at most 64 characters")
        filename = upload.filename or "image.iso"
        names = validate(IsoNames, {"name": fields.get("name") or re.sub(r"\.iso$", "", filename, flags=re.I) or filename,
                                    "filename": filename})
        name, filename = names.name, names.filename
        req.oplog_detail = name
        record = new_record(core.clock, name=name, type=iso_type, os_type=os_type, desc=fields.get("desc", ""),
                            filename=filename, size=size_in_gb(upload.size), size_bytes=upload.size, md5=upload.md5,
                            status=0)
        destination = settings(core).iso_dir / f"{record['uuid']}.iso"
        record["path"] = record["file"] = str(destination)
        upload.commit(destination)
        try:
            created = await core.store.collection(ISOS).insert_one(record)
        except BaseException:
            destination.unlink(missing_ok=True)
            raise
        await core.created(KIND, created)
        return public(created)

    @router.endpoint("PUT", base + "/{iso_uuid}", summary="Edit an ISO's name, system type, type or description",
                     tags=TAGS, body=IsoEdit, oplog="编辑ISO")
    async def edit_iso(req: ApiRequest) -> dict:
        iso = await iso_or_404(req.core, req.path["iso_uuid"])
        req.oplog_detail = iso["name"]
        changes = req.body.model_dump(exclude_unset=True)
        if "name" in changes and changes["name"] is None:
            raise ApiError(core_errors.INVALID_PARAM, field="name", reason="must not be null")
        if not changes:
            return public(iso)
        changes = {k: ("" if v is None else v) for k, v in changes.items()}
        changes["updated_at"] = now_text(req.core.clock)
        updated = await req.core.store.collection(ISOS).find_one_and_update({"uuid": iso["uuid"]}, {"$set": changes})
        if updated is None:
            raise ApiError(core_errors.NOT_FOUND, resource=RESOURCE, key=iso["uuid"])
        await req.core.updated(KIND, updated, changes)
        return public(updated)

    async def download(req: ApiRequest) -> Any:
        iso = await iso_or_404(req.core, req.path["iso_uuid"])
        path = Path(iso["file"])
        try:
            found = await in_reactor_pool(req.core.reactor, path.stat)
        except FileNotFoundError:
            raise ApiError(errors.FILE_MISSING, path=iso["name"]) from None
        wanted = byte_range(req.http.getHeader(b"range"), found.st_size)
        filename = iso.get("filename") or f"{iso['name']}.iso"
        ascii_name = filename.encode("ascii", "replace").decode().replace('"', "_").replace("?", "_")
        req.http.setHeader(
            b"content-disposition",
            f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(filename)}".encode("latin-1"),
        )
        # The type is fixed, so a stored file name never decides the type or a content-encoding.
        return FileDownload(path, found.st_size, ISO_MEDIA.encode(), wanted=wanted,
                            reactor=req.core.reactor, direct=settings(req.core).direct_io, modified=found.st_mtime)

    @router.endpoint("GET", base + "/{iso_uuid}", tags=TAGS, produces=FILE_MEDIA,
                     summary="An ISO's detail (JSON); the file itself when Accept asks for "
                             f"{' or '.join(FILE_MEDIA)} and not for JSON (same as .../download)")
    async def iso_detail(req: ApiRequest) -> Any:
        if wants_file(req.http.getHeader(b"accept")):
            return await download(req)
        return public(await iso_or_404(req.core, req.path["iso_uuid"]))

    router.endpoint("GET", base + "/{iso_uuid}/download", tags=TAGS, produces=FILE_MEDIA, file_only=True,
                    summary="Download an ISO (streamed; Range requests resume)")(download)

    @router.endpoint("DELETE", base, summary="Delete ISOs (batch); refused while attached to a template", tags=TAGS,
                     body=Uuids, oplog="删除ISO")
    async def delete_isos(req: ApiRequest) -> dict:
        core = req.core

        async def delete_one(uuid: str) -> None:
            iso = await iso_or_404(core, uuid)
            await core.refuse_if_used(KIND, uuid, RESOURCE.named(iso['name']))
            await core.store.collection(ISOS).delete_one({"uuid": uuid})
            await core.deleted(KIND, iso)
            await in_reactor_pool(core.reactor, Path(iso["file"]).unlink, True)

        return await run_batch(req, list(dict.fromkeys(req.body.uuids)), delete_one)

