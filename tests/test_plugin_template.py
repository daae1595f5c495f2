"""The plugin template (docs/plugin-template) installed for real, through its entry point,
and the plugin-author guide (docs/plugins.md) kept true by it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import attrs
import pytest

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "docs" / "plugin-template"
GUIDE = ROOT / "docs" / "plugins.md"


def pip_install(source: Path, tmp: Path) -> Path:
    """Install the distribution at ``source`` into ``tmp/site`` with pip (no dependencies,
    no build isolation, no index: offline and a few seconds), built from a copy so that
    the build leaves nothing in the tree. Returns the folder to put on the path."""
    src = tmp / "src"
    shutil.copytree(
        source, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__")
    )
    site = tmp / "site"
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index"]
    command += ["--no-build-isolation", "--disable-pip-version-check", "--target", str(site)]
    subprocess.run([*command, str(src)], check=True, capture_output=True, text=True)
    return site


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    return pip_install(TEMPLATE, tmp_path_factory.mktemp("template"))


@pytest.fixture
def installed(site, monkeypatch):
    """The template's site folder on this process's path (its entry point is then found)."""
    monkeypatch.syspath_prepend(str(site))
    return site


def _env(site: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}


def test_installed_template_passes_oasis_plugins_check(site):
    [dist] = site.glob("oasis_gaussmatch-*.dist-info")
    assert "gaussmatch = oasis_gaussmatch.plugin" in (dist / "entry_points.txt").read_text()
    proc = subprocess.run(
        [sys.executable, "-m", "oasis_apps.cli", "plugins", "--check", "gaussmatch"],
        capture_output=True,
        text=True,
        env=_env(site),
    )
    assert proc.returncode == 0, proc.stderr
    [line] = proc.stdout.splitlines()
    assert line.startswith("subtract gaussmatch (oasis-gaussmatch==0.1.0): ok: Q 0.99")
    assert 0.9 < float(line.split("normalised noise ")[1]) < 1.1


def test_template_passes_its_own_tests(installed):
    """The template's tests/ (what its author runs with pytest), called in this process."""
    import importlib.util

    path = TEMPLATE / "tests" / "test_gaussmatch.py"
    spec = importlib.util.spec_from_file_location("template_tests", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tests = [getattr(module, n) for n in dir(module) if n.startswith("test_")]
    assert len(tests) == 2
    for test in tests:
        test()


def test_listing_shows_the_templates_description(installed, capsys):
    from oasis_apps.cli import main

    assert main(["plugins", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["backends"]
    [row] = [r for r in rows if r["name"] == "gaussmatch"]
    assert row["distribution"] == "oasis-gaussmatch" and row["version"] == "0.1.0"
    assert row["description"] == "Gaussian PSF matching from the two FWHMs (the plugin template)"


def _guide_cards() -> list[str]:
    text = GUIDE.read_text()
    block = text.split("<!-- cards:start -->", 1)[1].split("<!-- cards:end -->", 1)[0]
    cards = []
    for row in block.splitlines()[2:]:  # after the table's head and rule
        column = row.split("|")[2]
        cards += re.findall(r"`([A-Z0-9_ ]+)`", column)
    return cards


def test_subtract_pair_writes_every_card_the_guide_names(installed, tmp_path):
    from astropy.io import fits

    from oasis_apps.cli import main
    from oasis_core.testing import synthetic_pair

    science, template = synthetic_pair(seed=4).write(tmp_path)
    out = tmp_path / "residual.fits"
    args = [str(science), str(template), str(out), "--subtract", "gaussmatch"]
    assert main(["subtract-pair", *args]) == 0
    with fits.open(out) as hdul:
        header = hdul[0].header
        assert {"NOISE", "WEIGHT", "KERNEL"} <= {h.name for h in hdul}
    cards = _guide_cards()
    assert len(cards) >= 15
    missing = [card for card in cards if card not in header]
    assert not missing, f"docs/plugins.md names cards the residual lacks: {missing}"
    assert header["OASPLUG"] == "oasis-gaussmatch==0.1.0" and header["OASBACK"] == "gaussmatch"
    assert header["OASSCI"] == "science" and header["OASTMPL"] == "template"
    assert header["OAS PAR_TRUNCATE"] == 4.0 and header["OASCONV"] == "template"
    assert header["OASQ"] > 0.9 and header["OAS USABLE"] is True


def test_the_core_takes_the_backends_q_as_given(installed, tmp_path):
    from astropy.io import fits
    from oasis_gaussmatch.backend import GaussMatch

    from oasis_core.contracts.hookspecs import hookimpl
    from oasis_core.engine.pair import subtract_pair
    from oasis_core.testing import plugin_registry, synthetic_pair

    class FixedQ(GaussMatch):
        name = "fixed-q"

        def subtract(self, science, template, *, options, workdir):
            residual = super().subtract(science, template, options=options, workdir=workdir)
            return attrs.evolve(residual, q=0.777)

    class Plugin:
        @hookimpl
        def oasis_subtract_backends(self):
            yield FixedQ()

    science, template = synthetic_pair(seed=5).write(tmp_path)
    registry = plugin_registry(("fixed", Plugin()))
    kwargs = {"method": "fixed-q", "registry": registry}
    subtract_pair(science, template, tmp_path / "hi.fits", **kwargs)
    assert fits.getheader(tmp_path / "hi.fits")["OASQ"] == pytest.approx(0.777)
    # below the floor, and no new source to measure it again without: masked and flagged
    science, template = synthetic_pair(seed=5, transients=()).write(tmp_path / "quiet")
    options = {"subtract.q_floor": 0.8}
    residual = subtract_pair(science, template, tmp_path / "lo.fits", options=options, **kwargs)
    assert residual.q == pytest.approx(0.777) and not residual.weight.any()
    assert "below the floor 0.8" in residual.meta["flag"]


def test_shared_noise_matters_as_the_guide_says(installed):
    from oasis_gaussmatch.backend import GaussMatch

    from oasis_core.testing import check_backend, synthetic_pair

    pair = synthetic_pair(seed=1, depth=2, science_in_template=True)
    honest = check_backend(GaussMatch(), pair=pair)
    ignored = attrs.evolve(pair, template=attrs.evolve(pair.template, inputs=()))
    overstated = check_backend(GaussMatch(), pair=ignored)
    assert 0.95 < honest.normalized_noise < 1.05
    assert overstated.normalized_noise < 0.9  # the guide: 0.86 for N = 2


def test_aligned_frames_scale_as_the_guide_says(tmp_path):
    from oasis_core.engine.plugins import Registry
    from oasis_core.testing import synthetic_pair

    pair = synthetic_pair(seed=3)
    ref = pair.science
    half = attrs.evolve(
        ref,
        data=ref.data * 0.5,
        background=ref.background * 0.5,
        noise=ref.noise * 0.5,
        gain=ref.gain * 2,
        saturation=ref.saturation * 0.5,
        name="half",
    )
    backend = Registry().get("align", "native").backend
    out = backend.align(half, ref, options=backend.Options(), workdir=tmp_path)
    s = out.meta["phot_scale"]
    assert s == pytest.approx(2.0, rel=0.03)
    o = out.meta["phot_offset"]
    assert out.background == pytest.approx(s * half.background + o)
    assert out.noise == pytest.approx(s * half.noise)
    assert out.gain == pytest.approx(half.gain / s)
    assert out.readnoise == half.readnoise


def test_guide_excerpts_are_the_templates_code():
    text = GUIDE.read_text()
    excerpts = re.findall(r"<!-- from: (\S+) -->\n```\w*\n(.*?)```", text, re.S)
    assert len(excerpts) >= 3
    for path, code in excerpts:
        assert code in (ROOT / path).read_text(), f"docs/plugins.md quotes {path} wrongly"
