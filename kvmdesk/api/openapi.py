"""The OpenAPI 3 document, generated from the registered endpoints and their pydantic models."""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from kvmdesk import __version__

if TYPE_CHECKING:  # pragma: no cover
    from kvmdesk.api.router import Endpoint, Router

_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_TYPES = {str: "string", int: "integer", bool: "boolean", float: "number"}

ENVELOPE = {
    "type": "object",
    "required": ["code", "msg"],
    "properties": {"code": {"type": "integer", "description": "0 on success"}, "msg": {"type": "string"}, "data": {}},
}


def _schema(model: Any, components: dict) -> dict:
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    for name, sub in schema.pop("$defs", {}).items():
        components[name] = sub
    components[model.__name__] = schema
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _query_parameters(model: Any) -> list[dict]:
    """The fields of a ``query=`` model as OpenAPI query parameters (their JSON schemas, limits included)."""
    schema = model.model_json_schema()
    required = set(schema.get("required", ()))
    return [{"name": name, "in": "query", "required": name in required, "schema": field}
            for name, field in schema.get("properties", {}).items()]


def _operation(spec: "Endpoint", components: dict) -> dict:
    op: dict[str, Any] = {
        "summary": spec.summary,
        "tags": list(spec.tags) or ["default"],
        "operationId": f"{spec.method.lower()}_{spec.path.strip('/').replace('/', '_').replace('{', '').replace('}', '')}",
        "responses": {
            "200": {"description": "success", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Envelope"}}}},
            "default": {"description": "error envelope", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Envelope"}}}},
        },
    }
    params = [{"name": n, "in": "path", "required": True, "schema": {"type": "string"}} for n in _PARAM.findall(spec.path)]
    if spec.paged or spec.search_fields:
        params += [
            {"name": "page", "in": "query", "schema": {"type": "integer", "minimum": 1}},
            {"name": "page_size", "in": "query", "schema": {"type": "integer", "minimum": 1}},
        ]
    if spec.search_fields:
        params.append({"name": "searchtype", "in": "query", "schema": {"type": "string", "enum": ["all", "contain", "single"]}})
        params += [{"name": n, "in": "query", "schema": {"type": _TYPES.get(t, "string")}} for n, t in spec.search_fields.items()]
    if spec.query is not None:
        params += _query_parameters(spec.query)
    if params:
        op["parameters"] = params
    if spec.actions is not None:
        variants = []
        for name, action in spec.actions.items():
            param = _schema(action.param, components) if action.param is not None else {"type": "object"}
            variants.append({
                "type": "object", "title": name, "description": action.summary, "required": ["action"],
                "properties": {"action": {"type": "string", "enum": [name]}, "param": param},
            })
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": {"oneOf": variants}}}}
    elif spec.body is not None and not spec.raw_body:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": _schema(spec.body, components)}}}
    elif spec.raw_body:
        # Uploads: the body model (if any) describes the form's fields.
        form = _schema(spec.body, components) if spec.body is not None else {"type": "object"}
        op["requestBody"] = {"required": True, "content": {"multipart/form-data": {"schema": form}}}
    if spec.auth:
        op["security"] = [{"bearer": []}]
    else:
        op["security"] = []
    return op


def openapi_document(router: "Router") -> dict:
    """Build the document for every endpoint of ``router``."""
    components: dict[str, Any] = {"Envelope": ENVELOPE}
    paths: dict[str, dict] = {}
    for spec in router.registry:
        paths.setdefault(router.prefix + spec.path, {})[spec.method.lower()] = _operation(spec, components)
    return {
        # 3.1: its schema dialect is JSON Schema 2020-12, which is what pydantic generates
        # (``{"type": "null"}`` for Optional fields is invalid in 3.0).
        "openapi": "3.1.0",
        "info": {"title": "kvmdesk API", "version": __version__},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
