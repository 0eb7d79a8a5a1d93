"""Base classes for request models: unknown fields are rejected, JSON types are taken as they are."""
from __future__ import annotations

from typing import Annotated, Any, Optional

from pydantic import AfterValidator, BaseModel, ConfigDict, StringConstraints, ValidationError

from kvmdesk.core.errors import INVALID_PARAM, ApiError
from kvmdesk.core.logtext import escaped, is_unprintable


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


# -- names -------------------------------------------------------------------------------------------

#: The longest name of a resource (pool, switch, network, group, user, node, image...).
NAME_MAX = 64


def _printable(value: str) -> str:
    bad = next((c for c in value if is_unprintable(c)), None)
    if bad is not None:
        raise ValueError(f"must not contain control or format characters (found {escaped(bad)})")
    return value


def name_type(max_length: int = NAME_MAX, min_length: int = 1) -> Any:
    """The rules of every name: surrounding whitespace stripped, no control or format characters
    (NUL, ESC, CR, LF, DEL, bidi overrides: Unicode categories Cc and Cf), at most ``max_length``.

    Use :data:`Name`; this factory is for the few names with another length (ISO file names).
    """
    return Annotated[str, StringConstraints(strip_whitespace=True, min_length=min_length, max_length=max_length),
                     AfterValidator(_printable)]


#: The name field of every request model.
Name = name_type()
#: A name that may be left empty (e.g. a person's full name).
OptionalName = name_type(min_length=0)
