"""Tests of the native extract backend (sep on residuals, both signs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from oasis_native.extract import NativeExtract, NativeExtractOptions

from oasis_core.contracts.backends import ExtractBackend
from oasis_core.contracts.errors import StageError
from oasis_core.contracts.model import Residual, readonly

SIGMA = 1.5  # PSF sigma, px (FWHM 3.53)
FWHM = 2.3548 * SIGMA


def render(shape, xy, flux, sigma=SIGMA):
    """Sum of pixel-sampled Gaussian sources (vectorised over sources)."""
    ny, nx = shape
    r = int(np.ceil(5 * sigma))
    off = np.arange(-r, r + 1)
    ix = np.round(xy[:, 0]).astype(int)[:, None, None] + off[None, None, :]
    iy = np.round(xy[:, 1]).astype(int)[:, None, None] + off[None, :, None]
    ix, iy = np.broadcast_arrays(ix, iy)
    val = (
        np.asarray(flux)[:, None, None]
        / (2 * np.pi * sigma**2)
        * np.exp(
            -((ix - xy[:, 0, None, None]) ** 2 + (iy - xy[:, 1, None, None]) ** 2) / (2 * sigma**2)
        )
    )
    inside = (ix >= 0) & (ix < nx) & (iy >= 0) & (iy < ny)
    img = np.zeros(shape)
    np.add.at(img, (iy[inside], ix[inside]), val[inside])
    return img


def residual(data, noise=None, weight=None, header=None, name="r"):
    data = np.asarray(data, np.float32)
    r = Residual(
        data=data,
        noise=np.ones_like(data) if noise is None else noise,
        weight=np.ones_like(data) if weight is None else weight,
        header=header,
        name=name,
    )
    for a in (r.data, r.noise, r.weight):
        readonly(a)
    return r


def run(res, **opts):
    return NativeExtract().extract(res, options=NativeExtractOptions(**opts), workdir=Path("."))


def grid_sources(shape, n_side, margin=24):
    g = np.linspace(margin, shape[0] - margin, n_side)
    xy = np.array([(x, y) for y in g for x in g], float)
    rng = np.random.default_rng(2)
    return xy + rng.uniform(-0.5, 0.5, xy.shape)


def match(table, xy, radius=1.5):
    """Row index of the detection nearest to each position (-1 when none within radius)."""
    if len(table) == 0:
        return np.full(len(xy), -1)
    d = np.hypot(
        np.asarray(table["x"])[None] - xy[:, 0, None], np.asarray(table["y"])[None] - xy[:, 1, None]
    )
    j = np.argmin(d, axis=1)
    return np.where(d[np.arange(len(xy)), j] < radius, j, -1)


def test_pure_noise_gives_at_most_one_false_source():
    rng = np.random.default_rng(0)
    t = run(residual(rng.normal(0, 1, (512, 512))), fwhm=FWHM)
    assert len(t) <= 1
    for col in (*ExtractBackend.COLUMNS, "sign", "npix"):
        assert col in t.colnames


def test_empty_table_has_the_columns():
    rng = np.random.default_rng(1)
    t = run(residual(rng.normal(0, 1, (128, 128))), thresh=50.0)
    assert len(t) == 0
    assert set(ExtractBackend.COLUMNS) | {"sign", "npix"} <= set(t.colnames)


def test_injected_sources_positions_fluxes_and_signs():
    shape = (256, 256)
    xy = grid_sources(shape, 5)
    flux = np.full(len(xy), 2000.0)
    sign = np.where(np.arange(len(xy)) % 3 == 0, -1, 1)
    rng = np.random.default_rng(4)
    noise = np.full(shape, 2.0, np.float32)
    noise[:, 150:] = 4.0  # the threshold follows the noise image
    data = render(shape, xy, sign * flux) + rng.normal(0, 1, shape) * noise + 3.0
    res = residual(data, noise=noise)
    before = res.data.copy()
    t = run(res, fwhm=FWHM)
    j = match(t, xy)
    assert (j >= 0).all()
    assert len(t) == len(xy)  # and nothing else
    found = t[j]
    assert np.all(found["sign"] == sign)
    assert np.all(np.sign(found["flux"]) == sign)
    assert np.all(np.sign(found["peak"]) == sign)
    assert np.max(np.hypot(found["x"] - xy[:, 0], found["y"] - xy[:, 1])) < 0.15
    # aperture 1.5 FWHM holds 99.8% of a Gaussian; errors from the noise image
    r = 1.5 * FWHM
    expected_err = np.sqrt(np.pi * r**2) * noise[xy[:, 1].astype(int), xy[:, 0].astype(int)]
    np.testing.assert_allclose(found["flux_err"], expected_err, rtol=0.05)
    np.testing.assert_allclose(np.abs(found["flux"]), 0.998 * flux, atol=4 * expected_err.max())
    # snr: the PSF-weighted significance, flux / (sigma sqrt(4 pi s^2)) for a Gaussian PSF
    s = FWHM / 2.3548
    optimal = flux / (noise[xy[:, 1].astype(int), xy[:, 0].astype(int)] * 2 * np.sqrt(np.pi) * s)
    np.testing.assert_allclose(found["snr"], optimal, rtol=0.12)
    assert np.all(found["snr"] > 1.5 * np.abs(found["flux"]) / found["flux_err"])
    assert np.all(found["a"] > 1.0)
    assert np.all(found["b"] > 1.0)
    assert np.all(found["npix"] >= 5)
    assert np.all(np.diff(t["snr"]) <= 0)  # sorted by significance
    np.testing.assert_array_equal(res.data, before)


def test_negative_off_and_masked_pixels():
    shape = (128, 128)
    xy = np.array([[40.2, 40.7], [90.4, 30.1], [64.0, 96.3]])
    data = render(shape, xy, [1500.0, -1500.0, 1500.0])
    data += np.random.default_rng(6).normal(0, 1, shape)
    weight = np.ones(shape, np.float32)
    weight[86:108, 44:86] = 0.0  # covers the third source
    t = run(residual(data, weight=weight), fwhm=FWHM, negative=False)
    assert len(t) == 1
    assert t["sign"][0] == 1
    assert t["x"][0] == pytest.approx(40.2, abs=0.15)
    t = run(residual(data, weight=weight), fwhm=FWHM)
    assert sorted(t["sign"]) == [-1, 1]


def test_fwhm_from_header_and_meta():
    shape = (96, 96)
    xy = np.array([[48.3, 47.6]])
    data = render(shape, xy, [3000.0], sigma=2.5) + np.random.default_rng(8).normal(0, 1, shape)
    t = run(residual(data, header={"FWHM": 2.3548 * 2.5}))
    assert t.meta["fwhm"] == pytest.approx(2.3548 * 2.5)
    assert t.meta["radius"] == pytest.approx(1.5 * 2.3548 * 2.5)
    assert len(t) == 1
    assert t["flux"][0] == pytest.approx(3000.0, rel=0.05)
    t = run(residual(data, header={"FWHM": 5.0}), fwhm=4.0)
    assert t.meta["fwhm"] == 4.0
    t = run(residual(data))
    assert t.meta["fwhm"] == 3.0  # the default


def test_all_masked_fails_naming_the_residual():
    data = np.zeros((32, 32))
    with pytest.raises(StageError, match="'res-7'"):
        run(residual(data, weight=np.zeros((32, 32), np.float32), name="res-7"))


def test_sep_on_the_hot_lines_gives_sep_on_the_whole_map():
    """The rows and columns with a pixel above the threshold (and their neighbours) give
    sep's objects of the whole map: the same pixels, order, flags (truncated at the
    image's edges) and deblending, for both signs, with masked pixels."""
    import sep
    from oasis_native.extract import _sep_extract

    shape = (160, 200)
    # blended pairs, sources on every edge and corner, isolated ones, both signs
    xy = np.array(
        [
            [40.0, 40.0],
            [45.5, 41.0],
            [0.3, 80.2],
            [199.6, 20.0],
            [100.0, 0.2],
            [120.4, 159.7],
            [0.0, 0.0],
            [150.2, 100.7],
            [154.0, 104.0],
            [70.3, 120.6],
            [180.0, 140.0],
        ]
    )
    flux = np.array([900, 700, 800, 800, 800, 800, 600, -900, -500, 400, -300], float)
    rng = np.random.default_rng(11)
    search = (render(shape, xy, flux) / 4 + rng.normal(0, 0.5, shape)).astype(np.float32)
    bad = np.zeros(shape, bool)
    bad[:, 60] = True
    bad[70:80, 150:160] = True
    opts = NativeExtractOptions(thresh=2.5, minarea=3)
    flags = 0
    for sign in (1, -1):
        objs = _sep_extract(search, bad, sign, opts)
        ref = sep.extract(
            np.ascontiguousarray(sign * search),
            opts.thresh,
            mask=bad,
            minarea=opts.minarea,
            filter_kernel=None,
            deblend_nthresh=opts.deblend_nthresh,
            deblend_cont=opts.deblend_cont,
        )
        assert len(ref) >= 2
        assert objs.dtype == ref.dtype
        for name in ref.dtype.names:
            np.testing.assert_allclose(objs[name], ref[name], rtol=1e-12, atol=1e-9)
        flags |= np.bitwise_or.reduce(ref["flag"])
    assert flags & sep.OBJ_TRUNC
    assert flags & sep.OBJ_MERGED
    assert _sep_extract(search, bad, 1, NativeExtractOptions(thresh=50.0)) is None


def test_sep_pixel_stack_fits_the_detections_and_is_restored():
    """The detections fit whatever sep's global pixel stack was set to, and extraction
    leaves it as it found it."""
    import sep

    rng = np.random.default_rng(12)
    data = rng.normal(0, 1, (128, 128))
    previous = sep.get_extract_pixstack()
    try:
        sep.set_extract_pixstack(100)
        t = run(residual(data), fwhm=FWHM, thresh=0.5, minarea=1)  # thousands of pixels
        assert len(t) > 10
        assert sep.get_extract_pixstack() == 100
    finally:
        sep.set_extract_pixstack(previous)


def test_sep_runs_with_a_small_stack_and_a_full_one_only_when_needed():
    """``sepstack.extract``: sep's default stack first (its whole stack is allocated at
    every call), the image's size only when a crowded image fills it; the same objects
    as with the large stack, and the process's setting restored either way."""
    import sep
    from oasis_native import sepstack

    rng = np.random.default_rng(0)
    sparse = rng.normal(size=(300, 300)).astype(np.float32)
    sparse[100:103, 50:53] += 50.0
    crowded = (rng.normal(size=(700, 700)) + 5.0).astype(np.float32)  # all above 1 sigma
    before = sep.get_extract_pixstack()
    for image, thresh in ((sparse, 5.0), (crowded, 1.0)):
        args = {"err": 1.0, "filter_kernel": None, "deblend_nthresh": 1}
        got = sepstack.extract(image, thresh, **args)
        sep.set_extract_pixstack(image.size)
        want = sep.extract(image, thresh, **args)
        sep.set_extract_pixstack(before)
        assert len(got) == len(want) >= 1
        np.testing.assert_array_equal(got["x"], want["x"])
        assert sep.get_extract_pixstack() == before
    with pytest.raises(Exception, match="pixel buffer full"):
        sepstack.extract(crowded, 1.0, largest=1000, err=1.0, filter_kernel=None, deblend_nthresh=1)
    assert sep.get_extract_pixstack() == before
