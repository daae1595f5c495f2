"""Tests of oasis_core.engine.sources: the core's source filters and the columns they read.

Every verdict of :func:`filter_detections` is triggered by a constructed detection and
left alone by a near miss on the other side of its threshold (docs/outputs.md, "Source
filtering: the reason column"). The ``majority_residuals`` fixture makes the majority
filter fire through the real detection path (native extract backend + ``pipeline.detect``): a badly
subtracted star left on every residual of a series, next to one real transient.
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path

import numpy as np
import pytest
from astropy.table import Table

from oasis_core.engine.config import ExtractSettings
from oasis_core.engine.sources import (
    FILTER_KEYS,
    SPREAD_TOLERANCE,
    add_lobe_columns,
    count_matches,
    filter_detections,
    filter_options,
    match_catalogs,
    matched_significance,
)

#: The defaults of ``[extract]``: majority 0.5, match_radius 1.5, dipole_ratio 0.5,
#: dipole_min 3, masked_max 0.05, snr_min 6, sharp_max 2.5, extent_max 1.1.
DEFAULTS = filter_options(ExtractSettings())

#: A PSF of sigma 1 px: its peak pixel holds 1 / (2 pi) of the flux.
FWHM_SIGMA1 = 2.0 * math.sqrt(2.0 * math.log(2.0))


def detections(n: int = 1, **columns: object) -> Table:
    """``n`` clean positive point-source detections at (10 + 20 i, 10); ``columns``
    override (scalars broadcast). Float64 columns, so thresholds compare exactly."""
    base: dict[str, object] = {
        "x": 10.0 + 20.0 * np.arange(n),
        "y": np.full(n, 10.0),
        "sign": np.ones(n, int),
        "peak_norm": np.full(n, 20.0),
        "lobe_min": np.full(n, -1.0),
        "masked_frac": np.zeros(n),
        "extent": np.full(n, 0.85),
        "peak": np.full(n, 0.1),  # peak / flux = 0.1 < 2.5 / (2 pi)
        "flux": np.ones(n),
        "fwhm": np.full(n, FWHM_SIGMA1),
        "spread_model": np.full(n, 0.01),
    }
    for key, value in columns.items():
        if value is None:
            del base[key]
        else:
            base[key] = np.broadcast_to(np.asarray(value), (n,)).copy()
    return Table(base)


def verdicts(table: Table, *, catalogs=(), n_residuals: int = 1, **overrides) -> list[str]:
    options = {**DEFAULTS, **overrides}
    out = filter_detections(table, catalogs=list(catalogs), n_residuals=n_residuals, **options)
    return list(out["reason"])


# ------------------------------------------------------------------ the verdicts


def test_a_clean_point_source_is_kept():
    table = detections(3)
    assert verdicts(table) == ["kept"] * 3
    np.testing.assert_array_equal(table["n_frames"], [0, 0, 0])


def test_filter_options_are_exactly_the_keyword_options_of_filter_detections():
    params = inspect.signature(filter_detections).parameters
    keyword = {n for n, p in params.items() if p.kind is p.KEYWORD_ONLY}
    assert set(FILTER_KEYS) == keyword - {"catalogs", "n_residuals"}
    settings = ExtractSettings(majority=0.25, snr_min=4.5, keep_negative=True)
    options = filter_options(settings)
    assert set(options) == set(FILTER_KEYS)
    assert (options["majority"], options["snr_min"], options["keep_negative"]) == (
        0.25,
        4.5,
        True,
    )
    assert options["match_radius"] == settings.match_radius


@pytest.mark.parametrize(
    ("peak", "lobe", "expected"),
    [
        (20.0, -10.5, "dipole"),  # beyond half the peak and 3 sigmas deep
        (20.0, -9.9, "kept"),  # 3 sigmas deep but short of half the peak
        (5.0, -3.5, "dipole"),  # a faint peak: the lobe must still be 3 sigmas deep...
        (5.0, -2.9, "kept"),  # ...beyond half the peak but short of 3 sigmas: not one
    ],
)
def test_dipole_needs_a_lobe_beyond_the_ratio_and_below_the_depth(peak, lobe, expected):
    table = detections(peak_norm=peak, lobe_min=lobe)
    assert verdicts(table, snr_min=0.0) == [expected]


def test_dipole_ratio_applies_to_the_positive_part_of_the_peak():
    # a non-positive peak (a detection whose oriented peak is negative) counts as 0:
    # any lobe deeper than dipole_min makes it a dipole
    assert verdicts(detections(peak_norm=-1.0, lobe_min=-0.1), snr_min=-5, dipole_min=0.0) == [
        "dipole"
    ]
    assert verdicts(detections(peak_norm=0.5, lobe_min=-0.3), snr_min=0, dipole_min=0.0) == [
        "dipole"
    ]
    assert verdicts(detections(peak_norm=0.5, lobe_min=-0.2), snr_min=0, dipole_min=0.0) == ["kept"]


def test_majority_counts_the_residuals_with_a_match_within_the_radius():
    def catalog(*xy):
        return Table({"x": [p[0] for p in xy], "y": [p[1] for p in xy]})

    table = detections(2)  # at (10, 10) and (30, 10)
    near, far = (10.0 + 1.4, 10.0), (30.0, 10.0 + 1.6)
    # the first source is in 3 of 4 residuals (more than half): a variable or a bad star
    cats = [catalog(near), catalog((10.0, 10.0)), catalog((9.0, 10.5), far), catalog(far)]
    assert verdicts(table, catalogs=cats, n_residuals=4) == ["majority", "kept"]
    np.testing.assert_array_equal(table["n_frames"], [3, 0])
    assert table["n_frames"].dtype.kind == "i"
    # in exactly half of them: not more than the majority fraction
    assert verdicts(detections(2), catalogs=cats[:2] + cats[3:], n_residuals=4) == [
        "kept",
        "kept",
    ]
    # the fraction is a setting
    assert verdicts(detections(2), catalogs=cats[:2], n_residuals=4, majority=0.4) == [
        "majority",
        "kept",
    ]


def test_majority_needs_three_residuals():
    cats = [Table({"x": [10.0], "y": [10.0]})] * 3
    # two of two frames: a majority of one or two frames means nothing
    assert verdicts(detections(), catalogs=cats[:2], n_residuals=2) == ["kept"]
    # two of three
    assert verdicts(detections(), catalogs=cats[:2], n_residuals=3) == ["majority"]


def test_negative_sources_are_rejected_unless_kept():
    table = detections(2, sign=[-1, 1])
    assert verdicts(table) == ["negative", "kept"]
    assert verdicts(detections(2, sign=[-1, 1]), keep_negative=True) == ["kept", "kept"]
    # without a sign column every detection is positive
    assert verdicts(detections(2, sign=None)) == ["kept", "kept"]


@pytest.mark.parametrize(("frac", "expected"), [(0.06, "masked"), (0.05, "kept"), (0.0, "kept")])
def test_masked_fraction_above_the_maximum_is_rejected(frac, expected):
    assert verdicts(detections(masked_frac=frac)) == [expected]


def test_masked_is_off_without_the_column():
    assert verdicts(detections(masked_frac=None), masked_max=-1.0) == ["kept"]
    assert verdicts(detections(masked_frac=0.0), masked_max=-1.0) == ["masked"]


@pytest.mark.parametrize(("snr", "expected"), [(5.9, "faint"), (6.0, "kept"), (6.1, "kept")])
def test_faint_below_the_matched_filter_significance(snr, expected):
    assert verdicts(detections(peak_norm=snr)) == [expected]


def test_sharp_peak_fraction_against_the_psfs():
    # sigma 1 px: the PSF's peak pixel holds 1 / (2 pi) = 0.159 of the flux; sharp_max 2.5
    limit = 2.5 / (2.0 * math.pi)
    assert verdicts(detections(peak=1.01 * limit)) == ["sharp"]
    assert verdicts(detections(peak=0.99 * limit)) == ["kept"]
    # a broader PSF puts less in its peak: the same peak fraction is sharp for it
    assert verdicts(detections(peak=0.99 * limit, fwhm=1.1 * FWHM_SIGMA1)) == ["sharp"]
    assert verdicts(detections(peak=0.99 * limit, flux=1.03)) == ["kept"]
    # off with sharp_max = 0, without one of the columns, or with no flux to compare
    assert verdicts(detections(peak=1.0), sharp_max=0.0) == ["kept"]
    for column in ("peak", "flux", "fwhm"):
        columns = {"peak": 1.0, column: None}
        assert verdicts(detections(**columns)) == ["kept"], column
    assert verdicts(detections(peak=1.0, flux=0.0)) == ["kept"]
    assert verdicts(detections(peak=1.0, flux=np.nan)) == ["kept"]
    # any positive sharp_max is a threshold, below 1 too; exactly at it is not more than it
    assert verdicts(detections(peak=0.9 / (2.0 * math.pi)), sharp_max=0.8) == ["sharp"]
    at_limit = 2.5 * (1.0 / (2.0 * np.pi * (FWHM_SIGMA1 / 2.3548) ** 2))
    assert verdicts(detections(peak=at_limit)) == ["kept"]


@pytest.mark.parametrize(
    ("extent", "expected"), [(1.12, "extended"), (1.1, "kept"), (0.8, "kept"), (np.nan, "kept")]
)
def test_extended_above_the_maximum_extent(extent, expected):
    assert verdicts(detections(extent=extent)) == [expected]


def test_extended_is_off_with_extent_max_zero_or_no_column():
    assert verdicts(detections(extent=1.5), extent_max=0.0) == ["kept"]
    assert verdicts(detections(extent=None), extent_max=0.5) == ["kept"]
    assert verdicts(detections(extent=0.95), extent_max=0.9) == ["extended"]


@pytest.mark.parametrize(
    ("spread", "err", "expected"),
    [
        (-0.0031, None, "point"),  # sharper than the PSF (a cosmic ray) by the margin
        (-0.0029, None, "kept"),  # within DES's stellar margin
        (0.1031, None, "point"),  # extended
        (0.1029, None, "kept"),
        (0.05, None, "kept"),
        (np.nan, None, "kept"),  # not measured
        (-0.02, 0.01, "kept"),  # the margin grows by twice the error
        (-0.024, 0.01, "point"),
        (0.12, 0.01, "kept"),
        (0.124, 0.01, "point"),
        (-0.0031, np.nan, "point"),  # an unknown error adds nothing
        (-0.0031, -0.5, "point"),  # nor a negative one
        (-1.9, np.inf, "kept"),  # an infinite error is capped at 1: margin 2.003
        (-2.01, np.inf, "point"),
        (-2.01, 50.0, "point"),
        (0.05, -0.5, "kept"),  # a negative error does not shrink the margin
        (-SPREAD_TOLERANCE, 0.0, "kept"),  # exactly at the margin: not beyond it
        (0.1 + SPREAD_TOLERANCE, 0.0, "kept"),
    ],
)
def test_point_source_test_on_spread_model(spread, err, expected):
    columns: dict[str, object] = {"spread_model": spread}
    if err is not None:
        columns["spread_model_err"] = err
    assert verdicts(detections(**columns)) == [expected]
    assert SPREAD_TOLERANCE == 0.003


def test_point_is_off_without_spread_model():
    assert verdicts(detections(spread_model=None)) == ["kept"]


def test_verdict_precedence():
    # a detection failing every test gets the most fundamental verdict; removing the
    # causes one by one walks down the list
    worst = {
        "sign": -1,
        "lobe_min": -50.0,
        "masked_frac": 0.5,
        "extent": 2.0,
        "peak": 1.0,
        "peak_norm": 5.0,
        "spread_model": 0.5,
    }
    cats = [Table({"x": [10.0], "y": [10.0]})] * 3
    order = [
        ("sign", 1, "negative"),
        ("lobe_min", -1.0, "dipole"),
        (None, None, "majority"),
        ("masked_frac", 0.0, "masked"),
        ("extent", 0.85, "extended"),
        ("peak", 0.1, "sharp"),
        ("peak_norm", 20.0, "faint"),
        ("spread_model", 0.01, "point"),
    ]
    for key, value, expected in order:
        if key is None:
            assert verdicts(detections(**worst), catalogs=[]) == ["masked"]
        got = verdicts(detections(**worst), catalogs=cats, n_residuals=3)
        assert got == [expected], (key, got)
        if key is not None:
            worst[key] = value
        else:
            cats = []
    assert verdicts(detections(**worst)) == ["kept"]


def test_empty_table_gets_the_columns():
    table = detections(0)
    out = filter_detections(table, catalogs=[detections(2)], n_residuals=5, **DEFAULTS)
    assert len(out) == 0
    assert {"n_frames", "reason"} <= set(out.colnames)
    assert (len(out["n_frames"]), out["n_frames"].dtype.kind) == (0, "i")


def test_filter_returns_its_table_with_the_columns():
    table = detections(2)
    out = filter_detections(table, catalogs=[], n_residuals=3, **DEFAULTS)
    assert out is table
    assert out["reason"].dtype.kind == "U"


def test_filter_defaults_filter_nothing_optional():
    # only the first four settings are required: the optional tests are off by default
    # (dipole_min 0: the lobe alone must stay within half the peak)
    table = detections(peak_norm=0.5, lobe_min=-0.2, masked_frac=0.9, extent=3.0, peak=1.0)
    out = filter_detections(
        table, catalogs=[], n_residuals=1, majority=0.5, match_radius=1.5, dipole_ratio=0.5,
        keep_negative=False,
    )  # fmt: skip
    assert list(out["reason"]) == ["kept"]
    table = detections(peak_norm=0.5, lobe_min=-0.3)
    out = filter_detections(
        table, catalogs=[], n_residuals=1, majority=0.5, match_radius=1.5, dipole_ratio=0.5,
        keep_negative=False,
    )  # fmt: skip
    assert list(out["reason"]) == ["dipole"]  # beyond half the peak, and no depth asked


# ------------------------------------------------------------- catalog matching


def test_match_catalogs_gives_the_nearest_within_the_radius():
    a = Table({"x": [0.0, 10.0, 20.0, 40.0], "y": [0.0, 0.0, 0.0, 0.0]})
    b = Table({"x": [10.5, 9.0, 19.0, 0.0], "y": [0.0, 0.0, 1.0, 30.0]})
    idx = match_catalogs(a, b, 1.5)
    np.testing.assert_array_equal(idx, [-1, 0, 2, -1])  # 10.5 is nearer than 9.0
    assert idx.dtype.kind == "i"
    np.testing.assert_array_equal(match_catalogs(a, b, 0.4), [-1, -1, -1, -1])
    np.testing.assert_array_equal(match_catalogs(a, b[:0], 5.0), [-1] * 4)
    assert match_catalogs(a[:0], b, 5.0).shape == (0,)


def test_count_matches_counts_catalogs_not_sources():
    points = Table({"x": [0.0, 50.0], "y": [0.0, 0.0]})
    cats = [
        Table({"x": [0.5, 0.0], "y": [0.0, 0.6]}),  # two sources near the first point
        Table({"x": [0.0], "y": [1.0]}),
        Table({"x": [90.0], "y": [0.0]}),
    ]
    np.testing.assert_array_equal(count_matches(points, cats, 1.5), [2, 0])
    assert count_matches(points, cats, 1.5).dtype.kind == "i"
    np.testing.assert_array_equal(count_matches(points, [], 1.5), [0, 0])


# -------------------------------------------------- the columns the filters read


def test_lobe_columns_by_hand():
    norm = np.zeros((7, 9), np.float32)
    norm[3, 2] = 8.0  # a positive source with a negative lobe beside it
    norm[3, 3] = -5.0
    norm[3, 6] = -9.0  # a negative source
    norm[2, 6] = 4.0
    weight = np.ones(norm.shape)
    weight[3, 7] = 0.0  # one masked pixel beside the negative source
    table = Table({"x": [2.0, 6.0, 8.4], "y": [3.0, 3.0, 0.0], "sign": [1, -1, 1]})
    add_lobe_columns(table, norm, radius=1.0, weight=weight)
    # radius 1: the pixel and its 4 neighbours
    np.testing.assert_array_equal(table["peak_norm"], [8.0, 9.0, 0.0])
    np.testing.assert_array_equal(table["lobe_min"], [-5.0, -4.0, 0.0])
    # the masked pixel is 1 of 5; beyond the edge counts as masked (corner: 2 of 5)
    np.testing.assert_allclose(table["masked_frac"], [0.0, 0.2, 0.4])
    assert "extent" not in table.colnames
    for col in ("peak_norm", "lobe_min", "masked_frac"):
        assert table[col].dtype == np.float32


def test_lobe_columns_without_weight_or_sign_and_radius_reach():
    norm = np.zeros((9, 9), np.float32)
    norm[4, 4] = 3.0
    norm[4, 6] = -6.0  # two pixels away
    norm[6, 6] = 7.0  # 2.83 pixels away
    table = Table({"x": [4.0], "y": [4.0]})
    add_lobe_columns(table, norm, radius=2.0)
    assert (table["peak_norm"][0], table["lobe_min"][0], table["masked_frac"][0]) == (3, -6, 0)
    add_lobe_columns(table, norm, radius=2.9)
    assert (table["peak_norm"][0], table["lobe_min"][0]) == (7.0, -6.0)
    add_lobe_columns(table, norm, radius=1.9)
    assert (table["peak_norm"][0], table["lobe_min"][0]) == (3.0, 0.0)


def test_lobe_columns_of_an_empty_table():
    table = add_lobe_columns(Table({"x": [], "y": []}), np.zeros((8, 8)), radius=2.0, smooth=1.0)
    assert len(table) == 0
    for col in ("peak_norm", "lobe_min", "masked_frac", "extent"):
        assert (len(table[col]), table[col].dtype) == (0, np.float32), col
    assert "noise_correlation" not in table.meta


def test_lobe_columns_at_and_beyond_every_edge():
    # a source off the frame is measured at the nearest edge pixel; beyond the edge
    # counts as no signal (0) and as masked
    ny, nx = 7, 9
    norm = np.zeros((ny, nx), np.float32)
    corners = {(0, 0): 1.0, (0, nx - 1): 2.0, (ny - 1, 0): 3.0, (ny - 1, nx - 1): 4.0}
    for (y, x), v in corners.items():
        norm[y, x] = v
    xs = [0.0, nx - 1.0, 0.0, nx - 1.0, -5.0, nx + 4.0, -3.0, nx + 2.0]
    ys = [0.0, 0.0, ny - 1.0, ny - 1.0, -4.0, -6.0, ny + 3.0, ny + 5.0]
    table = Table({"x": xs, "y": ys})
    add_lobe_columns(table, norm, radius=1.0, weight=np.ones((ny, nx)))
    np.testing.assert_array_equal(table["peak_norm"], [1, 2, 3, 4, 1, 2, 3, 4])
    np.testing.assert_array_equal(table["lobe_min"], 0.0)
    # radius 1: 5 pixels, of which 2 beyond the edges at a corner
    np.testing.assert_allclose(table["masked_frac"], 0.4)


def gaussian_source(shape, x, y, flux, sigma):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return flux * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2)) / (2 * np.pi * sigma**2)


def test_matched_significance_of_a_point_source_is_its_optimal_snr():
    # in unit white noise the optimal (PSF-weighted) S/N of a Gaussian source of width s
    # and flux F is F / (2 sqrt(pi) s)
    for s in (1.5, 2.5):
        img = gaussian_source((64, 64), 32, 32, 300.0, s)
        smoothed, factor = matched_significance(img, None, s)
        assert factor == 1.0
        assert smoothed[32, 32] == pytest.approx(300.0 / (2 * math.sqrt(math.pi) * s), rel=2e-3)
        assert smoothed.dtype == np.float32


def test_matched_significance_of_white_noise_has_unit_spread():
    rng = np.random.default_rng(3)
    noise = rng.normal(size=(256, 256))
    smoothed, factor = matched_significance(noise, None, 1.5)
    centre = smoothed[16:-16, 16:-16]
    # about 64 000 / (4 pi 1.5^2) = 2300 independent values: the std to ~1.5 %
    assert np.std(centre) == pytest.approx(1.0, abs=0.06)
    assert factor == pytest.approx(1.0, abs=0.06)


def correlated_noise(rng, shape, s1):
    """Unit-variance noise correlated by a Gaussian of s1 px (a convolved science)."""
    from scipy.ndimage import gaussian_filter

    c = gaussian_filter(rng.normal(size=shape), s1)
    return c / c.std()


def test_matched_significance_rescales_correlated_noise():
    rng = np.random.default_rng(4)
    corr = correlated_noise(rng, (256, 256), 1.5)
    smoothed, factor = matched_significance(corr, None, 2.0)
    # continuous theory: the spread is sqrt(4 pi s1^2 s^2 / (s1^2 + s^2)) = 4.25
    assert factor == pytest.approx(math.sqrt(4 * math.pi * 2.25 * 4 / 6.25), rel=0.1)
    iqr = np.subtract(*np.percentile(smoothed[16:-16, 16:-16], [75, 25]))
    assert iqr / 1.349 == pytest.approx(1.0, abs=0.08)


def test_matched_significance_treats_beyond_the_edge_as_no_signal():
    # a source centred on the corner pixel: only the quarter inside the frame counts
    # (a little more: the row and column through its centre); a mirror would give ~all
    img = gaussian_source((64, 64), 0, 0, 300.0, 2.0)
    centre = gaussian_source((64, 64), 32, 32, 300.0, 2.0)
    at_corner = matched_significance(img, None, 2.0)[0][0, 0]
    full = matched_significance(centre, None, 2.0)[0][32, 32]
    assert 0.25 * full < at_corner < 0.5 * full


def test_matched_significance_needs_100_sampled_pixels():
    # a cutout: fewer than 400 of every other pixel away from bad ones, so every pixel is
    # sampled: 12 x 12 here, less the 1-px ring the dilation removes, leave exactly 10 x 10
    rng = np.random.default_rng(9)
    norm = correlated_noise(rng, (40, 40), 1.5)
    bad = np.ones((40, 40), bool)
    bad[14:26, 14:26] = False
    norm[bad] = 0.0
    _, factor = matched_significance(norm, bad, 0.4)
    assert factor > 1.3
    bad[20, 20] = True  # one sampled pixel fewer
    assert matched_significance(norm, bad, 0.4)[1] == 1.0


def test_matched_significance_rescales_any_spread_above_one():
    rng = np.random.default_rng(10)
    mild = correlated_noise(rng, (256, 256), 0.6)
    smoothed, factor = matched_significance(mild, None, 1.0)
    assert 1.05 < factor < 2.0
    raw = smoothed * factor
    iqr = np.subtract(*np.percentile(raw[::2, ::2], [75, 25]))
    # the IQR of every other pixel, the few values beyond 4 spreads left out
    assert factor == pytest.approx(iqr / 1.349, rel=1e-3)


def test_matched_significance_samples_away_from_bad_and_empty_pixels():
    rng = np.random.default_rng(5)
    corr = correlated_noise(rng, (128, 128), 1.5)
    _, reference = matched_significance(corr, None, 2.0)
    # zeros (no data, 3/4 of the frame) are left out of the spread estimate (with them
    # the IQR would be that of zeros: no rescaling); the smoothed data spill over the
    # edge of the block and lower it a little
    padded = np.zeros((256, 256))
    padded[64:192, 64:192] = corr
    _, factor = matched_significance(padded, None, 2.0)
    assert 0.6 * reference < factor < reference
    # a bad mask keeps the sample clear of the bad pixels and of the spill-over
    bad = padded == 0
    _, factor_bad = matched_significance(padded, bad, 2.0)
    assert factor_bad == pytest.approx(reference, rel=0.1)
    # a huge value under a bad pixel (not zeroed) does not enter the sample either
    spoiled = padded.copy()
    spoiled[bad] = 1e6
    _, factor_spoiled = matched_significance(spoiled, bad, 2.0)
    assert factor_spoiled == pytest.approx(reference, rel=0.1)
    # too few usable pixels (fewer than 100 in the subsample): no rescaling
    few = np.ones((256, 256), bool)
    few[100:112, 100:112] = False
    _, factor_few = matched_significance(padded, few, 2.0)
    assert factor_few == 1.0
    tiny = np.zeros((256, 256))
    tiny[100:115, 100:115] = corr[:15, :15]
    assert matched_significance(tiny, None, 2.0)[1] == 1.0


def test_extent_separates_point_sources_from_wider_ones():
    shape = (96, 96)
    s = 2.0
    table = Table({"x": [24.0, 72.0], "y": [48.0, 48.0], "sign": [1, -1]})
    img = gaussian_source(shape, 24, 48, 400.0, s) - gaussian_source(shape, 72, 48, 3000.0, 2 * s)
    add_lobe_columns(table, img, radius=3.0, smooth=s)
    # a point source through a filter twice as wide: 2 (2s) s^2 / (s^2 + 4 s^2) / s = 0.8
    assert table["extent"][0] == pytest.approx(0.8, abs=0.005)
    # a source twice the PSF: (2 s)(4 s^2 + s^2)... = 2 * 2 (5) / (8) / 2 = 1.25
    assert table["extent"][1] == pytest.approx(1.25, abs=0.005)
    assert table["peak_norm"][0] == pytest.approx(400.0 / (2 * math.sqrt(math.pi) * s), rel=2e-3)
    assert table["peak_norm"][1] > 0  # oriented by the sign
    assert verdicts(table) == ["kept", "negative"]
    assert verdicts(table, keep_negative=True) == ["kept", "extended"]
    assert table.meta["noise_correlation"] == 1.0


def test_extent_is_nan_without_a_positive_peak():
    norm = np.full((32, 32), -1.0)
    xs, ys = [16.0, 0.0, 31.0, 16.0, 31.0], [16.0, 0.0, 31.0, 31.0, 16.0]
    table = Table({"x": xs, "y": ys, "sign": [1] * 5})
    add_lobe_columns(table, norm, radius=2.0, smooth=1.0)
    # the smoothed map is negative all around: no peak to compare with
    assert np.isnan(table["extent"]).all()
    assert (table["peak_norm"] <= 0).all()
    # a zero peak beside a negative blob the wider filter reaches: still no ratio
    blob = np.zeros((32, 32))
    blob[16, 22] = -50.0
    table = add_lobe_columns(Table({"x": [16.0], "y": [16.0]}), blob, radius=2.0, smooth=1.0)
    assert table["peak_norm"][0] == 0.0
    assert np.isnan(table["extent"][0])


def test_lobe_columns_are_symmetric_under_flips():
    # a source at a corner, a lobe beside it, and the same image mirrored: mirrored positions
    # give the same columns, at every corner (the edges are treated alike)
    rng = np.random.default_rng(14)
    shape = (40, 48)
    # centred beyond the corner, so that its matched-filter peak is the corner pixel
    img = gaussian_source(shape, -1.5, -1, 600.0, 1.5) - gaussian_source(shape, 4, 1, 80.0, 1.5)
    img = img + 0.01 * rng.normal(size=shape)
    weight = np.ones(shape)
    weight[0, 3:7] = 0  # masked pixels within the radius
    img[weight == 0] = 0
    ref = None
    for fy in (False, True):
        for fx in (False, True):
            im, w = img, weight
            x, y = 0.3, 0.2
            if fy:
                im, w, y = im[::-1], w[::-1], shape[0] - 1 - y
            if fx:
                im, w, x = im[:, ::-1], w[:, ::-1], shape[1] - 1 - x
            t = add_lobe_columns(Table({"x": [x], "y": [y]}), im, radius=4.0, weight=w, smooth=1.5)
            row = [float(t[c][0]) for c in ("peak_norm", "lobe_min", "masked_frac", "extent")]
            if ref is None:
                ref = row
            np.testing.assert_allclose(row, ref, rtol=1e-5, err_msg=f"flip y {fy} x {fx}")


def test_extent_is_measured_at_the_peak_near_the_catalog_position():
    # the catalog position is 2 px off the source; the columns look within the radius
    shape = (64, 64)
    s = 1.5
    for dx, dy in ((2.0, 0.0), (0.0, -2.0), (-1.6, 1.4)):
        img = gaussian_source(shape, 32, 32, 300.0, s)
        table = add_lobe_columns(
            Table({"x": [32.0 + dx], "y": [32.0 + dy]}), img, radius=3.0, smooth=s
        )
        assert table["extent"][0] == pytest.approx(0.8, abs=0.005), (dx, dy)
        assert table["extent"].dtype == np.float32
    # a faint point source (peak below 1 sigma) has its extent too
    faint = gaussian_source(shape, 32, 32, 2.0, s)
    table = add_lobe_columns(Table({"x": [32.0], "y": [32.0]}), faint, radius=3.0, smooth=s)
    assert table["peak_norm"][0] < 1
    assert table["extent"][0] == pytest.approx(0.8, abs=0.005)


def test_lobe_columns_sample_the_noise_away_from_masked_pixels():
    # correlated noise with masked strips (zero under them, as Residual.normalized gives)
    rng = np.random.default_rng(8)
    shape = (128, 128)
    weight = np.full(shape, 0.5)  # any positive weight is a good pixel
    weight[:, 40:48] = 0.0
    weight[90:96, :] = 0.0
    norm = np.where(weight > 0, correlated_noise(rng, shape, 1.5), 0.0)
    table = add_lobe_columns(
        Table({"x": [64.0], "y": [20.0]}), norm, radius=3.0, weight=weight, smooth=2.0
    )
    smoothed, with_mask = matched_significance(norm, weight <= 0, 2.0)
    without = matched_significance(norm, None, 2.0)[1]
    assert table.meta["noise_correlation"] == round(with_mask, 4)
    assert abs(with_mask - without) > 1e-3  # the mask matters here
    # the wider filter's map is scaled by its own spread, sampled away from the mask too
    wide = matched_significance(norm, weight <= 0, 4.0)[0]
    py, px = np.unravel_index(
        np.argmax(np.where(_disc(shape, 64, 20, 3.0), smoothed, -np.inf)), shape
    )
    assert table["peak_norm"][0] == smoothed[py, px]
    assert table["extent"][0] == pytest.approx(wide[py, px] / smoothed[py, px], rel=1e-5)
    assert wide[py, px] / smoothed[py, px] != pytest.approx(
        matched_significance(norm, None, 4.0)[0][py, px] / smoothed[py, px], rel=1e-3
    )


def _disc(shape, x, y, radius):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (xx - x) ** 2 + (yy - y) ** 2 <= radius**2


def test_lobe_columns_use_the_matched_filter_and_its_noise_correlation():
    rng = np.random.default_rng(6)
    shape = (128, 128)
    corr = correlated_noise(rng, shape, 1.5)
    source = gaussian_source(shape, 64, 64, 400.0, 2.0)
    table = Table({"x": [64.0], "y": [64.0]})
    add_lobe_columns(table, corr + source, radius=3.0, smooth=2.0)
    smoothed, factor = matched_significance(corr + source, None, 2.0)
    assert table.meta["noise_correlation"] == pytest.approx(factor, abs=1e-4)
    assert factor > 3.0
    stamp = smoothed[61:68, 61:68]
    assert table["peak_norm"][0] == pytest.approx(stamp.max(), rel=1e-6)
    # masked pixels count through the weight map, and stay out of the noise sample
    weight = np.ones(shape)
    weight[:, 66:] = 0.0
    masked = corr + source
    masked[:, 66:] = 0.0
    t2 = add_lobe_columns(Table({"x": [64.0], "y": [64.0]}), masked, radius=3.0, weight=weight)
    # radius 3: 29 pixels, of which the columns x >= 66 (x offsets 2, 3) hold 5 + 1
    assert t2["masked_frac"][0] == pytest.approx(6 / 29)


# --------------------------------------- the majority filter on a series of residuals


@pytest.fixture(scope="module")
def majority_residuals():
    """Five residuals of one field: a badly subtracted (variable) star on every one, a
    transient on the third only, unit white noise; FWHM 3 px."""
    from oasis_core.contracts.model import Residual

    shape = (96, 96)
    rng = np.random.default_rng(12)
    sigma = 3.0 / FWHM_SIGMA1
    star = gaussian_source(shape, 30.3, 40.6, 150.0, sigma)
    transient = gaussian_source(shape, 70.2, 60.8, 200.0, sigma)
    residuals = []
    for i in range(5):
        data = rng.normal(size=shape) + star * (1.0 + 0.1 * i)
        if i == 2:
            data += transient
        residuals.append(
            Residual(
                data=data,
                noise=np.ones(shape),
                weight=np.ones(shape),
                header={"FWHM": 3.0},
                name=f"r{i}",
            )
        )
    return residuals


def test_majority_filter_on_real_detections(majority_residuals, tmp_path):
    from oasis_native.extract import NativeExtract, NativeExtractOptions

    from oasis_core.engine.pipeline import detect

    backend = NativeExtract()
    tables = [
        detect(backend, r, options=NativeExtractOptions(), workdir=Path(tmp_path))
        for r in majority_residuals
    ]
    positives = [t[np.asarray(t["sign"]) > 0] for t in tables]
    n = len(tables)
    star_at = (30.3, 40.6)
    for i, table in enumerate(tables):
        filter_detections(table, catalogs=positives, n_residuals=n, **DEFAULTS)
        d2 = (table["x"] - star_at[0]) ** 2 + (table["y"] - star_at[1]) ** 2
        [star] = np.flatnonzero(d2 < 1.5**2)
        assert table["reason"][star] == "majority", i
        assert table["n_frames"][star] == n
        kept = table[table["reason"] == "kept"]
        if i == 2:  # the transient alone survives, found in one residual
            assert len(kept) == 1
            assert abs(kept["x"][0] - 70.2) < 1 and abs(kept["y"][0] - 60.8) < 1
            assert kept["n_frames"][0] == 1
        else:
            assert len(kept) == 0
    # with fewer residuals than the star's frames exceed, the star is a source again
    table = tables[0]
    filter_detections(table, catalogs=positives[:1], n_residuals=n, **DEFAULTS)
    d2 = (table["x"] - star_at[0]) ** 2 + (table["y"] - star_at[1]) ** 2
    assert table["reason"][np.argmin(d2)] == "kept"


def test_dipole_filter_on_a_misaligned_star(tmp_path):
    # a star subtracted with a 1.5 px misalignment leaves a positive and a negative lobe
    from oasis_native.extract import NativeExtract, NativeExtractOptions

    from oasis_core.contracts.model import Residual
    from oasis_core.engine.pipeline import detect

    shape = (96, 96)
    rng = np.random.default_rng(13)
    sigma = 3.0 / FWHM_SIGMA1
    dipole = gaussian_source(shape, 30.0, 40.0, 400.0, sigma) - gaussian_source(
        shape, 31.5, 40.0, 400.0, sigma
    )
    source = gaussian_source(shape, 70.0, 60.0, 150.0, sigma)
    residual = Residual(
        data=rng.normal(size=shape) + dipole + source,
        noise=np.ones(shape),
        weight=np.ones(shape),
        header={"FWHM": 3.0},
        name="r",
    )
    table = detect(NativeExtract(), residual, options=NativeExtractOptions(), workdir=tmp_path)
    filter_detections(table, catalogs=[], n_residuals=1, **DEFAULTS)
    near_dipole = (np.abs(table["x"] - 30.75) < 3) & (np.abs(table["y"] - 40) < 3)
    assert near_dipole.sum() >= 1
    assert set(table["reason"][near_dipole]) <= {"dipole", "negative"}
    assert "dipole" in set(table["reason"][near_dipole])
    [src] = np.flatnonzero((np.abs(table["x"] - 70) < 1) & (np.abs(table["y"] - 60) < 1))
    assert table["reason"][src] == "kept"
    assert table["lobe_min"][src] > -3.0


@pytest.mark.parametrize("shape", [(1100, 1200), (300, 260), (40, 30)])
def test_significance_at_a_few_pixels_is_the_whole_maps_there(shape):
    """The ``extent`` column's wide map is made at the peaks only (and on the grid its
    spread is measured on): the values of the whole map there, to float32 rounding,
    edges, masked rows and cutouts included."""
    from scipy import ndimage

    from oasis_core.engine.sources import matched_significance, matched_significance_at

    rng = np.random.default_rng(3)
    z = (2 * ndimage.gaussian_filter(rng.normal(size=shape), 0.8)).astype(np.float32)
    bad = np.zeros(shape, bool)
    bad[:5] = True
    bad[shape[0] // 2, shape[1] // 3] = True
    z[bad] = 0
    ys, xs = rng.integers(0, shape[0], 200), rng.integers(0, shape[1], 200)
    ys[:3], xs[3:6] = 0, shape[1] - 1
    for sigma in (1.2, 2.6):
        whole, factor = matched_significance(z, bad, sigma)
        assert factor > 1.0  # the correlated noise is rescaled: the factor is used
        at = matched_significance_at(z, bad, sigma, ys, xs)
        np.testing.assert_allclose(at, whole[ys, xs], rtol=0, atol=1e-6 * np.abs(whole).max())
