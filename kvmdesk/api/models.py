"""Base classes for request models: unknown fields are rejected, JSON types are taken as they are."""
from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, ValidationError

from kvmdesk.core.errors import INVALID_PARAM, ApiError


class Model(BaseModel):
    """A request body.  ``extra="forbid"``: a misspelt field is an error, not silently ignored.

    ``strict``: JSON already has types, so ``"5"`` is not an integer and ``1`` is not a string.
    """

    model_config = ConfigDict(extra="forbid", strict=True)


class Uuids(Model):
    """The contract's delete body: ``{"uuids": [...]}``."""

    uuids: list[str]


def field_name(loc: tuple[Any, ...]) -> str:
    """Render a pydantic error location as ``param.templates.0.uuid``."""
    return ".".join(str(part) for part in loc) or "body"


def validate(model: type[BaseModel], data: Any, prefix: tuple = (), *, strict: Optional[bool] = None) -> Any:
    """Validate ``data`` into ``model``; raise a 400 :class:`ApiError` naming the first bad field.

    The envelope's ``data`` lists every problem as ``{"field", "reason"}``.

    :param strict: ``False`` converts text to the field's type (query strings are all text).
    """
    try:
        return model.model_validate(data, strict=strict)
    except ValidationError as exc:
        problems = [{"field": field_name(prefix + tuple(err["loc"])), "reason": err["msg"]} for err in exc.errors()]
        first = problems[0]
        raise ApiError(INVALID_PARAM, data=problems, field=first["field"], reason=first["reason"]) from None
