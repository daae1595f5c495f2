"""The core never names a built-in plugin, and every module states its API."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[1] / "oasis_core"
BUILTIN = {"oasis_native", "oasis_ois", "oasis_hotpants", "oasis_swarp", "oasis_sextractor"}


@pytest.mark.parametrize("path", sorted(CORE.glob("*.py")), ids=lambda p: p.name)
def test_core_does_not_import_builtin_plugins(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        for name in names:
            assert name.split(".")[0] not in BUILTIN, f"{path.name} imports {name}"


@pytest.mark.parametrize("path", sorted(CORE.glob("*.py")), ids=lambda p: p.name)
def test_modules_have_docstring_and_all(path):
    module = importlib.import_module(f"oasis_core.{path.stem}")
    assert module.__doc__, f"{path.name} has no docstring"
    if path.stem not in ("__init__",):
        assert hasattr(module, "__all__"), f"{path.name} has no __all__"
        for name in module.__all__:
            assert hasattr(module, name), f"{path.name}: __all__ names missing {name}"


def test_configuration_reference_is_current():
    from oasis_core.config import render_config
    from oasis_core.plugins import Registry

    doc = (CORE.parent / "docs" / "configuration.md").read_text()
    block = doc.split("<!-- config:start -->\n", 1)[1].split("<!-- config:end -->", 1)[0]
    assert block == f"```toml\n{render_config(Registry())}```\n", (
        "docs/configuration.md is stale: run `python tools/config_reference.py`"
    )
    readme = (CORE.parent / "README.md").read_text()
    assert "docs/configuration.md" in readme
