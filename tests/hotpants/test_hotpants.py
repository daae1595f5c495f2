"""Tests of the ``hotpants`` subtract backend (Becker's HOTPANTS run as a program).

Argument building, output parsing and the error paths always run (fake ``hotpants``
scripts stand in for the program); the real runs need ``hotpants`` on PATH and are
skipped otherwise. Pairs come from ``oasis_native.sim.simulate_pair`` (Moffat stars,
science FWHM 4 px, template 3 px, transients in the science frame only).
"""

from __future__ import annotations

import math
import os
import shutil
import stat
import sys
from pathlib import Path

import attrs
import numpy as np
import pytest
from oasis_hotpants.backend import (
    FILES,
    MASK_BAD,
    HotpantsOptions,
    HotpantsSubtract,
    hotpants_arguments,
    kernel_image,
    parse_stderr,
    read_hotpants_output,
)

from oasis_core.contracts.backends import SubtractBackend
from oasis_core.contracts.errors import BackendUnavailable, ConfigError, StageError
from oasis_core.contracts.model import Frame, Residual, Template

HAVE_HOTPANTS = shutil.which("hotpants") is not None
needs_hotpants = pytest.mark.skipif(
    not HAVE_HOTPANTS,
    reason="hotpants not on PATH (build it from https://github.com/acbecker/hotpants)",
)

SHAPE = (256, 256)


def _frames(seed=4, *, fwhm_s=4.0, fwhm_t=3.0, sky_subtracted=False, **kw):
    from oasis_native.sim import simulate_pair

    (s, sh), (t, th), truth = simulate_pair(
        SHAPE,
        seed=seed,
        fwhm_science=fwhm_s,
        fwhm_template=fwhm_t,
        sky_subtracted=sky_subtracted,
        template_depth=4,
        **kw,
    )

    def frame(cls, data, hdr, fwhm, name):
        return cls(
            data=data,
            header=hdr,
            gain=hdr["GAIN"],
            readnoise=hdr["RDNOISE"],
            saturation=hdr["SATURATE"],
            fwhm=fwhm,
            name=name,
        )

    return frame(Frame, s, sh, fwhm_s, "sci"), frame(Template, t, th, fwhm_t, "tpl"), truth


@pytest.fixture(scope="module")
def pair():
    """A pair that keeps its sky (300 ADU), and its truth table."""
    return _frames()


@pytest.fixture(scope="module")
def skysub_pair():
    """The same field, sky-subtracted (a third of the pixels are negative)."""
    return _frames(sky_subtracted=True)


def flags(args: list[str]) -> dict[str, list[str]]:
    """hotpants arguments as {flag: [values]} (negative numbers are values, not flags)."""
    out: dict[str, list[str]] = {}
    key = None
    for token in args:
        if token.startswith("-") and token[1:].isalpha():
            key = token
            out[key] = []
        else:
            assert key is not None, token
            out[key].append(token)
    return out


def one(args: list[str], flag: str) -> float:
    (value,) = flags(args)[flag]
    return float(value)


def readonly(*frames: Frame) -> None:
    for f in frames:  # the core hands out read-only arrays
        f.data.flags.writeable = False
        f.weight.flags.writeable = False


def aperture(image: np.ndarray, x: float, y: float, r: float) -> float:
    yy, xx = np.mgrid[: image.shape[0], : image.shape[1]]
    return float(image[(xx - x) ** 2 + (yy - y) ** 2 <= r * r].sum(dtype=np.float64))


# ----------------------------------------------------------------- the contract


def test_backend_is_registered_with_documented_toml_options(plugin_manager):
    from oasis_core.engine.plugins import Registry

    record = Registry(plugin_manager).get("subtract", "hotpants")
    assert isinstance(record.backend, HotpantsSubtract)
    assert isinstance(record.backend, SubtractBackend)
    assert record.backend.name == "hotpants"
    assert record.backend.Options is HotpantsOptions
    assert record.backend.needs_psf  # FWHMs choose the direction and the kernel size
    for field in attrs.fields(HotpantsOptions):
        assert field.metadata["help"], field.name
        assert field.default is not None, f"{field.name}: TOML has no null"
        assert isinstance(field.default, bool | int | float | str), field.name
    o = HotpantsOptions()
    assert (o.binary, o.ko, o.bgo, o.nsx, o.nsy, o.normalize, o.convolve) == (
        "hotpants",
        2,
        1,
        10,
        10,
        "i",
        "auto",
    )


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("convolve", "template"),
        ("normalize", "x"),
        ("ng", "3 6 0.7 4"),
        ("ng", "one 6 0.7"),
        ("max_masked", 0.0),
        ("nsx", 0),
        ("extra", "-ks '3"),
    ],
)
def test_invalid_options_are_rejected_with_their_name(key, value):
    with pytest.raises(ValueError, match=key):
        HotpantsOptions(**{key: value})


# ------------------------------------------------------------ argument mapping


def test_sky_subtracted_frames_get_lower_limits_below_their_negative_pixels(skysub_pair):
    sci, tpl, _ = skysub_pair
    assert (sci.data < 0).mean() > 0.2 and (tpl.data < 0).mean() > 0.2
    args = hotpants_arguments(sci, tpl)
    # hotpants' default lower level (0) would mask every sky pixel at or below zero
    assert one(args, "-il") < sci.data.min()
    assert one(args, "-tl") < tpl.data.min()


def test_lower_limits_follow_the_sky_of_frames_that_keep_it(pair):
    sci, tpl, _ = pair
    args = hotpants_arguments(sci, tpl)
    med = float(np.median(sci.data))
    assert 0 < one(args, "-il") < med - 5 * 10  # 10 sigma below a sky of noise ~13 ADU
    assert one(args, "-il") < sci.data.min()
    args3 = hotpants_arguments(sci, tpl, HotpantsOptions(lower_nsigma=3.0))
    assert one(args, "-il") < one(args3, "-il") < med


def test_saturation_gives_the_upper_limits(pair):
    sci, tpl, _ = pair
    args = hotpants_arguments(
        attrs.evolve(sci, saturation=50000.0), attrs.evolve(tpl, saturation=40000.0)
    )
    assert (one(args, "-iu"), one(args, "-tu")) == (50000.0, 40000.0)
    # unknown saturation: no cut (just above the brightest good pixel), not hotpants' 25000
    args = hotpants_arguments(
        attrs.evolve(sci, saturation=None), attrs.evolve(tpl, saturation=None)
    )
    assert sci.data.max() < one(args, "-iu") < 1.01 * sci.data.max() + 100
    assert tpl.data.max() < one(args, "-tu") < 1.01 * tpl.data.max() + 100
    args = hotpants_arguments(sci, tpl, HotpantsOptions(upper=30000.0))
    assert one(args, "-iu") == one(args, "-tu") == 30000.0


def test_gain_and_read_noise_come_from_the_frames_with_fallbacks(pair, skysub_pair):
    sci, tpl, _ = pair
    args = hotpants_arguments(sci, tpl)
    assert (one(args, "-ig"), one(args, "-ir")) == (1.5, 5.0)
    assert one(args, "-tg") == pytest.approx(6.0)  # template: 4 exposures averaged
    assert one(args, "-tr") == pytest.approx(10.0)
    # no GAIN: a frame keeping its sky gets the sky's photon statistics, sky / noise**2
    args = hotpants_arguments(attrs.evolve(sci, gain=None, readnoise=None), tpl)
    assert one(args, "-ig") == pytest.approx(1.5, rel=0.15)
    assert 0 <= one(args, "-ir") < 10
    # sky-subtracted and no GAIN: gain 1, and the read noise that gives the sky noise
    ssci, stpl, _ = skysub_pair
    args = hotpants_arguments(attrs.evolve(ssci, gain=None, readnoise=None), stpl)
    assert one(args, "-ig") == 1.0
    sigma = math.sqrt(300.0 / 1.5 + (5.0 / 1.5) ** 2)  # sky noise of the simulation, ADU
    assert one(args, "-ir") == pytest.approx(sigma, rel=0.1)


@pytest.mark.parametrize(
    ("fwhm_s", "fwhm_t", "expected"),
    [(4.0, 3.0, "t"), (3.0, 4.5, "i"), (3.5, 3.5, "t"), (None, 3.0, "b")],
)
def test_auto_direction_convolves_the_narrower_psf(pair, fwhm_s, fwhm_t, expected):
    sci, tpl, _ = pair
    args = hotpants_arguments(attrs.evolve(sci, fwhm=fwhm_s), attrs.evolve(tpl, fwhm=fwhm_t))
    assert flags(args)["-c"] == [expected]


def test_direction_and_normalisation_options(pair):
    sci, tpl, _ = pair
    args = hotpants_arguments(sci, tpl)
    assert flags(args)["-n"] == ["i"]  # the science frame's photometric system
    args = hotpants_arguments(sci, tpl, HotpantsOptions(convolve="i", normalize="t"))
    assert (flags(args)["-c"], flags(args)["-n"]) == (["i"], ["t"])


def test_kernel_size_and_basis_follow_the_seeing(pair):
    sci, tpl, _ = pair
    f = flags(hotpants_arguments(sci, tpl))
    assert " ".join(f["-ng"]) == "3 6 0.700 4 1.500 2 3.000"  # hotpants' own basis
    assert (f["-r"], f["-rss"]) == (["10"], ["15"])  # 2.5 x FWHM 4
    assert (f["-ko"], f["-bgo"], f["-nsx"], f["-nsy"]) == (["2"], ["1"], ["10"], ["10"])
    # much worse seeing: a wider kernel and wider Gaussians (matching sigma > 1.5 px)
    f = flags(hotpants_arguments(attrs.evolve(sci, fwhm=8.0), tpl))
    sigmas = [float(s) for s in f["-ng"][2::2]]
    match = math.sqrt(8.0**2 - 3.0**2) / (2 * math.sqrt(2 * math.log(2)))
    assert sigmas[1] == pytest.approx(match, abs=1e-3)
    assert int(f["-r"][0]) == 20 and int(f["-rss"][0]) >= 30
    # explicit values win
    options = HotpantsOptions(ng="2 4 1.0 2 2.5", r=7, rss=12, ko=1, bgo=0, nsx=5, nsy=6)
    f = flags(hotpants_arguments(sci, tpl, options))
    assert f["-ng"] == ["2", "4", "1.000", "2", "2.500"]
    assert (f["-r"], f["-rss"], f["-ko"], f["-bgo"]) == (["7"], ["12"], ["1"], ["0"])
    assert (f["-nsx"], f["-nsy"]) == (["5"], ["6"])
    with pytest.raises(ConfigError, match="rss"):
        hotpants_arguments(sci, tpl, HotpantsOptions(r=12, rss=8))


def test_files_noise_images_and_extra_arguments(pair):
    sci, tpl, _ = pair
    f = flags(hotpants_arguments(sci, tpl, HotpantsOptions(extra="-ks 3.5 -kfm 0.995")))
    assert f["-inim"] == [FILES["science"]] and f["-tmplim"] == [FILES["template"]]
    assert f["-imi"] == [FILES["science_mask"]] and f["-tmi"] == [FILES["template_mask"]]
    assert f["-ini"] == [FILES["science_noise"]] and f["-tni"] == [FILES["template_noise"]]
    assert f["-oni"] == [FILES["noise"]] and f["-oki"] == [FILES["kernel"]]
    assert (f["-ks"], f["-kfm"]) == (["3.5"], ["0.995"])
    f = flags(hotpants_arguments(sci, tpl, HotpantsOptions(noise_images=False)))
    assert "-ini" not in f and "-tni" not in f


def test_candidates_try_more_stamps_then_a_wider_kernel(pair):
    sci, tpl, _ = pair
    options = HotpantsOptions()
    first, more_stars, wider = HotpantsSubtract().candidates(sci, tpl, options=options)
    assert first is options
    assert more_stars == attrs.evolve(options, ft=10.0)
    assert (wider.r, wider.rss) == (14, 0)  # 1.4 x the automatic r = 10; rss follows
    *_, wider = HotpantsSubtract().candidates(sci, tpl, options=HotpantsOptions(r=10, rss=30))
    assert (wider.r, wider.rss) == (14, 30)


# ------------------------------------------------------------- output parsing


def _write_fake_output(directory: Path, *, ksum="1.2500", fill_edges=5, basis_ksum=1.25):
    """hotpants-like outputs: diff with fill-valued edges, noise, kernel table."""
    from astropy.io import fits

    rng = np.random.default_rng(0)
    diff = rng.normal(0, 5, (64, 64)).astype(np.float32)
    diff[:fill_edges], diff[:, :fill_edges] = 1e-30, 1e-30
    noise = np.full((64, 64), 5.0, np.float32)
    noise[:fill_edges] = 0.0
    hdr = fits.Header()
    for key, value in {
        "SOFTVERS": "5.1.11",
        "CONVOL00": "TEMPLATE",
        "KSUM00": ksum,
        "SSSIG00": "0.7621",
        "SSSCAT00": "0.0403",
        "FSIG00": "0.9360",
        "FSCAT00": "0.0536",
        "X2NRM00": "1.0520",
        "NX2NRM00": "55696",
        "DMEAN00": "-0.3176",
        "DSIGE00": "18.0724",
        "DSIG00": "16.5530",
        "PHOTNORM": "i",
        "NREGION": 1,
        "MASKVAL": 1e-30,
    }.items():
        hdr[key] = value
    fits.PrimaryHDU(diff, hdr).writeto(directory / FILES["output"], overwrite=True)
    fits.PrimaryHDU(noise).writeto(directory / FILES["noise"], overwrite=True)
    # basis "2 2 1.0 0 2.0": 6 + 1 functions, ko = 1 (3 terms), bgo = 1 (3 terms)
    solution = np.zeros(1 + 1 + 6 * 3 + 3)
    solution[1] = basis_ksum
    solution[2 + 5 * 3] = 0.3  # zero-sum function of the second Gaussian, constant term
    solution[2 + 6 * 3] = 4.5  # constant background
    table = fits.BinTableHDU.from_columns([fits.Column(name="Region0", format="D", array=solution)])
    for key, value in {
        "NGAUSS": 2,
        "DGAUSS1": 2,
        "SGAUSS1": 1.0,
        "DGAUSS2": 0,
        "SGAUSS2": 2.0,
        "FWKERN": 13,
        "CKORDER": 1,
        "BGORDER": 1,
    }.items():
        table.header[key] = value
    fits.HDUList([fits.PrimaryHDU(), table]).writeto(directory / FILES["kernel"], overwrite=True)
    return diff, noise


def test_output_keywords_and_stamp_counts_are_parsed(tmp_path):
    diff, noise = _write_fake_output(tmp_path)
    stderr = (
        "17 and 17 stamps built (0.68%, 0.68%)\n    14 out of 17 stamps remain\n"
        "    12 out of 17 stamps remain\n Emperical / Expected Noise for GOOD pixels = 1.04\n"
    )
    out = read_hotpants_output(tmp_path, stderr=stderr)
    m = out.meta
    assert (m["ksum"], m["x2nrm"], m["nx2nrm"], m["dsige"], m["dsig"]) == (
        1.25,
        1.052,
        55696,
        18.0724,
        16.553,
    )
    assert (m["convolved"], m["photnorm"], m["version"]) == ("TEMPLATE", "i", "5.1.11")
    assert (m["nstamps"], m["nstamps_built"], m["noise_ratio"]) == (12, 17, 1.04)
    assert m["bg"] == 4.5
    bad = (diff == np.float32(1e-30)) | (noise <= 0)
    np.testing.assert_array_equal(out.bad, bad)
    assert m["masked_fraction"] == pytest.approx(bad.mean(), abs=1e-5)
    np.testing.assert_array_equal(out.data, diff)
    np.testing.assert_array_equal(out.noise, noise)  # hotpants writes sigma
    assert out.kernel.shape == (13, 13)
    assert out.kernel.sum() == pytest.approx(1.25)
    np.testing.assert_allclose(out.kernel, out.kernel[::-1, ::-1], atol=1e-12)
    # a kernel that does not reproduce KSUM00 is not returned
    _write_fake_output(tmp_path, ksum="2.0000")
    assert read_hotpants_output(tmp_path).kernel is None


def test_parse_stderr_without_clipping_lines():
    assert parse_stderr("10 stamps built (0.40%)\n") == {"nstamps_built": 10}
    assert parse_stderr("8 and 11 stamps built (0.3%, 0.4%)\n") == {"nstamps_built": 8}
    assert parse_stderr("") == {}


def test_kernel_image_is_alards_basis():
    u = np.arange(-6, 7)
    g = np.exp(-(u**2) / 2.0)
    solution = np.zeros(2 + 6 * 3 + 3)
    solution[1] = 0.8
    k = kernel_image(solution, [(2, 1.0), (0, 2.0)], 6, 1)
    np.testing.assert_allclose(k, 0.8 * np.outer(g, g) / g.sum() ** 2, atol=1e-12)
    # the 2nd basis function is odd in y (hotpants orders x powers outer, y powers inner):
    # it moves flux along y and keeps the sum
    solution[2] = 0.1
    k = kernel_image(solution, [(2, 1.0), (0, 2.0)], 6, 1)
    assert k.sum() == pytest.approx(0.8)
    assert np.allclose(k, k[:, ::-1]) and not np.allclose(k, k[::-1, :])
    with pytest.raises(ValueError, match="terms"):
        kernel_image(solution[:5], [(2, 1.0), (0, 2.0)], 6, 1)


# ------------------------------------------------------------ fake programs

FAKE = """#!{python}
import sys
args = sys.argv[1:]
mode = {mode!r}
def val(flag):
    return args[args.index(flag) + 1]
open("argv.txt", "w").write("\\n".join(args))
if mode == "fail":
    sys.stderr.write("Doing : science.fits\\n")
    sys.stderr.write("FATAL ERROR rss (5) < r (10) : conflicting requests\\n")
    sys.exit(1)
if mode == "sleep":
    import time
    time.sleep(30)
if mode == "silent":
    sys.stderr.write("Mallocing massive amounts of memory...\\n")
    sys.exit(0)
import numpy as np
from astropy.io import fits
sci = fits.getdata(val("-inim")).astype(np.float32)
tpl = fits.getdata(val("-tmplim")).astype(np.float32)
hdr = fits.Header()
hdr["MASKVAL"] = 1e-30
if mode == "fill":  # what hotpants does when every pixel is out of its valid range
    diff = np.full(sci.shape, 1e-30, np.float32)
    noise = np.zeros(sci.shape, np.float32)
    sys.stderr.write("0 stamps built (0.00%)\\n")
else:  # 'ok': an identity kernel: diff = science - template, masks honoured
    bad = (fits.getdata(val("-imi")) & 128) | (fits.getdata(val("-tmi")) & 128)
    diff = np.where(bad > 0, np.float32(1e-30), sci - tpl)
    noise = np.hypot(fits.getdata(val("-ini")), fits.getdata(val("-tni"))).astype(np.float32)
    noise[bad > 0] = 0.0
    for key, value in (("KSUM00", "1.0000"), ("CONVOL00", "TEMPLATE"), ("PHOTNORM", "i"),
                       ("X2NRM00", "1.0100")):
        hdr[key] = value
    sys.stderr.write("{stamps} out of 20 stamps remain\\n")
fits.PrimaryHDU(diff, hdr).writeto(val("-outim"), overwrite=True)
fits.PrimaryHDU(noise).writeto(val("-oni"), overwrite=True)
"""


@pytest.fixture
def fake_hotpants(tmp_path, monkeypatch):
    """Install a fake ``hotpants`` first on PATH; returns a function of the mode."""
    bindir = tmp_path / "bin"
    bindir.mkdir()

    def install(mode: str, stamps: int = 20) -> Path:
        path = bindir / "hotpants"
        path.write_text(FAKE.format(python=sys.executable, mode=mode, stamps=stamps))
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        return path

    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")
    return install


def test_missing_program_is_unavailable_with_the_build_hint(tmp_path, monkeypatch, pair):
    from oasis_core.engine.plugins import Registry

    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory
    backend = HotpantsSubtract()
    with pytest.raises(BackendUnavailable) as err:
        backend.check(HotpantsOptions())
    message = str(err.value)
    assert "\n" not in message
    assert "'hotpants' not on PATH" in message
    assert "https://github.com/acbecker/hotpants" in message and "cfitsio" in message
    assert "subtract.hotpants.binary" in message
    with pytest.raises(BackendUnavailable, match="not found"):
        backend.check(HotpantsOptions(binary=str(tmp_path / "nowhere" / "hotpants")))
    sci, tpl, _ = pair
    with pytest.raises(BackendUnavailable, match="acbecker"):
        backend.subtract(sci, tpl, options=HotpantsOptions(), workdir=tmp_path / "w")
    registry = Registry()
    assert "acbecker/hotpants" in registry.status(registry.get("subtract", "hotpants"))
    with pytest.raises(BackendUnavailable):
        registry.select("subtract", "hotpants", HotpantsOptions())


def test_failing_program_raises_stage_error_quoting_it(fake_hotpants, pair, tmp_path):
    fake_hotpants("fail")
    sci, tpl, _ = pair
    with pytest.raises(StageError) as err:
        HotpantsSubtract().subtract(sci, tpl, options=HotpantsOptions(), workdir=tmp_path / "w")
    message = str(err.value)
    assert "'sci'" in message and "code 1" in message
    assert "FATAL ERROR rss (5) < r (10) : conflicting requests" in message
    assert "\n" not in message


def test_program_writing_nothing_raises_stage_error(fake_hotpants, pair, tmp_path):
    fake_hotpants("silent")
    sci, tpl, _ = pair
    with pytest.raises(StageError, match=r"wrote no diff\.fits.*Mallocing"):
        HotpantsSubtract().subtract(sci, tpl, options=HotpantsOptions(), workdir=tmp_path / "w")


def test_timeout_raises_stage_error(fake_hotpants, pair, tmp_path):
    fake_hotpants("sleep")
    sci, tpl, _ = pair
    with pytest.raises(StageError, match=r"did not finish within 0\.5 s"):
        HotpantsSubtract().subtract(
            sci, tpl, options=HotpantsOptions(timeout=0.5), workdir=tmp_path / "w"
        )


def test_all_fill_output_is_flagged_not_trusted(fake_hotpants, pair, tmp_path):
    fake_hotpants("fill")
    sci, tpl, _ = pair
    res = HotpantsSubtract().subtract(sci, tpl, options=HotpantsOptions(), workdir=tmp_path / "w")
    assert isinstance(res, Residual)
    assert not (res.weight > 0).any()
    assert "masked 100%" in res.meta["flag"] and "no kernel" in res.meta["flag"]
    assert res.header["HPFLAG"]
    res.header.tostring()  # every card fits (astropy would warn, an error here)
    assert math.isnan(res.q)


def test_residual_sign_noise_masks_and_inputs(fake_hotpants, pair, tmp_path):
    fake_hotpants("ok")
    sci, tpl, _ = pair
    weight = np.ones(SHAPE, np.float32)
    weight[100:110, 50:60] = 0.0
    data = np.array(sci.data)
    data[100:110, 50:60] = np.nan  # masked garbage must not reach hotpants
    sci = attrs.evolve(sci, data=data, weight=weight)
    readonly(sci, tpl)
    before = (sci.data.copy(), tpl.data.copy())
    workdir = tmp_path / "w"
    res = HotpantsSubtract().subtract(sci, tpl, options=HotpantsOptions(), workdir=workdir)
    np.testing.assert_array_equal(sci.data, before[0])
    np.testing.assert_array_equal(tpl.data, before[1])
    good = res.weight > 0
    assert not good[100:110, 50:60].any() and good.mean() > 0.99
    # the residual is science - template where the fake kernel is the identity
    np.testing.assert_allclose(res.data[good], (sci.data - tpl.data)[good], rtol=1e-6)
    # the noise images the backend wrote combine to the noise hotpants returns
    from astropy.io import fits

    sci_mask = fits.getdata(workdir / FILES["science_mask"])
    assert set(np.unique(sci_mask)) == {0, MASK_BAD}
    assert (sci_mask[100:110, 50:60] == MASK_BAD).all()
    written = fits.getdata(workdir / FILES["science"])
    assert np.isfinite(written).all()
    sky_noise = math.sqrt(300.0 / 1.5 + (5.0 / 1.5) ** 2)
    assert np.median(res.noise[good]) == pytest.approx(
        math.hypot(sky_noise, sky_noise / 2), rel=0.1
    )
    assert res.meta["nstamps"] == 20 and "flag" not in res.meta
    assert res.meta["ksum"] == res.meta["fscale"] == 1.0
    assert res.meta["command"].startswith("hotpants -inim science.fits -tmplim template.fits")
    assert res.params["command"] == res.meta["command"]
    assert res.kernel.direction == "template"
    assert res.header["KSUM"] == 1.0 and res.header["CONVOLVE"] == "template"
    assert 0.5 < res.q <= 1.0
    # only the workdir was written to
    assert {p.name for p in tmp_path.iterdir()} == {"bin", "w"}


def test_few_stamps_refit_with_a_lower_spatial_order(fake_hotpants, pair, tmp_path):
    fake_hotpants("ok", stamps=4)
    sci, tpl, _ = pair
    workdir = tmp_path / "w"
    res = HotpantsSubtract().subtract(sci, tpl, options=HotpantsOptions(), workdir=workdir)
    assert res.meta["ko"] == 1 and res.meta["ko_requested"] == 2
    assert "few stamps: 4 for ko=2; ko lowered to 1" in res.meta["flag"]
    res.header.tostring()
    assert "-ko\n1\n" in (workdir / "argv.txt").read_text()
    res = HotpantsSubtract().subtract(
        sci, tpl, options=HotpantsOptions(lower_ko=False), workdir=workdir
    )
    assert res.meta["ko"] == 2 and res.meta["flag"] == "few stamps: 4 (< 6)"


# ------------------------------------------------------------------ real runs


def _check_transients(res: Residual, truth, rel=0.03) -> None:
    for row in truth:
        x, y, flux = float(row["x"]), float(row["y"]), float(row["flux"])
        measured = aperture(res.data, x, y, 12.0)
        sigma = math.sqrt(aperture(res.noise**2, x, y, 12.0))
        assert aperture(res.weight == 0, x, y, 12.0) == 0
        assert abs(measured - flux) < rel * flux + 3 * sigma, (flux, measured, sigma)


@needs_hotpants
@pytest.mark.parametrize(
    ("sky_subtracted", "fwhm_s", "fwhm_t", "direction"),
    [(False, 4.0, 3.0, "template"), (True, 4.0, 3.0, "template"), (True, 3.0, 4.0, "science")],
)
def test_real_subtraction_is_noise_limited_and_keeps_transient_flux(
    tmp_path, pair, skysub_pair, sky_subtracted, fwhm_s, fwhm_t, direction
):
    from oasis_core.engine.quality import normalized_noise

    if fwhm_s == 4.0:
        sci, tpl, truth = skysub_pair if sky_subtracted else pair
    else:
        sci, tpl, truth = _frames(fwhm_s=fwhm_s, fwhm_t=fwhm_t, sky_subtracted=sky_subtracted)
    readonly(sci, tpl)
    res = HotpantsSubtract().subtract(sci, tpl, options=HotpantsOptions(), workdir=tmp_path)
    assert res.kernel.direction == direction and res.meta["photnorm"] == "i"
    assert "flag" not in res.meta, res.meta["flag"]
    # only the kernel half width along the edges is lost (~15% of 256 x 256)
    assert res.meta["masked_fraction"] < 0.2
    assert 0.8 < res.meta["nnoise"] < 1.3
    sources = np.zeros(SHAPE, bool)
    for row in truth:
        yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]]
        sources |= (xx - row["x"]) ** 2 + (yy - row["y"]) ** 2 < 15**2
    assert 0.8 < normalized_noise(res.data, res.noise, res.weight, exclude=sources) < 1.3
    assert res.q > 0.5
    _check_transients(res, truth)  # science flux scale, positive
    k = res.kernel.image
    assert k is not None and k.shape == (2 * res.meta["r"] + 1,) * 2
    assert k.sum() == pytest.approx(res.meta["ksum"], abs=2e-3)
    assert res.meta["fscale"] == pytest.approx(1.0, abs=0.05)  # same exposure scale


@needs_hotpants
def test_real_masked_pixels_stay_masked_and_do_not_leak(tmp_path, pair):
    sci, tpl, _ = pair
    blocks = {"sci": np.s_[150:160, 60:70], "tpl": np.s_[60:70, 150:160]}

    def run(garbage: float | None) -> Residual:
        frames = []
        for frame, key in ((sci, "sci"), (tpl, "tpl")):
            data, weight = np.array(frame.data), np.ones(SHAPE, np.float32)
            weight[blocks[key]] = 0.0
            if garbage is not None:
                data[blocks[key]] = garbage
            frames.append(attrs.evolve(frame, data=data, weight=weight))
        return HotpantsSubtract().subtract(
            *frames, options=HotpantsOptions(), workdir=tmp_path / str(garbage)
        )

    clean, dirty = run(None), run(1e7)
    for block in blocks.values():
        assert not (dirty.weight[block] > 0).any()
    # the convolved template's mask grows by the kernel's reach, not the science's
    assert (dirty.weight[150:160, 55:75] > 0).sum() == 200 - 100
    assert (dirty.weight[55:75, 150:160] == 0).sum() > 100
    # what is under a mask never reaches a good pixel (it would through the kernel)
    good = dirty.weight > 0
    np.testing.assert_array_equal(good, clean.weight > 0)
    np.testing.assert_allclose(dirty.data[good], clean.data[good], atol=1e-3)
    assert 0.8 < dirty.meta["nnoise"] < 1.3


@needs_hotpants
@pytest.mark.slow
def test_real_pipeline_with_hotpants(tmp_path):
    from astropy.io import fits

    import oasis_core
    from oasis_apps.demo import simulate_target

    target = simulate_target(tmp_path, "hp", n_frames=6, shape=(256, 256), seed=5)
    oasis_core.pipeline(target.path, backends={"subtract": "hotpants"}, jobs=2)
    residuals = sorted((target.path / "residuals").glob("*_residual.fits"))
    assert len(residuals) == 6
    qs = []
    for path in residuals:
        header = fits.getheader(path)
        assert header["OASBACK"] == "hotpants"
        assert header["HIERARCH OAS COMMAND"].startswith("hotpants -inim")
        qs.append(header["OASQ"])
    assert np.nanmedian(np.array(qs, float)) > 0.5


# ------------------------------------------------------------------ small frames

SMALL = 63
STARS = ((15, 20, 60000.0), (46, 14, 40000.0), (20, 47, 30000.0))  # x, y, flux
TRANSIENT = 6000.0  # at the centre of the science frame only


def _small_pair(stars=STARS, *, fwhms=(4.0, 3.0), known=True, transient=True, seed=0):
    """A 63 x 63 pair (sky 300 ADU, gain 1.5, a template of 4 exposures) with Gaussian
    stars and a transient at the centre of the science frame."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SMALL, :SMALL]

    def image(fwhm, transient, depth):
        sigma = fwhm / (2 * math.sqrt(2 * math.log(2)))
        model = np.full((SMALL, SMALL), 300.0)
        for x, y, flux in [*stars, *([(31.0, 31.0, TRANSIENT)] if transient else [])]:
            model += (
                flux
                * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2))
                / (2 * math.pi * sigma**2)
            )
        return (rng.poisson(model * 1.5 * depth) / (1.5 * depth)).astype(np.float32)

    common = {"readnoise": 0.0, "saturation": 60000.0}
    sci = Frame(
        data=image(fwhms[0], transient, 1),
        gain=1.5,
        fwhm=fwhms[0] if known else None,
        name="sci",
        **common,
    )
    tpl = Template(
        data=image(fwhms[1], False, 4),
        gain=6.0,
        fwhm=fwhms[1] if known else None,
        name="tpl",
        **common,
    )
    return sci, tpl


def test_small_frame_stamp_stars_are_the_stars_never_the_transient():
    from oasis_hotpants.backend import SMALL_SIDE, small_frame_layout

    sci, tpl = _small_pair()
    layout = small_frame_layout(sci, tpl)
    assert SMALL > SMALL_SIDE / 4 and layout is not None
    assert layout.stars == tuple((x, y) for x, y, _ in STARS)  # brightest first
    assert (31, 31) not in layout.stars and not layout.reference
    assert layout.r <= SMALL // 8 and layout.rss > layout.r
    assert "3 stamp star(s)" in layout.choice()
    # a frame of ordinary size is left to hotpants' own grid
    big, big_tpl, _ = _frames()
    assert small_frame_layout(big, big_tpl) is None


def test_small_frame_arguments_fit_on_the_star_mosaic():
    from oasis_hotpants.backend import FIT_FILES

    sci, tpl = _small_pair()
    f = flags(hotpants_arguments(sci, tpl))
    assert f["-inim"] == [FIT_FILES["science"]] and f["-tmplim"] == [FIT_FILES["template"]]
    assert f["-ssf"] == [FIT_FILES["stamps"]] and f["-afssc"] == ["0"]
    assert (f["-ko"], f["-bgo"], f["-nss"]) == (["0"], ["0"], ["1"])
    assert f["-nsx"] == f["-nsy"] == ["2"]  # 3 stars, one stamp each
    degrees = [int(d) for d in f["-ng"][1::2]]
    assert degrees == [2, 2, 0]  # 13 basis functions, not hotpants' 49
    assert all(float(s) <= int(f["-r"][0]) / 2 for s in f["-ng"][2::2])


def test_stamp_star_thresholds_follow_the_data_levels(pair):
    # the stamp stars' upper level is the data's: hotpants' own stays at 25000 ADU
    sci, tpl, _ = pair
    args = hotpants_arguments(sci, tpl)
    assert one(args, "-iuk") == one(args, "-iu") and one(args, "-tuk") == one(args, "-tu")


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 9, 16])
@pytest.mark.parametrize(("r", "rss"), [(4, 6), (7, 11), (10, 15)])
def test_mosaic_cells_sit_where_hotpants_takes_them(n, r, rss):
    """Each centre is in its own stamp's window, its substamp clear of hotpants' border,
    and no two cells overlap (hotpants' main.c and buildStamps)."""
    from oasis_hotpants.backend import _mosaic_grid, _stamp_width

    ns, side, centres = _mosaic_grid(n, r, rss)
    width = _stamp_width(side, ns, r)
    assert width >= 2 * rss + 1 and len(centres) == n
    for i, (x, y) in enumerate(centres):
        for coord, k in ((x, i % ns), (y, i // ns)):
            start = k * side // ns
            end = min(start + width - 1, side - 1)
            assert start + r + 1 < coord < end - r - 1
            assert coord - rss >= rss + r and coord + rss <= side - 1 - (rss + r)
    half = rss + r + 1
    for a in range(n):
        for b in range(a + 1, n):
            (xa, ya), (xb, yb) = centres[a], centres[b]
            assert abs(xa - xb) > 2 * half or abs(ya - yb) > 2 * half


def test_small_frame_without_stars_or_fwhms_fails_in_one_line():
    from oasis_hotpants.backend import small_frame_layout

    sci, tpl = _small_pair(stars=(), known=False, transient=False)
    with pytest.raises(StageError) as err:
        small_frame_layout(sci, tpl)
    message = str(err.value)
    assert "\n" not in message and "63x63" in message and "no source can be" in message
    assert "FWHM" in message and "ois or zogy" in message
    # the transient gives the science frame's FWHM: the template's is taken equal
    sci, tpl = _small_pair(stars=(), known=False)
    layout = small_frame_layout(sci, tpl)
    assert layout.reference and layout.fwhms[0] == layout.fwhms[1]
    assert layout.fwhms[0] == pytest.approx(4.0, rel=0.15)
    assert "the template FWHM unknown, taken as the other's" in layout.fwhm_source
    # with the FWHMs known, the kernel is fitted on a reference star instead
    sci, tpl = _small_pair(stars=())
    layout = small_frame_layout(sci, tpl)
    assert layout.reference and layout.stars == () and layout.fwhms == (4.0, 3.0)


@needs_hotpants
@pytest.mark.parametrize("stars", [0, 1, 3])
def test_real_small_frame_subtracts_and_says_how(tmp_path, stars):
    """A 63 x 63 cutout with 0-3 stars: hotpants' defaults masked every pixel and exited
    0; now it subtracts, keeps the transient's flux, and the residual says what was done."""
    from oasis_core.engine.subtraction import run_subtraction

    sci, tpl = _small_pair(STARS[:stars])
    readonly(sci, tpl)
    settings = {"optimize": True, "max_tries": 9, "q_ceiling": 0.75, "q_floor": 0.5}
    res = run_subtraction(
        HotpantsSubtract(), sci, tpl, options=HotpantsOptions(), workdir=tmp_path,
        settings=settings,
    )  # fmt: skip
    assert res.meta["usable"] and res.meta["small_frame"]
    assert res.meta["masked_fraction"] < 0.5  # hotpants' kernel border, no more
    flux = aperture(np.where(res.weight > 0, res.data, 0), 31, 31, 9.0)
    assert flux == pytest.approx(TRANSIENT, rel=0.1)
    assert 0.7 < res.meta["nnoise"] < 1.3
    assert res.meta["stamp_stars"] == stars and res.meta["ko"] == 0
    assert res.meta["choice_stamps"].startswith("small frame")
    assert res.meta["fit_command"].startswith("hotpants -inim fit_science.fits")
    assert "-ki kernel.fits" in res.meta["command"]
    # the kernel kept (the full basis or the low-order one) and why, in meta and header
    assert res.meta["kernel_model"] == res.header["HPKERN"]
    assert res.meta["kernel_model"] in ("full", "low-order")
    assert "honest Q" in res.meta["choice_kernel"] and res.meta["q_honest"] > 0.5
    assert res.meta["fwhm"] == pytest.approx(4.0, rel=0.2)  # the science frame's PSF
    if stars == 0:
        assert "reference star" in res.meta["fallback"]
        assert res.meta["flag"].startswith("fallback: no stamp star")
        assert res.meta["kernel_model"] == "full"  # the reference star's kernel only
    elif stars < 3:
        assert "few stamps" in res.meta["flag"]
    else:
        assert not res.meta["flag"] and res.meta["ksum"] == pytest.approx(1.0, abs=0.05)


def _cells(z_values, *, r=7, rss=11, fwhm=3.0, seed=0):
    """A mosaic residual whose stamp stars' cells hold a Gaussian of significance ``z``
    each (within the FWHM disc) on unit noise, and its layout."""
    from oasis_hotpants.backend import SmallLayout, _mosaic_grid

    stars = tuple((10 * i, 10 * i) for i in range(len(z_values)))
    ns, side, centres = _mosaic_grid(len(stars), r, rss)
    rng = np.random.default_rng(seed)
    data = rng.normal(0.0, 1.0, (side, side))
    noise = np.ones((side, side))
    radius = max(2, round(fwhm))
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    disc = xx**2 + yy**2 <= radius**2
    for z, (cx, cy) in zip(z_values, centres, strict=True):
        box = np.s_[cy - radius : cy + radius + 1, cx - radius : cx + radius + 1]
        data[box] += np.where(disc, z * math.sqrt(disc.sum()) / disc.sum(), 0.0)
    layout = SmallLayout(
        r=r, rss=rss, ns=ns, side=side, stars=stars, centres=tuple(centres), ft=20.0,
        rejected=0, fwhm_source="frame", fwhms=(fwhm, fwhm),
    )  # fmt: skip
    return data, noise, np.zeros((side, side), bool), layout


def test_a_stamp_star_whose_residual_stands_out_is_left_out():
    from oasis_hotpants.backend import deviant_star

    # the kernel's compromise: the transient's star positive, the others a little negative
    assert deviant_star(*_cells([-2.6, -1.5, 9.0, -2.6, -1.8])) == 2
    # a fit that leaves every star alike (however poor) has no deviant star
    assert deviant_star(*_cells([-8.0, -9.0, -7.5, -8.5, -9.5])) is None
    assert deviant_star(*_cells([0.5, -1.0, 1.2, 0.3, -0.4])) is None
    # too few stars to leave three for the refit, and a reference star: nothing to judge
    assert deviant_star(*_cells([-1.0, 12.0, -1.0])) is None
    data, noise, bad, layout = _cells([-1.0, 12.0, -1.0, -1.0])
    assert deviant_star(data, noise, bad, layout) == 1
    assert deviant_star(data, noise, bad, attrs.evolve(layout, reference=True)) is None
    # a masked cell cannot be judged: no verdict rather than a wrong one
    bad[layout.centres[0][1], :] = True
    bad[:, layout.centres[0][0]] = True
    bad[layout.centres[0][1] - 3 : layout.centres[0][1] + 4, :] = True
    assert deviant_star(data, noise, bad, layout) is None


def test_the_central_object_is_a_stamp_star_only_when_alone():
    """A cutout is centred on its target: a transient, or the source hosting one."""
    from oasis_hotpants.backend import _without_central

    stars = [(31, 31), (12, 50), (50, 12)]
    kept, central = _without_central(stars, (63, 63), 4.0)
    assert kept == [(12, 50), (50, 12)] and central == ((31, 31),)
    assert _without_central([(35, 28), (12, 50)], (63, 63), 4.0)[1] == ((35, 28),)  # 2 FWHM
    assert _without_central([(31, 31)], (63, 63), 4.0) == ([(31, 31)], ())  # the only one
    assert _without_central([(12, 50)], (63, 63), 4.0) == ([(12, 50)], ())


def _chi2_cells(scatter, *, r=7, rss=11):
    """A mosaic residual whose stamp stars' substamps scatter by ``scatter`` noise sigmas
    each, and its layout."""
    from oasis_hotpants.backend import SmallLayout, _mosaic_grid

    stars = tuple((10 * i, 10 * i) for i in range(len(scatter)))
    ns, side, centres = _mosaic_grid(len(stars), r, rss)
    rng = np.random.default_rng(1)
    data = np.zeros((side, side))
    for k, (cx, cy) in zip(scatter, centres, strict=True):
        box = np.s_[cy - rss : cy + rss + 1, cx - rss : cx + rss + 1]
        data[box] = rng.normal(0.0, k, data[box].shape)
    layout = SmallLayout(
        r=r, rss=rss, ns=ns, side=side, stars=stars, centres=tuple(centres), ft=20.0,
        rejected=0, fwhm_source="frame", fwhms=(4.0, 4.0),
    )  # fmt: skip
    return data, np.ones((side, side)), np.zeros((side, side), bool), layout


def test_a_stamp_star_the_kernel_fits_far_worse_is_clipped():
    from oasis_hotpants.backend import clipped_star

    # the crowded ISIS cutout: two bright blended stars the others' kernel cannot match
    assert clipped_star(*_chi2_cells([6.0, 5.0, 2.0, 2.2])) == 0
    assert clipped_star(*_chi2_cells([1.0, 5.0, 1.1])) == 1
    # alike (however poor), or a noise-limited fit: nothing to clip
    assert clipped_star(*_chi2_cells([3.0, 3.2, 2.9, 3.1])) is None
    assert clipped_star(*_chi2_cells([1.0, 1.1, 0.9, 1.2, 1.0])) is None
    # two stars are kept whatever they say (no second opinion left), as is a reference
    assert clipped_star(*_chi2_cells([1.0, 5.0])) is None
    data, noise, bad, layout = _chi2_cells([1.0, 5.0, 1.1])
    assert clipped_star(data, noise, bad, attrs.evolve(layout, reference=True)) is None


def test_the_residual_psf_is_the_convolved_frames_broadened_by_the_kernel():
    from oasis_hotpants.backend import FWHM_PER_SIGMA, matched_fwhm

    u = np.arange(-7, 8)
    gauss = np.exp(-(u[:, None] ** 2 + u[None, :] ** 2) / (2 * 1.5**2))
    expected = FWHM_PER_SIGMA * math.sqrt((4.0 / FWHM_PER_SIGMA) ** 2 + 1.5**2)
    assert matched_fwhm(0.98 * gauss / gauss.sum(), 4.0) == pytest.approx(expected, rel=0.01)
    delta = np.zeros((15, 15))
    delta[7, 8] = 1.0  # a shift changes no width
    assert matched_fwhm(delta, 4.0) == pytest.approx(4.0)
    assert matched_fwhm(-delta, 4.0) is None  # no positive flux: no verdict
    sharpen = 2 * delta - 0.5 * np.roll(delta, 3, axis=0) - 0.5 * np.roll(delta, -3, axis=0)
    assert matched_fwhm(sharpen, 4.0) is None  # narrower than half the frame's: not a PSF


def test_the_better_small_frame_kernel_is_kept_and_a_poor_one_flagged():
    from oasis_hotpants.backend import POOR_Q, Q_MARGIN, _choose_kernel

    from oasis_core.contracts.model import Residual

    rng = np.random.default_rng(2)
    shape = (63, 63)
    template = Frame(data=rng.normal(100.0, 5.0, shape), name="tpl")

    def residual(scatter):
        return Residual(
            data=rng.normal(0.0, scatter, shape), noise=np.ones(shape),
            weight=np.ones(shape), meta={"fwhm": 4.0, "flag": ""},
        )  # fmt: skip

    good, poor = residual(1.0), residual(2.0)
    kept = _choose_kernel([("full", poor), ("low-order", good)], template, 1.0)
    assert kept.meta["kernel_model"] == "low-order" and kept.header["HPKERN"] == "low-order"
    assert kept.meta["q_honest"] > 0.9 > kept.meta["q_honest_full"]
    assert kept.meta["choice_kernel"].startswith("low-order") and not kept.meta["flag"]
    # the full basis is kept unless the low-order one is better by more than the margin
    close = _choose_kernel([("full", good), ("low-order", good)], template, 1.0)
    assert close.meta["kernel_model"] == "full" and Q_MARGIN > 0
    # a poor fit is never shipped quietly
    alone = _choose_kernel([("full", poor)], template, 1.0)
    assert alone.meta["q_honest"] < POOR_Q
    assert alone.meta["flag"].startswith("poor fit: honest Q") and "HPFLAG" in alone.header


@pytest.mark.parametrize(("fwhm_s", "fwhm_t", "ways"), [(4.48, 4.34, "ti"), (5.0, 4.0, "a")])
def test_small_frame_with_close_fwhms_does_both_directions_and_keeps_the_better(
    monkeypatch, tmp_path, fwhm_s, fwhm_t, ways
):
    """FWHMs from a few stars within 10 %: both directions are done and the better by the
    honest Q kept (hotpants' own ``-c b`` kept Q 0.14 on an ISIS cutout where convolving
    the template gives 0.85); far apart, one run in the configured direction."""
    from types import SimpleNamespace

    from oasis_hotpants.backend import HotpantsOptions, HotpantsSubtract

    from oasis_core.contracts.model import Residual

    shape = (8, 8)
    calls: list[str] = []
    q = {"t": 0.85, "i": 0.14, "auto": 0.7}

    def one(self, science, template, sci, tpl, options, layout, program, workdir):
        calls.append(options.convolve)
        return Residual(
            data=np.zeros(shape), noise=np.ones(shape), weight=np.ones(shape),
            meta={"q_honest": q[options.convolve], "convolve": options.convolve},
        )  # fmt: skip

    monkeypatch.setattr(HotpantsSubtract, "_small_one", one)
    sci, tpl = SimpleNamespace(fwhm=fwhm_s), SimpleNamespace(fwhm=fwhm_t)
    kept = HotpantsSubtract()._small(
        None, None, sci, tpl, HotpantsOptions(), None, "hotpants", tmp_path
    )
    if ways == "ti":
        assert calls == ["t", "i"]
        assert kept.meta["convolve"] == "t"
        assert kept.meta["choice_convolve"] == "honest Q 0.850 (vs 0.140)"
    else:
        assert calls == ["auto"] and "choice_convolve" not in kept.meta
