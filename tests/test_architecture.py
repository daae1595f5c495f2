"""The layers docs/architecture.md describes, kept true.

- the contracts (:mod:`oasis_core.contracts`) import nothing else of OASIS;
- the core (contracts and engine) imports no plugin and no application;
- applications (:mod:`oasis_apps`) and plugins use no private name of the core;
- no import cycle between modules (imports inside functions count too);
- docs/architecture.md names every module of the core and the applications.

Read from the source (``ast``), so a lazy import inside a function is seen like any other.
"""

from __future__ import annotations

import ast
import importlib
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {
    "oasis_core": ROOT / "oasis_core",
    "oasis_apps": ROOT / "oasis_apps",
}
PLUGINS = {
    "oasis_native": ROOT / "plugins/native/oasis_native",
    "oasis_ois": ROOT / "plugins/ois_isis/oasis_ois",
    "oasis_hotpants": ROOT / "plugins/hotpants/oasis_hotpants",
    "oasis_swarp": ROOT / "plugins/swarp/oasis_swarp",
    "oasis_sextractor": ROOT / "plugins/sextractor/oasis_sextractor",
}


@attrs.frozen
class Use:
    """One import (or attribute use of an imported module) in a module."""

    module: str  # the importing module
    target: str  # the module imported (``a.b``) or used (``a.b`` of ``a.b.name``)
    name: str | None  # the name taken from it, when one is
    line: int


def _module_name(package: str, folder: Path, path: Path) -> str:
    parts = list(path.relative_to(folder).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([package, *parts])


def _modules(packages: dict[str, Path]) -> dict[str, Path]:
    return {
        _module_name(package, folder, path): path
        for package, folder in packages.items()
        for path in sorted(folder.rglob("*.py"))
    }


def _uses(module: str, path: Path) -> Iterator[Use]:
    tree = ast.parse(path.read_text(), filename=str(path))
    aliases: dict[str, str] = {}  # local name -> module it stands for
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Use(module, alias.name, None, node.lineno)
                if alias.asname:
                    aliases[alias.asname] = alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                yield Use(module, node.module, alias.name, node.lineno)
                aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    for node in ast.walk(tree):  # pl._RUNNERS where pl is an imported module
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            target = aliases.get(node.value.id)
            if target and target.startswith("oasis_"):
                yield Use(module, target, node.attr, node.lineno)


def _all_uses(packages: dict[str, Path]) -> list[Use]:
    return [use for module, path in _modules(packages).items() for use in _uses(module, path)]


def _target_module(use: Use, modules: set[str]) -> str | None:
    """The OASIS module a use depends on (``from pkg import mod`` names a module too)."""
    if use.name and f"{use.target}.{use.name}" in modules:
        return f"{use.target}.{use.name}"
    return use.target if use.target in modules else None


CORE_USES = _all_uses({"oasis_core": PACKAGES["oasis_core"]})


def test_the_layout_is_read():
    """The checks below see the modules and imports they are about."""
    modules = _modules(PACKAGES)
    assert "oasis_core.contracts.model" in modules
    assert "oasis_core.engine.pipeline" in modules
    assert "oasis_apps.cli" in modules
    assert any(use.target == "oasis_core.contracts.errors" for use in CORE_USES)


def test_contracts_import_nothing_else_of_oasis():
    bad = [
        use
        for use in CORE_USES
        if use.module.startswith("oasis_core.contracts")
        and use.target.startswith("oasis_")
        and not use.target.startswith("oasis_core.contracts")
    ]
    assert not bad, "\n".join(f"{u.module}:{u.line} imports {u.target}" for u in bad)


def test_core_imports_no_plugin_and_no_application():
    bad = [
        use
        for use in CORE_USES
        if use.target.split(".")[0].startswith("oasis_")
        and use.target.split(".")[0] != "oasis_core"
    ]
    assert not bad, "\n".join(f"{u.module}:{u.line} imports {u.target}" for u in bad)


@pytest.mark.parametrize("layer", ["oasis_apps", "plugins"])
def test_no_private_name_of_the_core_is_used_outside_it(layer):
    packages = {"oasis_apps": PACKAGES["oasis_apps"]} if layer == "oasis_apps" else PLUGINS
    bad = [
        use
        for use in _all_uses(packages)
        if use.target.startswith("oasis_core")
        and use.name
        and use.name.startswith("_")
        and not use.name.startswith("__")
    ]
    assert not bad, "\n".join(f"{u.module}:{u.line} uses {u.target}.{u.name}" for u in bad)


def test_no_import_cycles():
    modules = _modules(PACKAGES)
    graph: dict[str, set[str]] = {module: set() for module in modules}
    for use in _all_uses(PACKAGES):
        target = _target_module(use, set(modules))
        # a package's __init__ is not a dependency of its modules (lazy re-exports)
        if target and target != use.module and not use.module.startswith(target + "."):
            graph[use.module].add(target)
    cycles = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*stack[stack.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "\n".join(cycles)


def test_architecture_document_names_every_module():
    text = (ROOT / "docs/architecture.md").read_text()
    missing = [
        module
        for module, path in _modules(PACKAGES).items()
        if path.name != "__init__.py" and f"`{module.rsplit('.', 1)[-1]}`" not in text
    ]
    assert not missing, f"docs/architecture.md does not place: {', '.join(missing)}"


@pytest.mark.parametrize(
    "module",
    sorted(m for m in _modules(PACKAGES) if "." in m),
    ids=str,
)
def test_modules_have_docstring_and_all(module):
    imported = importlib.import_module(module)
    assert imported.__doc__, f"{module} has no docstring"
    if not hasattr(imported, "__path__"):  # a package's __init__ needs no __all__
        assert hasattr(imported, "__all__"), f"{module} has no __all__"
        for name in imported.__all__:
            assert hasattr(imported, name), f"{module}: __all__ names missing {name}"


def test_configuration_reference_is_current():
    from oasis_core.engine.config import render_config
    from oasis_core.engine.plugins import Registry

    doc = (ROOT / "docs" / "configuration.md").read_text()
    block = doc.split("<!-- config:start -->\n", 1)[1].split("<!-- config:end -->", 1)[0]
    assert block == f"```toml\n{render_config(Registry())}```\n", (
        "docs/configuration.md is stale: run `python tools/config_reference.py`"
    )
    readme = (ROOT / "README.md").read_text()
    assert "docs/configuration.md" in readme
