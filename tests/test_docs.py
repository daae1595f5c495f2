"""The documentation stays true: the generated command reference is current, every hook and
stage method is documented, every test the reliability page names exists, and every
relative link points at a file and heading that exist."""

from __future__ import annotations

import importlib.util
import inspect
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
#: Pages another change is writing; a link to one is allowed before it lands.
PENDING: set[Path] = set()  # pages linked before they are written


def _pages() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def _slug(heading: str) -> str:
    """GitHub's anchor for a markdown heading."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def test_cli_reference_is_current():
    spec = importlib.util.spec_from_file_location(
        "cli_reference", ROOT / "tools" / "cli_reference.py"
    )
    assert spec is not None and spec.loader is not None
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    doc = (DOCS / "cli.md").read_text()
    block = doc.split(tool.START, 1)[1].split(tool.END, 1)[0]
    assert block == tool.render(), "docs/cli.md is stale: run `python tools/cli_reference.py`"
    assert "docs/cli.md" in (ROOT / "README.md").read_text()


def test_docs_document_every_hook_and_stage_method():
    from oasis_core.contracts import hookspecs

    text = "\n".join(page.read_text() for page in _pages())
    for name in hookspecs.__all__:
        if name.startswith("oasis_"):
            assert f"{name}()" in text, f"the docs do not document hook {name}"
            sig = inspect.signature(getattr(hookspecs, name))
            assert not sig.parameters, "hooks take no arguments; the docs say so"
    for method in (
        "mask(frame",
        "psf(frame",
        "align(frame, reference",
        "combine(frames",
        "subtract(science, template",
        "master(residuals",
        "extract(residual",
    ):
        assert method in text, f"the docs do not document the stage method {method}"


def _probe_ids() -> set[str]:
    ids: set[str] = set()
    for path in (ROOT / "tests" / "integration").glob("probes_*.py"):
        ids.update(re.findall(r'\bid="([^"]+)"', path.read_text()))
    return ids


def test_every_test_the_docs_name_exists():
    probes = _probe_ids()
    named = 0
    for page in _pages():
        text = page.read_text()
        for path, name in re.findall(r"`((?:[\w/]+/)?test_\w+\.py)::(\w+)`", text):
            path = path.removeprefix("tests/")
            source = ROOT / "tests" / path
            assert source.exists(), f"{page.name}: no file tests/{path}"
            assert re.search(rf"^\s*def {name}\(", source.read_text(), re.M), (
                f"{page.name}: no test {name} in tests/{path}"
            )
            named += 1
        for probe in re.findall(r"`test_probe\[([\w-]+)\]`", text):
            assert probe in probes, f"{page.name}: no probe {probe!r} in tests/integration"
            named += 1
    assert named > 30, "docs/reliability.md should name the tests of each guarantee"


def test_relative_links_point_at_existing_files_and_headings():
    for page in _pages():
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue
            file_part, _, anchor = target.partition("#")
            dest = (page.parent / file_part).resolve() if file_part else page
            if dest in PENDING:
                continue
            assert dest.exists(), f"{page.name}: link to missing {target}"
            if anchor:
                headings = re.findall(r"^#+ (.+)$", dest.read_text(), re.M)
                slugs = {_slug(h) for h in headings}
                assert anchor in slugs, f"{page.name}: no heading #{anchor} in {dest.name}"


def _resolve(dotted: str) -> object:
    parts = dotted.split(".")
    obj: object = importlib.import_module(parts[0])
    for i, part in enumerate(parts[1:], start=1):
        if hasattr(obj, part):
            obj = getattr(obj, part)
        else:
            obj = importlib.import_module(".".join(parts[: i + 1]))
    return obj


def test_every_python_name_the_docs_give_exists():
    names: set[str] = set()
    for page in _pages():
        text = page.read_text()
        names.update(re.findall(r"\b(?:oasis_core|oasis_apps|OasisPy)(?:\.[A-Za-z_]\w*)+", text))
        for module, imported in re.findall(
            r"from ((?:oasis_core|oasis_apps|OasisPy)[.\w]*) import ([\w, ]+)", text
        ):
            names.update(f"{module}.{name.strip()}" for name in imported.split(","))
    assert "oasis_core.subtract_pair" in names
    for name in sorted(names):
        _resolve(name)  # raises ImportError / AttributeError naming what is gone
