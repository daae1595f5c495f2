"""What the ``ois`` backend keeps of a template for the next frames of a series.

The core hands a worker the same template object for every frame (``tasks.worker_template``):
its prepared image lives as long as that object, and what depends on it alone (bad-pixel
positions, the variance's transform, the transforms of its moments, the stamps convolved
with the kernel basis) is made once. Each kept value must give what computing it afresh
gave: exactly where the arithmetic is the same, to float32 rounding where the sum is
taken another way (the moments).
"""

from __future__ import annotations

import gc

import attrs
import numpy as np
import pytest
from oasis_ois import ois


def _readonly(a: np.ndarray) -> np.ndarray:
    a = np.array(a)
    a.flags.writeable = False  # as a prepared image's arrays: values are then kept
    return a


def test_rfft2_is_numpys_zero_padded_transform():
    image = np.random.default_rng(0).normal(size=(37, 53)).astype(np.float32)
    grid = ois._fft_shape(image.shape, ois.FFT_PAD)
    want = np.zeros((grid[0], grid[1] // 2 + 1), dtype=np.complex64)
    want[:37] = np.fft.rfft(image, n=grid[1], axis=1, norm="forward")
    want = np.fft.fft(want, axis=0, norm="forward")
    np.testing.assert_array_equal(ois._rfft2(image, grid), want)


@pytest.mark.parametrize("writeable", [True, False])
def test_bad_near_is_the_dilated_mask_at_the_points(writeable):
    rng = np.random.default_rng(1)
    bad = rng.uniform(size=(60, 75)) < 0.004
    bad[0, 10] = bad[59, 74] = bad[30, 0] = True  # on the edges
    if not writeable:
        bad = _readonly(bad)
    y, x = np.mgrid[:60, :75]
    y, x = y.ravel(), x.ravel()
    for half in (0, 1, 3, 8, 30):
        want = ois._sliding_max(bad, half)[y, x]
        np.testing.assert_array_equal(ois._bad_near(bad, half, y, x), want)
    assert not ois._bad_near(np.zeros((5, 5), bool), 2, y[:3] % 5, x[:3] % 5).any()


@pytest.mark.parametrize("deg", [1, 2, 3])
def test_moment_convolution_is_the_spatially_varying_one(deg, monkeypatch):
    """sum_ab (xs**a ys**b I) * L_ab (one inverse transform) = sum_s P_s (I * K_s)."""
    from scipy import signal

    rng = np.random.default_rng(2)
    ny, nx, half = 46, 61, 4
    image = rng.normal(size=(ny, nx)).astype(np.float32)
    im = ois._Image(
        name="t",
        data=_readonly(image),
        smooth=None,
        bad=np.zeros((ny, nx), bool),
        weight=np.ones((ny, nx), np.float32),
        sky=0.0,
        noise=1.0,
        gain=np.inf,
        fwhm=None,
    )
    monomials = ois._monomials(deg)
    kernels = rng.normal(size=(len(monomials), 2 * half + 1, 2 * half + 1))
    xs, ys = ois._scaled_coords((ny, nx))
    grid = ois._fft_shape((ny, nx), ois.FFT_PAD)
    spec = ois._rfft2(image, grid)
    spectra = ois._moment_spectra(im, spec, grid, deg)
    assert spectra is not None and len(spectra) == len(monomials) and spectra[0] is spec
    got = ois._moment_convolution(
        spectra, grid, ois._moment_kernels(kernels, monomials, (ny, nx)), (ny, nx)
    )
    want = sum(
        np.outer(ys**j, xs**i) * signal.convolve2d(image, k, mode="same")
        for k, (i, j) in zip(kernels, monomials, strict=True)
    )
    np.testing.assert_allclose(got, want, atol=2e-5 * float(np.abs(want).max()))
    per_term = ois._spatial_convolution(spec, grid, kernels, monomials, xs, ys)
    np.testing.assert_allclose(got, per_term, atol=2e-6 * float(np.abs(want).max()))
    # made once per image; none beyond the memory allowed
    assert ois._moment_spectra(im, spec, grid, deg)[1] is spectra[1]
    monkeypatch.setattr(ois, "MOMENT_BYTES", (len(monomials) - 2) * spec.nbytes)
    assert ois._moment_spectra(im, spec, grid, deg + 1) is None


def test_kept_stamps_are_those_computed_afresh(monkeypatch):
    rng = np.random.default_rng(3)
    sigmas, degrees, hm, hs = [0.7, 1.5, 2.0], [6, 4, 2], 9, 6
    image = _readonly(rng.normal(size=(200, 200)).astype(np.float32))
    im = ois._Image(
        name="t",
        data=image,
        smooth=None,
        bad=np.zeros(image.shape, bool),
        weight=np.ones(image.shape, np.float32),
        sky=0.0,
        noise=1.0,
        gain=np.inf,
        fwhm=None,
    )
    monkeypatch.setattr(ois, "STAMP_CACHE", 120)
    _, _, t = ois._basis_transform(sigmas, degrees, hm)
    seen: list[np.ndarray] = []
    for k, n in enumerate((70, 70, 80, 90)):  # first sight, kept, partly new, store full
        cy = rng.integers(20, 180, n)
        cx = rng.integers(20, 180, n)
        if k == 2:
            cy[:40], cx[:40] = seen[0], seen[1]  # half of them seen already
        seen = [cy[:40].copy(), cx[:40].copy()]
        feats, rows, grams = ois._stamp_features(im, cy, cx, hs, hm, sigmas, degrees, keep=True)
        raw = ois._raw_stamps(image, cy, cx, hs, hm, sigmas, degrees)
        np.testing.assert_array_equal(feats if rows is None else feats[rows], raw)
        assert (grams is None) == (k == 0) and (rows is None) == (k in (0, 3))
        y = rng.normal(size=(n, (2 * hs + 1) ** 2)).astype(np.float32)
        want = ois._normal_equations(raw, y, None, t)
        got = ois._normal_equations(feats, y, None, t, grams, rows)
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, b)
        # the stamps' chi2 read in place
        sel = rng.permutation(n)[: n - 5]
        coef = rng.normal(size=(sel.size, len(ois._terms(degrees)) + 1))
        var = rng.uniform(1, 2, y.shape).astype(np.float32)
        np.testing.assert_array_equal(
            ois._stamp_chi2(feats, y, var, coef, t, sel, rows),
            ois._stamp_chi2(raw[sel], y[sel], var[sel], coef, t),
        )
    # not kept for an image convolved once
    assert ois._stamp_features(im, cy, cx, 5, 4, sigmas, degrees)[1] is None


def test_a_series_keeps_the_templates_transforms_and_stamps(pair_factory):
    """Frames subtracted one after the other from one template object: from the second,
    the template's moments (one inverse transform) and stamps are reused; the residuals
    are those of a template prepared afresh to float32 rounding, and what was kept goes
    with the template."""
    from oasis_ois.backend import OisSubtract

    rng = np.random.default_rng(4)
    n = 220
    stars = rng.uniform(3, 252, n), rng.uniform(3, 252, n), 10 ** rng.uniform(3.0, 4.7, n)
    _, template = pair_factory(10, stars=stars, fwhm_t=3.0)
    frames = [
        attrs.evolve(pair_factory(seed, stars=stars, fwhm_s=4.0)[0], name=f"s{seed}")
        for seed in (11, 12, 13, 14)
    ]
    options = ois.OisOptions(kernel="isis")
    backend = OisSubtract()
    used = {"moments": 0}
    real = ois._moment_convolution

    def counting(*args, **kwargs):
        used["moments"] += 1
        return real(*args, **kwargs)

    import pathlib

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ois, "_moment_convolution", counting)
        series = [
            backend.subtract(f, template, options=options, workdir=pathlib.Path("."))
            for f in frames
        ]
    assert used["moments"] == 3  # not for the first frame
    # the stamps kept from the third frame (a geometry asked twice), read by the fourth
    prepared = ois._prepare(template, options, "template")
    stores = ois._derived(prepared.data, ("stamps",), ois._StampCache).stores
    assert len(stores) == 1 and next(iter(stores.values())).rows
    assert all(r.meta["deg_spatial"] == 2 for r in series)
    for frame, kept in zip(frames[1:], series[1:], strict=True):
        fresh = backend.subtract(
            attrs.evolve(frame), attrs.evolve(template), options=options, workdir=pathlib.Path(".")
        )
        assert kept.meta["choice_kernel"] == fresh.meta["choice_kernel"]
        assert kept.meta["nstamps"] == fresh.meta["nstamps"]
        good = kept.weight > 0
        diff = np.abs(kept.data.astype(np.float64) - fresh.data)[good] / fresh.noise[good]
        assert diff.max() < 1e-3
        np.testing.assert_array_equal(kept.noise, fresh.noise)
        assert kept.q == pytest.approx(fresh.q, abs=1e-6)
    ident = id(prepared.data)
    assert any(key[0] == ident for key in ois._DERIVED)
    del template, series, prepared, stores
    gc.collect()
    assert not any(key[0] == ident for key in ois._DERIVED)
