"""Mongo-style update operators applied to a document in Python.

The SQLite backend applies updates here, inside the writer's ``BEGIN IMMEDIATE`` transaction, rather
than through SQLite's ``json_set``: ``json_set`` cannot create missing parents of a dotted path, and
one implementation keeps both backends' semantics identical.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from . import Document, Filter, Update, check_field

OPERATORS = ("$set", "$unset", "$inc", "$push", "$pull")


def check_update(update: Update) -> None:
    """Raise ``ValueError`` unless ``update`` uses only supported operators on valid fields."""
    if not update:
        raise ValueError("empty update")
    for op, fields in update.items():
        if op not in OPERATORS:
            raise ValueError(f"unsupported update operator {op!r}")
        if not isinstance(fields, Mapping):
            raise ValueError(f"{op} needs a mapping of fields")
        for path in fields:
            check_field(path)
            if path == "id" or path.startswith("id."):
                raise ValueError("the store-assigned id cannot be updated")


def _parent(doc: Document, path: str, create: bool) -> tuple[Any, str]:
    *parents, leaf = path.split(".")
    node: Any = doc
    for key in parents:
        if not isinstance(node, dict):
            raise ValueError(f"cannot traverse {path!r}: {key!r} is not an object")
        if key not in node:
            if not create:
                return None, leaf
            node[key] = {}
        node = node[key]
    if node is not None and not isinstance(node, dict):
        raise ValueError(f"cannot set {path!r}: parent is not an object")
    return node, leaf


def apply_update(doc: Document, update: Update) -> Document:
    """Return a new document: ``doc`` with ``update`` applied."""
    check_update(update)
    out = copy.deepcopy(doc)
    for path, value in update.get("$set", {}).items():
        parent, leaf = _parent(out, path, create=True)
        parent[leaf] = copy.deepcopy(value)
    for path in update.get("$unset", {}):
        parent, leaf = _parent(out, path, create=False)
        if parent is not None:
            parent.pop(leaf, None)
    for path, amount in update.get("$inc", {}).items():
        if isinstance(amount, bool) or not isinstance(amount, (int, float)):
            raise ValueError(f"$inc of {path!r} needs a number")
        parent, leaf = _parent(out, path, create=True)
        current = parent.get(leaf, 0)
        if isinstance(current, bool) or not isinstance(current, (int, float)):
            raise ValueError(f"$inc of {path!r}: the field is not a number")
        parent[leaf] = current + amount
    for path, value in update.get("$push", {}).items():
        parent, leaf = _parent(out, path, create=True)
        current = parent.setdefault(leaf, [])
        if not isinstance(current, list):
            raise ValueError(f"$push to {path!r}: the field is not an array")
        current.append(copy.deepcopy(value))
    for path, value in update.get("$pull", {}).items():
        parent, leaf = _parent(out, path, create=False)
        if parent is not None and isinstance(parent.get(leaf), list):
            parent[leaf] = [item for item in parent[leaf] if item != value]
    return out


def upsert_seed(filter: Filter) -> Document:
    """The document an upsert starts from: the filter's plain top-level equality fields."""
    seed: Document = {}
    for key, value in filter.items():
        if key.startswith("$") or "." in key or key == "id" or isinstance(value, Mapping):
            continue
        seed[key] = copy.deepcopy(value)
    return seed


def check_upserts(operations: Any) -> list[tuple[Filter, Update]]:
    """Check the ``(filter, update)`` pairs of an ``upsert_each``; return them as a list.

    Each filter names its document by plain top-level fields (``{"node": "n1", "hour": 3600}``): those
    are the fields a new document is created with, and they let the MongoDB backend tell with one
    query which documents exist.

    :raises ValueError: no operations, or one that is not such a pair (the message names its index).
    """
    if isinstance(operations, (str, bytes, Mapping)) or not isinstance(operations, (list, tuple)):
        raise ValueError("operations must be a list of (filter, update) pairs")
    if not operations:
        raise ValueError("operations is empty: a batch needs at least one (filter, update) pair")
    checked = []
    for index, operation in enumerate(operations):
        try:
            if not isinstance(operation, (list, tuple)) or len(operation) != 2:
                raise ValueError("not a (filter, update) pair")
            filter, update = operation
            if not isinstance(filter, Mapping) or not filter:
                raise ValueError("the filter must be a non-empty mapping")
            for key, value in filter.items():
                check_field(key)
                if "." in key or key == "id" or isinstance(value, (Mapping, list, tuple)):
                    raise ValueError(f"filter field {key!r} must be a top-level field (not id) with a plain value")
            check_update(update)
        except ValueError as exc:
            raise ValueError(f"operations[{index}]: {exc}") from None
        checked.append((filter, update))
    return checked
