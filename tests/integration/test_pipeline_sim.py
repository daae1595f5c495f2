"""End to end on a simulated target: detections, provenance, resume."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from oasis_apps.demo import evaluate
from oasis_core.engine.pipeline import pipeline
from oasis_core.engine.quality import q_value
from tests.integration.pipeline_kit import copy_target

pytestmark = pytest.mark.slow


def _truth(target):
    return Table.read(target.path.parent.parent / "simulations" / target.name / "truth.ecsv")


def test_transients_recovered_with_few_false_detections(sim_target_done):
    result = evaluate(sim_target_done, _truth(sim_target_done))
    assert result.frames_used >= 6
    assert result.recoverable >= 3, "the simulation must inject bright transients"
    assert result.recovered >= 0.8 * result.recoverable, result.line()
    assert result.max_false <= 3, result.false_per_frame
    assert result.mean_q > 0.75


def test_outputs_exist_with_provenance(sim_target_done):
    path = sim_target_done.path
    for name in (
        "sources.txt",
        "filtered_sources.txt",
        "MR_sources.txt",
        "MR_filtered_sources.txt",
        "total_sources.txt",
        "filtered_sources.ecsv",
    ):
        assert (path / "sources" / name).exists(), name
    totals = (path / "sources" / "total_sources.txt").read_text()
    assert "mean Q" in totals and "frames that could not be subtracted: 0" in totals
    residuals = sorted((path / "residuals").glob("*_residual.fits"))
    assert len(residuals) >= 6
    header = fits.getheader(residuals[0])
    assert header["OASSTAGE"] == "subtract" and header["OASBACK"] == "ois"
    assert header["OASPLUG"].startswith("oasis-ois==")
    # residual names as docs/plugins.md states them: F_residual, from F and "template"
    assert f"{header['OASSCI']}_residual.fits" == residuals[0].name
    assert header["OASTMPL"] == "template"
    assert header["OASIN0"].count(":") == 1 and len(header["OASOPTH"]) == 16
    with fits.open(residuals[0]) as hdul:
        assert {"NOISE", "WEIGHT"} <= {h.name for h in hdul}
        # the recorded Q is that of the residual written with it, and a noise-limited one;
        # Q is the backend's (docs/plugins.md), and the core then masks the pixels where
        # the template's stack misses frames over a source: Q on the written pixels
        # differs by no more than what those few weigh
        q = q_value(hdul[0].data, hdul["NOISE"].data, hdul["WEIGHT"].data)
        good = int((hdul["WEIGHT"].data > 0).sum())
    masked = header.get("OAS INCOMPLETE_MASKED", 0)
    assert masked < 0.01 * good
    assert header["OASQ"] == pytest.approx(q, rel=1e-6 + masked / good)
    assert header["OASQ"] > 0.9
    assert (path / "templates" / "log.txt").read_text().count("template from") >= 1
    assert "Q" in (path / "residuals" / "log.txt").read_text()
    assert (path / "configs" / "last_run.toml").exists()
    psf = Table.read(path / "psf" / "psf.ecsv")
    assert np.all(psf["fwhm"] > 1.5) and np.all(psf["fwhm"] < 8)


def test_rerun_skips_finished_work_and_force_redoes(small_target, tmp_path):
    # on a copy of the pipeline kit's small finished target: resuming is the same on any
    # size of frame, and the shared simulated target is left as the other tests read it
    path = copy_target(small_target[1], tmp_path)
    outputs = sorted(path.glob("masks/*.fits")) + sorted(path.glob("residuals/*.fits"))
    before = {p: p.stat().st_mtime_ns for p in outputs}
    pipeline(path, jobs=1)
    assert {p: p.stat().st_mtime_ns for p in outputs} == before
    # a changed option redoes only the stage it belongs to (and what depends on it)
    pipeline(path, jobs=2, options={"subtract.ois.deg_spatial": 1})
    masks = [p for p in outputs if p.parent.name == "masks"]
    assert all(p.stat().st_mtime_ns == before[p] for p in masks)
    res = [p for p in outputs if p.name.endswith("_residual.fits")]
    assert masks and res
    assert all(p.stat().st_mtime_ns != before[p] for p in res)
    assert fits.getheader(res[0])["OAS PAR_DEG_SPATIAL"] == 1
    pipeline(path, jobs=2)  # back to the defaults
    assert fits.getheader(res[0])["OAS PAR_DEG_SPATIAL"] == 2
