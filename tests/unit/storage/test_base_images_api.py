"""Base image endpoints (#21-#26) without transfers running: shapes, paging, edit, delete rules, resync checks."""
from __future__ import annotations

import pytest_twisted

from kvmdesk.core.records import new_record
from storage_testlib import UsagePlugin, add_node, controller, files_in, small_qcow2

CONTRACT_FIELDS = {"uuid", "name", "path", "os_type", "os_type_simple", "md5_sum", "size", "count", "publish_count",
                   "status", "detail"}


async def upload(api, image, name, os_type="Windows 7 bit 64", pool=None):
    return await api.upload(f"/resource_mgr/resource_pools/{pool or api.pool}/base_images",
                            {"name": name, "os_type": os_type}, {"file": (f"{name}.qcow2", image)})


@pytest_twisted.ensureDeferred
async def test_list_and_detail_have_the_contract_shape(tmp_path, clock):
    image = small_qcow2(tmp_path / "x.qcow2").read_bytes()
    async with controller(tmp_path, clock) as api:
        nodes = [await add_node(api.core, api.pool, f"10.0.0.{i}", f"compute{i}") for i in (1, 2)]
        for i in range(3):
            status, body = await upload(api, image, f"img-{i}")
            assert status == 200, body
        base = f"/resource_mgr/resource_pools/{api.pool}/base_images"
        status, body = await api.call("GET", base, params={"page": 1, "page_size": 2})
        page = body["data"]
        assert page["count"] == 3 and len(page["results"]) == 2 and page["previous"] is None
        assert "page=2" in page["next"]
        first = page["results"][0]
        assert CONTRACT_FIELDS <= set(first) and "file" not in first
        assert isinstance(first["size"], str) and first["os_type_simple"] == "win7"
        assert (first["count"], first["publish_count"], first["status"]) == (2, 0, 1)
        assert first["detail"] == [
            {"host_name": "compute1", "ipaddr": "10.0.0.1", "host_uuid": nodes[0]["uuid"], "progress": 0, "status": 1},
            {"host_name": "compute2", "ipaddr": "10.0.0.2", "host_uuid": nodes[1]["uuid"], "progress": 0, "status": 1},
        ]
        status, body = await api.call("GET", base, params={"searchtype": "contain", "name": "g-2"})
        assert [i["name"] for i in body["data"]["results"]] == ["img-2"]
        status, body = await api.call("GET", base, params={"searchtype": "single", "name": "img-1"})
        assert body["data"]["name"] == "img-1" and body["data"]["count"] == 2
        status, body = await api.call("GET", f"{base}/{first['uuid']}")
        assert status == 200 and body["data"]["uuid"] == first["uuid"] and CONTRACT_FIELDS <= set(body["data"])
        status, body = await api.call("GET", "/resource_mgr/resource_pools/nope/base_images")
        assert status == 404
        status, body = await api.call("GET", f"{base}/nope")
        assert status == 404 and body["code"] == 1012


@pytest_twisted.ensureDeferred
async def test_status_reflects_the_nodes(tmp_path, clock):
    image = small_qcow2(tmp_path / "x.qcow2").read_bytes()
    async with controller(tmp_path, clock) as api:
        nodes = [await add_node(api.core, api.pool, f"10.0.0.{i}", f"n{i}") for i in (1, 2)]
        status, body = await upload(api, image, "img")
        uuid = body["data"]["uuid"]
        transfers = api.core.store.collection("image_transfers")
        await transfers.update_one({"node_uuid": nodes[0]["uuid"]}, {"$set": {"status": 0, "progress": 100}})
        await transfers.update_one({"node_uuid": nodes[1]["uuid"]}, {"$set": {"status": 2, "progress": 37}})
        status, body = await api.call("GET", f"/resource_mgr/resource_pools/{api.pool}/base_images/{uuid}")
        data = body["data"]
        assert (data["count"], data["publish_count"], data["status"]) == (2, 1, 2)
        assert [(d["progress"], d["status"]) for d in data["detail"]] == [(100, 0), (37, 2)]
        await transfers.update_one({"node_uuid": nodes[1]["uuid"]}, {"$set": {"status": 0, "progress": 100}})
        status, body = await api.call("GET", f"/resource_mgr/resource_pools/{api.pool}/base_images/{uuid}")
        assert (body["data"]["publish_count"], body["data"]["status"]) == (2, 0)


@pytest_twisted.ensureDeferred
async def test_edit_derives_os_type_simple(tmp_path, clock):
    image = small_qcow2(tmp_path / "x.qcow2").read_bytes()
    async with controller(tmp_path, clock) as api:
        first = (await upload(api, image, "a"))[1]["data"]
        await upload(api, image, "b")
        base = f"/resource_mgr/resource_pools/{api.pool}/base_images"
        status, body = await api.call("PUT", f"{base}/{first['uuid']}", {"name": "a2", "os_type": "Windows 10 x64"})
        assert status == 200 and (body["data"]["name"], body["data"]["os_type_simple"]) == ("a2", "win10")
        status, body = await api.call("PUT", f"{base}/{first['uuid']}", {"name": "b", "os_type": "x"})
        assert status == 409 and body["code"] == 1013
        status, body = await api.call("PUT", f"{base}/{first['uuid']}", {"name": "c"})
        assert status == 400 and body["data"][0]["field"] == "os_type"
        status, body = await api.call("PUT", f"{base}/nope", {"name": "c", "os_type": "x"})
        assert status == 404


@pytest_twisted.ensureDeferred
async def test_delete_is_refused_while_a_template_uses_the_image(tmp_path, clock):
    usage = UsagePlugin()
    image = small_qcow2(tmp_path / "x.qcow2").read_bytes()
    async with controller(tmp_path, clock, usage) as api:
        used = (await upload(api, image, "used"))[1]["data"]
        free = (await upload(api, image, "free"))[1]["data"]
        usage.in_use[("base_image", used["uuid"])] = "模板 teacher-win7 正在使用"
        base = f"/resource_mgr/resource_pools/{api.pool}/base_images"
        status, body = await api.call("DELETE", base, {"uuids": [used["uuid"]]})
        assert status == 409 and body["code"] == 1019 and "teacher-win7" in body["msg"]
        status, body = await api.call("DELETE", base, {"uuids": [used["uuid"], free["uuid"]]})
        assert status == 200 and (body["data"]["success_num"], body["data"]["failed_num"]) == (1, 1)
        directory = api.core.extensions["storage.settings"].base_image_dir
        assert files_in(directory) == [used["uuid"]]
        status, body = await api.call("DELETE", base, {"uuids": []})
        assert status == 400 and body["code"] == 1018
        # The pool cannot go while it still has base images.
        reason = await api.core.usage("resource_pool", api.pool)
        assert (reason.text("zh"), reason.text("en")) == ("还有 1 个基础镜像", "1 base images in it")


@pytest_twisted.ensureDeferred
async def test_resync_checks_node_and_pool(tmp_path, clock):
    image = small_qcow2(tmp_path / "x.qcow2").read_bytes()
    async with controller(tmp_path, clock) as api:
        other_pool = await api.core.store.collection("resource_pools").insert_one(
            new_record(clock, name="other", desc=None, status=0, default=0))
        stranger = await add_node(api.core, other_pool["uuid"], "10.9.9.9", "stranger")
        uuid = (await upload(api, image, "img"))[1]["data"]["uuid"]
        path = f"/resource_mgr/resource_pools/{api.pool}/base_images/{uuid}/resync"
        status, body = await api.call("POST", path, {"node_uuid": stranger["uuid"]})
        assert status == 400 and body["code"] == 4010
        status, body = await api.call("POST", path, {})
        assert status == 400 and body["data"][0]["field"] == "node_uuid"
        status, body = await api.call("POST", f"/resource_mgr/resource_pools/{api.pool}/base_images/nope/resync",
                                      {"node_uuid": stranger["uuid"]})
        assert status == 404


@pytest_twisted.ensureDeferred
async def test_operations_are_logged(tmp_path, clock):
    image = small_qcow2(tmp_path / "x.qcow2").read_bytes()
    async with controller(tmp_path, clock) as api:
        await upload(api, image, "logged-image")
        status, body = await api.call("GET", "/index/get_operation_log/")
        contents = [r["content"] for r in body["data"]["results"]]
        assert any("上传基础镜像" in c and "logged-image" in c for c in contents), contents


@pytest_twisted.ensureDeferred
async def test_openapi_documents_the_upload_form(tmp_path, clock):
    async with controller(tmp_path, clock) as api:
        status, doc = await api.call("GET", "/openapi.json", auth=False)
        operation = doc["paths"]["/api/v1.0/resource_mgr/resource_pools/{pool_uuid}/base_images"]["post"]
        schema = operation["requestBody"]["content"]["multipart/form-data"]["schema"]
        assert "$ref" in schema or schema.get("type") == "object"
        for path in ("/api/v1.0/resource_mgr/isos", "/api/v1.0/resource_mgr/isos/{iso_uuid}",
                     "/api/v1.0/resource_mgr/nodes/{node_uuid}/template_images",
                     "/api/v1.0/resource_mgr/nodes/{node_uuid}/template_images/{image_uuid}/resync"):
            assert path in doc["paths"]
