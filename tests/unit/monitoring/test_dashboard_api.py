"""The dashboard (#1, #2), the node list (#136), current_perf (#137) and the bad-input answers."""
from __future__ import annotations

from pathlib import Path

import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families

from kvmdesk import hookimpl
from kvmdesk.core.plugins import make_plugin_manager
from tests.unit.monitoring.monitoring_testlib import (GIB, add_node, advance, heartbeat, make_clock, monitor,
                                                      monitoring_api)

TOP = "/index/get_top_data/"
STATS = "/index/get_resource_statistic/"
PERF = "/monitor_mgr/node/current_perf/"
HISTORY = "/monitor_mgr/node/history/"


@pytest_twisted.ensureDeferred
async def test_top_five_orders_by_value_then_name_and_leaves_out_silent_nodes(tmp_path: Path):
    clock = make_clock()
    async with monitoring_api(tmp_path, clock) as api:
        # cpu: two ties (50: "b" before "d"; 30: "a" before "f"), one node below the five, one silent.
        cpus = {"a": 30.0, "b": 50.0, "c": 70.0, "d": 50.0, "e": 10.0, "f": 30.0}
        nodes = {name: await add_node(api, name, f"10.0.0.{i + 1}") for i, name in enumerate(sorted(cpus))}
        await add_node(api, "silent", "10.0.0.99")
        for step in range(3):
            await advance(api, 5)
            for name, node in nodes.items():
                # Traffic on the management NIC rises each round: average and peak differ.
                heartbeat(api, node, cpu=cpus[name], mem=100 - cpus[name], recv=1000.0 * (step + 1),
                          sent=float(ord(name[0])))
        status, body = await api.call("POST", TOP, {"statis_period": 15})
        assert status == 200, body
        data = body["data"]
        assert data["utc"] == int(clock.seconds())
        assert data["cpu_util"] == [["c", "70.00"], ["b", "50.00"], ["d", "50.00"], ["a", "30.00"], ["f", "30.00"]]
        assert data["memory_util"] == [["e", "90.00"], ["a", "70.00"], ["f", "70.00"], ["b", "50.00"], ["d", "50.00"]]
        # Same disk use everywhere (two filesystems of 100 GiB, 10 GiB used each): ordered by name.
        assert data["disk_util"] == [[n, "10.00", 200 * GIB, 20 * GIB] for n in ["a", "b", "c", "d", "e"]]
        # recv 1000, 2000, 3000 plus sent ord(name): average 2000 + sent, peak 3000 + sent.
        assert data["nic_util"][0] == ["f", 2000 + ord("f"), 3000 + ord("f")]
        assert [row[0] for row in data["nic_util"]] == ["f", "e", "d", "c", "b"]
        # A 5-second period holds the last round only.
        status, body = await api.call("POST", TOP, {"statis_period": 5})
        assert body["data"]["nic_util"][0] == ["f", 3000 + ord("f"), 3000 + ord("f")]
        # Long after the last heartbeat nothing is ranked.
        await advance(api, 60)
        status, body = await api.call("POST", TOP, {"statis_period": 15})
        assert body["data"]["cpu_util"] == [] and body["data"]["nic_util"] == []
        for bad in (1, 60, 0):
            status, body = await api.call("POST", TOP, {"statis_period": bad})
            assert status == 400 and body["code"] == 8001 and "statis_period" in body["msg"]
        status, body = await api.call("POST", TOP, {})
        assert status == 400 and body["code"] == 1002 and body["data"][0]["field"] == "statis_period"


class Terminals:
    """A plugin that counts terminals (none exists yet in the product)."""

    @hookimpl
    def kvmdesk_resource_counts(self, core):
        return {"sum_terminal_cnt": 4, "online_terminal_cnt": 3}


@pytest_twisted.ensureDeferred
async def test_statistics_count_nodes_instances_terminals_pools_and_licence(tmp_path: Path):
    clock = make_clock()
    plugins = make_plugin_manager(load_entry_points=True)
    plugins.register(Terminals(), name="terminals-test")
    async with monitoring_api(tmp_path, clock, plugins=plugins) as api:
        store = api.core.store
        base_nodes = await store.collection("nodes").count()
        base_online = await store.collection("nodes").count({"state": {"$in": ["online", "warning"]}})
        pools = await store.collection("resource_pools").count()
        up = await add_node(api, "up", "10.0.0.1")
        warn = await add_node(api, "warn", "10.0.0.2", state="warning")
        await add_node(api, "down", "10.0.0.3", state="offline", hypervisor={"domains_total": 7, "domains_running": 0})
        await advance(api, 5)
        heartbeat(api, up, cpu=1.0)   # 3 domains, 2 running (the heartbeat's summary)
        heartbeat(api, warn, cpu=1.0)
        status, body = await api.call("GET", STATS)
        assert status == 200, body
        assert body["data"] == {
            "online_node_cnt": base_online + 2, "sum_node_cnt": base_nodes + 3,
            "online_instance_cnt": 4, "sum_instance_cnt": 3 + 3 + 7,
            "online_terminal_cnt": 3, "sum_terminal_cnt": 4,
            "resource_pool_cnt": pools, "alarm_node_cnt": 0, "alarm_records_cnt": 0,
            "license_status": 1, "trial_days": 0, "license_terminal_cnt": 0,
        }


@pytest_twisted.ensureDeferred
async def test_node_list_current_perf_and_bad_input(tmp_path: Path):
    clock = make_clock()
    async with monitoring_api(tmp_path, clock, raw_seconds=120) as api:
        node = await add_node(api, "n1", "10.0.0.1")
        other = await add_node(api, "n2", "10.0.0.2", state="offline")
        status, body = await api.call("GET", "/monitor_mgr/nodes/", params={"searchtype": "all", "ip": "10.0.0.1"})
        assert status == 200 and body["data"]["count"] == 1
        assert body["data"]["results"][0] == {
            "name": "n1", "uuid": node["uuid"], "hostname": "host-10.0.0.1", "ip": "10.0.0.1", "status": "active",
            "type": 5, "created_at": node["created_at"]}
        status, body = await api.call("GET", "/monitor_mgr/nodes", params={"searchtype": "single", "uuid": other["uuid"]})
        assert body["data"]["status"] == "error"

        for cpu in (10.0, 20.0, 60.0):
            await advance(api, 5)
            heartbeat(api, node, cpu=cpu)
        status, body = await api.call("POST", PERF, {"statis_period": 10, "node_uuid": node["uuid"],
                                                     "is_all_nodes": False})
        assert status == 200, body
        [view] = body["data"]
        assert view["node_uuid"] == node["uuid"] and view["node_name"] == "n1" and len(view["time"]) == 2
        assert view["cpu_util"] == 40.0 and view["memory_util"] == {"percent": 40.0, "used": 4 * GIB}
        assert view["disk_io_util"] == {"sda": {"read_bytes_avg": 100, "write_bytes_avg": 2000}}
        assert view["nic_util"]["eth0"] == {"ip": "10.0.0.1", "read_bytes_avg": 1000, "write_bytes_avg": 500}
        assert view["nic_util"]["eth9"]["ip"] == ""
        assert view["process_list"] == [] and view["server_time"]
        status, body = await api.call("POST", PERF, {"statis_period": 60, "is_all_nodes": True})
        views = {v["node_name"]: v for v in body["data"]}
        assert views["n1"]["cpu_util"] == 30.0 and views["n2"]["cpu_util"] is None and views["n2"]["time"] == []

        bad = [
            ({"statis_period": 121, "node_uuid": node["uuid"]}, 8002, "statis_period"),
            ({"statis_period": 0, "node_uuid": node["uuid"]}, 8001, "statis_period"),
            ({"statis_period": 5, "node_uuid": "nope"}, 8000, "node_uuid"),
            ({"statis_period": 5}, 8000, "node_uuid"),
            ({"statis_period": "5", "node_uuid": node["uuid"]}, 1002, "statis_period"),
        ]
        for request, code, field in bad:
            status, body = await api.call("POST", PERF, request)
            assert (status // 100, body["code"]) == (4, code) and field in body["msg"], (request, body)

        uuid = node["uuid"]
        bad_history = [
            ({"node_uuid": uuid, "statis_hours": 0}, 8001, "statis_hours"),
            ({"node_uuid": uuid, "statis_hours": 30 * 24 + 1}, 8001, "statis_hours"),
            ({"node_uuid": uuid, "statis_hours": 1, "step_minutes": 7}, 8003, "step_minutes"),
            ({"node_uuid": uuid, "statis_hours": 1, "step_minutes": 61}, 8001, "step_minutes"),
            ({"node_uuid": uuid, "statis_hours": 48, "step_minutes": 1}, 8003, "step_minutes"),
            ({"node_uuid": "nope", "statis_hours": 1}, 8000, "node_uuid"),
            ({"statis_hours": 1}, 1002, "node_uuid"),
        ]
        for params, code, field in bad_history:
            for how in ("query", "json"):
                kwargs = {"params": {k: str(v) for k, v in params.items()}} if how == "query" else {"json": params}
                status, body = await api.call("GET", HISTORY, **kwargs)
                assert (status // 100, body["code"]) == (4, code) and field in body["msg"], (params, how, body)
        status, body = await api.call("GET", HISTORY, params={"node_uuid": uuid, "statis_hours": "x"})
        assert status == 400 and body["code"] == 1002 and "statis_hours" in body["msg"]
        status, body = await api.call("GET", HISTORY, params={"node_uuid": uuid, "statis_hours": "1", "hours": "2"})
        assert status == 400 and "hours" in body["msg"]
        status, body = await api.call("GET", HISTORY, params={"node_uuid": uuid, "statis_hours": 48, "step_minutes": 2})
        assert status == 200 and len(body["data"]["time"]) == 1440


@pytest_twisted.ensureDeferred
async def test_prometheus_export_needs_a_token_and_parses(tmp_path: Path):
    clock = make_clock()
    async with monitoring_api(tmp_path, clock) as api:
        node = await add_node(api, 'quote"and\\slash', "10.0.0.1")
        await add_node(api, "down", "10.0.0.2", state="offline")
        await advance(api, 5)
        heartbeat(api, node, cpu=12.5)
        status, body = await api.call("GET", "/monitor_mgr/metrics", auth=False)
        assert status == 401
        response = await api.raw("GET", "/monitor_mgr/metrics")
        assert response.code == 200
        assert response.headers.getRawHeaders(b"content-type")[0].startswith(b"text/plain; version=0.0.4")
        text = (await response.content()).decode()
        assert "# HELP kvmdesk_node_cpu_percent" in text and "# TYPE kvmdesk_node_cpu_percent gauge" in text
        families = {f.name: f for f in text_string_to_metric_families(text)}
        [cpu] = families["kvmdesk_node_cpu_percent"].samples
        assert cpu.value == 12.5 and cpu.labels["name"] == 'quote"and\\slash' and cpu.labels["node"] == node["uuid"]
        up = {s.labels["name"]: s.value for s in families["kvmdesk_node_up"].samples}
        assert up['quote"and\\slash'] == 1.0 and up["down"] == 0.0
        nics = {(s.labels["nic"], s.labels["management"]): s.value
                for s in families["kvmdesk_node_network_receive_bytes_per_second"].samples}
        assert nics == {("eth0", "true"): 1000.0, ("eth9", "false"): 7.0}
        assert families["kvmdesk_node_storage_used_percent"].samples[0].value == 10.0
        assert monitor(api).buffer.latest(node["uuid"], clock.seconds()) is not None
