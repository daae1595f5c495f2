"""The photometry stage's parts on small arrays: the native forced PSF fit (fluxes and
errors against the noise), positions, frame times, the residual's PSF, the light-curve
statistics and kinds, the periods."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from astropy.io import fits
from oasis_native.photometry import FLAG_EDGE, FLAG_MASKED, NativePhotometry, forced_psf_fit

from oasis_core.contracts.errors import InputError
from oasis_core.contracts.model import KernelSolution, PsfModel, Residual
from oasis_core.engine import io
from oasis_core.engine.lightcurves import classify, period_search, stetson_j
from oasis_core.engine.photometry import (
    frame_times,
    parse_position,
    read_positions_file,
    residual_psf,
)


def _gauss_psf(sigma: float, half: int = 10) -> np.ndarray:
    y, x = np.mgrid[-half : half + 1, -half : half + 1]
    psf = np.exp(-(x**2 + y**2) / (2 * sigma**2))
    return psf / psf.sum()


def _scene(xy: np.ndarray, flux: np.ndarray, sigma: float, shape=(200, 200)) -> np.ndarray:
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    image = np.zeros(shape)
    for (x, y), f in zip(xy, flux, strict=True):  # the truth, built slowly on purpose
        image += (
            f * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2)) / (2 * np.pi * sigma**2)
        )
    return image


def test_forced_fit_recovers_fluxes_with_honest_errors():
    """Sub-pixel positions (apart), white noise of known sigma: the fluxes are unbiased
    and the pulls (flux - truth) / error have unit scatter (within 10%, 400 pulls)."""
    rng = np.random.default_rng(3)
    sigma_psf, noise = 1.6, 5.0
    gx, gy = np.meshgrid(np.arange(10) * 18.0 + 18, np.arange(10) * 18.0 + 18)
    xy = np.column_stack([gx.ravel(), gy.ravel()]) + rng.uniform(-0.5, 0.5, (100, 2))
    flux = rng.uniform(200, 3000, len(xy))
    clean = _scene(xy, flux, sigma_psf)
    pulls = []
    for _ in range(4):
        data = clean + rng.normal(0, noise, clean.shape)
        fit = forced_psf_fit(
            data,
            np.full(data.shape, noise),
            np.ones(data.shape),
            xy,
            _gauss_psf(sigma_psf),
            fwhm=2.3548 * sigma_psf,
        )
        pulls.append((fit["flux"] - flux) / fit["flux_err"])
    pulls = np.concatenate(pulls)
    assert abs(np.mean(pulls)) < 5 / math.sqrt(len(pulls))
    assert 0.9 < np.std(pulls) < 1.1


def test_forced_fit_flags_masked_and_edge_positions_and_fits_a_local_sky():
    psf = _gauss_psf(1.5)
    xy = np.array([[50.2, 50.7], [1.0, 60.0], [120.0, 120.0]])
    data = _scene(xy, np.array([1000.0, 1000.0, 1000.0]), 1.5, (160, 160)) + 300.0
    weight = np.ones(data.shape)
    weight[120, 120] = 0
    noise = np.ones(data.shape)
    plain = forced_psf_fit(data - 300.0, noise, weight, xy, psf, fwhm=3.5)
    assert plain["flag"].tolist() == [0, FLAG_EDGE, FLAG_MASKED]
    np.testing.assert_allclose(plain["flux"][[0, 2]], 1000.0, rtol=1e-3)
    none = forced_psf_fit(data, noise, weight, np.zeros((0, 2)), psf, fwhm=3.5, background=True)
    assert all(len(v) == 0 for v in none.values())
    sky = forced_psf_fit(data, noise, weight, xy, psf, fwhm=3.5, background=True)
    np.testing.assert_allclose(sky["background"], 300.0, atol=1e-6)
    np.testing.assert_allclose(sky["flux"][0], 1000.0, rtol=1e-3)


def test_native_backend_returns_the_contract_columns_and_scales_errors(tmp_path):
    backend = NativePhotometry()
    rng = np.random.default_rng(0)
    shape = (128, 128)
    # correlated noise the noise image misses: smooth white noise, keep its per-pixel sigma
    from scipy import ndimage

    raw = ndimage.gaussian_filter(rng.normal(0, 1, shape), 1.0)
    data = (raw / raw.std() * 4.0).astype(np.float32)
    residual = Residual(data=data, noise=np.full(shape, 4.0), weight=np.ones(shape))
    options = backend.Options()
    table = backend.photometry(
        residual,
        np.array([[64.0, 64.0]]),
        psf=PsfModel(image=_gauss_psf(1.5), fwhm=3.5),
        options=options,
        workdir=tmp_path,
    )
    assert set(backend.COLUMNS) <= set(table.colnames) and len(table) == 1
    assert table.meta["ERRSCALE"] > 1.5  # the correlations are found and accounted for


def test_residual_psf_is_the_template_psf_convolved_with_the_kernel():
    template_psf = PsfModel(image=_gauss_psf(1.2), fwhm=2.8)
    frame_psf = PsfModel(image=_gauss_psf(1.8) * 3.0, fwhm=4.2)
    kernel = _gauss_psf(1.0, 6) * 1.07  # its sum: the photometric scale
    shape = (32, 32)
    base = {"data": np.zeros(shape), "noise": np.ones(shape), "weight": np.ones(shape)}
    res = Residual(**base, kernel=KernelSolution(image=kernel, direction="template"))
    psf = residual_psf(res, template_psf, frame_psf)
    assert psf.image.sum() == pytest.approx(1.07, rel=1e-4)
    assert psf.image.shape == (21 + 13 - 1,) * 2
    science = Residual(**base, kernel=KernelSolution(image=kernel, direction="science"))
    assert residual_psf(science, template_psf, frame_psf) is template_psf
    bare = residual_psf(Residual(**base), template_psf, frame_psf)  # no kernel: the frame's
    assert bare.image.sum() == pytest.approx(1.0) and bare.fwhm == 4.2


def test_positions_from_pixels_degrees_sexagesimal_and_a_file(tmp_path):
    from astropy.wcs import WCS

    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [150.0, 2.0]
    wcs.wcs.crpix = [51.0, 51.0]
    wcs.wcs.cdelt = [-0.3 / 3600, 0.3 / 3600]
    assert parse_position("12.5, 40px", wcs) == (12.5, 40.0)
    x, y = parse_position("150.0,2.0", wcs)
    assert (x, y) == pytest.approx((50.0, 50.0), abs=1e-6)
    x, y = parse_position("10:00:00,+02:00:00", wcs)
    assert (x, y) == pytest.approx((50.0, 50.0), abs=1e-6)
    assert parse_position("3,4", None) == (3.0, 4.0)  # no WCS: pixels
    with pytest.raises(InputError, match=r"\[photometry\] at: 'nowhere'"):
        parse_position("nowhere", wcs)
    with pytest.raises(InputError, match="no WCS"):
        parse_position("10:00:00,+02:00:00", None)
    f = tmp_path / "at.txt"
    f.write_text("# positions\n150.0 2.0\n12,40px  # a pixel\n\n10:00:00,+02:00:00\n")
    assert read_positions_file(f) == ["150.0,2.0", "12,40px", "10:00:00,+02:00:00"]
    with pytest.raises(InputError, match="at_file"):
        read_positions_file(tmp_path / "missing.txt")


def test_header_times_from_jd_and_hjd_and_barycentric_correction():
    jd = fits.Header({"JD": 2457383.7683333, "EXPTIME": 60.0})
    assert io.header_mjd(jd) == pytest.approx(57383.2683333 + 30 / 86400, abs=1e-7)
    assert io.header_mjd(fits.Header({"HJD": 2457383.77})) == pytest.approx(57383.27)
    header = fits.Header(
        {
            "MJD-OBS": 60000.0,
            "EXPTIME": 0.0,
            "RA": 150.0,
            "DEC": 2.0,
            "OBSGEO-X": 1814303.745,  # Cerro Tololo, metres
            "OBSGEO-Y": -5214365.744,
            "OBSGEO-Z": -3187340.566,
        }
    )
    plain, scale = frame_times({"a": header})
    assert (plain["a"], scale) == (60000.0, "utc")
    bary, scale = frame_times({"a": header}, barycentric=True)
    assert scale == "tdb-barycentric"
    from astropy import units as u
    from astropy.coordinates import EarthLocation, SkyCoord
    from astropy.time import Time

    t = Time(
        60000.0,
        format="mjd",
        scale="utc",
        location=EarthLocation.from_geocentric(1814303.745, -5214365.744, -3187340.566, unit=u.m),
    )
    expected = (t.tdb + t.light_travel_time(SkyCoord(150.0, 2.0, unit="deg"))).mjd
    assert bary["a"] == pytest.approx(expected, abs=1e-8)
    assert abs(bary["a"] - 60000.0) * 86400 < 500 + 70  # light across 1 AU, TDB - UTC
    no_site, scale = frame_times({"a": fits.Header({"MJD-OBS": 60000.0})}, barycentric=True)
    assert (no_site["a"], scale) == (60000.0, "utc")


def test_light_curve_statistics_kinds_and_period():
    rng = np.random.default_rng(5)
    t = np.sort(rng.uniform(0, 60, 50))
    err = np.full(len(t), 20.0)
    flat = rng.normal(0, 20.0, len(t))
    assert abs(stetson_j(flat, err)) < 0.3
    kw = {"ref_flux": 3000.0, "ref_err": 30.0}
    assert classify(t, flat, err, chi2_dof=1.0, periodic=False, **kw) == "constant"
    sine = 800 * np.sin(2 * np.pi * t / 2.37) - 600 + flat
    period, fap = period_search(t, sine, err, period_min=0.5)
    assert period == pytest.approx(2.37, rel=0.005) and fap < 1e-6
    assert classify(t, sine, err, chi2_dof=900.0, periodic=True, **kw) == "variable"
    fading = 2000 * np.exp(-t / 15) - 900 + flat
    assert classify(t, fading, err, chi2_dof=900.0, periodic=False, **kw) == "fading"
    rising = np.where(t > 40, 1500.0, 0.0) + flat
    assert (
        classify(t, rising, err, ref_flux=10.0, ref_err=30.0, chi2_dof=300.0, periodic=False)
        == "transient"
    )
    # on during two template nights: the template holds a little of it, so the other
    # frames dip a few sigma (2 % of its peak) below it; still a transient
    dipped = np.where(t > 40, 20_000.0, -400.0) + flat
    assert (
        classify(t, dipped, err, ref_flux=10.0, ref_err=30.0, chi2_dof=3000.0, periodic=False)
        == "transient"
    )
    both = np.where(t > 40, 20_000.0, -4000.0) + flat  # dips by a fifth: varies both ways
    kinds = classify(t, both, err, ref_flux=10.0, ref_err=30.0, chi2_dof=3e3, periodic=False)
    assert kinds == "variable"
    _, noise_fap = period_search(t, flat, err, period_min=0.5)
    assert noise_fap > 0.01


def test_real_decam_headers_give_every_frame_one_time(shared_data):
    """The shared DECam cutouts' headers were copied from one frame: all ten give MJD
    58334.39134 (start), so the series has no time axis and the stage says so; frames of
    different times, or some without one, are not reported."""
    from oasis_core.engine.lightcurves import one_time
    from oasis_core.engine.photometry import frame_times

    paths = sorted((shared_data / "decam_n6").glob("*.fits"))
    times, _ = frame_times({p.stem: fits.getheader(p) for p in paths})
    assert len(times) == 10
    assert one_time(times) == pytest.approx(58334.39133794 + 330 / 2 / 86400, abs=1e-7)
    assert one_time({**times, "late": 58335.0}) is None
    assert one_time({**times, "none": None}) is None
    assert one_time({"alone": 58334.0}) is None


def test_real_isis_headers_give_no_time_and_the_stage_says_so(shared_data):
    """ISIS's example frames have bare headers (no MJD-OBS, DATE-OBS, JD or HJD): their
    light curves are in frame order, which the log said nothing of (decam_n6's headers,
    all of one time, were reported)."""
    from oasis_core.engine.lightcurves import time_axis_problem
    from oasis_core.engine.photometry import frame_times

    paths = sorted((shared_data / "isis_example").glob("*.fits"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the files lack their last block's padding
        times, _ = frame_times({p.stem: fits.getheader(p) for p in paths})
    assert len(times) == 10 and set(times.values()) == {None}
    assert time_axis_problem(times).startswith("no frame's header gives a time")
    some = {**dict.fromkeys(("a", "b"), 58334.1), "c": None}
    assert time_axis_problem(some).startswith("1 of 3 frames' headers give no time")
    assert "e.g. c" in time_axis_problem(some)
    assert time_axis_problem({"a": 58334.1, "b": 58334.2}) is None
    decam = sorted((shared_data / "decam_n6").glob("*.fits"))
    same, _ = frame_times({p.stem: fits.getheader(p) for p in decam})
    assert time_axis_problem(same).startswith("every frame's header gives the same time")
