"""Teaching desktops: start, stop, reboot, add, delete (batches), console, paged query (contract #92-#98)."""
from __future__ import annotations

from typing import Any

from kvmdesk.api.router import Action, ApiRequest, Router
from kvmdesk.core import errors
from kvmdesk.core.errors import ApiError
from kvmdesk.core.paging import paged_search
from kvmdesk.core.records import now_text
from kvmdesk.plugins.desktops import codes, creation, power, schema
from kvmdesk.plugins.desktops.desktop_groups import check_subnet, usable_group
from kvmdesk.plugins.desktops.lookups import NAMES, record_or_404
from kvmdesk.plugins.desktops.models import ConsoleParam, DesktopsAdd, DesktopsDelete, DesktopsParam

BASE = "/education/instance"
TAGS = ("teaching_desktops",)
DESKTOP = NAMES[schema.DESKTOPS]
SEARCH_FIELDS = {"uuid": str, "name": str, "desktop_uuid": str, "ipaddr": str, "hostname": str, "status": str,
                 "user_name": str}
#: What the API shows of a desktop (secrets such as the VNC password stay inside).
PUBLIC = ("uuid", "name", "ipaddr", "hostname", "host_name", "status", "up_time", "active_time", "message", "user_name",
          "desktop_uuid", "node_ip", "mac", "template_version", "created_at", "updated_at")


def public(core: Any, desktop: dict) -> dict:
    """The contract's view: ``active_time`` is the seconds since ``up_time`` while the desktop runs."""
    started = desktop.get("up_at")
    seconds = max(0, int(core.clock.seconds() - started)) if desktop.get("status") == "active" and started is not None else 0
    shown = {**desktop, "host_name": desktop.get("hostname"),
             "active_time": seconds}
    return {k: shown.get(k) for k in PUBLIC}


async def on_members(req: ApiRequest, group: dict, refs: list, operation: str) -> dict:
    """``operation`` on the named desktops of ``group``, as a job: each one's result (a desktop of
    another group or an unknown one is a failure), the others going on; starts queue per node in the
    admission control, so they all go at once."""
    wanted = list({r.uuid: {"uuid": r.uuid, "name": r.name} for r in refs}.values())
    req.oplog_detail = f"{group['name']}: " + ", ".join(str(r["name"] or r["uuid"]) for r in wanted[:10])
    found = {d["uuid"]: d for d in await req.core.store.collection(schema.DESKTOPS).find(
        {"uuid": {"$in": [r["uuid"] for r in wanted]}})}
    ctx = await power.Context.load(req.core, group, sorted({d["node"] for d in found.values() if d.get("node")}))
    run = power.OPERATIONS[operation]

    async def one(ref: dict) -> None:
        desktop = found.get(ref["uuid"])
        if desktop is None:
            raise ApiError(errors.NOT_FOUND, resource=DESKTOP, key=ref["name"] or ref["uuid"])
        if desktop.get("desktop_uuid") != group["uuid"]:
            raise ApiError(codes.NOT_IN_GROUP, name=desktop["name"], group=group["name"])
        await run(ctx, desktop)

    concurrency = int(req.core.config.get("desktops.batch_concurrency", 1000))
    return await req.core.jobs.run_items(req, f"desktops.{operation}", wanted, one, concurrency=concurrency,
                                         title=f"{operation} desktops of {group['name']}")


def power_action(operation: str) -> Any:
    async def handler(req: ApiRequest) -> dict:
        body = req.body
        group = await usable_group(req, body.desktop_uuid, starting=operation in ("start", "reboot"))
        return await on_members(req, group, body.instances, operation)

    handler.__name__ = f"{operation}_desktops"
    return handler


async def add(req: ApiRequest) -> dict:
    """#94: more desktops in a group, named after its highest number so far, placed as asked."""
    body: DesktopsAdd = req.body
    core = req.core
    group = await usable_group(req, body.desktop_uuid)
    req.oplog_detail = f"{group['name']} +{body.instance_num}"
    template = await record_or_404(core, schema.TEMPLATES, group["template"])
    creation.check_template(template, group["name"])
    subnet = await check_subnet(core, group["network"], group["subnet"])
    first = creation.next_number(group)
    # Claim the numbers first, so two concurrent adds never pick the same names.
    claimed = await core.store.collection(schema.DESKTOP_GROUPS).find_one_and_update(
        {"uuid": group["uuid"], "postfix_next": group.get("postfix_next")},
        {"$set": {"postfix_next": first + body.instance_num, "updated_at": now_text(core.clock)}})
    if claimed is None:
        raise ApiError(errors.ALREADY_EXISTS, resource=GROUP_NUMBERS, key=group["name"])
    try:
        made = await creation.make_desktops(core, group, template, subnet, body.create_info, body.instance_num, first)
    except BaseException:
        # nothing was made: give the numbers back, unless another add has taken the next ones meanwhile
        await core.store.collection(schema.DESKTOP_GROUPS).update_one(
            {"uuid": group["uuid"], "postfix_next": first + body.instance_num}, {"$set": {"postfix_next": first}})
        raise
    return {"success_num": len(made), "failed_num": 0, "failures": [], "instances": [public(core, d) for d in made]}


GROUP_NUMBERS = "桌面编号 (another add is under way)"


async def delete(req: ApiRequest) -> dict:
    body: DesktopsDelete = req.body
    group = await usable_group(req, body.desktop_uuid)
    return await on_members(req, group, body.instances, "delete")


async def get_console(req: ApiRequest) -> dict:
    """#97: the websockify URL of a running desktop, with a short-lived token bound to that desktop
    (its node and domain) and to the administrator asking (:mod:`kvmdesk.core.console`)."""
    body: ConsoleParam = req.body
    desktop = await record_or_404(req.core, schema.DESKTOPS, body.uuid)
    if desktop.get("status") != "active":
        raise ApiError(codes.NO_CONSOLE, name=desktop["name"])
    console = console_module()
    if console is None:
        raise ApiError(codes.CONSOLE_MISSING)
    admin = req.admin or {}
    token = await console.issue(req.core, desktop["node"], desktop["uuid"], "admin", str(admin.get("uuid") or admin.get("username") or ""))
    return {"websockify_url": console.console_url(req, token)}


def console_module() -> Any:
    """:mod:`kvmdesk.core.console` (the console tokens), or ``None`` where this build has no console relay."""
    try:
        from kvmdesk.core import console
    except ImportError:
        return None
    return console


ACTIONS = {
    "start": Action(power_action("start"), "Start desktops (batch, admitted per node)", DesktopsParam, "教学桌面开机"),
    "stop": Action(power_action("stop"), "Stop desktops (batch)", DesktopsParam, "教学桌面关机"),
    "reboot": Action(power_action("reboot"), "Reboot desktops (batch; restore desktops come back clean)", DesktopsParam,
                     "教学桌面重启"),
    "create": Action(add, "Add desktops to a group with per-node placement", DesktopsAdd, "添加教学桌面"),
    "get_console": Action(get_console, "A desktop's console: websockify URL with a short-lived token", ConsoleParam,
                          "教学桌面获取控制台"),
}


def register_routes(router: Router) -> None:
    router.actions(BASE + "/", ACTIONS, tags=TAGS)
    router.endpoint("DELETE", BASE + "/", summary="Delete desktops (batch): a running desktop is stopped first",
                    body=DesktopsDelete, tags=TAGS, oplog="删除教学桌面")(delete)

    @router.endpoint("GET", BASE + "/", summary="Query a group's desktops, paged (IP, host, status, up time)", tags=TAGS,
                     search_fields=SEARCH_FIELDS)
    async def list_desktops(req: ApiRequest) -> Any:
        if req.args.get("desktop_uuid"):
            await record_or_404(req.core, schema.DESKTOP_GROUPS, req.args["desktop_uuid"])
        return await paged_search(req, req.core.store.collection(schema.DESKTOPS), SEARCH_FIELDS, sort=[("name", 1)],
                                  decorate=lambda ds: _shown(req.core, ds), resource=DESKTOP)


async def _shown(core: Any, desktops: list[dict]) -> list[dict]:
    return [public(core, d) for d in desktops]
