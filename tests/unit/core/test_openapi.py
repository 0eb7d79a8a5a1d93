"""The OpenAPI document at /api/v1.0/openapi.json: valid OpenAPI 3, every registered endpoint in it."""
from __future__ import annotations

import re

import pytest_twisted

from core_testlib import load_example_plugin, plugins_with, running_api

try:  # the validator is a test-only extra; without it the structural checks below still run
    from openapi_spec_validator import validate as validate_spec
except ImportError:  # pragma: no cover
    validate_spec = None

_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_METHODS = {"get", "put", "post", "delete", "patch", "options", "head", "trace"}


def _check_structure(doc: dict) -> None:
    assert re.fullmatch(r"3\.\d+\.\d+", doc["openapi"]), doc["openapi"]
    assert doc["info"]["title"] and doc["info"]["version"]
    schemas = doc["components"]["schemas"]
    for path, item in doc["paths"].items():
        assert path.startswith("/api/v1.0/"), path
        for method, op in item.items():
            assert method in _METHODS
            assert op["responses"], (path, method)
            declared = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert declared == set(_PARAM.findall(path)), (path, method)
    refs = re.findall(r"'\$ref': '#/components/schemas/([^']+)'", repr(doc))
    assert refs and all(ref in schemas for ref in refs), set(refs) - set(schemas)
    operation_ids = [op["operationId"] for item in doc["paths"].values() for op in item.values()]
    assert len(operation_ids) == len(set(operation_ids)), "operationIds must be unique"


async def _document(api) -> dict:
    status, doc = await api.call("GET", "/openapi.json", auth=False)
    assert status == 200
    return doc


@pytest_twisted.ensureDeferred
async def test_document_is_valid_openapi(api):
    doc = await _document(api)
    _check_structure(doc)
    if validate_spec is not None:
        validate_spec(doc)


@pytest_twisted.ensureDeferred
async def test_every_registered_endpoint_is_documented(tmp_path, clock):
    example = load_example_plugin()
    async with running_api(tmp_path, clock, plugins=plugins_with((example, "example"))) as api:
        doc = await _document(api)
        _check_structure(doc)
        if validate_spec is not None:
            validate_spec(doc)
        registry = api.core.router.registry
        assert len(registry) >= 8
        for spec in registry:
            op = doc["paths"][api.core.router.prefix + spec.path][spec.method.lower()]
            assert op["summary"] == spec.summary
            assert op["security"] == ([{"bearer": []}] if spec.auth else [])
        documented = sum(len(item) for item in doc["paths"].values())
        assert documented == len(registry)


@pytest_twisted.ensureDeferred
async def test_bodies_queries_and_actions_are_described(tmp_path, clock):
    async with running_api(tmp_path, clock, plugins=plugins_with((load_example_plugin(), "example"))) as api:
        doc = await _document(api)
        schemas = doc["components"]["schemas"]
        pools = doc["paths"]["/api/v1.0/resource_mgr/resource_pools"]
        create = pools["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert create == {"$ref": "#/components/schemas/PoolCreate"}
        assert set(schemas["PoolCreate"]["required"]) == {"name", "desc"}
        assert schemas["PoolCreate"]["additionalProperties"] is False
        query = {p["name"] for p in pools["get"]["parameters"]}
        assert {"page", "page_size", "searchtype", "name", "status"} <= query
        variants = doc["paths"]["/api/v1.0/example/counter"]["post"]["requestBody"]["content"]["application/json"][
            "schema"]["oneOf"]
        assert {v["title"] for v in variants} == {"add", "reset"}
        add = next(v for v in variants if v["title"] == "add")
        assert add["properties"]["param"] == {"$ref": "#/components/schemas/AddParam"}
        assert doc["paths"]["/api/v1.0/auth/login"]["post"]["security"] == []


@pytest_twisted.ensureDeferred
async def test_document_is_served_with_and_without_token(api):
    with_token = await _document(api)
    status, body = await api.call("GET", "/openapi.json/")
    assert status == 200 and body == with_token
