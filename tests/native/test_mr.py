"""Tests of the native master-residual backend."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from oasis_native.mr import NativeMr, NativeMrOptions

from oasis_core.contracts.errors import StageError
from oasis_core.contracts.model import Residual, readonly


def residual(data, noise, weight, name, template="tpl"):
    r = Residual(
        data=np.asarray(data, np.float32),
        noise=np.asarray(noise, np.float32),
        weight=np.asarray(weight, np.float32),
        name=name,
        science=name,
        template=template,
    )
    for a in (r.data, r.noise, r.weight):
        readonly(a)
    return r


def run(residuals, **opts):
    return NativeMr().master(residuals, options=NativeMrOptions(**opts), workdir=Path("."))


def hand_residuals():
    # r1: good pixels 1, 3, 5 -> median 3, noise 1 -> Rn1 = [[-2, 0], [2, (masked)]]
    r1 = residual([[1, 3], [5, 7]], [[1, 1], [1, 1]], [[1, 1], [1, 0]], "r1")
    # r2: good pixels 0, 6, 8, 2 -> median 4, noise 2 -> Rn2 = [[-2, 1], [2, -1]]
    r2 = residual([[0, 6], [8, 2]], [[2, 2], [2, 2]], [[1, 0.5], [1, 1]], "r2")
    return r1, r2


def test_hand_computed_weighted_mean_and_noise():
    r1, r2 = hand_residuals()
    mr = run([r1, r2])
    # (0,1): weights 1 and 0.5 -> (1 * 0 + 0.5 * 1) / 1.5; noise sqrt(1 + 0.25) / 1.5
    # (1,1): only r2 (weight 1) -> -1, noise 1
    np.testing.assert_allclose(mr.data, [[-2, 1 / 3], [2, -1]], rtol=1e-6)
    np.testing.assert_allclose(
        mr.noise, [[np.sqrt(2) / 2, np.sqrt(1.25) / 1.5], [np.sqrt(2) / 2, 1]], rtol=1e-6
    )
    np.testing.assert_allclose(mr.weight, [[1, 1], [1, 0.5]])
    assert mr.name == "MR"
    assert mr.template == "tpl"
    assert mr.header["NCOMBINE"] == 2
    assert "r1" in str(mr.header["HISTORY"])
    assert "r2" in str(mr.header["HISTORY"])
    assert mr.meta["n_residuals"] == 2
    for a in (mr.data, mr.noise, mr.weight):
        assert a.dtype == np.float32


def test_adu_mean_without_normalisation():
    r1, r2 = hand_residuals()
    mr = run([r1, r2], normalize=False)
    # (0,0): (1 + 0) / 2, noise sqrt(1 + 4) / 2; (0,1): (3 + 0.5 * 6) / 1.5,
    # noise sqrt(1 + 0.25 * 4) / 1.5; (1,1): r2 only
    np.testing.assert_allclose(mr.data, [[0.5, 4], [6.5, 2]], rtol=1e-6)
    np.testing.assert_allclose(
        mr.noise, [[np.sqrt(5) / 2, np.sqrt(2) / 1.5], [np.sqrt(5) / 2, 2]], rtol=1e-6
    )


def test_pixels_without_data_get_weight_zero():
    w = np.ones((3, 3))
    w[1, 1] = 0
    r1 = residual(np.arange(9.0).reshape(3, 3), np.ones((3, 3)), w, "a")
    r2 = residual(np.arange(9.0).reshape(3, 3), np.ones((3, 3)), w, "b", template="other")
    mr = run([r1, r2])
    assert mr.weight[1, 1] == 0
    assert mr.data[1, 1] == 0
    assert mr.noise[1, 1] == 0
    assert (mr.weight[w > 0] == 1).all()
    assert mr.template == ""  # two different templates


@pytest.mark.parametrize("method", ["native", "sos", "sos_abs", "sigma_clip"])
def test_pixels_below_min_weight_are_not_stacked(method):
    # weight below MIN_WEIGHT (0.5): the core counts the pixel as masked (less than half
    # of the data behind it, a template's median of one frame of five beside a saturated
    # star), so it is not in the master residual; at MIN_WEIGHT it is
    from oasis_native.mr import SigmaClipMr, SosAbsMr, SosMr

    from oasis_core.contracts.model import MIN_WEIGHT

    shape = (4, 5)
    w1 = np.ones(shape)
    w1[1, 2] = 0.2
    w1[2, 3] = MIN_WEIGHT
    w1[3, 0] = np.nextafter(np.float32(MIN_WEIGHT), np.float32(0))
    data1 = np.zeros(shape)
    data1[1, 2] = data1[3, 0] = 100.0  # a star left in a template of one frame
    r1 = residual(data1, np.ones(shape), w1, "r1")
    r2 = residual(np.zeros(shape), np.ones(shape), np.ones(shape), "r2")
    backend = {"native": NativeMr(), "sos": SosMr(), "sos_abs": SosAbsMr()}.get(
        method, SigmaClipMr()
    )
    mr = run_method(backend, [r1, r2])
    for y, x in ((1, 2), (3, 0)):  # r2 alone: 0, weight 1 of 2
        assert mr.data[y, x] == 0.0
        assert mr.weight[y, x] == pytest.approx(0.5)
    assert mr.weight[2, 3] == 1.0  # at MIN_WEIGHT: data


def test_master_is_in_sigma_units():
    rng = np.random.default_rng(11)
    shape = (128, 128)
    residuals = []
    for i, sigma in enumerate((1.0, 3.0, 10.0, 30.0)):
        weight = np.ones(shape)
        weight[:, : 32 * i] = 0.5  # intermediate weights on part of the frame
        weight[i * 10 : i * 10 + 5, :] = 0.0
        data = 7.0 * i + rng.normal(0, sigma, shape)  # offsets are removed by the median
        residuals.append(residual(data, np.full(shape, sigma), weight, f"r{i}"))
    mr = run(residuals)
    z = mr.data / mr.noise
    assert np.mean(z) == pytest.approx(0.0, abs=5 / np.sqrt(z.size))
    assert np.std(z) == pytest.approx(1.0, abs=0.03)
    assert mr.noise[100, 100] == pytest.approx(0.5)  # 4 equal weights: 1/sqrt(4)
    assert mr.weight[2, 100] == pytest.approx(0.75)  # r0 masked there


def test_inputs_not_modified_and_errors():
    r1, r2 = hand_residuals()
    before = r1.data.copy()
    run([r1, r2])
    np.testing.assert_array_equal(r1.data, before)
    with pytest.raises(StageError, match="no residual"):
        run([])
    r3 = residual(np.zeros((3, 2)), np.ones((3, 2)), np.ones((3, 2)), "odd")
    with pytest.raises(StageError, match="'odd'"):
        run([r1, r3])


# ------------------------------------------------------------ OasisPy's other mr methods


def run_method(backend, residuals, **opts):
    options = backend.Options(**opts)
    return backend.master(residuals, options=options, workdir=Path("."))


def test_sos_by_hand():
    from oasis_native.mr import SosMr

    r1, r2 = hand_residuals()  # Rn1 = [[-2, 0], [2, masked]], Rn2 = [[-2, 1], [2, -1]]
    mr = run_method(SosMr(), [r1, r2])
    np.testing.assert_allclose(mr.data, [[8, 1], [8, 1]], rtol=1e-6)
    # chi-square spread sqrt(2 n): n = 2 everywhere but (1, 1) where only r2 has data
    np.testing.assert_allclose(mr.noise, [[2, 2], [2, np.sqrt(2)]], rtol=1e-6)
    np.testing.assert_allclose(mr.weight, [[1, 1], [1, 0.5]])
    assert mr.header["MRMETHOD"] == "sos"
    assert mr.header["NCOMBINE"] == 2


def test_sos_abs_keeps_the_sign_by_hand():
    from oasis_native.mr import SosAbsMr

    r1, r2 = hand_residuals()
    mr = run_method(SosAbsMr(), [r1, r2])
    # (-2)|-2| + (-2)|-2| = -8; 0 + 1 = 1; 4 + 4 = 8; only r2: (-1)|-1| = -1
    np.testing.assert_allclose(mr.data, [[-8, 1], [8, -1]], rtol=1e-6)
    np.testing.assert_allclose(mr.noise, [[np.sqrt(6)] * 2, [np.sqrt(6), np.sqrt(3)]], rtol=1e-6)


def clip_residuals():
    # five residuals of one row; pixels 3..6 are 0 so every residual's median is 0 and
    # Rn = data (noise 1): pixel 0 has a high outlier, pixel 1 none, pixel 2 a low one
    columns = [
        [0.1, -0.2, 0.3, 0.0, 10.0],
        [1.0, 2.0, 3.0, 4.0, 5.0],
        [-10.0, 0.1, 0.2, -0.1, 0.0],
    ]
    out = []
    for i in range(5):
        row = [c[i] for c in columns] + [0.0] * 4
        out.append(residual([row], np.ones((1, 7)), np.ones((1, 7)), f"r{i}"))
    return out, columns


def test_sigma_clip_by_hand():
    from oasis_native.mr import SigmaClipMr

    residuals, columns = clip_residuals()
    mr = run_method(SigmaClipMr(), residuals, sig_thresh=1.5)
    # pixel 0: median 0.1, std 3.98: 10 >= 0.1 + 1.5 * 3.98 -> the outlier 10
    # pixel 1: median 3, std sqrt(2): nothing 2.12 away -> the median 3
    # pixel 2: median 0, std 4.0: -10 <= -6.0 -> the outlier -10
    assert np.std(columns[0]) == pytest.approx(3.98, abs=0.01)
    np.testing.assert_allclose(mr.data[0, :3], [10.0, 3.0, -10.0], rtol=1e-6)
    np.testing.assert_allclose(mr.data[0, 3:], 0.0, atol=1e-7)
    np.testing.assert_allclose(mr.noise, np.sqrt(np.pi / 2) / np.sqrt(5), rtol=1e-6)
    # OasisPy's default threshold of 4 sigmas: five values can never lie that far out
    mr4 = run_method(SigmaClipMr(), residuals)
    np.testing.assert_allclose(mr4.data[0, :3], [0.1, 3.0, 0.0], rtol=1e-6, atol=1e-7)


def test_sigma_clip_masked_pixels_and_gauss_filter():
    from oasis_native.mr import SigmaClipMr

    r1, r2 = hand_residuals()
    mr = run_method(SigmaClipMr(), [r1, r2])
    # two values: median = mean; one value (1, 1): itself
    np.testing.assert_allclose(mr.data, [[-2, 0.5], [2, -1]], rtol=1e-6)
    flat = [
        residual(np.full((15, 15), v), np.ones((15, 15)), np.ones((15, 15)), f"f{v}")
        for v in (0.0, 0.0, 0.0)
    ]
    smooth = run_method(SigmaClipMr(), flat, gauss_filt=True, gauss_sig=2.0)
    # smoothing white noise of sigma s divides its spread by 2 sqrt(pi) s
    expected = np.sqrt(np.pi / 2) / np.sqrt(3) / (2 * np.sqrt(np.pi) * 2.0)
    assert smooth.noise[7, 7] == pytest.approx(expected, rel=1e-5)


def test_every_mr_method_is_a_registered_backend():
    from oasis_core.engine.plugins import Registry

    names = Registry().names("mr")
    assert {"native", "sos", "sos_abs", "sigma_clip"} <= set(names)


def test_parameters_are_recorded_in_params_and_header():
    r1, r2 = hand_residuals()
    for normalize in (True, False):
        mr = run([r1, r2], normalize=normalize)
        assert mr.params == {"normalize": normalize}
        assert mr.header["MRNORM"] is normalize
        assert "MRMETHOD" not in mr.header
    from oasis_native.mr import SigmaClipMr, SosAbsMr, SosMr

    for backend in (SosMr(), SosAbsMr(), SigmaClipMr()):
        mr = run_method(backend, [r1, r2])
        assert mr.params == {"method": backend.name}
        assert mr.header["MRMETHOD"] == backend.name
        assert "MRNORM" not in mr.header


def test_pixels_with_zero_noise_are_not_used():
    # r2's pixel (0, 0) has weight 1 but noise 0: no usable value there
    r1 = residual([[1, 3], [5, 7]], [[1, 1], [1, 1]], [[1, 1], [1, 1]], "r1")
    r2 = residual([[0, 6], [8, 2]], [[0, 2], [2, 2]], [[1, 1], [1, 1]], "r2")
    for normalize in (True, False):
        mr = run([r1, r2], normalize=normalize)
        assert mr.weight[0, 0] == 0.5
        assert mr.noise[0, 0] == 1.0  # r1 alone, noise 1 in sigmas and in ADU
    from oasis_native.mr import SosMr

    assert run_method(SosMr(), [r1, r2]).weight[0, 0] == 0.5


def test_sigma_clip_threshold_is_inclusive_and_per_pixel():
    from oasis_native.mr import SigmaClipMr

    # five residuals; pixel 0: 0, 0, 0, 0, 5 (median 0, std 2 exactly): 5 is 2.5 std out;
    # pixel 1 the same, negative; pixel 2: 0, 0, 0, 0, 1.25 (std 0.5): 2.5 std out too
    # (every value exact in binary, so "at least sig_thresh" is tested at its edge);
    # pixel 3: a wide spread that must not widen the other pixels' thresholds
    columns = [[0.0] * 4 + [5.0], [0.0] * 4 + [-5.0], [0.0] * 4 + [1.25], [-90, 90, 0, 50, -50]]
    residuals = []
    for i in range(5):
        row = [c[i] for c in columns] + [0.0] * 6
        residuals.append(residual([row], np.ones((1, 10)), np.ones((1, 10)), f"r{i}"))
    mr = run_method(SigmaClipMr(), residuals, sig_thresh=2.5)
    np.testing.assert_array_equal(mr.data[0, :4], [5.0, -5.0, 1.25, 0.0])
    mr = run_method(SigmaClipMr(), residuals, sig_thresh=2.6)
    np.testing.assert_array_equal(mr.data[0, :4], [0.0, 0.0, 0.0, 0.0])


def test_master_header_meta_and_names():
    from astropy.io import fits

    r1, r2 = hand_residuals()
    h1 = fits.Header({"FILTER": "r", "EXPTIME": 30.0})
    h1["OBJECT"] = ("M31", "the field")
    r1 = Residual(data=r1.data, noise=r1.noise, weight=r1.weight, header=h1, name="r1")
    r2 = Residual(data=r2.data, noise=r2.noise, weight=r2.weight, header={"FILTER": "g"}, name="r2")
    from oasis_native.mr import SosMr

    for mr in (run([r1, r2]), run_method(SosMr(), [r1, r2])):
        # the first residual's header, its comments kept
        assert mr.header["FILTER"] == "r"
        assert mr.header.comments["OBJECT"] == "the field"
        assert mr.header["NCOMBINE"] == 2
        assert (mr.name, mr.science) == ("MR", "")
        assert mr.meta["inputs"] == "r1,r2"
        # one pixel of four ((1, 1)) has only r2, none is empty
        assert mr.meta["frac_no_data"] == 0.0
    w = np.ones((2, 2))
    w[0, 0] = 0
    r3 = residual(np.ones((2, 2)), np.ones((2, 2)), w, "r3")
    r4 = residual(np.ones((2, 2)), np.ones((2, 2)), w, "r4")
    assert run([r3, r4]).meta["frac_no_data"] == 0.25
    assert run_method(SosMr(), [r3, r4]).meta["frac_no_data"] == 0.25


def test_error_messages_name_the_residuals():
    r1, _ = hand_residuals()
    with pytest.raises(StageError) as err:
        run([])
    assert str(err.value) == "mr: no residual to combine"
    odd = residual(np.zeros((3, 2)), np.ones((3, 2)), np.ones((3, 2)), "odd")
    with pytest.raises(StageError) as err:
        run([r1, odd])
    assert str(err.value) == "mr: residual 'odd' has shape (3, 2), residual 'r1' has (2, 2)"


def test_one_pass_over_a_series_read_from_disk(tmp_path, monkeypatch):
    """The master of residuals read as they are used (the mr stage's series) is that of
    the residuals in memory, and each residual is read once."""
    from oasis_core.engine import io, products

    rng = np.random.default_rng(4)
    residuals = [
        residual(rng.normal(size=(6, 5)), np.full((6, 5), 1 + i), np.ones((6, 5)), f"r{i}")
        for i in range(4)
    ]
    paths = [tmp_path / f"r{i}.fits" for i in range(4)]
    for r, p in zip(residuals, paths, strict=True):
        io.write_residual(p, r)
    reads = []
    real = products.read_residual

    def counting(path):
        reads.append(path)
        return real(path)

    monkeypatch.setattr(products, "read_residual", counting)
    lazy = run(io.ResidualSeries(paths, cache_bytes=0))
    assert reads == [paths[0], *paths]  # the first for its header and shape, then one pass
    eager = run(residuals)
    np.testing.assert_allclose(lazy.data, eager.data, rtol=1e-6)
    np.testing.assert_allclose(lazy.noise, eager.noise, rtol=1e-6)
    assert lazy.meta == eager.meta
    assert lazy.header["NCOMBINE"] == 4
    odd = tmp_path / "odd.fits"
    io.write_residual(odd, residual(np.zeros((3, 2)), np.ones((3, 2)), np.ones((3, 2)), "odd"))
    with pytest.raises(StageError, match="residual 'odd' has shape"):
        run(io.ResidualSeries([paths[0], odd]))


@pytest.mark.parametrize("method", ["sos", "sos_abs", "sigma_clip"])
def test_stack_methods_leave_pixels_without_data_empty(method):
    from oasis_native.mr import SigmaClipMr, SosAbsMr, SosMr

    backend = {"sos": SosMr(), "sos_abs": SosAbsMr(), "sigma_clip": SigmaClipMr()}[method]
    shape = (5, 6)
    rng = np.random.default_rng(2)
    w_all = np.ones(shape)
    w_all[2, 3] = 0  # no residual has data here
    w_one = w_all.copy()
    w_one[0, :] = 0  # row 0: one residual only
    residuals = [
        residual(rng.normal(size=shape), np.ones(shape), w, f"r{i}")
        for i, w in enumerate((w_all, w_all, w_one))
    ]
    mr = run_method(backend, residuals)
    assert (mr.data[2, 3], mr.noise[2, 3], mr.weight[2, 3]) == (0.0, 0.0, 0.0)
    np.testing.assert_allclose(mr.weight[0], 2 / 3)
    n_noise = {"sos": np.sqrt(2 * 2), "sos_abs": np.sqrt(3 * 2), "sigma_clip": np.sqrt(np.pi / 4)}
    np.testing.assert_allclose(mr.noise[0], n_noise[method], rtol=1e-6)
    if method == "sigma_clip":
        one = run_method(backend, residuals[:1])  # a single residual: the median of one
        np.testing.assert_allclose(one.noise[w_all > 0], np.sqrt(np.pi / 2), rtol=1e-6)


def test_stack_is_the_same_when_computed_in_row_blocks():
    # the stack is combined in blocks of rows (bounded memory): a frame taller than one
    # block (2 residuals x 1000 columns: 2097 rows) gives every row its value
    from oasis_native.mr import SosMr

    shape = (2200, 1000)
    values = np.tile(np.arange(shape[0], dtype=np.float32)[:, None] % 7 - 3.0, (1, shape[1]))
    weight = np.ones(shape, np.float32)
    weight[:, 0] = 0  # keeps each residual's median at 0 despite the offsets
    r = [residual(values, np.ones(shape), weight, f"r{i}") for i in range(2)]
    mr = run_method(SosMr(), r)
    median = np.median(values[:, 1:])
    np.testing.assert_allclose(mr.data[:, 1], 2 * (values[:, 1] - median) ** 2, rtol=1e-6)


def test_sigma_clip_smoothing_at_edges_and_small_widths():
    from oasis_native.mr import SigmaClipMr
    from scipy.ndimage import gaussian_filter

    shape = (15, 15)
    data = np.zeros(shape)
    data[0, 7] = 9.0  # a bright pixel on the edge (every residual's median stays 0)
    weight = np.ones(shape)
    weight[:, 14] = 0  # the last column: no data
    one = weight.copy()
    one[:, 13] = 0  # the column before: in one residual only
    flat = [residual(data, np.ones(shape), w, f"f{i}") for i, w in enumerate((weight, one, one))]
    for sig in (0.5, 2.0):
        mr = run_method(SigmaClipMr(), flat, gauss_filt=True, gauss_sig=sig)
        # beyond the edge is no signal (not a mirror image of the frame)
        expected = gaussian_filter(np.where(weight > 0, data, 0.0), sig, mode="constant")
        np.testing.assert_allclose(mr.data, expected, rtol=1e-5, atol=1e-7)
        white = np.sqrt(np.pi / 2) / np.sqrt(3) / (2 * np.sqrt(np.pi) * sig)
        assert mr.noise[7, 3] == pytest.approx(white, rel=1e-5)  # far from the empty column
        np.testing.assert_array_equal(mr.noise[:, 14], 0.0)
        # the noise map (0 where no data) is smoothed as if continued by its edge pixels
        raw_noise = np.where(weight > 0, np.sqrt(np.pi / 2) / np.sqrt(3), 0.0)
        raw_noise[:, 13] = np.sqrt(np.pi / 2)  # the median of one value
        smoothed = gaussian_filter(raw_noise, sig, mode="nearest") / (2 * np.sqrt(np.pi) * sig)
        np.testing.assert_allclose(mr.noise[:, :14], smoothed[:, :14], rtol=1e-5)


def test_a_residual_with_correlated_noise_weighs_by_its_psf_scale_noise():
    """A residual whose noise is shared between pixels (its science frame convolved) is
    worth ``1 / c**2`` of a clean one at the PSF's scale: weighted by its pixels alone,
    one in six put a 9-sigma ring at a bright star into a null night's master residual."""
    import attrs

    r1, r2 = hand_residuals()
    r1 = attrs.evolve(r1, meta={"noise_correlation": 2.0})
    mr = run([r1, r2])
    n1, n2 = r1.normalized, r2.normalized
    a1 = 0.25  # 1 / c**2; r2 has no record: 1
    # (0,0): weights a1 and 1; (0,1): a1 and 0.5; (1,1): r2 alone
    np.testing.assert_allclose(mr.data[0, 0], (a1 * n1[0, 0] + n2[0, 0]) / (a1 + 1), rtol=1e-6)
    np.testing.assert_allclose(mr.data[0, 1], (a1 * n1[0, 1] + 0.5 * n2[0, 1]) / (a1 + 0.5))
    np.testing.assert_allclose(mr.noise[0, 0], np.sqrt(a1**2 + 1) / (a1 + 1), rtol=1e-6)
    np.testing.assert_allclose(mr.data[1, 1], n2[1, 1], rtol=1e-6)
    np.testing.assert_allclose(mr.weight, [[1, 1], [1, 0.5]])  # residuals with data, as ever
    assert mr.meta["noise_correlation_max"] == 2.0
    # a record below 1 (or none, or not a number) counts as white noise
    for value in (0.5, None, "x"):
        assert attrs.evolve(r1, meta={"noise_correlation": value}).noise_correlation == 1.0
