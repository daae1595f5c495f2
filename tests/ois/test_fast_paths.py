"""The ``ois`` backend's fast paths against the straightforward computations they replace.

Each of these building blocks was rewritten for speed (whole-array numpy, no scipy on the
``oasis subtract-pair`` path); each must give what the plain version gave: exactly where
the result is a selection (medians, maxima, neighbours), to float32 rounding where it is
arithmetic (smoothing, convolutions).
"""

from __future__ import annotations

import attrs
import numpy as np
import pytest
from oasis_ois import ois

from oasis_core.engine import quality, stats


def _plain_clipped_stats(vals: np.ndarray) -> tuple[float, float]:
    """The clipped median and MAD as first written (median / partition per round)."""
    step = max(1, vals.size // 400_000)
    vals = vals[::step].astype(np.float64)
    med = float(np.median(vals))
    sig = 1.4826 * float(np.median(np.abs(vals - med)))
    for _ in range(3):
        if not sig > 0:
            break
        keep = np.abs(vals - med) < 3.0 * sig
        med = float(np.median(vals[keep]))
        sig = 1.4826 * float(np.median(np.abs(vals[keep] - med)))
    return med, sig


def test_clipped_stats_equal_the_plain_computation():
    rng = np.random.default_rng(0)
    samples = [
        rng.normal(100.0, 10.0, 5000),
        rng.integers(0, 6, 999).astype(float),  # many ties
        rng.poisson(3.0, 64).astype(float),
        np.concatenate([rng.normal(0, 1, 3000), rng.exponential(300, 400)]),  # stars
        np.full(50, 7.0),  # no scatter
        np.array([1.0]),
    ]
    samples += [rng.standard_t(3, int(rng.integers(2, 80))) for _ in range(200)]
    for vals in samples:
        vals = vals.astype(np.float32)
        assert ois._clipped_stats(vals) == pytest.approx(_plain_clipped_stats(vals), rel=1e-12)


def test_sliding_max_and_local_maxima_equal_ndimage():
    from scipy import ndimage

    rng = np.random.default_rng(1)
    image = ndimage.gaussian_filter(rng.normal(size=(70, 90)), 1.2).astype(np.float32)
    image[30, 40:43] = 5.0  # a plateau: every pixel of it is a maximum
    image[0, 0] = image[-1, -1] = image[0, 50] = 6.0  # maxima on the edges
    for radius in (1, 2, 3, 4, 7):
        size = 2 * radius + 1
        np.testing.assert_array_equal(
            ois._sliding_max(image, radius), ndimage.maximum_filter(image, size=size)
        )
        mask = image > 0.05
        y, x = stats.local_maxima(image, *np.nonzero(mask), radius)
        want = np.nonzero(mask & (image == ndimage.maximum_filter(image, size=size)))
        np.testing.assert_array_equal(y, want[0])
        np.testing.assert_array_equal(x, want[1])
    flags = rng.random((70, 90)) > 0.995
    for radius in (1, 4, 9):
        want = ndimage.maximum_filter(flags, size=2 * radius + 1, mode="constant")
        np.testing.assert_array_equal(ois._sliding_max(flags, radius), want)


@pytest.mark.parametrize("shape", [(64, 80), (37, 53), (5, 9)])
def test_fourier_smoothing_equals_gaussian_filter(shape):
    from scipy import ndimage

    image = np.random.default_rng(2).normal(100.0, 30.0, shape).astype(np.float32)
    grid = ois._fft_shape(shape, ois.FFT_PAD)
    smooth = ois._gaussian_smooth(ois._rfft2(image, grid), grid, shape)
    want = ndimage.gaussian_filter(image, 1.0, mode="constant")
    np.testing.assert_allclose(smooth, want, atol=1e-5 * float(np.abs(want).max()))


@pytest.mark.parametrize("deg", [0, 1, 2])
def test_spatial_convolution_equals_direct_sum(deg):
    """sum_s P_s(x, y) (image * K_s)(x, y), each term by scipy.signal.convolve2d."""
    from scipy import signal

    rng = np.random.default_rng(3)
    ny, nx, half = 40, 52, 3
    image = rng.normal(size=(ny, nx)).astype(np.float32)
    monomials = ois._monomials(deg)
    kernels = rng.normal(size=(len(monomials), 2 * half + 1, 2 * half + 1))
    xs, ys = ois._scaled_coords((ny, nx))
    want = sum(
        np.outer(ys**j, xs**i) * signal.convolve2d(image, k, mode="same")
        for k, (i, j) in zip(kernels, monomials, strict=True)
    )
    grid = ois._fft_shape((ny, nx), half)
    spec = ois._rfft2(image, grid)
    got = ois._spatial_convolution(spec, grid, kernels, monomials, xs, ys)
    np.testing.assert_allclose(got, want, atol=2e-5 * float(np.abs(want).max()))
    # two threads sharing the powers of x give the same sum
    mine, theirs = ois._share_powers(monomials)
    if theirs:
        shared = ois._spatial_convolution(spec, grid, kernels, monomials, xs, ys, mine)
        shared += ois._spatial_convolution(spec, grid, kernels, monomials, xs, ys, theirs)
        np.testing.assert_allclose(shared, got, atol=1e-6 * float(np.abs(want).max()))


@pytest.mark.parametrize("const_ksum", [True, False])
@pytest.mark.parametrize(("deg_spatial", "deg_bg"), [(2, 1), (0, 0), (1, 2), (3, 1)])
def test_global_normal_equations_equal_the_dense_expansion(const_ksum, deg_spatial, deg_bg):
    rng = np.random.default_rng(4)
    layout = ois._Layout(nb=12, deg_spatial=deg_spatial, deg_bg=deg_bg, const_ksum=const_ksum)
    n = 23
    xn, yn = rng.uniform(-1, 1, n), rng.uniform(-1, 1, n)
    a = rng.normal(size=(n, 13, 13))
    m, b = a @ a.transpose(0, 2, 1), rng.normal(size=(n, 13))
    e = layout.expansion(xn, yn)
    flat = e.reshape(-1, e.shape[2])
    big_m, big_b = layout.normal(m, b, xn, yn)
    dense = flat.T @ (m @ e).reshape(flat.shape)
    # summation order differs: round-off relative to the matrix's scale, not each element's
    np.testing.assert_allclose(big_m, dense, rtol=1e-12, atol=1e-13 * np.abs(dense).max())
    np.testing.assert_allclose(big_b, flat.T @ b.reshape(-1), rtol=1e-12, atol=1e-12)
    theta = rng.normal(size=big_b.size)
    np.testing.assert_allclose(layout.local(theta, xn, yn), e @ theta, rtol=1e-12, atol=1e-12)
    # the unpacked coefficients: kernel (nb, nsp) and background, the same local values
    coef, bg = layout.unpack(theta)
    assert coef.shape == (12, layout.nsp) and bg.shape == (layout.nbg,)
    if const_ksum:
        assert coef[0, 0] == theta[0] and not coef[0, 1:].any()
    p, q = ois._poly_at(deg_spatial, xn, yn), ois._poly_at(deg_bg, xn, yn)
    unpacked = np.concatenate([p @ coef.T, (q @ bg)[:, None]], axis=1)
    np.testing.assert_allclose(unpacked, e @ theta, rtol=1e-12, atol=1e-12)


def test_raw_stamps_carried_to_the_basis_give_the_same_normal_equations():
    rng = np.random.default_rng(5)
    sigmas, degrees, hm, hs = [0.7, 1.5, 2.0], [6, 4, 2], 9, 6
    image = rng.normal(size=(200, 200)).astype(np.float32)
    cy, cx = rng.integers(20, 180, 70), rng.integers(20, 180, 70)  # 2 chunks: 2 threads
    raw = ois._raw_stamps(image, cy, cx, hs, hm, sigmas, degrees)
    feats = ois._convolved_stamps(image, cy, cx, hs, hm, sigmas, degrees)
    _, _, t = ois._basis_transform(sigmas, degrees, hm)
    y = rng.normal(size=(70, (2 * hs + 1) ** 2)).astype(np.float32)
    var = rng.uniform(1, 2, y.shape).astype(np.float32)
    m, b, yy = ois._normal_equations(raw, y, var, t)
    m2, b2, yy2 = ois._normal_equations(np.ascontiguousarray(feats.transpose(0, 2, 1)), y, var)
    scale = np.abs(m2).max()
    np.testing.assert_allclose(m, m2, atol=1e-4 * scale)
    np.testing.assert_allclose(b, b2, atol=1e-4 * np.abs(b2).max())
    np.testing.assert_allclose(yy, yy2, rtol=1e-12)


def test_outshone_marks_the_fainter_of_each_close_pair_as_query_pairs_did():
    from scipy.spatial import cKDTree

    rng = np.random.default_rng(6)
    y, x = rng.integers(0, 300, 400), rng.integers(0, 300, 400)
    keep = np.unique(y * 1000 + x, return_index=True)[1]  # distinct positions
    y, x = y[keep], x[keep]
    value = rng.integers(0, 50, y.size).astype(np.float32)  # ties on purpose
    for r in (3, 15):
        want = np.zeros(y.size, dtype=bool)
        pairs = cKDTree(np.column_stack([y, x])).query_pairs(r, p=np.inf, output_type="ndarray")
        i, j = pairs[:, 0], pairs[:, 1]
        want[np.where(value[i] < value[j], i, j)] = True
        np.testing.assert_array_equal(ois._outshone(y, x, value, r), want)


def test_fast_len_is_scipys_next_fast_len():
    from scipy import fft

    for n in [1, 2, 7, 1000, 1031, 2057, 2080, 4105, 6001]:
        assert ois._fast_len(n) == fft.next_fast_len(n, real=True), n


def test_work_split_in_two_threads_covers_every_index_once():
    seen: list[int] = []
    for n, chunk in [(0, 32), (5, 32), (64, 32), (300, 64), (301, 64)]:
        seen.clear()
        ois._in_two_threads(lambda lo, hi: seen.extend(range(lo, hi)), n, chunk)
        assert sorted(seen) == list(range(n))


def test_blas_threads_are_restored():
    controls = ois._openblas_threads()
    if controls is None:
        pytest.skip("numpy's BLAS is not an OpenBLAS that can be found")
    before = controls[0]()
    with ois._single_threaded_blas():
        assert controls[0]() == 1
    assert controls[0]() == before


def test_quality_median_is_numpys():
    rng = np.random.default_rng(7)
    for n in [100, 65_535, 65_536, 100_001, 250_000]:
        for values in (rng.normal(size=n), rng.integers(0, 9, n).astype(float)):
            assert quality._median(values) == float(np.median(values))
            v32 = values.astype(np.float32)
            assert quality._median(v32) == float(np.median(v32.astype(np.float64)))


def test_box_mean_and_banded_sky_noise():
    from scipy import ndimage

    rng = np.random.default_rng(8)
    a = rng.normal(100.0, 10.0, (3, 32, 50)).astype(np.float32)
    for box in (6, 7):
        want = np.stack([ndimage.uniform_filter(x, box, mode="nearest") for x in a])
        np.testing.assert_allclose(stats.box_mean(a, box), want, rtol=1e-6)
    image = rng.normal(50.0, 4.0, (600, 500)).astype(np.float32)
    full = stats.sky_noise(image)
    banded = stats.sky_noise(image, max_pixels=100_000)
    assert banded == pytest.approx(full, rel=0.03)
    assert banded == pytest.approx(4.0, rel=0.03)
    assert stats.sky_noise(image, fill=50.0) == full  # no bad pixel: the fill is unused


# ------------------------------------------- the batched solver and the pixel variance


def test_solve_sym_solves_batches_and_single_systems():
    rng = np.random.default_rng(11)
    a = rng.normal(size=(4, 6, 6))
    m = a @ np.swapaxes(a, 1, 2) + 0.1 * np.eye(6)  # positive definite
    x = rng.normal(size=(4, 6))
    b = (m @ x[..., None])[..., 0]
    np.testing.assert_allclose(ois._solve_sym(m, b), x, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(ois._solve_sym(m[0], b[0]), x[0], rtol=1e-7, atol=1e-9)
    # Jacobi scaling: the tiny ridge is relative, so the units of the system do not matter
    for scale in (1e-12, 1e12):
        np.testing.assert_allclose(ois._solve_sym(scale * m, scale * b), x, rtol=1e-7)


def test_solve_sym_unknowns_without_signal_get_zero():
    # a basis function that touches no pixel of a stamp: a zero row and column
    m = np.diag([4.0, 0.0, 9.0])
    b = np.array([8.0, 0.0, 27.0])
    sol = ois._solve_sym(m, b)
    np.testing.assert_allclose(sol, [2.0, 0.0, 3.0], rtol=1e-8)
    assert np.isfinite(ois._solve_sym(np.zeros((2, 3, 3)), np.zeros((2, 3))).all())


def test_solve_sym_falls_back_to_least_squares_when_singular():
    # a system that stays singular with the ridge (diagonal 1, off-diagonal 1 + 1e-10):
    # the minimum-norm least-squares solution, one system or a batch
    eps = 1e-10
    m = np.array([[1.0, 1.0 + eps], [1.0 + eps, 1.0]])
    b = np.array([2.0, 2.0])
    with pytest.raises(np.linalg.LinAlgError):
        np.linalg.solve(m + eps * np.eye(2), b)
    expected = np.linalg.lstsq(m + eps * np.eye(2), b, rcond=1e-12)[0]
    np.testing.assert_allclose(ois._solve_sym(m, b), expected, rtol=1e-9)
    np.testing.assert_allclose(expected, [1.0, 1.0], rtol=1e-6)
    batch = ois._solve_sym(np.stack([m, 2 * np.eye(2)]), np.stack([b, [2.0, 4.0]]))
    np.testing.assert_allclose(batch, [[1.0, 1.0], [1.0, 2.0]], rtol=1e-6)


def test_pixel_variance_is_sky_plus_the_positive_signal_over_gain():
    im = ois._Image(
        name="x",
        data=np.array([[-5.0, 0.0], [0.5, 10.0]], np.float32),
        smooth=None,
        bad=np.zeros((2, 2), bool),
        weight=np.ones((2, 2), np.float32),
        sky=0.0,
        noise=2.0,
        gain=4.0,
        fwhm=3.0,
    )
    np.testing.assert_allclose(im.variance(), [[4.0, 4.0], [4.125, 6.5]], rtol=1e-6)
    np.testing.assert_allclose(im.variance((np.array([1]), np.array([1]))), [6.5], rtol=1e-6)
    assert im.variance().dtype == np.float32


def test_robust_outliers_one_and_two_sided():
    values = np.array([1.0, 1.1, 0.9, 1.05, 0.95, 1.0, 9.0, -7.0])
    np.testing.assert_array_equal(ois._robust_outliers(values, 3.0, one_sided=True), values == 9.0)
    np.testing.assert_array_equal(
        ois._robust_outliers(values, 3.0, one_sided=False), np.abs(values - 1) > 5
    )
    # no spread (most values equal): nothing can be called an outlier
    flat = np.array([2.0, 2.0, 2.0, 2.0, 50.0])
    out = ois._robust_outliers(flat, 3.0, one_sided=False)
    assert out.dtype == bool and out.shape == (5,) and not out.any()


def test_spatial_degrees_need_three_stamps_per_term():
    # deg 2: 6 terms, 18 stamps; deg 1: 3 terms, 9 stamps; deg 0 whatever the number
    assert ois._degrees_for(18, 2, 1) == (2, 1)
    assert ois._degrees_for(17, 2, 1) == (1, 1)
    assert ois._degrees_for(9, 2, 2) == (1, 1)
    assert ois._degrees_for(8, 2, 2) == (0, 0)
    assert ois._degrees_for(1, 3, 3) == (0, 0)
    assert ois._degrees_for(100, 0, 0) == (0, 0)


def test_effective_gain_of_frames_with_and_without_one():
    from oasis_core.contracts.model import Frame

    data = np.zeros((4, 4), np.float32)
    # a gain given is used, any positive one
    assert ois._effective_gain(Frame(data=data, gain=0.5), 1000.0, 15.0) == 0.5
    # none (or a meaningless 0): a sky well above its noise gives its photon statistics
    for gain in (None, 0.0):
        frame = Frame(data=data, gain=gain)
        assert ois._effective_gain(frame, 1000.0, 15.811) == pytest.approx(4.0, rel=1e-3)
        assert ois._effective_gain(frame, 100.0, 10.0) == pytest.approx(1.0)
        assert ois._effective_gain(frame, 35.0, 10.0) == pytest.approx(0.35)  # > 3 sigma
        # a sky-subtracted frame: no source Poisson term
        assert ois._effective_gain(frame, 20.0, 10.0) == np.inf
        assert ois._effective_gain(frame, 0.0, 10.0) == np.inf


def test_weighted_normal_equations_are_the_explicit_sums():
    # features + a constant, weights 1 / var: M = sum g g' / var, b = sum g y / var and
    # y'Wy = sum y^2 / var, stamp by stamp (70 stamps: more than one chunk per thread)
    rng = np.random.default_rng(12)
    n, nb, npix = 70, 3, 25
    feats = rng.normal(size=(n, nb, npix)).astype(np.float32)
    y = rng.normal(size=(n, npix)).astype(np.float32)
    var = rng.uniform(0.5, 4.0, size=(n, npix)).astype(np.float32)
    m, b, yy = ois._normal_equations(feats, y, var)
    g = np.concatenate([feats.astype(np.float64), np.ones((n, 1, npix))], axis=1)
    w = 1.0 / var.astype(np.float64)
    np.testing.assert_allclose(m, np.einsum("nkp,njp,np->nkj", g, g, w), rtol=1e-10)
    np.testing.assert_allclose(b, np.einsum("nkp,np,np->nk", g, y, w), rtol=1e-10)
    np.testing.assert_allclose(yy, np.einsum("np,np,np->n", y, y, w), rtol=1e-10)
    _, _, yy1 = ois._normal_equations(feats, y, None)
    np.testing.assert_allclose(yy1, (y.astype(np.float64) ** 2).sum(axis=1), rtol=1e-10)


def test_a_template_is_prepared_once_for_every_frame_subtracted_from_it(monkeypatch):
    """The core hands a worker the same template object for every frame of a series
    (``tasks.worker_template``): its sky, noise, smoothing and transform are made once,
    and forgotten with the object. Before, every frame prepared the template again."""
    import gc

    from oasis_ois.choose import solve_model

    from .conftest import make_pair

    made = []
    real = ois._prepare_now
    monkeypatch.setattr(
        ois, "_prepare_now", lambda f, o, what: made.append(f.name) or real(f, o, what)
    )
    sci1, template = make_pair(1)
    sci2, _ = make_pair(2)
    sci2 = attrs.evolve(sci2, name="sci2")
    options = ois.OisOptions()
    first = solve_model(sci1, template, options)
    second = solve_model(sci2, template, options)
    assert made.count("tpl") == 1
    assert made.count("sci") == 1 and made.count("sci2") == 1
    # the same result as from a template prepared afresh
    again = solve_model(sci2, attrs.evolve(template), options)
    assert made.count("tpl") == 2
    np.testing.assert_array_equal(second.residual, again.residual)
    assert np.isfinite(first.residual).any()
    ident = id(template)
    assert ident in ois._PREPARED
    del template, sci1, sci2, first, second, again
    gc.collect()
    assert ident not in ois._PREPARED
