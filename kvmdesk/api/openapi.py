"""The OpenAPI 3 document, generated from the registered endpoints and their pydantic models."""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import orjson

from kvmdesk import __version__
from kvmdesk.core.errors import SEARCH_NEEDS_FILTER, UNKNOWN_FILTER
from kvmdesk.core.paging import SEARCH_TYPES

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
    """``model``'s schema among the document's components; a ``$ref`` to it.

    Two plugins may name different models alike (``Uplink``): a name already taken by another schema
    gets the model's module in front, and the references inside this schema follow.
    """
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    defs = schema.pop("$defs", {})
    names = {name: _free_name(name, sub, components, model) for name, sub in {**defs, model.__name__: schema}.items()}
    renamed = {old: new for old, new in names.items() if old != new}
    if renamed:
        text = orjson.dumps({"defs": defs, "schema": schema}).decode()
        for old, new in renamed.items():
            text = text.replace(f'"#/components/schemas/{old}"', f'"#/components/schemas/{new}"')
        loaded = orjson.loads(text)
        defs, schema = loaded["defs"], loaded["schema"]
    for name, sub in defs.items():
        components[names[name]] = sub
    components[names[model.__name__]] = schema
    return {"$ref": f"#/components/schemas/{names[model.__name__]}"}


def _query_parameters(model: Any) -> list[dict]:
    """The fields of a ``query=`` model as OpenAPI query parameters (their JSON schemas, limits included)."""
    schema = model.model_json_schema()
    required = set(schema.get("required", ()))
    return [{"name": name, "in": "query", "required": name in required, "schema": field}
            for name, field in schema.get("properties", {}).items()]


def _free_name(name: str, schema: dict, components: dict, model: Any) -> str:
    if components.get(name, schema) == schema:
        return name
    qualified = f"{model.__module__.replace('kvmdesk.plugins.', '').replace('.', '_')}_{name}"
    return qualified if components.get(qualified, schema) == schema else f"{qualified}_{model.__qualname__}"


def _filter_schema(kind: Any) -> dict:
    """A filter field's schema: its type, and the values it takes for a :class:`~kvmdesk.core.paging.Choice`."""
    values = getattr(kind, "values", None)
    if values is not None:
        return {"type": _TYPES.get(kind.kind, "string"), "enum": list(values)}
    schema: dict[str, Any] = {"type": _TYPES.get(kind, "string")}
    if kind is int:
        schema.update(minimum=-(2**63), maximum=2**63 - 1)  # what the stores hold (paging refuses the rest)
    return schema


def _config(router: "Router", key: str, default: Any) -> Any:
    config = getattr(getattr(router, "core", None), "config", None)
    return config.get(key, default) if config is not None else default


def _paging(max_page_size: int) -> list[dict]:
    """``page`` and ``page_size`` as :mod:`kvmdesk.core.paging` takes them (the same configuration)."""
    return [
        # any page number: one past the last record is an empty page
        {"name": "page", "in": "query", "schema": {"type": "integer", "minimum": 1}},
        {"name": "page_size", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": max_page_size}},
    ]


SEARCHTYPE = {
    "name": "searchtype", "in": "query", "schema": {"type": "string", "enum": list(SEARCH_TYPES)},
    "description": "all (default): the filters match by equality; contain: by substring; single: one record "
                   "(404 if none), not a page. contain and single need at least one field filter (400 "
                   f"code {SEARCH_NEEDS_FILTER.code} otherwise); any other query parameter is refused "
                   f"(400 code {UNKNOWN_FILTER.code}).",
}


def _operation(spec: "Endpoint", components: dict, max_page_size: int = 1000) -> dict:
    envelope = {"application/json": {"schema": {"$ref": "#/components/schemas/Envelope"}}}
    success = {} if spec.file_only else dict(envelope)
    # A file answer (a download): 200 whole, 206 a byte range; the ``Accept`` header picks where both exist.
    # A JSON file (this document itself) is an object, not the envelope.
    success.update({media: {"schema": {"type": "object"} if media == "application/json" else
                            {"type": "string", "format": "binary"}} for media in spec.produces})
    responses: dict[str, Any] = {"200": {"description": "success", "content": success}}
    if spec.produces:
        responses["206"] = {"description": "one byte range of the file (Range request)",
                            "content": {media: {"schema": {"type": "string", "format": "binary"}} for media in spec.produces}}
    responses["default"] = {"description": "error envelope", "content": envelope}
    op: dict[str, Any] = {
        "summary": spec.summary,
        "tags": list(spec.tags) or ["default"],
        "operationId": f"{spec.method.lower()}_{spec.path.strip('/').replace('/', '_').replace('{', '').replace('}', '')}",
        "responses": responses,
    }
    params = [{"name": n, "in": "path", "required": True, "schema": {"type": "string"}} for n in _PARAM.findall(spec.path)]
    if spec.paged or spec.search_fields:
        params += _paging(max_page_size)
    if spec.search_fields:
        params.append(dict(SEARCHTYPE))
        params += [{"name": n, "in": "query", "schema": _filter_schema(t)} for n, t in spec.search_fields.items()]
    if spec.query is not None:
        params += _query_parameters(spec.query)
    if params:
        op["parameters"] = params
    if spec.actions is not None:
        variants = []
        for name, action in spec.actions.items():
            param = _schema(action.param, components) if action.param is not None else {"type": "object"}
            # the body is {"action", "param"} and nothing else; param may be left out only where its
            # model needs no field
            needs_param = action.param is not None and bool(action.param.model_json_schema().get("required"))
            variants.append({
                "type": "object", "title": name, "description": action.summary,
                "required": ["action", "param"] if needs_param else ["action"], "additionalProperties": False,
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
    max_page_size = int(_config(router, "api.max_page_size", 1000))
    for spec in router.registry:
        paths.setdefault(router.prefix + spec.path, {})[spec.method.lower()] = _operation(spec, components, max_page_size)
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
