"""Tests of the swarp backends running the real SWarp program (skipped without it): hand
computed medians and means, simulated series, the real DECam and ISIS frames, a corrupt
input and a user ``default.swarp``."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from oasis_native.combine import NativeCombine, NativeCombineOptions
from oasis_native.mr import NativeMr, NativeMrOptions
from oasis_swarp.combine import SwarpCombine, SwarpCombineOptions
from oasis_swarp.mr import SwarpMr, SwarpMrOptions
from oasis_swarp.swarp import USER_CONFIG

from oasis_core.contracts.errors import StageError

from .conftest import make_frame, make_residual, write_program

SWARP = shutil.which("SWarp") or shutil.which("swarp")
pytestmark = pytest.mark.skipif(SWARP is None, reason="SWarp not on PATH (apt-get install swarp)")


def combine(frames, workdir, **opts):
    return SwarpCombine().combine(frames, options=SwarpCombineOptions(**opts), workdir=workdir)


def mad_std(values):
    values = np.asarray(values, np.float64)
    return 1.4826 * float(np.median(np.abs(values - np.median(values))))


def test_median_equals_numpy_with_a_masked_pixel(tmp_path):
    rng = np.random.default_rng(1)
    data = rng.normal(0.0, 10.0, (3, 24, 32))  # sky-subtracted: negative pixels
    data[:, 5, 7] = [-5000.0, -4000.0, -3000.0]  # very negative pixels must survive
    data[1, 6, 7] = 1.0e6  # masked below: must not leak into the median
    weights = np.ones_like(data)
    weights[1, 6, 7] = 0.0
    weights[:, 9, 9] = 0.0  # no frame has data here
    frames = [make_frame(data[i], weights[i], name=f"f{i}") for i in range(3)]
    t = combine(frames, tmp_path)

    expected = np.median(data, axis=0)
    expected[6, 7] = np.median(data[[0, 2], 6, 7])  # the masked value left out
    good = np.ones(expected.shape, bool)
    good[9, 9] = False
    np.testing.assert_allclose(t.data[good], expected[good], rtol=1e-6, atol=1e-4)
    assert t.data[5, 7] == pytest.approx(-4000.0)  # negative values are not clipped
    assert t.weight[9, 9] == 0 and t.data[9, 9] == 0
    assert t.weight[6, 7] < t.weight[0, 0] == pytest.approx(1.0)
    assert t.meta["wcs"] == "synthetic"
    assert t.meta["swarp_version"]
    assert t.data.shape == (24, 32) and t.data.dtype == np.float32


def test_weighted_is_the_inverse_variance_mean(tmp_path):
    rng = np.random.default_rng(2)
    data = rng.normal(0.0, 1.0, (2, 16, 16))
    weights = np.ones_like(data)
    weights[0, 3, 3] = 0.0
    frames = [
        make_frame(data[0], weights[0], name="a", noise=1.0),
        make_frame(data[1], weights[1], name="b", noise=2.0),
    ]
    t = combine(frames, tmp_path, combine_type="weighted")
    expected = (data[0] + data[1] / 4.0) / 1.25
    expected[3, 3] = data[1, 3, 3]
    np.testing.assert_allclose(t.data, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(t.weight[3, 3], 0.25 / 1.25, rtol=1e-5)  # sum of 1/var
    assert t.header["COMBTYPE"] == "WEIGHTED"


def test_simulated_frames_match_the_native_median(tmp_path):
    from oasis_native.sim import simulate_series

    series = simulate_series(
        4,
        (128, 128),
        seed=5,
        n_transients=1,
        max_shift=0.0,
        max_rotation_deg=0.0,
        sky_subtracted=True,
    )
    rng = np.random.default_rng(0)
    frames = []
    for name, (data, header) in zip(series.names, series.frames, strict=True):
        weight = (rng.random(data.shape) > 0.01).astype(np.float32)  # cosmic-ray masks
        frames.append(make_frame(data, weight, name=name, header=header, gain=1.5))
    t = combine(frames, tmp_path / "swarp")
    native = NativeCombine().combine(
        frames, options=NativeCombineOptions(), workdir=tmp_path / "native"
    )
    good = native.weight > 0
    assert t.meta["wcs"] == "own"  # the simulator's TAN WCS, shared by the frames
    np.testing.assert_array_equal(t.weight > 0, good)
    np.testing.assert_allclose(t.data[good], native.data[good], rtol=1e-6, atol=1e-3)
    assert t.header["NCOMBINE"] == 4
    assert t.header["CTYPE1"] == series.frames[0][1]["CTYPE1"]  # the first frame's header
    assert t.noise < min(mad_std(f.data[f.weight > 0]) for f in frames)


def test_decam_template_is_less_noisy_than_a_frame(shared_data, tmp_path):
    from oasis_core.engine.io import read_frame

    paths = sorted((shared_data / "decam_n6").glob("DEC-OBS04?.mini.fits"))
    assert len(paths) == 5
    frames = [read_frame(p, warn=False) for p in paths]
    t = combine(frames, tmp_path)
    assert t.meta["wcs"] == "own"  # their TPV WCS, one grid
    assert t.data.shape == frames[0].shape
    assert float(t.weight.min()) > 0  # nothing lost at the edges
    assert t.inputs == tuple(f.name for f in frames)

    # sky noise: the quietest quarter of 16x16 boxes (away from the stars)
    def sky_noise(image):
        boxes = image[:256, :256].reshape(16, 16, 16, 16).swapaxes(1, 2).reshape(256, -1)
        stds = np.sort([mad_std(b) for b in boxes])
        return float(np.median(stds[:64]))

    single = sky_noise(frames[0].data)
    stacked = sky_noise(t.data)
    assert stacked < 0.75 * single  # a median of 5: ~ sqrt(pi/2 / 5) = 0.56
    median = np.median(np.stack([f.data for f in frames]), axis=0)
    np.testing.assert_allclose(t.data, median, rtol=1e-5, atol=1e-2)


def test_isis_bare_headers_get_a_synthetic_wcs(shared_data, tmp_path):
    from oasis_core.engine.io import read_frame

    folder = shared_data / "isis_example"
    frames = [read_frame(folder / f"infile{i}.fits", warn=False) for i in range(3)]
    t = combine(frames, tmp_path)
    assert t.meta["wcs"] == "synthetic"
    np.testing.assert_allclose(
        t.data, np.median(np.stack([f.data for f in frames]), axis=0), rtol=1e-6
    )


def test_lanczos_from_the_user_config_is_used_and_combine_type_forced(tmp_path):
    # default.swarp as `SWarp -d` writes it would set MAX and LANCZOS3; the combine type
    # is forced to the option's (MEDIAN), the resampling is the user's
    (tmp_path / USER_CONFIG).write_text(
        "COMBINE_TYPE MAX\nRESAMPLING_TYPE LANCZOS3\nSUBTRACT_BACK N\nIMAGE_SIZE 10,10\n"
    )
    rng = np.random.default_rng(3)
    data = rng.normal(0.0, 5.0, (3, 32, 32))
    frames = [make_frame(d, name=f"f{i}") for i, d in enumerate(data)]
    t = combine(frames, tmp_path)
    assert t.meta["config"] == USER_CONFIG
    assert t.data.shape == (32, 32)  # the forced grid wins over IMAGE_SIZE
    assert t.weight[0, 0] == 0  # LANCZOS3 leaves the edges without data
    inner = t.weight > 0
    np.testing.assert_allclose(t.data[inner], np.median(data, axis=0)[inner], rtol=1e-4, atol=1e-3)


def test_corrupt_input_gives_swarps_message(tmp_path):
    # a wrapper that truncates the second input, then runs the real program
    wrapper = write_program(
        tmp_path / "SWarp",
        "import os, sys\n"
        "open('in_001.fits', 'r+b').truncate(100)\n"
        f"os.execv({SWARP!r}, [{SWARP!r}, *sys.argv[1:]])\n",
    )
    frames = [make_frame(np.ones((16, 16)), name=n) for n in ("good", "broken", "other")]
    work = tmp_path / "work"
    with pytest.raises(StageError) as err:
        combine(frames, work, binary=str(wrapper))
    message = str(err.value)
    assert "\n" not in message
    assert "'good', 'broken', 'other'" in message
    assert "SWarp exited with code" in message
    assert "in_001.fits ('broken') not found (FITSIO status" in message
    assert "Error" in (work / "swarp.log").read_text()


def residuals_for_mr(shape=(48, 64), n=4, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        sigma = 1.0 + i
        data = rng.normal(2.0 * i, sigma, shape)
        weight = (rng.random(shape) > 0.05).astype(np.float32)  # 0/1, as subtractions write
        weight[0, :5] = 0.0  # no residual has data there
        noise = np.full(shape, sigma)
        noise[10, 10 + i] = 0.0  # no noise estimate: not data
        out.append(make_residual(data, noise, weight, f"r{i}"))
    return out


def test_mr_equals_the_native_master_residual(tmp_path):
    residuals = residuals_for_mr()
    mr = SwarpMr().master(residuals, options=SwarpMrOptions(), workdir=tmp_path / "swarp")
    native = NativeMr().master(residuals, options=NativeMrOptions(), workdir=tmp_path / "native")
    np.testing.assert_allclose(mr.data, native.data, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mr.noise, native.noise, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(mr.weight, native.weight, rtol=1e-6)
    assert (mr.weight[0, :5] == 0).all() and (mr.data[0, :5] == 0).all()
    assert mr.name == native.name == "MR"
    assert mr.template == native.template
    assert mr.header["NCOMBINE"] == native.header["NCOMBINE"] == 4
    assert list(mr.header["HISTORY"]) == list(native.header["HISTORY"])
    assert mr.meta["n_residuals"] == 4 and mr.meta["inputs"] == native.meta["inputs"]
    assert mr.meta["frac_no_data"] == pytest.approx(native.meta["frac_no_data"])
    # in sigma units: unit variance where all four residuals count
    full = mr.weight == 1
    assert np.std(mr.data[full] / mr.noise[full]) == pytest.approx(1.0, rel=0.1)
