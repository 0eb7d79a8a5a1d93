"""Validation of the filter subset every backend supports (see the package docstring)."""
from __future__ import annotations

import re
# collections.abc, not typing: isinstance() against typing.Mapping costs 2-3x more, on every filter.
from collections.abc import Mapping
from typing import Any

from . import Filter, check_field

LOGICAL = ("$and", "$or", "$nor")
FIELD_OPERATORS = ("$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$nin", "$exists", "$regex", "$options", "$elemMatch")


def is_operator_dict(value: Any) -> bool:
    """True for ``{"$op": ...}`` conditions, as opposed to a literal sub-document."""
    return isinstance(value, Mapping) and bool(value) and all(str(k).startswith("$") for k in value)


def check_filter(filter: Filter | None) -> None:
    """Raise ``ValueError`` if ``filter`` uses anything outside the supported subset."""
    if not filter:
        return
    if not isinstance(filter, Mapping):
        raise ValueError("a filter is a mapping")
    for key, value in filter.items():
        if key in LOGICAL:
            if not isinstance(value, (list, tuple)) or not value:
                raise ValueError(f"{key} needs a non-empty list")
            for sub in value:
                check_filter(sub)
        elif str(key).startswith("$"):
            raise ValueError(f"unsupported top-level operator {key!r}")
        else:
            check_field(key)
            if is_operator_dict(value):
                _check_operators(value)
            elif isinstance(value, (Mapping, list, tuple)):
                raise ValueError(f"{key}: only scalars compare by equality")


def _check_operators(ops: Mapping[str, Any]) -> None:
    for op, value in ops.items():
        if op not in FIELD_OPERATORS:
            raise ValueError(f"unsupported filter operator {op!r}")
        if op in ("$in", "$nin") and not isinstance(value, (list, tuple)):
            raise ValueError(f"{op} needs a list")
        if op == "$regex":
            if not isinstance(value, str):
                raise ValueError("$regex needs a string pattern")
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"invalid $regex: {exc}") from None
        if op == "$options" and "$regex" not in ops:
            raise ValueError("$options without $regex")
        if op == "$elemMatch":
            if not isinstance(value, Mapping) or not value:
                raise ValueError("$elemMatch needs a mapping")
            if is_operator_dict(value):
                _check_operators(value)
            else:
                check_filter(value)
