"""The desktop users' way in (``/api/v1.0/portal``): login with the user's own name and password, the
desktops they may use, a desktop for them (started if off, with its console), logout.

These endpoints take the *desktop user's* token (from ``POST /portal/login``), checked here by
:mod:`.portal_auth`; the router's administrator check is off for them (``auth=False``), and an
administrator's token is refused (401) like any unknown token.  Operations of desktop users are not
written to the administrators' operation log.
"""
from __future__ import annotations

from typing import Annotated, Any, Optional

from pydantic import StringConstraints

from kvmdesk.api.models import Model, Name
from kvmdesk.api.router import ApiRequest, Router
from kvmdesk.core.errors import ApiError
from kvmdesk.plugins.desktops.broker import EXTENSION as BROKER
from kvmdesk.plugins.desktops.broker import desktop_view
from kvmdesk.plugins.desktops.codes import CONSOLE_MISSING
from kvmdesk.plugins.desktops.instances import console_module
from kvmdesk.plugins.desktops.portal_auth import EXTENSION as AUTH

BASE = "/portal"
TAGS = ("desktop_user_portal",)
USER_TOKEN = " (desktop user's token from /portal/login)"


class PortalLogin(Model):
    user_name: Name
    password: Annotated[str, StringConstraints(min_length=1, max_length=256)]


class PortalConnect(Model):
    """``desktop_uuid``: the personal desktop group to take a desktop from (any of the user's if absent)."""

    desktop_uuid: Optional[Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=64)]] = None


async def desktop_user(req: ApiRequest) -> dict:
    """The desktop user of this request (401 without a valid user token)."""
    return await req.core.extensions[AUTH].authenticate(req.http.getHeader(b"authorization"))


async def login(req: ApiRequest) -> dict:
    body: PortalLogin = req.body
    return await req.core.extensions[AUTH].login(body.user_name, body.password, req.client_ip)


async def logout(req: ApiRequest) -> dict:
    user = await desktop_user(req)
    return {"released": await req.core.extensions[BROKER].logout(user)}


async def desktops(req: ApiRequest) -> dict:
    user = await desktop_user(req)
    return {"user_name": user["user_name"], **await req.core.extensions[BROKER].available(user)}


async def connect(req: ApiRequest) -> dict:
    """A running desktop for the user, with its console: ``{"instance", "websockify_url"}``.

    ``websockify_url`` is ``null`` (and ``console_error`` says why) where this controller has no
    console relay: the desktop is still theirs.
    """
    user = await desktop_user(req)
    body: PortalConnect = req.body
    desktop = await req.core.extensions[BROKER].assign(user, body.desktop_uuid)
    answer: dict[str, Any] = {"instance": desktop_view(desktop), "websockify_url": None}
    console = console_module()
    if console is None:
        answer["console_error"] = ApiError(CONSOLE_MISSING).message(req.lang)
        return answer
    token = await console.issue(req.core, desktop["node"], desktop["uuid"], "user", user["uuid"])
    answer["websockify_url"] = console.console_url(req, token)
    return answer


def register_routes(router: Router) -> None:
    router.endpoint("POST", BASE + "/login", summary="Desktop user login (own user name and password); a user token",
                    body=PortalLogin, auth=False, tags=TAGS, oplog="")(login)
    router.endpoint("POST", BASE + "/logout", summary="Desktop user logout: ends the session, frees its random desktop"
                    + USER_TOKEN, auth=False, tags=TAGS, oplog="")(logout)
    router.endpoint("GET", BASE + "/desktops", summary="The desktops the user may use: static ones, random groups"
                    + USER_TOKEN, auth=False, tags=TAGS)(desktops)
    router.endpoint("POST", BASE + "/connect", summary="A desktop for the user (claimed atomically, started if off) and "
                    "its console URL" + USER_TOKEN, body=PortalConnect, auth=False, tags=TAGS, oplog="")(connect)
