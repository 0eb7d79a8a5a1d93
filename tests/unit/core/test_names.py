"""Issue 14 defect 4: names with control characters were stored and reached the log raw.

Every name field of every request model (each endpoint's body and each action's ``param``) refuses
control and format characters, and strips surrounding whitespace.
"""
from __future__ import annotations

import pytest
import pytest_twisted
from pydantic import BaseModel

from core_testlib import POOLS, assert_error
from kvmdesk.api.models import Name
from kvmdesk.core import errors
from kvmdesk.core.logtext import escaped

BAD = ["a\x00b", "a\x1b[31mb", "a\r\nb", "a\x7fb", "a\u202eb", "a\u200fb"]


def name_fields(model: type[BaseModel]) -> list[str]:
    return [field for field in model.model_fields if field == "name" or field.endswith("_name")]


def request_models(router) -> list[type[BaseModel]]:
    models = []
    for spec in router.registry:
        if spec.body is not None:
            models.append(spec.body)
        for action in (spec.actions or {}).values():
            if action.param is not None:
                models.append(action.param)
    return list(dict.fromkeys(models))


@pytest_twisted.ensureDeferred
async def test_every_name_field_refuses_control_characters(api):
    models = request_models(api.core.router)
    checked = []
    for model in models:
        for field in name_fields(model):
            for bad in BAD:
                problems = []
                try:
                    model.model_validate({field: bad})
                except Exception as exc:  # ValidationError
                    problems = [e for e in exc.errors() if e["loc"] == (field,)]
                assert problems, (model.__name__, field, bad)
            checked.append((model.__name__, field))
    names = {field for _, field in checked}
    assert {"name", "user_name"} <= names and len(checked) >= 15, checked


def test_the_name_type_strips_and_limits():
    class Named(BaseModel):
        name: Name

    assert Named(name="  lab 1 ").name == "lab 1"
    assert Named(name="实验室").name == "实验室"
    for bad in ["", "   ", "x" * 65, *BAD]:
        with pytest.raises(Exception):
            Named(name=bad)


@pytest_twisted.ensureDeferred
async def test_a_pool_named_with_escape_codes_is_refused_naming_the_field(api):
    status, body = await api.call("POST", POOLS, {"name": "lab\x1b[2J", "desc": None}, headers={"Accept-Language": "en"})
    assert_error(status, body, 400, errors.INVALID_PARAM.code)
    assert body["data"][0]["field"] == "name"
    status, body = await api.call("GET", POOLS)
    assert all("\x1b" not in p["name"] for p in body["data"]["results"])


def test_escaped_log_text():
    assert escaped("a\x00b\x1b\r\n\u202e") == "a\\x00b\\x1b\\r\\n\\u202e"
    assert escaped("plain 名字") == "plain 名字"
    assert escaped("x" * 500, limit=10) == "x" * 10 + "..."
