"""The two backends with the real SExtractor and PSFEx: simulated frames and residuals, the
DECam and NIRCam data, the user's files, corrupt inputs."""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import pytest
from astropy.io import fits
from oasis_native.psf import NativePsf, NativePsfOptions
from oasis_native.sim import SimSeries, simulate_series
from oasis_sextractor.extract import SextractorExtract, SextractorExtractOptions
from oasis_sextractor.psf import PsfexOptions, PsfexPsf

from oasis_core.contracts.errors import StageError
from oasis_core.contracts.model import Frame, PsfModel, Residual, readonly
from oasis_core.engine.io import read_frame

from .test_helpers import gaussian_stamp

SEX = shutil.which("source-extractor") or shutil.which("sex")
needs_sex = pytest.mark.skipif(SEX is None, reason="SExtractor (source-extractor) not on PATH")
needs_both = pytest.mark.skipif(
    SEX is None or shutil.which("psfex") is None,
    reason="SExtractor (source-extractor) or PSFEx (psfex) not on PATH",
)

SIGMA = 1.5  # PSF sigma of the residual tests, px
FWHM = 2.3548 * SIGMA


def _sim_frame(data: np.ndarray, header: fits.Header, name: str) -> Frame:
    frame = Frame(
        data=readonly(np.array(data)),
        header=header,
        name=name,
        gain=header["GAIN"],
        readnoise=header["RDNOISE"],
        saturation=header["SATURATE"],
    )
    readonly(frame.weight)
    return frame


@pytest.fixture(scope="module")
def series() -> SimSeries:
    return simulate_series(2, (256, 256), seed=31, n_transients=0)


@pytest.fixture(scope="module")
def sim_psf(series, tmp_path_factory) -> Frame:
    """The psfex backend's result on the first simulated frame (its workdir kept)."""
    data, header = series.frames[0]
    frame = _sim_frame(data, header, series.names[0])
    workdir = tmp_path_factory.mktemp("psfex_sim")
    return PsfexPsf().psf(frame, options=PsfexOptions(), workdir=workdir)


# ------------------------------------------------------------------------ psfex


@needs_both
def test_psfex_recovers_the_simulated_fwhm(series, sim_psf, tmp_path):
    for i, (data, header) in enumerate(series.frames):
        out = (
            sim_psf
            if i == 0
            else PsfexPsf().psf(
                _sim_frame(data, header, series.names[i]), options=PsfexOptions(), workdir=tmp_path
            )
        )
        assert out.fwhm == pytest.approx(header["SIMFWHM"], rel=0.1)
        assert out.psf.fwhm == out.fwhm and out.psf.model == "psfex"
        assert out.psf.nstars >= 10
        # background and noise with the native backend's meaning (its test's bounds)
        gain = header["GAIN"]
        sigma = np.sqrt(header["SIMSKY"] / gain + (header["RDNOISE"] / gain) ** 2)
        assert 0.97 * sigma < out.noise < 1.25 * sigma
        assert out.background == pytest.approx(header["SIMSKY"], abs=3 * sigma)
        assert out.snr > 10
        image = out.psf.image
        assert image.shape[0] == image.shape[1] and image.shape[0] % 2 == 1
        assert image.sum() == pytest.approx(1.0, rel=1e-5)
        centre = image.shape[0] // 2
        assert np.unravel_index(np.argmax(image), image.shape) == (centre, centre)
        cat, psf_file = out.psf.files
        assert (cat.name, psf_file.name) == ("frame.cat", "frame.psf")
        assert cat.is_file() and psf_file.is_file()
        assert fits.getheader(psf_file, "PSF_DATA")["ACCEPTED"] == out.psf.nstars


@needs_both
def test_psfex_on_a_sky_subtracted_frame(tmp_path):
    series = simulate_series(1, (256, 256), seed=8, n_transients=0, sky_subtracted=True)
    data, header = series.frames[0]
    assert (data < 0).mean() > 0.3
    out = PsfexPsf().psf(
        _sim_frame(data, header, "skysub"), options=PsfexOptions(), workdir=tmp_path
    )
    assert out.fwhm == pytest.approx(header["SIMFWHM"], rel=0.1)
    assert abs(out.background) < out.noise


@needs_both
@pytest.mark.parametrize("name", ["DEC-OBS04a", "DEC-OBS18c"])
def test_psfex_on_decam_cutouts_agrees_with_native(name, tmp_path, shared_data):
    """Small sky-subtracted cutouts with few stars and cosmic rays."""
    frame = read_frame(shared_data / "decam_n6" / f"{name}.mini.fits", warn=False)
    readonly(frame.data)
    out = PsfexPsf().psf(frame, options=PsfexOptions(), workdir=tmp_path)
    native = NativePsf().psf(frame, options=NativePsfOptions(), workdir=tmp_path)
    assert 2.5 < out.fwhm < 7.0
    assert out.fwhm == pytest.approx(native.fwhm, rel=0.1)
    assert out.psf.nstars >= 3
    assert abs(out.background) < out.noise  # sky-subtracted
    assert out.noise == pytest.approx(native.noise, rel=0.05)


@needs_both
def test_psfex_on_nircam_finds_the_stars_among_galaxies(tmp_path, shared_data):
    """JWST NIRCam F200W i2d stamps (data in the SCI extension, NaN borders): a deep field
    where most compact sources are galaxies. F200W's PSF is ~0.07" = 2.3 px at 0.031"/px."""
    fwhms = []
    for path in sorted((shared_data / "jwst_nircam").glob("*_stamp.fits")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            frame = read_frame(path, warn=False)
        out = PsfexPsf().psf(frame, options=PsfexOptions(), workdir=tmp_path / path.stem[:8])
        assert 1.8 < out.fwhm < 3.2
        assert out.psf.nstars >= 3
        fwhms.append(out.fwhm)
    assert fwhms[0] == pytest.approx(fwhms[1], rel=0.1)  # same filter, same camera


@needs_both
def test_psfex_too_few_stars_is_a_one_line_error(tmp_path):
    rng = np.random.default_rng(4)
    data = rng.normal(0.0, 5.0, (128, 128)).astype(np.float32)
    for x, y in ((40, 40), (90, 80)):
        data[y - 8 : y + 9, x - 8 : x + 9] += 5e4 * gaussian_stamp(8, 1.6)
    frame = Frame(data=readonly(data), name="two", gain=2.0, saturation=1e6)
    with pytest.raises(StageError) as err:
        PsfexPsf().psf(frame, options=PsfexOptions(), workdir=tmp_path)
    assert "\n" not in str(err.value)
    assert str(err.value).startswith("psf backend 'psfex': frame 'two': 2 candidate PSF stars")


@needs_both
def test_psfex_reads_the_users_files(series, tmp_path):
    data, header = series.frames[0]
    frame = _sim_frame(data, header, "user")
    (tmp_path / "default.param").write_text("MAG_AUTO\nX_IMAGE\n")
    (tmp_path / "default.psfex").write_text("PSFVAR_DEGREES 0\nSAMPLE_MINSN 30\n")
    out = PsfexPsf().psf(frame, options=PsfexOptions(), workdir=tmp_path)
    assert out.psf.params["degree"] == 0  # the user's, not the backend's choice
    assert "MAG_AUTO" in fits.getdata(tmp_path / "frame.cat", "LDAC_OBJECTS").columns.names
    assert out.fwhm == pytest.approx(header["SIMFWHM"], rel=0.1)
    (tmp_path / "default.sex").write_text("DETECT_THRESH 1e6\nANALYSIS_THRESH 1e6\n")
    with pytest.raises(StageError, match=r"'user': 0 candidate PSF stars .* among 0 detections"):
        PsfexPsf().psf(frame, options=PsfexOptions(), workdir=tmp_path)
    (tmp_path / "default.sex").unlink()
    (tmp_path / "default.conv").write_text("GARBAGE\n1 2\n")  # a corrupt filter file
    message = r"'user': SExtractor exited with code 1: '\*Error\*: not a suitable filter in"
    with pytest.raises(StageError, match=message):
        PsfexPsf().psf(frame, options=PsfexOptions(), workdir=tmp_path)


# ---------------------------------------------------------------------- extract


def _render(shape, xy, flux, sigma=SIGMA) -> np.ndarray:
    """Sum of pixel-sampled Gaussians."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    image = np.zeros(shape)
    for (x, y), f in zip(xy, flux, strict=True):
        image += (
            f / (2 * np.pi * sigma**2) * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2))
        )
    return image


def _residual(data, *, noise=1.0, weight=None, psf=None, name="r", fwhm=FWHM) -> Residual:
    data = np.asarray(data, np.float32)
    res = Residual(
        data=data,
        noise=np.full(data.shape, noise, np.float32),
        weight=np.ones(data.shape, np.float32) if weight is None else weight,
        header={"FWHM": fwhm},
        name=name,
        psf=psf,
    )
    for a in (res.data, res.noise, res.weight):
        readonly(a)
    return res


def _match(table, xy, radius=1.0):
    d = np.hypot(
        np.asarray(table["x"])[None] - xy[:, 0, None], np.asarray(table["y"])[None] - xy[:, 1, None]
    )
    j = np.argmin(d, axis=1)
    return np.where(d[np.arange(len(xy)), j] < radius, j, -1)


@pytest.fixture(scope="module")
def injected():
    """A 256 x 256 residual: 16 point sources (S/N ~40), a negative one, an extended blob."""
    rng = np.random.default_rng(0)
    shape = (256, 256)
    g = np.linspace(24, 232, 4)
    xy = np.array([(x, y) for y in g for x in g]) + rng.uniform(-0.5, 0.5, (16, 2))
    flux = rng.uniform(300.0, 600.0, 16)
    data = _render(shape, xy, flux) + rng.normal(0.0, 1.0, shape)
    neg_xy, neg_flux = np.array([[128.3, 40.6]]), 300.0
    data -= _render(shape, neg_xy, [neg_flux])
    blob_xy = np.array([[200.2, 128.7]])
    data += _render(shape, blob_xy, [3000.0], sigma=5.0)
    return data, xy, flux, neg_xy, neg_flux, blob_xy


@needs_sex
def test_extract_finds_injected_sources_with_spread_model(injected, tmp_path):
    data, xy, flux, neg_xy, neg_flux, blob_xy = injected
    psf = PsfModel(image=gaussian_stamp(10, SIGMA), fwhm=FWHM)  # no .psf file: written
    table = SextractorExtract().extract(
        _residual(data, psf=psf), options=SextractorExtractOptions(), workdir=tmp_path
    )
    assert table.meta["psf"] == "psf image"
    assert len(table) == 18  # nothing spurious
    pos = table[table["sign"] == 1]
    m = _match(pos, xy)
    assert (m >= 0).all()  # every point source, within 1 px
    found = pos[m]
    np.testing.assert_allclose(found["x"], xy[:, 0], atol=0.2)  # 0-based positions
    np.testing.assert_allclose(found["y"], xy[:, 1], atol=0.2)
    # aperture of 1.5 FWHM holds 99.8% of a Gaussian: fluxes within 10% (S/N ~40: 3%)
    np.testing.assert_allclose(found["flux"], flux, rtol=0.1)
    np.testing.assert_allclose(found["flux_err"], np.sqrt(np.pi * (1.5 * FWHM) ** 2), rtol=0.02)
    # snr: the matched-filter (optimal) significance, flux / (noise sqrt(4 pi) sigma) for a
    # Gaussian PSF: about 1.8 times the aperture's flux / flux_err, as the native backend's
    optimal = flux / (2.0 * np.sqrt(np.pi) * SIGMA)
    np.testing.assert_allclose(found["snr"], optimal, rtol=0.1)
    ratio = found["snr"] / (found["flux"] / found["flux_err"])
    assert np.all((ratio > 1.6) & (ratio < 2.0))
    # SPREAD_MODEL: ~0 for the point sources, clearly positive for the blob (sigma 5 px vs
    # the PSF's 1.5 px; SPREAD_MODEL's scale is small: DES separates at ~0.003)
    assert np.all(np.abs(found["spread_model"]) < 0.005)
    assert np.all(np.abs(found["spread_model"]) < 4 * found["spread_model_err"])
    (b,) = _match(pos, blob_xy, radius=1.5)
    assert b >= 0
    assert pos["spread_model"][b] > 0.02
    assert pos["spread_model"][b] > 20 * pos["spread_model_err"][b]
    neg = table[table["sign"] == -1]
    assert len(neg) == 1
    assert np.hypot(neg["x"][0] - neg_xy[0, 0], neg["y"][0] - neg_xy[0, 1]) < 1.0
    assert neg["flux"][0] == pytest.approx(-neg_flux, rel=0.1)
    assert neg["peak"][0] < 0
    assert abs(neg["spread_model"][0]) < 0.005
    assert list(table["snr"]) == sorted(table["snr"], reverse=True)


@needs_both
def test_extract_with_the_psfex_model_file(sim_psf, tmp_path):
    """The psfex backend's .psf (spatially varying) serves SExtractor's SPREAD_MODEL."""
    rng = np.random.default_rng(1)
    fwhm = sim_psf.fwhm
    xy = np.array([[60.2, 70.7], [180.5, 150.1], [120.0, 200.4]])
    stamp = sim_psf.psf.image
    half = stamp.shape[0] // 2
    data = rng.normal(0.0, 1.0, (256, 256))
    for x, y in np.rint(xy).astype(int):
        data[y - half : y + half + 1, x - half : x + half + 1] += 800.0 * stamp
    res = _residual(data, psf=sim_psf.psf, fwhm=fwhm)
    table = SextractorExtract().extract(res, options=SextractorExtractOptions(), workdir=tmp_path)
    assert table.meta["psf"] == "psfex file"
    m = _match(table, np.rint(xy))
    assert (m >= 0).all()
    assert np.all(np.abs(table["spread_model"][m]) < 0.005)


@needs_sex
def test_extract_pure_noise_masks_and_no_psf(tmp_path):
    rng = np.random.default_rng(0)
    noise_only = _residual(rng.normal(0.0, 1.0, (512, 512)))
    table = SextractorExtract().extract(
        noise_only, options=SextractorExtractOptions(), workdir=tmp_path
    )
    assert len(table) <= 1  # as the native backend at 5 sigma
    assert "spread_model" not in table.colnames  # no PSF model
    # a bright source on masked pixels is not detected; one beside them is
    shape = (128, 128)
    xy = np.array([[40.0, 40.0], [90.0, 90.0]])
    data = _render(shape, xy, [2000.0, 2000.0]) + rng.normal(0.0, 1.0, shape)
    weight = np.ones(shape, np.float32)
    weight[30:51, 30:51] = 0.0
    table = SextractorExtract().extract(
        _residual(data, weight=weight), options=SextractorExtractOptions(), workdir=tmp_path
    )
    assert len(table) == 1
    assert np.hypot(table["x"][0] - 90.0, table["y"][0] - 90.0) < 0.5


@needs_sex
def test_extract_on_a_master_residual_in_sigma_units(injected, tmp_path):
    """MR: data in sigma units (signal / noise), noise ~ 1 / sqrt(N) of N residuals."""
    data, xy, flux, *_ = injected
    n = 9
    noise = 1.0 / np.sqrt(n)
    mr = _residual(data * noise, noise=noise, name="MR")  # the same S/N in every pixel
    table = SextractorExtract().extract(mr, options=SextractorExtractOptions(), workdir=tmp_path)
    pos = table[table["sign"] == 1]
    m = _match(pos, xy)
    assert (m >= 0).all()
    np.testing.assert_allclose(pos["flux"][m], flux * noise, rtol=0.1)
    # the same significance as on the residual in ADU
    adu = SextractorExtract().extract(
        _residual(data), options=SextractorExtractOptions(), workdir=tmp_path
    )
    assert len(adu) == len(table)
    ref = adu[adu["sign"] == 1][_match(adu[adu["sign"] == 1], xy)]
    np.testing.assert_allclose(pos["snr"][m], ref["snr"], rtol=1e-3)


@needs_sex
def test_extract_real_program_on_corrupt_files(tmp_path):
    psf_file = tmp_path / "broken.psf"
    psf_file.write_bytes(b"SIMPLE  =                    T" + b"\0" * 100)
    psf = PsfModel(image=gaussian_stamp(5, 1.5), fwhm=3.5, files=(psf_file,))
    res = _residual(np.random.default_rng(2).normal(0.0, 1.0, (64, 64)), psf=psf, name="sci1")
    with pytest.raises(StageError) as err:
        SextractorExtract().extract(res, options=SextractorExtractOptions(), workdir=tmp_path / "w")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("extract backend 'sextractor': residual 'sci1': SExtractor exited")
    # SExtractor's own words for a PSF file it cannot read
    assert message.endswith("exited with code 1: '*Error*: PSF file not found: model.psf'")
