"""``os_type_simple``: the short system name the front end shows next to ``os_type`` ("Windows 7 bit 64" -> "win7")."""
from __future__ import annotations

import re

# First match wins: more specific names before the general ones.
_RULES: list[tuple[re.Pattern, str]] = [
    (re.compile(r"win(dows)?[\s_-]*xp", re.I), "winxp"),
    (re.compile(r"win(dows)?[\s_-]*(server[\s_-]*)?2003", re.I), "win2003"),
    (re.compile(r"win(dows)?[\s_-]*(server[\s_-]*)?2008", re.I), "win2008"),
    (re.compile(r"win(dows)?[\s_-]*(server[\s_-]*)?2012", re.I), "win2012"),
    (re.compile(r"win(dows)?[\s_-]*(server[\s_-]*)?2016", re.I), "win2016"),
    (re.compile(r"win(dows)?[\s_-]*(server[\s_-]*)?2019", re.I), "win2019"),
    (re.compile(r"win(dows)?[\s_-]*(server[\s_-]*)?2022", re.I), "win2022"),
    (re.compile(r"win(dows)?[\s_-]*7(?!\d)", re.I), "win7"),
    (re.compile(r"win(dows)?[\s_-]*8(?!\d)", re.I), "win8"),
    (re.compile(r"win(dows)?[\s_-]*10(?!\d)", re.I), "win10"),
    (re.compile(r"win(dows)?[\s_-]*11(?!\d)", re.I), "win11"),
    (re.compile(r"ubuntu", re.I), "ubuntu"),
    (re.compile(r"cent\s*os", re.I), "centos"),
    (re.compile(r"debian", re.I), "debian"),
    (re.compile(r"red\s*hat|rhel", re.I), "redhat"),
    (re.compile(r"kylin|麒麟", re.I), "kylin"),
    (re.compile(r"uos|统信", re.I), "uos"),
    (re.compile(r"deepin", re.I), "deepin"),
    (re.compile(r"win", re.I), "windows"),
    (re.compile(r"linux", re.I), "linux"),
]


def os_type_simple(os_type: str) -> str:
    """The short name for ``os_type``; ``other`` when nothing is recognised."""
    for pattern, simple in _RULES:
        if pattern.search(os_type or ""):
            return simple
    return "other"
