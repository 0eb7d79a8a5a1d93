"""The tutorial's plugin (tests/plugins_example/kvmdesk_tags.py, built step by step in docs/plugins.md) runs
on kvmdesk.testing alone: CRUD, search, query model, config section, its error codes, the veto, the lifecycle
hooks and the start-up reconcile."""
from __future__ import annotations

import pytest_twisted

from core_testlib import POOLS, load_plugin_module
from kvmdesk.api.openapi import openapi_document
from kvmdesk.testing.api import api_client
from kvmdesk.testing.plugins import plugin_manager

EN = {"Accept-Language": "en"}


def tags_plugin():
    return load_plugin_module("kvmdesk_tags")


def ok(status, body):
    assert status == 200 and body["code"] == 0, (status, body)
    return body["data"]


@pytest_twisted.ensureDeferred
async def test_tags_crud_search_and_english_names(tmp_path):
    async with api_client(tmp_path, plugins=plugin_manager((tags_plugin(), "tags"))) as api:
        red = ok(*await api.call("POST", "/tags", {"name": "red", "color": "#ff0000"}))
        ok(*await api.call("POST", "/tags", {"name": "green"}))
        assert red["pools"] == [] and red["locked"] is False and red["uuid"]

        status, body = await api.call("POST", "/tags", {"name": "red"}, headers=EN)
        assert (status, body["code"], body["msg"]) == (409, 1013, "tag already exists: red")
        status, body = await api.call("POST", "/tags", {"name": "red"})
        assert body["msg"] == "标签已存在: red"
        status, body = await api.call("POST", "/tags", {"name": "blue", "color": "blue"})
        assert status == 400 and body["data"][0]["field"] == "color"

        page = ok(*await api.call("GET", "/tags", params={"searchtype": "contain", "name": "ee"}))
        assert [t["name"] for t in page["results"]] == ["green"]
        edited = ok(*await api.call("PUT", f"/tags/{red['uuid']}", {"color": "#aa0000"}))
        assert edited["color"] == "#aa0000" and edited["name"] == "red"
        status, body = await api.call("GET", "/tags/nope", headers=EN)
        assert (status, body["msg"]) == (404, "tag not found: nope")

        result = ok(*await api.call("DELETE", "/tags", {"uuids": [red["uuid"], "nope"]}, headers=EN))
        assert (result["success_num"], result["failed_num"]) == (1, 1)
        assert result["failures"][0]["msg"] == "tag not found: nope"
        # Every state change is in the operation log with the plugin's labels.
        log = ok(*await api.call("GET", "/index/get_operation_log/", params={"page_size": 50}))
        assert {"新增标签", "编辑标签", "删除标签"} <= {entry["content"].split(":")[0] for entry in log["results"]}


@pytest_twisted.ensureDeferred
async def test_the_query_model_validates_and_is_documented(tmp_path):
    async with api_client(tmp_path, plugins=plugin_manager((tags_plugin(), "tags"))) as api:
        for name in ("alpha", "alps", "beta"):
            ok(*await api.call("POST", "/tags", {"name": name}))
        assert ok(*await api.call("GET", "/tags/suggest", params={"prefix": "al"})) == ["alpha", "alps"]
        assert ok(*await api.call("GET", "/tags/suggest", params={"prefix": "al", "limit": "1"})) == ["alpha"]
        status, body = await api.call("GET", "/tags/suggest", params={"prefix": "al", "limit": "500"})
        assert status == 400 and body["code"] == 1002 and body["data"][0]["field"] == "limit"
        status, body = await api.call("GET", "/tags/suggest", params={"prefix": "al", "color": "x"})
        assert status == 400 and body["data"][0]["field"] == "color"  # an unknown parameter is refused
        status, body = await api.call("GET", "/tags/suggest")
        assert status == 400 and body["data"][0]["field"] == "prefix"

        operation = openapi_document(api.core.router)["paths"]["/api/v1.0/tags/suggest"]["get"]
        params = {p["name"]: p for p in operation["parameters"]}
        assert params["prefix"]["required"] is True and params["prefix"]["in"] == "query"
        assert params["limit"]["required"] is False and params["limit"]["schema"]["maximum"] == 50


@pytest_twisted.ensureDeferred
async def test_veto_lifecycle_and_config(tmp_path):
    config = {"tags": {"max_per_pool": 1}}
    async with api_client(tmp_path, plugins=plugin_manager((tags_plugin(), "tags")), config=config) as api:
        pool = ok(*await api.call("POST", POOLS, {"name": "lab", "desc": ""}))
        locked = ok(*await api.call("POST", "/tags", {"name": "keep", "locked": True}))
        other = ok(*await api.call("POST", "/tags", {"name": "other"}))
        attach = {"action": "attach", "param": {"pool_uuid": pool["uuid"]}}
        ok(*await api.call("POST", f"/tags/{locked['uuid']}/pools", attach))
        status, body = await api.call("POST", f"/tags/{other['uuid']}/pools", attach, headers=EN)
        assert (status, body["code"], body["msg"]) == (409, 9102, "a resource pool takes at most 1 tags")

        # The veto: the pool carries a locked tag.
        status, body = await api.call("DELETE", POOLS, {"uuids": [pool["uuid"]]}, headers=EN)
        assert status == 409 and body["code"] == 1019 and "locked tags keep" in body["msg"], body
        status, body = await api.call("DELETE", "/tags", {"uuids": [locked["uuid"]]})
        assert (status, body["code"]) == (409, 9101)

        ok(*await api.call("PUT", f"/tags/{locked['uuid']}", {"locked": False}))
        ok(*await api.call("DELETE", POOLS, {"uuids": [pool["uuid"]]}))
        # kvmdesk_deleted: the pool left the tag.
        assert ok(*await api.call("GET", f"/tags/{locked['uuid']}"))["pools"] == []


@pytest_twisted.ensureDeferred
async def test_reconcile_after_running_blocked(tmp_path):
    tags = tags_plugin()
    async with api_client(tmp_path, plugins=plugin_manager((tags, "tags"))) as api:
        pool = ok(*await api.call("POST", POOLS, {"name": "lab", "desc": ""}))
        tag = ok(*await api.call("POST", "/tags", {"name": "t"}))
        ok(*await api.call("POST", f"/tags/{tag['uuid']}/pools", {"action": "attach", "param": {"pool_uuid": pool["uuid"]}}))
    # A run with the plugin blocked: the pool goes and nobody tells the tags.
    async with api_client(tmp_path, plugins=plugin_manager((tags, "tags"), blocked=["tags"])) as api:
        assert api.core.plugins.get_plugin("tags") is None
        ok(*await api.call("DELETE", POOLS, {"uuids": [pool["uuid"]]}))
        assert (await api.core.store.collection("tags").find_one({"uuid": tag["uuid"]}))["pools"] == [pool["uuid"]]
    async with api_client(tmp_path, plugins=plugin_manager((tags, "tags"))) as api:
        assert ok(*await api.call("GET", f"/tags/{tag['uuid']}"))["pools"] == []
