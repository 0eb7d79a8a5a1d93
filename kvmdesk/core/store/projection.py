"""Projection of a document to a list of (dotted) fields, the same for every backend."""
from __future__ import annotations

from typing import Any, Sequence

from . import Document


def project(doc: Document, projection: Sequence[str] | None) -> Document:
    """Keep only the ``projection`` paths of ``doc`` (all of it when there is none); missing paths are left out."""
    if not projection:
        return doc
    out: Document = {}
    for path in projection:
        node: Any = doc
        for key in path.split("."):
            if not isinstance(node, dict) or key not in node:
                break
            node = node[key]
        else:
            target = out
            *parents, leaf = path.split(".")
            for key in parents:
                target = target.setdefault(key, {})
            target[leaf] = node
    return out
