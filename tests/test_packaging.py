"""Packaging: the core alone in the root distribution, each built-in plugin its own
distribution (installable alone on top of the core), the README's one install command
installing them all, and CI running exactly the README's test command."""

from __future__ import annotations

import importlib.metadata
import tomllib
from pathlib import Path

import pytest

from tests.test_plugin_template import pip_install

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = {
    "native": ("oasis-native", "oasis_native"),
    "ois_isis": ("oasis-ois", "oasis_ois"),
    "hotpants": ("oasis-hotpants", "oasis_hotpants"),
    "swarp": ("oasis-swarp", "oasis_swarp"),
    "sextractor": ("oasis-sextractor", "oasis_sextractor"),
}


def _toml(path: Path) -> dict:
    return tomllib.loads(path.read_text())


def test_root_ships_the_core_and_heavy_parts_are_extras():
    project = _toml(ROOT / "pyproject.toml")
    packages = project["tool"]["setuptools"]["packages"]
    # the core, its layers, the plugin author's kit, the applications, OasisPy's names;
    # no plugin
    assert sorted(packages) == [
        "OasisPy",
        "oasis_apps",
        "oasis_core",
        "oasis_core.contracts",
        "oasis_core.engine",
        "oasis_core.testing",
    ]
    assert "entry-points" not in project["project"]  # no plugin rides with the core
    deps = " ".join(project["project"]["dependencies"]).lower()
    for heavy in ("montagepy", "galsim", "dask", "astroalign", "astroscrappy"):
        assert heavy not in deps, heavy
    extras = project["project"]["optional-dependencies"]
    assert extras["mosaic"] == ["MontagePy>=2.3"]
    assert any(d.startswith("dask") for d in extras["dask"])
    assert any(d.startswith("galsim") for d in extras["sims"])
    for extra in ("mosaic", "dask", "sims"):
        assert set(extras[extra]) <= set(extras["test"]), extra


@pytest.mark.parametrize("folder", sorted(PLUGINS))
def test_each_builtin_plugin_is_its_own_distribution(folder):
    dist, package = PLUGINS[folder]
    project = _toml(ROOT / "plugins" / folder / "pyproject.toml")
    meta = project["project"]
    assert meta["name"] == dist and meta["version"]
    assert any(d.startswith("oasis-dia") for d in meta["dependencies"])
    [(name, target)] = meta["entry-points"]["oasis.plugins"].items()
    assert target == f"{package}.plugin"
    assert project["tool"]["setuptools"]["packages"] == [package]
    assert (ROOT / "plugins" / folder / package / "plugin.py").exists()
    # installed (the README's command): found through that entry point, under that name
    installed = importlib.metadata.distribution(dist)
    [ep] = [e for e in installed.entry_points if e.group == "oasis.plugins"]
    assert (ep.name, ep.value) == (name, target)


def _commands(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if "pip install" in ln and ".venv/bin/" in ln]


def test_readme_installs_everything_in_one_command_and_ci_runs_its_test_command():
    readme = _commands((ROOT / "README.md").read_text())
    ci = _commands((ROOT / ".ci" / "run").read_text())
    assert len(readme) == 2 and len(ci) == 1
    assert ci[0] == readme[1]  # .ci/run is the README's test command
    for command in readme:
        for folder in PLUGINS:
            assert f" -e plugins/{folder}" in command, (folder, command)
    assert "-e '.[test]'" in readme[1] and readme[1].endswith("python -m pytest -q")


def test_hotpants_installs_alone_with_its_entry_point(tmp_path):
    site = pip_install(ROOT / "plugins" / "hotpants", tmp_path)
    [dist] = importlib.metadata.distributions(path=[str(site)])
    assert (dist.metadata["Name"], dist.version) == ("oasis-hotpants", "0.1.0")
    assert any(r.startswith("oasis-dia") for r in dist.requires)
    [ep] = [e for e in dist.entry_points if e.group == "oasis.plugins"]
    assert (ep.name, ep.value) == ("hotpants", "oasis_hotpants.plugin")
    files = {str(f) for f in dist.files}
    assert "oasis_hotpants/backend.py" in files
    assert not any(f.startswith(("oasis_core/", "oasis_native/")) for f in files)
