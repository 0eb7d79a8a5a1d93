"""Lifecycle hooks: every resource kind announces kvmdesk_created/updated/deleted after a change (no secrets),
a failing listener does not undo the change, and kvmdesk_reconcile runs at start-up."""
from __future__ import annotations

import pytest_twisted

from core_testlib import POOLS, running_api
from kvmdesk import hookimpl
from kvmdesk.core.records import SECRET_FIELDS
from kvmdesk.testing.plugins import LifecycleRecorder, plugin_manager

SWITCHES = "/resource_mgr/vswitchs"  # the spelling of the contract
NETWORKS = "/resource_mgr/data_networks"
GROUPS = "/personal/group"
USERS = "/personal/user/"


def ok(status, body):
    assert status == 200 and body["code"] == 0, (status, body)
    return body["data"]


def no_secrets(recorder: LifecycleRecorder) -> None:
    for event in recorder.events:
        assert not SECRET_FIELDS & set(event.record), event
        assert not SECRET_FIELDS & set(event.changes or {}), event


@pytest_twisted.ensureDeferred
async def test_pools_announce_create_update_delete(tmp_path, clock):
    recorder = LifecycleRecorder()
    async with running_api(tmp_path, clock, plugins=plugin_manager(recorder)) as api:
        pool = ok(*await api.call("POST", POOLS, {"name": "lab-1", "desc": "d"}))
        ok(*await api.call("PUT", f"{POOLS}/{pool['uuid']}", {"name": "lab-2"}))
        ok(*await api.call("DELETE", POOLS, {"uuids": [pool["uuid"]]}))
        events = recorder.of("resource_pool")
        assert [e.hook for e in events] == ["created", "updated", "deleted"]
        assert {e.record["uuid"] for e in events} == {pool["uuid"]}
        assert events[0].record["name"] == "lab-1"
        assert events[1].record["name"] == "lab-2" and events[1].changes["name"] == "lab-2"
        assert events[2].record["name"] == "lab-2"
        # A refused change announces nothing.
        status, _ = await api.call("PUT", f"{POOLS}/{pool['uuid']}", {"name": "x"})
        assert status == 404 and len(recorder.of("resource_pool")) == 3


@pytest_twisted.ensureDeferred
async def test_switches_networks_and_subnets_announce_their_changes(tmp_path, clock):
    recorder = LifecycleRecorder()
    async with running_api(tmp_path, clock, plugins=plugin_manager(recorder)) as api:
        switch = ok(*await api.call("POST", SWITCHES, {"name": "sw1", "type": "vlan", "uplinks": []}))
        ok(*await api.call("PUT", f"{SWITCHES}/{switch['uuid']}", {"desc": "edited"}))
        subnet_info = {"name": "s1", "start_ip": "10.0.0.10", "end_ip": "10.0.0.20", "netmask": "255.255.255.0",
                       "gateway": "10.0.0.1", "dns1": "10.0.0.1"}
        network = ok(*await api.call("POST", NETWORKS, {"name": "n1", "switch_uuid": switch["uuid"], "vlan_id": 10,
                                                         "subnet_info": subnet_info}))
        ok(*await api.call("PUT", f"{NETWORKS}/{network['uuid']}", {"name": "n2"}))
        subnets = f"{NETWORKS}/{network['uuid']}/sub_networks"
        second = ok(*await api.call("POST", subnets, {**subnet_info, "name": "s2", "start_ip": "10.0.0.30",
                                                       "end_ip": "10.0.0.40"}))
        ok(*await api.call("PUT", f"{subnets}/{second['uuid']}", {"desc": "second"}))
        ok(*await api.call("DELETE", subnets, {"uuids": [second["uuid"]]}))
        ok(*await api.call("DELETE", NETWORKS, {"uuids": [network["uuid"]]}))
        ok(*await api.call("DELETE", SWITCHES, {"uuids": [switch["uuid"]]}))

        assert [e.hook for e in recorder.of("vswitch")] == ["created", "updated", "deleted"]
        assert recorder.of("vswitch", "updated")[0].changes["desc"] == "edited"
        assert [e.hook for e in recorder.of("data_network")] == ["created", "updated", "deleted"]
        assert recorder.of("data_network", "deleted")[0].record["name"] == "n2"
        subnet_events = [(e.hook, e.record["name"]) for e in recorder.of("subnet")]
        # The first subnet came with its network and went with it.
        assert subnet_events == [("created", "s1"), ("created", "s2"), ("updated", "s2"), ("deleted", "s2"),
                                 ("deleted", "s1")]
        no_secrets(recorder)


@pytest_twisted.ensureDeferred
async def test_groups_and_users_announce_their_changes_without_password_hashes(tmp_path, clock):
    recorder = LifecycleRecorder()
    async with running_api(tmp_path, clock, plugins=plugin_manager(recorder)) as api:
        group = ok(*await api.call("POST", GROUPS, {"name": "g1", "group_type": 2}))
        other = ok(*await api.call("POST", GROUPS, {"name": "g2", "group_type": 2}))
        ok(*await api.call("PUT", GROUPS, {"uuid": group["uuid"], "value": {"name": "g1b"}}))
        user = ok(*await api.call("POST", USERS, {"action": "single_create", "param": {
            "group_uuid": group["uuid"], "user_name": "u1", "passwd": "password1"}}))
        ok(*await api.call("POST", USERS, {"action": "multi_create", "param": {
            "group_uuid": group["uuid"], "prefix": "m", "postfix": 2, "postfix_start": 1, "user_num": 3,
            "passwd": "password2", "enabled": 1}}))
        ok(*await api.call("PUT", USERS, {"uuid": user["uuid"], "value": {
            "user_name": "u1", "group_uuid": group["uuid"], "passwd": "password3"}}))
        ok(*await api.call("POST", USERS, {"action": "disable", "param": {"users": [{"uuid": user["uuid"]}]}}))
        ok(*await api.call("POST", USERS, {"action": "move", "param": {"group_uuid": other["uuid"],
                                                                          "users": [{"uuid": user["uuid"]}]}}))
        ok(*await api.call("DELETE", USERS, {"users": [{"uuid": user["uuid"]}]}))

        created = [e.record["user_name"] for e in recorder.of("user", "created")]
        assert created == ["u1", "m01", "m02", "m03"]
        updates = [e.changes for e in recorder.of("user", "updated")]
        assert len(updates) == 3 and updates[1]["enabled"] is False and updates[2]["group"] == other["uuid"]
        assert "password_hash" not in updates[0]  # the password changed; the hook is not told the hash
        assert [e.record["uuid"] for e in recorder.of("user", "deleted")] == [user["uuid"]]
        ok(*await api.call("DELETE", GROUPS, {"groups": [{"uuid": other["uuid"], "name": "g2"}]}))
        assert [e.hook for e in recorder.of("user_group")] == ["created", "created", "updated", "deleted"]
        no_secrets(recorder)


class _Failing:
    @hookimpl
    def kvmdesk_created(self, core, kind, record):
        raise RuntimeError("listener broke")


@pytest_twisted.ensureDeferred
async def test_a_failing_listener_does_not_undo_the_change(tmp_path, clock):
    recorder = LifecycleRecorder()
    async with running_api(tmp_path, clock, plugins=plugin_manager((_Failing(), "failing"), recorder)) as api:
        pool = ok(*await api.call("POST", POOLS, {"name": "kept", "desc": ""}))
        assert await api.core.store.collection("resource_pools").find_one({"uuid": pool["uuid"]}) is not None
        assert [e.record["name"] for e in recorder.of("resource_pool")] == ["kept"]


class _Reconciler:
    """Keeps pool uuids it cares about; forgets those that vanished while it was blocked."""

    def __init__(self, known: set[str]):
        self.known = known

    @hookimpl
    def kvmdesk_deleted(self, core, kind, record):
        if kind == "resource_pool":
            self.known.discard(record["uuid"])

    @hookimpl
    async def kvmdesk_reconcile(self, core):
        pools = await core.store.collection("resource_pools").find({}, projection=["uuid"])
        self.known &= {p["uuid"] for p in pools}


@pytest_twisted.ensureDeferred
async def test_reconcile_repairs_what_a_blocked_plugin_missed(tmp_path, clock):
    async with running_api(tmp_path, clock, plugins=plugin_manager()) as api:
        pool = ok(*await api.call("POST", POOLS, {"name": "gone", "desc": ""}))
        ok(*await api.call("DELETE", POOLS, {"uuids": [pool["uuid"]]}))  # no reconciler loaded: nobody heard
    reconciler = _Reconciler({pool["uuid"], "another-gone"})
    async with running_api(tmp_path, clock, plugins=plugin_manager((reconciler, "reconciler"))):
        assert reconciler.known == set()
