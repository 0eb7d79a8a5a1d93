"""Terminals (beyond the contract): announced by thin clients, counted per teaching group (#82's
``terminal_count``) and on the dashboard (#2), listed and deleted by administrators."""
from __future__ import annotations

import pytest_twisted

from kvmdesk.plugins.desktops import schema

from .conftest import EN, TEACHING, create_teaching_group, failed, make_network, ok

TERMINALS = "/education/terminal"
DASHBOARD = "/index/get_resource_statistic/"


def counts_of(groups: list[dict]) -> dict[str, int]:
    return {g["name"]: g["terminal_count"] for g in groups}


@pytest_twisted.ensureDeferred
async def test_a_terminal_announces_itself_and_is_counted_in_the_group_of_its_address(api):
    network, subnet = await make_network(api)
    room1 = await create_teaching_group(api, "room1", network, subnet, start="172.16.1.100", end="172.16.1.119")
    await create_teaching_group(api, "room2", network, subnet, start="172.16.1.120", end="172.16.1.139")
    shown = ok(*await api.call("POST", TERMINALS, {"mac": "52:54:00:AA:00:01", "ip": "172.16.1.105", "name": "seat-1"}))
    assert {k: shown[k] for k in ("mac", "ip", "name", "online", "group_uuid", "group_name")} == {
        "mac": "52:54:00:aa:00:01", "ip": "172.16.1.105", "name": "seat-1", "online": True,
        "group_uuid": room1["uuid"], "group_name": "room1"}
    assert "ip_num" not in shown
    ok(*await api.call("POST", TERMINALS, {"mac": "52:54:00:aa:00:02", "ip": "172.16.1.106"}))
    ok(*await api.call("POST", TERMINALS, {"mac": "52:54:00:aa:00:03", "ip": "172.16.1.130"}))
    unplaced = ok(*await api.call("POST", TERMINALS, {"mac": "52:54:00:aa:00:04", "ip": "192.168.9.9"}))
    assert (unplaced["name"], unplaced["group_uuid"]) == ("52:54:00:aa:00:04", None)  # no name: the MAC
    assert counts_of(ok(*await api.call("GET", TEACHING))["results"]) == {"room1": 2, "room2": 1}

    # announcing again refreshes the same record: a terminal that moved rooms is counted in the new one
    again = ok(*await api.call("POST", TERMINALS, {"mac": "52:54:00:aa:00:01", "ip": "172.16.1.125"}))
    assert (again["uuid"], again["name"], again["group_name"]) == (shown["uuid"], "seat-1", "room2")
    assert counts_of(ok(*await api.call("GET", TEACHING))["results"]) == {"room1": 1, "room2": 2}
    assert await api.core.store.collection(schema.TERMINALS).count({}) == 4

    # the count follows an edited range (it is the range that says which terminals a room has)
    ok(*await api.call("PUT", TEACHING, {"uuid": room1["uuid"], "name": "room1",
                                         "value": {"name": "room1", "start_ip": "172.16.1.100", "end_ip": "172.16.1.105"}}))
    assert counts_of(ok(*await api.call("GET", TEACHING))["results"]) == {"room1": 0, "room2": 2}


@pytest_twisted.ensureDeferred
async def test_the_list_is_paged_searchable_and_says_which_terminals_are_online(api, clock):
    network, subnet = await make_network(api)
    await create_teaching_group(api, "room1", network, subnet)
    ok(*await api.call("POST", TERMINALS, {"mac": "52:54:00:aa:00:01", "ip": "172.16.1.101", "name": "front"}))
    clock.advance(150)
    ok(*await api.call("POST", TERMINALS, {"mac": "52:54:00:aa:00:02", "ip": "172.16.1.102", "name": "back"}))
    clock.advance(60)  # the first one has been silent 210 s (> terminal_online_seconds 180), the second 60 s
    page = ok(*await api.call("GET", TERMINALS, params={"page": 1, "page_size": 1}))
    assert page["count"] == 2 and page["next"] is not None
    listed = ok(*await api.call("GET", TERMINALS))["results"]
    assert [(t["name"], t["online"], t["group_name"]) for t in listed] == [("front", False, "room1"), ("back", True, "room1")]
    found = ok(*await api.call("GET", TERMINALS, params={"searchtype": "contain", "name": "ac"}))["results"]
    assert [t["name"] for t in found] == ["back"]
    single = ok(*await api.call("GET", TERMINALS, params={"searchtype": "single", "mac": "52:54:00:aa:00:01"}))
    assert single["ip"] == "172.16.1.101"
    status, answer = await api.call("GET", TERMINALS, params={"searchtype": "single", "mac": "52:54:00:aa:00:09"}, headers=EN)
    failed(status, answer, 404, 1012)
    status, answer = await api.call("GET", TERMINALS, params={"colour": "red"})
    failed(status, answer, 400, 1003)

    stats = ok(*await api.call("GET", DASHBOARD))
    assert (stats["sum_terminal_cnt"], stats["online_terminal_cnt"]) == (2, 1)


@pytest_twisted.ensureDeferred
async def test_bad_announcements_are_refused_and_nothing_is_stored(api):
    cases = [
        ({"mac": "52:54:00:aa:00", "ip": "10.0.0.1"}, "mac"),
        ({"mac": "zz:54:00:aa:00:01", "ip": "10.0.0.1"}, "mac"),
        ({"mac": "52:54:00:aa:00:01", "ip": "10.0.0.300"}, "ip"),
        ({"mac": "52:54:00:aa:00:01", "ip": 7}, "ip"),
        ({"ip": "10.0.0.1"}, "mac"),
        ({"mac": "52:54:00:aa:00:01"}, "ip"),
        ({"mac": "52:54:00:aa:00:01", "ip": "10.0.0.1", "name": "a\x1bb"}, "name"),
        ({"mac": "52:54:00:aa:00:01", "ip": "10.0.0.1", "colour": "red"}, "colour"),
    ]
    for body, field in cases:
        status, answer = await api.call("POST", TERMINALS, body, headers=EN)
        failed(status, answer, 400, 1002, field)
    assert await api.core.store.collection(schema.TERMINALS).count({}) == 0


@pytest_twisted.ensureDeferred
async def test_delete_is_a_batch_that_reports_unknown_terminals(api):
    one = ok(*await api.call("POST", TERMINALS, {"mac": "52:54:00:aa:00:01", "ip": "10.0.0.1", "name": "one"}))
    ok(*await api.call("POST", TERMINALS, {"mac": "52:54:00:aa:00:02", "ip": "10.0.0.2", "name": "two"}))
    status, answer = await api.call("DELETE", TERMINALS, {"terminals": [{"uuid": one["uuid"], "name": "one"},
                                                                        {"uuid": "nope", "name": "ghost"}]}, headers=EN)
    result = ok(status, answer)
    assert (result["success_num"], result["failed_num"]) == (1, 1)
    assert [(f["uuid"], f["code"]) for f in result["failures"]] == [("nope", 1012)]
    status, answer = await api.call("DELETE", TERMINALS, {"terminals": [{"uuid": "nope", "name": "ghost"}]}, headers=EN)
    failed(status, answer, 404, 1012, "terminal", "nope")  # a batch of one answers its error
    assert [t["name"] for t in ok(*await api.call("GET", TERMINALS))["results"]] == ["two"]
    status, answer = await api.call("DELETE", TERMINALS, {"terminals": []}, headers=EN)
    failed(status, answer, 400, 1002, "terminals")
    stats = ok(*await api.call("GET", DASHBOARD))
    assert stats["sum_terminal_cnt"] == 1


@pytest_twisted.ensureDeferred
async def test_every_terminal_endpoint_needs_a_token(api):
    for method, body in (("GET", None), ("POST", {"mac": "52:54:00:aa:00:01", "ip": "10.0.0.1"}),
                         ("DELETE", {"terminals": [{"uuid": "x", "name": "x"}]})):
        status, answer = await api.call(method, TERMINALS, body, auth=False)
        assert status == 401, (method, status, answer)
    assert await api.core.store.collection(schema.TERMINALS).count({}) == 0
