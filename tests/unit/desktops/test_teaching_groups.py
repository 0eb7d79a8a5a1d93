"""Teaching groups (contract #79-#82): create, edit, delete, query with counts; the shared name rule."""
from __future__ import annotations

import pytest_twisted

from kvmdesk.core import group_names
from kvmdesk.core.oplog import COLLECTION as OPLOG
from kvmdesk.core.records import new_record
from kvmdesk.plugins.desktops import schema

from .conftest import EN, NETS, TEACHING, add_subnet, create_teaching_group, failed, make_network, ok, teaching_body


@pytest_twisted.ensureDeferred
async def test_create_and_query_as_in_the_contract(api):
    network, subnet = await make_network(api)
    body = teaching_body("group5", network, subnet, start="172.16.1.60", end="172.16.1.80")
    created = ok(*await api.call("POST", TEACHING, body))
    assert (created["name"], created["group_type"], created["desc"]) == ("group5", 1, "class group5")
    listed = ok(*await api.call("GET", TEACHING + "/", params={"searchtype": "all", "group_type": 1, "page": 1,
                                                               "page_size": 1}))
    assert listed["count"] == 1 and listed["next"] is None
    (group,) = listed["results"]
    expected = {
        "uuid": created["uuid"], "name": "group5", "desc": "class group5", "network": network["uuid"],
        "network_name": "net1", "subnet": subnet["uuid"], "subnet_name": "net1-s1", "subnet_start_ip": "172.16.1.10",
        "subnet_end_ip": "172.16.1.50", "start_ip": "172.16.1.60", "end_ip": "172.16.1.80", "terminal_count": 0,
        "desktop_count": 0, "instance_count": 0,
    }
    assert {k: group[k] for k in expected} == expected
    contains = ok(*await api.call("GET", TEACHING, params={"searchtype": "contain", "name": "oup"}))
    assert [g["uuid"] for g in contains["results"]] == [created["uuid"]]
    single = ok(*await api.call("GET", TEACHING, params={"searchtype": "single", "subnet": subnet["uuid"]}))
    assert single["uuid"] == created["uuid"]
    status, answer = await api.call("GET", TEACHING, params={"colour": "red"})
    failed(status, answer, 400, 1003)
    logged = await api.core.store.collection(OPLOG).find({})
    assert any("新增教学分组" in r["content"] and "group5" in r["content"] for r in logged)


@pytest_twisted.ensureDeferred
async def test_counts_come_from_desktop_groups_desktops_and_terminals(api):
    network, subnet = await make_network(api)
    group = await create_teaching_group(api, "c1", network, subnet)
    store = api.core.store
    for i in range(2):
        await store.collection(schema.DESKTOP_GROUPS).insert_one(new_record(api.core.clock, name=f"dg{i}", group=group["uuid"]))
    for i in range(3):
        await store.collection(schema.DESKTOPS).insert_one(new_record(api.core.clock, name=f"pc{i}", group=group["uuid"]))
    # terminals count by their address in the group's range (172.16.1.100-140): two in it, one outside
    for mac, ip in (("52:54:00:00:00:01", "172.16.1.100"), ("52:54:00:00:00:02", "172.16.1.140"),
                    ("52:54:00:00:00:03", "172.16.1.141")):
        ok(*await api.call("POST", "/education/terminal", {"mac": mac, "ip": ip}))
    (shown,) = ok(*await api.call("GET", TEACHING))["results"]
    assert (shown["desktop_count"], shown["instance_count"], shown["terminal_count"]) == (2, 3, 2)


@pytest_twisted.ensureDeferred
async def test_bad_bodies_and_addressing_are_refused_and_nothing_is_stored(api):
    network, subnet = await make_network(api)
    other, other_subnet = await make_network(api, "net2", "10.0.0.10", "10.0.0.20")
    cases = [
        ({**teaching_body("g", network, subnet), "group_type": 2}, 400, 1002, "group_type"),
        ({k: v for k, v in teaching_body("g", network, subnet).items() if k != "subnet_uuid"}, 400, 1002, "subnet_uuid"),
        (teaching_body("g", network, subnet, start="172.16.1.300"), 400, 1002, "start_ip"),
        (teaching_body("g", network, subnet, start="172.16.1.90", end="172.16.1.80"), 400, 6003, "172.16.1.90"),
        (teaching_body("g", network, subnet, start="172.16.1.40", end="172.16.1.60"), 409, 6004, "172.16.1.10"),
        (teaching_body("g", network, subnet, start="172.16.0.0", end="172.17.0.0"), 400, 6006, "4096"),
        (teaching_body("g", network, other_subnet), 400, 6002, "subnet_uuid"),
        (teaching_body("g", {"uuid": "nope"}, subnet), 404, 1012, "nope"),
        (teaching_body("g", network, {"uuid": "nope"}), 404, 1012, "nope"),
    ]
    for body, status_code, code, word in cases:
        status, answer = await api.call("POST", TEACHING, body, headers=EN)
        failed(status, answer, status_code, code, word)
    assert ok(*await api.call("GET", TEACHING))["count"] == 0
    assert await api.core.store.collection(group_names.COLLECTION).count({"kind": schema.TEACHING_KIND}) == 0


@pytest_twisted.ensureDeferred
async def test_names_are_shared_with_user_groups(api):
    network, subnet = await make_network(api)
    ok(*await api.call("POST", "/personal/group", {"name": "staff", "group_type": 2}))
    status, answer = await api.call("POST", TEACHING, teaching_body("staff", network, subnet), headers=EN)
    failed(status, answer, 409, 6001, "user group", "staff")
    await create_teaching_group(api, "class-a", network, subnet)
    status, answer = await api.call("POST", "/personal/group", {"name": "class-a", "group_type": 2}, headers=EN)
    failed(status, answer, 409, 7002, "teaching group")
    status, answer = await api.call("POST", TEACHING, teaching_body("class-a", network, subnet), headers=EN)
    failed(status, answer, 409, 6001, "teaching group")


@pytest_twisted.ensureDeferred
async def test_edit_renames_moves_and_validates(api):
    network, subnet = await make_network(api)
    second = await add_subnet(api, network, "s2", "172.16.1.150", "172.16.1.160")
    group = await create_teaching_group(api, "group1", network, subnet)
    await create_teaching_group(api, "other", network, subnet)
    edit = {"uuid": group["uuid"], "name": "group1", "value": {"name": "group2", "desc": "this is group2",
                                                               "subnet_uuid": second["uuid"], "end_ip": "172.16.1.120"}}
    edited = ok(*await api.call("PUT", TEACHING, edit))
    assert (edited["name"], edited["desc"], edited["subnet"], edited["subnet_name"]) == ("group2", "this is group2", second["uuid"], "s2")
    assert (edited["start_ip"], edited["end_ip"]) == ("172.16.1.100", "172.16.1.120")
    assert (await group_names.holder(api.core.store, "group2"))["owner"] == group["uuid"]
    assert await group_names.holder(api.core.store, "group1") is None
    kept = ok(*await api.call("PUT", TEACHING, {"uuid": group["uuid"], "name": "group2", "value": {"name": "group2"}}))
    assert kept["desc"] == "this is group2"
    for value, status_code, code in [
        ({"name": "other"}, 409, 6001),
        ({"name": "group2", "start_ip": "172.16.1.110", "end_ip": "172.16.1.155"}, 409, 6004),
        ({"name": "group2", "end_ip": "x"}, 400, 1002),
    ]:
        status, answer = await api.call("PUT", TEACHING, {"uuid": group["uuid"], "name": "group2", "value": value})
        failed(status, answer, status_code, code)
    status, answer = await api.call("PUT", TEACHING, {"uuid": "nope", "name": "x", "value": {"name": "y"}})
    failed(status, answer, 404, 1012)
    (after,) = ok(*await api.call("GET", TEACHING, params={"searchtype": "all", "name": "group2"}))["results"]
    assert {k: after[k] for k in ("subnet", "start_ip", "end_ip")} == {"subnet": second["uuid"], "start_ip": "172.16.1.100",
                                                                        "end_ip": "172.16.1.120"}


@pytest_twisted.ensureDeferred
async def test_batch_delete_reports_per_item_and_refuses_used_groups(api):
    network, subnet = await make_network(api)
    free = await create_teaching_group(api, "free", network, subnet)
    used = await create_teaching_group(api, "used", network, subnet)
    await api.core.store.collection(schema.DESKTOP_GROUPS).insert_one(new_record(api.core.clock, name="dg", group=used["uuid"]))
    body = {"groups": [{"uuid": free["uuid"], "name": "free"}, {"uuid": used["uuid"], "name": "used"},
                       {"uuid": "missing", "name": "ghost"}]}
    answer = ok(*await api.call("DELETE", TEACHING + "/", body))
    assert (answer["success_num"], answer["failed_num"]) == (1, 2)
    assert {f["name"]: f["code"] for f in answer["failures"]} == {"used": 6005, "ghost": 1012}
    assert [g["name"] for g in ok(*await api.call("GET", TEACHING))["results"]] == ["used"]
    assert await group_names.holder(api.core.store, "free") is None
    status, single = await api.call("DELETE", TEACHING, {"groups": [{"uuid": used["uuid"], "name": "used"}]})
    failed(status, single, 409, 6005)
    status, empty = await api.call("DELETE", TEACHING, {"groups": []})
    failed(status, empty, 400, 1002)


@pytest_twisted.ensureDeferred
async def test_subnets_and_networks_in_use_cannot_be_deleted(api):
    network, subnet = await make_network(api)
    group = await create_teaching_group(api, "c1", network, subnet)
    status, answer = await api.call("DELETE", f"{NETS}/{network['uuid']}/sub_networks", {"uuids": [subnet["uuid"]]})
    failed(status, answer, 409, 1019)
    status, answer = await api.call("DELETE", NETS, {"uuids": [network["uuid"]]})
    assert answer["code"] != 0, answer
    ok(*await api.call("DELETE", TEACHING, {"groups": [{"uuid": group["uuid"], "name": "c1"}]}))
    ok(*await api.call("DELETE", f"{NETS}/{network['uuid']}/sub_networks", {"uuids": [subnet["uuid"]]}))


@pytest_twisted.ensureDeferred
async def test_teaching_and_desktop_groups_announce_their_changes(tmp_path, clock):
    from kvmdesk.testing.api import api_client
    from kvmdesk.testing.plugins import LifecycleRecorder, plugin_manager

    recorder = LifecycleRecorder()
    async with api_client(tmp_path, clock=clock, plugins=plugin_manager(recorder)) as api:
        network, subnet = await make_network(api)
        group = await create_teaching_group(api, "c1", network, subnet)
        ok(*await api.call("PUT", TEACHING, {"uuid": group["uuid"], "name": "c1", "value": {"name": "c2"}}))
        status, answer = await api.call("PUT", TEACHING, {"uuid": group["uuid"], "name": "c2", "value": {"name": "c2",
                                                                                                        "end_ip": "x"}})
        assert status == 400  # refused: announces nothing
        ok(*await api.call("DELETE", TEACHING, {"groups": [{"uuid": group["uuid"], "name": "c2"}]}))
        events = recorder.of("teaching_group")
        assert [e.hook for e in events] == ["created", "updated", "deleted"]
        assert events[1].changes["name"] == "c2" and events[2].record["name"] == "c2"

        holder = await create_teaching_group(api, "c3", network, subnet)
        desktop_group = await api.core.store.collection(schema.DESKTOP_GROUPS).insert_one(new_record(
            api.core.clock, name="dg", group=holder["uuid"], template="t", pool="p", network=network["uuid"],
            subnet=subnet["uuid"], active=True, sys_restore=0, data_restore=0, order_num=0))
        ref = {"desktops": [{"uuid": desktop_group["uuid"], "name": "dg"}]}
        ok(*await api.call("POST", "/education/desktop", {"action": "inactive", "param": ref}))
        ok(*await api.call("PUT", "/education/desktop", {"uuid": desktop_group["uuid"], "name": "dg",
                                                         "value": {"order_num": 3}}))
        ok(*await api.call("DELETE", "/education/desktop", ref))
        events = recorder.of("desktop_group")
        assert [e.hook for e in events] == ["updated", "updated", "deleted"]
        assert events[0].changes["active"] is False and events[1].changes["order_num"] == 3
    assert clock.getDelayedCalls() == []
