"""docs/plugins.md: every public name it lists exists, every hook is in its table, the tutorial's code is the plugin's."""
from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

from kvmdesk.core import hookspecs

ROOT = Path(__file__).resolve().parents[3]
DOC = (ROOT / "docs" / "plugins.md").read_text(encoding="utf-8")
LISTED = re.search(r"<!-- public-names -->(.*?)<!-- /public-names -->", DOC, re.S)
NAMES = re.findall(r"^- `([\w.]+)`$", LISTED.group(1), re.M) if LISTED else []


def resolve(dotted: str) -> object:
    """Import the longest importable module prefix of ``dotted``, then follow attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            target = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[cut:]:
            target = getattr(target, attribute)
        return target
    raise ModuleNotFoundError(dotted)


def test_the_doc_lists_public_names():
    assert len(NAMES) > 50, "the marked list of docs/plugins.md was not found"
    assert len(NAMES) == len(set(NAMES))


@pytest.mark.parametrize("dotted", NAMES)
def test_every_documented_name_exists(dotted):
    resolve(dotted)


def test_every_hook_is_in_the_list_and_the_table():
    specs = {name for name in vars(hookspecs) if name.startswith("kvmdesk_")}
    assert specs <= {n.rsplit(".", 1)[-1] for n in NAMES}
    table = set(re.findall(r"^\| `(kvmdesk_\w+)\(", DOC, re.M))
    assert specs == table


def test_the_plugin_of_the_tutorial_exists_and_its_codes_are_registered():
    plugin = (ROOT / "tests" / "plugins_example" / "kvmdesk_tags.py").read_text(encoding="utf-8")
    for snippet in ('TAG = Resource("标签", "tag")', "def kvmdesk_reconcile(core", "query=Suggest",
                    "def kvmdesk_usage(core, kind, uuid", "def kvmdesk_deleted(core, kind, record"):
        assert snippet in plugin.replace(": Any", "").replace(": str", "").replace(": dict", ""), snippet
    codes = [int(c) for c in re.findall(r"define\((\d+),", plugin)]
    assert codes and all(9100 <= c < 9200 for c in codes)
    assert "| 9100-9199 | `kvmdesk_tags`" in DOC
