"""Tests of the native combine backend (weighted median / clipped weighted mean)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from oasis_native import combine as combine_mod
from oasis_native.combine import NativeCombine, NativeCombineOptions, weighted_median

from oasis_core.contracts.errors import StageError
from oasis_core.contracts.model import Frame, Template, readonly


def frame(data, weight=None, name="f", **kw):
    f = Frame(
        data=np.asarray(data, np.float32),
        weight=None if weight is None else np.asarray(weight, np.float32),
        name=name,
        **kw,
    )
    readonly(f.data)
    readonly(f.weight)
    return f


def run(frames, **opts):
    return NativeCombine().combine(frames, options=NativeCombineOptions(**opts), workdir=Path("."))


def hand_frames():
    """3 frames of 2x2 whose weighted medians are worked out by hand below."""
    a = frame([[1, 2], [3, 4]], [[1, 1], [0.5, 0]], name="a", background=1.0)
    b = frame([[5, 100], [7, 8]], [[1, 0], [1, 0]], name="b", background=3.0)
    c = frame([[9, 10], [0, 12]], [[1, 1], [0.5, 0]], name="c", background=2.0)
    return [a, b, c]


def test_weighted_median_by_hand():
    t = run(hand_frames())
    # (0,0): 1, 5, 9 equal weights -> 5
    # (0,1): 2, (100 with weight 0), 10 -> median of 2 and 10 = 6 (the plain median is 10)
    # (1,0): sorted 0 (w .5), 3 (w .5), 7 (w 1); total 2, cumulative .5, 1, 2: the half
    #        weight is reached exactly at 3, so (3 + 7) / 2 = 5 (the plain median is 3)
    # (1,1): no weight anywhere -> weight 0, filled with the median background (2)
    np.testing.assert_allclose(t.data, [[5, 6], [5, 2]])
    np.testing.assert_allclose(t.weight, [[1, 2 / 3], [2 / 3, 0]], rtol=1e-6)
    assert isinstance(t, Template)
    assert t.inputs == ("a", "b", "c")
    assert t.data.dtype == np.float32
    assert t.weight.dtype == np.float32
    assert t.background == 2.0
    assert t.header["NCOMBINE"] == 3
    history = str(t.header["HISTORY"])
    assert all(name in history for name in ("a", "b", "c"))


def test_weighted_median_equal_weights_is_numpy_median():
    rng = np.random.default_rng(3)
    for n in (4, 5):
        v = rng.normal(size=(n, 7, 9))
        med, total = weighted_median(v, np.ones_like(v))
        np.testing.assert_allclose(med, np.median(v, axis=0))
        np.testing.assert_allclose(total, n)


def test_weighted_median_respects_weights():
    v = np.array([1.0, 2.0, 3.0, 4.0])
    # weight 3 on the 4: cumulative 1, 2, 3, 6 -> half = 3 reached at 3 -> (3 + 4) / 2
    assert weighted_median(v, np.array([1.0, 1.0, 1.0, 3.0]))[0] == 3.5
    assert weighted_median(v, np.array([0.0, 0.0, 1.0, 1.0]))[0] == 3.5
    assert weighted_median(v, np.array([0.1, 0.1, 0.1, 0.3]))[0] == 3.5  # float sums
    assert weighted_median(v, np.array([0.1, 0.1, 0.1, 0.2]))[0] == 3.0  # .3 > half .25


def noise_stack(n=5, shape=(96, 96), sigma=2.0, sky=100.0, seed=0, **kw):
    rng = np.random.default_rng(seed)
    return [
        frame(sky + rng.normal(0, sigma, shape), name=f"f{i}", noise=sigma, background=sky, **kw)
        for i in range(n)
    ]


def test_median_noise_gain_and_properties():
    frames = noise_stack(n=9, gain=2.0, readnoise=5.0, saturation=60000.0, fwhm=3.0)
    frames[3] = Frame(
        data=frames[3].data,
        name="f3",
        noise=2.0,
        background=100.0,
        gain=2.0,
        readnoise=5.0,
        saturation=50000.0,
        fwhm=4.0,
    )
    t = run(frames)
    assert t.gain == pytest.approx(9 * 2.0 * 2 / np.pi)
    # read noise in e- at the effective gain: sqrt(pi/2 * 9 (5/2)^2) / 9 * gain_eff
    assert t.readnoise == pytest.approx(np.sqrt(np.pi / 2 * 9 * 6.25) / 9 * t.gain)
    assert t.saturation == 50000.0
    assert t.fwhm == 3.0
    assert t.background == 100.0
    # median of 9: variance ~ 1.5 x that of the mean (pi/2 asymptotically)
    expected = 2.0 / 3.0 * np.sqrt(np.pi / 2)
    assert t.noise == pytest.approx(expected, rel=0.12)
    assert np.all(t.weight == 1.0)


def test_mean_rejects_outliers_and_averages():
    frames = noise_stack(n=6, gain=1.5)
    data = frames[2].data.copy()
    data[40, 50] = 5000.0  # an unmasked cosmic ray
    frames[2] = frame(data, name="f2", noise=2.0, background=100.0, gain=1.5)
    t = run(frames, method="mean")
    others = np.mean([f.data[40, 50] for i, f in enumerate(frames) if i != 2])
    assert t.data[40, 50] == pytest.approx(others, abs=1e-3)
    assert t.weight[40, 50] == pytest.approx(5 / 6)
    # away from the outlier the clipped mean is the plain mean (nothing clipped at 3 sigma
    # but ~0.3% of the values)
    plain = np.mean([f.data for f in frames], axis=0)
    close = np.isclose(t.data, plain, atol=1e-3)
    assert close.mean() > 0.97
    assert t.noise == pytest.approx(2.0 / np.sqrt(6), rel=0.1)
    assert t.gain == pytest.approx(6 * 1.5)


def test_mean_keeps_star_cores_with_different_seeing():
    y, x = np.mgrid[:64, :64]
    rng = np.random.default_rng(7)
    frames = []
    for i, s in enumerate((1.7, 1.8, 1.9, 2.0)):  # FWHM 4.0 to 4.7 px
        star = 1e5 / (2 * np.pi * s**2) * np.exp(-((x - 32) ** 2 + (y - 32) ** 2) / (2 * s**2))
        noisy = star + 100.0 + rng.normal(0, np.sqrt(4.0 + (star + 100.0) / 2.0))
        frames.append(
            frame(noisy, name=f"s{i}", noise=np.sqrt(4.0 + 50.0), background=100.0, gain=2.0)
        )
    t = run(frames, method="mean")
    assert np.all(t.weight[30:35, 30:35] == 1.0)  # the core is never clipped
    plain = np.mean([f.data for f in frames], axis=0)
    # the flux (1e5 +- ~250 of sky noise) matches the unclipped mean's
    assert (t.data - 100).sum() == pytest.approx((plain - 100).sum(), rel=3e-3)


def test_chunked_equals_whole(monkeypatch):
    frames = noise_stack(n=4, shape=(40, 30))
    whole = run(frames)
    monkeypatch.setattr(combine_mod, "_CHUNK", 4 * 30 * 3)  # 3 rows per block
    chunked = run(frames)
    np.testing.assert_array_equal(whole.data, chunked.data)
    np.testing.assert_array_equal(whole.weight, chunked.weight)


def test_nan_pixels_are_ignored():
    frames = noise_stack(n=3, shape=(8, 8))
    data = frames[0].data.copy()
    data[2, 2] = np.nan
    frames[0] = frame(data, np.ones((8, 8)), name="nan", noise=2.0, background=100.0)
    t = run(frames)
    assert t.data[2, 2] == pytest.approx(0.5 * (frames[1].data[2, 2] + frames[2].data[2, 2]))
    assert np.isfinite(t.data).all()


def test_errors():
    with pytest.raises(StageError, match="no frame"):
        run([])
    frames = [frame(np.zeros((4, 4)), name="a"), frame(np.zeros((4, 5)), name="b")]
    with pytest.raises(StageError, match="'b'"):
        run(frames)
    with pytest.raises(ValueError, match="method"):
        NativeCombineOptions(method="sum")
