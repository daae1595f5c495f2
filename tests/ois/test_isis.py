"""ISIS's ``default_config`` files and ``mrj_phot`` program in the ``ois`` backend.

The program's argument building, output reading, sign and normalisation conventions and
error paths are tested with fake ``mrj_phot`` scripts (Python, in ``tmp_path``) that
behave as ISIS's does: run in the directory of their inputs, read ``-c CONFIG``, write
``conv0.fits`` (the convolved reference plus background) and ``conv.fits`` ((conv0 -
image) / kernel sum) there and print ``sum_kernel ...: value``. The real program runs
only where it is installed.
"""

from __future__ import annotations

import json
import math
import shutil
import stat
import sys
import textwrap
from pathlib import Path

import attrs
import numpy as np
import pytest
from oasis_ois.backend import OisOptions, OisSubtract
from oasis_ois.isis import (
    ISIS_URL,
    apply_isis_config,
    isis_command,
    read_isis_config,
    read_isis_image,
    write_isis_config,
)

from oasis_core.contracts.errors import BackendUnavailable, ConfigError, StageError
from oasis_core.contracts.model import Frame, Residual, Template

TRANSIENTS = ((70.3, 180.7, 3.0e4), (190.2, 60.6, 1.5e4))

#: ISIS's standard default_config (the package's register/default_config).
STANDARD = """\
nstamps_x         10       /*** Number of stamps along X axis ***/
nstamps_y         10       /*** Number of stamps along Y axis***/
sub_x             1        /*** Number of sub_division of the image along X axis ***/
sub_y             1        /*** Number of sub_division of the image along Y axis ***/
half_mesh_size    9        /*** Half kernel size ***/
half_stamp_size   15       /*** Half stamp size ***/
deg_bg            1        /** degree to fit differential bakground variations **/
saturation        50000.0  /** degree to fit background varaitions **/
pix_min           5.0      /*** Minimum vaue of the pixels to fit *****/
min_stamp_center  130      /*** Minimum value for object to enter kernel fit *****/
ngauss            3        /*** Number of Gaussians ****/
deg_gauss1        6        /*** Degree associated with 1st Gaussian ****/
deg_gauss2        4        /*** Degree associated with 2nd Gaussian ****/
deg_gauss3        2        /*** Degree associated with 3rd Gaussian ****/
sigma_gauss1      0.7      /*** Sigma of 1st Gaussian ****/
sigma_gauss2      1.5      /*** Sigma of 2nd Gaussian ****/
sigma_gauss3      2.0      /*** Sigma of 3rd Gaussian ****/
deg_spatial       2        /*** Degree of the fit of the spatial variations of the Kernel ****/
"""

STANDARD_VALUES = {
    "nstamps_x": 10,
    "nstamps_y": 10,
    "sub_x": 1,
    "sub_y": 1,
    "half_mesh_size": 9,
    "half_stamp_size": 15,
    "deg_bg": 1,
    "saturation": 50000.0,
    "pix_min": 5.0,
    "min_stamp_center": 130.0,
    "ngauss": 3,
    "deg_gauss1": 6,
    "deg_gauss2": 4,
    "deg_gauss3": 2,
    "sigma_gauss1": 0.7,
    "sigma_gauss2": 1.5,
    "sigma_gauss3": 2.0,
    "deg_spatial": 2,
}

#: A fake mrj_phot: ISIS's conventions with a known Gaussian kernel (SIGMA, KSUM) and a
#: fitted plane for the differential background; records its argv and configuration.
FAKE_MRJ_PHOT = """\
import json, sys
import numpy as np
from astropy.io import fits
from scipy import ndimage

SIGMA, KSUM = {sigma!r}, {ksum!r}
ref_name, img_name = sys.argv[1], sys.argv[2]
config = sys.argv[sys.argv.index("-c") + 1] if "-c" in sys.argv else "default_config"
values = {{}}
for line in open(config):
    tokens = line.split()
    if len(tokens) >= 2:
        values[tokens[0]] = float(tokens[1])
json.dump({{"argv": sys.argv[1:], "config": values}}, open("call.json", "w"))
print("Reading Image1")
ref = fits.getdata(ref_name).astype(np.float64)
img = fits.getdata(img_name).astype(np.float64)
print("nsx: %i nsy: %i" % (values["nstamps_x"], values["nstamps_y"]))
pix_min, hm = values["pix_min"], int(values["half_mesh_size"])
good = (ref > pix_min) & (img > pix_min)
kref = KSUM * ndimage.gaussian_filter(np.where(good, ref, 0.0), SIGMA, truncate=4.0)
ny, nx = ref.shape
yy, xx = np.mgrid[:ny, :nx] / max(ny, nx)
a = np.stack([np.ones(good.sum()), xx[good], yy[good]], axis=1)
coef = np.linalg.lstsq(a, (img - kref)[good], rcond=None)[0]
conv0 = kref + coef[0] + coef[1] * xx + coef[2] * yy
conv = (conv0 - img) / KSUM
conv[~good] = 0.0
for im in (conv0, conv):
    im[:hm], im[-hm:], im[:, :hm], im[:, -hm:] = 0.0, 0.0, 0.0, 0.0
fits.PrimaryHDU(conv0.astype(np.float32)).writeto("conv0.fits", overwrite=True)
fits.PrimaryHDU(conv.astype(np.float32)).writeto("conv.fits", overwrite=True)
print("Writing Convolution")
print("sum_kernel 0 0: %lf" % KSUM)
print("sum_kernel width height: %lf" % KSUM)
"""


def program(tmp_path: Path, body: str, name: str = "mrj_phot") -> Path:
    """An executable Python script ``name`` in ``tmp_path``."""
    path = tmp_path / "bin" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text(f"#!{sys.executable}\n{textwrap.dedent(body)}")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def subtract(science: Frame, template: Template, workdir: Path, **options: object) -> Residual:
    for frame in (science, template):  # the core hands out read-only arrays
        frame.data.flags.writeable = False
        frame.weight.flags.writeable = False
    return OisSubtract().subtract(science, template, options=OisOptions(**options), workdir=workdir)


def aperture(image: np.ndarray, x: float, y: float, r: float = 10.0) -> float:
    yy, xx = np.mgrid[: image.shape[0], : image.shape[1]]
    return float(image[(xx - x) ** 2 + (yy - y) ** 2 <= r * r].sum(dtype=np.float64))


def sigma_match(fwhm_a: float, fwhm_b: float) -> float:
    return math.sqrt(abs(fwhm_a**2 - fwhm_b**2)) / (2.0 * math.sqrt(2.0 * math.log(2.0)))


# ------------------------------------------------------------------- default_config


def test_reads_isis_standard_default_config(tmp_path):
    path = tmp_path / "default_config"
    path.write_text("# ISIS image subtraction parameters\n\n" + STANDARD)
    values = read_isis_config(path)
    assert values == STANDARD_VALUES
    assert all(type(values[k]) is type(v) for k, v in STANDARD_VALUES.items())


def test_isis_config_replaces_the_options_it_names(tmp_path):
    path = tmp_path / "default_config"
    path.write_text(
        STANDARD.replace("nstamps_x         10", "nstamps_x         8")
        .replace("sub_x             1", "sub_x             3")  # ignored
        .replace("sigma_gauss2      1.5", "sigma_gauss2      1.8")
    )
    options = OisOptions(isis_config=str(path), convolve="template", deg_spatial=0)
    applied = apply_isis_config(options)
    assert applied.isis_config == ""
    assert (applied.nstamps_x, applied.nstamps_y, applied.sigma_gauss2) == (8, 10, 1.8)
    # the file's values replace the options' (deg_spatial 2), ISIS's meanings kept
    assert (applied.deg_spatial, applied.pix_min, applied.saturation) == (2, 5.0, 50000.0)
    assert applied.min_stamp_center == 130.0
    assert applied.convolve == "template"  # not an ISIS key: untouched
    assert apply_isis_config(OisOptions()) == OisOptions()


@pytest.mark.parametrize(
    ("line", "match"),
    [
        (
            "nstamp_x 10",
            r"default_config:3: unknown ISIS key 'nstamp_x' \(did you mean 'nstamps_x'\?\)",
        ),
        ("reverse 1", r"default_config:3: unknown ISIS key 'reverse'; ISIS keys: nstamps_x, "),
        ("nstamps_x ten", r"default_config:3: ISIS key 'nstamps_x' must be an integer, got 'ten'"),
        ("sigma_gauss1 wide", r"ISIS key 'sigma_gauss1' must be a number, got 'wide'"),
        ("deg_spatial", r"default_config:3: ISIS key 'deg_spatial' has no value"),
        ("ngauss 4", r"default_config: ngauss = 4: must be an integer in \[1, 3\]"),
        ("sigma_gauss1 -0.5", r"default_config: sigma_gauss1 = -0.5: must be a finite number > 0"),
    ],
)
def test_bad_isis_config_lines_are_one_line_config_errors(tmp_path, line, match):
    path = tmp_path / "default_config"
    path.write_text(f"nstamps_x 10\n# a comment\n{line}  /*** ISIS comment ***/\n")
    with pytest.raises(ConfigError, match=match) as info:
        apply_isis_config(OisOptions(isis_config=str(path)))
    assert "\n" not in str(info.value)
    assert str(path) in str(info.value)


def test_missing_isis_config_is_a_config_error(tmp_path):
    path = tmp_path / "nowhere" / "default_config"
    with pytest.raises(ConfigError, match=r"nowhere/default_config: cannot read the ISIS"):
        OisSubtract().candidates(
            Frame(data=np.zeros((8, 8))),
            Template(data=np.zeros((8, 8))),
            options=OisOptions(isis_config=str(path)),
        )


def test_written_config_reads_back_and_is_isis_readable(tmp_path):
    options = OisOptions(nstamps_x=7, half_mesh_size=12, sigma_gauss2=1.83, deg_spatial=1)
    path = write_isis_config(options, tmp_path / "default_config")
    values = read_isis_config(path)
    assert set(values) == set(STANDARD_VALUES)
    for key, value in values.items():
        if key in ("sub_x", "sub_y"):
            assert value == 1
        elif key == "pix_min":
            assert value == -1e30  # no lower cut: a number ISIS's sscanf reads
        elif key == "saturation":
            assert value == 1e30  # 0 = each frame's own level, resolved by the backend
        else:
            assert value == getattr(options, key), key
    # ISIS reads "name value" with sscanf: every line starts so, with a number
    for line in path.read_text().splitlines():
        value = line.split()[1]
        assert math.isfinite(float(value)), line
    # and ISIS's own file survives a round trip through the options
    std = tmp_path / "std_config"
    std.write_text(STANDARD)
    again = write_isis_config(apply_isis_config(OisOptions(isis_config=str(std))), tmp_path / "w")
    assert read_isis_config(again) == STANDARD_VALUES


def test_subtract_and_candidates_use_the_isis_config(tmp_path, pair_factory):
    path = tmp_path / "default_config"
    path.write_text(
        STANDARD.replace("nstamps_x         10", "nstamps_x         8").replace(
            "deg_spatial       2", "deg_spatial       1"
        )
    )
    science, template = pair_factory(1)
    # ISIS's pix_min 5 is a raw cut: give the frames a sky as ISIS expects
    science = attrs.evolve(science, data=science.data + 1000.0)
    template = attrs.evolve(template, data=template.data + 1000.0)
    options = OisOptions(isis_config=str(path))
    res = subtract(science, template, tmp_path / "work", isis_config=str(path))
    assert res.meta["config"].startswith("ns=8x10 ")
    assert res.meta["config"].endswith(" ds=1")
    assert res.params["pix_min"] == 5.0 and res.params["isis_config"] == ""
    assert res.q > 0.75
    candidates = list(OisSubtract().candidates(science, template, options=options))
    assert candidates[0] is options
    assert all(c.isis_config == "" for c in candidates[1:])
    assert {c.nstamps_x for c in candidates[1:]} >= {4, 8}  # sparse grid of the file's 8


# ------------------------------------------------------------------------ mrj_phot


def test_command_line_is_isis_own():
    assert isis_command("/opt/isis/bin/mrj_phot", "ref.fits", "img.fits", "default_config") == [
        "/opt/isis/bin/mrj_phot",
        "ref.fits",
        "img.fits",
        "-c",
        "default_config",
    ]


def test_missing_program_is_unavailable_with_where_to_get_it(tmp_path):
    backend = OisSubtract()
    backend.check(OisOptions())  # the numpy fit needs nothing
    for binary in ("mrj_phot_not_installed", str(tmp_path / "mrj_phot")):
        with pytest.raises(BackendUnavailable, match=r"ISIS program .* not found") as info:
            backend.check(OisOptions(isis_binary=binary))
        assert ISIS_URL in str(info.value)
        assert "subtract.ois.isis_binary" in str(info.value)
        assert "\n" not in str(info.value)
    not_executable = tmp_path / "mrj_phot"
    not_executable.write_text("")
    with pytest.raises(BackendUnavailable):
        backend.check(OisOptions(isis_binary=str(not_executable)))
    data = np.zeros((8, 8), np.float32)
    with pytest.raises(BackendUnavailable, match=ISIS_URL):
        subtract(Frame(data=data), Template(data=data), tmp_path, isis_binary="no_mrj_phot")


@pytest.mark.parametrize(
    ("fwhm_t", "fwhm_s", "direction", "ksum"),
    [(3.0, 4.5, "template", 1.2), (4.5, 3.0, "science", 1 / 1.2)],
    ids=["template-convolved", "science-convolved"],
)
def test_fake_mrj_phot_residual_has_isis_conventions(
    tmp_path, pair_factory, render_sources, fwhm_t, fwhm_s, direction, ksum
):
    """A fake mrj_phot with the pair's true kernel: the residual must be science -
    template in the science frame's scale, noise-limited, with the transients' flux."""
    science, template = pair_factory(
        2, fwhm_t=fwhm_t, fwhm_s=fwhm_s, beta=None, transients=TRANSIENTS, set_fwhm=True
    )
    fake = program(tmp_path, FAKE_MRJ_PHOT.format(sigma=sigma_match(fwhm_t, fwhm_s), ksum=ksum))
    work = tmp_path / "work"
    res = subtract(science, template, work, isis_binary=str(fake))
    call = json.loads((work / "call.json").read_text())
    assert call["argv"] == ["ref.fits", "img.fits", "-c", "default_config"]
    assert read_isis_config(work / "default_config")["half_mesh_size"] == 9
    assert call["config"]["pix_min"] == -1e30 and call["config"]["saturation"] == 1e30
    assert res.kernel.direction == direction
    assert res.kernel.image is None
    assert res.kernel.meta["ksum"] == pytest.approx(ksum)
    assert res.meta["config"].endswith("(mrj_phot)")
    assert res.header["OISPROG"] == "mrj_phot"
    assert res.q > 0.9, res.meta
    assert 0.85 < res.meta["nnoise"] < 1.15  # the noise image describes the residual
    for x, y, flux in TRANSIENTS:
        truth = aperture(render_sources(science.shape, [x], [y], [flux], fwhm_s, beta=None), x, y)
        sigma = math.sqrt(aperture(res.noise**2, x, y))
        assert abs(aperture(res.data, x, y) - truth) < 0.03 * truth + 3 * sigma


def test_masked_pixels_reach_mrj_phot_as_isis_defects(tmp_path, pair_factory):
    """Pixels the numpy fit would not use are written below pix_min (ISIS's defect
    marker) and their kernel footprint gets weight 0 in the residual."""
    science, template = pair_factory(2, beta=None, set_fwhm=True)
    weight = np.ones(template.shape, np.float32)
    weight[100:104, 120:130] = 0.0
    template = attrs.evolve(template, weight=weight)
    science = attrs.evolve(science, data=np.where(weight > 0, science.data, np.nan))
    fake = program(tmp_path, FAKE_MRJ_PHOT.format(sigma=sigma_match(3.0, 4.5), ksum=1.2))
    work = tmp_path / "work"
    res = subtract(science, template, work, isis_binary=str(fake))
    pix_min = read_isis_config(work / "default_config")["pix_min"]
    ref, img = (
        read_isis_image(work / "ref.fits", (256, 256)),
        read_isis_image(work / "img.fits", (256, 256)),
    )
    assert (ref[100:104, 120:130] < pix_min).all() and (img[100:104, 120:130] < pix_min).all()
    assert (ref[weight > 0] > pix_min).all() and np.isfinite(img).all()
    assert not res.weight[100 - 9 : 104 + 9, 120 - 9 : 130 + 9].any()  # within hm = 9
    assert np.isfinite(res.data).all() and res.q > 0.9


def test_kernel_sum_is_derived_from_conv0_when_not_printed(tmp_path, pair_factory):
    science, template = pair_factory(3, beta=None, set_fwhm=True)
    body = FAKE_MRJ_PHOT.format(sigma=sigma_match(3.0, 4.5), ksum=1.2)
    fake = program(tmp_path, body.replace('print("sum_kernel', 'print("kernel'))
    res = subtract(science, template, tmp_path / "work", isis_binary=str(fake))
    assert res.kernel.meta["ksum"] == pytest.approx(1.2, rel=1e-3)
    assert res.q > 0.9


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (
            'print("Reading Image1")\nprint("Cannot Allocate  Ref Image")\nraise SystemExit(3)',
            r"mrj_phot on science 'sci' / template 'tpl' failed with exit code 3: "
            r"Cannot Allocate  Ref Image$",
        ),
        (
            'print("Oops...cannot find any configuration file...Goodbye !")',
            r"wrote no usable output \(no conv.fits\): Oops\.\.\.cannot find any configuration "
            r"file\.\.\.Goodbye !$",
        ),
        (
            "from astropy.io import fits\nimport numpy as np\n"
            'fits.PrimaryHDU(np.zeros((5, 5), np.float32)).writeto("conv.fits")\n'
            'print("sum_kernel 0 0: 1.0")',
            r"conv.fits has shape \(5, 5\), expected \(64, 64\)\): sum_kernel 0 0: 1.0$",
        ),
        (
            'open("conv.fits", "w").write("not FITS")\nprint("done")',
            r"conv.fits is not a readable FITS image .*: done$",
        ),
        (
            "import time\nprint('Looking for Stamps', flush=True)\ntime.sleep(30)",
            r"timed out after 1 s \(subtract.ois.isis_timeout\); last output: Looking for Stamps$",
        ),
    ],
    ids=["exit-code", "gave-up-with-0", "wrong-shape", "not-fits", "timeout"],
)
def test_mrj_phot_failures_are_one_line_stage_errors(tmp_path, body, match):
    rng = np.random.default_rng(4)
    data = rng.normal(100.0, 5.0, (64, 64)).astype(np.float32)
    fake = program(tmp_path, body)
    with pytest.raises(StageError, match=match) as info:
        subtract(
            Frame(data=data, name="sci"),
            Template(data=data, name="tpl"),
            tmp_path / "work",
            isis_binary=str(fake),
            # 1 s for the case that times out; the others start Python and astropy, which
            # can take more than 1 s on a busy machine
            isis_timeout=1.0 if "timed out" in match else 60.0,
        )
    assert "\n" not in str(info.value)


def test_read_isis_image_tolerates_missing_final_padding(tmp_path):
    from astropy.io import fits

    data = np.arange(12.0, dtype=np.float32).reshape(3, 4)
    path = tmp_path / "conv.fits"
    fits.PrimaryHDU(data).writeto(path)
    raw = path.read_bytes()
    path.write_bytes(raw[: 2880 + data.nbytes])  # as ISIS writes it: no block padding
    np.testing.assert_array_equal(read_isis_image(path, (3, 4)), data)
    with pytest.raises(ValueError, match="expected"):
        read_isis_image(path, (4, 3))


@pytest.mark.skipif(shutil.which("mrj_phot") is None, reason="ISIS mrj_phot not on PATH")
def test_real_mrj_phot_subtracts_a_pair(tmp_path, pair_factory):
    science, template = pair_factory(2, transients=TRANSIENTS, set_fwhm=True)
    # ISIS works on frames that keep their sky
    science = attrs.evolve(science, data=science.data + 1000.0)
    template = attrs.evolve(template, data=template.data + 300.0)
    res = subtract(science, template, tmp_path / "work", isis_binary="mrj_phot")
    assert res.kernel.meta["ksum"] == pytest.approx(1.2, rel=0.05)
    assert res.q > 0.5
    for x, y, flux in TRANSIENTS:
        assert aperture(res.data, x, y) > 0.5 * flux
