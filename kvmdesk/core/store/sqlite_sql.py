"""Translate the store's Mongo-style filters and sorts into SQLite SQL over JSON documents.

Each collection is a table ``(id INTEGER PRIMARY KEY AUTOINCREMENT, doc TEXT)``.  A field ``a.b`` is the
expression ``json_extract(doc, '$.a.b')``, written identically in indexes and in queries so that the
planner uses the expression indexes.  Field names are validated before they reach SQL text; values are
always bound parameters.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, Sequence

from . import Filter, Sort, check_field
from .filters import is_operator_dict

_COMPARISONS = {"$gt": ">", "$gte": ">=", "$lt": "<", "$lte": "<="}
_SCALARS = (str, int, float, bool)


@functools.lru_cache(maxsize=1024)
def field_expr(path: str, base: str = "doc") -> str:
    """The SQL expression that reads ``path`` from the JSON column ``base`` (cached: a field name is
    checked and turned into SQL once, not on every query)."""
    check_field(path)
    if path == "id" and base == "doc":
        return "id"
    return f"json_extract({base}, '$.{path}')"


def _param(value: Any) -> Any:
    if isinstance(value, bool):
        return int(value)
    if value is None or isinstance(value, _SCALARS):
        return value
    raise ValueError(f"unsupported value in filter: {value!r} (only scalars are comparable)")


def _equal(expr: str, value: Any, params: list) -> str:
    if value is None:
        return f"{expr} IS NULL"
    params.append(_param(value))
    return f"{expr} = ?"


def _in(expr: str, values: Sequence[Any], params: list, negate: bool) -> str:
    if not isinstance(values, (list, tuple)):
        raise ValueError("$in/$nin need a list")
    concrete = [v for v in values if v is not None]
    has_null = len(concrete) != len(values)
    parts = []
    if concrete:
        params.extend([_param(v) for v in concrete])
        parts.append(f"{expr} IN ({', '.join('?' * len(concrete))})")
    if has_null:
        parts.append(f"{expr} IS NULL")
    clause = " OR ".join(parts) or "0"
    if negate:
        # Mongo's $nin matches documents without the field unless null is listed.
        return f"NOT ({clause})" if has_null else f"({expr} IS NULL OR NOT ({clause}))"
    return f"({clause})"


def _operators(path: str, ops: Mapping[str, Any], params: list, base: str) -> str:
    expr = field_expr(path, base) if path else base
    clauses = []
    for op, value in ops.items():
        if op == "$eq":
            clauses.append(_equal(expr, value, params))
        elif op == "$ne":
            if value is None:
                clauses.append(f"{expr} IS NOT NULL")
            else:
                params.append(_param(value))
                clauses.append(f"({expr} IS NULL OR {expr} != ?)")
        elif op in _COMPARISONS:
            params.append(_param(value))
            clauses.append(f"{expr} {_COMPARISONS[op]} ?")
        elif op in ("$in", "$nin"):
            clauses.append(_in(expr, value, params, negate=op == "$nin"))
        elif op == "$exists":
            json_type = f"json_type({base}, '$.{check_field(path)}')" if path and path != "id" else expr
            clauses.append(f"{json_type} IS {'NOT ' if value else ''}NULL")
        elif op == "$regex":
            pattern = value if isinstance(value, str) else None
            if pattern is None:
                raise ValueError("$regex needs a string pattern")
            params.extend([pattern, ops.get("$options", "")])
            clauses.append(f"kvmdesk_regexp(?, ?, {expr})")
        elif op == "$options":
            if "$regex" not in ops:
                raise ValueError("$options without $regex")
        elif op == "$elemMatch":
            if not isinstance(value, Mapping):
                raise ValueError("$elemMatch needs a mapping")
            inner = _element_clause(value, params)
            clauses.append(f"EXISTS (SELECT 1 FROM json_each({base}, '$.{check_field(path)}') AS je WHERE {inner})")
        else:
            raise ValueError(f"unsupported filter operator {op!r}")
    return "(" + " AND ".join(clauses) + ")" if clauses else "1"


def _element_clause(cond: Mapping[str, Any], params: list) -> str:
    # An element condition either compares the element itself ({"$eq": 3}) or its fields ({"k": v}).
    if is_operator_dict(cond):
        return _operators("", cond, params, "je.value")
    return compile_filter(cond, params, base="je.value")


def compile_filter(filter: Filter | None, params: list, base: str = "doc") -> str:
    """Return a SQL boolean expression for ``filter``, appending bound values to ``params``."""
    if not filter:
        return "1"
    clauses = []
    for key, value in filter.items():
        if key in ("$and", "$or", "$nor"):
            if not isinstance(value, (list, tuple)) or not value:
                raise ValueError(f"{key} needs a non-empty list")
            parts = [compile_filter(sub, params, base) for sub in value]
            joined = (" AND " if key == "$and" else " OR ").join(parts)
            clauses.append(f"NOT ({joined})" if key == "$nor" else f"({joined})")
        elif key.startswith("$"):
            raise ValueError(f"unsupported top-level operator {key!r}")
        elif is_operator_dict(value):
            clauses.append(_operators(key, value, params, base))
        else:
            clauses.append(_equal(field_expr(key, base), value, params))
    return " AND ".join(clauses)


def compile_sort(sort: Sort | None) -> str:
    """Return an ``ORDER BY`` clause (``id`` breaks ties so paging is stable)."""
    if not sort:
        return " ORDER BY id"
    parts = []
    for path, direction in sort:
        if direction not in (1, -1):
            raise ValueError(f"sort direction must be 1 or -1, not {direction!r}")
        parts.append(f"{field_expr(path)} {'ASC' if direction == 1 else 'DESC'}")
    if not any(path == "id" for path, _ in sort):
        parts.append("id")
    return " ORDER BY " + ", ".join(parts)
