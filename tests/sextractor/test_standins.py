"""The two backends end to end with stand-in programs (always run): the files they write,
the arguments they pass, how they read the outputs, and their errors."""

from __future__ import annotations

import shutil

import attrs
import numpy as np
import pytest
from astropy.io import fits
from oasis_sextractor.extract import BAD_RMS, SextractorExtract, SextractorExtractOptions
from oasis_sextractor.programs import gaussian_kernel
from oasis_sextractor.psf import PsfexOptions, PsfexPsf
from oasis_sextractor.psffile import write_psfex

from oasis_core.contracts.backends import ExtractBackend
from oasis_core.contracts.errors import StageError
from oasis_core.contracts.model import Frame, PsfModel, Residual, readonly

from .conftest import option_value, write_ldac
from .test_helpers import gaussian_stamp


def _residual(shape=(48, 64), psf=None, name="r") -> Residual:
    rng = np.random.default_rng(5)
    data = rng.normal(10.0, 2.0, shape).astype(np.float32)
    weight = np.ones(shape, np.float32)
    weight[:4, :] = 0.0
    res = Residual(
        data=data,
        noise=np.full(shape, 2.0, np.float32),
        weight=weight,
        header={"FWHM": 4.0},
        name=name,
        psf=psf,
    )
    for a in (res.data, res.noise, res.weight):
        readonly(a)
    return res


def _sources(x, y, flux, err, spread=None) -> dict:
    n = len(x)
    cols = {
        "NUMBER": np.arange(1, n + 1),
        "X_IMAGE": np.asarray(x, float),
        "Y_IMAGE": np.asarray(y, float),
        "XWIN_IMAGE": np.asarray(x, float) + 0.1,
        "YWIN_IMAGE": np.asarray(y, float) - 0.1,
        "FLAGS_WIN": np.zeros(n, int),
        "FLUX_APER": np.asarray(flux, float)[:, None],
        "FLUXERR_APER": np.asarray(err, float),
        "FLUX_MAX": np.asarray(flux, float) / 10,
        "A_IMAGE": np.full(n, 2.0),
        "B_IMAGE": np.full(n, 1.5),
        "THETA_IMAGE": np.full(n, 30.0),
        "ISOAREA_IMAGE": np.full(n, 20),
        "FLAGS": np.zeros(n, int),
    }
    if spread is not None:
        cols["SPREAD_MODEL"] = np.asarray(spread, float)
        cols["SPREADERR_MODEL"] = np.full(n, 0.001)
    return cols


def test_extract_writes_inputs_passes_arguments_and_reads_both_signs(tmp_path, fake_program):
    pos = write_ldac(
        tmp_path / "pos.cat", _sources([11, 31], [21, 41], [100.0, 400.0], [10.0, 10.0], [0, 0.03])
    )
    neg = write_ldac(tmp_path / "neg.cat", _sources([51], [11], [200.0], [10.0], [0.001]))
    fake_program("source-extractor", outputs={"positive.cat": pos, "negative.cat": neg})
    model = PsfModel(image=gaussian_stamp(7, 1.7), fwhm=4.0)
    res = _residual(psf=model)
    workdir = tmp_path / "work"
    (workdir).mkdir()
    (workdir / "default.param").write_text("MAG_AUTO\nX_IMAGE\n")  # the user's
    table = SextractorExtract().extract(res, options=SextractorExtractOptions(), workdir=workdir)

    # the table: 0-based windowed centroids, signed, sorted by S/N
    assert {*ExtractBackend.COLUMNS, "sign", "theta", "npix", "flag", "spread_model"} <= set(
        table.colnames
    )
    t = table[np.argsort(table["x"])]  # table is sorted by snr
    np.testing.assert_allclose(t["x"], [10.1, 30.1, 50.1])
    np.testing.assert_allclose(t["y"], [19.9, 39.9, 9.9])
    np.testing.assert_allclose(t["flux"], [100.0, 400.0, -200.0])
    np.testing.assert_allclose(t["flux_err"], [10.0, 10.0, 10.0])
    np.testing.assert_allclose(t["peak"], [10.0, 40.0, -20.0])
    # snr: the residual in sigmas, smoothed by a Gaussian of the FWHM, at the position
    from scipy.ndimage import gaussian_filter

    good = res.weight > 0
    z = np.where(good, (res.data - np.median(res.data[good])) / res.noise, 0.0)
    sigma = 4.0 / 2.3548
    matched = gaussian_filter(z, sigma, mode="constant") * 2 * np.sqrt(np.pi) * sigma
    iy, ix = np.rint(table["y"]).astype(int), np.rint(table["x"]).astype(int)
    np.testing.assert_allclose(table["snr"], table["sign"] * matched[iy, ix], rtol=1e-4)
    assert list(table["snr"]) == sorted(table["snr"], reverse=True)
    assert list(t["sign"]) == [1, 1, -1]
    np.testing.assert_allclose(t["spread_model"], [0.0, 0.03, 0.001])
    assert table.meta["fwhm"] == 4.0 and table.meta["radius"] == 6.0
    assert table.meta["psf"] == "psf image"

    calls = fake_program.calls("source-extractor")
    assert [c["args"][0] for c in calls] == ["positive.fits", "negative.fits"]
    args = calls[0]["args"]
    assert option_value(args, "PSF_NAME") == "model.psf"
    assert option_value(args, "PHOT_APERTURES") == "12"  # diameter: 2 x 1.5 FWHM
    assert option_value(args, "WEIGHT_TYPE") == "MAP_RMS"
    kernel = gaussian_kernel(4.0)  # the FWHM header card's
    expected = 5.0 * np.sqrt((kernel**2).sum()) / kernel.sum()
    assert float(option_value(args, "DETECT_THRESH")) == pytest.approx(expected, rel=1e-4)
    assert args[args.index("-c") + 1] == "/dev/null"
    params = (workdir / "oasis.param").read_text().split()
    assert params[-3:] == ["SPREAD_MODEL", "SPREADERR_MODEL", "MAG_AUTO"]
    assert params.count("X_IMAGE") == 1

    # the images SExtractor read: R - median (masked 0), its negative, the noise (masked:
    # BAD_RMS), a PSFEx model of the PSF image, the Gaussian filter
    positive = fits.getdata(workdir / "positive.fits")
    good = res.weight > 0
    np.testing.assert_allclose(
        positive[good], res.data[good] - np.median(res.data[good]), atol=1e-5
    )
    assert (positive[~good] == 0).all()
    np.testing.assert_array_equal(fits.getdata(workdir / "negative.fits"), -positive)
    rms = fits.getdata(workdir / "rms.fits")
    assert (rms[~good] == BAD_RMS).all() and (rms[good] == 2.0).all()
    psf_mask = fits.getdata(workdir / "model.psf", "PSF_DATA")["PSF_MASK"][0]
    np.testing.assert_allclose(psf_mask[0], gaussian_stamp(7, 1.7), atol=1e-7)
    conv = (workdir / "default.conv").read_text()
    assert conv.startswith("CONV NORM\n# oasis: Gaussian, FWHM 4.000")
    np.testing.assert_array_equal(res.data, _residual().data)  # input untouched


def test_extract_uses_a_psfex_file_and_the_users_configuration(tmp_path, fake_program):
    pos = write_ldac(tmp_path / "pos.cat", _sources([11], [21], [100.0], [10.0], [0.0]))
    fake_program("source-extractor", outputs={"positive.cat": pos})
    psf_file = tmp_path / "psf" / "sci.psf"
    psf_file.parent.mkdir()
    write_psfex(psf_file, gaussian_stamp(5, 1.2), 2.8)
    model = PsfModel(image=gaussian_stamp(7, 1.7), fwhm=4.0, files=(psf_file,))
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / "default.sex").write_text("DETECT_THRESH 3\n")
    (workdir / "default.conv").write_text("CONV NORM\n1 2 1\n2 4 2\n1 2 1\n")
    table = SextractorExtract().extract(
        _residual(psf=model), options=SextractorExtractOptions(negative=False), workdir=workdir
    )
    assert len(table) == 1 and table.meta["psf"] == "psfex file"
    assert (workdir / "model.psf").read_bytes() == psf_file.read_bytes()
    (call,) = fake_program.calls("source-extractor")
    args = call["args"]
    assert args[1:3] == ["-c", "default.sex"]
    assert "-DETECT_THRESH" not in args and "-FILTER_NAME" not in args
    assert option_value(args, "CATALOG_NAME") == "positive.cat"
    # without a PSF model: no SPREAD_MODEL asked, none returned
    table = SextractorExtract().extract(
        _residual(psf=None), options=SextractorExtractOptions(negative=False), workdir=workdir
    )
    assert "spread_model" not in table.colnames
    assert "SPREAD_MODEL" not in (workdir / "oasis.param").read_text()
    assert "-PSF_NAME" not in fake_program.calls("source-extractor")[-1]["args"]


def test_extract_errors_are_one_line(tmp_path, fake_program):
    fake_program("source-extractor", mode="fail")
    with pytest.raises(StageError) as err:
        SextractorExtract().extract(
            _residual(name="MR"), options=SextractorExtractOptions(), workdir=tmp_path / "w"
        )
    assert str(err.value) == (
        "extract backend 'sextractor': residual 'MR': SExtractor exited with code 2: "
        "'*Error*: cannot open frame.fits: corrupt'"
    )
    fake_program("source-extractor", mode="silent")
    with pytest.raises(
        StageError, match=r"exited 0 but wrote no positive.cat: 'WARNING: nothing to do'"
    ):
        SextractorExtract().extract(
            _residual(), options=SextractorExtractOptions(), workdir=tmp_path / "w"
        )
    masked = attrs.evolve(_residual(), weight=np.zeros((48, 64), np.float32))
    with pytest.raises(StageError, match="every pixel has weight 0"):
        SextractorExtract().extract(masked, options=SextractorExtractOptions(), workdir=tmp_path)


# ----------------------------------------------------------------- psf backend


def _star_catalog(n_stars: int, tmp_path, name: str):
    rng = np.random.default_rng(2)
    n_gal = 6
    n = n_stars + n_gal
    fwhm = np.concatenate([np.linspace(3.85, 3.95, n_stars), 6.5 * 1.5 ** np.arange(n_gal)])
    cols = {
        "NUMBER": np.arange(1, n + 1),
        "X_IMAGE": rng.uniform(5, 60, n),
        "Y_IMAGE": rng.uniform(5, 60, n),
        "FLUX_APER": rng.uniform(1e3, 1e4, (n, 1)),
        "FLUXERR_APER": np.full(n, 20.0),
        "FLUX_MAX": np.linspace(1000.0, 100.0, n),
        "FWHM_IMAGE": fwhm,
        "FLUX_RADIUS": fwhm * 0.55,
        "ELONGATION": np.full(n, 1.05),
        "FLAGS": np.zeros(n, int),
        "SNR_WIN": np.linspace(200.0, 30.0, n),
    }
    return write_ldac(tmp_path / name, cols, {"SEXBKGND": 100.0, "SEXBKDEV": 5.0}), cols


def _frame(shape=(64, 64)) -> Frame:
    rng = np.random.default_rng(9)
    data = rng.normal(100.0, 5.0, shape).astype(np.float32)
    weight = np.ones(shape, np.float32)
    weight[10:12, 20:30] = 0.0
    data[10:12, 20:30] = np.nan
    frame = Frame(data=data, weight=weight, name="f1", gain=2.0, saturation=50000.0)
    readonly(frame.data)
    readonly(frame.weight)
    return frame


def test_psf_backend_runs_both_programs_and_reads_their_outputs(tmp_path, fake_program):
    cat, cols = _star_catalog(20, tmp_path, "stars.cat")
    psf_file = tmp_path / "out.psf"
    write_psfex(psf_file, gaussian_stamp(12, 1.7), 4.5)
    fits.setval(psf_file, "ACCEPTED", value=12, ext=1)
    fits.setval(psf_file, "LOADED", value=15, ext=1)
    accepted = np.arange(1, 21, 2)  # the odd-numbered stars
    flags = np.where(np.isin(cols["NUMBER"], accepted), 0, 2)
    outcat = write_ldac(
        tmp_path / "outcat.cat", {"SOURCE_NUMBER": cols["NUMBER"][::-1], "FLAGS_PSF": flags[::-1]}
    )
    fake_program("source-extractor", outputs={"guess.cat": cat, "frame.cat": cat})
    fake_program("psfex", outputs={"frame.psf": psf_file, "psfex_out.cat": outcat})
    frame = _frame()
    workdir = tmp_path / "work"
    out = PsfexPsf().psf(frame, options=PsfexOptions(), workdir=workdir)

    assert out.psf.model == "psfex" and out.psf.nstars == 12
    assert out.fwhm == out.psf.fwhm == pytest.approx(2.3548 * 1.7, rel=0.03)
    assert out.psf.params["loaded"] == 15 and out.psf.params["psfex_fwhm"] == 4.5
    assert out.psf.params["degree"] == 0 and out.psf.params["nstars_guess"] == 20
    assert out.psf.files == (workdir / "frame.cat", workdir / "frame.psf")
    assert out.psf.image.shape == (25, 25) and out.psf.image.sum() == pytest.approx(1.0)
    assert out.background == 100.0
    assert 4.0 < out.noise <= 5.0  # SEXBKDEV, or the pixel-difference estimate when lower
    rows = np.flatnonzero(np.isin(cols["NUMBER"], accepted))  # snr_stars = 10 of them
    peaks = cols["FLUX_MAX"][rows]
    assert out.snr == pytest.approx(np.median(peaks / np.sqrt(out.noise**2 + peaks / 2.0)))

    guess, second = fake_program.calls("source-extractor")
    assert option_value(guess["args"], "CATALOG_NAME") == "guess.cat"
    args = second["args"]
    assert option_value(args, "CATALOG_NAME") == "frame.cat"
    assert option_value(args, "GAIN") == "2"
    assert option_value(args, "SATUR_LEVEL") == "40000"  # 0.8 x the saturation
    assert float(option_value(args, "PHOT_APERTURES")) == pytest.approx(20.0, rel=0.05)
    assert "VIGNET(33,33)" in (workdir / "oasis.param").read_text().split()
    (pcall,) = fake_program.calls("psfex")
    assert pcall["args"][0] == "frame.cat"
    assert option_value(pcall["args"], "PSF_SIZE") == "25,25"  # 2 x ceil(3 x 3.9) + 1
    assert option_value(pcall["args"], "PSFVAR_DEGREES") == "1"  # 20 stars: 5 per term
    lo, hi = map(float, option_value(pcall["args"], "SAMPLE_FWHMRANGE").split(","))
    assert lo == pytest.approx(4.29 / 1.4, rel=0.02) and hi == pytest.approx(4.29 * 1.4, rel=0.02)
    # what SExtractor read: masked pixels at the median with weight 0
    image = fits.getdata(workdir / "frame.fits")
    weight = fits.getdata(workdir / "weight.fits")
    assert np.isfinite(image).all() and (weight[10:12, 20:30] == 0).all()
    assert weight.sum() == frame.weight.sum()


def test_psf_backend_too_few_stars_and_failures_are_one_line(tmp_path, fake_program):
    cat, _ = _star_catalog(2, tmp_path, "few.cat")
    fake_program("source-extractor", outputs={"guess.cat": cat, "frame.cat": cat})
    fake_program("psfex", mode="fail")
    with pytest.raises(StageError) as err:
        PsfexPsf().psf(_frame(), options=PsfexOptions(), workdir=tmp_path / "w")
    message = str(err.value)
    assert "\n" not in message
    assert message == (
        "psf backend 'psfex': frame 'f1': no 5 of the 5 candidate PSF stars share one FWHM "
        "(within 20%) among 8 detections, need 3 PSF stars; lower psf.psfex.min_snr / "
        "detect_thresh or check the frame and its mask"
    )
    assert err.value.metadata == {"nstars": 0, "ndetected": 8}
    with pytest.raises(StageError, match=r"'f1': 5 candidate PSF stars \(unflagged, S/N >= 20"):
        PsfexPsf().psf(_frame(), options=PsfexOptions(min_stars=6), workdir=tmp_path / "w")
    cat, _ = _star_catalog(20, tmp_path, "many.cat")
    fake_program("source-extractor", outputs={"guess.cat": cat, "frame.cat": cat})
    with pytest.raises(StageError, match=r"'f1': PSFEx exited with code 2: '\*Error\*: cannot"):
        PsfexPsf().psf(_frame(), options=PsfexOptions(), workdir=tmp_path / "w")
    # PSFEx accepting too few stars (it exits 0 and writes a model all the same)
    psf_file = tmp_path / "out.psf"
    write_psfex(psf_file, gaussian_stamp(12, 1.7), 4.5)
    fits.setval(psf_file, "ACCEPTED", value=1, ext=1)
    fake_program("psfex", outputs={"frame.psf": psf_file})
    with pytest.raises(StageError, match=r"PSFEx accepted 1 of 1 stars loaded among 26 detections"):
        PsfexPsf().psf(_frame(), options=PsfexOptions(), workdir=tmp_path / "w")
    shutil.rmtree(tmp_path / "w")
    masked = attrs.evolve(_frame(), weight=np.zeros((64, 64), np.float32))
    with pytest.raises(StageError, match="every pixel is masked"):
        PsfexPsf().psf(masked, options=PsfexOptions(), workdir=tmp_path / "w")
