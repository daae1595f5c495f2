"""Tests of the ``zogy`` subtract backend (ZOGY proper image subtraction) and of the native
extract backend's detection on its score image S_corr."""

from __future__ import annotations

import math
import warnings

import attrs
import numpy as np
import pytest
from oasis_native.extract import NativeExtract, NativeExtractOptions
from oasis_native.mask import NativeMask, NativeMaskOptions
from oasis_native.psf import NativePsf, NativePsfOptions
from oasis_native.sim import simulate_pair
from oasis_native.zogy import NativeZogy, ZogyOptions

from oasis_core.contracts.backends import SubtractBackend
from oasis_core.contracts.errors import StageError
from oasis_core.contracts.model import Frame, PsfModel, Residual, Template, readonly
from oasis_core.engine.quality import normalized_noise

SHAPE = (256, 256)
BACKEND = NativeZogy()


def _frame(data, header, name, tmp_path, cls=Frame, scale=1.0):
    """A simulated image as the pipeline hands it to subtract: masked, PSF measured.

    ``scale`` multiplies the data (a different photometric zero point), with the gain
    and saturation that go with it.
    """
    frame = cls(
        data=readonly(np.array(data) * np.float32(scale)),
        header=header,
        name=name,
        gain=header["GAIN"] / scale,
        readnoise=header["RDNOISE"],
        saturation=header["SATURATE"] * scale,
    )
    frame = NativeMask().mask(frame, options=NativeMaskOptions(), workdir=tmp_path)
    frame = NativePsf().psf(frame, options=NativePsfOptions(), workdir=tmp_path)
    for a in (frame.data, frame.weight):
        readonly(a)
    return frame


def _pair(tmp_path, *, seed=1, fwhm_science=4.0, fwhm_template=3.0, transients=3, scale=1.0):
    (sci, sh), (tpl, th), truth = simulate_pair(
        SHAPE,
        seed=seed,
        fwhm_science=fwhm_science,
        fwhm_template=fwhm_template,
        transients=transients,
    )
    science = _frame(sci, sh, "science", tmp_path, scale=scale)
    template = _frame(tpl, th, "template", tmp_path, cls=Template)
    return science, template, truth


def _subtract(science, template, tmp_path, **options) -> Residual:
    return BACKEND.subtract(science, template, options=ZogyOptions(**options), workdir=tmp_path)


def _robust_std(values):
    values = np.asarray(values, np.float64)
    return 1.4826 * float(np.median(np.abs(values - np.median(values))))


def _aperture(residual, x, y, radius):
    """Aperture flux and error on the residual with a local background annulus."""
    import sep

    data = np.ascontiguousarray(residual.data, dtype=np.float32)
    noise = np.ascontiguousarray(residual.noise, dtype=np.float32)
    flux, err, _ = sep.sum_circle(
        data, [x], [y], radius, err=noise, bkgann=(radius + 2.0, 1.5 * radius + 4.0)
    )
    return float(flux[0]), float(err[0])


def _box_max(image, x, y, half=2):
    iy, ix = round(y), round(x)
    return float(image[iy - half : iy + half + 1, ix - half : ix + half + 1].max())


@pytest.fixture(scope="module")
def null_pair(tmp_path_factory):
    return _pair(tmp_path_factory.mktemp("zogy_null"), transients=0)


@pytest.fixture(scope="module")
def transient_pair(tmp_path_factory):
    return _pair(tmp_path_factory.mktemp("zogy_tr"), transients=3)


# --------------------------------------------------------------------------- contract


def test_registered_with_documented_toml_options(plugin_manager):
    backends = [b for group in plugin_manager.hook.oasis_subtract_backends() for b in group]
    zogy = [b for b in backends if b.name == "zogy"]
    assert len(zogy) == 1
    assert isinstance(zogy[0], SubtractBackend)
    assert zogy[0].Options is ZogyOptions
    for field in attrs.fields(ZogyOptions):
        assert field.metadata["help"]
        assert isinstance(field.default, (bool, int, float, str)), field.name
    with pytest.raises(ValueError, match="background"):
        ZogyOptions(background="mesh")


def test_null_pair_is_white_noise_of_unit_score(null_pair, tmp_path):
    science, template, _ = null_pair
    before = (science.data.copy(), template.data.copy(), science.weight.copy())
    res = _subtract(science, template, tmp_path)
    np.testing.assert_array_equal(science.data, before[0])
    np.testing.assert_array_equal(template.data, before[1])
    np.testing.assert_array_equal(science.weight, before[2])

    score = res.extra["score"]
    assert res.data.dtype == res.noise.dtype == res.weight.dtype == score.dtype == np.float32
    assert score.shape == res.data.shape == SHAPE
    good = res.weight > 0
    assert 0.8 < good.mean() < 1.0  # the edges are lost, most of the frame is kept
    assert np.all(np.isfinite(res.data)) and np.all(res.noise > 0)
    assert res.weight.min() >= 0.0 and res.weight.max() <= 1.0
    # D is white noise of unit variance: data / noise has a std of 1 away from sources,
    # within 5 standard errors of a robust std of N pixels (1.17 / sqrt(N)), for the
    # residual's and for the frames' sky noise the noise image rests on
    tolerance = 5 * math.sqrt(2) * 1.17 / math.sqrt(good.sum())
    assert abs(res.meta["nnoise"] - 1) < tolerance
    assert abs(normalized_noise(res.data, res.noise, res.weight) - 1) < tolerance
    assert 0.8 < _robust_std(score[good]) < 1.25
    assert 0.8 < res.meta["score_std"] < 1.25
    # no 6-sigma peak anywhere: the stars and the galaxy subtract
    assert np.abs(score[good]).max() < 6.0
    assert res.q > 0.9
    assert res.meta["flux_ratio"] == pytest.approx(1.0, abs=0.03)
    assert res.meta["ratio_source"] == "stars" and res.meta["ratio_stars"] >= 10
    assert min(science.fwhm, template.fwhm) < res.meta["fwhm"] < max(science.fwhm, template.fwhm)
    assert res.params == attrs.asdict(ZogyOptions())
    for key in ("ZOGYFD", "ZOGYBETA", "ZOGYFWHM"):
        assert key in res.header
    assert res.header["ZOGYBETA"] == pytest.approx(res.meta["flux_ratio"])
    assert res.header["OBJECT"] == science.header["OBJECT"]
    # the frame noise: sqrt(sigma_n**2 + beta**2 sigma_r**2) on the sky
    beta = res.meta["flux_ratio"]
    sky = math.hypot(res.meta["sigma_science"], beta * res.meta["sigma_template"])
    assert float(np.min(res.noise)) == pytest.approx(sky, rel=0.02)
    assert res.meta["fd"] == pytest.approx(beta / sky, rel=1e-6)


@pytest.mark.parametrize("sharper", ["template", "science"])
def test_transients_recovered_in_flux_and_score(tmp_path, sharper):
    fwhm_s, fwhm_t = (4.0, 3.0) if sharper == "template" else (3.0, 4.0)
    science, template, truth = _pair(
        tmp_path, seed=2, fwhm_science=fwhm_s, fwhm_template=fwhm_t, transients=3
    )
    res = _subtract(science, template, tmp_path)
    score, fwhm = res.extra["score"], res.meta["fwhm"]
    assert 0.8 < res.meta["nnoise"] < 1.2
    brightest = int(np.argmax(truth["flux"]))
    for i, row in enumerate(truth):
        x, y, flux = float(row["x"]), float(row["y"]), float(row["flux"])
        peak = _box_max(score, x, y)
        if row["peak_snr"] >= 20:
            assert peak > 5.0
        assert peak > 3.0
        # the residual is in science ADU: a large aperture gives the transient's flux
        measured, err = _aperture(res, x, y, 4.0 * fwhm)
        tolerance = 0.03 * flux if i == brightest else max(0.03 * flux, 3.0 * err)
        assert measured == pytest.approx(flux, abs=tolerance)
    # sky-limited, the score (a matched filter) beats an aperture's S/N
    faintest = int(np.argmin(truth["flux"]))
    x, y = truth["x"][faintest], truth["y"][faintest]
    flux, err = _aperture(res, x, y, 1.5 * fwhm)
    assert _box_max(score, x, y) > flux / err


def test_score_is_in_sigmas_on_pure_noise(tmp_path):
    """Gaussian PSFs and sky noise only: a source of predicted significance 8 peaks at ~8."""
    rng = np.random.default_rng(11)
    sigma, psf_sigma, ny = 10.0, 1.6, 256
    half = 10
    g = np.arange(-half, half + 1)
    psf = np.exp(-(g[:, None] ** 2 + g[None, :] ** 2) / (2 * psf_sigma**2))
    psf /= psf.sum()
    # equal PSFs and noise: S/N = A sqrt(sum P**2) / (sigma sqrt(2))
    target = 8.0
    amp = target * sigma * math.sqrt(2.0) / math.sqrt(float(np.sum(psf**2)))
    xy = [(x + 0.3, y - 0.2) for y in range(30, 230, 40) for x in range(30, 230, 40)]
    sci = rng.normal(0.0, sigma, (ny, ny))
    tpl = rng.normal(0.0, sigma, (ny, ny))
    for x, y in xy:
        ix, iy = round(x), round(y)
        dx, dy = x - ix, y - iy
        stamp = np.exp(-((g[None, :] - dx) ** 2 + (g[:, None] - dy) ** 2) / (2 * psf_sigma**2))
        sci[iy - half : iy + half + 1, ix - half : ix + half + 1] += amp * stamp / stamp.sum()
    model = PsfModel(image=psf, fwhm=2.3548 * psf_sigma, model="gaussian")
    fwhm = 2.3548 * psf_sigma
    science = Frame(data=readonly(sci.astype(np.float32)), name="s", psf=model, fwhm=fwhm)
    template = Template(data=readonly(tpl.astype(np.float32)), name="t", psf=model, fwhm=fwhm)
    res = _subtract(science, template, tmp_path)
    assert res.meta["ratio_source"] == "default" and res.meta["flux_ratio"] == 1.0
    score = res.extra["score"]
    at = np.array([score[round(y), round(x)] for x, y in xy])
    # each value is target +- 1 (plus a little for the sub-pixel offset)
    assert np.mean(at) == pytest.approx(target, abs=4.0 / math.sqrt(len(xy)) + 0.3)
    assert res.meta["fwhm"] == pytest.approx(fwhm, rel=0.05)
    fluxes = np.array([_aperture(res, x, y, 4.0 * fwhm)[0] for x, y in xy])
    err = _aperture(res, *xy[0], 4.0 * fwhm)[1]
    assert np.mean(fluxes) == pytest.approx(amp, abs=3.0 * err / math.sqrt(len(xy)))
    assert 0.9 < _robust_std(res.data[res.weight > 0] / res.noise[res.weight > 0]) < 1.1


def test_flux_ratio_measured_or_fixed(tmp_path):
    science, template, truth = _pair(tmp_path, seed=3, scale=1.3)
    res = _subtract(science, template, tmp_path)
    assert res.meta["flux_ratio"] == pytest.approx(1.3, rel=0.02)
    assert 0.8 < res.meta["nnoise"] < 1.2
    # the residual stays in the science frame's system: fluxes are 1.3 x the truth
    brightest = int(np.argmax(truth["flux"]))
    x, y, flux = truth["x"][brightest], truth["y"][brightest], truth["flux"][brightest]
    measured, _ = _aperture(res, x, y, 4.0 * res.meta["fwhm"])
    assert measured == pytest.approx(1.3 * flux, rel=0.03)

    fixed = _subtract(science, template, tmp_path, flux_ratio=1.25)
    assert fixed.meta["flux_ratio"] == 1.25
    assert fixed.meta["ratio_source"] == "option"
    assert fixed.header["ZOGYBETA"] == 1.25
    # the wrong ratio leaves the stars in
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]]
    good = res.weight > 0
    for row in truth:  # away from the transients
        good &= np.hypot(xx - row["x"], yy - row["y"]) > 15
    assert np.abs(res.extra["score"][good]).max() < 6.0
    assert np.abs(fixed.extra["score"][good]).max() > 10.0


def test_template_offset_is_measured_and_removed(null_pair, tmp_path):
    from scipy import fft as sfft

    science, template, _ = null_pair
    # move the template content by (+0.25, -0.15) px (exact Fourier shift)
    ny, nx = template.shape
    fy, fx = sfft.fftfreq(ny)[:, None], sfft.rfftfreq(nx)[None, :]
    ramp = np.exp(-2j * np.pi * (fx * 0.25 + fy * -0.15))
    sky = float(np.median(template.data))
    moved = sfft.irfft2(sfft.rfft2(template.data - sky) * ramp, s=(ny, nx)) + sky
    shifted = attrs.evolve(template, data=readonly(moved.astype(np.float32)))
    res = _subtract(science, shifted, tmp_path)
    # science - template offset: -(0.25, -0.15)
    assert res.meta["shift_x"] == pytest.approx(-0.25, abs=0.02)
    assert res.meta["shift_y"] == pytest.approx(0.15, abs=0.02)
    assert res.header["ZOGYDX"] == pytest.approx(res.meta["shift_x"])
    good = res.weight > 0
    assert np.abs(res.extra["score"][good]).max() < 6.0
    raw = _subtract(science, shifted, tmp_path, fit_shift=False)
    assert raw.meta["shift_x"] == 0.0
    assert np.abs(raw.extra["score"][good]).max() > 10.0  # dipoles at every bright star
    # the astrometric term (measured: no scatter here) damps them instead
    damped = _subtract(science, shifted, tmp_path, fit_shift=False, astrometric_sigma=0.2)
    assert damped.meta["astrometric_sigma"] == 0.2
    assert np.abs(damped.extra["score"][good]).max() < np.abs(raw.extra["score"][good]).max()


def test_masked_pixels_get_weight_zero_grown_by_the_psf(null_pair, tmp_path):
    science, template, _ = null_pair
    weight = np.array(science.weight)
    weight[100:110, 60:70] = 0.0
    data = np.array(science.data)
    data[100:110, 60:70] = np.nan  # a masked pixel may hold anything
    masked = attrs.evolve(science, data=readonly(data), weight=readonly(weight))
    res = _subtract(masked, template, tmp_path)
    grow = math.ceil(ZogyOptions().mask_grow * max(science.fwhm, template.fwhm))
    assert np.all(res.weight[100 - grow + 1 : 110 + grow - 1, 60:70] == 0)
    assert np.all(res.weight[100:110, 60 - grow + 1 : 70 + grow - 1] == 0)
    assert res.weight[100 + 10 + grow + 2, 65] > 0
    assert np.all(np.isfinite(res.data)) and np.all(np.isfinite(res.extra["score"]))
    good = res.weight > 0
    assert np.abs(res.extra["score"][good]).max() < 6.0
    # the frame edges are lost within mask_grow FWHM too
    assert np.all(res.weight[:grow] == 0) and np.all(res.weight[:, -grow:] == 0)


def test_psf_from_fwhm_when_no_model_and_errors(null_pair, tmp_path):
    science, template, _ = null_pair
    no_psf = attrs.evolve(science, psf=None)
    res = _subtract(no_psf, template, tmp_path)
    assert 0.8 < res.meta["nnoise"] < 1.2
    small = Template(data=np.zeros((32, 32), np.float32), name="tiny")
    with pytest.raises(StageError, match="'tiny'"):
        _subtract(science, small, tmp_path)
    blank = attrs.evolve(template, weight=np.zeros(SHAPE, np.float32), name="blank")
    with pytest.raises(StageError, match="'blank'"):
        _subtract(science, blank, tmp_path)


# --------------------------------------------------------------------------- few stars


def _cutout(stars, transient, *, fwhm, seed, shape=(63, 63), sky=100.0, sigma=5.0):
    """A bare 63x63 frame: Moffat (beta 3) stars ``(x, y, peak S/N)`` plus ``transient``
    (the same, or None), sky noise only, no header."""
    rng = np.random.default_rng(seed)
    alpha = fwhm / (2.0 * math.sqrt(2.0 ** (1.0 / 3.0) - 1.0))
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    image = np.full(shape, sky)
    for x, y, snr in [*stars, *([transient] if transient else [])]:
        image += sigma * snr * (1.0 + ((xx - x) ** 2 + (yy - y) ** 2) / alpha**2) ** -3.0
    return (image + rng.normal(0.0, sigma, shape)).astype(np.float32)


def _moffat_flux(snr, fwhm, sigma=5.0):
    alpha = fwhm / (2.0 * math.sqrt(2.0 ** (1.0 / 3.0) - 1.0))
    return sigma * snr * math.pi * alpha**2 / 2.0  # total of a beta-3 Moffat of that peak


@pytest.mark.parametrize("nstars", [0, 1, 2])
def test_cutout_with_few_stars_runs_and_records_its_psf_sources(tmp_path, nstars):
    """63x63 cutouts, no header: the PSFs come from whatever point sources there are (the
    transient itself in the science frame when it is the only one), a frame with none gets
    the other's FWHM; the residual says which, and the transient keeps its flux."""
    stars = [(14.3, 45.6, 60.0), (48.7, 15.2, 90.0)][:nstars]
    transient = (31.4, 30.8, 80.0)
    sci = Frame(data=_cutout(stars, transient, fwhm=3.6, seed=nstars), name="s")
    tpl = Template(data=_cutout(stars, None, fwhm=3.0, seed=10 + nstars), name="t")
    res = _subtract(sci, tpl, tmp_path)
    meta = res.meta
    assert meta["psf_source_science"].startswith("fit (")
    assert res.header["ZOGYPSFS"] == meta["psf_source_science"]
    assert res.header["ZOGYPSFT"] == meta["psf_source_template"]
    assert meta["choice_psf"].startswith("science fit (")
    if nstars == 0:
        assert meta["psf_source_template"] == "fwhm-moffat (science FWHM)"
        assert "template PSF: a Moffat of the science's FWHM" in meta["fallback"]
        assert "no source detected" in meta["fallback"]
    else:
        assert meta["psf_source_template"].startswith("fit (")
        # the PSFs matched on the common stars, or their own kept when those give the
        # better Q: either way the comparison is recorded
        if meta["psf_match"].startswith("kept"):
            assert meta["psf_match_q_own"] >= meta["psf_match_q"]
        else:
            assert meta["psf_source_template"].endswith(", matched")
            assert meta["psf_match"].startswith("Moffats matched on")
        assert "fewer than min_stars 3" in meta["fallback"]  # flagged, not refused
    x, y, snr = transient
    yy, xx = np.mgrid[:63, :63]
    r = np.hypot(xx - x, yy - y)
    local = np.median(res.data[(r > 12) & (r < 20) & (res.weight > 0)])
    flux = float(np.sum(res.data[r < 3.0 * 3.6] - local))
    assert flux == pytest.approx(_moffat_flux(snr, 3.6), rel=0.1)
    assert _box_max(res.extra["score"], x, y) > 10.0
    # P_D, the PSF of the difference, comes with the residual
    assert res.psf.image.sum() == pytest.approx(1.0, rel=1e-5)
    assert res.psf.fwhm == pytest.approx(meta["fwhm"])


def test_no_source_in_either_frame(tmp_path):
    """Pure sky: with a FWHM (as a header gives) ZOGY runs on Moffats of it, recorded; with
    nothing at all it says why for both frames."""
    sci = Frame(data=_cutout([], None, fwhm=3.0, seed=1), name="s", fwhm=3.2)
    tpl = Template(data=_cutout([], None, fwhm=3.0, seed=2), name="t", fwhm=3.0)
    res = _subtract(sci, tpl, tmp_path)
    assert res.meta["psf_source_science"] == "fwhm-moffat (frame FWHM)"
    assert res.meta["psf_match"].startswith("kept: no star")
    assert 0.8 < res.meta["nnoise"] < 1.2
    with pytest.raises(StageError, match=r"no PSF for science 's'.*nor template 't'.*FWHM"):
        _subtract(attrs.evolve(sci, fwhm=None), attrs.evolve(tpl, fwhm=None), tmp_path)


def test_psf_match_repairs_a_wrong_width_ratio(null_pair, tmp_path):
    """A template PSF 25% too wide leaves every star in D; matched on the stars, the pair
    subtracts as well as with the measured PSFs. Models given without a star count are
    trusted (auto: not matched)."""
    from oasis_native.psf import moffat_profile

    science, template, _ = null_pair
    good = _subtract(science, template, tmp_path)
    assert good.meta["psf_match"] == "off"  # both PSFs from many stars
    fwhm = 1.25 * template.fwhm
    alpha = fwhm / (2.0 * math.sqrt(2.0 ** (1.0 / 3.0) - 1.0))
    g = np.arange(-20, 21)
    image = moffat_profile(g[:, None] ** 2 + g[None, :] ** 2, alpha, 3.0)
    wide = attrs.evolve(template, psf=PsfModel(image=image / image.sum(), fwhm=fwhm), fwhm=fwhm)
    bad = _subtract(science, wide, tmp_path)
    assert bad.meta["psf_match"] == "off"
    good_pix = good.weight > 0
    assert np.abs(good.extra["score"][good_pix]).max() < 6.0
    assert np.abs(bad.extra["score"][good_pix]).max() > 10.0  # every bright star is left
    fixed = _subtract(science, wide, tmp_path, psf_match="always")
    assert fixed.meta["psf_match"].startswith("Moffats matched on 25 template stars")
    assert np.abs(fixed.extra["score"][good_pix]).max() < 6.0
    # the template's PSF (given without a star count: the less trusted) moves back to the
    # width measured on its stars; the science's (27 stars) stays
    assert fixed.meta["fwhm_science"] == pytest.approx(science.fwhm)
    assert fixed.meta["fwhm_template"] == pytest.approx(template.fwhm, rel=0.03)
    assert 2.0 < fixed.meta["psf_beta_matched"] < 5.0  # the simulation's 3
    assert fixed.q == pytest.approx(good.q, abs=0.005)
    assert fixed.header["ZOGYPMAT"] == fixed.meta["psf_match"]


# --------------------------------------------------------------------------- extraction


def test_extract_detects_on_the_score(transient_pair, tmp_path):
    from oasis_core.engine import io

    science, template, truth = transient_pair
    res = _subtract(science, template, tmp_path)
    path = tmp_path / "r.fits"
    io.write_residual(path, res)
    for residual in (res, io.read_residual(path)):  # the score survives the round trip
        table = NativeExtract().extract(
            residual, options=NativeExtractOptions(detect_on="auto"), workdir=tmp_path
        )
        assert table.meta["detect_on"] == "score"
        assert len(table) == len(truth)  # the transients and nothing else
        d = np.hypot(
            np.asarray(table["x"])[None] - np.asarray(truth["x"])[:, None],
            np.asarray(table["y"])[None] - np.asarray(truth["y"])[:, None],
        )
        assert np.all(d.min(axis=1) < 1.0)
        assert np.all(table["sign"] == 1) and np.all(table["flux"] > 0)
        # snr is the S_corr peak; flux and its error are the residual's aperture sums
        j = np.argmin(d, axis=1)
        for i, row in enumerate(truth):
            assert table["snr"][j[i]] == pytest.approx(
                _box_max(res.extra["score"], row["x"], row["y"]), rel=0.05
            )
        assert np.all(table["flux_err"] > 0)
    # the same residual as read back (the round trip does not keep P_D, ``res.psf``, which
    # would correct the apertures)
    plain = NativeExtract().extract(
        residual, options=NativeExtractOptions(detect_on="residual"), workdir=tmp_path
    )
    assert plain.meta["detect_on"] == "residual"
    np.testing.assert_allclose(
        np.sort(plain["flux"]), np.sort(table["flux"]), rtol=0.02, atol=3 * table["flux_err"].max()
    )
    no_score = attrs.evolve(res, extra={})
    auto = NativeExtract().extract(no_score, options=NativeExtractOptions(), workdir=tmp_path)
    assert auto.meta["detect_on"] == "residual"
    with pytest.raises(StageError, match="no score image"):
        NativeExtract().extract(
            no_score, options=NativeExtractOptions(detect_on="score"), workdir=tmp_path
        )


# --------------------------------------------------------------------------- real data


def test_properimage_null_pair(shared_data, tmp_path):
    """Two exposures of one field at the same seeing: nothing real to find.

    The pair carries a small registration error (about 0.09 px, and 0.03 px of scatter
    across the field) that the shift fit and the measured astrometric term absorb.
    """
    from oasis_core.engine.io import read_frame

    folder = shared_data / "properimage_null"
    frames = []
    for i in (4, 5):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # no GAIN / RDNOISE in these headers
            frame = read_frame(folder / f"aligned_eso085-030-00{i}.fit", warn=False)
        frame = NativeMask().mask(frame, options=NativeMaskOptions(), workdir=tmp_path)
        frame = NativePsf().psf(frame, options=NativePsfOptions(), workdir=tmp_path)
        frames.append(frame)
    science, tpl = frames
    template = Template(**{f.name: getattr(tpl, f.name) for f in attrs.fields(Frame)})
    for options in ({}, {"astrometric_sigma": -1.0}):
        res = _subtract(science, template, tmp_path, **options)
        good = res.weight > 0
        assert good.mean() > 0.8
        assert 0.8 < float(np.std(res.extra["score"][good])) < 1.3
        assert 0.8 < res.meta["nnoise"] < 1.2
        assert res.meta["flux_ratio"] == pytest.approx(1.0, abs=0.05)
    assert 0.0 < res.meta["astrometric_sigma"] < 0.1
    table = NativeExtract().extract(res, options=NativeExtractOptions(), workdir=tmp_path)
    assert table.meta["detect_on"] == "score"
    assert np.count_nonzero(table["snr"] > 6.0) <= 3


def test_frames_with_only_a_fwhm_and_nothing_written(tmp_path):
    """Moffat PSFs from the FWHM; the backend writes nothing: the workdir stays empty."""
    (sci, sh), (tpl, th), _ = simulate_pair((128, 128), seed=4, transients=1)
    science = Frame(data=sci, header=sh, name="s", gain=sh["GAIN"], fwhm=4.0)
    template = Template(data=tpl, header=th, name="t", gain=th["GAIN"], fwhm=3.0)
    work = tmp_path / "work"
    work.mkdir()
    res = BACKEND.subtract(science, template, options=ZogyOptions(), workdir=work)
    assert list(work.iterdir()) == []
    assert isinstance(res, Residual)
    assert res.name == "s" and res.science == "s" and res.template == "t"
