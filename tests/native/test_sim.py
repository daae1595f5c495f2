"""Tests of the simulator, :mod:`oasis_native.sim`."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits
from astropy.time import Time
from astropy.wcs import WCS
from oasis_native.sim import SimSeries, simulate_pair, simulate_series, write_series

SHAPE = (256, 256)
N_FRAMES = 6


@pytest.fixture(scope="module")
def series() -> SimSeries:
    return simulate_series(N_FRAMES, SHAPE, seed=11, n_transients=4)


def _variant(**kwargs: object) -> SimSeries:
    """The series of the ``series`` fixture with some effects switched off."""
    return simulate_series(N_FRAMES, SHAPE, seed=11, **{"n_transients": 4, **kwargs})


def _sigma(header: fits.Header) -> float:
    return float(
        np.sqrt(header["SIMSKY"] / header["GAIN"] + (header["RDNOISE"] / header["GAIN"]) ** 2)
    )


def test_frames_and_headers(series: SimSeries) -> None:
    assert series.names == [f"sim_{k:03d}" for k in range(N_FRAMES)]
    mjds = []
    for data, header in series.frames:
        assert data.dtype == np.float32
        assert data.shape == SHAPE
        assert np.isfinite(data).all()
        for key in (
            "GAIN",
            "RDNOISE",
            "SATURATE",
            "EXPTIME",
            "FILTER",
            "DATE-OBS",
            "MJD-OBS",
            "OBJECT",
            "CTYPE1",
            "CRVAL1",
            "CD1_1",
        ):
            assert key in header, key
        assert Time(header["DATE-OBS"], scale="utc").mjd == pytest.approx(
            header["MJD-OBS"], abs=1e-6
        )
        assert WCS(header).wcs.ctype[0] == "RA---TAN"
        # sky level in the pixels: the median sits a little above the simulated sky
        assert header["SIMSKY"] <= np.median(data) < header["SIMSKY"] + 5 * _sigma(header)
        mjds.append(header["MJD-OBS"])
    assert np.all(np.diff(mjds) > 0)
    first = series.frames[0][1]
    assert first["SIMDX"] == first["SIMDY"] == first["SIMROT"] == 0.0
    assert any(abs(h["SIMDX"]) > 0.5 for _, h in series.frames[1:])
    fwhms = [h["SIMFWHM"] for _, h in series.frames]
    assert 2.5 <= min(fwhms) < max(fwhms) <= 5.0


def test_pointing_offsets_follow_the_sim_cards(series: SimSeries) -> None:
    """Frame k sees frame-0 pixel p0 at c + (SIMDX, SIMDY) + R(SIMROT) (p0 - c)."""
    ra, dec = series.stars["ra"], series.stars["dec"]
    x0, y0 = WCS(series.frames[0][1]).wcs_world2pix(ra, dec, 0)
    cx, cy = (SHAPE[1] - 1) / 2, (SHAPE[0] - 1) / 2
    for _, header in series.frames[1:]:
        assert abs(header["SIMDX"]) <= 8.0
        assert abs(header["SIMDY"]) <= 8.0
        assert abs(header["SIMROT"]) <= 0.3
        t = np.radians(header["SIMROT"])
        xe = cx + header["SIMDX"] + np.cos(t) * (x0 - cx) - np.sin(t) * (y0 - cy)
        ye = cy + header["SIMDY"] + np.sin(t) * (x0 - cx) + np.cos(t) * (y0 - cy)
        xk, yk = WCS(header).wcs_world2pix(ra, dec, 0)
        assert np.abs(xk - xe).max() < 0.01
        assert np.abs(yk - ye).max() < 0.01


def test_deterministic() -> None:
    a = simulate_series(2, (96, 96), seed=3, n_transients=1)
    b = simulate_series(2, (96, 96), seed=3, n_transients=1)
    c = simulate_series(2, (96, 96), seed=4, n_transients=1)
    for (da, ha), (db, hb) in zip(a.frames, b.frames, strict=True):
        np.testing.assert_array_equal(da, db)
        assert ha == hb
    assert np.array_equal(a.truth["x"], b.truth["x"])
    assert not np.array_equal(a.frames[0][0], c.frames[0][0])


def test_wcs_puts_truth_transients_at_their_pixels(series: SimSeries) -> None:
    assert len(series.truth) > 0
    headers = dict(zip(series.names, (h for _, h in series.frames), strict=True))
    for row in series.truth:
        x, y = WCS(headers[row["frame"]]).wcs_world2pix(row["ra"], row["dec"], 0)
        assert abs(x - row["x"]) < 0.1
        assert abs(y - row["y"]) < 0.1


def test_wcs_matches_the_rendered_stars(series: SimSeries) -> None:
    """Bright isolated stars sit where each frame's WCS puts their (ra, dec)."""
    import sep

    for data, header in series.frames[::2]:
        sat = header["SATURATE"]
        sx, sy = WCS(header).wcs_world2pix(series.stars["ra"], series.stars["dec"], 0)
        flux = np.asarray(series.stars["flux"])
        inside = (sx > 20) & (sx < SHAPE[1] - 21) & (sy > 20) & (sy < SHAPE[0] - 21)
        ix = np.clip(np.rint(sx).astype(int), 0, SHAPE[1] - 1)
        iy = np.clip(np.rint(sy).astype(int), 0, SHAPE[0] - 1)
        unsaturated = data[iy, ix] < 0.8 * sat
        bright = inside & unsaturated & (flux > np.quantile(flux, 0.85))
        d2 = (sx[:, None] - sx[None, :]) ** 2 + (sy[:, None] - sy[None, :]) ** 2
        np.fill_diagonal(d2, np.inf)
        neighbour = ((d2 < 15.0**2) & (flux[None, :] > 0.05 * flux[:, None])).any(axis=1)
        pick = np.flatnonzero(bright & ~neighbour)
        assert len(pick) >= 3
        image = np.ascontiguousarray(data, dtype=np.float64) - np.median(data)
        sig = header["SIMFWHM"] / 2.3548
        xw, yw, flag = sep.winpos(image, sx[pick], sy[pick], np.full(len(pick), sig))
        ok = flag == 0
        offset = np.hypot(xw[ok] - sx[pick][ok], yw[ok] - sy[pick][ok])
        assert np.median(offset) < 0.1


def test_transients(series: SimSeries) -> None:
    quiet = _variant(n_transients=0)
    truth = series.truth
    ids = np.unique(truth["id"])
    assert set(ids) == set(range(4))
    for tid in ids:
        frames = sorted(int(f[4:]) for f in truth["frame"][truth["id"] == tid])
        assert 1 <= len(frames) < N_FRAMES / 2  # never in a majority of the frames
        assert frames == list(range(frames[0], frames[0] + len(frames)))  # consecutive
    assert np.all((truth["peak_snr"] >= 5.0) & (truth["peak_snr"] <= 100.0))
    assert truth["peak_snr"].max() / truth["peak_snr"].min() > 5  # faint to obvious
    index = {name: k for k, name in enumerate(series.names)}
    for row in truth:
        # the transient's own pixels: this series minus the same series without it
        k = index[row["frame"]]
        data, header = series.frames[k]
        diff = data.astype(np.float64) - quiet.frames[k][0]
        ix, iy = round(row["x"]), round(row["y"])
        assert 15 < ix < SHAPE[1] - 15
        assert 15 < iy < SHAPE[0] - 15
        half = int(np.ceil(4.5 * header["SIMFWHM"]))
        box = diff[iy - half : iy + half + 1, ix - half : ix + half + 1]
        assert box.sum() == pytest.approx(
            row["flux"], abs=5 * np.sqrt(row["flux"] / header["GAIN"])
        )
        assert np.unravel_index(np.argmax(box), box.shape) == pytest.approx((half, half), abs=1)


def test_cosmic_rays_hot_pixels_and_saturation(series: SimSeries) -> None:
    from scipy import ndimage

    no_cr = _variant(cosmic_rays=False)
    no_cr_no_hot = _variant(cosmic_rays=False, hot_pixels=False)
    hot_positions = []
    for (data, header), (data_nocr, _), (data_clean, _) in zip(
        series.frames, no_cr.frames, no_cr_no_hot.frames, strict=True
    ):
        cr = data != data_nocr
        _, n_hits = ndimage.label(cr, structure=np.ones((3, 3)))
        assert header["SIMNCR"] >= 5
        assert 0.7 * header["SIMNCR"] <= n_hits <= header["SIMNCR"]
        assert cr.sum() <= 5 * header["SIMNCR"]  # sharp: at most 5 px per hit
        hot = data_nocr != data_clean
        assert hot.sum() <= 5  # single pixels (a few, 256x256)
        hot_positions.append(set(zip(*np.nonzero(hot), strict=True)))
        # saturated stars: clipped at SATURATE, with a vertical bleed trail
        sat = data >= header["SATURATE"]
        assert data.max() == header["SATURATE"]
        labels, n = ndimage.label(sat)
        assert n >= 1
        heights = [s[0].stop - s[0].start for s in ndimage.find_objects(labels)]
        widths = [s[1].stop - s[1].start for s in ndimage.find_objects(labels)]
        assert max(h - w for h, w in zip(heights, widths, strict=True)) >= 2
    # the same few detector pixels in every frame (unless a saturated star covers one)
    assert len(set.union(*hot_positions)) == 3
    assert min(len(h) for h in hot_positions) >= 2


def test_sky_subtracted(series: SimSeries) -> None:
    sub = _variant(sky_subtracted=True)
    yy, xx = np.mgrid[0 : SHAPE[0], 0 : SHAPE[1]]
    design = np.column_stack([np.ones(xx.size), xx.ravel(), yy.ravel()])
    for (data, header), (data_sub, header_sub) in zip(series.frames, sub.frames, strict=True):
        assert header_sub["SKYSUB"] is True
        assert abs(np.median(data_sub)) < 5 * _sigma(header)
        assert (data_sub < 0).mean() > 0.2  # negative pixels are normal
        sky = (data.astype(np.float64) - data_sub).ravel()
        coef, *_ = np.linalg.lstsq(design, sky, rcond=None)
        assert np.abs(design @ coef - sky).max() < 0.05  # a plane: the smooth sky model
        centre = coef @ [1.0, (SHAPE[1] - 1) / 2, (SHAPE[0] - 1) / 2]
        assert centre == pytest.approx(header["SIMSKY"], rel=1e-3)
        assert header_sub["SATURATE"] < header["SATURATE"]
        assert np.all(data_sub[data >= header["SATURATE"]] >= header_sub["SATURATE"])


def test_star_field(series: SimSeries) -> None:
    assert 250 <= len(series.stars) <= 320  # ~280 for 256x256
    galaxy = series.stars.meta["galaxy"]
    assert galaxy["r_eff"] >= 5
    assert galaxy["flux"] > 0
    big = simulate_series(1, (1024, 1024), n_transients=0, galaxy=False)
    flux = np.asarray(big.stars["flux"])
    assert 1400 < len(flux) < 1600
    assert "galaxy" not in big.stars.meta
    # power-law counts, dN/dF ~ F^-2: N(>F) ~ 1/F over a decade above the faint limit
    f0 = flux.min()
    n2, n20 = (flux > 2 * f0).sum(), (flux > 20 * f0).sum()
    assert n2 == pytest.approx(len(flux) / 2, rel=0.1)
    assert n2 / n20 == pytest.approx(10, rel=0.3)
    # and bright stars that saturate
    data, header = big.frames[0]
    assert (data >= header["SATURATE"]).sum() > 20


def test_write_series(tmp_path, series: SimSeries) -> None:
    paths = write_series(series, tmp_path / "new" / "raw")
    assert [p.name for p in paths] == [f"{n}.fits" for n in series.names]
    with fits.open(paths[2]) as hdul:
        np.testing.assert_array_equal(hdul[0].data, series.frames[2][0])
        assert hdul[0].header["MJD-OBS"] == series.frames[2][1]["MJD-OBS"]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="n_frames"):
        simulate_series(0, SHAPE)
    with pytest.raises(ValueError, match="n_transients=30"):
        simulate_series(2, (128, 128), n_transients=30)
    with pytest.raises(ValueError, match="n_transients=2"):
        simulate_series(2, (64, 64), n_transients=2)


def test_pair() -> None:
    (sci, sh), (tpl, th), truth = simulate_pair(seed=5, transients=3)
    (sci0, _), (tpl0, _), truth0 = simulate_pair(seed=5, transients=0)
    assert sci.shape == tpl.shape == (256, 256)
    assert sci.dtype == tpl.dtype == np.float32
    for key in ("CRVAL1", "CRVAL2", "CRPIX1", "CRPIX2", "CD1_1", "CD1_2", "CD2_1", "CD2_2"):
        assert sh[key] == th[key]
    assert sh["MJD-OBS"] > th["MJD-OBS"]
    assert (sh["SIMFWHM"], th["SIMFWHM"]) == (4.0, 3.0)
    assert len(truth) == 3
    assert len(truth0) == 0
    assert set(truth["frame"]) == {"science"}
    np.testing.assert_array_equal(tpl, tpl0)  # transients are in the science image only
    diff = sci.astype(np.float64) - sci0
    for row in truth:
        ix, iy = round(row["x"]), round(row["y"])
        box = diff[iy - 18 : iy + 19, ix - 18 : ix + 19]
        assert box.sum() == pytest.approx(row["flux"], abs=5 * np.sqrt(row["flux"] / 1.5))
        x, y = WCS(sh).wcs_world2pix(row["ra"], row["dec"], 0)
        assert abs(x - row["x"]) < 0.1
        assert abs(y - row["y"]) < 0.1
    assert np.count_nonzero(diff) < 3 * 37 * 37
    assert truth["peak_snr"].min() < 10
    assert truth["peak_snr"].max() > 50


def test_pair_template_depth_and_sky() -> None:
    gain, rn, sky = 1.5, 5.0, 300.0
    sigma = np.sqrt(sky / gain + (rn / gain) ** 2)

    def corner_std(image: np.ndarray) -> float:
        corner = image[:40, :40].astype(np.float64)  # no stars: n_stars=0
        return float(corner.std())

    (_, _), (t1, _), _ = simulate_pair(seed=2, n_stars=0, transients=0, template_depth=1.0)
    (_, _), (t4, h4), _ = simulate_pair(seed=2, n_stars=0, transients=0, template_depth=4.0)
    assert corner_std(t1) == pytest.approx(sigma, rel=0.1)
    assert corner_std(t4) == pytest.approx(sigma / 2, rel=0.1)
    assert h4["GAIN"] == pytest.approx(4 * gain)
    assert h4["RDNOISE"] == pytest.approx(2 * rn)
    (s, sh), (t, _), _ = simulate_pair(seed=2, n_stars=0, transients=0, sky_subtracted=True)
    assert abs(np.median(s)) < 0.2 * sigma
    assert abs(np.median(t)) < 0.2 * sigma
    assert sh["SATURATE"] == pytest.approx(60000.0 - sky)
