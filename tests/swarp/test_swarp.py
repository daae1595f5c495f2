"""Tests of the swarp plugin's machinery that need no SWarp: finding the program, the
generated configuration and command line, the grid header, error parsing, and both
backends run end to end with stand-in programs (see ``conftest.STAND_IN``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS
from oasis_swarp.combine import SwarpCombine, SwarpCombineOptions, combine_settings
from oasis_swarp.mr import SwarpMr, SwarpMrOptions, mr_settings
from oasis_swarp.swarp import (
    CONFIG_NAME,
    FILES,
    FORCED,
    USER_CONFIG,
    find_program,
    grid_wcs_header,
    output_header_text,
    swarp_command,
    swarp_config,
    swarp_error,
)

from oasis_core.contracts.backends import CombineBackend, MrBackend
from oasis_core.contracts.errors import BackendUnavailable, StageError
from oasis_core.contracts.model import Template

from .conftest import make_frame, make_residual, write_program


def tan_header(shape, crval=(150.0, 2.0), scale=0.5):
    ny, nx = shape
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = list(crval)
    w.wcs.crpix = [nx / 2.0, ny / 2.0]
    w.wcs.cd = np.array([[-scale / 3600.0, 0.0], [0.0, scale / 3600.0]])
    h = w.to_header()
    h["OBJECT"] = "field"
    return h


def three_frames(shape=(20, 30), *, header=None, seed=0):
    rng = np.random.default_rng(seed)
    frames = []
    for i in range(3):
        data = rng.normal(0.0, 10.0, shape)  # sky-subtracted: half the pixels negative
        weight = np.ones(shape)
        frames.append(make_frame(data, weight, name=f"frame{i}", header=header, noise=10.0))
    return frames


# ------------------------------------------------------------------ the program


def test_find_program_searches_swarp_then_lowercase(tmp_path, monkeypatch):
    directory = tmp_path / "bin"
    directory.mkdir()
    lower = write_program(directory / "swarp", "")
    monkeypatch.setenv("PATH", str(directory))
    assert find_program("", "combine.swarp") == str(lower.resolve())
    upper = write_program(directory / "SWarp", "")
    assert find_program("", "combine.swarp") == str(upper.resolve())
    assert find_program(str(lower), "combine.swarp") == str(lower.resolve())


def test_missing_program_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(BackendUnavailable) as err:
        SwarpCombine().check(SwarpCombineOptions())
    message = str(err.value)
    assert "combine backend 'swarp'" in message
    assert "'SWarp'" in message
    assert "apt-get install swarp" in message
    assert '[combine.swarp] binary = "/path/to/SWarp"' in message
    assert "\n" not in message
    with pytest.raises(BackendUnavailable, match=r"mr backend 'swarp'.*\[mr\.swarp\] binary"):
        SwarpMr().check(SwarpMrOptions())
    with pytest.raises(BackendUnavailable, match="'/no/such/SWarp' not found"):
        SwarpMr().check(SwarpMrOptions(binary="/no/such/SWarp"))
    with pytest.raises(BackendUnavailable):  # the stage method checks too
        SwarpCombine().combine(three_frames(), options=SwarpCombineOptions(), workdir=tmp_path)


def test_backends_are_registered_by_the_plugin(plugin_manager):
    combine = [b for group in plugin_manager.hook.oasis_combine_backends() for b in group]
    mr = [b for group in plugin_manager.hook.oasis_mr_backends() for b in group]
    assert any(isinstance(b, SwarpCombine) for b in combine)
    assert any(isinstance(b, SwarpMr) for b in mr)
    assert isinstance(SwarpCombine(), CombineBackend)
    assert isinstance(SwarpMr(), MrBackend)
    assert SwarpCombine.user_files == SwarpMr.user_files == ("default.swarp",)


# ----------------------------------------------------------------------- options


def test_options_accept_any_case_and_reject_unknown_types():
    opts = SwarpCombineOptions(combine_type="weighted", resampling_type="lanczos3")
    assert opts.combine_type == "WEIGHTED"
    assert opts.resampling_type == "LANCZOS3"
    defaults = SwarpCombineOptions()
    assert (defaults.combine_type, defaults.resampling_type) == ("MEDIAN", "NEAREST")
    assert (defaults.subtract_back, defaults.nthreads, defaults.binary) == (False, 0, "")
    with pytest.raises(ValueError, match=r"combine_type = 'CHI-MEAN': must be one of MEDIAN,"):
        SwarpCombineOptions(combine_type="CHI-MEAN")
    with pytest.raises(ValueError, match=r"resampling_type = 'CUBIC': must be one of NEAREST"):
        SwarpMrOptions(resampling_type="CUBIC")
    with pytest.raises(ValueError, match=r"nthreads = -1: must be an integer >= 0"):
        SwarpCombineOptions(nthreads=-1)


def test_generated_settings_follow_the_options():
    s = combine_settings(
        SwarpCombineOptions(resampling_type="bilinear", subtract_back=True, nthreads=2)
    )
    assert s["RESAMPLING_TYPE"] == "BILINEAR"
    assert s["SUBTRACT_BACK"] == "Y"
    assert s["NTHREADS"] == "2"
    assert combine_settings(SwarpCombineOptions())["SUBTRACT_BACK"] == "N"
    m = mr_settings(SwarpMrOptions(nthreads=3))
    assert (m["SUBTRACT_BACK"], m["NTHREADS"], m["RESAMPLING_TYPE"]) == ("N", "3", "NEAREST")
    # what the backends rely on is forced, never left to a configuration file
    for key in FORCED:
        assert key not in s
        assert key not in m


def test_config_text_and_command_line():
    text = swarp_config({"RESAMPLING_TYPE": "NEAREST", "NTHREADS": "0"}, title="t")
    lines = [line.split() for line in text.splitlines() if not line.startswith("#")]
    assert lines == [["RESAMPLING_TYPE", "NEAREST"], ["NTHREADS", "0"]]
    cmd = swarp_command(
        "/usr/bin/SWarp",
        ["in_000.fits", "in_001.fits"],
        config="default.swarp",
        forced={"COMBINE_TYPE": "MEDIAN", "WEIGHT_TYPE": "MAP_WEIGHT"},
    )
    assert cmd == [
        "/usr/bin/SWarp",
        "in_000.fits",
        "in_001.fits",
        "-c",
        "default.swarp",
        "-COMBINE_TYPE",
        "MEDIAN",
        "-WEIGHT_TYPE",
        "MAP_WEIGHT",
    ]


def test_swarp_error_picks_its_own_message():
    real = (
        "\n> WARNING: default.swarp not found, using internal defaults\n\n\n"
        "FITSIO status = 108: error reading from FITS file\nError reading data buffer\n"
        "ffopen could not interpret primary array header of file: \nbad.fits\n\n"
        "> *Error*: bad.fits not found\n\n"
    )
    assert swarp_error(real) == (
        "*Error*: bad.fits not found (FITSIO status = 108: error reading from FITS file)"
    )
    assert swarp_error("\n> COMBINE_TYPE set to an unknown keyword\n\n") == (
        "COMBINE_TYPE set to an unknown keyword"
    )
    assert swarp_error("\x1b[1M> WARNING: FOO keyword unknown\n") == "WARNING: FOO keyword unknown"
    assert swarp_error("", "only stdout\n") == "only stdout"
    assert swarp_error("", "") == "(no output)"


# ------------------------------------------------------------------------ the grid


def test_bare_headers_get_one_synthetic_wcs():
    header, source = grid_wcs_header([fits.Header(), None], (20, 30))
    assert source == "synthetic"
    wcs = WCS(header)
    assert wcs.has_celestial
    # the grid's centre pixel is the reference point
    np.testing.assert_allclose(wcs.wcs.crpix, [15.5, 10.5])


def test_own_wcs_is_used_when_the_headers_agree():
    h = tan_header((20, 30))
    header, source = grid_wcs_header([h, h.copy(), fits.Header()], (20, 30))
    assert source == "own"
    assert "OBJECT" not in header  # WCS cards only
    xy = np.array([[0.0, 0.0], [29.0, 19.0], [3.3, 7.7]])
    np.testing.assert_allclose(WCS(header).wcs_pix2world(xy, 0), WCS(h).wcs_pix2world(xy, 0))


def test_disagreeing_wcs_falls_back_to_synthetic():
    # the frames are registered on one grid: pixels are the truth, not a stale WCS
    shifted = tan_header((20, 30))
    shifted["CRPIX1"] += 2.0
    header, source = grid_wcs_header([tan_header((20, 30)), shifted], (20, 30))
    assert source.startswith("synthetic: input 1's WCS differs from input 0's by 2 px")
    assert header["CRVAL1"] == 180.0


def test_inputs_from_a_generator_are_written_as_they_come(stand_in, tmp_path):
    """A generator of inputs (the mr backend's residuals read one at a time) gives the
    files and the result a list gives, the grid's WCS included: here the third input's
    WCS disagrees, so the two written before it are rewritten on the synthetic grid."""
    from oasis_swarp.swarp import SwarpImage, run_swarp

    shifted = tan_header((20, 30))
    shifted["CRPIX1"] += 2.0
    headers = [tan_header((20, 30)), tan_header((20, 30)), shifted]
    rng = np.random.default_rng(1)
    images = [
        SwarpImage(
            name=f"im{i}", data=rng.normal(size=(20, 30)), weight=np.ones((20, 30)), header=h
        )
        for i, h in enumerate(headers)
    ]
    runs = {}
    for label, given in (("list", images), ("generator", iter(images))):
        work = tmp_path / label
        runs[label] = run_swarp(
            stand_in("numpy"),
            given,
            settings={},
            combine_type="WEIGHTED",
            workdir=work,
            where="test",
        )
        for i in range(3):
            assert fits.getheader(work / f"in_00{i}.fits")["CRVAL1"] == 180.0
            assert fits.getheader(work / f"in_00{i}.weight.fits")["CRVAL1"] == 180.0
            np.testing.assert_allclose(
                fits.getdata(work / f"in_00{i}.fits"), images[i].data, rtol=1e-6
            )
        assert "in_002.fits=im2" in (work / FILES["log"]).read_text()
    assert runs["generator"].wcs == runs["list"].wcs
    assert runs["list"].wcs.startswith("synthetic: input 2's WCS differs")
    np.testing.assert_array_equal(runs["generator"].data, runs["list"].data)
    with pytest.raises(StageError, match="test: nothing to combine"):
        run_swarp(
            "SWarp", iter([]), settings={}, combine_type="WEIGHTED", workdir=tmp_path, where="test"
        )


def test_output_header_fixes_the_shape_and_wcs():
    h = tan_header((20, 30))
    text = output_header_text(h, (20, 30))
    assert text.endswith("END\n")
    back = fits.Header.fromstring(text, sep="\n")
    assert (back["NAXIS"], back["NAXIS1"], back["NAXIS2"]) == (2, 30, 20)
    assert back["CTYPE1"] == "RA---TAN"
    assert back["CRVAL1"] == pytest.approx(150.0)


# ------------------------------------------------- the backends, with a stand-in


def test_combine_runs_swarp_with_the_forced_settings(stand_in, tmp_path):
    frames = three_frames(header=tan_header((20, 30)))
    work = tmp_path / "work"
    t = SwarpCombine().combine(
        frames, options=SwarpCombineOptions(binary=stand_in("numpy")), workdir=work
    )
    args = json.loads((work / "args.json").read_text())
    assert args["inputs"] == ["in_000.fits", "in_001.fits", "in_002.fits"]
    assert args["config"] == CONFIG_NAME
    assert "RESAMPLING_TYPE        NEAREST" in args["config_text"]
    assert "SUBTRACT_BACK          N" in args["config_text"]
    forced = args["forced"]
    for key, value in FORCED.items():
        assert forced[key] == value
    assert forced["COMBINE_TYPE"] == "MEDIAN"
    assert forced["WEIGHT_IMAGE"] == "in_000.weight.fits,in_001.weight.fits,in_002.weight.fits"
    assert forced["VERBOSE_TYPE"] == "QUIET"
    assert forced["FSCALASTRO_TYPE"] == "NONE"
    # generated files stay in the workdir, with a log of the command
    log = (work / FILES["log"]).read_text()
    assert log.startswith("# SWarp in_000.fits in_001.fits in_002.fits -c oasis.swarp")
    assert "in_001.fits=frame1" in log
    # the inputs carry the frames' pixels (negative ones included) and one WCS
    written = fits.getdata(work / "in_001.fits")
    np.testing.assert_array_equal(written, frames[1].data)
    assert fits.getheader(work / "in_001.fits")["CRVAL1"] == pytest.approx(150.0)
    assert isinstance(t, Template)
    np.testing.assert_allclose(t.data, np.median([f.data for f in frames], axis=0), rtol=1e-6)
    assert t.data.shape == (20, 30) and t.data.dtype == np.float32
    assert t.meta["wcs"] == "own"
    assert t.meta["swarp_version"] == "stand-in"
    assert t.meta["command"].startswith("SWarp in_000.fits")


def test_combine_template_weight_header_and_fill(stand_in, tmp_path):
    frames = three_frames()
    noisy = make_frame(frames[2].data, frames[2].weight, name="noisy", noise=20.0)
    hole = np.ones((20, 30))
    hole[4, 5] = 0
    frames = [
        make_frame(frames[0].data, hole, name="a", noise=10.0, background=5.0),
        make_frame(frames[1].data, hole, name="b", noise=10.0, background=7.0),
        noisy,
    ]
    hole_everywhere = make_frame(frames[0].data, hole, name="c", noise=10.0)
    work = tmp_path / "w"
    t = SwarpCombine().combine(
        frames, options=SwarpCombineOptions(binary=stand_in("numpy")), workdir=work
    )
    # MAP_WEIGHT = weight / variance relative to the least noisy frame
    np.testing.assert_allclose(fits.getdata(work / "in_002.weight.fits"), 0.25)
    assert fits.getdata(work / "in_000.weight.fits")[4, 5] == 0
    # the stand-in's output weight is the sum (2.25 at most), normalised by its maximum
    assert t.weight.max() == pytest.approx(1.0)
    assert t.weight[4, 5] == pytest.approx(0.25 / 2.25)
    assert t.data[4, 5] == pytest.approx(noisy.data[4, 5])
    assert t.inputs == ("a", "b", "noisy")
    assert t.header["NCOMBINE"] == 3
    assert t.header["COMBTYPE"] == "MEDIAN"
    assert list(t.header["HISTORY"]) == [
        "oasis combine input: a",
        "oasis combine input: b",
        "oasis combine input: noisy",
    ]
    assert t.background == pytest.approx(6.0)  # median of the known backgrounds
    # where no frame has data: weight 0 and the background as fill
    t2 = SwarpCombine().combine(
        [hole_everywhere, hole_everywhere],
        options=SwarpCombineOptions(binary=stand_in("numpy")),
        workdir=tmp_path / "w2",
    )
    assert t2.weight[4, 5] == 0
    assert t2.data[4, 5] == 0  # no background known: 0
    assert t2.meta["frac_no_data"] == pytest.approx(1 / 600)


def test_effective_gain_of_a_median(stand_in, tmp_path):
    frames = [
        make_frame(f.data, f.weight, name=f.name, noise=10.0, gain=2.0, readnoise=4.0)
        for f in three_frames()
    ]
    t = SwarpCombine().combine(
        frames, options=SwarpCombineOptions(binary=stand_in("numpy")), workdir=tmp_path
    )
    assert t.gain == pytest.approx(3 * 2.0 * 2.0 / np.pi)
    assert fits.getheader(tmp_path / "in_000.fits")["GAIN"] == 2.0  # for CLIPPED


def test_user_config_replaces_the_generated_one_but_not_the_forced_keys(stand_in, tmp_path):
    (tmp_path / USER_CONFIG).write_text("COMBINE_TYPE MAX\nRESAMPLING_TYPE LANCZOS2\n")
    SwarpCombine().combine(
        three_frames(), options=SwarpCombineOptions(binary=stand_in("numpy")), workdir=tmp_path
    )
    args = json.loads((tmp_path / "args.json").read_text())
    assert args["config"] == USER_CONFIG
    assert args["config_text"].startswith("COMBINE_TYPE MAX")
    assert args["forced"]["COMBINE_TYPE"] == "MEDIAN"
    assert args["keys"][-1] == "WEIGHT_IMAGE"  # forced keys follow -c: they win
    assert not (tmp_path / CONFIG_NAME).exists()


def test_mr_writes_normalised_residuals_with_unit_weights(stand_in, tmp_path):
    rng = np.random.default_rng(5)
    w = np.ones((16, 16))
    w[3, 4] = 0.0
    w[5, 5] = 0.5  # MIN_WEIGHT counts as data
    w[6, 7] = 0.3  # below it the core counts a pixel as masked: not stacked
    r1 = make_residual(rng.normal(3, 2, (16, 16)), np.full((16, 16), 2.0), w, "r1")
    r2 = make_residual(rng.normal(0, 1, (16, 16)), np.ones((16, 16)), np.ones((16, 16)), "r2")
    mr = SwarpMr().master(
        [r1, r2], options=SwarpMrOptions(binary=stand_in("numpy")), workdir=tmp_path
    )
    args = json.loads((tmp_path / "args.json").read_text())
    assert args["forced"]["COMBINE_TYPE"] == "WEIGHTED"
    assert "SUBTRACT_BACK          N" in args["config_text"]
    weight = fits.getdata(tmp_path / "in_000.weight.fits")
    assert weight[3, 4] == 0 and weight[5, 5] == 1 and set(np.unique(weight)) == {0.0, 1.0}
    assert weight[6, 7] == 0
    written = np.where(weight > 0, r1.normalized, 0)  # pixels of weight 0 are written as 0
    np.testing.assert_allclose(fits.getdata(tmp_path / "in_000.fits"), written)
    expected = (r1.normalized + r2.normalized) / 2
    expected[3, 4] = r2.normalized[3, 4]
    expected[6, 7] = r2.normalized[6, 7]
    np.testing.assert_allclose(mr.data, expected, rtol=1e-5, atol=1e-6)
    assert mr.noise[3, 4] == pytest.approx(1.0)
    assert mr.noise[0, 0] == pytest.approx(1 / np.sqrt(2))
    assert mr.weight[3, 4] == pytest.approx(0.5)
    assert mr.weight[6, 7] == pytest.approx(0.5)
    assert mr.name == "MR" and mr.template == "template"
    assert mr.meta["n_residuals"] == 2 and mr.meta["inputs"] == "r1,r2"


# ------------------------------------------------------------------------ errors


def test_failing_program_gives_one_line_naming_the_inputs(stand_in, tmp_path):
    with pytest.raises(StageError) as err:
        SwarpCombine().combine(
            three_frames(), options=SwarpCombineOptions(binary=stand_in("fail")), workdir=tmp_path
        )
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("combine backend 'swarp': 'frame0', 'frame1', 'frame2'")
    assert "exited with code 2" in message
    # SWarp's own line, with the workdir's file name mapped to the frame
    assert "*Error*: in_001.fits ('frame1') not found (FITSIO status = 108)" in message
    assert err.value.metadata["returncode"] == 2
    assert "exit code 2" in (tmp_path / FILES["log"]).read_text()


def test_mr_weighs_a_residual_with_correlated_noise_by_its_psf_scale_noise(stand_in, tmp_path):
    import attrs

    rng = np.random.default_rng(6)
    w = np.ones((16, 16))
    w[3, 4] = 0.0
    r1 = make_residual(rng.normal(0, 1, (16, 16)), np.ones((16, 16)), w, "r1")
    r1 = attrs.evolve(r1, meta={"noise_correlation": 2.0})  # as the core records it
    r2 = make_residual(rng.normal(0, 1, (16, 16)), np.ones((16, 16)), np.ones((16, 16)), "r2")
    mr = SwarpMr().master(
        [r1, r2], options=SwarpMrOptions(binary=stand_in("numpy")), workdir=tmp_path
    )
    weight = fits.getdata(tmp_path / "in_000.weight.fits")
    assert weight[3, 4] == 0 and weight[0, 0] == pytest.approx(0.25)
    expected = (0.25 * r1.normalized + r2.normalized) / 1.25
    expected[3, 4] = r2.normalized[3, 4]
    np.testing.assert_allclose(mr.data, expected, rtol=1e-5, atol=1e-6)
    assert mr.noise[0, 0] == pytest.approx(np.sqrt(0.25**2 + 1) / 1.25)
    assert mr.noise[3, 4] == pytest.approx(1.0)
    assert mr.weight[0, 0] == 1.0 and mr.weight[3, 4] == 0.5  # residuals with data, as ever


def test_mr_failure_names_the_residuals(stand_in, tmp_path):
    res = [make_residual(np.ones((8, 8)), np.ones((8, 8)), np.ones((8, 8)), f"r{i}") for i in "ab"]
    with pytest.raises(StageError, match=r"^mr backend 'swarp': 'ra', 'rb': SWarp exited"):
        SwarpMr().master(res, options=SwarpMrOptions(binary=stand_in("fail")), workdir=tmp_path)


def test_no_output_wrong_shape_and_timeout(stand_in, tmp_path):
    frames = three_frames()
    with pytest.raises(
        StageError, match=r"exited 0 but wrote no coadd\.fits or coadd\.weight\.fits"
    ):
        SwarpCombine().combine(
            frames, options=SwarpCombineOptions(binary=stand_in("silent")), workdir=tmp_path
        )
    with pytest.raises(StageError, match=r"wrote a \(5, 5\) image for \(20, 30\) inputs"):
        SwarpCombine().combine(
            frames, options=SwarpCombineOptions(binary=stand_in("small")), workdir=tmp_path
        )
    with pytest.raises(StageError, match=r"did not finish within 0.5 s \(option timeout\)"):
        SwarpCombine().combine(
            frames,
            options=SwarpCombineOptions(binary=stand_in("sleep"), timeout=0.5),
            workdir=tmp_path,
        )


def test_shape_mismatch_and_empty_input_fail_before_running(stand_in, tmp_path):
    frames = [*three_frames(), make_frame(np.zeros((10, 10)), name="odd")]
    with pytest.raises(StageError, match=r"'odd' has shape \(10, 10\), 'frame0' has \(20, 30\)"):
        SwarpCombine().combine(
            frames, options=SwarpCombineOptions(binary=stand_in("numpy")), workdir=tmp_path
        )
    assert not (tmp_path / "args.json").exists()
    with pytest.raises(StageError, match="no frame to combine"):
        SwarpCombine().combine([], options=SwarpCombineOptions(), workdir=tmp_path)
    with pytest.raises(StageError, match="no residual to combine"):
        SwarpMr().master([], options=SwarpMrOptions(), workdir=tmp_path)
