"""The ``ois`` fit's stamp rejection, the terms of its noise image and the options that
shape the fit (varying kernel sum, background degree, stamp and kernel sizes), on small
pairs.

Stamp rejection: a variable star and a cosmic ray on stamps must not bend the kernel.
Each stamp is first screened by its own fit (chi2 and kernel sum), then the global fit
drops stamps whose chi2 under the common solution is an outlier. The first screening
catches these defects by itself, so the global iteration is also tested alone, with the
first switched off: it must then find them too, and the kernel must match the truth
(Gaussian PSFs, which the ISIS basis matches). With neither, the same defects bias it.

Noise image: ``sigma**2 = var_S + K**2 * var_T`` (the convolved image's variance through
the kernel), divided by the kernel sum**2 when the science is convolved, less
``2 K(0) var_S / N`` when the science frame is one of the N frames of the template. The
test compares ``mean((R / sigma)**2)`` away from sources with 1, within 5 standard errors:
that of a mean of n squared unit Gaussians, sqrt(2 / n), and that of the measured sky
noise on which the noise image rests (a robust sigma of N pixels: 1.17 / sqrt(N), twice
that in variance). Each scenario makes one term large, so that leaving it out, or
halving the covariance correction, moves the figure by several tolerances.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import attrs
import numpy as np
import pytest
from oasis_ois import ois
from oasis_ois.ois import OisOptions, OisSolution, solve

from oasis_core.contracts.model import Frame, Template

SHAPE = (160, 160)
GAIN = 4.0
FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))


# ------------------------------------------------------------------ stamp rejection


class LocalScreeningOff:
    """Stands in for ``ois._robust_outliers``: the first two calls of a fit (each stamp's
    own chi2 and kernel sum) reject nothing; later ones (the global iterations) are the
    real function. Records every call's size and sidedness."""

    def __init__(self) -> None:
        self.real = ois._robust_outliers
        self.calls: list[tuple[int, bool]] = []

    def __call__(self, values: np.ndarray, nsigma: float, one_sided: bool) -> np.ndarray:
        self.calls.append((values.size, one_sided))
        if len(self.calls) <= 2:
            return np.zeros(values.shape, bool)
        return self.real(values, nsigma, one_sided)


@pytest.fixture(scope="module")
def field() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """40 stars; star 0 (bright) will vary, a cosmic ray will hit beside star 1."""
    rng = np.random.default_rng(3)
    n = 40
    x = rng.uniform(20, SHAPE[1] - 20, n)
    y = rng.uniform(20, SHAPE[0] - 20, n)
    flux = 10 ** rng.uniform(3.6, 4.3, n)
    x[0], y[0], flux[0] = 50.3, 60.6, 4e4
    x[1], y[1], flux[1] = 109.8, 99.6, 1.5e4
    return x, y, flux


def defect_pair(pair_factory, field, *, variable: bool, cosmic: bool) -> tuple[Frame, Template]:
    """Gaussian PSFs of 3 (template) and 4.5 px (science), flux scale 1.2; star 0 50 %
    brighter in the science frame, and a 3000-ADU cosmic ray 2 px from star 1's centre."""
    x, y, flux = field
    brighter = ((x[0], y[0], 0.5 * 1.2 * flux[0]),) if variable else ()
    science, template = pair_factory(
        5, shape=SHAPE, beta=None, stars=(x, y, flux), transients=brighter
    )
    if cosmic:
        data = science.data.copy()
        data[101, 110] += 3000.0
        science = Frame(data=data, name="sci", gain=GAIN)
    return science, template


def kernel_error(sol: OisSolution, render_sources: Callable[..., np.ndarray]) -> float:
    """Relative L2 distance between the template's PSF through the kernel and the
    science's (times the flux scale 1.2): 0 for the true kernel."""
    size = (61, 61)
    psf_t = render_sources(size, [30.0], [30.0], [1.0], 3.0, beta=None)
    psf_s = 1.2 * render_sources(size, [30.0], [30.0], [1.0], 4.5, beta=None)
    from scipy.signal import fftconvolve

    matched = fftconvolve(psf_t, sol.kernel, mode="same")
    return float(np.sqrt(((matched - psf_s) ** 2).sum() / (psf_s**2).sum()))


@pytest.fixture(scope="module")
def clean_solution(pair_factory, field) -> OisSolution:
    return solve(*defect_pair(pair_factory, field, variable=False, cosmic=False), OisOptions())


@pytest.mark.parametrize(("variable", "cosmic"), [(True, False), (False, True), (True, True)])
def test_variable_star_and_cosmic_ray_on_stamps_do_not_bend_the_kernel(
    pair_factory, render_sources, field, clean_solution, variable, cosmic
):
    pair = defect_pair(pair_factory, field, variable=variable, cosmic=cosmic)
    clean_error = kernel_error(clean_solution, render_sources)
    assert clean_error < 0.03  # the basis matches Gaussian PSFs to a few percent
    sol = solve(*pair, OisOptions())
    assert sol.meta["nrejected"] > clean_solution.meta["nrejected"]
    assert kernel_error(sol, render_sources) < 1.5 * clean_error
    assert sol.ksum == pytest.approx(1.2, abs=0.015)


@pytest.mark.parametrize(("variable", "cosmic"), [(True, False), (False, True)])
def test_global_chi2_rejection_alone_removes_them(
    pair_factory, render_sources, field, clean_solution, monkeypatch, variable, cosmic
):
    pair = defect_pair(pair_factory, field, variable=variable, cosmic=cosmic)
    clean_error = kernel_error(clean_solution, render_sources)
    spy = LocalScreeningOff()
    monkeypatch.setattr(ois, "_robust_outliers", spy)
    sol = solve(*pair, OisOptions())
    ncand = sol.meta["ncandidates"]
    # the screening switched off is the candidates' own fits, chi2 then kernel sum
    assert spy.calls[:2] == [(ncand, True), (ncand, False)]
    assert all(one_sided and n < ncand for n, one_sided in spy.calls[2:])
    assert sol.meta["nrejected"] >= 1
    assert kernel_error(sol, render_sources) < 1.5 * clean_error
    assert sol.ksum == pytest.approx(1.2, abs=0.015)
    # without the global iterations either, the defect bends the kernel
    spy.calls.clear()
    biased = solve(*pair, OisOptions(max_iter=0))
    assert biased.meta["nrejected"] == 0
    assert kernel_error(biased, render_sources) > 2 * clean_error


def test_rejection_iterations_stop_at_max_iter(pair_factory, field, monkeypatch):
    # each iteration drops the worst outliers and refits; max_iter bounds the refits
    pair = defect_pair(pair_factory, field, variable=True, cosmic=True)
    counts = {}
    for max_iter in (0, 1, 5):
        spy = LocalScreeningOff()
        monkeypatch.setattr(ois, "_robust_outliers", spy)
        sol = solve(*pair, OisOptions(max_iter=max_iter))
        counts[max_iter] = (len(spy.calls) - 2, sol.meta["nrejected"])
    assert counts[0] == (0, 0)
    assert counts[1][0] == 1 and counts[1][1] >= 1
    assert counts[5][0] <= 5 and counts[5][1] >= counts[1][1]


# ------------------------------------------------------------------ the noise image


def noise_figure(sol: OisSolution) -> tuple[float, float]:
    """mean((R / sigma)**2) - 1 away from sources, and its 5-sigma tolerance."""
    good = (sol.weight > 0) & ~sol.sources
    z = sol.residual[good].astype(np.float64) / sol.noise[good]
    n = z.size
    tolerance = 5.0 * math.sqrt(2.0 / n + (2.0 * 1.17) ** 2 / sol.residual.size)
    return float(np.mean(z**2)) - 1.0, tolerance


def stacked_pair(seed: int, render: Callable[..., np.ndarray]) -> tuple[Frame, Template]:
    """A science frame and the mean of it and two other frames as template: one seeing
    (Gaussian, 3.5 px), so the kernel is a near delta and K(0) ~ 1."""
    rng = np.random.default_rng(seed)
    n = 30
    x = rng.uniform(2, SHAPE[1] - 3, n)
    y = rng.uniform(2, SHAPE[0] - 3, n)
    stars = render(SHAPE, x, y, 10 ** rng.uniform(3.0, 4.7, n), 3.5, beta=None)
    frames = [stars + rng.normal(size=SHAPE) * np.sqrt((1000.0 + stars) / GAIN) for _ in range(3)]
    science = Frame(data=frames[0].astype(np.float32), name="f0", gain=GAIN)
    template = Template(
        data=np.mean(frames, axis=0).astype(np.float32),
        name="tpl",
        gain=3 * GAIN,  # the mean of three frames: a third of the Poisson variance
        inputs=("f0", "f1", "f2"),
    )
    return science, template


@pytest.mark.parametrize("seed", [1, 2])
def test_template_noise_term(pair_factory, seed):
    # the template is 4x noisier than the science and the seeing similar (3.0 / 3.3 px):
    # the template's variance through the kernel is ~40 % of the residual's
    science, template = pair_factory(
        seed, shape=SHAPE, nstars=30, fwhm_t=3.0, fwhm_s=3.3, sky_s=250.0, sky_t=1000.0,
        beta=None, scale=1.0,
    )  # fmt: skip
    sol = solve(science, template, OisOptions())
    assert sol.direction == "template"
    excess, tolerance = noise_figure(sol)
    assert abs(excess) < tolerance
    # the science's own term (its sky variance) is the smaller part
    good = (sol.weight > 0) & ~sol.sources
    assert np.median(sol.noise[good] ** 2) > 1.5 * 250.0 / GAIN


@pytest.mark.parametrize("seed", [1, 2])
def test_noise_of_a_convolved_science_is_in_its_photometric_system(pair_factory, seed):
    # the science is the sharper: it is convolved, and the difference divided by the
    # kernel sum (1 / 1.5), its noise too
    science, template = pair_factory(
        seed, shape=SHAPE, nstars=30, fwhm_t=3.3, fwhm_s=3.0, sky_s=1000.0, sky_t=250.0,
        beta=None, scale=1.5,
    )  # fmt: skip
    sol = solve(science, template, OisOptions())
    assert sol.direction == "science"
    assert sol.ksum == pytest.approx(1 / 1.5, rel=0.02)
    excess, tolerance = noise_figure(sol)
    assert abs(excess) < tolerance


@pytest.mark.parametrize(("seed", "convolve"), [(1, "template"), (2, "template"), (1, "science")])
def test_covariance_with_a_template_that_contains_the_science(render_sources, seed, convolve):
    # R = S - (S + F1 + F2) / 3 has variance 2/3 var_S; without the correction the noise
    # image would say 4/3 var_S, with half of it 1 var_S (whichever image is convolved)
    science, template = stacked_pair(seed, render_sources)
    sol = solve(science, template, OisOptions(convolve=convolve))
    assert sol.direction == convolve
    excess, tolerance = noise_figure(sol)
    assert abs(excess) < tolerance
    if convolve == "science":
        # the noisier image convolved: the kernel smooths its noise (K(0) ~ 0.5), and the
        # noise image still describes the residual; without the correction it would not
        for unrelated in (
            Template(data=template.data, name="tpl", gain=template.gain, inputs=("a", "b")),
            Frame(data=template.data, name="tpl", gain=template.gain),
        ):
            plain = solve(science, unrelated, OisOptions(convolve=convolve))
            assert noise_figure(plain)[0] < -3 * tolerance
        return
    k = sol.kernel
    assert k[k.shape[0] // 2, k.shape[1] // 2] == pytest.approx(1.0, abs=0.05)
    good = (sol.weight > 0) & ~sol.sources
    var_s = 1000.0 / GAIN
    assert np.median(sol.noise[good] ** 2) == pytest.approx(2 / 3 * var_s, rel=0.05)
    # the same frames, the template not known to contain the science: 4/3 var_S, twice
    # the residual's real variance
    # (a plain Frame as template: it names no inputs)
    for unrelated in (
        Template(data=template.data, name="tpl", gain=template.gain, inputs=("a", "b")),
        Frame(data=template.data, name="tpl", gain=template.gain),
    ):
        plain = solve(science, unrelated, OisOptions(convolve=convolve))
        assert np.median(plain.noise[good] ** 2) == pytest.approx(4 / 3 * var_s, rel=0.05)
        assert noise_figure(plain)[0] == pytest.approx(-0.5, abs=tolerance)


@pytest.mark.parametrize(("variable", "cosmic"), [(True, False), (False, True)])
def test_each_stamps_own_fit_screens_them_without_global_iterations(
    pair_factory, render_sources, field, clean_solution, variable, cosmic
):
    # the first screening alone (max_iter=0): its chi2 catches the cosmic ray, its kernel
    # sum the variable star
    pair = defect_pair(pair_factory, field, variable=variable, cosmic=cosmic)
    sol = solve(*pair, OisOptions(max_iter=0))
    assert sol.meta["nrejected"] > clean_solution.meta["nrejected"]
    assert kernel_error(sol, render_sources) < 1.5 * kernel_error(clean_solution, render_sources)


def test_stamp_chi2_is_about_one_when_the_variance_model_is_right(clean_solution):
    # the median over stamps of mean((y - model)**2 / var) under the final kernel: each
    # stamp's is known to sqrt(2 / 961) = 0.05; the variance model (sky, the stars'
    # photons, the convolved image's noise through the kernel) to ~10 %
    assert 0.8 < clean_solution.meta["chi2"] < 1.2


# ------------------------------------------------------------------ the fit's options


def scaled_pair(
    render, *, seed: int, scale, bg=None, n: int = 45, shape: tuple[int, int] = SHAPE
) -> tuple[Frame, Template, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Gaussian PSFs of 3.0 (template, sky 1000) and 3.3 px (science, sky 250), the science
    fluxes multiplied by ``scale(x)`` (a transparency gradient across the field) and a
    differential background ``bg(x, y)`` added to it; and the stars (x, y, science flux)."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(2, shape[1] - 3, n)
    y = rng.uniform(2, shape[0] - 3, n)
    flux = 10 ** rng.uniform(3.3, 4.5, n)
    sci = render(shape, x, y, flux * scale(x), 3.3, beta=None)
    tpl = render(shape, x, y, flux, 3.0, beta=None)
    if bg is not None:
        yy, xx = np.mgrid[: shape[0], : shape[1]]
        sci = sci + bg(xx, yy)
    sci_data = sci + rng.normal(size=shape) * np.sqrt((250.0 + np.maximum(sci, 0)) / GAIN)
    tpl_data = tpl + rng.normal(size=shape) * np.sqrt((1000.0 + tpl) / GAIN)
    return (
        Frame(data=sci_data.astype(np.float32), name="sci", gain=GAIN),
        Template(data=tpl_data.astype(np.float32), name="tpl", gain=GAIN),
        (x, y, flux * scale(x)),
    )


def _disc_mask(shape, x, y, radius):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (xx - x) ** 2 + (yy - y) ** 2 <= radius**2


def _cut(sol: OisSolution, columns: slice) -> OisSolution:
    return attrs.evolve(
        sol,
        residual=sol.residual[:, columns],
        noise=sol.noise[:, columns],
        weight=sol.weight[:, columns],
        sources=sol.sources[:, columns],
    )


def test_a_photometric_scale_varying_over_the_field(render_sources):
    # 1.0 on the left edge to 1.6 on the right: const_ksum=False lets the kernel sum vary
    shape = (256, 256)

    def scale(x):
        return 1.0 + 0.6 * np.asarray(x) / (shape[1] - 1)

    science, template, (x, y, flux) = scaled_pair(
        render_sources, seed=3, scale=scale, n=150, shape=shape
    )
    varying = solve(science, template, OisOptions(const_ksum=False))
    constant = solve(science, template, OisOptions())
    assert varying.ksum == pytest.approx(1.3, rel=0.01)
    # the relative residual flux of the bright stars, median over each outer third (about
    # 15 stars known to ~1 % each): 0 with a varying kernel sum; with a constant one the
    # left third (scale ~1.1) is left too faint, the right (~1.5) too bright
    for sol, left, right in ((varying, (-0.015, 0.015), (-0.015, 0.015)),
                             (constant, (-1, -0.03), (0.02, 1))):  # fmt: skip
        rel = []
        for xs, ys, f in zip(x, y, flux, strict=True):
            disc = _disc_mask(shape, xs, ys, 6.0)
            if f > 1e4 and (sol.weight[disc] > 0).all():
                rel.append((xs, float(sol.residual[disc].sum()) / f))
        rel = np.array(rel)
        for third, (lo, hi) in ((rel[:, 0] < 70, left), (rel[:, 0] > 186, right)):
            assert third.sum() >= 8
            assert lo < np.median(rel[third, 1]) < hi, (sol is varying, lo, hi)
    # the template's noise term follows the kernel sum: the noise image is right on both
    # halves, where the kernel sum is ~12 % below and above its value at the centre
    for half in (slice(0, shape[1] // 2), slice(shape[1] // 2, None)):
        excess, tolerance = noise_figure(_cut(varying, half))
        assert abs(excess) < tolerance, half


def test_a_curved_differential_background_is_fitted(render_sources):
    # a quadratic differential background of +-60 ADU: deg_bg=2 removes it
    shape = (256, 256)

    def bg(xx, yy):
        u, v = xx / (shape[1] - 1) * 2 - 1, yy / (shape[0] - 1) * 2 - 1
        return 30.0 + 40.0 * u**2 - 30.0 * v**2 + 20.0 * u * v

    pair = scaled_pair(render_sources, seed=4, scale=lambda x: 1.0, bg=bg, n=120, shape=shape)
    means = {}
    for deg in (2, 1):
        sol = solve(*pair[:2], OisOptions(deg_bg=deg))
        assert sol.meta["deg_bg"] == deg
        good = (sol.weight > 0) & ~sol.sources
        z = np.where(good, sol.residual / sol.noise, np.nan)
        blocks = [
            z[by : by + 64, bx : bx + 64] for by in range(0, 256, 64) for bx in range(0, 256, 64)
        ]
        means[deg] = [
            (np.nanmean(b), np.isfinite(b).sum()) for b in blocks if np.isfinite(b).sum() > 300
        ]
    # the mean of each 64 x 64 block away from sources, in units of its standard error
    # 1 / sqrt(N): as flat as a pair without any differential background (where faint
    # star wings outside the source mask leave up to ~5); a plane leaves the curvature
    assert len(means[2]) >= 8
    assert max(abs(mean) * np.sqrt(n) for mean, n in means[2]) < 8
    assert max(abs(mean) * np.sqrt(n) for mean, n in means[1]) > 20


@pytest.mark.parametrize(("size", "half_stamp"), [(40, 9), (48, 13), (49, 15)])
def test_frames_smaller_than_stamp_and_kernel_shrink_the_stamps(render_sources, size, half_stamp):
    # stamp (15) + kernel (9) half sizes need 49 px; a smaller frame gets smaller stamps,
    # (size - 1) // 2 - 9 - 1, around one star at its centre
    c = (size - 1) / 2
    rng = np.random.default_rng(size)
    tpl = render_sources((size, size), [c], [c], [3e4], 3.0, beta=None)
    sci = 1.2 * render_sources((size, size), [c], [c], [3e4], 3.6, beta=None)
    science = Frame(data=(sci + rng.normal(0, 5, sci.shape)).astype(np.float32), name="s")
    template = Template(data=(tpl + rng.normal(0, 5, tpl.shape)).astype(np.float32), name="t")
    sol = solve(science, template, OisOptions(seeing_scale=False))
    assert sol.meta["half_stamp"] == half_stamp
    assert sol.meta["nstamps"] == 1
    assert sol.meta["flag"] == "few stamps: 1"
    assert sol.ksum == pytest.approx(1.2, rel=0.05)
    assert np.isfinite(sol.residual).all()


def test_seeing_scaling_widens_basis_kernel_and_stamps(pair_factory):
    # FWHM 3 -> 7 px: the matching kernel's sigma is sqrt(7^2 - 3^2) / 2.355 = 2.69 px,
    # beyond sigma_gauss2 (1.5): the Gaussians are scaled by 2.69 / 1.5, the kernel covers
    # 3 of the widest (11 px), the stamps 3 FWHM (21 px)
    science, template = pair_factory(
        4, shape=(192, 192), beta=None, nstars=40, fwhm_t=3.0, fwhm_s=7.0, set_fwhm=True
    )
    sol = solve(science, template, OisOptions())
    assert sol.meta["sigma_match"] == pytest.approx(math.sqrt(49 - 9) / FWHM_PER_SIGMA)
    assert sol.meta["sigmas"] == "1.25,2.69,3.58"
    assert (sol.meta["half_mesh"], sol.meta["half_stamp"]) == (11, 21)
    assert sol.kernel.shape == (23, 23)
    assert sol.ksum == pytest.approx(1.2, rel=0.01)
    off = solve(science, template, OisOptions(seeing_scale=False))
    assert (off.meta["half_mesh"], off.meta["half_stamp"]) == (9, 15)
    assert "sigma_match" not in off.meta


def test_background_terms_and_coefficients(pair_factory):
    # make_pair's differential background: 40 (1 + 0.3 (x - 128) / 256 - 0.2 (y - 128) / 256)
    # ADU, i.e. 5.98 xn - 3.98 yn in the scaled coordinates (their error: the pixel noise
    # over ~30 000 stamp pixels, ~0.2 ADU)
    science, template = pair_factory(1, beta=None)
    sol = solve(science, template, OisOptions())
    assert sol.coefficients.shape == (49, 6)  # 28 + 15 + 6 basis functions, degree 2
    assert sol.coefficients[0, 0] == sol.ksum
    assert sol.bg_coefficients.shape == (3,)
    np.testing.assert_allclose(sol.bg_coefficients[1:], [5.98, -3.98], atol=1.0)
    # frames that keep their skies (1000 and 300 ADU): "bg" is the whole differential
    # background at the centre in the frames' own levels, science - K * template
    kept = solve(
        Frame(data=science.data + np.float32(1000), name="sci", gain=GAIN),
        Template(data=template.data + np.float32(300), name="tpl", gain=GAIN),
        OisOptions(),
    )
    assert kept.meta["bg"] == pytest.approx(1000 + 40 - kept.ksum * 300, abs=1.0)
    assert kept.ksum == pytest.approx(sol.ksum, rel=0.01)


def test_a_template_that_is_the_science_itself_keeps_a_noise_floor(pair_factory):
    # N = 1: the correction would remove all the variance; the noise image is floored at
    # a quarter of the uncorrelated one (var_S + K^2 var_T ~ 2 var_S for a near delta)
    science, _ = pair_factory(2, beta=None, shape=SHAPE, nstars=40, fwhm_s=3.0)
    itself = Template(data=science.data, name="tpl", gain=GAIN, inputs=(science.name,))
    sol = solve(science, itself, OisOptions())
    good = (sol.weight > 0) & ~sol.sources
    var_s = 1000.0 / GAIN
    assert np.median(sol.noise[good] ** 2) == pytest.approx(0.25 * 2 * var_s, rel=0.1)
    assert np.abs(sol.residual[good]).max() < 0.1 * np.sqrt(var_s)


@pytest.mark.parametrize(("nstars", "flag"), [(3, None), (2, "few stamps: 2")])
def test_three_stamps_per_term_are_enough(render_sources, nstars, flag):
    # a constant kernel and background (one term each) need 3 stamps
    shape = (128, 128)
    x = np.array([30.0, 97.0, 64.0])[:nstars]
    y = np.array([30.0, 30.0, 95.0])[:nstars]
    flux = np.full(nstars, 3e4)
    rng = np.random.default_rng(nstars)
    tpl = render_sources(shape, x, y, flux, 3.0, beta=None) + rng.normal(0, 5, shape)
    sci = 1.2 * render_sources(shape, x, y, flux, 3.6, beta=None) + rng.normal(0, 5, shape)
    sol = solve(
        Frame(data=sci.astype(np.float32), name="s"),
        Template(data=tpl.astype(np.float32), name="t"),
        OisOptions(deg_spatial=0, deg_bg=0),
    )
    assert sol.meta["nstamps"] == nstars
    assert sol.meta.get("flag") == flag
    assert sol.ksum == pytest.approx(1.2, rel=0.02)
