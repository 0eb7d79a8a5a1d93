import pytest_twisted

from kvmdesk.testing.api import api_client


@pytest_twisted.ensureDeferred
async def test_login_and_default_pool(tmp_path):
    async with api_client(tmp_path) as api:
        status, body = await api.call("GET", "/resource_mgr/resource_pools")
        assert status == 200 and body["code"] == 0
        assert [p["name"] for p in body["data"]["results"]] == ["default"]
