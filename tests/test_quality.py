"""Tests of oasis_core.engine.quality: Q and the normalised noise of residuals."""

from __future__ import annotations

import math

import numpy as np
import pytest

from oasis_core.engine import quality
from oasis_core.engine.quality import MIN_PIXELS, normalized_noise, q_value

SHAPE = (200, 200)
SIGMA = 7.0


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20240611)


def _noise_and_weight(sigma: float = SIGMA) -> tuple[np.ndarray, np.ndarray]:
    return np.full(SHAPE, sigma, np.float32), np.ones(SHAPE, np.float32)


def test_pure_noise_gives_q_near_one_and_unit_normalised_noise(rng):
    noise, weight = _noise_and_weight()
    r = rng.normal(3.0, SIGMA, SHAPE).astype(np.float32)  # an offset does not matter
    assert q_value(r, noise, weight) > 0.99
    assert normalized_noise(r, noise, weight) == pytest.approx(1.0, abs=0.02)


def test_skellam_residual_of_two_poisson_images_is_noise_limited(rng):
    # The physical case the ideal distribution stands for: difference of two Poisson
    # images with different sky levels, normalised by sqrt(B_S + B_T).
    b_s, b_t = 400.0, 250.0
    r = (rng.poisson(b_s, SHAPE) - rng.poisson(b_t, SHAPE)).astype(np.float32)
    noise = np.full(SHAPE, math.sqrt(b_s + b_t), np.float32)
    weight = np.ones(SHAPE, np.float32)
    assert q_value(r, noise, weight) > 0.98
    assert normalized_noise(r, noise, weight) == pytest.approx(1.0, abs=0.03)


def test_excess_scatter_lowers_q_and_raises_normalised_noise(rng):
    noise, weight = _noise_and_weight()
    base = rng.normal(0.0, SIGMA, SHAPE)
    q1, q12, q15 = (q_value(f * base, noise, weight) for f in (1.0, 1.2, 1.5))
    assert q1 > q12 > q15
    assert q15 < 0.6
    assert normalized_noise(1.5 * base, noise, weight) == pytest.approx(1.5, abs=0.04)
    # a noise image too high is just as wrong as one too low
    assert q_value(0.6 * base, noise, weight) < 0.85


def test_structured_residual_lowers_q(rng):
    noise, weight = _noise_and_weight()
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]]
    structure = 2.0 * SIGMA * np.sin(xx / 6.0) * np.cos(yy / 9.0)
    r = rng.normal(0.0, SIGMA, SHAPE) + structure
    assert q_value(r, noise, weight) < 0.7


def test_a_few_bright_sources_barely_change_q(rng):
    noise, weight = _noise_and_weight()
    r = rng.normal(0.0, SIGMA, SHAPE)
    r[50:55, 50:55] += 100 * SIGMA  # one transient: 25 pixels out of 40 000
    assert q_value(r, noise, weight) > 0.95


def test_weight_and_exclude_remove_pixels(rng):
    noise, weight = _noise_and_weight()
    r = rng.normal(0.0, SIGMA, SHAPE).astype(np.float32)
    bad = np.zeros(SHAPE, bool)
    bad[:, :40] = True
    r_bad = r.copy()
    r_bad[bad] = np.where(rng.random(bad.sum()) < 0.5, np.nan, 1e6)
    w = weight.copy()
    w[bad] = 0
    q_ref = q_value(np.where(bad, 0, r), noise, w)
    assert q_value(r_bad, noise, w) == q_ref
    assert normalized_noise(r_bad, noise, np.ones(SHAPE), exclude=bad) == pytest.approx(
        normalized_noise(r, noise, w), rel=1e-12
    )


def test_variable_noise_image_is_used_per_pixel(rng):
    xx = np.arange(SHAPE[1])[None, :] * np.ones(SHAPE)
    noise = (1.0 + xx / 10.0).astype(np.float32)
    r = rng.normal(0.0, 1.0, SHAPE) * noise
    w = np.ones(SHAPE)
    assert q_value(r, noise, w) > 0.99
    assert q_value(r, np.full(SHAPE, float(noise.mean())), w) < 0.85


def test_too_few_pixels_gives_nan(rng):
    noise, _ = _noise_and_weight()
    r = rng.normal(0.0, SIGMA, SHAPE)
    w = np.zeros(SHAPE)
    w.flat[: MIN_PIXELS - 1] = 1
    assert math.isnan(q_value(r, noise, w))
    assert math.isnan(normalized_noise(r, noise, w))
    w.flat[: 10 * MIN_PIXELS] = 1
    assert not math.isnan(q_value(r, noise, w))


def test_inputs_are_not_modified_and_shape_mismatch_is_an_error(rng):
    noise, weight = _noise_and_weight()
    r = rng.normal(0.0, SIGMA, SHAPE).astype(np.float32)
    for a in (r, noise, weight):
        a.flags.writeable = False
    q_value(r, noise, weight, bins=30)
    with pytest.raises(ValueError, match="same shape"):
        q_value(r, noise[:10], weight)
    with pytest.raises(ValueError, match="bins"):
        q_value(r, noise, weight, bins=2)


def test_star_aperture_rms_is_one_for_pure_noise_and_grows_with_leftovers():
    from oasis_core.engine.quality import star_aperture_rms

    rng = np.random.default_rng(5)
    noise = np.full((256, 256), 2.0)
    res = rng.normal(0, 2.0, noise.shape)
    ys, xs = np.mgrid[30:230:40, 30:230:40]
    xs, ys = xs.ravel().astype(float), ys.ravel().astype(float)
    weight = np.ones(noise.shape)
    clean = star_aperture_rms(res, noise, weight, xs, ys, 4.0)
    assert 0.85 < clean < 1.15
    # a PSF-mismatch leftover (ring) at every star raises the figure
    yy, xx = np.mgrid[:256, :256]
    ring = np.zeros(noise.shape)
    for x, y in zip(xs, ys, strict=True):
        d2 = (xx - x) ** 2 + (yy - y) ** 2
        ring += 20.0 * (np.exp(-d2 / 2.0) - 0.5 * np.exp(-d2 / 8.0))
    assert star_aperture_rms(res + ring, noise, weight, xs, ys, 4.0) > 1.3 * clean
    # masked apertures and edges are skipped
    weight[:, :128] = 0
    assert np.isfinite(star_aperture_rms(res, noise, weight, xs, ys, 4.0))
    assert np.isnan(star_aperture_rms(res, noise, weight, np.array([2.0]), np.array([2.0]), 4.0))


# --------------------------------------------------- exact values and the tails


def reference_q(residual, noise, weight, bins=None):
    """Q computed the plain way: z against the median, edges [-inf, -5 + w, ..., 5 - w,
    inf], unit-Gaussian expected counts from scipy, the tail bins with E < 5 folded into
    the outermost bin with E >= 5 on their side."""
    from scipy.stats import norm

    good = (weight > 0) & np.isfinite(residual) & np.isfinite(noise) & (noise > 0)
    z = (residual[good] - np.median(residual[good])) / noise[good]
    n = z.size
    bins = int(math.log2(n) + 1) if bins is None else bins
    edges = np.linspace(-5.0, 5.0, bins + 1)
    edges[0], edges[-1] = -np.inf, np.inf
    observed = np.histogram(z, bins=edges)[0].astype(float)
    expected = n * np.diff(norm.cdf(edges))
    inner = np.flatnonzero(expected >= 5)
    lo, hi = inner[0], inner[-1]

    def merged(counts):
        return np.concatenate([[counts[: lo + 1].sum()], counts[lo + 1 : hi], [counts[hi:].sum()]])

    o, e = merged(observed), merged(expected)
    return 1.0 / (1.0 + np.sum((o - e) ** 2 / e) / n)


@pytest.mark.parametrize("bins", [None, 7, 40])
def test_q_equals_the_plain_pearson_computation(rng, bins):
    noise, weight = _noise_and_weight()
    weight[:50, :50] = 0
    for r in (
        rng.normal(2.0, SIGMA, SHAPE),
        rng.normal(0.0, 1.3 * SIGMA, SHAPE),
        rng.standard_t(3, SHAPE) * SIGMA,  # heavy tails: the end bins matter
        rng.uniform(-3 * SIGMA, 3 * SIGMA, SHAPE),
    ):
        assert q_value(r, noise, weight, bins=bins) == pytest.approx(
            reference_q(r, noise, weight, bins), rel=1e-9
        )


def test_pixels_beyond_five_sigma_count_in_the_end_bins(rng):
    # 1 % of the pixels are outliers (cosmic rays, unsubtracted stars): beyond the range
    # they still count, in the end bin, exactly as if they were just inside it; and the
    # median, unlike the mean, does not move with their amplitude
    noise, weight = _noise_and_weight()
    base = rng.normal(0.0, SIGMA, SHAPE)
    idx = rng.choice(base.size, base.size // 100, replace=False)
    qs = {}
    for level in (4.9, 60.0, -4.9, -60.0):
        r = base.copy()
        r.flat[idx] = level * SIGMA
        qs[level] = q_value(r, noise, weight)
    assert qs[4.9] == qs[60.0]
    assert qs[-4.9] == qs[-60.0]
    # 400 pixels where a unit Gaussian puts about 35 (the merged end bins beyond 3.1
    # sigma): chi2 ~ 400^2 / 35 ~ 4600, chi2 / N ~ 0.11
    assert 0.85 < qs[60.0] < 0.93
    assert q_value(base, noise, weight) > 0.99


def test_q_is_centred_on_the_median(rng):
    # an offset, or a few bright pixels far from the bulk, do not shift the normalisation
    noise, weight = _noise_and_weight()
    base = rng.normal(0.0, SIGMA, SHAPE)
    bright = base.copy()
    bright[:4, :] = 1e4 * SIGMA  # 800 pixels: the mean moves by 200 sigma
    clean = base.copy()
    clean[:4, :] = 5.0 * SIGMA
    assert q_value(bright, noise, weight) == q_value(clean, noise, weight)
    assert q_value(base + 100 * SIGMA, noise, weight) == pytest.approx(
        q_value(base, noise, weight), abs=1e-12
    )


def test_too_many_bins_for_the_pixels_gives_nan(rng):
    noise, _ = _noise_and_weight()
    r = rng.normal(0.0, SIGMA, SHAPE)
    w = np.zeros(SHAPE)
    w.flat[:MIN_PIXELS] = 1  # exactly MIN_PIXELS pixels: enough
    assert not math.isnan(q_value(r, noise, w))
    assert not math.isnan(q_value(r, noise, w, bins=3))
    assert math.isnan(q_value(r, noise, w, bins=1000))  # no bin expects 5 pixels
    assert not math.isnan(normalized_noise(r, noise, w))


def test_normalised_noise_is_the_mad_of_z_about_its_median(rng):
    noise = rng.uniform(1.0, 3.0, SHAPE)
    r = rng.normal(0.0, 1.0, SHAPE) * noise * 1.3 + 4.0
    r[0, :20] += 50.0  # a few outliers barely move the MAD
    w = np.ones(SHAPE)
    z = (r - np.median(r)) / noise
    expected = 1.4826 * np.median(np.abs(z - np.median(z)))
    assert normalized_noise(r, noise, w) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(1.3, abs=0.03)


def test_figures_depend_on_r_over_sigma_only(rng):
    # the same residual in other units (ADU x 0.01: a noise image below 1); the noise
    # image is float32, so its scaled copy is rounded there
    noise, weight = _noise_and_weight()
    r = rng.normal(0.0, SIGMA, SHAPE)
    exclude = np.zeros(SHAPE, bool)
    exclude[:20] = True
    for f in (0.01, 100.0):
        assert q_value(f * r, f * noise, weight) == pytest.approx(
            q_value(r, noise, weight), rel=1e-6
        )
        assert normalized_noise(f * r, f * noise, weight, exclude=exclude) == pytest.approx(
            normalized_noise(r, noise, weight, exclude=exclude), rel=1e-6
        )


def test_float32_and_float64_residuals_give_the_same_figures(rng):
    # z is computed in float64 whatever the input (a large offset, as a frame that keeps
    # its sky, loses nothing)
    noise, weight = _noise_and_weight()
    r32 = (1e5 + rng.normal(0.0, SIGMA, SHAPE)).astype(np.float32)
    r64 = r32.astype(np.float64)
    assert normalized_noise(r32, noise, weight) == normalized_noise(r64, noise, weight)
    assert q_value(r32, noise, weight) == q_value(r64, noise, weight)


def test_exclude_may_be_any_array_of_truth_values(rng):
    noise, weight = _noise_and_weight()
    r = rng.normal(0.0, SIGMA, SHAPE)
    r[:30] += 10 * SIGMA  # sources, excluded
    mask = np.zeros(SHAPE, bool)
    mask[:30] = True
    expected = q_value(r, noise, weight, exclude=mask)
    assert expected > 0.99
    assert q_value(r, noise, weight, exclude=mask.astype(np.uint8)) == expected
    assert q_value(r, noise, weight, exclude=mask.astype(float)) == expected
    assert normalized_noise(r, noise, weight, exclude=mask.astype(int)) == normalized_noise(
        r, noise, weight, exclude=mask
    )


def test_exclude_adds_to_the_weight_and_finiteness_masks(rng):
    # both masks at once: excluded sources, and masked pixels holding garbage
    noise, weight = _noise_and_weight()
    r = rng.normal(0.0, SIGMA, SHAPE)
    exclude = np.zeros(SHAPE, bool)
    exclude[:30] = True
    r[:30] += 10 * SIGMA
    weight[:, :20] = 0
    spoiled = r.copy()
    spoiled[:, :10] = np.nan
    spoiled[:, 10:20] = 1e6
    both = exclude | (weight == 0)
    keep = np.where(both, 0.0, 1.0)
    assert q_value(spoiled, noise, weight, exclude=exclude) == q_value(r, noise, keep)
    assert normalized_noise(spoiled, noise, weight, exclude=exclude) == normalized_noise(
        r, noise, keep
    )


def test_pixels_with_zero_or_bad_noise_are_not_used(rng):
    noise, weight = _noise_and_weight()
    r = rng.normal(0.0, SIGMA, SHAPE)
    spoiled_noise = noise.copy()
    spoiled_noise[:, :20] = 0.0
    spoiled_noise[:, 20:40] = np.nan
    spoiled_noise[:, 40:60] = -SIGMA
    keep = np.ones(SHAPE)
    keep[:, :60] = 0
    assert q_value(r, spoiled_noise, weight) == q_value(r, noise, keep)
    assert normalized_noise(r, spoiled_noise, weight) == normalized_noise(r, noise, keep)
    r_inf = r.copy()
    r_inf[:, :60] = np.inf
    assert q_value(r_inf, noise, weight) == q_value(r, noise, keep)


def test_exclude_of_the_wrong_shape_is_an_error(rng):
    noise, weight = _noise_and_weight()
    r = rng.normal(0.0, SIGMA, SHAPE)
    with pytest.raises(ValueError, match=r"exclude has shape \(3, 3\)"):
        q_value(r, noise, weight, exclude=np.zeros((3, 3), bool))
    with pytest.raises(ValueError, match="same shape"):
        normalized_noise(r, noise, weight[:, :5])
    with pytest.raises(ValueError, match="same shape"):
        q_value(r[:5], noise[:5], weight)


def test_star_aperture_rms_by_hand():
    from oasis_core.engine.quality import star_aperture_rms

    res = np.zeros((20, 20))
    noise = np.full(res.shape, 2.0)
    weight = np.ones(res.shape)
    # star 1 at (5, 5): the 5 pixels within radius 1 hold 2, 4, 0, 0, 0 -> z 1, 2
    res[5, 5], res[5, 6] = 2.0, 4.0
    res[5, 7] = 100.0  # outside the aperture
    # star 2 at (14, 14): z = 3 on the centre
    res[14, 14] = 6.0
    rms1, rms2 = math.sqrt(5 / 5), math.sqrt(9 / 5)
    xs, ys = np.array([5.0, 14.0]), np.array([5.0, 14.0])
    got = star_aperture_rms(res, noise, weight, xs, ys, 1.0)
    assert got == pytest.approx(np.median([rms1, rms2]), rel=1e-12)
    # rounding of the positions, and one star only
    assert star_aperture_rms(res, noise, weight, xs[:1] + 0.4, ys[:1] - 0.4, 1.0) == pytest.approx(
        rms1
    )
    # a star whose aperture has one masked pixel is skipped
    weight[14, 15] = 0
    assert star_aperture_rms(res, noise, weight, xs, ys, 1.0) == pytest.approx(rms1)
    # a masked pixel outside the aperture (its corner) does not matter
    weight[14, 15], weight[15, 15] = 1, 0
    assert star_aperture_rms(res, noise, weight, xs, ys, 1.0) == pytest.approx(
        np.median([rms1, rms2])
    )
    # an aperture that touches the edge (r pixels from it) is skipped; just inside is used
    assert math.isnan(star_aperture_rms(res, noise, weight, np.array([0.0]), ys[:1], 1.0))
    assert star_aperture_rms(res, noise, weight, np.array([1.0]), np.array([1.0]), 1.0) == 0.0
    assert math.isnan(star_aperture_rms(res, noise, weight, np.array([19.0]), ys[:1], 1.0))
    assert math.isnan(star_aperture_rms(res, noise, weight, xs[:1], np.array([19.0]), 1.0))
    assert star_aperture_rms(res, noise, weight, np.array([18.0]), np.array([18.0]), 1.0) == 0.0
    # radius 2: 13 pixels (the 4 at distance 2 included)
    res2 = np.zeros((20, 20))
    res2[10, 12] = 2.0 * math.sqrt(13)  # z = sqrt(13) at distance 2: RMS 1
    res2[12, 12] = 100.0  # at distance 2.83: outside
    assert star_aperture_rms(
        res2, noise, np.ones(res.shape), np.array([10.0]), np.array([10.0]), 2.0
    ) == pytest.approx(1.0)
    # every aperture masked: nan
    assert math.isnan(star_aperture_rms(res, noise, np.zeros(res.shape), xs, ys, 1.0))
    # a zero noise pixel in the aperture is unusable (no division warning either, for a
    # non-zero residual or a zero one)
    noise[5, 4] = 0.0
    res[5, 4] = 1.0
    noise[4, 5] = 0.0
    assert star_aperture_rms(res, noise, np.ones(res.shape), xs, ys, 1.0) == pytest.approx(rms2)


def test_exact_median_of_large_arrays_in_adversarial_orders():
    from oasis_core.engine.quality import _median

    rng = np.random.default_rng(3)
    n = 1 << 17
    cases = {
        "sorted": np.arange(n, dtype=float),
        "sorted odd": np.arange(n + 1, dtype=float),
        "reversed": np.arange(n, 0, -1, dtype=float),
        "ties": np.repeat([1.0, 2.0, 3.0], n // 3 + 1),
        # the regular subsample sees only huge values: the bracket misses the median
        "strided": np.where(np.arange(n) % 8 == 0, 1e9, rng.normal(size=n)),
        "strided low": np.where(np.arange(n + 1) % 8 == 0, -1e9, rng.normal(size=n + 1)),
        "two values": np.where(np.arange(n) < n // 2 + 1, 0.0, 1.0),
    }
    for name, values in cases.items():
        assert _median(values) == float(np.median(values)), name
        assert _median(values[: 1 << 16]) == float(np.median(values[: 1 << 16])), name


def test_docstring_examples_run():
    # each public function's examples, found on the function itself (doctest.testmod
    # skips functions whose globals are not the module's, e.g. wrapped ones)
    import doctest

    from oasis_core.engine import quality

    finder = doctest.DocTestFinder(recurse=False)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    attempted = 0
    for name in quality.__all__:
        obj = getattr(quality, name)
        for test in finder.find(obj, name, globs=dict(vars(quality))):
            result = runner.run(test)
            assert result.failed == 0, name
            attempted += result.attempted
    # the examples of q_value, normalized_noise and star_aperture_rms
    assert attempted >= 10


def test_source_footprint_covers_the_sources_and_their_surroundings():
    from oasis_core.engine.quality import source_footprint

    rng = np.random.default_rng(5)
    data = rng.normal(100.0, 5.0, (80, 80))
    yy, xx = np.mgrid[:80, :80]
    data += 2000.0 * np.exp(-((xx - 40) ** 2 + (yy - 30) ** 2) / (2 * 2.0**2))
    weight = np.ones_like(data)
    mask = source_footprint(data, weight)
    assert mask[30, 40] and mask[30, 46]  # the star and 6 px beside it (grown by 7 px)
    assert not mask[70, 10] and mask.mean() < 0.1
    assert source_footprint(np.full((80, 80), 3.0), weight) is None  # flat: no sigma
    assert source_footprint(data, np.zeros_like(data)) is None  # nothing good


def test_star_flux_left_measures_the_scale_on_the_science_and_skips_bad_stars():
    """The fraction is against the stars' flux in the science's system, the scale measured
    on the science frame's stars (not a backend's, which may be the wrong one); saturated
    stars and stars with a masked pixel in their aperture are not measured."""
    from oasis_core.engine.quality import star_flux_left

    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[:128, :128]
    places = [(25, 30), (90, 25), (60, 64), (30, 100), (100, 95)]
    psfs = [np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / 4.5) / (4.5 * np.pi) for x, y in places]
    fluxes = [1e5, 2e5, 3e5, 4e5, 5e5]
    stars = sum(f * p for f, p in zip(fluxes, psfs, strict=True))
    tpl = stars + rng.normal(0, 5, stars.shape)
    science = 2.0 * stars + rng.normal(0, 10, stars.shape)  # twice the exposure time
    residual = -0.25 * 2.0 * stars + rng.normal(0, 10, stars.shape)
    weight = np.ones(stars.shape)
    left = star_flux_left(residual, weight, tpl, fwhm=3.5, science=science, scale=1.5)
    assert left.n == 5 and left.scale == pytest.approx(2.0, rel=0.01)
    assert left.fraction == pytest.approx(-0.25, abs=0.01)
    # without the science frame, the scale given
    assert star_flux_left(residual, weight, tpl, fwhm=3.5, scale=2.0).fraction == (
        pytest.approx(-0.25, abs=0.01)
    )
    weight[25, 90] = 0  # a masked pixel on the second star
    left = star_flux_left(residual, weight, tpl, fwhm=3.5, science=science, saturation=3.5e4)
    # the brightest's peak (5e5 / 14.1 = 3.5e4 ADU) is saturated: three stars left
    assert left.n == 3 and sorted(left.x.tolist()) == [25.0, 30.0, 60.0]
    # pure noise: no star
    assert star_flux_left(residual, weight, rng.normal(0, 5, tpl.shape), fwhm=3.5).n == 0


def test_star_flux_left_measures_a_read_only_template_once_and_a_new_one_again(monkeypatch):
    """The template's stars (its sky, noise and local maxima) are the same for every
    frame of a series: measured once for the core's read-only template, again for
    another template or a writeable one, with the same result as measured afresh."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:96, :96]
    stars = [(20, 30), (70, 25), (50, 70), (30, 75)]
    psf = sum(np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / 4.5) for x, y in stars)
    tpl = (1e4 * psf + rng.normal(0, 10, psf.shape)).astype(np.float32)
    res = (-3e3 * psf + rng.normal(0, 10, psf.shape)).astype(np.float32)
    weight = np.ones(psf.shape, np.float32)
    measured = []
    real = quality.box_mean
    monkeypatch.setattr(quality, "box_mean", lambda *a: measured.append(1) or real(*a))
    fresh = quality.star_flux_left(res, weight, tpl, fwhm=3.5)
    frozen = tpl.copy()
    frozen.flags.writeable = False
    first = quality.star_flux_left(res, weight, frozen, fwhm=3.5)
    again = quality.star_flux_left(res * 0.5, weight, frozen, fwhm=3.5)
    assert len(measured) == 2  # the writeable template, then the read-only one once
    assert (
        (first.n, first.fraction) == (fresh.n, fresh.fraction) == (4, pytest.approx(-0.3, abs=0.01))
    )
    assert again.fraction == pytest.approx(0.5 * first.fraction, rel=1e-3)
    other = (2 * tpl).copy()
    other.flags.writeable = False
    assert quality.star_flux_left(res, weight, other, fwhm=3.5).fraction == pytest.approx(
        0.5 * first.fraction, rel=1e-3
    )
    assert len(measured) == 3
