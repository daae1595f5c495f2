"""The ``ois`` backend's kernel models (:mod:`oasis_ois.choose`): the delta basis, the
low-order fallback, cross-convolution, and how ``kernel = "auto"`` picks and records them.

Tolerances come from the simulated noise: the kernel sum's from the stars' combined
signal-to-noise, a residual's from its noise image (star-aperture RMS, 1 = noise-limited,
as ``benchmarks/subtract.py`` measures it).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from oasis_ois.backend import OisOptions, OisSubtract
from oasis_ois.stars import outliers
from scipy.signal import fftconvolve

from oasis_core.contracts.model import Frame, Residual, Template
from oasis_core.engine.quality import bright_stars, star_aperture_rms
from oasis_core.engine.subtraction import run_subtraction

WORKDIR = Path("unused")
SETTINGS = {"q_floor": 0.5, "q_ceiling": 0.75}


def subtract(science: Frame, template: Template, **options: object) -> Residual:
    return OisSubtract().subtract(science, template, options=OisOptions(**options), workdir=WORKDIR)


def aperture_flux(residual: Residual, x: float, y: float, r: float) -> float:
    yy, xx = np.mgrid[: residual.data.shape[0], : residual.data.shape[1]]
    inside = (xx - x) ** 2 + (yy - y) ** 2 <= r * r
    annulus = ((xx - x) ** 2 + (yy - y) ** 2 > (1.5 * r) ** 2) & (
        (xx - x) ** 2 + (yy - y) ** 2 <= (2.2 * r) ** 2
    )
    sky = float(np.median(residual.data[annulus]))
    return float(np.sum(residual.data[inside] - sky))


# ------------------------------------------------------------------ the delta basis

HALF = 7
U = np.arange(-HALF, HALF + 1)
UX, UY = np.meshgrid(U, U)


def _known_kernel() -> np.ndarray:
    """Asymmetric: an elongated Gaussian (1.8 x 0.8 px), off centre by (0.4, -0.25) px,
    summing to 1.2 (the science brighter)."""
    k = np.exp(-0.5 * (((UX - 0.4) / 1.8) ** 2 + ((UY + 0.25) / 0.8) ** 2))
    return 1.2 * k / k.sum()


@pytest.fixture(scope="module")
def kernel_pair(render_sources):
    """A template of 300 Moffat stars (FWHM 3) and a science that is the noise-free
    template through :func:`_known_kernel`, plus a background; both with noise."""
    rng = np.random.default_rng(3)
    shape, n, gain = (192, 192), 300, 2.0
    x, y = rng.uniform(3, shape[1] - 4, n), rng.uniform(3, shape[0] - 4, n)
    flux = 10 ** rng.uniform(3.3, 4.8, n)
    tpl = render_sources(shape, x, y, flux, 3.0)
    sci = fftconvolve(tpl, _known_kernel(), mode="same") + 25.0
    sky_s, sky_t = 400.0, 150.0
    sci_n = sci + rng.normal(0, 1, shape) * np.sqrt((sky_s + np.clip(sci, 0, None)) / gain)
    tpl_n = tpl + rng.normal(0, 1, shape) * np.sqrt((sky_t + tpl) / gain)
    science = Frame(data=sci_n.astype(np.float32), name="sci", gain=gain)
    template = Template(data=tpl_n.astype(np.float32), name="tpl", gain=gain)
    # the kernel sum's statistical error: that of the flux ratio of all the stars together
    r = 2.0 * 3.0
    var_star = np.pi * r * r * (sky_s / gain) + 1.2 * flux / gain
    sigma_ksum = 1.2 / math.sqrt(float(np.sum((1.2 * flux) ** 2 / var_star)))
    return science, template, (x, y, flux), sigma_ksum


def test_delta_basis_recovers_a_known_asymmetric_kernel(kernel_pair):
    science, template, (x, y, flux), sigma_ksum = kernel_pair
    res = subtract(science, template, kernel="delta")
    assert res.meta["choice_kernel"] == "delta"
    assert res.header["KMODEL"] == "delta"
    fitted = res.kernel.image
    c = fitted.shape[0] // 2
    core = fitted[c - HALF : c + HALF + 1, c - HALF : c + HALF + 1]
    truth = _known_kernel()
    # the flux scale within 5 sigmas of its statistical error (and the truncation's 0.5 %)
    assert abs(res.kernel.meta["ksum"] - 1.2) < 5 * sigma_ksum + 0.006
    # the shape: the centroid to 0.05 px, the core pixel by pixel to 10 % of the kernel
    for axis in (UX, UY):
        true_c = float((truth * axis).sum() / truth.sum())
        fit_c = float((core * axis).sum() / core.sum())
        assert fit_c == pytest.approx(true_c, abs=0.05)
    inner = (np.abs(UX) <= 3) & (np.abs(UY) <= 3)
    err = np.sqrt(np.sum((core - truth)[inner] ** 2) / np.sum(truth[inner] ** 2))
    assert err < 0.1
    # and the residual is noise-limited on the stars
    bright = flux > 10**4.3
    rms = star_aperture_rms(res.data, res.noise, res.weight, x[bright], y[bright], 3.0)
    assert rms < 1.15
    assert 0.9 < res.meta["nnoise"] < 1.1


def test_delta_basis_follows_a_kernel_that_varies_over_the_field(render_sources):
    """deg_spatial 1: the science PSF 3.2 px on the left, 4.4 px on the right."""
    rng = np.random.default_rng(11)
    shape, n = (192, 192), 260
    x, y = rng.uniform(3, 188, n), rng.uniform(3, 188, n)
    flux = 10 ** rng.uniform(3.4, 4.8, n)
    fwhm_s = 3.2 + 1.2 * x / shape[1]
    sci = render_sources(shape, x, y, flux, fwhm_s)
    tpl = render_sources(shape, x, y, flux, 3.0)
    sci += rng.normal(0, 1, shape) * np.sqrt((300 + sci) / 2.0)
    tpl += rng.normal(0, 1, shape) * np.sqrt((100 + tpl) / 2.0)
    science = Frame(data=sci.astype(np.float32), name="sci", gain=2.0)
    template = Template(data=tpl.astype(np.float32), name="tpl", gain=2.0)
    varying = subtract(science, template, kernel="delta")
    constant = subtract(science, template, kernel="delta", deg_spatial=0)
    assert varying.meta["deg_spatial"] == 1 and constant.meta["deg_spatial"] == 0
    bright = flux > 10**4.2
    rms = [
        star_aperture_rms(r.data, r.noise, r.weight, x[bright], y[bright], 4.0)
        for r in (varying, constant)
    ]
    assert rms[0] < 1.2 and rms[0] < 0.8 * rms[1], rms


# ------------------------------------------------------------- the low-order kernel


def _sparse_pair(render_sources, stars, *, scale, bg, transient=None, shape=(96, 96), seed=5):
    """Few stars (x, y, flux), science = scale x template + bg, optional transient."""
    rng = np.random.default_rng(seed)
    x, y, f = (np.asarray(a, float) for a in stars) if len(stars[0]) else (np.zeros(0),) * 3
    sci = scale * render_sources(shape, x, y, f, 3.6) if x.size else np.zeros(shape)
    tpl = render_sources(shape, x, y, f, 3.0) if x.size else np.zeros(shape)
    if transient is not None:
        sci += render_sources(shape, *([v] for v in transient), 3.6)
    sci = sci + bg + rng.normal(0, 1, shape) * np.sqrt((400 + np.clip(sci, 0, None)) / 2.0)
    tpl = tpl + rng.normal(0, 1, shape) * np.sqrt((200 + tpl) / 2.0)
    return (
        Frame(data=sci.astype(np.float32), name="sci", gain=2.0),
        Template(data=tpl.astype(np.float32), name="tpl", gain=2.0),
    )


@pytest.mark.parametrize("nstars", [0, 1, 2])
def test_low_order_fallback_recovers_scale_and_background(render_sources, nstars):
    stars = ([25.0, 70.0][:nstars], [30.0, 65.0][:nstars], [6e4, 4e4][:nstars])
    transient = (48.0, 48.0, 8e3)
    science, template = _sparse_pair(
        render_sources, stars, scale=1.0 if nstars < 2 else 1.3, bg=40.0, transient=transient
    )
    res = run_subtraction(
        OisSubtract(),
        science,
        template,
        options=OisOptions(),
        workdir=WORKDIR,
        settings=SETTINGS,
    )
    assert res.meta["choice_kernel"] == "low"
    assert res.meta["fallback"].startswith("low-order kernel: ")
    assert res.meta["flag"].startswith("fallback: low-order kernel")  # flagged...
    assert res.meta["usable"] and res.q > 0.75  # ... not masked
    assert res.meta["tries"] == 1  # nothing with a free shape is tried on so few stars
    # the background (40 ADU, in the science frame's level): the residual's sky is 0 to
    # a tenth of a pixel's noise (Moffat wings a Gaussian kernel cannot match included)
    sigma = math.sqrt(440 / 2.0)
    yy, xx = np.mgrid[:96, :96]
    far = (res.weight > 0) & np.all(
        [
            np.hypot(xx - sx, yy - sy) > 12
            for sx, sy in zip([*stars[0], 48], [*stars[1], 48], strict=True)
        ],
        axis=0,
    )
    assert abs(float(np.median(res.data[far]))) < 0.1 * sigma
    assert res.meta["bg"] == pytest.approx(40.0, abs=0.15 * sigma)
    if nstars == 2:  # two stars that agree set the scale
        assert res.meta["low_terms"].startswith("scale, shift, background")
        assert res.meta["fscale"] == pytest.approx(1.3, rel=0.03)
    else:
        assert "scale 1 assumed" in res.meta["low_terms"]
        assert res.meta["fscale"] == pytest.approx(1.0, abs=1e-9)
    # the transient keeps its flux
    assert aperture_flux(res, 48.0, 48.0, 7.0) == pytest.approx(8e3 * 0.97, rel=0.1)


# --------------------------------------------------------------- cross-convolution


@pytest.fixture(scope="module")
def crossed_pair():
    """Round template, science of the same FWHM with ellipticity 0.5 along x: the
    science is wider along x and narrower along y, neither PSF contains the other."""
    from oasis_native.sim import simulate_pair

    (s, sh), (t, th), _ = simulate_pair(
        (160, 160),
        seed=2,
        fwhm_science=3.5,
        fwhm_template=3.5,
        ellipticity_science=0.5,
        n_stars=220,
        transients=0,
    )
    science = Frame(data=s, name="sci", gain=sh["GAIN"], saturation=sh["SATURATE"])
    template = Template(data=t, name="tpl", gain=th["GAIN"], saturation=th["SATURATE"])
    return science, template, bright_stars(t)


def test_cross_convolution_removes_the_dipoles_of_one_way_convolution(crossed_pair):
    science, template, bright = crossed_pair
    radius = 3.5 / math.sqrt(0.5)

    def rms(res: Residual) -> float:
        return star_aperture_rms(res.data, res.noise, res.weight, *bright, radius)

    cross = subtract(science, template, kernel="cross")
    assert cross.header["KMODEL"] == "cross" and cross.header["CONVOLVE"] == "template"
    assert cross.meta["cross_psf"].startswith("gauss fwhm=")
    one_way = [subtract(science, template, kernel=k) for k in ("isis", "delta")]
    assert rms(cross) < 1.1
    for res in one_way:  # every star leaves a dipole
        assert rms(res) > 1.3 * rms(cross), res.meta["choice_kernel"]
    assert cross.q > 0.95
    # the residual stays in the science frame's flux scale (same exposure here)
    assert cross.meta["fscale"] == pytest.approx(1.0, abs=0.02)
    # and its PSF is the science's through the template's: broader than either
    assert cross.meta["fwhm"] > 1.3 * 3.5
    # auto sees that the PSFs are crossed
    auto = subtract(science, template)
    assert auto.meta["choice_kernel"] == "cross"
    assert "crossed PSFs" in auto.meta["kernel_reason"]


def test_a_slight_crossing_is_subtracted_one_way_without_rings_around_bright_stars():
    """Science PSF of ellipticity 0.1 against a round template of the same FWHM, Moffat
    betas 3.39 and 3.02 (the simulator draws one per frame): the moments cross, but by
    less than ``CROSS_MIN``. Cross-convolution smooths the noise and not the wings'
    mismatch, which stood out at 1.5-3 FWHM of every bright star (RMS 1.84 there, Q 0.71);
    one way, the ring is noise."""
    from oasis_native.sim import simulate_series
    from oasis_ois.stars import CROSS_MIN, CROSS_TOLERANCE

    series = simulate_series(
        2,
        (512, 512),
        seed=5,
        n_transients=0,
        max_shift=0.0,
        max_rotation_deg=0.0,
        cosmic_rays=False,
        hot_pixels=False,
        galaxy=False,
        frame_fwhm=[4.4, 4.4],
        frame_ellipticity=[0.0, 0.1],
        frame_angle=[0.0, 0.0],
    )
    (t, th), (s, sh) = series.frames
    science = Frame(data=s, name="sci", gain=sh["GAIN"], saturation=sh["SATURATE"])
    template = Template(data=t, name="tpl", gain=th["GAIN"], saturation=th["SATURATE"])
    res = subtract(science, template)
    # the moments do cross (by more than the nesting tolerance, less than CROSS_MIN)
    reason = res.meta["kernel_reason"]
    high, low = (float(v) for v in reason.split("D eig ")[1].split(" px2")[0].split("/"))
    moment = 0.5 * (4.4 / 2.3548) ** 2  # the template's, in the window of its own width
    assert low < -CROSS_TOLERANCE * moment and high > CROSS_TOLERANCE * moment
    assert min(high, -low) < CROSS_MIN * moment
    assert res.meta["choice_kernel"] == "isis" and "crossed" not in reason
    assert res.kernel.direction == "template"  # the science is broader on the whole
    # around the bright stars the residual is noise: RMS of the normalised residual in
    # annuli of 1.5-3 FWHM about the template's bright unsaturated stars
    xs, ys = bright_stars(t)
    assert len(xs) >= 15
    yy, xx = np.mgrid[:512, :512]
    ring = np.zeros(t.shape, dtype=bool)
    for x, y in zip(xs, ys, strict=True):
        r2 = (xx - x) ** 2 + (yy - y) ** 2
        ring |= (r2 > (1.5 * 4.4) ** 2) & (r2 < (3.0 * 4.4) ** 2)
    z = (res.data / res.noise)[ring & (res.weight > 0)]
    assert float(np.sqrt(np.mean(z**2))) < 1.1
    assert res.q > 0.95


# ------------------------------------------------- transients never drive the fit


@pytest.mark.parametrize(
    "stars",
    [
        ([], [], []),  # the transient is the only object
        ([12.0], [50.0], [3e3]),  # one faint star, the transient the brightest object
        ([12.0, 50.0], [50.0, 12.0], [3e3, 2e3]),
    ],
    ids=["alone", "one-faint-star", "two-faint-stars"],
)
def test_a_transient_at_the_centre_of_a_small_frame_keeps_its_flux(render_sources, stars):
    """63 x 63 cutouts (the shape of alerts), the transient the brightest object."""
    flux = 2e4
    science, template = _sparse_pair(
        render_sources, stars, scale=1.0, bg=5.0, transient=(31.0, 31.0, flux), shape=(63, 63)
    )
    res = run_subtraction(
        OisSubtract(),
        science,
        template,
        options=OisOptions(),
        workdir=WORKDIR,
        settings=SETTINGS,
    )
    assert res.meta["usable"]
    assert aperture_flux(res, 31.0, 31.0, 7.0) == pytest.approx(0.97 * flux, rel=0.1)


def test_a_transient_on_the_brightest_star_of_a_few_does_not_bend_the_kernel(
    render_sources,
):
    """Five stars; a transient (20 % of its flux) on the brightest one: the star is
    rejected from the fit (not the transient absorbed by a scaled or sharpened kernel)."""
    stars = ([20.0, 70.0, 25.0, 75.0, 48.0], [20.0, 25.0, 72.0, 70.0, 47.0])
    flux = [1.5e4, 1.2e4, 1.0e4, 1.4e4, 1e5]
    science, template = _sparse_pair(
        render_sources, (*stars, flux), scale=1.1, bg=0.0, transient=(48.0, 47.0, 2e4)
    )
    res = subtract(science, template)
    assert res.meta["choice_kernel"] == "delta"
    assert res.meta["nstars_rejected"] >= 1
    assert res.meta["fscale"] == pytest.approx(1.1, rel=0.02)
    assert aperture_flux(res, 48.0, 47.0, 7.0) == pytest.approx(0.97 * 2e4, rel=0.1)


def test_outliers_are_judged_against_the_others():
    ratios = np.array([1.006, 1.047, 0.991, 0.982])  # the brightest carries a transient
    assert list(outliers(ratios, np.full(4, 0.003), 3.0, 0.01)) == [1]
    # never fewer than three are kept, and two cannot be told apart
    assert list(outliers(np.array([1.0, 1.15, 0.93, 0.92]), np.full(4, 0.003), 3.0, 0.01)) == [1]
    assert outliers(np.array([1.0, 2.0]), np.full(2, 0.001), 3.0, 0.0).size == 0


# ------------------------------------------------------------ the choice, recorded


def test_auto_records_its_choice_in_meta_header_and_configuration(pair_factory):
    science, template = pair_factory(1)  # 110 stars on 256 x 256: ISIS's stamps
    res = run_subtraction(
        OisSubtract(),
        science,
        template,
        options=OisOptions(),
        workdir=WORKDIR,
        settings=SETTINGS,
    )
    assert res.meta["choice_kernel"] == "isis" == res.header["KMODEL"]
    assert res.meta["kernel_reason"].startswith("auto: ")
    assert "fallback" not in res.meta and not res.meta["flag"]
    assert res.meta["config"].startswith("ns=10x10 ")
    # a model asked for is used and said so
    delta = subtract(science, template, kernel="delta")
    assert delta.meta["kernel_reason"] == "kernel option"
    assert delta.meta["config"].startswith("delta hk=")
    assert delta.header["DEGSPAT"] == delta.meta["deg_spatial"]
