"""Resume: killing `oasis pipeline` mid-run and running it again finishes without redoing
work; a changed raw frame or template redoes exactly what was made from it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from astropy.io import fits

from oasis_apps.demo import simulate_target
from oasis_core.engine.pipeline import pipeline
from tests.integration.pipeline_kit import CATALOGS, FITS_DIRS, copy_target

pytestmark = pytest.mark.slow


def test_killed_run_resumes(tmp_path):
    target = simulate_target(tmp_path, "resume", n_frames=6, shape=(256, 256), seed=11)
    proc = subprocess.Popen(
        [sys.executable, "-m", "oasis_apps.cli", "pipeline", str(target.path), "-j", "1", "-q"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 240
    aligned = target.path / "aligned"
    while time.monotonic() < deadline and proc.poll() is None:
        if len(list(aligned.glob("*.fits"))) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be interrupted"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (target.path / "sources" / "total_sources.txt").exists()
    done = sorted(target.path.glob("masks/*.fits")) + sorted(aligned.glob("*.fits"))
    assert len(list(target.path.glob("masks/*.fits"))) == 6
    before = {p: p.stat().st_mtime_ns for p in done}
    pipeline(target.path, jobs=2)
    assert {p: p.stat().st_mtime_ns for p in done} == before, "finished frames were redone"
    assert (target.path / "sources" / "total_sources.txt").exists()
    assert len(list(aligned.glob("*.fits"))) == 6
    assert not list(target.path.rglob(".*.part"))


@pytest.fixture(scope="module")
def done(small_target):
    """The small target of :mod:`tests.integration.pipeline_kit` after a full run."""
    target = small_target[1]
    assert (target / "aligned" / "reference.txt").read_text().strip() == "sim_000"
    return target


def _outputs(target):
    """Every output of a run: path -> mtime."""
    paths = [p for d in FITS_DIRS for p in (target / d).glob("*.fits")]
    paths += [target / "sources" / name for name in CATALOGS]
    return {p.relative_to(target).as_posix(): p.stat().st_mtime_ns for p in paths}


def _redone(before, after):
    return {p for p in before if after.get(p) != before[p]}


def test_changed_raw_frame_redoes_its_units_and_everything_downstream(done, tmp_path):
    target = copy_target(done, tmp_path)
    raw = target / "data" / "sim_003.fits"
    with fits.open(raw) as hdul:
        data, header = hdul[0].data.astype(np.float32) + 5.0, hdul[0].header
    fits.writeto(raw, data, header, overwrite=True)
    before = _outputs(target)
    pipeline(target, jobs=1)
    redone = _redone(before, _outputs(target))
    frame_units = {"masks/sim_003.weight.fits", "psf/sim_003.psf.fits", "aligned/sim_003.fits"}
    assert frame_units <= redone
    # the other frames' masks, PSFs and aligned images are untouched
    others = {
        p for p in before if p.split("/")[0] in ("masks", "psf", "aligned") and "sim_003" not in p
    }
    assert not others & redone, sorted(others & redone)
    # downstream: the template it is stacked in, so every residual, the master, the catalogs
    residuals = {p for p in before if p.endswith("_residual.fits")}
    assert len(residuals) == 5
    summaries = {"templates/template.fits", "residuals/MR.fits", "sources/total_sources.txt"}
    assert residuals | summaries <= redone


def test_changed_template_redoes_every_residual(done, tmp_path):
    target = copy_target(done, tmp_path)
    template = target / "templates" / "template.fits"
    with fits.open(template, mode="update") as hdul:  # whatever changed it, not the pipeline
        hdul[0].data = hdul[0].data * np.float32(1.01)
    before = _outputs(target)
    pipeline(target, jobs=1)
    redone = _redone(before, _outputs(target))
    residuals = {p for p in before if p.endswith("_residual.fits")}
    assert residuals <= redone
    assert "residuals/MR.fits" in redone
    upstream = {p for p in before if p.split("/")[0] in ("masks", "psf", "aligned")}
    assert not upstream & redone, sorted(upstream & redone)
    assert "templates/template.fits" not in redone  # its own inputs did not change
