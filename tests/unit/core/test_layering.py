"""The package's layers, checked on every module's imports (``ast``: every import, also the ones inside
functions and ``TYPE_CHECKING`` blocks).

Layers, bottom up::

    kvmdesk.protocol     what the controller and the agent both speak (no kvmdesk imports but core.errors)
    kvmdesk.core         configuration, store, errors, hooks, jobs (a router *interface*, not the router)
    kvmdesk.api          the HTTP framework (router, models, streaming) on top of core
    kvmdesk.nodeaccess   the controller's client for node agents (core + protocol)
    kvmdesk.plugins.*    the controller's features, each on its own: they meet through core, hooks and
                         ``core.extensions``, never through each other's modules
    kvmdesk.agent        the node agent: a separate program

The agent is built on the same framework as the controller: it serves its API with
:class:`kvmdesk.api.router.Router` and uses ``kvmdesk.core``'s errors, configuration, thread pools and
request signing (``kvmdesk.core.agentauth``).  Those two packages are the shared framework (no controller
features live there: core's only route to plugins is the hooks), so ``agent -> api/core`` is allowed;
the agent never imports the controller's features (plugins) or its node client (nodeaccess).
``kvmdesk.testing`` (test support) and ``kvmdesk.tap`` (process assembly) may import anything.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterator, Optional

import kvmdesk

PACKAGE = Path(kvmdesk.__file__).parent

#: The only modules allowed past a rule, each with its reason.
EXCEPTIONS = {
    ("kvmdesk.plugins.nodes.local", "kvmdesk.agent"):
        "the all-in-one setup embeds a node agent in the controller's process (composition, imported lazily)",
}


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(tree: ast.AST, module: str, is_package: bool) -> Iterator[tuple[int, str]]:
    """``(line, absolute module name)`` of every import in ``tree`` (``from x import y`` yields ``x.y``
    too, as ``y`` may be a module)."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            yield node.lineno, base
            for alias in node.names:
                yield node.lineno, f"{base}.{alias.name}"


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def plugin_of(name: str) -> Optional[str]:
    parts = name.split(".")
    return ".".join(parts[:3]) if within(name, "kvmdesk.plugins") and len(parts) >= 3 else None


def violation(module: str, target: str) -> Optional[str]:
    """Why ``module`` must not import ``target`` (``None`` if it may)."""
    source_plugin, target_plugin = plugin_of(module), plugin_of(target)
    if source_plugin and target_plugin and source_plugin != target_plugin:
        return "a plugin imports another plugin's modules (meet through core, hooks and core.extensions)"
    controller = source_plugin or any(within(module, p) for p in ("kvmdesk.core", "kvmdesk.api", "kvmdesk.nodeaccess"))
    if controller and within(target, "kvmdesk.agent"):
        return "the controller imports the agent's modules (share them through kvmdesk.protocol)"
    if within(module, "kvmdesk.agent") and any(
        within(target, p) for p in ("kvmdesk.plugins", "kvmdesk.nodeaccess", "kvmdesk.testing", "kvmdesk.tap")
    ):
        return "the agent imports the controller's features, its node client or test support"
    if within(module, "kvmdesk.core") and any(within(target, p) for p in ("kvmdesk.api", "kvmdesk.plugins")):
        return "core imports the layers above it (it knows the router only as kvmdesk.core.routing's interface)"
    if within(module, "kvmdesk.api") and any(within(target, p) for p in ("kvmdesk.plugins", "kvmdesk.nodeaccess")):
        return "the API framework imports the controller's features"
    if within(module, "kvmdesk.nodeaccess") and any(within(target, p) for p in ("kvmdesk.plugins", "kvmdesk.api")):
        return "the node client imports the layers above it"
    if within(module, "kvmdesk.protocol") and within(target, "kvmdesk") and not within(target, "kvmdesk.protocol") \
            and not within(target, "kvmdesk.core.errors"):
        return "the protocol imports more than the error catalogue"
    return None


def layering_violations(root: Path = PACKAGE) -> list[str]:
    """One line per offending import statement: ``file:line: imports module: reason``."""
    found: dict[tuple[str, int, str], str] = {}
    for path in sorted(root.rglob("*.py")):
        module = module_name(path, root)
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for line, target in imported(tree, module, path.name == "__init__.py"):
            reason = violation(module, target)
            excused = any(module == m and within(target, t) for m, t in EXCEPTIONS)
            if reason and not excused:
                # ``from x import y`` is reported once, as ``x`` (or ``x.y`` when only ``y`` crosses).
                found.setdefault((str(path.relative_to(root.parent)), line, reason), target)
    return [f"{file}:{line}: imports {target}: {reason}" for (file, line, reason), target in sorted(found.items())]


def test_no_module_crosses_a_layer():
    found = layering_violations()
    assert not found, "imports that cross a layer:\n" + "\n".join(found)


def test_every_exception_is_still_needed():
    """An exception nobody needs any more is removed, not kept as a standing permit."""
    for module, target in EXCEPTIONS:
        path = PACKAGE.parent / (module.replace(".", "/") + ".py")
        tree = ast.parse(path.read_text(encoding="utf-8"))
        assert any(within(t, target) for _, t in imported(tree, module, False)), (module, target)


def test_the_check_sees_imports_in_functions_and_type_checking_blocks(tmp_path):
    plugin = tmp_path / "kvmdesk" / "plugins" / "alpha"
    plugin.mkdir(parents=True)
    (tmp_path / "kvmdesk" / "__init__.py").write_text("")
    (tmp_path / "kvmdesk" / "plugins" / "__init__.py").write_text("")
    (plugin / "__init__.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from kvmdesk.plugins.beta import views\n"
        "def later():\n    import kvmdesk.agent.host\n"
        "from . import own\nfrom ..gamma import thing\nfrom kvmdesk.plugins import delta\n"
    )
    assert layering_violations(tmp_path / "kvmdesk") == [
        "kvmdesk/plugins/alpha/__init__.py:3: imports kvmdesk.plugins.beta: "
        "a plugin imports another plugin's modules (meet through core, hooks and core.extensions)",
        "kvmdesk/plugins/alpha/__init__.py:5: imports kvmdesk.agent.host: "
        "the controller imports the agent's modules (share them through kvmdesk.protocol)",
        "kvmdesk/plugins/alpha/__init__.py:7: imports kvmdesk.plugins.gamma: "
        "a plugin imports another plugin's modules (meet through core, hooks and core.extensions)",
        "kvmdesk/plugins/alpha/__init__.py:8: imports kvmdesk.plugins.delta: "
        "a plugin imports another plugin's modules (meet through core, hooks and core.extensions)",
    ]
