"""Personal desktop groups on real agents (libvirt's test driver, two in-process agents), from create to
start: a random group and a static group made through the API, their domains defined on the nodes the
create asked for, the random group started by an administrator, and desktop users getting them through
the portal (random users a running desktop each until none is free, a static user their own desktop,
which the broker starts on its node).  Then the groups are deleted: every domain goes.

Runs on the templates plugin's world (agents, controller, base image, network); skipped where the
domain layer (kvmdesk.protocol.domains) is not installed."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet.task import Clock

pytest.importorskip("kvmdesk.protocol.domains")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "templates"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "storage"))

from templates_testlib import HOSTS, world_of  # noqa: E402

from kvmdesk.plugins.desktops import personal_codes as codes  # noqa: E402

from .conftest import ok  # noqa: E402
from .test_desktop_lifecycle import desktops_of, domain_states, saved_template  # noqa: E402
from .test_portal import as_user, connect, user_group, user_token  # noqa: E402

GROUPS = "/personal/desktop/"
INSTANCES = "/personal/instance/"


def create_body(world, template, name: str, desktop_type: int, create_info: dict, **extra) -> dict:
    return {"action": "create", "param": {
        "name": name, "template_uuid": template["uuid"], "pool_uuid": world.pool, "network_uuid": world.network["uuid"],
        "subnet_uuid": world.subnet["uuid"], "allocate_type": 1, "vcpu": 1, "ram": 0.25, "sys_restore": 1,
        "data_restore": 0, "desktop_type": desktop_type, "instance_num": sum(create_info.values()), "prefix": name + "pc",
        "postfix": 2, "postfix_start": 1, "create_info": create_info, **extra}}


@pytest_twisted.ensureDeferred
async def test_random_and_static_groups_from_create_to_start_and_to_their_users(tmp_path):
    clock = Clock()
    async with world_of(tmp_path, clock) as world:
        api = world.api
        template = await saved_template(world)
        students, _ = await user_group(api, "students", 4, "s")
        staff, staff_users = await user_group(api, "staff", 2, "st")
        lab = ok(*await api.call("POST", GROUPS, create_body(world, template, "lab", 1, {HOSTS[0]: 2, HOSTS[1]: 1},
                                                           groups=[students["uuid"]])))
        own = ok(*await api.call("POST", GROUPS, create_body(world, template, "own", 2, {HOSTS[1]: 2}, sys_restore=0,
                                                           group_uuid=staff["uuid"], allocates=[
                                                               {"user_uuid": u["uuid"], "name": f"ownpc0{n}"}
                                                               for n, u in enumerate(staff_users, 1)])))
        assert (lab["instance_num"], lab["inactive_count"], own["instance_num"]) == (3, 3, 2)

        # Defined where the create asked, off, each with its own address of the subnet.
        lab_desktops = await desktops_of(world, lab["uuid"])
        own_desktops = await desktops_of(world, own["uuid"])
        assert [(d["name"], d["node_ip"]) for d in lab_desktops + own_desktops] == [
            ("labpc01", HOSTS[0]), ("labpc02", HOSTS[0]), ("labpc03", HOSTS[1]), ("ownpc01", HOSTS[1]), ("ownpc02", HOSTS[1])]
        assert len({d["ipaddr"] for d in lab_desktops + own_desktops}) == 5 and None not in {d["ipaddr"] for d in lab_desktops}
        assert [d["user_name"] for d in own_desktops] == ["st001", "st002"]
        states = {n: "shutoff" for n in ("labpc01", "labpc02", "labpc03", "ownpc01", "ownpc02")}
        assert await domain_states(world) == states

        # An administrator starts the random group: its domains run on their agents.
        ok(*await api.call("POST", GROUPS, {"action": "start", "param": {"desktops": [{"uuid": lab["uuid"], "name": "lab"}]}}))
        states.update(labpc01="running", labpc02="running", labpc03="running")
        assert await domain_states(world) == states
        shown = {g["name"]: g for g in ok(*await api.call("GET", GROUPS))["results"]}
        assert (shown["lab"]["active_count"], shown["own"]["inactive_count"]) == (3, 2)

        # Four students, three desktops: three distinct running desktops, one clear refusal.
        tokens = [await user_token(api, f"s00{n}") for n in range(1, 5)]
        answers = [await connect(api, t) for t in tokens]
        given = [body["data"]["instance"] for status, body in answers if status == 200]
        assert sorted(d["name"] for d in given) == ["labpc01", "labpc02", "labpc03"]
        assert {d["status"] for d in given} == {"active"}
        (refused,) = [body for status, body in answers if status != 200]
        assert refused["code"] == codes.NONE_FREE.code
        listed = ok(*await as_user(api, tokens[0], "GET", "/portal/desktops"))
        assert listed["random"][0]["free"] == 0 and listed["random"][0]["held"]["uuid"] == given[0]["uuid"]

        # A staff user gets their own desktop: the broker starts it on its node; the other stays off.
        mine = ok(*await connect(api, await user_token(api, "st002")))["instance"]
        assert (mine["name"], mine["status"]) == ("ownpc02", "active")
        states.update(ownpc02="running")
        assert await domain_states(world) == states
        page = ok(*await api.call("GET", INSTANCES, params={"desktop_uuid": own["uuid"]}))["results"]
        assert [(d["name"], d["user_name"], d["status"]) for d in page] == [("ownpc01", "st001", "inactive"),
                                                                            ("ownpc02", "st002", "active")]

        # Deleting the groups removes every domain from the nodes.
        ok(*await api.call("DELETE", GROUPS, {"desktops": [{"uuid": g["uuid"], "name": g["name"]} for g in (lab, own)]}))
        await world.core.extensions["desktops.broker"].settled()
        assert await domain_states(world) == {}
        assert await world.core.store.collection("desktops").count({}) == 0
