"""The template endpoints (#64-#78) under ``/education/template``."""
from __future__ import annotations

from typing import Any, Awaitable, Callable, Optional

from kvmdesk.api.router import Action, ApiRequest, Router
from kvmdesk.core import errors as core_errors
from kvmdesk.core.errors import ApiError
from kvmdesk.core.paging import paged_search
from kvmdesk.plugins.templates import copy, download, publish, schedule, schema, service, views
from kvmdesk.plugins.templates.models import (AttachSource, ResyncParam, SaveParam, TemplateBatch, TemplateCopy,
                                              TemplateCreate, TemplateEdit, TemplateRef)

BASE = "/education/template"
TAGS = ("templates",)


def batch(action: str) -> Callable[[ApiRequest], Awaitable[dict]]:
    """A batch power action (#65-#67) as a persisted job: per-item results and ``job_id``."""

    async def handler(req: ApiRequest) -> dict:
        req.oplog_detail = ", ".join(t.name or t.uuid for t in req.body.templates)
        return await req.core.jobs.run_items(req, f"templates.{action}", [t.model_dump() for t in req.body.templates],
                                             lambda item: service.power(req.core, item["uuid"], action), concurrency=4)

    return handler


async def as_job(req: ApiRequest, kind: str, item: dict,
                 operation: Optional[Callable[[dict], Awaitable[dict]]] = None) -> dict:
    """One operation that touches nodes, as a persisted job: the contract's answer (what the operation
    said) plus ``job_id``; its failure is the answer.  Without ``operation``: the kind's registered runner."""
    answer = await req.core.jobs.run_items(req, kind, [item], operation, title=f"{kind}: {item.get('name')}")
    (said,) = answer["results"]
    return {**said, "job_id": answer["job_id"]}


def single(operation: Callable[[Any, Any], Awaitable[Any]]) -> Callable[[ApiRequest], Awaitable[Any]]:
    async def handler(req: ApiRequest) -> Any:
        req.oplog_detail = getattr(req.body, "name", None) or req.body.uuid
        return await operation(req.core, req.body)

    return handler


async def _create(req: ApiRequest) -> dict:
    req.oplog_detail = req.body.name

    async def create(item: dict) -> dict:
        created = await service.create(req.core, req.body, owner=(req.admin or {}).get("username") or "")
        return (await views.with_details(req.core, [created]))[0]

    return await as_job(req, "templates.create", {"uuid": None, "name": req.body.name}, create)


async def _resync(req: ApiRequest) -> dict:
    body = req.body
    req.oplog_detail = f"{body.image_id} -> {body.ipaddr}"
    role = body.role
    if isinstance(role, str):
        if not role.isdigit():
            raise ApiError(core_errors.INVALID_PARAM, field="param.role", reason="expected 1 or 2")
        role = int(role)
    return await publish.resync(req.core, body.ipaddr, body.image_id, body.version, role)


async def _copy(req: ApiRequest) -> dict:
    req.oplog_detail = req.body.name

    async def copy_one(item: dict) -> dict:
        created = await copy.copy(req.core, req.body, owner=(req.admin or {}).get("username") or "")
        return (await views.with_details(req.core, [created]))[0]

    return await as_job(req, "templates.copy", {"uuid": req.body.template_uuid, "name": req.body.name}, copy_one)


async def _save(req: ApiRequest) -> dict:
    """#70: publish now (a save job, resumed after a restart), or at ``run_date`` (replacing a pending
    scheduled save)."""
    req.oplog_detail = req.body.name or req.body.uuid
    template = await service.template_or_404(req.core, req.body.uuid)
    if req.body.run_date:
        return await schedule.schedule_save(req.core, template, req.body.run_date)
    return await as_job(req, schedule.SAVE, {"uuid": template["uuid"], "name": template["name"]})


def register_routes(router: Router) -> None:
    power = {name: Action(batch(name), f"{name} templates (batch, per-item results)", TemplateBatch, f"模板{name}")
             for name in ("start", "stop", "hard_stop", "reboot", "hard_reboot", "reset")}
    router.actions(BASE, {
        "create": Action(_create, "Create a template from a base image", TemplateCreate, "添加模板"),
        **power,
        "download": Action(single(lambda core, body: download.prepare(core, body.uuid)),
                           "Download the current version: answers the URL to GET the qcow2 from", TemplateRef),
        "resync": Action(_resync, "Send one template disk version to one node again", ResyncParam, "重传模板镜像"),
        "copy": Action(_copy, "Copy a template into a pool/network/subnet", TemplateCopy, "复制模板"),
        "save": Action(_save, "Save: publish a new version to every node of the pool, now or at run_date",
                       SaveParam, "更新模板"),
        "edit": Action(single(lambda core, body: service.edit(core, body.uuid)), "Online editing: start the template",
                       TemplateRef, "编辑模板"),
        "attach_source": Action(single(lambda core, body: service.change_media(core, body.uuid, body.iso_uuid)),
                                "Insert an ISO in the template's CD-ROM", AttachSource, "加载资源"),
        "detach_source": Action(single(lambda core, body: service.change_media(core, body.uuid, None)),
                                "Eject the template's CD-ROM", TemplateRef, "弹出资源"),
        "send_key": Action(single(lambda core, body: service.power(core, body.uuid, "send_key")),
                           "Send ctrl+alt+del", TemplateRef, "发送ctrl+alt+del"),
    }, tags=TAGS, summary="Template actions: create, power, edit, media, send_key")

    @router.endpoint("DELETE", BASE, summary="Delete templates (batch); their domains and disks go from the nodes",
                     tags=TAGS, body=TemplateBatch, oplog="删除模板")
    async def delete_templates(req: ApiRequest) -> dict:
        req.oplog_detail = ", ".join(t.name or t.uuid for t in req.body.templates)
        return await req.core.jobs.run_items(req, "templates.delete", [t.model_dump() for t in req.body.templates],
                                             lambda item: service.delete(req.core, item["uuid"]))

    @router.endpoint("PUT", BASE, summary="Change a template's attributes (name, network, IP, vCPU, RAM, disks)",
                     tags=TAGS, body=TemplateEdit, oplog="修改模板属性")
    async def change_attributes(req: ApiRequest) -> dict:
        req.oplog_detail = req.body.name or req.body.uuid
        updated = await service.change_attributes(req.core, req.body.uuid, req.body.value)
        return (await views.with_details(req.core, [updated]))[0]

    @router.endpoint("GET", BASE, summary="Query templates, paged (searchtype, classify, pool_uuid, name)", tags=TAGS,
                     search_fields=views.SEARCH_FIELDS)
    async def list_templates(req: ApiRequest) -> Any:
        return await paged_search(req, req.core.store.collection(schema.TEMPLATES), views.SEARCH_FIELDS,
                                  decorate=lambda records: views.with_details(req.core, records),
                                  resource=service.RESOURCE)

    @router.endpoint("GET", BASE + "/{uuid}/download", summary="The template's current version as one qcow2 (streamed)",
                     tags=TAGS)
    async def download_file(req: ApiRequest) -> Any:
        return await download.relay(req.core, req.path["uuid"])

    @router.endpoint("GET", BASE + "/image", summary="Per-node state of a template's disk images in a pool "
                     "(pool_uuid, template_uuid: the contract's two parameters, searchable like any field)",
                     tags=TAGS, search_fields=views.IMAGE_FIELDS)
    async def image_state(req: ApiRequest) -> dict:
        async def rows() -> list[dict]:
            # Only what the search can match is asked of the agents: the named template, else all.
            wanted = req.args.get("template_uuid") if req.args.get("searchtype", "all") == "all" else None
            found = await req.core.store.collection(schema.TEMPLATES).find({"uuid": wanted} if wanted else {},
                                                                            sort=[("id", 1)])
            return [{**row, "pool_uuid": template["pool_uuid"], "template_uuid": template["uuid"]}
                    for template in found for row in await views.image_states(req.core, template)]

        return await paged_search(req, rows, views.IMAGE_FIELDS, resource=schema.NODE)
