"""Personal desktop groups (#113-#121), static bindings (#125-#127), personal desktops (#128-#134) and
their usage answers: every refusal before a node is asked (nothing stored), and the records, bindings,
queries and batches that need no domain (desktops stored as the creation stores them)."""
from __future__ import annotations

import pytest_twisted

from kvmdesk.core import errors
from kvmdesk.core.records import new_record
from kvmdesk.plugins.desktops import personal_codes as codes
from kvmdesk.testing.personal import STATIC, seed_personal_group

from .conftest import EN, failed, make_network, ok, seed_node, seed_template
from .test_portal import PASSWORD, bind, user_group, user_login

GROUPS = "/personal/desktop/"
STATICS = "/personal/desktop/static/"
INSTANCES = "/personal/instance/"


async def world(api):
    core = api.core
    pool = await core.store.collection("resource_pools").find_one({"default": 1})
    network, subnet = await make_network(api, start="172.16.1.10", end="172.16.1.20")
    n1 = await seed_node(core, "n1", "192.0.2.11", pool=pool)
    down = await seed_node(core, "down", "192.0.2.13", pool=pool, state="offline")
    template = await seed_template(core, pool, [n1, down])
    return {"pool": pool, "network": network, "subnet": subnet, "n1": n1, "down": down, "template": template}


def create_body(w, create_info, **extra):
    count = sum(create_info.values())
    param = {"name": "pg1", "template_uuid": w["template"]["uuid"], "pool_uuid": w["pool"]["uuid"],
             "network_uuid": w["network"]["uuid"], "subnet_uuid": w["subnet"]["uuid"], "allocate_type": 1, "vcpu": 1,
             "ram": 1, "sys_restore": 1, "data_restore": 0, "desktop_type": 1, "instance_num": count, "prefix": "pp",
             "postfix": 2, "postfix_start": 1, "create_info": create_info, **extra}
    return {"action": "create", "param": {k: v for k, v in param.items() if v is not None}}


async def nothing_stored(api, subnet):
    store = api.core.store
    assert await store.collection("personal_groups").count({}) == 0
    assert await store.collection("desktops").count({}) == 0
    assert await store.collection("random_bindings").count({}) == 0
    assert await api.core.extensions["ipam"].allocations(subnet["uuid"]) == []


@pytest_twisted.ensureDeferred
async def test_create_refusals_before_any_node_is_asked(api):
    w = await world(api)
    _, users = await user_group(api, "staff", 2, "st")
    other_group, others = await user_group(api, "other", 1, "ot")
    first = {"user_uuid": users[0]["uuid"], "name": "pp01"}
    cases = [
        (create_body(w, {"192.0.2.13": 1}), 409, 6012, "offline"),
        (create_body(w, {"192.0.2.11": 2}, allocate_type=2, allocate_start="172.16.1.20"), 400,
         codes.FIXED_OUTSIDE_SUBNET.code, "allocate_start"),
        (create_body(w, {"192.0.2.11": 1}, allocate_type=2, allocate_start="10.9.9.9"), 400,
         codes.FIXED_OUTSIDE_SUBNET.code, "172.16.1.10-172.16.1.20"),
        (create_body(w, {"192.0.2.11": 1}, allocate_type=2), 400, errors.INVALID_PARAM.code, "allocate_start"),
        (create_body(w, {"192.0.2.11": 1}, allocate_type=2, allocate_start="not-an-ip"), 400, errors.INVALID_PARAM.code,
         "allocate_start"),
        (create_body(w, {"192.0.2.11": 1}, subnet_uuid=None), 400, errors.INVALID_PARAM.code, "subnet_uuid"),
        (create_body(w, {"192.0.2.11": 1}, desktop_type=3), 400, errors.INVALID_PARAM.code, "desktop_type"),
        (create_body(w, {"192.0.2.11": 1}, groups=["no-such-group"]), 404, errors.NOT_FOUND.code, "no-such-group"),
        (create_body(w, {"192.0.2.11": 1}, allocates=[first]), 400, errors.INVALID_PARAM.code, "static"),
        (create_body(w, {"192.0.2.11": 2}, desktop_type=2, allocates=[first, {"user_uuid": others[0]["uuid"], "name": "pp02"}]),
         400, codes.USER_OTHER_GROUP.code, "allocates"),
        (create_body(w, {"192.0.2.11": 2}, desktop_type=2, allocates=[first, {**first, "name": "pp02"}]), 400,
         codes.DUPLICATE_ALLOCATION.code, "twice"),
        (create_body(w, {"192.0.2.11": 1}, desktop_type=2, allocates=[{**first, "name": "pc99"}]), 400,
         codes.UNKNOWN_DESKTOP_NAME.code, "pc99"),
        (create_body(w, {"192.0.2.11": 1}, desktop_type=2, group_uuid=other_group["uuid"], allocates=[first]), 400,
         codes.USER_OTHER_GROUP.code, "other"),
        (create_body(w, {"192.0.2.11": 1}, template_uuid="nope"), 404, errors.NOT_FOUND.code, "nope"),
        (create_body(w, {"192.0.2.11": 1}, ram="1"), 400, errors.INVALID_PARAM.code, "ram"),
    ]
    for request, status, code, word in cases:
        failed(*await api.call("POST", GROUPS, request, headers=EN), status, code, word)
        await nothing_stored(api, w["subnet"])
    # A fixed address already taken: refused whole, nothing half-done.
    await api.core.extensions["ipam"].allocate(w["subnet"]["uuid"], "172.16.1.12", owner="someone")
    failed(*await api.call("POST", GROUPS, create_body(w, {"192.0.2.11": 3}, allocate_type=2, allocate_start="172.16.1.11"),
                           headers=EN), 409, codes.FIXED_TAKEN.code, "172.16.1.12")
    assert [a["ip"] for a in await api.core.extensions["ipam"].allocations(w["subnet"]["uuid"])] == ["172.16.1.12"]
    assert await api.core.store.collection("personal_groups").count({}) == 0


@pytest_twisted.ensureDeferred
async def test_a_create_that_fails_on_its_node_leaves_nothing(api):
    """The node has no agent here (its address is unreachable): the first desktop's error, nothing kept."""
    w = await world(api)
    users_group, _ = await user_group(api, "class", 1, "u")
    for extra in ({"groups": [users_group["uuid"]]}, {"allocate_type": 2, "allocate_start": "172.16.1.15"}):
        failed(*await api.call("POST", GROUPS, create_body(w, {"192.0.2.11": 2}, **extra)), 502, 6040, "192.0.2.11")
        await nothing_stored(api, w["subnet"])


@pytest_twisted.ensureDeferred
async def test_group_batches_edit_query_and_delete(api):
    w = await world(api)
    on_down, _ = await seed_personal_group(api.core, "pg-down", 2, node=w["down"], status="inactive", template=w["template"]["uuid"])
    nodeless, _ = await seed_personal_group(api.core, "pg-gone", 2, template=w["template"]["uuid"])
    users_group = ok(*await api.call("POST", "/personal/group", {"name": "class", "group_type": 2}))
    await bind(api, nodeless, users_group)
    both = {"desktops": [{"uuid": on_down["uuid"], "name": "pg-down"}, {"uuid": "missing", "name": "ghost"}]}
    started = ok(*await api.call("POST", GROUPS, {"action": "start", "param": both}))
    assert started["success_num"] == 0 and [f["code"] for f in started["failures"]] == [6045, errors.NOT_FOUND.code]
    job = ok(*await api.call("GET", f"/jobs/{started['job_id']}"))  # a batch that touches nodes is a job
    assert (job["kind"], job["state"], len(job["items"])) == ("personal_groups.start", "failed", 2)
    body = failed(*await api.call("POST", GROUPS, {"action": "stop", "param": {"desktops": both["desktops"][:1]}}, headers=EN),
                  502, 6045, "2 of 2")
    assert {f["code"] for f in body["data"]["failures"]} == {6048}
    edited = ok(*await api.call("PUT", GROUPS, {"uuid": nodeless["uuid"], "name": "pg-gone", "value": {"name": "renamed",
                                                                                                         "order_num": 3}}))
    assert (edited["name"], edited["order_num"], edited["instance_num"], edited["group_count"]) == ("renamed", 3, 2, 1)
    failed(*await api.call("PUT", GROUPS, {"uuid": on_down["uuid"], "name": "x", "value": {"name": "renamed"}}), 409,
           errors.ALREADY_EXISTS.code)
    page = ok(*await api.call("GET", GROUPS, params={"desktop_type": 1}))
    assert [g["name"] for g in page["results"]] == ["pg-down", "renamed"]
    assert page["results"][0]["template_name"] == "win7" and page["results"][0]["inactive_count"] == 2
    # Users' groups are held by the binding until the group goes.
    failed(*await api.call("DELETE", "/personal/group", {"groups": [{"uuid": users_group["uuid"]}]}, headers=EN), 409,
           errors.IN_USE.code, "used by personal desktop groups renamed")
    deleted = ok(*await api.call("DELETE", GROUPS, {"desktops": [{"uuid": nodeless["uuid"], "name": "renamed"}]}))
    assert {k: v for k, v in deleted.items() if k != "job_id"} == {"success_num": 1, "failed_num": 0, "failures": []}
    job = ok(*await api.call("GET", f"/jobs/{deleted['job_id']}"))
    assert (job["kind"], job["state"], job["progress"]) == ("personal_groups.delete", "succeeded", 100)
    assert await api.core.store.collection("desktops").count({"desktop_uuid": nodeless["uuid"]}) == 0
    assert await api.core.store.collection("random_bindings").count({}) == 0
    assert await api.core.usage("user_group", users_group["uuid"]) is None
    assert "pg-down" in await api.core.usage("template", w["template"]["uuid"])


@pytest_twisted.ensureDeferred
async def test_static_bindings_change_bind_change_group_and_query(api):
    staff, users = await user_group(api, "staff", 3, "st")
    other, others = await user_group(api, "other", 1, "ot")
    group, desktops = await seed_personal_group(api.core, "own", 2, desktop_type=STATIC)
    matched = ok(*await api.call("POST", STATICS, {"action": "change_group", "param": {
        "desktop_uuid": group["uuid"], "desktop_name": "own", "group_uuid": staff["uuid"], "group_name": "staff"}}))
    assert matched == {"bound_num": 2, "unbound_users": ["st003"], "free_instances": []}
    rows = ok(*await api.call("GET", STATICS, params={"desktop_uuid": group["uuid"]}))["results"]
    assert [(r["instance_name"], r["user_name"]) for r in rows] == [("own001", "st001"), ("own002", "st002")]
    assert {"bind_uuid", "user_uuid", "user_name", "instance_uuid", "instance_name"} <= set(rows[0]) and rows[0]["bind_uuid"]
    # Explicit rebinding: st003 takes own001; st001 is left without (one desktop per user).
    rebind = {"instance_uuid": desktops[0]["uuid"], "instance_name": "own001", "user_uuid": users[2]["uuid"], "user_name": "st003"}
    ok(*await api.call("POST", STATICS, {"action": "change_bind", "param": rebind}))
    ok(*await api.call("POST", STATICS, {"action": "change_bind", "param": {**rebind, "instance_uuid": desktops[1]["uuid"]}}))
    rows = ok(*await api.call("GET", STATICS, params={"desktop_uuid": group["uuid"]}))["results"]
    assert [(r["instance_name"], r["user_name"], bool(r["bind_uuid"])) for r in rows] == [("own001", "", False),
                                                                                          ("own002", "st003", True)]
    failed(*await api.call("POST", STATICS, {"action": "change_bind", "param": {**rebind, "user_uuid": others[0]["uuid"]}},
                           headers=EN), 400, codes.USER_OTHER_GROUP.code, "user_uuid", "ot001", "staff")
    # The user of a static desktop gets it through the portal.
    token = ok(*await user_login(api, "st003"))["token"]
    status, answer = await api.call("POST", "/portal/connect", {}, auth=False, headers={"Authorization": f"Bearer {token}"})
    assert (status, answer["data"]["instance"]["name"]) == (200, "own002")
    assert "own002" in await api.core.usage("user", users[2]["uuid"])
    assert "own" in await api.core.usage("user_group", staff["uuid"])
    random_group, _ = await seed_personal_group(api.core, "rnd", 1)
    failed(*await api.call("POST", STATICS, {"action": "change_group", "param": {"desktop_uuid": random_group["uuid"],
                                                                                "desktop_name": "rnd"}}), 400, codes.NOT_STATIC.code)
    assert [r["instance_name"] for r in ok(*await api.call("GET", STATICS))["results"]] == ["own001", "own002"]
    assert PASSWORD


@pytest_twisted.ensureDeferred
async def test_personal_desktops_batches_and_query(api):
    w = await world(api)
    group, desktops = await seed_personal_group(api.core, "pd", 2, node=w["down"], status="inactive", template=w["template"]["uuid"])
    _, users = await user_group(api, "staff", 1, "st")
    await api.core.store.collection("desktops").update_one({"uuid": desktops[0]["uuid"]}, {"$set": {
        "user_uuid": users[0]["uuid"], "user_name": "st001"}})
    refs = [{"uuid": d["uuid"], "name": d["name"]} for d in desktops]
    base = {"desktop_uuid": group["uuid"], "desktop_name": "pd", "desktop_type": 2}
    for action in ("start", "stop", "hard_stop", "reboot"):
        answer = ok(*await api.call("POST", INSTANCES, {"action": action, "param": {**base, "instances": refs}}))
        assert (answer["success_num"], answer["failed_num"], {f["code"] for f in answer["failures"]}) == (0, 2, {6048}), action
    failed(*await api.call("POST", INSTANCES, {"action": "start", "param": {**base, "desktop_type": 1, "instances": refs}}), 400,
           errors.INVALID_PARAM.code, "desktop_type")
    failed(*await api.call("POST", INSTANCES, {"action": "start", "param": {**base, "desktop_uuid": "nope", "instances": refs}}),
           404, errors.NOT_FOUND.code)
    page = ok(*await api.call("GET", INSTANCES, params={"desktop_uuid": group["uuid"]}))
    assert page["count"] == 2 and [(r["name"], r["user_name"]) for r in page["results"]] == [("pd001", "st001"), ("pd002", "")]
    assert {"uuid", "name", "ipaddr", "hostname", "host_name", "status", "up_time", "active_time", "message",
            "user_name"} <= set(page["results"][0])
    teaching = await api.core.store.collection("desktops").insert_one(new_record(api.core.clock, name="t1", desktop_uuid="a-teaching-group"))
    listed = [d["name"] for d in ok(*await api.call("GET", INSTANCES))["results"]]
    assert listed == ["pd001", "pd002"] and teaching["name"] not in listed  # personal desktops only
    add = {"action": "create", "param": {**base, "instance_num": 1, "create_info": {"192.0.2.13": 1}}}
    failed(*await api.call("POST", INSTANCES, add), 409, 6012)
    assert (await api.core.store.collection("personal_groups").find_one({"uuid": group["uuid"]}))["postfix_next"] == 3
    # Desktops whose node is gone are deleted (their records and addresses).
    nodeless, gone = await seed_personal_group(api.core, "pg-gone", 1)
    deleted = ok(*await api.call("DELETE", INSTANCES, {"desktop_uuid": nodeless["uuid"], "desktop_name": "pg-gone",
                                                       "desktop_type": 2, "instances": [{"uuid": gone[0]["uuid"], "name": "x"},
                                                                                        {"uuid": desktops[0]["uuid"], "name": "pd001"}]}))
    assert (deleted["success_num"], deleted["failures"][0]["code"]) == (1, 6046)
    assert await api.core.store.collection("desktops").count({"uuid": gone[0]["uuid"]}) == 0


@pytest_twisted.ensureDeferred
async def test_a_stopped_restore_desktop_is_restarted_by_the_lifecycle_event(api):
    """The teaching events module finds personal groups too: a restore desktop that its guest stopped
    while meant to be on is started again (here its node is offline, so the attempt is recorded as an
    error saying so); a desktop without restore just turns inactive."""
    from kvmdesk.plugins.desktops.events import on_domain_event

    down = await seed_node(api.core, "down", "192.0.2.13", state="offline")
    _, (restoring,) = await seed_personal_group(api.core, "rst", 1, node=down, sys_restore=1)
    _, (keeping,) = await seed_personal_group(api.core, "keep", 1, node=down)
    for desktop in (restoring, keeping):
        await on_domain_event(api.core, down, {"event": "stopped", "uuid": desktop["uuid"]})
    desktops = api.core.store.collection("desktops")
    restored = await desktops.find_one({"uuid": restoring["uuid"]})
    assert (restored["status"], restored["power"]) == ("error", "on") and "offline" in restored["message"]
    kept = await desktops.find_one({"uuid": keeping["uuid"]})
    assert (kept["status"], kept["power"]) == ("inactive", "off")
