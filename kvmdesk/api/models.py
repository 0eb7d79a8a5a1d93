"""Base classes for request models: unknown fields are rejected, JSON types are taken as they are."""
from __future__ import annotations

from typing import Annotated, Any, Optional

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from kvmdesk.core.errors import BATCH_EMPTY, INVALID_PARAM, ApiError
from kvmdesk.core.logtext import escaped, is_unprintable


class Model(BaseModel):
    """A request body.  ``extra="forbid"``: a misspelt field is an error, not silently ignored.

    ``strict``: JSON already has types, so ``"5"`` is not an integer and ``1`` is not a string.
    """

    model_config = ConfigDict(extra="forbid", strict=True)


class _BatchItems:
    """Marks the list of a batch's items: empty, it is refused with the catalogue's ``BATCH_EMPTY``."""


def batch_of(item: Any) -> Any:
    """The type of a batch's items: a list of ``item``, at least one (the document says ``minItems: 1``)."""
    return Annotated[list[item], Field(min_length=1), _BatchItems()]


class Uuids(Model):
    """The contract's delete body: ``{"uuids": [...]}``."""

    uuids: batch_of(str)


def field_name(loc: tuple[Any, ...]) -> str:
    """Render a pydantic error location as ``param.templates.0.uuid``."""
    return ".".join(str(part) for part in loc) or "body"


def validate(model: type[BaseModel], data: Any, prefix: tuple = (), *, strict: Optional[bool] = None) -> Any:
    """Validate ``data`` into ``model``; raise a 400 :class:`ApiError` naming the first bad field.

    The envelope's ``data`` lists every problem as ``{"field", "reason"}``.

    :param strict: ``False`` converts text to the field's type (query strings are all text).
    """
    try:
        return model.model_validate(_integral(data), strict=strict)
    except ValidationError as exc:
        found = exc.errors()
        problems = [{"field": field_name(prefix + tuple(err["loc"])), "reason": err["msg"]} for err in found]
        if _empty_batch(model, found[0]):
            # a batch's list of items, empty (``min_length=1`` of the model): the catalogue's own code
            raise ApiError(BATCH_EMPTY, data=problems) from None
        first = problems[0]
        raise ApiError(INVALID_PARAM, data=problems, field=first["field"], reason=first["reason"]) from None


def _integral(data: Any) -> Any:
    """JSON numbers with no fraction (``5.0``) as integers: JSON Schema counts them as integers, and
    so does the OpenAPI document (strict models would refuse them for an ``int`` field)."""
    if isinstance(data, float) and data.is_integer():
        return int(data)
    if isinstance(data, dict):
        return {k: _integral(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_integral(v) for v in data]
    return data


def _empty_batch(model: type[BaseModel], error: Any) -> bool:
    loc = error["loc"]
    if error["type"] != "too_short" or len(loc) != 1 or loc[0] not in getattr(model, "model_fields", {}):
        return False
    return any(isinstance(mark, _BatchItems) for mark in model.model_fields[loc[0]].metadata)


# -- names -------------------------------------------------------------------------------------------

#: The longest name of a resource (pool, switch, network, group, user, node, image...).
NAME_MAX = 64


def _printable(value: str) -> str:
    bad = next((c for c in value if is_unprintable(c)), None)
    if bad is not None:
        raise ValueError(f"must not contain control or format characters (found {escaped(bad)})")
    return value


def _unprintable_class() -> str:
    """A regular-expression class body of every Cc and Cf character (``\\uXXXX``; astral ones as themselves)."""
    import sys
    import unicodedata

    found = [c for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c)) in ("Cc", "Cf")]
    ranges: list[list[int]] = []
    for code in found:
        if ranges and ranges[-1][1] == code - 1:
            ranges[-1][1] = code
        else:
            ranges.append([code, code])

    def one(code: int) -> str:
        return f"\\u{code:04x}" if code <= 0xFFFF else chr(code)

    return "".join(one(a) if a == b else f"{one(a)}-{one(b)}" for a, b in ranges)


#: Every control and format character, as the body of a regular-expression class (for patterns of
#: stricter name rules that the OpenAPI document shows instead of :data:`Name`'s).
UNPRINTABLE_CLASS = _unprintable_class()
#: What the OpenAPI document shows of the rule (the validator below is what enforces it).
_NAME_PATTERN = f"^[^{UNPRINTABLE_CLASS}]*[^{UNPRINTABLE_CLASS}\\s][^{UNPRINTABLE_CLASS}]*$"
_OPTIONAL_NAME_PATTERN = f"^[^{UNPRINTABLE_CLASS}]*$"


def name_type(max_length: int = NAME_MAX, min_length: int = 1) -> Any:
    """The rules of every name: surrounding whitespace stripped, no control or format characters
    (NUL, ESC, CR, LF, DEL, bidi overrides: Unicode categories Cc and Cf), at most ``max_length``.

    Use :data:`Name`; this factory is for the few names with another length (ISO file names).
    """
    pattern = _NAME_PATTERN if min_length else _OPTIONAL_NAME_PATTERN
    return Annotated[str, StringConstraints(strip_whitespace=True, min_length=min_length, max_length=max_length),
                     AfterValidator(_printable), Field(json_schema_extra={"pattern": pattern})]


#: The name field of every request model.
Name = name_type()
#: A name that may be left empty (e.g. a person's full name).
OptionalName = name_type(min_length=0)
