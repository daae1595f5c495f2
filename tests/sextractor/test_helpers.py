"""Tests of the sextractor plugin's pieces that need no external program: command lines,
parameter files, filters, catalog and PSFEx-file reading, options, registration."""

from __future__ import annotations

import doctest
import subprocess
import sys
from pathlib import Path

import attrs
import numpy as np
import pytest
from astropy.io import fits
from oasis_sextractor import extract, programs, psf, psffile
from oasis_sextractor.extract import (
    SextractorExtract,
    SextractorExtractOptions,
    detect_thresh,
    parse_catalog,
)
from oasis_sextractor.programs import (
    command_line,
    error_line,
    find_program,
    gaussian_kernel,
    merge_parameters,
    read_ldac,
    run_program,
    write_conv,
)
from oasis_sextractor.psf import PsfexOptions, PsfexPsf, choose_degree, star_cluster
from oasis_sextractor.psffile import (
    measure_fwhm,
    polynomial_exponents,
    read_psfex,
    write_psfex,
)

from oasis_core.contracts.backends import ExtractBackend, PsfBackend
from oasis_core.contracts.errors import BackendUnavailable, StageError

from .conftest import write_ldac


def gaussian_stamp(half: int, sigma: float, dx: float = 0.0) -> np.ndarray:
    g = np.arange(-half, half + 1, dtype=np.float64)
    image = np.exp(-((g[None, :] - dx) ** 2 + g[:, None] ** 2) / (2 * sigma**2))
    return image / image.sum()


# ------------------------------------------------------------ registration, options


def test_backends_are_registered_with_documented_options(plugin_manager):
    from oasis_core.engine.plugins import Registry

    registry = Registry(plugin_manager)
    psf_backend = registry.get("psf", "psfex").backend
    ext_backend = registry.get("extract", "sextractor").backend
    assert isinstance(psf_backend, PsfexPsf) and isinstance(psf_backend, PsfBackend)
    assert isinstance(ext_backend, SextractorExtract) and isinstance(ext_backend, ExtractBackend)
    assert psf_backend.user_files == (
        "default.sex",
        "default.param",
        "default.conv",
        "default.psfex",
    )
    assert ext_backend.user_files == ("default.sex", "default.param", "default.conv")
    for cls in (PsfexOptions, SextractorExtractOptions):
        for field in attrs.fields(cls):
            assert field.metadata["help"], field.name
            assert isinstance(field.default, bool | int | float | str), field.name
    assert PsfexOptions().sextractor_binary == "" and PsfexOptions().psfex_binary == ""
    # the native extract backend's default threshold, minimum area and deblending
    o = SextractorExtractOptions()
    assert (o.detect_thresh, o.detect_minarea, o.deblend_nthresh, o.deblend_mincont) == (
        5.0,
        5,
        32,
        0.005,
    )


@pytest.mark.parametrize(
    ("cls", "key", "value"),
    [
        (PsfexOptions, "fwhm_from", "median"),
        (PsfexOptions, "min_snr", 0.0),
        (PsfexOptions, "timeout", -1.0),
        (SextractorExtractOptions, "detect_thresh", 0.0),
        (SextractorExtractOptions, "radius", -2.0),
    ],
)
def test_invalid_options_name_the_key(cls, key, value):
    with pytest.raises(ValueError, match=key):
        cls(**{key: value})


def test_docstring_examples_run():
    for module in (programs, psffile, psf, extract):
        result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
        assert result.failed == 0, module.__name__
    assert doctest.testmod(psffile).attempted >= 1


# ------------------------------------------------------------------ finding programs


def _executable(path: Path) -> Path:
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)
    return path


def test_programs_are_found_on_path_with_fallback_names(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    sex = _executable(tmp_path / "sex")
    found = find_program("sextractor", "", where="w", option_key="k")
    assert found == str(sex.resolve())  # 'sex' when there is no 'source-extractor'
    new = _executable(tmp_path / "source-extractor")
    assert find_program("sextractor", "", where="w", option_key="k") == str(new.resolve())
    other = _executable(tmp_path / "my-sex")
    assert find_program("sextractor", str(other), where="w", option_key="k") == str(other)


def test_missing_programs_are_unavailable_with_the_install_hint(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # empty
    with pytest.raises(BackendUnavailable) as err:
        PsfexPsf().check(PsfexOptions())
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("psf backend 'psfex': program 'source-extractor' or 'sex'")
    assert "apt-get install source-extractor psfex" in message
    assert "psf.psfex.sextractor_binary" in message
    _executable(tmp_path / "source-extractor")
    with pytest.raises(BackendUnavailable, match=r"'psfex' not on PATH.*psf.psfex.psfex_binary"):
        PsfexPsf().check(PsfexOptions())
    _executable(tmp_path / "psfex")
    PsfexPsf().check(PsfexOptions())
    with pytest.raises(BackendUnavailable, match=r"'/no/such/sex' not found"):
        SextractorExtract().check(SextractorExtractOptions(sextractor_binary="/no/such/sex"))
    with pytest.raises(BackendUnavailable, match=r"extract\.sextractor\.sextractor_binary"):
        SextractorExtract().check(SextractorExtractOptions(sextractor_binary="nosuchsex"))


# ---------------------------------------------------------------- configuration


def test_command_line_user_config_rules_the_tunable_keys():
    forced = {"CATALOG_NAME": "a.cat", "GAIN": 1.5, "WRITE_XML": False}
    tunable = {"DETECT_THRESH": 0.9449, "FILTER": True, "SAMPLE_FWHMRANGE": (1.5, 20.0)}
    args = command_line("/bin/sex", ["a.fits"], forced=forced, tunable=tunable, user_config=None)
    assert args == [
        "/bin/sex",
        "a.fits",
        "-c",
        "/dev/null",
        "-DETECT_THRESH",
        "0.9449",
        "-FILTER",
        "Y",
        "-SAMPLE_FWHMRANGE",
        "1.5,20",
        "-CATALOG_NAME",
        "a.cat",
        "-GAIN",
        "1.5",
        "-WRITE_XML",
        "N",
    ]
    user = command_line("sex", ["a.fits"], forced=forced, tunable=tunable, user_config="u.sex")
    assert user[2:4] == ["-c", "u.sex"]
    assert "-DETECT_THRESH" not in user and "-FILTER" not in user
    assert user[user.index("-CATALOG_NAME") + 1] == "a.cat"


def test_user_parameters_are_merged_after_the_needed_ones():
    user = "# my params\nVIGNET(9,9)\nclass_star\n\nMAG_AUTO   # total\nX_IMAGE\nFLUX_APER(3)\n"
    merged = merge_parameters(["NUMBER", "X_IMAGE", "FLUX_APER(1)", "VIGNET(31,31)"], user)
    assert merged == [
        "NUMBER",
        "X_IMAGE",
        "FLUX_APER(1)",
        "VIGNET(31,31)",
        "class_star",
        "MAG_AUTO",
    ]
    assert merge_parameters(["A"], None) == ["A"]


def test_filter_file_and_matched_threshold(tmp_path):
    kernel = gaussian_kernel(3.53)
    assert kernel.shape == (9, 9)  # +-ceil(FWHM)
    assert kernel[4, 4] == 1.0 and kernel[4, 0] < kernel[4, 2] < 1.0
    np.testing.assert_allclose(kernel, kernel.T)
    write_conv(tmp_path / "g.conv", kernel, "Gaussian")
    lines = (tmp_path / "g.conv").read_text().splitlines()
    assert lines[0] == "CONV NORM" and lines[1] == "# oasis: Gaussian"
    np.testing.assert_allclose(np.loadtxt(lines[2:]), kernel, atol=1e-6)
    # a matched filter of the normalised kernel: SExtractor's threshold scales with the
    # noise of the filtered image (0.19 of a pixel's for FWHM 3.53)
    kn = kernel / kernel.sum()
    assert detect_thresh(5.0, kernel) == pytest.approx(5.0 * np.sqrt((kn**2).sum()))
    assert detect_thresh(5.0, kernel) == pytest.approx(0.945, abs=0.01)
    assert detect_thresh(5.0, None) == 5.0


def test_extract_arguments_force_what_the_backend_reads(tmp_path):
    opts = SextractorExtractOptions()
    args = extract.extract_arguments(
        "sex",
        "positive.fits",
        "positive.cat",
        thresh=0.9,
        aperture=10.6,
        psf="model.psf",
        options=opts,
        workdir=tmp_path,
    )
    from .conftest import option_value

    expected = {
        "CATALOG_NAME": "positive.cat",
        "CATALOG_TYPE": "FITS_LDAC",
        "PARAMETERS_NAME": "oasis.param",
        "WEIGHT_TYPE": "MAP_RMS",
        "WEIGHT_IMAGE": "rms.fits",
        "RESCALE_WEIGHTS": "N",
        "GAIN": "0",
        "PHOT_APERTURES": "10.6",
        "PSF_NAME": "model.psf",
        "DETECT_THRESH": "0.9",
        "ANALYSIS_THRESH": "0.9",
        "FILTER": "Y",
        "FILTER_NAME": "default.conv",
        "BACK_TYPE": "MANUAL",
        "BACK_VALUE": "0",
    }
    for key, value in expected.items():
        assert option_value(args, key) == value, key
    assert args[1:4] == ["positive.fits", "-c", "/dev/null"]
    no_filter = extract.extract_arguments(
        "sex",
        "p.fits",
        "p.cat",
        thresh=5.0,
        aperture=9.0,
        psf=None,
        options=SextractorExtractOptions(filter=False, back_size=32, analysis_thresh=2.0),
        workdir=tmp_path,
    )
    assert option_value(no_filter, "FILTER") == "N" and "-FILTER_NAME" not in no_filter
    assert option_value(no_filter, "BACK_SIZE") == "32"
    assert option_value(no_filter, "ANALYSIS_THRESH") == "2"
    assert "-PSF_NAME" not in no_filter
    # the user's files: default.conv replaces the filter, default.sex the tunable keys
    (tmp_path / "default.conv").write_text("CONV NORM\n1\n")
    with_conv = extract.extract_arguments(
        "sex",
        "p.fits",
        "p.cat",
        thresh=5.0,
        aperture=9.0,
        psf=None,
        options=opts,
        workdir=tmp_path,
    )
    assert option_value(with_conv, "FILTER_NAME") == "default.conv"
    user_conv_only = extract.extract_arguments(
        "sex",
        "p.fits",
        "p.cat",
        thresh=5.0,
        aperture=9.0,
        psf=None,
        options=SextractorExtractOptions(filter=False),
        workdir=tmp_path,
    )
    assert option_value(user_conv_only, "FILTER") == "Y"  # the user's filter is used
    # a filter the backend generated is not the user's
    write_conv(tmp_path / "default.conv", gaussian_kernel(3.0), "generated")
    assert not programs.is_user_file(tmp_path, "default.conv")
    assert programs.provide_conv(tmp_path, gaussian_kernel(4.0), "again") is False
    assert "again" in (tmp_path / "default.conv").read_text()
    (tmp_path / "default.conv").write_text("CONV NORM\n# mine\n1\n")
    assert programs.provide_conv(tmp_path, gaussian_kernel(4.0), "again") is True
    assert (tmp_path / "default.conv").read_text() == "CONV NORM\n# mine\n1\n"
    (tmp_path / "default.sex").write_text("DETECT_THRESH 3\n")
    with_sex = extract.extract_arguments(
        "sex",
        "p.fits",
        "p.cat",
        thresh=5.0,
        aperture=9.0,
        psf=None,
        options=opts,
        workdir=tmp_path,
    )
    assert with_sex[2:4] == ["-c", "default.sex"]
    assert "-DETECT_THRESH" not in with_sex and "-FILTER_NAME" not in with_sex
    assert option_value(with_sex, "WEIGHT_TYPE") == "MAP_RMS"


def test_psf_stage_arguments(tmp_path):
    from .conftest import option_value

    opts = PsfexOptions()
    sex = psf.sextractor_psf_arguments(
        "sex",
        catalog="frame.cat",
        params="oasis.param",
        gain=4.0,
        saturation=36000.0,
        aperture=15.0,
        options=opts,
        workdir=tmp_path,
    )
    for key, value in {
        "CATALOG_TYPE": "FITS_LDAC",
        "WEIGHT_TYPE": "MAP_WEIGHT",
        "WEIGHT_IMAGE": "weight.fits",
        "GAIN": "4",
        "SATUR_LEVEL": "36000",
        "PHOT_APERTURES": "15",
        "DETECT_THRESH": "3",
        "FILTER_NAME": "default.conv",
        "BACK_SIZE": "64",
    }.items():
        assert option_value(sex, key) == value, key
    pfx = psf.psfex_arguments(
        "psfex", psf_size=21, degree=1, fwhm_range=(2.0, 5.5), options=opts, workdir=tmp_path
    )
    assert pfx[1:4] == ["frame.cat", "-c", "/dev/null"]
    for key, value in {
        "PSF_SIZE": "21,21",
        "PSFVAR_DEGREES": "1",
        "SAMPLE_FWHMRANGE": "2,5.5",
        "SAMPLE_MINSN": "20",
        "PSF_SAMPLING": "1",
        "OUTCAT_TYPE": "FITS_LDAC",
        "CHECKPLOT_TYPE": "NONE",
        "XML_NAME": "psfex.xml",
    }.items():
        assert option_value(pfx, key) == value, key
    (tmp_path / "default.psfex").write_text("PSFVAR_DEGREES 0\n")
    user = psf.psfex_arguments(
        "psfex", psf_size=21, degree=1, fwhm_range=(2.0, 5.5), options=opts, workdir=tmp_path
    )
    assert user[2:4] == ["-c", "default.psfex"] and "-PSFVAR_DEGREES" not in user
    assert option_value(user, "PSF_SIZE") == "21,21"


def test_star_cluster_and_degree():
    # a deep field: a few compact stars, many galaxies of many sizes
    rng = np.random.default_rng(1)
    stars = rng.normal(2.5, 0.08, 8)
    galaxies = rng.uniform(3.5, 14.0, 60)
    fwhm = np.concatenate([galaxies, stars])
    members = star_cluster(fwhm, 0.2, 5)
    assert members[60:].all()
    assert np.median(fwhm[members]) == pytest.approx(2.5, abs=0.15)
    assert not star_cluster(fwhm[:3], 0.2, 5).any()
    # a ground-based field: all candidates are stars
    assert star_cluster(rng.normal(4.0, 0.2, 50), 0.2, 5).mean() > 0.9
    assert [choose_degree(n, 2) for n in (30, 29, 15, 14, 0)] == [2, 1, 1, 0, 0]
    assert choose_degree(100, 0) == 0


# ------------------------------------------------------------ running, errors


def _script(path: Path, body: str) -> Path:
    path.write_text(f"#!{sys.executable}\n{body}")
    path.chmod(0o755)
    return path


def test_error_line_is_the_programs_own_message():
    text = "\x1b[1M> \n\x1b[1A----- SExtractor started\n> *Error*: cannot open x.fits\n\n"
    assert error_line(text) == "*Error*: cannot open x.fits"
    assert error_line("", "first\nlast line\n") == "last line"
    assert error_line("", "") == "(no output)"


def test_run_program_turns_failures_into_one_line_stage_errors(tmp_path):
    fail = _script(
        tmp_path / "fail",
        "import sys\nsys.stderr.write('> WARNING: hm\\n> *Error*: bad FITS header\\n')\n"
        "sys.exit(3)\n",
    )
    with pytest.raises(StageError) as err:
        run_program(
            [str(fail)],
            cwd=tmp_path,
            where="here",
            label="SExtractor",
            outputs=["x.cat"],
            timeout=30,
        )
    assert str(err.value) == "here: SExtractor exited with code 3: '*Error*: bad FITS header'"
    assert err.value.metadata["returncode"] == 3
    quiet = _script(tmp_path / "quiet", "print('done')\n")
    (tmp_path / "x.cat").write_text("stale")  # a stale output is no output
    with pytest.raises(StageError, match=r"here: PSFEx exited 0 but wrote no x.cat: 'done'"):
        run_program(
            [str(quiet)],
            cwd=tmp_path,
            where="here",
            label="PSFEx",
            outputs=["x.cat"],
            timeout=30,
        )
    slow = _script(tmp_path / "slow", "import time\ntime.sleep(20)\n")
    with pytest.raises(StageError, match=r"did not finish within 0.5 s"):
        run_program([str(slow)], cwd=tmp_path, where="here", label="PSFEx", outputs=[], timeout=0.5)
    ok = run_program(
        [sys.executable, "-c", "open('x.cat', 'w').write('1')"],
        cwd=tmp_path,
        where="here",
        label="x",
        outputs=["x.cat"],
        timeout=30,
    )
    assert isinstance(ok, subprocess.CompletedProcess)


# ------------------------------------------------------------ catalogs


def test_ldac_catalog_is_read_with_its_image_header(tmp_path):
    path = write_ldac(
        tmp_path / "c.cat",
        {"NUMBER": np.array([1, 2], np.int32), "X_IMAGE": np.array([10.5, 20.0])},
        {"SEXBKGND": 12.5, "SEXBKDEV": 3.25},
    )
    columns, header = read_ldac(path)
    assert header["SEXBKGND"] == 12.5 and header["SEXBKDEV"] == 3.25
    np.testing.assert_array_equal(columns["NUMBER"], [1, 2])
    assert columns["X_IMAGE"].dtype == np.float64 and columns["X_IMAGE"].dtype.isnative
    fits.PrimaryHDU(np.zeros((4, 4))).writeto(tmp_path / "img.fits")
    with pytest.raises(KeyError, match="LDAC_OBJECTS"):
        read_ldac(tmp_path / "img.fits")


def _catalog(n: int = 3) -> dict:
    return {
        "NUMBER": np.arange(1, n + 1),
        "X_IMAGE": np.array([11.0, 21.0, 31.0])[:n],
        "Y_IMAGE": np.array([6.0, 16.0, 26.0])[:n],
        "XWIN_IMAGE": np.array([11.25, 29.0, 31.5])[:n],  # the second moved 8 px
        "YWIN_IMAGE": np.array([6.5, 16.0, 26.5])[:n],
        "FLAGS_WIN": np.array([0, 0, 1])[:n],  # the third flagged
        "FLUX_APER": np.array([[100.0], [50.0], [20.0]])[:n],
        "FLUXERR_APER": np.array([10.0, 10.0, 0.0])[:n],
        "FLUX_MAX": np.array([30.0, 12.0, 5.0])[:n],
        "A_IMAGE": np.array([2.0, 1.5, 1.0])[:n],
        "B_IMAGE": np.array([1.8, 1.0, 1.0])[:n],
        "THETA_IMAGE": np.array([90.0, -45.0, 0.0])[:n],
        "ISOAREA_IMAGE": np.array([30, 12, 5])[:n],
        "FLAGS": np.array([0, 2, 0])[:n],
    }


def test_catalog_parsing_is_zero_based_and_signed():
    t = parse_catalog(_catalog(), -1, fwhm=4.0)
    np.testing.assert_allclose(t["x"], [10.25, 20.0, 30.0])  # windowed unless moved/flagged
    np.testing.assert_allclose(t["y"], [5.5, 15.0, 25.0])
    np.testing.assert_allclose(t["flux"], [-100.0, -50.0, -20.0])
    np.testing.assert_allclose(t["peak"], [-30.0, -12.0, -5.0])
    np.testing.assert_allclose(t["snr"][:2], [10.0, 5.0])
    assert np.isnan(t["snr"][2])  # no error, no S/N
    np.testing.assert_allclose(t["theta"], [np.pi / 2, -np.pi / 4, 0.0])
    assert list(t["sign"]) == [-1, -1, -1] and list(t["flag"]) == [0, 2, 0]
    assert list(t["npix"]) == [30, 12, 5]
    assert "spread_model" not in t.colnames
    with_spread = _catalog() | {
        "SPREAD_MODEL": np.array([0.001, 0.02, -0.01]),
        "SPREADERR_MODEL": np.array([0.001, 0.001, 0.002]),
    }
    t = parse_catalog(with_spread, 1, fwhm=4.0)
    np.testing.assert_allclose(t["spread_model"], [0.001, 0.02, -0.01])
    np.testing.assert_allclose(t["flux"], [100.0, 50.0, 20.0])
    empty = parse_catalog({k: v[:0] for k, v in with_spread.items()}, 1, fwhm=4.0)
    assert len(empty) == 0
    assert {*ExtractBackend.COLUMNS, "sign", "spread_model"} <= set(empty.colnames)


# ------------------------------------------------------------ PSFEx files


def test_psfex_file_round_trip(tmp_path):
    stamp = gaussian_stamp(10, 1.7)
    write_psfex(tmp_path / "g.psf", stamp * 3.0, 4.0)
    model = read_psfex(tmp_path / "g.psf")
    assert model.degree == 0 and model.names == () and model.sampling == 1.0
    assert model.fwhm == 4.0 and model.accepted == 1
    np.testing.assert_allclose(model.image(100.0, 7.0), stamp, atol=1e-7)
    header = fits.getheader(tmp_path / "g.psf", "PSF_DATA")
    assert (header["POLNAXIS"], header["PSFNAXIS"], header["PSFAXIS3"]) == (0, 3, 1)
    assert (header["PSFAXIS1"], header["PSFAXIS2"], header["PSF_SAMP"]) == (21, 21, 1.0)
    fwhm, beta = measure_fwhm(stamp)
    assert fwhm == pytest.approx(2.3548 * 1.7, rel=0.03)  # a Gaussian is a Moffat of large beta
    assert beta > 8


def _psfex_file(path: Path, basis: np.ndarray, cards: dict) -> Path:
    col = fits.Column(
        name="PSF_MASK",
        format=f"{basis.size}E",
        dim=f"({basis.shape[2]}, {basis.shape[1]}, {basis.shape[0]})",
        array=basis[None].astype(np.float32),
    )
    table = fits.BinTableHDU.from_columns([col], name="PSF_DATA")
    for key, value in cards.items():
        table.header[key] = value
    fits.HDUList([fits.PrimaryHDU(), table]).writeto(path, overwrite=True)
    return path


def test_psfex_polynomial_is_evaluated_in_psfex_order(tmp_path):
    assert polynomial_exponents((1, 1), (1,)).tolist() == [[0, 0], [1, 0], [0, 1]]
    assert polynomial_exponents((1, 2), (1, 2)).tolist() == [
        [0, 0],
        [1, 0],
        [0, 1],
        [1, 1],
        [0, 2],
        [1, 2],
    ]
    # degree 2 in (x, y): the planes are 1, x, x^2, y, xy, y^2 (scaled coordinates)
    rng = np.random.default_rng(3)
    basis = rng.normal(size=(6, 5, 5))
    basis[0] += 10.0
    cards = {
        "POLNAXIS": 2,
        "POLGRP1": 1,
        "POLNAME1": "X_IMAGE",
        "POLZERO1": 100.0,
        "POLSCAL1": 50.0,
        "POLGRP2": 1,
        "POLNAME2": "Y_IMAGE",
        "POLZERO2": 60.0,
        "POLSCAL2": 20.0,
        "POLNGRP": 1,
        "POLDEG1": 2,
        "PSF_SAMP": 1.0,
        "PSF_FWHM": 3.0,
        "ACCEPTED": 40,
        "LOADED": 44,
        "CHI2": 1.1,
    }
    model = read_psfex(_psfex_file(tmp_path / "v.psf", basis, cards))
    assert model.degree == 2 and (model.accepted, model.loaded) == (40, 44)
    u, v = (125.0 - 100.0) / 50.0, (50.0 - 60.0) / 20.0
    expected = sum(c * p for c, p in zip([1, u, u * u, v, u * v, v * v], basis, strict=True))
    np.testing.assert_allclose(model.evaluate(125.0, 50.0), expected, rtol=1e-5)
    np.testing.assert_allclose(model.evaluate(100.0, 60.0), basis[0], rtol=1e-6)
    bad = _psfex_file(tmp_path / "bad.psf", basis[:4], cards)
    with pytest.raises(ValueError, match="4 PSF_MASK planes for 6 polynomial terms"):
        read_psfex(bad)


def test_supersampled_psfex_model_is_resampled_to_pixels(tmp_path):
    # a PSF sampled every 0.5 pixel: sigma 3 PSF pixels is 1.5 image pixels
    fine = gaussian_stamp(20, 3.0)[None]
    cards = {"POLNAXIS": 0, "PSF_SAMP": 0.5, "PSF_FWHM": 3.53}
    model = read_psfex(_psfex_file(tmp_path / "s.psf", fine, cards))
    image = model.image(1.0, 1.0)
    assert image.shape == (21, 21) and image.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(image, gaussian_stamp(10, 1.5), atol=2e-4)
    assert measure_fwhm(image)[0] == pytest.approx(2.3548 * 1.5, rel=0.03)
