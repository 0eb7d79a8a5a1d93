"""``/monitor_mgr``: the node list (#136), current performance (#137) and history (#138)."""
from __future__ import annotations

import functools
import time
from typing import Any, Mapping, Optional

import orjson
from pydantic import Field
from twisted.internet import defer
from twisted.logger import Logger

from kvmdesk.api.models import Model, validate
from kvmdesk.api.router import ApiRequest, Router
from kvmdesk.core import errors
from kvmdesk.core.errors import ApiError, Resource
from kvmdesk.core.paging import paged_search
from kvmdesk.core.records import format_time
from kvmdesk.nodeaccess.client import AgentError
from kvmdesk.plugins.monitoring import errors as codes
from kvmdesk.plugins.monitoring.alarms import NODES
from kvmdesk.plugins.monitoring.monitor import EXTENSION, Monitor
from kvmdesk.plugins.monitoring.columns import series
from kvmdesk.plugins.monitoring.samples import mean_rates, nic_addresses, weighted_mean

log = Logger(namespace="kvmdesk.monitoring")

TAGS = ("monitoring",)
NODE = Resource("节点", "node")
NODE_FIELDS = {"uuid": str, "name": str, "hostname": str, "ip": str, "type": int}
#: The node list shows the watcher's state as text.
STATUS_TEXT = {"online": "active", "warning": "warning", "offline": "error"}


def monitor_of(req: ApiRequest) -> Monitor:
    return req.core.extensions[EXTENSION]


class CurrentPerfBody(Model):
    statis_period: int
    node_uuid: Optional[str] = None
    is_all_nodes: bool = False


class HistoryParams(Model):
    node_uuid: str
    statis_hours: int
    step_minutes: int = 1


class HistoryQuery(Model):
    """#138's query string as documented; the same fields may come in a JSON body instead (the
    document shows both), so none is required here: the handler says which one is missing."""

    node_uuid: Optional[str] = Field(default=None, description="required, here or in a JSON body")
    statis_hours: Optional[int] = Field(default=None, description="required, here or in a JSON body")
    step_minutes: Optional[int] = Field(default=None, description="minutes per step (1 by default)")


def node_view(node: Mapping[str, Any]) -> dict[str, Any]:
    """#136's fields of a node record."""
    return {
        "name": node.get("name"),
        "uuid": node["uuid"],
        "hostname": node.get("hostname") or (node.get("facts") or {}).get("hostname"),
        "ip": node.get("ip"),
        "status": STATUS_TEXT.get(node.get("state") or "", "error"),
        "type": node.get("type"),
        "created_at": node.get("created_at"),
    }


async def find_node(req: ApiRequest, uuid: Optional[str]) -> dict[str, Any]:
    node = await req.core.store.collection(NODES).find_one({"uuid": uuid}) if uuid else None
    if node is None:
        raise ApiError(codes.NODE_UNKNOWN, field="node_uuid", uuid=uuid)
    return node


def process_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """An agent's process entry as the contract shows it."""
    return {"pid": row.get("pid"), "user": row.get("user"), "cpu": round(float(row.get("cpu_percent") or 0.0), 2),
            "mem": round(float(row.get("memory_percent") or 0.0), 2), "time": row.get("start_time"),
            "command": row.get("command")}


async def processes(req: ApiRequest, node: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The node's busiest processes, asked of its agent now (``[]`` when it cannot answer).

    The answer is a sample like a heartbeat's (it moves the agent's baseline), so it joins the buffer.
    """
    agents = req.core.extensions.get("agents")
    if agents is None or not node.get("agent_secret") or node.get("state") == "offline":
        return []
    monitor = monitor_of(req)
    try:
        metrics = await agents.call(node, "GET", "/metrics", timeout=monitor.settings.process_timeout)
    except AgentError as exc:  # an unreachable node still gets its figures, without processes
        log.info("no process list from node {ip}: {why}", ip=node.get("ip"), why=exc)
        return []
    monitor.receive({k: v for k, v in node.items() if k != "agent_secret"},
                    {"at": req.core.clock.seconds(), "metrics": metrics})
    return [process_row(row) for row in metrics.get("processes") or []]


def current_view(monitor: Monitor, node: Mapping[str, Any], now: float, period: int) -> dict[str, Any]:
    """#137's figures of one node over the last ``period`` seconds (without the process list)."""
    samples = monitor.buffer.window(node["uuid"], now, period)
    known = monitor.buffer.nodes.get(node["uuid"])
    cpu = weighted_mean(samples, lambda s: s.cpu)
    percent = weighted_mean(samples, lambda s: s.mem_percent)
    used = weighted_mean(samples, lambda s: s.mem_used)
    addresses = nic_addresses(known.facts if known else node.get("facts") or {})
    return {
        "node_name": node.get("name"),
        "node_uuid": node["uuid"],
        "time": [format_time(s.at) for s in samples],
        "cpu_util": None if cpu is None else round(cpu, 2),
        "memory_util": {"percent": None if percent is None else round(percent, 2),
                        "used": None if used is None else int(round(used))},
        "disk_io_util": {name: {"read_bytes_avg": _int(r), "write_bytes_avg": _int(w)}
                         for name, (r, w) in mean_rates(samples, "disks").items()},
        "nic_util": {name: {"ip": addresses.get(name, ""), "read_bytes_avg": _int(r), "write_bytes_avg": _int(w)}
                     for name, (r, w) in mean_rates(samples, "nics").items()},
        "process_list": [],
        "server_time": format_time(now),
    }


def _int(value: Optional[float]) -> Optional[int]:
    return None if value is None else int(round(value))


def history_params(req: ApiRequest) -> HistoryParams:
    """#138's parameters from the query string, or from a JSON body (the document shows both)."""
    raw = req.http.content.read() if req.http.content is not None else b""
    if raw.strip():
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise ApiError(errors.INVALID_JSON, reason=str(exc)) from None
        if not isinstance(data, dict):
            raise ApiError(errors.INVALID_PARAM, field="body", reason="expected a JSON object")
    else:
        data = {}
    for name in ("node_uuid", "statis_hours", "step_minutes"):
        if name in req.args and name not in data:
            value = req.args[name]
            if name != "node_uuid":
                try:
                    value = int(value)
                except ValueError:
                    raise ApiError(errors.INVALID_PARAM, field=name, reason="expected an integer") from None
            data[name] = value
    unknown = sorted(set(req.args) - {"node_uuid", "statis_hours", "step_minutes"})
    if unknown:
        raise ApiError(errors.INVALID_PARAM, field=unknown[0], reason="unknown parameter")
    for name in ("node_uuid", "statis_hours"):
        if data.get(name) is None:
            raise ApiError(errors.INVALID_PARAM, field=name, reason="required, in the query string or a JSON body")
    return validate(HistoryParams, data)


def check_history(params: HistoryParams, monitor: Monitor) -> int:
    """Refuse ranges the store cannot answer; return the number of points."""
    max_hours = int(monitor.settings.retention_days * 24)
    if not 1 <= params.statis_hours <= max_hours:
        raise ApiError(codes.OUT_OF_RANGE, field="statis_hours", reason=f"from 1 to {max_hours} (the retention)")
    minutes = params.statis_hours * 60
    if not 1 <= params.step_minutes <= minutes:
        raise ApiError(codes.OUT_OF_RANGE, field="step_minutes", reason=f"from 1 to {minutes} (statis_hours * 60)")
    if minutes % params.step_minutes:
        raise ApiError(codes.STEP_MISMATCH, field="step_minutes",
                       reason=f"must divide statis_hours * 60 = {minutes} into whole steps")
    points = minutes // params.step_minutes
    if points > monitor.settings.max_history_points:
        least = -(-minutes // monitor.settings.max_history_points)
        raise ApiError(codes.STEP_MISMATCH, field="step_minutes",
                       reason=f"{points} points is more than {monitor.settings.max_history_points}; "
                              f"use a step of at least {least} minutes")
    return points


async def history(monitor: Monitor, node_uuid: str, now: float, points: int, step_minutes: int) -> dict[str, Any]:
    """The aligned axis: ``points`` whole steps (multiples of the step since the epoch) ending with the
    last completed one; a step without any data is ``null``."""
    step = step_minutes * 60
    last = int(now // step * step) - step
    first = last - (points - 1) * step
    minutes = points * step_minutes
    columns = await monitor.rollups.columns(node_uuid, first, minutes)
    answer = series(columns, minutes, step_minutes)
    answer["node_uuid"] = node_uuid
    answer["time"] = axis_times(first, step, points)
    return answer


#: "MM:SS" of every second of an hour.
_MINUTE_SECOND = [f"{second // 60:02d}:{second % 60:02d}" for second in range(3600)]


@functools.lru_cache(maxsize=32)
def _axis(first: int, step: int, points: int, zone: tuple[str, str]) -> tuple[str, ...]:
    """``format_time`` of each step's start.  When the whole axis has one UTC offset (no daylight-saving
    change inside it), each local hour's "YYYY-MM-DD HH:" is formatted once and the rest looked up
    (1,440 ``strftime`` calls were a third of a day's answer).  Cached: every request of the same
    minute and range shares its axis."""
    if not points:
        return ()
    last = first + (points - 1) * step
    start, end = time.localtime(first), time.localtime(last)
    if start.tm_gmtoff != end.tm_gmtoff:
        return tuple(format_time(t) for t in range(first, last + 1, step))
    offset = start.tm_gmtoff
    prefixes: dict[int, str] = {}
    axis = []
    for t in range(first + offset, last + offset + 1, step):
        hour = t // 3600
        prefix = prefixes.get(hour)
        if prefix is None:
            prefix = prefixes[hour] = time.strftime("%Y-%m-%d %H:", time.gmtime(hour * 3600))
        axis.append(prefix + _MINUTE_SECOND[t % 3600])
    return tuple(axis)


#: Forget the cached axes (the benchmark's cold requests).
clear_axis_cache = _axis.cache_clear


def axis_times(first: int, step: int, points: int) -> list[str]:
    """The history axis: ``points`` times ``step`` seconds apart from ``first``, as ``format_time``."""
    return list(_axis(first, step, points, time.tzname))  # the zone: a cached axis is in the local time it was made


def register_routes(router: Router) -> None:
    @router.endpoint("GET", "/monitor_mgr/nodes/", summary="Server nodes (monitoring), paged", tags=TAGS,
                     search_fields=NODE_FIELDS, paged=True)
    async def list_nodes(req: ApiRequest) -> Any:
        async def decorate(nodes: list[dict]) -> list[dict]:
            return [node_view(n) for n in nodes]

        return await paged_search(req, req.core.store.collection(NODES), NODE_FIELDS, sort=(("id", 1),),
                                  decorate=decorate, resource=NODE)

    @router.endpoint("POST", "/monitor_mgr/node/current_perf/", tags=TAGS, body=CurrentPerfBody, oplog="",
                     summary="Current performance of one or all nodes over statis_period seconds, with processes")
    async def current_perf(req: ApiRequest) -> list:
        monitor, body = monitor_of(req), req.body
        if not 1 <= body.statis_period <= monitor.settings.raw_seconds:
            if body.statis_period > monitor.settings.raw_seconds:
                raise ApiError(codes.PERIOD_TOO_LONG, field="statis_period", seconds=int(monitor.settings.raw_seconds))
            raise ApiError(codes.OUT_OF_RANGE, field="statis_period", reason="at least 1 second")
        if body.is_all_nodes:
            nodes = await req.core.store.collection(NODES).find({}, sort=[("id", 1)])
        else:
            nodes = [await find_node(req, body.node_uuid)]
        lists = await _gather([processes(req, node) for node in nodes])
        now = req.core.clock.seconds()
        answer = []
        for node, found in zip(nodes, lists):
            view = current_view(monitor, node, now, body.statis_period)
            view["process_list"] = found
            answer.append(view)
        return answer

    async def node_history(req: ApiRequest) -> dict:
        monitor = monitor_of(req)
        params = history_params(req)
        points = check_history(params, monitor)
        if params.node_uuid not in monitor.known_nodes:
            await find_node(req, params.node_uuid)
            monitor.known_nodes.add(params.node_uuid)
        return await history(monitor, params.node_uuid, req.core.clock.seconds(), points, params.step_minutes)

    for path in ("/monitor_mgr/node/history/", "/monitor_mgr/node/history_perf/"):
        router.endpoint("GET", path, tags=TAGS, query=HistoryQuery,
                        summary="History of a node: statis_hours at a step of step_minutes "
                                "(query string or JSON body)")(node_history)


async def _gather(coroutines: list) -> list:
    return await defer.gatherResults([defer.ensureDeferred(c) for c in coroutines])
