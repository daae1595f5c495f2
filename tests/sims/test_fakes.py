"""``oasis sim fakes``: injection, the efficiency curve and its limits, on a real run."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.table import Table

from oasis_apps.fakes import (
    efficiency_bins,
    efficiency_figure,
    efficiency_limits,
    inject,
    render_stamps,
    sim_fakes,
)
from oasis_apps.fakes_efficiency import next_range, pass_sizes
from oasis_core.contracts.errors import InputError, StageError


@pytest.mark.parametrize("model", ["moffat", "gauss"])
def test_injected_flux_is_the_requested_flux(model):
    data = np.zeros((200, 200), np.float32)
    x = np.array([50.3, 120.7, 160.0])
    y = np.array([60.6, 100.2, 150.5])
    out = inject(data, x, y, np.array([1000.0, 2500.0, 400.0]), 4.0, model)
    assert data.max() == 0  # the input is never modified
    for xi, yi, f in zip(x, y, (1000.0, 2500.0, 400.0), strict=True):
        box = out[int(yi) - 18 : int(yi) + 19, int(xi) - 18 : int(xi) + 19]
        # all but the wings beyond the stamp (Moffat beta 2.5: ~2 % beyond 4.5 FWHM)
        assert box.sum() == pytest.approx(f, rel=0.03)
        peak = np.unravel_index(np.argmax(box), box.shape)
        assert abs(peak[0] - 18 - (yi - int(yi))) <= 1 and abs(peak[1] - 18 - (xi - int(xi))) <= 1


def test_profiles_have_the_requested_fwhm():
    r = np.linspace(0, 10, 2001)
    for model in ("moffat", "gauss"):
        prof = render_stamps(r, np.zeros_like(r), 5.0, model)
        half = r[np.argmin(np.abs(prof - prof[0] / 2))]
        assert 2 * half == pytest.approx(5.0, abs=0.02)
    with pytest.raises(InputError, match="moffat"):
        render_stamps(r, r, 3.0, "airy")


def test_efficiency_limits_of_a_known_curve():
    rng = np.random.default_rng(1)
    flux = 10 ** rng.uniform(1, 4, 4000)
    # true curve: 50 % at 300 ADU, width 0.1 dex -> 90 % at 300 * 10**(0.1 ln 9)
    p = 1 / (1 + np.exp(-(np.log10(flux) - np.log10(300)) / 0.1))
    detected = rng.uniform(size=flux.size) < p
    f50, f90 = efficiency_limits(flux, detected)
    assert f50 == pytest.approx(300, rel=0.06)
    assert f90 == pytest.approx(300 * 10 ** (0.1 * np.log(9)), rel=0.08)
    # never 90 %: not reached
    f50, f90 = efficiency_limits(flux, detected & (rng.uniform(size=flux.size) < 0.8))
    assert np.isfinite(f50) and np.isnan(f90)


def _bracketed(flux, detected, value, level):
    """A bin of fakes below ``value`` under ``level`` and one above it at or over it."""
    bins = efficiency_bins(flux, detected)
    frac = bins.detected / bins.n
    below = (bins.flux < value) & (frac < level)
    above = (bins.flux > value) & (frac >= level)
    return bool(np.isfinite(value) and below.any() and above.any())


def test_limits_are_never_extrapolated():
    rng = np.random.default_rng(2)
    # the transition lies below every fake: every bin is above 90 % (a few fakes lost at
    # any flux, as on a real frame: one in 30)
    flux = np.sort(10 ** rng.uniform(3, 4, 400))
    detected = np.arange(400) % 30 != 7
    assert (efficiency_bins(flux, detected).fraction >= 0.9).all() and not detected.all()
    assert np.isnan(efficiency_limits(flux, detected)).all()
    assert np.isnan(efficiency_limits(flux, np.ones(flux.size, bool))).all()
    assert np.isnan(efficiency_limits(flux, np.zeros(flux.size, bool))).all()
    # fakes across the transition: both points measured, each between two bins
    flux = 10 ** rng.uniform(1.5, 3.5, 600)
    p = 1 / (1 + np.exp(-(np.log10(flux) - np.log10(300)) / 0.1))
    detected = rng.uniform(size=flux.size) < p
    f50, f90 = efficiency_limits(flux, detected)
    assert _bracketed(flux, detected, f50, 0.5) and _bracketed(flux, detected, f90, 0.9)
    # a gap in the fluxes: the value lies between the two bins around the gap
    flux = np.r_[10 ** rng.uniform(2.4, 3.0, 80), 10 ** rng.uniform(3.4, 3.9, 80)]
    detected = flux > 2000
    f50, f90 = efficiency_limits(flux, detected)
    assert 1000 < f50 <= f90 < 2512


def test_bins_hold_equal_numbers_and_a_monotone_curve():
    rng = np.random.default_rng(3)
    flux = 10 ** rng.uniform(1, 3, 250)
    detected = rng.uniform(size=flux.size) < np.clip((np.log10(flux) - 1.5), 0, 1)
    bins = efficiency_bins(flux, detected)
    assert len(bins.n) == 10 and bins.n.sum() == 250 and np.ptp(bins.n) <= 1
    assert np.all(np.diff(bins.flux) > 0) and np.all(bins.low < bins.flux)
    assert np.all(bins.flux < bins.high)
    g = bins.monotone
    assert np.all(np.diff(g) >= 0)
    assert g @ bins.n == pytest.approx(bins.detected.sum())  # pooling keeps the total
    i, j = bins.crossing(0.5)
    assert j == i + 1 and g[i] < 0.5 <= g[j]
    assert efficiency_bins(flux, np.ones(250, bool)).crossing(0.9) == "below"
    assert efficiency_bins(flux, np.zeros(250, bool)).crossing(0.5) == "above"


def test_the_next_pass_goes_where_the_curve_rises():
    rng = np.random.default_rng(4)
    flux = 10 ** rng.uniform(3, 4, 80)  # 1000..10000 ADU
    # all found: look fainter, below the fakes and the 5-sigma flux
    lo, hi = next_range(flux, np.ones(80, bool), 400.0)
    assert lo == pytest.approx(400 / 3 / 1.25) and hi < 2000
    # none found: look brighter, up to 3x the brightest fakes
    lo, hi = next_range(flux, np.zeros(80, bool), 400.0)
    assert lo > 5000 and hi == pytest.approx(3 * 1.25 * flux.max(), rel=0.1)
    # found from 3000 ADU on: from the last bin under 50 % to the first at 90 %
    lo, hi = next_range(flux, flux > 3000, 400.0)
    assert 1500 < lo < 3000 < hi < 6000


def test_passes_keep_the_number_of_iterations():
    for n in range(1, 60):
        sizes = pass_sizes(n, True)
        assert sum(sizes) == n and sizes[0] >= n / 2 and all(s > 0 for s in sizes)
        assert len(sizes) == (1 if n == 1 else 2 if n < 4 else 3)
    assert pass_sizes(7, False) == [7]


def _visible_tick_labels(fig, axis, which):
    lo, hi = sorted(axis.get_view_interval())
    k = 0 if which == "x" else 1
    return [
        t
        for t in axis.get_ticklabels(which="both")
        if t.get_visible() and t.get_text() and lo <= t.get_position()[k] <= hi
    ]


@pytest.mark.parametrize(
    ("lo", "hi", "mode"),
    [
        (1200.0, 2000.0, "flux"),  # matplotlib's own labels: 1.8, 1.9 and 2 x 10^3 overlap
        (30.0, 60.0, "flux"),
        (1000.0, 1500.0, "flux"),
        (50.0, 20000.0, "flux"),
        (0.05, 1e6, "flux"),
        (5.0, 80.0, "flux"),
        (10.0, 1e5, "mag"),
    ],
)
def test_tick_labels_never_overlap(lo, hi, mode):
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(5)
    flux = 10 ** rng.uniform(np.log10(lo), np.log10(hi), 300)
    mid = np.sqrt(lo * hi)
    table = Table({"flux": flux, "detected": flux > mid})
    fig = efficiency_figure(table, mid, 1.1 * mid, 0.8 * mid, mode, 25.0)
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        (ax,) = fig.axes
        for which, axis in (("x", ax.xaxis), ("y", ax.yaxis)):
            labels = _visible_tick_labels(fig, axis, which)
            assert len(labels) >= 2, [t.get_text() for t in labels]
            boxes = [t.get_window_extent(renderer) for t in labels]
            for i, a in enumerate(boxes):
                for b, text in zip(boxes[i + 1 :], labels[i + 1 :], strict=True):
                    assert not a.overlaps(b), (labels[i].get_text(), text.get_text())
    finally:
        plt.close(fig)


def test_an_unmeasured_point_says_where_the_curve_lies():
    from oasis_apps.fakes import FakesResult

    flux = np.geomspace(1000, 5000, 50)
    table = Table({"flux": flux, "detected": np.ones(50, bool)})
    table.meta["zero_point"] = 25.0
    line = FakesResult(table, None, None, np.nan, np.nan, 300.0, "flux").line()
    assert line.startswith("50/50 fakes detected; 50% completeness below the faintest bin")
    table["detected"] = False
    line = FakesResult(table, None, None, np.nan, np.nan, 300.0, "flux").line()
    assert "0/50 fakes detected; 50% completeness not reached (at most 0% detected" in line


def test_bad_arguments_are_one_line_errors(tmp_path):
    with pytest.raises(InputError, match="input_mode"):
        sim_fakes(tmp_path, input_mode="counts")
    with pytest.raises(InputError, match="PSF"):
        sim_fakes(tmp_path, PSF="airy")


# ------------------------------------------------- on a small simulated target (no transients)


@pytest.fixture(scope="module")
def quiet_target(tmp_path_factory):
    """Four simulated 192x192 frames without transients, after a pipeline run: where no
    fake is found, nothing at all survives the filters."""
    from oasis_apps.get import unpack
    from oasis_core.engine import io
    from oasis_core.engine.config import render_config
    from oasis_core.engine.pipeline import pipeline
    from oasis_core.engine.plugins import Registry
    from oasis_core.engine.tree import Target, init_root

    base = init_root(tmp_path_factory.mktemp("quietfakes"))
    registry = Registry()
    frames = base / "simulations" / "q" / "frames"
    registry.simulator("native").simulate(
        frames, n_frames=4, shape=(192, 192), seed=7, transients=0
    )
    target = Target(base / "targets" / "q").create()
    unpack([frames], target)
    io.write_text(target.config_file, render_config(registry))
    pipeline(target.path, jobs=1)
    return target


def test_an_iteration_where_nothing_is_found_counts(quiet_target, capsys):
    from oasis_apps.cli import main

    argv = ["sim", "fakes", str(quiet_target.path), "--n-fakes", "20", "--iterations", "2"]
    argv += ["--f-min", "0.01", "--f-max", "0.1", "--no-adapt", "-j", "1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "result: 0/40 fakes detected; 50% completeness not reached" in out
    result = sim_fakes(
        quiet_target.path, n_fakes=20, iterations=2, f_min=0.01, f_max=0.1, adapt=False, jobs=1
    )  # resumed: the same iterations
    table = result.table
    assert len(table) == 40 and not table["detected"].any()
    assert sorted(set(table["iteration"])) == [0, 1]
    assert np.isnan(result.flux_50) and np.isnan(result.flux_90)
    assert np.isnan(table["flux_out"]).all() and table["usable"].all()
    summary = (result.directory / "summary.txt").read_text()
    assert summary.startswith("0/40 fakes detected")


def test_a_failed_iteration_fails_the_command(quiet_target, monkeypatch, capsys):
    import oasis_core.engine.pipeline as pl
    from oasis_apps.cli import main

    kwargs = {"n_fakes": 20, "iterations": 2, "f_min": 100, "f_max": 6000, "seed": 3}
    real_detect = pl.detect
    calls = []

    def broken_first(*args, **kw):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("disk on fire")
        return real_detect(*args, **kw)

    monkeypatch.setattr(pl, "detect", broken_first)
    with pytest.raises(StageError, match=r"1 iteration\(s\) failed \(iteration 0: disk on fire\)"):
        sim_fakes(quiet_target.path, adapt=False, jobs=1, **kwargs)
    out_dir = quiet_target.path.parent.parent / "simulations" / "q_fakes" / "fakes"
    assert not (out_dir / "summary.txt").exists() and not (out_dir / "fakes.ecsv").exists()
    kept = out_dir / "iterations" / "iter_0001.ecsv"
    stamp = kept.stat().st_mtime_ns
    # through the command line: exit 1, one error line
    calls.clear()
    argv = ["sim", "fakes", str(quiet_target.path), "--n-fakes", "20", "--iterations", "2"]
    argv += ["--f-min", "100", "--f-max", "6000", "--seed", "3", "--no-adapt", "-j", "1", "-q"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "iteration 0: disk on fire" in err[-1]
    # repaired: the failed iteration is done, the finished one kept as it was
    monkeypatch.setattr(pl, "detect", real_detect)
    result = sim_fakes(quiet_target.path, adapt=False, jobs=1, **kwargs)
    assert len(result.table) == 40 and kept.stat().st_mtime_ns == stamp


def test_adaptive_passes_bracket_50_and_90_percent(quiet_target):
    # the requested range lies wholly below the transition (the demo's case, mirrored)
    kwargs = {"n_fakes": 20, "f_min": 30, "f_max": 500, "flux_scale": "log", "jobs": 1}
    result = sim_fakes(quiet_target.path, iterations=8, **kwargs)
    table = result.table
    flux, det = np.asarray(table["flux"], float), np.asarray(table["detected"], bool)
    assert len(table) == 160
    assert np.sum(flux > 500) >= 60  # the later passes went where the curve rises
    assert _bracketed(flux, det, result.flux_50, 0.5)
    assert _bracketed(flux, det, result.flux_90, 0.9)
    assert 30 < result.flux_50 < result.flux_90
    line = (result.directory / "summary.txt").read_text()
    assert f"50% completeness at {result.flux_50:.4g} ADU" in line
    png = result.plot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    # the first pass alone (the requested range) cannot measure either point
    first = sim_fakes(quiet_target.path, iterations=4, adapt=False, **kwargs)
    assert np.isnan(first.flux_50) and np.isnan(first.flux_90)
    assert np.all(np.asarray(first.table["flux"]) <= 500)


@pytest.mark.slow
def test_fakes_on_a_simulated_target(sim_target_done):
    from astropy.table import Table

    source = sim_target_done.path
    before = sorted(p.name for p in (source / "residuals").iterdir())
    result = sim_fakes(
        source, n_fakes=20, iterations=8, f_min=100, f_max=6000, flux_scale="log", jobs=2
    )
    sim = result.directory.parent
    assert sim.parent.name == "simulations" and sim.name == f"{source.name}_fakes"
    assert sorted(p.name for p in (source / "residuals").iterdir()) == before  # untouched
    table = Table.read(result.directory / "fakes.ecsv")
    assert len(table) == 160
    assert set(table.colnames) >= {"iteration", "image", "x", "y", "flux", "detected", "flux_out"}
    flux = np.asarray(table["flux"])
    det = np.asarray(table["detected"])
    bright = flux > 3 * result.flux_5sigma
    faint = flux < 0.4 * result.flux_5sigma
    assert bright.sum() > 10 and faint.sum() > 10
    assert det[bright].mean() >= 0.85
    assert det[faint].mean() <= 0.1
    # the figure: 90 % completeness reached within a factor 2 of 5 sigma in the PSF
    # aperture: at least 90 % found from 2x that flux (to 4x), and not below half of it
    near = (flux >= 2 * result.flux_5sigma) & (flux <= 4 * result.flux_5sigma)
    below = flux < 0.5 * result.flux_5sigma
    assert near.sum() >= 15 and det[near].mean() >= 0.9
    assert det[below].mean() < 0.9
    assert result.flux_50 < result.flux_90
    # both points measured between bins of fakes, not extrapolated
    assert _bracketed(flux, det, result.flux_50, 0.5)
    assert _bracketed(flux, det, result.flux_90, 0.9)
    # detected fakes are measured at their flux (within the noise)
    ok = det & bright
    ratio = np.asarray(table["flux_out"])[ok] / flux[ok]
    assert np.median(ratio) == pytest.approx(1.0, abs=0.08)
    png = result.plot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "90%" in (result.directory / "summary.txt").read_text()
    # a second run resumes: nothing is redone
    stamps = {p: p.stat().st_mtime_ns for p in (result.directory / "iterations").iterdir()}
    again = sim_fakes(
        source, n_fakes=20, iterations=8, f_min=100, f_max=6000, flux_scale="log", jobs=2
    )
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert again.flux_90 == result.flux_90
