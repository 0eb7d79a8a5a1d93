"""Teaching desktop groups and desktops (#83-#98): every refusal that comes before a node is asked,
with nothing stored, and the records, queries and flags that need no domain."""
from __future__ import annotations

import pytest_twisted

from kvmdesk.core.records import new_record
from kvmdesk.plugins.desktops import schema

from .conftest import (DESKTOP_GROUPS, EN, INSTANCES, create_teaching_group, failed, group_body, make_network, ok,
                       seed_node, seed_template)


async def world(api, *, subnet_end="172.16.1.50"):
    core = api.core
    pool = await core.store.collection("resource_pools").find_one({"default": 1})
    other_pool = await core.store.collection("resource_pools").insert_one(new_record(core.clock, name="other", desc=None,
                                                                                     status=0, default=0))
    network, subnet = await make_network(api, end=subnet_end)
    teaching = await create_teaching_group(api, "class1", network, subnet)
    n1 = await seed_node(core, "n1", "192.0.2.11", pool=pool)
    n2 = await seed_node(core, "n2", "192.0.2.12", pool=pool, cpus=2, ram_gib=8)
    down = await seed_node(core, "down", "192.0.2.13", pool=pool, state="offline")
    elsewhere = await seed_node(core, "far", "192.0.2.14", pool=other_pool)
    template = await seed_template(core, pool, [n1, n2, down])
    return {"pool": pool, "network": network, "subnet": subnet, "teaching": teaching, "n1": n1, "n2": n2, "down": down,
            "far": elsewhere, "template": template}


def body(w, create_info, **extra):
    return group_body("dg1", w["teaching"], w["template"], w["pool"], w["network"], w["subnet"], create_info, **extra)


async def nothing_stored(api, subnet):
    store = api.core.store
    assert await store.collection(schema.DESKTOP_GROUPS).count({}) == 0
    assert await store.collection(schema.DESKTOPS).count({}) == 0
    assert await api.core.extensions["ipam"].allocations(subnet["uuid"]) == []


@pytest_twisted.ensureDeferred
async def test_create_refusals_before_any_node_is_asked(api):
    w = await world(api, subnet_end="172.16.1.14")  # 5 addresses
    cases = [
        (body(w, {"192.0.2.99": 1}), 400, 6010, "192.0.2.99"),
        (body(w, {"192.0.2.14": 1}), 400, 6011, "192.0.2.14"),
        (body(w, {"192.0.2.13": 1}), 409, 6012, "offline"),
        (body(w, {"192.0.2.12": 2}), 409, 6014, "vCPUs"),  # 2 cpus x 8 = 16 vCPUs, fine; RAM 8-2 = 6 GiB < 2 x 2... see below
        (body(w, {"192.0.2.11": 2}, instance_num=3), 400, 6013, "3"),
        (body(w, {"192.0.2.11": 0}, instance_num=0), 400, 1002, "instance_num"),
        (body(w, {"192.0.2.11": 6}), 409, 6018, "5 free"),
        (body(w, {"192.0.2.11": 2}, postfix=1, postfix_start=9), 400, 6016, "10"),
        (body(w, {"192.0.2.11": 1}, prefix="pc 1"), 400, 1002, "prefix"),
        (body(w, {"192.0.2.11": 1}, ram="2"), 400, 1002, "ram"),
        (body(w, {"192.0.2.11": 1}, vcpu=0), 400, 1002, "vcpu"),
        (body(w, {"192.0.2.11": 1}, group_uuid="nope"), 404, 1012, "nope"),
        (body(w, {"192.0.2.11": 1}, template_uuid="nope"), 404, 1012, "nope"),
        (body(w, {"192.0.2.11": 1}, subnet_uuid="nope"), 404, 1012, "nope"),
    ]
    for request, status_code, code, word in cases:
        if code == 6014:
            request["param"]["ram"] = 4  # 8 GiB - 2 GiB reserve = 6 GiB: two desktops of 4 GiB do not fit
            word = "memory"
        status, answer = await api.call("POST", DESKTOP_GROUPS, request, headers=EN)
        failed(status, answer, status_code, code)
        assert word in answer["msg"] or word in str(answer["data"]), (word, answer)
    await nothing_stored(api, w["subnet"])


@pytest_twisted.ensureDeferred
async def test_every_placement_problem_is_listed(api):
    w = await world(api)
    request = body(w, {"192.0.2.99": 1, "192.0.2.14": 1, "192.0.2.13": 1, "192.0.2.11": 1})
    status, answer = await api.call("POST", DESKTOP_GROUPS, request, headers=EN)
    failed(status, answer, 400, 6010, "192.0.2.99")
    assert [(p["code"], p["ip"]) for p in answer["data"]["problems"]] == [
        (6010, "192.0.2.99"), (6011, "192.0.2.14"), (6012, "192.0.2.13")]
    await nothing_stored(api, w["subnet"])


@pytest_twisted.ensureDeferred
async def test_template_state_and_versions_are_checked(api):
    w = await world(api)
    store = api.core.store
    templates = store.collection("templates")
    await templates.update_one({"uuid": w["template"]["uuid"]}, {"$set": {"status": "updating"}})
    status, answer = await api.call("POST", DESKTOP_GROUPS, body(w, {"192.0.2.11": 1}), headers=EN)
    failed(status, answer, 409, 6041, "updating")
    await templates.update_one({"uuid": w["template"]["uuid"]}, {"$set": {"status": "inactive", "version": None}})
    status, answer = await api.call("POST", DESKTOP_GROUPS, body(w, {"192.0.2.11": 1}), headers=EN)
    failed(status, answer, 409, 6042, "win7")
    await templates.update_one({"uuid": w["template"]["uuid"]}, {"$set": {
        "version": 2, "publish": {w["n1"]["uuid"]: {"version": 1, "status": 0}}}})
    status, answer = await api.call("POST", DESKTOP_GROUPS, body(w, {"192.0.2.11": 1}), headers=EN)
    failed(status, answer, 409, 6043, "192.0.2.11")
    await templates.update_one({"uuid": w["template"]["uuid"]}, {"$set": {"pool_uuid": "another-pool"}})
    status, answer = await api.call("POST", DESKTOP_GROUPS, body(w, {"192.0.2.11": 1}), headers=EN)
    failed(status, answer, 400, 6047, "pool")
    await nothing_stored(api, w["subnet"])


@pytest_twisted.ensureDeferred
async def test_colliding_names_are_refused(api):
    w = await world(api)
    await api.core.store.collection(schema.DESKTOPS).insert_one(new_record(api.core.clock, name="pc002", node="x"))
    status, answer = await api.call("POST", DESKTOP_GROUPS, body(w, {"192.0.2.11": 3}), headers=EN)
    failed(status, answer, 409, 6017, "pc002")
    assert await api.core.store.collection(schema.DESKTOP_GROUPS).count({}) == 0
    assert await api.core.extensions["ipam"].allocations(w["subnet"]["uuid"]) == []


async def stored_group(api, w, name="dg1", **fields):
    """A desktop group record with two desktops on n1, as a create leaves them."""
    core = api.core
    group = await core.store.collection(schema.DESKTOP_GROUPS).insert_one(new_record(
        core.clock, name=name, owner="admin", group=w["teaching"]["uuid"], template=w["template"]["uuid"],
        pool=w["pool"]["uuid"], network=w["network"]["uuid"], subnet=w["subnet"]["uuid"], vcpu=2, ram=2.0,
        sys_restore=1, data_restore=0, prefix="pc", postfix=2, postfix_start=1, postfix_next=3, order_num=0,
        active=True, os_type="Windows 7 64 bit", devices=[{"type": "system", "boot_index": 0, "size": 20}], **fields))
    desktops = []
    for i, status in enumerate(("active", "inactive"), start=1):
        desktops.append(await core.store.collection(schema.DESKTOPS).insert_one(new_record(
            core.clock, name=f"{name}-pc{i:02d}", desktop_uuid=group["uuid"], group=w["teaching"]["uuid"],
            node=w["n1"]["uuid"], node_ip="192.0.2.11", hostname="n1", ipaddr=f"172.16.1.{10 + i}", status=status,
            power="on" if status == "active" else "off", up_time="2026-01-01 08:00:00" if status == "active" else None,
            up_at=0.0 if status == "active" else None, message="", user_name="", vcpu=2, ram=2.0, mac="52:54:00:00:00:01",
            vnc_password="secret12", template=w["template"]["uuid"], template_version=1)))
    return group, desktops


@pytest_twisted.ensureDeferred
async def test_group_query_counts_names_and_search(api, clock):
    w = await world(api)
    group, _ = await stored_group(api, w)
    await stored_group(api, w, "other")
    listed = ok(*await api.call("GET", DESKTOP_GROUPS + "/", params={"searchtype": "all", "group": w["teaching"]["uuid"],
                                                                     "name": "dg1", "page": 1, "page_size": 1}))
    assert listed["count"] == 1
    (shown,) = listed["results"]
    expected = {"uuid": group["uuid"], "name": "dg1", "owner": "admin", "group": w["teaching"]["uuid"],
                "group_name": "class1", "template": w["template"]["uuid"], "template_name": "win7",
                "template_status": "inactive", "pool": w["pool"]["uuid"], "pool_name": w["pool"]["name"],
                "sys_restore": 1, "data_restore": 0, "instance_num": 2, "inactive_count": 1, "active_count": 1,
                "active": True, "vcpu": 2, "ram": 2.0, "os_type": "Windows 7 64 bit", "prefix": "pc", "postfix": 2,
                "order_num": 0, "network": w["network"]["uuid"], "network_name": "net1",
                "devices": [{"type": "system", "boot_index": 0, "size": 20}]}
    assert {k: shown[k] for k in expected} == expected and shown["created_at"]
    contains = ok(*await api.call("GET", DESKTOP_GROUPS, params={"searchtype": "contain", "name": "oth"}))
    assert [g["name"] for g in contains["results"]] == ["other"]
    (teaching,) = ok(*await api.call("GET", "/education/group"))["results"]
    assert (teaching["desktop_count"], teaching["instance_count"]) == (2, 4)


@pytest_twisted.ensureDeferred
async def test_activate_deactivate_and_inactive_groups_do_not_start(api):
    w = await world(api)
    group, _ = await stored_group(api, w)
    ref = {"desktops": [{"uuid": group["uuid"], "name": "dg1"}]}
    ok(*await api.call("POST", DESKTOP_GROUPS + "/", {"action": "inactive", "param": ref}))
    (shown,) = ok(*await api.call("GET", DESKTOP_GROUPS))["results"]
    assert shown["active"] is False
    for action in ("start", "reboot"):
        status, answer = await api.call("POST", DESKTOP_GROUPS, {"action": action, "param": ref}, headers=EN)
        failed(status, answer, 409, 6044, "inactive")
    mixed = {"desktops": [{"uuid": group["uuid"], "name": "dg1"}, {"uuid": "nope", "name": "ghost"}]}
    answer = ok(*await api.call("POST", DESKTOP_GROUPS, {"action": "active", "param": mixed}))
    assert (answer["success_num"], answer["failed_num"], answer["failures"][0]["name"]) == (1, 1, "ghost")
    assert ok(*await api.call("GET", f"/jobs/{answer['job_id']}"))["state"] == "partial"
    (shown,) = ok(*await api.call("GET", DESKTOP_GROUPS))["results"]
    assert shown["active"] is True
    await api.core.store.collection("templates").update_one({"uuid": w["template"]["uuid"]}, {"$set": {"status": "updating"}})
    status, answer = await api.call("POST", DESKTOP_GROUPS, {"action": "start", "param": ref}, headers=EN)
    failed(status, answer, 409, 6041, "updating")


@pytest_twisted.ensureDeferred
async def test_unknown_groups_in_every_group_batch_are_reported_per_item(api):
    ghosts = {"desktops": [{"uuid": "nope-1", "name": "ghost1"}, {"uuid": "nope-2", "name": "ghost2"}]}
    requests = [("POST", {"action": action, "param": ghosts}) for action in ("start", "stop", "reboot", "active", "inactive")]
    for method, request in requests + [("DELETE", ghosts)]:
        answer = ok(*await api.call(method, DESKTOP_GROUPS, request, headers=EN))
        assert (answer["success_num"], answer["failed_num"]) == (0, 2), (request, answer)
        assert [(f["name"], f["code"]) for f in answer["failures"]] == [("ghost1", 1012), ("ghost2", 1012)]
        status, single = await api.call(method, DESKTOP_GROUPS, {**request, "param": {"desktops": ghosts["desktops"][:1]}}
                                        if method == "POST" else {"desktops": ghosts["desktops"][:1]}, headers=EN)
        failed(status, single, 404, 1012, "nope-1")


@pytest_twisted.ensureDeferred
async def test_edit_name_and_order(api):
    w = await world(api)
    group, _ = await stored_group(api, w)
    await stored_group(api, w, "taken")
    edited = ok(*await api.call("PUT", DESKTOP_GROUPS, {"uuid": group["uuid"], "name": "dg1",
                                                         "value": {"name": "dg2", "order_num": 5}}))
    assert (edited["name"], edited["order_num"], edited["sys_restore"]) == ("dg2", 5, 1)
    status, answer = await api.call("PUT", DESKTOP_GROUPS, {"uuid": group["uuid"], "name": "dg2", "value": {"name": "taken"}})
    failed(status, answer, 409, 1013)
    status, answer = await api.call("PUT", DESKTOP_GROUPS, {"uuid": group["uuid"], "name": "dg2", "value": {"sys_restore": 2}})
    failed(status, answer, 400, 1002)
    status, answer = await api.call("PUT", DESKTOP_GROUPS, {"uuid": "nope", "name": "x", "value": {"name": "y"}})
    failed(status, answer, 404, 1012)


@pytest_twisted.ensureDeferred
async def test_desktop_query_console_and_batch_refusals(api, clock):
    w = await world(api)
    group, (running, stopped) = await stored_group(api, w)
    other, (foreign, _) = await stored_group(api, w, "other")
    clock.advance(90)
    page = ok(*await api.call("GET", INSTANCES + "/", params={"searchtype": "all", "desktop_uuid": group["uuid"], "page": 1,
                                                               "page_size": 10}))
    assert page["count"] == 2
    first = page["results"][0]
    assert {k: first[k] for k in ("uuid", "name", "ipaddr", "host_name", "status", "up_time", "active_time", "message",
                                  "user_name")} == {
        "uuid": running["uuid"], "name": "dg1-pc01", "ipaddr": "172.16.1.11", "host_name": "n1", "status": "active",
        "up_time": "2026-01-01 08:00:00", "active_time": 90, "message": "", "user_name": ""}
    assert "vnc_password" not in first
    assert page["results"][1]["active_time"] == 0
    status, answer = await api.call("GET", INSTANCES, params={"desktop_uuid": "nope"})
    failed(status, answer, 404, 1012)

    status, answer = await api.call("POST", INSTANCES, {"action": "get_console", "param": {"uuid": stopped["uuid"],
                                                                                          "name": stopped["name"]}}, headers=EN)
    failed(status, answer, 409, 6049, "not running")

    # desktops of another group and unknown ones are per-item failures; nothing is asked of a node
    param = {"desktop_uuid": group["uuid"], "desktop_name": "dg1", "desktop_type": 1,
             "instances": [{"uuid": foreign["uuid"], "name": foreign["name"]}, {"uuid": "nope", "name": "ghost"}]}
    answer = ok(*await api.call("POST", INSTANCES, {"action": "stop", "param": param}, headers=EN))
    assert (answer["success_num"], answer["failed_num"]) == (0, 2)
    assert {f["name"]: f["code"] for f in answer["failures"]} == {foreign["name"]: 6046, "ghost": 1012}
    job = ok(*await api.call("GET", f"/jobs/{answer['job_id']}"))  # the batch ran as a persisted job
    assert (job["kind"], job["state"], job["failed_num"]) == ("desktops.stop", "failed", 2)
    assert [i["code"] for i in job["items"]] == [6046, 1012]
    status, answer = await api.call("DELETE", INSTANCES, {**param, "instances": param["instances"][1:]})
    failed(status, answer, 404, 1012)
    status, answer = await api.call("DELETE", INSTANCES, {**param, "desktop_type": 2})
    failed(status, answer, 400, 1002)
    assert await api.core.store.collection(schema.DESKTOPS).count({}) == 4


@pytest_twisted.ensureDeferred
async def test_what_desktops_use_cannot_be_deleted(api):
    w = await world(api)
    await stored_group(api, w)
    core = api.core
    for kind, uuid in [("template", w["template"]["uuid"]), ("subnet", w["subnet"]["uuid"]),
                       ("data_network", w["network"]["uuid"]), ("resource_pool", w["pool"]["uuid"]),
                       ("node", w["n1"]["uuid"]), ("teaching_group", w["teaching"]["uuid"])]:
        assert await core.usage(kind, uuid), kind
    assert await core.usage("node", w["n2"]["uuid"]) is None
    status, answer = await api.call("DELETE", "/education/group", {"groups": [{"uuid": w["teaching"]["uuid"], "name": "c"}]})
    failed(status, answer, 409, 6005)


@pytest_twisted.ensureDeferred
async def test_console_of_a_running_desktop(api):
    w = await world(api)
    _, (running, _) = await stored_group(api, w)
    status, answer = await api.call("POST", INSTANCES, {"action": "get_console", "param": {"uuid": running["uuid"],
                                                                                          "name": running["name"]}})
    try:
        from kvmdesk.core import console
    except ImportError:  # this build has no console relay: said so, never a fake URL
        failed(status, answer, 501, 6050)
        return
    url = ok(status, answer)["websockify_url"]
    assert url.startswith("ws://") and "token=" in url
    from urllib.parse import parse_qs, urlsplit

    token = parse_qs(urlsplit(url).query)["token"][0]
    grant = await console.check(api.core, token, consume=False)
    assert (grant.node_uuid, grant.domain_uuid, grant.holder_kind) == (w["n1"]["uuid"], running["uuid"], "admin")


@pytest_twisted.ensureDeferred
async def test_desktops_on_a_node_deleted_meanwhile_are_marked_at_start_up(api):
    from kvmdesk.plugins.desktops import plugin

    w = await world(api)
    _, (first, second) = await stored_group(api, w)
    await api.core.store.collection("nodes").delete_one({"uuid": w["n1"]["uuid"]})
    await plugin.kvmdesk_reconcile(api.core)
    found = {d["name"]: (d["status"], d["message"]) for d in await api.core.store.collection(schema.DESKTOPS).find({})}
    assert found == {first["name"]: ("error", plugin.NODE_GONE), second["name"]: ("error", plugin.NODE_GONE)}


@pytest_twisted.ensureDeferred
async def test_add_desktops_refusals_before_any_node_is_asked(api):
    """#94 checks what #83 checks (placement, capacity, addresses, template), per the group's settings;
    a refused add makes nothing and takes no numbers."""
    w = await world(api, subnet_end="172.16.1.14")  # 5 addresses, two of them the stored group's
    group, _ = await stored_group(api, w)
    store = api.core.store

    def add(create_info, **extra):
        count = sum(v for v in create_info.values() if isinstance(v, int))
        return {"action": "create", "param": {"desktop_uuid": group["uuid"], "desktop_name": "dg1", "desktop_type": 1,
                                              "instance_num": count, "create_info": create_info, **extra}}

    await api.core.extensions["ipam"].allocate(w["subnet"]["uuid"], "172.16.1.11", owner="desktop:dg1-pc01")
    await api.core.extensions["ipam"].allocate(w["subnet"]["uuid"], "172.16.1.12", owner="desktop:dg1-pc02")
    cases = [
        (add({"192.0.2.99": 1}), 400, 6010, "192.0.2.99"),
        (add({"192.0.2.14": 1}), 400, 6011, "192.0.2.14"),
        (add({"192.0.2.13": 1}), 409, 6012, "offline"),
        (add({"192.0.2.11": 2}, instance_num=3), 400, 6013, "3"),
        (add({"192.0.2.11": 4}), 409, 6018, "3 free"),
        (add({"192.0.2.11": 1}, desktop_uuid="nope"), 404, 1012, "nope"),
        (add({"192.0.2.11": 1}, desktop_type=2), 400, 1002, "desktop_type"),
        (add({"192.0.2.11": 0}, instance_num=0), 400, 1002, "instance_num"),
    ]
    for request, status_code, code, word in cases:
        status, answer = await api.call("POST", INSTANCES, request, headers=EN)
        failed(status, answer, status_code, code)
        assert word in answer["msg"] or word in str(answer["data"]), (word, answer)
    await store.collection("templates").update_one({"uuid": w["template"]["uuid"]}, {"$set": {"status": "updating"}})
    status, answer = await api.call("POST", INSTANCES, add({"192.0.2.11": 1}), headers=EN)
    failed(status, answer, 409, 6041, "updating")
    assert await store.collection(schema.DESKTOPS).count({}) == 2
    owners = {a["owner"] for a in await api.core.extensions["ipam"].allocations(w["subnet"]["uuid"])}
    assert owners == {"desktop:dg1-pc01", "desktop:dg1-pc02"}
    assert (await store.collection(schema.DESKTOP_GROUPS).find_one({"uuid": group["uuid"]}))["postfix_next"] == 3
