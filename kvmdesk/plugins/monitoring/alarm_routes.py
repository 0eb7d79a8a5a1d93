"""Alarm rules and records through the API (beyond the contract, which has no alarm endpoints).

- ``GET /monitor_mgr/alarm_rules`` (paged, generic search), ``POST`` a rule, ``PUT
  /monitor_mgr/alarm_rules/{uuid}`` (any of name, threshold, duration, enabled, node_uuid),
  ``DELETE /monitor_mgr/alarm_rules`` with ``{"uuids": [...]}``;
- ``GET /monitor_mgr/alarms`` (paged, newest first; filter by ``status``, ``node_uuid``, ``metric``...).
"""
from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import Field

from kvmdesk.api.models import Model, Uuids
from kvmdesk.api.router import ApiRequest, Router
from kvmdesk.core.errors import ApiError, Resource
from kvmdesk.core.jobs import run_batch
from kvmdesk.core.paging import paged_search
from kvmdesk.core.records import new_record, now_text
from kvmdesk.plugins.monitoring import errors as codes
from kvmdesk.plugins.monitoring.alarms import ALARMS, RULES

TAGS = ("monitoring",)
RULE = Resource("告警规则", "alarm rule")
ALARM = Resource("告警记录", "alarm record")
#: The resource kind of the lifecycle hooks.
KIND = "alarm_rule"
RULE_FIELDS = {"uuid": str, "name": str, "metric": str, "enabled": bool, "node_uuid": str}
ALARM_FIELDS = {"uuid": str, "rule_uuid": str, "metric": str, "node_uuid": str, "node_name": str, "status": str}
Metric = Literal["cpu", "memory", "disk", "nic", "offline", "login_failed"]


class RuleBody(Model):
    name: str = Field(min_length=1, max_length=64)
    metric: Metric
    threshold: float = Field(ge=0)
    duration: int = Field(ge=0, le=7 * 86400)
    enabled: bool = True
    node_uuid: Optional[str] = None


class RuleChanges(Model):
    name: Optional[str] = Field(default=None, min_length=1, max_length=64)
    threshold: Optional[float] = Field(default=None, ge=0)
    duration: Optional[int] = Field(default=None, ge=0, le=7 * 86400)
    enabled: Optional[bool] = None
    node_uuid: Optional[str] = None


def register_routes(router: Router) -> None:
    @router.endpoint("GET", "/monitor_mgr/alarm_rules", summary="Alarm rules, paged", tags=TAGS,
                     search_fields=RULE_FIELDS, paged=True)
    async def list_rules(req: ApiRequest) -> Any:
        return await paged_search(req, req.core.store.collection(RULES), RULE_FIELDS, sort=(("id", 1),),
                                  resource=RULE)

    @router.endpoint("POST", "/monitor_mgr/alarm_rules", summary="Create an alarm rule", tags=TAGS, body=RuleBody,
                     oplog="新增告警规则")
    async def create_rule(req: ApiRequest) -> dict:
        rule = new_record(req.core.clock, **req.body.model_dump())
        req.oplog_detail = rule["name"]
        created = await req.core.store.collection(RULES).insert_one(rule)
        await req.core.created(KIND, created)
        return created

    @router.endpoint("PUT", "/monitor_mgr/alarm_rules/{uuid}", summary="Change an alarm rule", tags=TAGS,
                     body=RuleChanges, oplog="修改告警规则")
    async def update_rule(req: ApiRequest) -> dict:
        changes = req.body.model_dump(exclude_unset=True)
        changes["updated_at"] = now_text(req.core.clock)
        updated = await req.core.store.collection(RULES).find_one_and_update({"uuid": req.path["uuid"]},
                                                                             {"$set": changes})
        if updated is None:
            raise ApiError(codes.RULE_UNKNOWN, uuid=req.path["uuid"])
        req.oplog_detail = updated["name"]
        await req.core.updated(KIND, updated, changes)
        return updated

    @router.endpoint("DELETE", "/monitor_mgr/alarm_rules", summary="Delete alarm rules (batch)", tags=TAGS,
                     body=Uuids, oplog="删除告警规则")
    async def delete_rules(req: ApiRequest) -> Any:
        rules = req.core.store.collection(RULES)

        async def delete(uuid: str) -> None:
            rule = await rules.find_one({"uuid": uuid})
            if rule is None or not await rules.delete_one({"uuid": uuid}):
                raise ApiError(codes.RULE_UNKNOWN, uuid=uuid)
            await req.core.deleted(KIND, rule)

        return await run_batch(req, req.body.uuids, delete)

    @router.endpoint("GET", "/monitor_mgr/alarms", summary="Alarm records, newest first, paged", tags=TAGS,
                     search_fields=ALARM_FIELDS, paged=True)
    async def list_alarms(req: ApiRequest) -> Any:
        return await paged_search(req, req.core.store.collection(ALARMS), ALARM_FIELDS, resource=ALARM)
