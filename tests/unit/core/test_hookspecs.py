"""Plugin authors' documentation: every hookspec has a docstring and a fully typed signature."""
from __future__ import annotations

import inspect

import pytest

from kvmdesk import PROJECT_NAME
from kvmdesk.core import hookspecs
from kvmdesk.core.plugins import make_plugin_manager

SPECS = sorted(
    (name, fn) for name, fn in vars(hookspecs).items()
    if inspect.isfunction(fn) and hasattr(fn, PROJECT_NAME + "_spec")
)


def test_there_are_hookspecs():
    names = {name for name, _ in SPECS}
    assert {"kvmdesk_configure", "kvmdesk_routes", "kvmdesk_services", "kvmdesk_store_indexes"} <= names


def test_every_public_function_of_hookspecs_is_a_hookspec():
    functions = {name for name, fn in vars(hookspecs).items()
                 if inspect.isfunction(fn) and fn.__module__ == hookspecs.__name__}
    assert functions == {name for name, _ in SPECS}


@pytest.mark.parametrize("name, spec", SPECS, ids=[name for name, _ in SPECS])
def test_hookspec_is_documented_and_typed(name, spec):
    assert name.startswith("kvmdesk_")
    doc = inspect.getdoc(spec)
    assert doc and len(doc.splitlines()[0]) > 10, f"{name} needs a docstring with a summary line"
    signature = inspect.signature(spec)
    for parameter in signature.parameters.values():
        assert parameter.annotation is not inspect.Parameter.empty, f"{name}({parameter.name}) is not typed"
        assert parameter.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    assert signature.return_annotation is not inspect.Signature.empty, f"{name} has no return type"


def test_plugin_manager_knows_every_hookspec():
    manager = make_plugin_manager(load_entry_points=False)
    for name, _ in SPECS:
        assert getattr(manager.hook, name).spec is not None
