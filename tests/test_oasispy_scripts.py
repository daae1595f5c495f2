"""Scripts written against OasisPy's documented API (``from OasisPy import ...``) run
unchanged on OASIS; ``ALIGN(path, align_method='fakes')`` skips registration and only
aligns the frames photometrically, as OasisPy documents."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from tests.integration.pipeline_kit import CATALOGS, make_target

# A script in the style of OasisPy's documentation: its import paths, its function and
# parameter names, INITIALIZE answering its prompt on stdin. Nothing OASIS-specific.
SCRIPT = """\
import sys

from OasisPy import initialize, mask, align, psf, combine, subtract, mr, extract
from OasisPy.psf import PSF
from OasisPy.simulation import sim_fakes, sim_sameField
import OasisPy.align
import OasisPy.MR

path = sys.argv[1]
initialize.INITIALIZE()
mask.MASK(path)
OasisPy.align.ALIGN(path)
PSF(path)
combine.COMBINE(path)
subtract.SUBTRACT(path, method='ois')
mr.MR(path, method='sos')
extract.EXTRACT(path, method='both')
assert callable(sim_fakes) and callable(sim_sameField) and OasisPy.MR.MR is mr.MR
print('OASISPY SCRIPT DONE')
"""


def one_job(target: Path) -> None:
    """Run the target's stages in one process (the machine's cores are shared)."""
    config = target / "configs" / "oasis.toml"
    config.write_text(config.read_text() + "\n[run]\njobs = 1\n")


def test_oasispy_script_runs_unchanged_on_a_simulated_target(tmp_path):
    target = make_target(tmp_path / "root")
    one_job(target)
    script = tmp_path / "oasispy_script.py"
    script.write_text(SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script), str(target)],
        cwd=tmp_path,  # OasisPy is found as installed, not from the checkout
        input=f"{tmp_path / 'root'}\n",  # INITIALIZE's prompt: the existing OASIS root
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "OASISPY SCRIPT DONE" in done.stdout
    for name in CATALOGS:
        assert (target / "sources" / name).is_file(), name
    assert fits.getheader(target / "residuals" / "MR.fits")["OASBACK"] == "sos"
    residuals = sorted((target / "residuals").glob("*_residual.fits"))
    assert residuals
    assert {fits.getheader(p)["OASBACK"] for p in residuals} == {"ois"}


def test_ALIGN_fakes_keeps_geometry_and_matches_flux_only(tmp_path):
    from OasisPy import align

    target = make_target(tmp_path)
    one_job(target)
    align.ALIGN(str(target), align_method="fakes")
    reference = (target / "aligned" / "reference.txt").read_text().strip()
    aligned = sorted((target / "aligned").glob("*.fits"))
    assert len(aligned) >= 4
    for path in aligned:
        name = path.name.removesuffix(".fits")
        raw = fits.getdata(target / "data" / path.name).astype(float)
        with fits.open(path) as hdul:
            out = hdul[0].data.astype(float)
            weight = hdul["WEIGHT"].data
            hdr = hdul[0].header
        history = "\n".join(str(h) for h in hdr.get("HISTORY", []))
        assert "align.native.initial = 'none'" in history, name
        if name == reference:
            continue
        assert hdr["ALNMETH"] == "none", name
        # the simulated frames are shifted and rotated: registering would move the pixels;
        # here every good pixel is the input's, up to one scale and offset
        good = weight > 0
        assert good.mean() > 0.9, name
        design = np.column_stack([raw[good], np.ones(good.sum())])
        (scale, offset), *_ = np.linalg.lstsq(design, out[good], rcond=None)
        assert scale > 0, name
        misfit = out[good] - (scale * raw[good] + offset)
        assert np.max(np.abs(misfit)) <= 1e-5 * np.max(np.abs(out[good])), name


def test_ALIGN_standard_registers_the_same_target(tmp_path):
    """The control: without 'fakes' the pixels move (the frames are not registered), so
    the test above would tell the two apart."""
    from OasisPy import align

    target = make_target(tmp_path)
    one_job(target)
    align.ALIGN(str(target))
    reference = (target / "aligned" / "reference.txt").read_text().strip()
    moved = []
    for path in sorted((target / "aligned").glob("*.fits")):
        if path.name.removesuffix(".fits") == reference:
            continue
        assert fits.getheader(path)["ALNMETH"] != "none"
        raw = fits.getdata(target / "data" / path.name).astype(float)
        out = fits.getdata(path).astype(float)
        design = np.column_stack([raw.ravel(), np.ones(raw.size)])
        coef, *_ = np.linalg.lstsq(design, out.ravel(), rcond=None)
        moved.append(np.max(np.abs(out.ravel() - design @ coef)) > 1e-3 * np.max(np.abs(out)))
    assert moved and all(moved)


def test_oasispy_modules_re_export_the_documented_functions():
    import importlib

    from oasis_apps import oasispy

    documented = {
        "initialize": ["INITIALIZE"],
        "get": ["GET"],
        "mask": ["MASK"],
        "align": ["ALIGN"],
        "psf": ["PSF"],
        "combine": ["COMBINE"],
        "subtract": ["SUBTRACT"],
        "MR": ["MR"],
        "mr": ["MR"],
        "extract": ["EXTRACT"],
        "pipeline": ["PIPELINE"],
        "run": ["RUN"],
        "simulation": ["SIM", "sim_fakes", "sim_sameField"],
        "test": ["TEST"],
        "montage": ["MOSAIC"],
        "mosaic": ["MOSAIC"],
    }
    for module, names in documented.items():
        mod = importlib.import_module(f"OasisPy.{module}")
        for name in names:
            assert getattr(mod, name) is getattr(oasispy, name), f"OasisPy.{module}.{name}"


@pytest.mark.parametrize("shift", [(0.0, 0.0), (2.6, -1.3)])
def test_native_initial_none_keeps_pixels_and_rescales(shift):
    """The native backend's ``initial = "none"``: no transform, whatever the frames' true
    offset; data = scale * frame + offset on every good pixel; recorded in meta and header."""
    from oasis_native.align import NativeAlign, NativeAlignOptions

    from oasis_core.contracts.errors import StageError
    from oasis_core.contracts.model import Frame, readonly
    from tests.native.test_align import make_pair

    frame, reference, _, _ = make_pair(shift=shift, angle=0.0, scale=1.7)
    before = frame.data.copy()
    out = NativeAlign().align(
        frame, reference, options=NativeAlignOptions(initial="none"), workdir=Path(".")
    )
    m = out.meta
    assert (m["align_method"], out.header["ALNMETH"]) == ("none", "none")
    assert m["shift_x"] == m["shift_y"] == m["rotation"] == 0.0
    assert m["choice_align"].startswith("none")
    good = out.weight > 0
    assert good.all()
    expected = m["phot_scale"] * before + m["phot_offset"]
    np.testing.assert_allclose(out.data, expected, rtol=2e-6, atol=1e-3)
    if shift == (0.0, 0.0):
        assert m["phot_scale"] == pytest.approx(1.7, rel=0.01)
        assert m["phot_nstars"] >= 20
    np.testing.assert_array_equal(frame.data, before)  # input untouched
    small = readonly(np.ones((32, 32)))
    with pytest.raises(StageError, match=r"align frame 'frm': align.native.initial = 'none'"):
        NativeAlign().align(
            Frame(data=small, name="frm"),
            reference,
            options=NativeAlignOptions(initial="none"),
            workdir=Path("."),
        )
