"""Text from clients made safe to print in a log line.

A name or user name may hold control characters (a newline that forges a second log line, an ESC
that repaints an administrator's terminal, a bidi override that reorders what is read).  Request
models refuse them (:data:`kvmdesk.api.models.Name`), but a log line prints what a client *tried*
too (a refused login's user name), so every such value goes through :func:`escaped` first.
"""
from __future__ import annotations

import unicodedata
from typing import Any

#: Unicode categories escaped: control (Cc: NUL, ESC, CR, LF, DEL...) and format (Cf: bidi overrides...).
UNPRINTABLE_CATEGORIES = frozenset({"Cc", "Cf"})


def is_unprintable(char: str) -> bool:
    return unicodedata.category(char) in UNPRINTABLE_CATEGORIES


def escaped(value: Any, limit: int = 200) -> str:
    """``value`` as text with every control or format character escaped (``\\n``, ``\\x1b``, ``\\u202e``),
    cut to ``limit`` characters (a log line is no place for a megabyte of user name)."""
    text = value if isinstance(value, str) else str(value)
    if len(text) > limit:
        text = text[:limit] + "..."
    if not any(is_unprintable(c) for c in text):
        return text
    return "".join(c.encode("unicode_escape").decode("ascii") if is_unprintable(c) else c for c in text)
