"""Tests of the ``wing`` filter and of the detection threshold taken from a residual's own
null (oasis_core.engine.sources: :func:`mismatch_map`, :func:`add_null_columns`,
:func:`null_peak_density`, :func:`peak_count_threshold`, :func:`detection_threshold`).

The scene: a template of 36 stars (peaks 60 to 3000 times the residual's noise) and a
residual that holds, around each star, what imperfect PSF matching leaves: a lumpy ring
10 px out and a small offset-like core, both proportional to the star's peak. On it: a
lump of one star's ring (a false detection the wing test must reject), a star that
brightened by 30 % (microlensing: kept) and one that brightened by 1 % (no more than the
core mismatch of stars like it: wing), a transient far from stars and one on a galaxy (kept).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from astropy.table import Table

from oasis_core.engine.config import ExtractSettings
from oasis_core.engine.sources import (
    NULL_LEVELS,
    add_lobe_columns,
    add_null_columns,
    detection_threshold,
    filter_detections,
    filter_options,
    matched_significance,
    mismatch_map,
    null_peak_density,
    peak_count_threshold,
)

DEFAULTS = filter_options(ExtractSettings())
SHAPE = (256, 256)
NOISE = 10.0
T_SIGMA = 1.2  # template PSF
R_SIGMA = 1.7  # residual (science) PSF
FWHM = 2.3548 * R_SIGMA
GRID = [28 + 40 * i for i in range(6)]
RING_RADIUS, RING_WIDTH, RING_FRACTION = 10.0, 1.5, 1.5e-3
CORE_FRACTION = 0.01


def _gauss(x, y, sigma, peak=1.0):
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]]
    return peak * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2))


def _star_stamp(x, y, half=25):
    """The slices of a stamp around integer (x, y) and its offsets, r and theta."""
    sl = (slice(int(y) - half, int(y) + half + 1), slice(int(x) - half, int(x) + half + 1))
    dy, dx = np.mgrid[-half : half + 1, -half : half + 1].astype(float)
    return sl, dx, dy, np.hypot(dx, dy), np.arctan2(dy, dx)


def _scene(seed=0, brighten=()):
    """(template, residual, noise, stars): ``brighten`` is ``(star index, fraction)``."""
    rng = np.random.default_rng(seed)
    xs, ys = np.meshgrid(GRID, GRID)
    xs, ys = xs.ravel().astype(float), ys.ravel().astype(float)
    peaks = np.geomspace(60 * NOISE, 3000 * NOISE, xs.size)[rng.permutation(xs.size)]
    template = np.full(SHAPE, 100.0) + rng.normal(0, 2.0, SHAPE)
    residual = rng.normal(0, NOISE, SHAPE)
    flux_ratio = (T_SIGMA / R_SIGMA) ** 2  # a star's peak in the science PSF per template peak
    extra = dict(brighten)
    for i, (x, y, p) in enumerate(zip(xs, ys, peaks, strict=True)):
        sl, dx, _, r, theta = _star_stamp(x, y)
        template[sl] += p * np.exp(-(r**2) / (2 * T_SIGMA**2))
        ring = np.exp(-((r - RING_RADIUS) ** 2) / (2 * RING_WIDTH**2))
        residual[sl] += RING_FRACTION * p * ring * (1 + np.cos(12 * theta)) / 2
        psf = np.exp(-(r**2) / (2 * R_SIGMA**2))
        residual[sl] += CORE_FRACTION * p * psf * dx / R_SIGMA  # an offset-like core
        residual[sl] += extra.get(i, 0.0) * p * flux_ratio * psf
    galaxy = (60.0, 180.0)  # between the stars' rows and columns: 20 px from four stars
    template += _gauss(*galaxy, 6.0, 40 * NOISE)
    noise = np.full(SHAPE, NOISE)
    return template, residual, noise, {"x": xs, "y": ys, "peak": peaks, "galaxy": galaxy}


def _table(positions):
    return Table(
        {
            "x": [p[0] for p in positions],
            "y": [p[1] for p in positions],
            "sign": [1] * len(positions),
        }
    )


def _judge(template, residual, noise, positions, **overrides):
    table = _table(positions)
    norm = (residual / noise).astype(np.float32)
    weight = np.ones(SHAPE, np.float32)
    add_lobe_columns(table, norm, radius=1.5 * FWHM, weight=weight, smooth=R_SIGMA)
    add_null_columns(table, norm, fwhm=FWHM, weight=weight, noise=noise, template=template)
    options = {**DEFAULTS, "extent_max": 0.0, **overrides}  # the wing test alone
    return filter_detections(table, catalogs=[], n_residuals=1, **options)


def _star_near(stars, peak):
    return int(np.argmin(np.abs(np.log(stars["peak"] / peak))))


def test_wing_rejects_a_ring_lump_and_keeps_real_sources():
    template, residual, noise, stars = _scene()
    ring_star = _star_near(stars, 1000 * NOISE)
    lump = (stars["x"][ring_star] + RING_RADIUS, stars["y"][ring_star])  # cos(12 theta) = 1
    transient = (GRID[2] + 20.0, GRID[3] + 20.0)  # 28 px from the nearest star
    gx, gy = stars["galaxy"]
    residual = residual + _gauss(*transient, R_SIGMA, 9 * NOISE)
    residual = residual + _gauss(gx + 1, gy, R_SIGMA, 9 * NOISE)
    out = _judge(template, residual, noise, [lump, transient, (gx + 1, gy)])
    assert out["peak_norm"][0] > DEFAULTS["snr_min"], "the ring lump must pass the noise test"
    assert out["wing"][0] > 1.0
    assert list(out["reason"]) == ["wing", "kept", "kept"]
    assert out["wing"][1] == 0.0 and out["wing"][2] < 0.3
    assert out.meta["wing_stars"] == 37  # and the galaxy


def test_a_star_brightening_by_tens_of_percent_is_kept_and_by_the_mismatch_is_not():
    template, residual, noise, stars = _scene()
    big = _star_near(stars, 800 * NOISE)
    small = _star_near(stars, 2000 * NOISE)
    template, residual, noise, stars = _scene(brighten=[(big, 0.3), (small, 0.01)])
    positions = [(stars["x"][i], stars["y"][i]) for i in (big, small)]
    out = _judge(template, residual, noise, positions)
    assert out["peak_norm"][1] > DEFAULTS["snr_min"], "the 1 % brightening passes the noise test"
    assert list(out["reason"]) == ["kept", "wing"]
    # off: no template, no wing column worth a verdict
    table = _table(positions)
    add_lobe_columns(table, (residual / noise).astype(np.float32), radius=6, smooth=R_SIGMA)
    add_null_columns(table, (residual / noise).astype(np.float32), fwhm=FWHM)
    assert list(table["wing"]) == [0.0, 0.0]


def test_mismatch_map_follows_the_ring_and_ignores_one_variable_star():
    template, residual, noise, stars = _scene()
    norm = (residual / noise).astype(np.float32)
    sig, _ = matched_significance(norm, None, R_SIGMA)
    wing, info = mismatch_map(sig, template, noise, np.ones(SHAPE), fwhm=FWHM)
    i = _star_near(stars, 3000 * NOISE)
    x, y = int(stars["x"][i]), int(stars["y"][i])
    assert info["wing_stars"] == 37
    # the star's own excess spread in its ring (r in [10, 12): a bin of FWHM / 2)
    sl, _, _, r, _ = _star_stamp(x, y)
    ring = (r >= 10) & (r < 12)
    own = math.sqrt(np.mean(sig[sl][ring] ** 2) - 1)
    assert own > 5
    # a trimmed estimate (robust to compact sources in the annulus): up to 1.5 x for a ring
    assert 0.8 * own < wing[y, x + 10] < 1.6 * own
    assert wing[y, x + 20] < 0.1 * wing[y, x + 10]  # beyond the ring: little
    # a star that brightened a lot (a variable) does not raise the others' mismatch
    _, residual_v, _, _ = _scene(brighten=[(_star_near(stars, 1000 * NOISE), 1.0)])
    sig_v, _ = matched_significance((residual_v / noise).astype(np.float32), None, R_SIGMA)
    wing_v, _ = mismatch_map(sig_v, template, noise, np.ones(SHAPE), fwhm=FWHM)
    assert wing_v[y, x + 10] == pytest.approx(wing[y, x + 10], rel=0.3)


def test_mismatch_map_needs_calibration_stars():
    rng = np.random.default_rng(1)
    sig = rng.normal(size=SHAPE).astype(np.float32)
    template = np.full(SHAPE, 100.0) + _gauss(100, 100, T_SIGMA, 1e4)  # one star only
    wing, info = mismatch_map(sig, template, np.full(SHAPE, NOISE), np.ones(SHAPE), fwhm=FWHM)
    assert info["wing_stars"] == 1
    assert not wing.any()


def _correlated(rng, shape, s1):
    from scipy.ndimage import gaussian_filter

    c = gaussian_filter(rng.normal(size=shape), s1)
    return (c / c.std()).astype(np.float32)


@pytest.mark.parametrize(("s1", "smooth"), [(0.7, 1.5), (1.5, 2.0)])
def test_threshold_from_the_null_gives_the_configured_rate_on_correlated_noise(s1, smooth):
    rng = np.random.default_rng(int(10 * s1))
    norm = _correlated(rng, (2048, 2048), s1)
    sig, _ = matched_significance(norm, None, smooth)
    density, n_peaks, area = null_peak_density(sig, np.ones(sig.shape, bool))
    assert n_peaks > 500 and area == pytest.approx(2048**2 / 1e6)
    rate = 20.0  # per Mpix: plenty of peaks to count above the threshold
    u = peak_count_threshold(density, rate)
    assert 3.5 < u < 5.0
    from scipy.ndimage import maximum_filter

    found = int(((sig == maximum_filter(sig, size=3)) & (sig > u)).sum())  # positive side
    assert rate * area / 2 <= found <= 2 * rate * area, (u, found)


def test_detection_threshold_has_snr_min_as_its_floor():
    meta = {"null_density": 5000.0}
    u = peak_count_threshold(5000.0, 0.45)
    assert u == pytest.approx(4.65, abs=0.01)
    assert detection_threshold(meta, snr_min=6.0, false_per_mpix=0.45) == (6.0, u)
    assert detection_threshold(meta, snr_min=3.0, false_per_mpix=0.45) == (u, u)
    assert detection_threshold(meta, snr_min=3.0, false_per_mpix=0.0)[0] == 3.0
    assert detection_threshold({}, snr_min=3.0, false_per_mpix=0.45)[0] == 3.0
    # a higher rate lowers the threshold, never below the counting range
    assert peak_count_threshold(5000.0, 5.0) < u
    assert peak_count_threshold(5000.0, 1e6) == NULL_LEVELS[0]
    assert math.isnan(peak_count_threshold(float("nan"), 0.45))


def test_filter_uses_the_threshold_of_the_residuals_null():
    table = Table(
        {
            "x": [10.0, 30.0],
            "y": [10.0, 10.0],
            "sign": [1, 1],
            "peak_norm": [5.0, 4.0],
            "lobe_min": [-1.0, -1.0],
        }
    )
    table.meta["null_density"] = 5000.0  # gives 4.65 at 0.45 per Mpix
    out = filter_detections(table, catalogs=[], n_residuals=1, **{**DEFAULTS, "snr_min": 3.0})
    assert list(out["reason"]) == ["kept", "faint"]
    assert out["threshold"][0] == pytest.approx(4.65, abs=0.01)
    # wing: significant against the noise, not against noise and mismatch
    table = Table(
        {
            "x": [10.0, 30.0],
            "y": [10.0, 10.0],
            "sign": [1, 1],
            "peak_norm": [7.0, 7.0],
            "lobe_min": [-1.0, -1.0],
            "wing": [0.5, 1.0],
        }
    )
    out = filter_detections(table, catalogs=[], n_residuals=1, **DEFAULTS)
    # wing_sigma 4: sqrt(6^2 + 2^2) = 6.32 <= 7 < sqrt(6^2 + 4^2) = 7.21
    assert list(out["reason"]) == ["kept", "wing"]


def test_wing_sigma_zero_turns_the_wing_test_off():
    table = Table(
        {
            "x": [10.0],
            "y": [10.0],
            "sign": [1],
            "peak_norm": [7.0],
            "lobe_min": [-1.0],
            "wing": [5.0],
        }
    )
    out = filter_detections(table, catalogs=[], n_residuals=1, **{**DEFAULTS, "wing_sigma": 0.0})
    assert list(out["reason"]) == ["kept"]


def test_the_mismatch_is_calibrated_on_stars_of_every_brightness():
    # a median template leaves faint stars relatively more than bright ones (a null
    # night: -1 % at 300-3,000 ADU, +3 % above 30,000): the brightest 64 alone told
    # nothing of the faint stars the master residual then kept as sources (seed 3 of
    # benchmarks/null_series.py: 37, now 2)
    from oasis_core.engine.sources import WING_GROUP, WING_STARS, _calibration_stars

    peaks = np.geomspace(1e5, 10.0, 400)  # brightest first, as mismatch_map sorts them
    xs = np.tile(np.arange(20, 380, 18), 20)[:400]
    ys = np.repeat(np.arange(20, 380, 18), 20)[:400]
    good = np.ones((400, 400), bool)
    core = np.ones((5, 5), bool)
    chosen = _calibration_stars(peaks, xs, ys, good, 2, core, 30.0)
    assert len(chosen) == WING_STARS and (np.diff(chosen) > 0).all()  # brightest first
    faintest_bin = 30.0 * (1e5 / 30.0) ** (1 / 8)  # 83: the brightest 64 stop at 23,000
    assert peaks[chosen].max() == peaks[0] and peaks[chosen].min() < faintest_bin
    # every bin of log brightness gives its group
    bins = np.digitize(np.log(peaks[chosen]), np.linspace(np.log(30), np.log(1e5), 9)[1:-1])
    assert (np.bincount(bins, minlength=8) == WING_GROUP).all()
    # a star whose core is masked is not a calibration star
    good[ys[0] - 1 : ys[0] + 2, xs[0] - 1 : xs[0] + 2] = False
    assert 0 not in _calibration_stars(peaks, xs, ys, good, 2, core, 30.0)
