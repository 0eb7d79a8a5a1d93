"""A minimal third-party kvmdesk plugin, written only against kvmdesk's public plugin API.

It adds

- a service, :class:`TickService`: an attrs ``Service`` with an injected clock that counts ticks
  (the shape every watcher of the controller has: a round per interval, a failed round is logged
  and the loop goes on, ``stopService`` cancels the pending call);
- ``GET /api/v1.0/example/ticks``: the service's state;
- ``POST /api/v1.0/example/counter``: an ``{"action", "param"}`` endpoint dispatched on a table
  (``add`` with ``{"x": int}``, ``reset`` without parameters);
- its own error code (9001, in the third-party range) and configuration defaults (``[example]``).

A real third-party package declares it as an entry point of the ``kvmdesk.plugins`` group (see
``pyproject.toml`` beside this file); the tests register the module on the plugin manager instead.
"""
from __future__ import annotations

from typing import Any, Optional

import attrs
from pydantic import Field
from twisted.application.service import Service
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from kvmdesk import hookimpl
from kvmdesk.api.models import Model
from kvmdesk.api.router import Action, ApiRequest, Router
from kvmdesk.core.errors import ApiError, define

log = Logger(namespace="kvmdesk_example")

#: Key of the running service in ``core.extensions``.
EXTENSION = "example"

COUNTER_TOO_BIG = define(9001, 409, "计数器超过上限 {limit}", "the counter would exceed {limit}")


@attrs.define(eq=False, slots=False)
class TickService(Service):
    """Counts one tick every ``interval`` seconds of ``clock``.

    :param clock: the time source (``core.clock``: the reactor, or a ``Clock`` in tests).
    :param interval: seconds between ticks.
    """

    clock: IReactorTime
    interval: float = 1.0
    ticks: int = 0
    _call: Optional[IDelayedCall] = attrs.field(default=None, init=False, repr=False)

    def startService(self) -> None:
        super().startService()
        self._schedule()

    def stopService(self) -> None:
        super().stopService()
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _schedule(self) -> None:
        self._call = self.clock.callLater(self.interval, self._tick)

    def _tick(self) -> None:
        self._call = None
        try:
            self.ticks += 1
        except Exception:  # pragma: no cover - a failed round must not end the loop
            log.failure("tick failed")
        if self.running:
            self._schedule()


class AddParam(Model):
    x: int = Field(ge=1)


@hookimpl
def kvmdesk_config_defaults() -> dict[str, Any]:
    return {"example": {"interval": 5.0, "limit": 100}}


@hookimpl
def kvmdesk_services(core: Any) -> list[TickService]:
    service = TickService(clock=core.clock, interval=float(core.config.get("example.interval")))
    service.setName("example-ticks")
    core.extensions[EXTENSION] = service
    return [service]


@hookimpl
def kvmdesk_routes(router: Router, core: Any) -> None:
    state = {"counter": 0}
    limit = int(core.config.get("example.limit"))

    @router.endpoint("GET", "/example/ticks", summary="Ticks counted by the example service", tags=("example",))
    async def ticks(req: ApiRequest) -> dict:
        service = req.core.extensions.get(EXTENSION)
        return {"ticks": service.ticks if service else 0, "running": bool(service and service.running)}

    async def add(req: ApiRequest) -> dict:
        if state["counter"] + req.body.x > limit:
            raise ApiError(COUNTER_TOO_BIG, limit=limit)
        state["counter"] += req.body.x
        return {"counter": state["counter"]}

    async def reset(req: ApiRequest) -> dict:
        state["counter"] = 0
        return {"counter": 0}

    router.actions(
        "/example/counter",
        {
            "add": Action(add, "Add x to the counter", AddParam, oplog="计数器增加"),
            "reset": Action(reset, "Reset the counter", oplog="计数器清零"),
        },
        tags=("example",),
        summary="Example counter actions",
    )
