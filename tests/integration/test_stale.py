"""Stale results are never passed off as new: a unit of work that fails loses its old output
and is counted, a stage with nothing usable stops the run, and every stage reads only
outputs made from the current inputs.

Each test reruns a copy of one finished small target with a ``flaky`` backend
(:mod:`tests.integration.flaky_backends`) that raises on chosen frames.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from oasis_core.contracts.errors import InputError, StageError
from oasis_core.engine import outputs
from oasis_core.engine import pipeline as pl
from tests.integration import flaky_backends
from tests.integration.pipeline_kit import CATALOGS, copy_target

pytestmark = pytest.mark.slow

FRAMES = [f"sim_{i:03d}" for i in range(5)]


@pytest.fixture(scope="module")
def done(small_target):
    """The small target after a full run with the defaults (every frame subtracted)."""
    target = small_target[1]
    totals = (target / "sources" / "total_sources.txt").read_text()
    assert "residuals searched: 5" in totals, totals
    assert (target / "aligned" / "reference.txt").read_text().strip() == "sim_000"
    frames = set(Table.read(target / "sources" / "sources.ecsv")["frame"])
    assert {"sim_002", "sim_003"} <= frames  # the frames the tests make fail have sources
    return target


@pytest.fixture
def target(done, tmp_path):
    return copy_target(done, tmp_path)


def _flaky(target, stage, fail_on, **kwargs):
    """Run the pipeline with ``stage``'s backend ``flaky`` failing on ``fail_on``."""
    options = {f"{stage}.flaky.fail_on": fail_on}
    if stage == "mask":
        options["mask.flaky.niter"] = 1  # as the target's configuration does for native
    return pl.pipeline(
        target,
        backends={stage: "flaky"},
        options=options,
        registry=flaky_backends.registry(),
        jobs=1,
        **kwargs,
    )


def _totals(target) -> str:
    return (target / "sources" / "total_sources.txt").read_text()


def _source_frames(target) -> set[str]:
    return {str(f) for f in Table.read(target / "sources" / "sources.ecsv")["frame"]}


def _log_line(target, name) -> str:
    lines = (target / "residuals" / "log.txt").read_text().splitlines()
    return next(ln for ln in lines if ln.split()[:1] == [name])


def _assert_no_catalogs(target) -> None:
    for name in CATALOGS:
        assert not (target / "sources" / name).exists(), name
    assert not (target / "sources" / "detections").exists()


def _assert_no_summaries(target) -> None:
    """No summary of an earlier run is left behind: master residual, catalogs."""
    assert not (target / "residuals" / "MR.fits").exists()
    _assert_no_catalogs(target)


def test_subtract_failing_everywhere_stops_without_old_residuals(target):
    with pytest.raises(StageError) as info:
        _flaky(target, "subtract", "*")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("subtract: no frame could be subtracted (5 failed; the first: ")
    assert "flaky subtract backend broke on sim_000" in message
    assert not list((target / "residuals").glob("*_residual.fits"))
    for name in FRAMES:
        line = _log_line(target, name)
        assert line.split()[1] == "flaky" and "failed: " in line, line
        assert f"flaky subtract backend broke on {name}" in line
    _assert_no_summaries(target)
    # and extract alone finds nothing to use instead of the previous run's files
    with pytest.raises(InputError, match=r"no usable residual|nothing to extract"):
        pl.extract(target, jobs=1)


def test_subtract_failing_on_one_frame_is_counted_and_the_others_used(target):
    _flaky(target, "subtract", "sim_002")
    assert not (target / "residuals" / "sim_002_residual.fits").exists()
    assert "failed: " in _log_line(target, "sim_002")
    assert "flaky subtract backend broke on sim_002" in _log_line(target, "sim_002")
    totals = _totals(target)
    assert "frames that could not be subtracted: 1 (sim_002)" in totals
    assert "residuals searched: 4" in totals
    assert fits.getheader(target / "residuals" / "MR.fits")["NCOMBINE"] == 4
    assert "sim_002" not in _source_frames(target)
    for name in ("sim_000", "sim_003"):
        assert fits.getheader(target / "residuals" / f"{name}_residual.fits")["OASBACK"] == "flaky"


@pytest.mark.parametrize(
    ("stage", "output"),
    [
        ("mask", "masks/sim_003.weight.fits"),
        ("psf", "psf/sim_003.psf.fits"),
        ("align", "aligned/sim_003.fits"),
    ],
)
def test_frame_stage_failure_removes_the_output_and_the_frame_is_not_used(target, stage, output):
    _flaky(target, stage, "sim_003")
    assert not (target / output).exists()
    # the frame's older downstream outputs are still on disk but not used
    assert "sim_003" not in _source_frames(target)
    header = fits.getheader(target / "templates" / "template.fits")
    stacked = [header[k] for k in header if k.startswith("OASTIN")]
    assert "sim_003" not in stacked
    assert fits.getheader(target / "residuals" / "MR.fits")["NCOMBINE"] == 4
    assert "residuals searched: 4" in _totals(target)


def test_combine_failure_removes_the_template_and_what_came_from_it(target):
    with pytest.raises(StageError, match=r"combine backend 'flaky'.*broke on template"):
        _flaky(target, "combine", "*")
    assert not (target / "templates" / "template.fits").exists()
    assert not (target / "templates" / "template.psf.fits").exists()
    _assert_no_summaries(target)
    # the residuals of the old template are not used either
    with pytest.raises(InputError):
        pl.extract(target, jobs=1)


def test_mr_failure_removes_the_master_residual_and_the_catalogs(target):
    with pytest.raises(StageError, match=r"mr backend 'flaky'.*broke on MR"):
        _flaky(target, "mr", "*")
    _assert_no_summaries(target)
    assert len(list((target / "residuals").glob("*_residual.fits"))) == 5


def test_extract_failure_on_one_residual_is_counted(target):
    _flaky(target, "extract", "sim_002")
    assert not (target / "sources" / "detections" / "sim_002.ecsv").exists()
    totals = _totals(target)
    assert "residuals whose extraction failed: 1 (sim_002)" in totals
    assert "residuals searched: 4" in totals
    assert "sim_002" not in _source_frames(target)


def test_extract_follows_each_residuals_recorded_verdict(target, caplog):
    # a stricter q_floor given to extract does not re-judge residuals made with the default
    pl.extract(target, options={"subtract.q_floor": 0.999}, jobs=1)
    assert "residuals searched: 5" in _totals(target)
    # a residual recorded as below the floor of its own run stays out, whatever the floor now
    path = target / "residuals" / "sim_002_residual.fits"
    assert fits.getheader(path)["OAS USABLE"] is True
    fits.setval(path, "HIERARCH OAS USABLE", value=False)
    ctx = pl.make_context(target, options={"subtract.q_floor": 0.0})
    good, bad = outputs.usable_residuals(ctx)
    assert bad == ["sim_002"] and "sim_002" not in good and len(good) == 4


def test_readers_refuse_outputs_made_from_other_inputs(target, caplog):
    """A raw frame changed after the run: extract alone does not use what was made from
    its old content, and refuses a master residual made from other residuals."""
    raw = target / "data" / "sim_003.fits"
    with fits.open(raw) as hdul:
        data = hdul[0].data.astype(np.float32) + 5.0
        header = hdul[0].header
    fits.writeto(raw, data, header, overwrite=True)
    ctx = pl.make_context(target)
    with caplog.at_level(logging.WARNING, logger="oasis"):
        good, _bad = outputs.usable_residuals(ctx)
    assert "sim_003" not in good and len(good) == 4
    assert "sim_003: its PSF was not measured from its current data" in caplog.text
    with pytest.raises(InputError, match=r"MR\.fits: not made from the 4 usable residuals"):
        pl.extract(target, jobs=1)
    _assert_no_catalogs(target)
