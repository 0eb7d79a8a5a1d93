"""Static desktops: which user each desktop of a static group belongs to (contract #125-#127).

- ``change_bind`` binds one desktop to one user of the group's user group explicitly; a user who had
  another desktop of the group loses that binding (one desktop per user); ``user_uuid: ""`` unbinds.
  A user of another user group is refused (400, 6515).
- ``change_group`` binds the group to a user group and matches its users to the desktops
  automatically (users by name to desktops by name, in order); every earlier binding goes.  With more
  users than desktops the first users get one and the answer lists who is left without
  (``data.unbound_users``): it is not an error, the administrator adds desktops and matches again.
- The query has one row per desktop (``bind_uuid`` empty where nobody is bound).
"""
from __future__ import annotations

from typing import Any

from kvmdesk.api.router import Action, ApiRequest, Router
from kvmdesk.core import errors
from kvmdesk.core.errors import ApiError, Resource
from kvmdesk.core.paging import paged_search
from kvmdesk.core.records import new_record, now_text
from kvmdesk.plugins.desktops import personal_codes as codes
from kvmdesk.plugins.desktops import schema
from kvmdesk.plugins.desktops.broker import EXTENSION as BROKER
from kvmdesk.plugins.desktops.personal_groups import personal_group, user_group_or_404
from kvmdesk.plugins.desktops.personal_models import ChangeBind, ChangeGroup
from kvmdesk.plugins.desktops.personal_schema import PERSONAL_GROUPS, STATIC, USERS

BASE = "/personal/desktop/static"
TAGS = ("personal_static_desktops",)
SEARCH_FIELDS = {"desktop_uuid": str, "user_name": str, "name": str}
USER = Resource("用户", "user")


async def static_group(core: Any, uuid: str, name: Any = None) -> dict:
    group = await personal_group(core, uuid, name=name)
    if group.get("desktop_type") != STATIC:
        raise ApiError(codes.NOT_STATIC, name=group["name"])
    return group


def bind_fields(core: Any, user: Any) -> dict:
    if user is None:
        return {"user_uuid": None, "user_name": "", "bind_uuid": None, "updated_at": now_text(core.clock)}
    return {"user_uuid": user["uuid"], "user_name": user["user_name"], "bind_uuid": new_record(core.clock)["uuid"],
            "updated_at": now_text(core.clock)}


async def change_bind(req: ApiRequest) -> dict:
    body: ChangeBind = req.body
    core = req.core
    desktops = core.store.collection(schema.DESKTOPS)
    desktop = await desktops.find_one({"uuid": body.instance_uuid})
    if desktop is None:
        raise ApiError(errors.NOT_FOUND, resource=codes.PERSONAL_DESKTOP, key=body.instance_name or body.instance_uuid)
    group = await static_group(core, desktop["desktop_uuid"])
    req.oplog_detail = f"{desktop['name']} -> {body.user_name or '-'}"
    if not body.user_uuid:
        await desktops.update_one({"uuid": desktop["uuid"]}, {"$set": bind_fields(core, None)})
        return {"instance_uuid": desktop["uuid"], "user_uuid": None}
    user = await core.store.collection(USERS).find_one({"uuid": body.user_uuid})
    if user is None:
        raise ApiError(errors.NOT_FOUND, resource=USER, key=body.user_name or body.user_uuid)
    if not group.get("group_uuid"):
        raise ApiError(codes.NO_USER_GROUP, name=group["name"])
    if user.get("group") != group["group_uuid"]:
        user_group = await user_group_or_404(core, group["group_uuid"])
        raise ApiError(codes.USER_OTHER_GROUP, field="user_uuid", user=user["user_name"], group=user_group["name"])
    # One desktop per user in a group: a desktop the user had here is unbound first.
    await desktops.update_many({"desktop_uuid": group["uuid"], "user_uuid": user["uuid"], "uuid": {"$ne": desktop["uuid"]}},
                               {"$set": bind_fields(core, None)})
    fields = bind_fields(core, user)
    await desktops.update_one({"uuid": desktop["uuid"]}, {"$set": fields})
    return {"instance_uuid": desktop["uuid"], "user_uuid": user["uuid"], "bind_uuid": fields["bind_uuid"]}


async def change_group(req: ApiRequest) -> dict:
    body: ChangeGroup = req.body
    core = req.core
    group = await static_group(core, body.desktop_uuid, body.desktop_name)
    req.oplog_detail = f"{group['name']} -> {body.group_name or body.group_uuid or '-'}"
    desktops = core.store.collection(schema.DESKTOPS)
    if body.group_uuid:
        user_group = await user_group_or_404(core, body.group_uuid)
        users = await core.store.collection(USERS).find({"group": user_group["uuid"]}, sort=[("user_name", 1)])
    else:
        user_group, users = None, []
    mine = await desktops.find({"desktop_uuid": group["uuid"]}, sort=[("name", 1)])
    await core.store.collection(PERSONAL_GROUPS).update_one({"uuid": group["uuid"]}, {"$set": {
        "group_uuid": user_group["uuid"] if user_group else None, "updated_at": now_text(core.clock)}})
    await desktops.update_many({"desktop_uuid": group["uuid"]}, {"$set": bind_fields(core, None)})
    pairs = list(zip(mine, users))
    for desktop, user in pairs:
        await desktops.update_one({"uuid": desktop["uuid"]}, {"$set": bind_fields(core, user)})
    core.extensions[BROKER].forget()
    left = [u["user_name"] for u in users[len(pairs):]]
    return {"bound_num": len(pairs), "unbound_users": left, "free_instances": [d["name"] for d in mine[len(pairs):]]}


async def list_bindings(req: ApiRequest) -> Any:
    """``?desktop_uuid=<group>`` lists one static group's desktops (the contract's use); like every list
    it takes the generic search, and without it lists the desktops of every static group."""
    statics = await req.core.store.collection(PERSONAL_GROUPS).find({"desktop_type": STATIC}, projection=["uuid"])

    async def rows(desktops: list[dict]) -> list[dict]:
        return [{"bind_uuid": d.get("bind_uuid") or "", "user_uuid": d.get("user_uuid") or "", "user_name": d.get("user_name") or "",
                 "instance_uuid": d["uuid"], "instance_name": d["name"], "desktop_uuid": d["desktop_uuid"]} for d in desktops]

    return await paged_search(req, req.core.store.collection(schema.DESKTOPS), SEARCH_FIELDS,
                              fixed={"desktop_uuid": {"$in": [g["uuid"] for g in statics]}}, sort=[("name", 1)],
                              decorate=rows, resource=codes.PERSONAL_DESKTOP)


ACTIONS = {
    "change_bind": Action(change_bind, "Bind a static desktop to a user of the group's user group (or unbind)", ChangeBind,
                          "修改静态桌面用户绑定"),
    "change_group": Action(change_group, "Bind a static group to a user group and match its users to the desktops; "
                           "reports who is left without one", ChangeGroup, "修改静态桌面绑定的用户组"),
}


def register_routes(router: Router) -> None:
    router.actions(BASE + "/", ACTIONS, tags=TAGS)
    router.endpoint("GET", BASE + "/", summary="Query a static group's desktop-to-user bindings, one row per desktop "
                    "(?desktop_uuid=<group>)", tags=TAGS, search_fields=SEARCH_FIELDS)(list_bindings)
