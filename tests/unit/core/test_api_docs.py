"""The API's description is public (README "API conventions"): /openapi.json and its browsable page /docs answer
without a token; every other operation without a token is one that authenticates otherwise."""
from __future__ import annotations

import re
from pathlib import Path

import pytest_twisted

from core_testlib import running_api

#: The whole list of operations that take no bearer token, and why (README.md says the same).
PUBLIC = {
    ("POST", "/auth/login"): "it hands out the token",
    ("GET", "/openapi.json"): "the API's description, no data",
    ("GET", "/docs"): "the same, as a page",
    ("GET", "/personal/user/download"): "an expiring signed link",
    ("POST", "/agent/events"): "HMAC-signed by the node's agent",
    ("POST", "/portal/login"): "it hands out a desktop user's token",
    ("POST", "/portal/logout"): "a desktop user's token, checked by the portal (no administrator's)",
    ("GET", "/portal/desktops"): "a desktop user's token, checked by the portal (no administrator's)",
    ("POST", "/portal/connect"): "a desktop user's token, checked by the portal (no administrator's)",
}


@pytest_twisted.ensureDeferred
async def test_the_public_operations_are_exactly_the_documented_ones(tmp_path, clock):
    async with running_api(tmp_path, clock, login=False) as api:
        public = {(spec.method, spec.path) for spec in api.core.router.registry if not spec.auth}
        assert public == set(PUBLIC)
        readme = (Path(__file__).resolve().parents[3] / "README.md").read_text(encoding="utf-8")
        assert "`/api/v1.0/openapi.json` and `/api/v1.0/docs` are served without a token" in readme


@pytest_twisted.ensureDeferred
async def test_the_docs_page_is_served_without_a_token_and_loads_nothing_from_elsewhere(tmp_path, clock):
    async with running_api(tmp_path, clock, login=False) as api:
        for path in ("/docs", "/docs/"):
            response = await api.raw("GET", path)
            page = (await response.content()).decode()
            assert response.code == 200, page
            assert response.headers.getRawHeaders(b"content-type") == [b"text/html; charset=utf-8"]
            assert "openapi.json" in page and "<script>" in page
            assert not re.search(r"""(src|href)=["']?(https?:)?//""", page), "the page must not load from the internet"
        status, document = await api.call("GET", "/openapi.json", auth=False)
        assert status == 200 and document["paths"]["/api/v1.0/docs"]["get"]["security"] == []


@pytest_twisted.ensureDeferred
async def test_the_readme_table_has_every_endpoint_group(tmp_path, clock):
    async with running_api(tmp_path, clock, login=False) as api:
        status, document = await api.call("GET", "/openapi.json", auth=False)
        tags = {op["tags"][0] for methods in document["paths"].values() for op in methods.values()}
    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text(encoding="utf-8")
    table = readme.split("### Endpoint groups", 1)[1].split("\n## ", 1)[0]
    rows = set(re.findall(r"^\| `([\w-]+)` \|", table, re.M))
    assert rows == tags
