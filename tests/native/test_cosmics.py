"""Tests of :mod:`oasis_native.cosmics`: L.A.Cosmic in windows gives astroscrappy's mask."""

from __future__ import annotations

import numpy as np
import pytest
from oasis_native.cosmics import EDGE, detect_cosmics, laplacian_plus
from oasis_native.sim import simulate_series

PARAMS = {"sigclip": 4.5, "sigfrac": 0.3, "objlim": 5.0, "niter": 4}


def _inputs(data: np.ndarray, header: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sky-subtracted data, variance and mask, as the mask backend builds them (with a
    flat sky: the simulated one is gentle)."""
    gain = header["GAIN"]
    sky = float(np.median(data))
    above = (data - sky).astype(np.float32)
    var = (sky / gain + (header["RDNOISE"] / gain) ** 2 + np.clip(above, 0, None) / gain).astype(
        np.float32
    )
    inmask = data >= header["SATURATE"]
    inmask[:, 40] = True  # a bad column
    return above, var, inmask


@pytest.fixture(scope="module")
def frames() -> list[tuple[np.ndarray, np.ndarray, np.ndarray, float]]:
    series = simulate_series(2, (160, 200), seed=3, n_transients=1)
    out = []
    rng = np.random.default_rng(3)
    for data, header in series.frames:
        data = np.array(data)
        sigma = np.sqrt(header["SIMSKY"] / header["GAIN"])
        # cosmic rays on the edges and corners too
        for y, x in [(0, 0), (0, 77), (1, 199), (159, 3), (158, 120), (80, 0), (81, 199)]:
            data[y, x] += rng.uniform(20, 60) * sigma
        out.append((*_inputs(data, header), header["GAIN"]))
    return out


def test_windows_give_astroscrappy_whole_frame_mask(frames: list) -> None:
    for above, var, inmask, gain in frames:
        fast = detect_cosmics(above, var, inmask, gain=gain, **PARAMS)
        whole = detect_cosmics(above, var, inmask, gain=gain, windows=False, **PARAMS)
        assert whole.sum() >= 10
        np.testing.assert_array_equal(fast, whole)
        # the edge hits are found (astroscrappy alone leaves a border of 4 pixels)
        assert fast[0, 0] and fast[159, 3] and fast[81, 199]


def test_whole_frame_is_astroscrappy_on_the_mirrored_frame(frames: list) -> None:
    import astroscrappy

    above, var, inmask, gain = frames[0]

    def pad(a: np.ndarray) -> np.ndarray:
        return np.pad(a, EDGE, mode="reflect")

    mask, _ = astroscrappy.detect_cosmics(
        pad(above),
        inmask=pad(inmask).astype(np.uint8),
        invar=pad(var),
        gain=gain,
        readnoise=0.0,
        satlevel=np.inf,
        sepmed=True,
        cleantype="meanmask",
        fsmode="median",
        **PARAMS,
    )
    whole = detect_cosmics(above, var, inmask, gain=gain, windows=False, **PARAMS)
    np.testing.assert_array_equal(whole, mask[EDGE:-EDGE, EDGE:-EDGE])


def test_one_iteration_and_nothing_to_find() -> None:
    rng = np.random.default_rng(1)
    noise = rng.normal(0, 1, (64, 64)).astype(np.float32)
    var = np.ones_like(noise)
    none = np.zeros(noise.shape, bool)
    assert not detect_cosmics(noise, var, none, gain=1.0, **PARAMS).any()
    hit = noise.copy()
    hit[30, 30:33] += 80
    params = {**PARAMS, "niter": 1}
    fast = detect_cosmics(hit, var, none, gain=1.0, **params)
    assert fast[30, 30:33].all()
    whole = detect_cosmics(hit, var, none, gain=1.0, windows=False, **params)
    np.testing.assert_array_equal(fast, whole)
    # a masked hit is not flagged
    masked = none.copy()
    masked[29:32, 29:34] = True
    assert not detect_cosmics(hit, var, masked, gain=1.0, **PARAMS)[masked].any()


def test_laplacian_plus_is_astroscrappys() -> None:
    from astroscrappy.utils import laplaceconvolve, rebin, subsample

    rng = np.random.default_rng(2)
    image = rng.normal(0, 10, (37, 52)).astype(np.float32)
    conved = laplaceconvolve(subsample(image))
    conved[conved < 0] = 0
    np.testing.assert_allclose(laplacian_plus(image), rebin(conved), rtol=1e-5, atol=1e-4)


def test_seeds_hold_every_core() -> None:
    # L.A.Cosmic's core test on the whole (mirrored) frame, with astroscrappy's own
    # filters, against the seeds the windows are cut around: every core is a seed, and
    # the stars' cores (sharp, but rejected by the contrast test) are not
    from astroscrappy.utils import sepmedfilt5, sepmedfilt7, sepmedfilt9
    from oasis_native import cosmics
    from scipy import ndimage

    series = simulate_series(1, (300, 283), seed=8, n_transients=1)
    data, header = series.frames[0]
    above, var, inmask = _inputs(np.array(data), header)
    gain = float(header["GAIN"])

    def pad(a: np.ndarray) -> np.ndarray:
        return np.pad(a, EDGE, mode="reflect")

    above, var, inmask = pad(above), pad(var), pad(inmask)
    grown = ndimage.binary_dilation(inmask, np.ones((3, 3), bool))
    image = above * np.float32(gain)
    noise = np.sqrt(np.maximum(sepmedfilt7(var * np.float32(gain * gain)), 1e-5))
    s = laplacian_plus(image) / (2 * noise)
    sp = s - sepmedfilt7(s.astype(np.float32))
    m5 = sepmedfilt5(image)
    fine = np.maximum((m5 - sepmedfilt9(m5)) / noise, 0.01)
    cores = (sp > PARAMS["sigclip"]) & (sp / fine > PARAMS["objlim"]) & ~grown
    assert cores.sum() >= 10

    floor = cosmics._Floor(var, 2.0 * PARAMS["sigclip"] * (1.0 - 1e-4))
    ys, xs = cosmics._sharp(above, floor)
    good = ~grown[ys, xs]
    ys, xs, keep = cosmics._seeds(above, var, ys[good], xs[good], floor, gain=gain, params=PARAMS)
    seeds = np.zeros(above.shape, bool)
    seeds[ys[keep], xs[keep]] = True
    assert not (cores & ~seeds).any()
    # few more: apart from the pixels next to the edge, which are not screened, only
    # those within the margin left for float rounding
    inner = np.zeros(above.shape, bool)
    inner[6:-6, 6:-6] = True
    assert (seeds & ~cores & inner).sum() <= max(2, 0.05 * cores.sum())
    assert keep.size > 3 * cores.sum()  # the bound on L+ alone


def test_median_networks() -> None:
    from oasis_native.cosmics import _median_of

    rng = np.random.default_rng(4)
    for n in (5, 7, 9):
        for values in (rng.normal(size=(n, 500)), rng.integers(0, 3, (n, 500)).astype(float)):
            np.testing.assert_array_equal(_median_of(list(values)), np.median(values, axis=0))
