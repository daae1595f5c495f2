"""Tests of oasis_core.quality: Q and the normalised noise of residuals."""

from __future__ import annotations

import math

import numpy as np
import pytest

from oasis_core.quality import MIN_PIXELS, normalized_noise, q_value

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
    from oasis_core.quality import star_aperture_rms

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
