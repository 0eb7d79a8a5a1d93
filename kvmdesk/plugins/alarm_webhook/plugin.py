"""Hook implementations of the ``alarm_webhook`` plugin."""
from __future__ import annotations

from typing import Any, Mapping

import treq
from twisted.logger import Logger

from kvmdesk import hookimpl

__all__ = ["kvmdesk_alarm", "kvmdesk_config_defaults"]

log = Logger(namespace="kvmdesk.alarm_webhook")

DEFAULTS = {
    "alarm_webhook": {
        # Where alarms are posted (http or https); empty: nowhere.
        "url": "",
        # Sent as "Authorization: Bearer <token>" when not empty.
        "token": "",
        # Seconds one delivery may take.
        "timeout": 10.0,
    }
}


@hookimpl
def kvmdesk_config_defaults():
    return DEFAULTS


async def deliver(core: Any, url: str, alarm: Mapping[str, Any], event: str) -> None:
    headers = {"Content-Type": "application/json"}
    token = core.config.get("alarm_webhook.token", "")
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        response = await treq.post(url, json={"event": event, "alarm": dict(alarm)}, headers=headers,
                                   timeout=float(core.config.get("alarm_webhook.timeout", 10.0)))
        await response.content()
    except Exception as exc:
        log.warn("alarm webhook {url}: delivery failed: {why}", url=url, why=exc)
        return
    if response.code >= 300:
        log.warn("alarm webhook {url}: answered {code}", url=url, code=response.code)


@hookimpl
def kvmdesk_alarm(core: Any, alarm: Mapping[str, Any], event: str):
    url = core.config.get("alarm_webhook.url", "")
    return deliver(core, url, alarm, event) if url else None
