"""Tests of oasis_core.engine.variability: the variability image, the kinds it gives and
the exemption of varying sources from the ``negative`` and ``majority`` filters.

The image is checked against its claims: about N(0, 1) on residuals of pure noise (also
with correlated noise and masked pixels), a source that varies either way stands out
while a constant one and a single frame's artefact do not; the chi-square significance
equals scipy's exact one where both can be computed.
"""

from __future__ import annotations

import attrs
import numpy as np
import pytest
from astropy.table import Table
from scipy.ndimage import gaussian_filter
from scipy.stats import chi2 as chi2_dist
from scipy.stats import norm

from oasis_core.contracts.model import Residual
from oasis_core.engine.variability import (
    MIN_RESIDUALS,
    chi2_significance,
    detection_kinds,
    exempt_varying,
    variability_image,
)

SHAPE = (160, 160)
NOISE = 10.0
FWHM = 3.0


def _psf(x: float, y: float) -> np.ndarray:
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]]
    s = FWHM / 2.3548
    g = np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * s * s))
    return g / g.sum()


def _residual(data, k, weight=None):
    """A residual of noise ``NOISE`` and PSF ``FWHM`` holding ``data``."""
    return Residual(
        data=data,
        noise=np.full(SHAPE, NOISE, np.float32),
        weight=np.ones(SHAPE, np.float32) if weight is None else weight,
        header={"FWHM": FWHM},
        name=f"r{k}",
    )


def _series(fluxes, *, seed=0, position=(80.0, 80.0), correlated=False, mask=None):
    """Residuals of white (or correlated) noise plus a point source of the given
    difference flux in each."""
    rng = np.random.default_rng(seed)
    psf = _psf(*position)
    out = []
    for k, flux in enumerate(fluxes):
        noise = rng.normal(0.0, NOISE, SHAPE)
        if correlated:  # a science frame that was convolved: neighbours correlated
            noise = gaussian_filter(noise, 1.0) * (2 * np.sqrt(np.pi))
        data = noise + flux * psf + 3.0 * k  # a level of its own in each
        weight = np.ones(SHAPE, np.float32)
        if mask is not None:
            weight[mask] = 0
        out.append(_residual(data, k, weight))
    return out


def _away(image: np.ndarray, position=(80, 80), radius=12) -> np.ndarray:
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]]
    return np.hypot(xx - position[0], yy - position[1]) > radius


@pytest.mark.parametrize("correlated", [False, True])
def test_noise_alone_gives_unit_normal(correlated):
    image = variability_image(_series([0.0] * 20, correlated=correlated))
    z = image.data[_away(image.data)]
    assert abs(np.median(z)) < 0.05
    spread = (np.percentile(z, 75) - np.percentile(z, 25)) / 1.349
    assert 0.95 < spread < 1.05
    assert z.max() < 5.5  # no false variable in 25,000 pixels of smoothed noise
    assert image.header["BUNIT"] == "" and image.header["NCOMBINE"] == 20
    assert image.header["FWHM"] == pytest.approx(FWHM * np.sqrt(2), abs=1e-3)
    np.testing.assert_array_equal(image.noise, 1.0)


@pytest.mark.parametrize(
    ("name", "fluxes"),
    [
        ("both ways", [800.0 * np.sin(k) for k in range(20)]),
        ("brighter on the template", [-900.0] * 14 + [0.0] * 6),  # negative in most
        ("appears", [0.0] * 14 + [900.0] * 6),
    ],
)
def test_a_source_that_varies_stands_out(name, fluxes):
    z = variability_image(_series(fluxes)).data
    assert z[80, 80] > 8, name


def test_constant_source_and_single_frame_artefact_do_not():
    """A source at the same difference flux in every residual (badly subtracted but
    steady) and one frame's cosmic ray are not variability."""
    steady = variability_image(_series([700.0] * 20)).data
    assert steady[78:83, 78:83].max() < 4
    fluxes = [0.0] * 20
    fluxes[7] = 3000.0  # 30 sigma in one frame only
    spike = variability_image(_series(fluxes)).data
    assert spike[78:83, 78:83].max() < 4


def test_masked_pixels_are_left_out_and_too_few_residuals_give_nothing():
    mask = np.zeros(SHAPE, bool)
    mask[:, :40] = True
    image = variability_image(_series([0.0] * 10, mask=mask))
    assert (image.weight[:, :38] == 0).all() and (image.data[:, :38] == 0).all()
    assert (image.weight[:, 60:] == 1.0).all()
    few = variability_image(_series([0.0, 500.0]))  # two: below MIN_RESIDUALS
    assert MIN_RESIDUALS > 2 and not few.weight.any() and not few.data.any()


def test_chi2_significance_is_exact_where_computable():
    dof = np.array([1, 5, 19, 39, 39, 99])
    chi2 = np.array([4.0, 20.0, 40.0, 80.0, 150.0, 300.0])
    expected = norm.isf(chi2_dist.sf(chi2, dof))
    np.testing.assert_allclose(chi2_significance(chi2, dof), expected, rtol=1e-6)
    huge = chi2_significance(np.array([1e6, 1e7]), np.array([10, 10]))
    assert np.all(np.isfinite(huge)) and huge[1] > huge[0] > 37  # past the underflow
    assert chi2_significance(np.array([5.0]), np.array([0]))[0] == 0  # no dof: nothing


def _catalog(x, y, sign, mjd, reason="kept"):
    n = len(x)
    return Table(
        {
            "x": np.asarray(x, float),
            "y": np.asarray(y, float),
            "sign": np.asarray(sign, int),
            "mjd": np.full(n, mjd, float),
            "reason": np.full(n, reason, dtype="U10"),
        }
    )


def test_detection_kinds_follow_the_signs_in_time():
    # four sources at x = 10, 20, 30, 40: only positive; positive then negative;
    # negative only; negative then positive
    signs_by_time = {
        50.0: [1, 1, -1, -1],
        51.0: [1, 1, -1, -1],
        52.0: [1, -1, -1, 1],
        53.0: [1, -1, -1, 1],
    }
    detections = {
        f"f{int(t)}": _catalog([10, 20, 30, 40], [5, 5, 5, 5], s, t)
        for t, s in reversed(signs_by_time.items())  # given out of time order
    }
    sources = Table({"x": [10.2, 20.0, 30.0, 40.0, 90.0], "y": [5.0, 5.0, 5.0, 5.0, 90.0]})
    kinds = detection_kinds(sources, detections, radius=1.5)
    assert list(kinds) == ["transient", "fading", "variable", "transient", "variable"]


def test_exempt_varying_keeps_a_varying_source_and_only_that():
    table = _catalog([10, 50, 80], [5, 5, 5], [-1, -1, 1], 50.0)
    table["reason"] = ["negative", "negative", "majority"]
    lenient = table.copy()
    lenient["reason"] = ["kept", "kept", "faint"]
    varying = Table({"x": [10.5, 80.0], "y": [5.0, 5.0], "kind": ["variable", "variable"]})
    out = exempt_varying(table, varying, 1.5, lenient)
    # the varying negative source is kept; the other negative one is not; a varying
    # source that fails another filter stays out
    assert list(out["reason"]) == ["kept", "negative", "faint"]
    assert list(out["kind"]) == ["variable", "fading", "variable"]
    plain = exempt_varying(_catalog([1], [1], [1], 50.0), None, 1.5, None)
    assert list(plain["kind"]) == ["transient"] and list(plain["reason"]) == ["kept"]


def test_a_star_left_by_a_kernel_slightly_off_is_not_variable_but_a_varying_star_is():
    """A field of bright constant stars that two residuals over-subtract by 2 % (their
    kernels scaled the template a little high) would pass as variables; with the
    template, the residuals' own mismatch at stars is a term of the variance, and only the
    star that truly varies (by 30 %) stands out."""
    rng = np.random.default_rng(3)
    positions = [(30.0 + 25.0 * i, 40.0 + 20.0 * (i % 3)) for i in range(5)]
    stars = sum(200_000.0 * _psf(x, y) for x, y in positions)  # peaks ~13,000 ADU
    varying = positions[2]
    residuals = []
    for k in range(12):
        off = -0.02 if k in (0, 2) else 0.0
        data = rng.normal(0.0, NOISE, SHAPE) + off * stars
        data += (0.3 if k % 2 else -0.3) * 200_000.0 * _psf(*varying)
        residuals.append(_residual(data, k))
    template = stars + 500.0 + rng.normal(0.0, NOISE, SHAPE)
    bare = variability_image(residuals).data
    with_template = variability_image(residuals, template).data

    def peak(z, x, y):
        return float(z[int(y) - 2 : int(y) + 3, int(x) - 2 : int(x) + 3].max())

    constant = [p for p in positions if p != varying]
    assert min(peak(bare, *p) for p in constant) > 8  # the artefact without the template
    assert max(peak(with_template, *p) for p in constant) < 5
    assert peak(with_template, *varying) > 8


def test_a_ring_a_kernel_leaves_around_bright_stars_is_not_variable():
    """Residuals whose kernel matched the stars' cores but not their wings leave a ring a
    few pixels out (here: +-3 % of the star, the difference of a wider and a narrower
    profile, its sign changing from frame to frame); the wing term keeps it from passing
    as a variable, while a transient beside a star still stands out."""
    rng = np.random.default_rng(9)
    positions = [(40.0, 40.0), (110.0, 50.0), (60.0, 115.0), (120.0, 120.0)]
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]]

    def profile(x, y, s):
        g = np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * s * s))
        return g / g.sum()

    stars = sum(300_000.0 * _psf(x, y) for x, y in positions)
    ring = sum(
        300_000.0 * (profile(x, y, 3.5) - profile(x, y, 1.6)) for x, y in positions
    )  # zero total flux: a ring of one sign around a core of the other
    transient = (100.0, 85.0)
    residuals = []
    for k in range(12):
        data = rng.normal(0.0, NOISE, SHAPE) + (0.03 if k % 3 else -0.05) * ring
        if k >= 8:
            data += 1500.0 * _psf(*transient)
        residuals.append(_residual(data, k))
    template = stars + 300.0 + rng.normal(0.0, NOISE, SHAPE)
    bare = variability_image(residuals).data
    with_template = variability_image(residuals, template).data
    near_stars = np.zeros(SHAPE, bool)
    for x, y in positions:
        near_stars |= np.hypot(xx - x, yy - y) < 12
    assert bare[near_stars].max() > 8  # the ring passes for a variable without the template
    assert with_template[near_stars].max() < 5
    tx, ty = int(transient[0]), int(transient[1])
    assert with_template[ty - 2 : ty + 3, tx - 2 : tx + 3].max() > 8


def test_terms_made_on_workers_from_the_files_give_the_same_image(tmp_path):
    # the mr stage sends each residual's (f, v) to the executor's workers, which read the
    # residual and the template themselves; summed in any order, the image is the same
    from oasis_core.contracts.model import Frame
    from oasis_core.engine import io
    from oasis_core.engine.executor import LocalExecutor
    from oasis_core.engine.variability import residual_terms

    residuals = _series([0, 400, 0, 900, 0, 0], seed=3)
    template = np.full(residuals[0].data.shape, 100.0, np.float32)
    template += 5000 * _psf(40.0, 40.0).astype(np.float32)
    paths = []
    for r in residuals:
        paths.append(tmp_path / f"{r.name}_residual.fits")
        io.write_residual(paths[-1], r)
    io.write_frame(tmp_path / "template.fits", Frame(data=template))
    series = io.ResidualSeries(paths)
    here = variability_image(series, template)
    with LocalExecutor(2) as executor:
        outcomes = executor.run(
            residual_terms, [(p.name, (p, tmp_path / "template.fits")) for p in paths[::-1]]
        )
        there = variability_image(series, None, terms=(o.value for o in outcomes))
    np.testing.assert_allclose(there.data, here.data, atol=1e-5)
    assert there.header["FWHM"] == here.header["FWHM"]


def test_the_template_s_own_frames_tell_its_sources_from_the_sky_s():
    # A source of the template (a median of frames of different seeing gives its faint
    # stars another PSF than its bright ones) is in every residual alike, the
    # template's own frames' too: the master residual stacks it into a source no frame
    # holds. A source of the sky is not in the template frames' residuals (the template
    # is their stack), or not as much as in the others'.
    from oasis_core.engine.variability import template_artifacts

    rng = np.random.default_rng(5)
    n, members = 12, {f"f{k}" for k in range(5)}
    defect, transient, late = (80.0, 80.0), (40.0, 40.0), (120.0, 120.0)
    residuals = []
    for k in range(n):
        data = rng.normal(0.0, NOISE, SHAPE)
        data += 60.0 * _psf(*defect)  # every frame: about 2 sigma each, 7 stacked
        if k >= 5:  # not a template night: on from the first frame after them
            data += 400.0 * _psf(*transient)
        if k >= 3:  # on in two of the five template nights (not in their median)
            data += 200.0 * _psf(*late)
        residuals.append(attrs.evolve(_residual(data.astype(np.float32), k), science=f"f{k}"))
    image = variability_image(residuals, members=members)
    assert set(image.extra) == {"tplsig", "tpldiff"}
    assert image.header["NTPLMEM"] == 5
    table = Table({"x": [80.0, 40.0, 120.0], "y": [80.0, 40.0, 120.0], "sign": [1, 1, 1]})
    assert list(template_artifacts(table, image.extra)) == [True, False, False]
    # and a source with the other sign is the sky's: the sign must agree
    table["sign"] = [-1, 1, 1]
    assert not template_artifacts(table, image.extra)[0]
    # without the template's frames named there is nothing to tell them by
    plain = variability_image(residuals)
    assert plain.extra == {} and not template_artifacts(table, plain.extra).any()


def test_a_varying_place_whose_every_residual_detection_is_an_artefact_takes_their_reason():
    # the variability image sees that the residuals differ by a bright star whose halo a
    # kernel left in the broadest frames only; the residuals called each of their
    # detections there an artefact, so the source is theirs; a source with one good
    # detection, or none at all (too faint for a single frame), stays kept
    from oasis_core.engine.variability import artefact_verdict

    var = Table(
        {
            "x": [100.0, 40.0, 200.0],
            "y": [100.0, 40.0, 200.0],
            "fwhm": [5.0, 5.0, 5.0],
            "reason": np.array(["kept"] * 3, dtype="U10"),
        }
    )
    a = Table({"x": [103.0, 41.0], "y": [98.0, 40.0], "reason": ["masked", "wing"]})
    b = Table({"x": [104.0, 40.5], "y": [101.0, 39.0], "reason": np.array(["wing", "kept"], "U10")})
    c = Table({"x": [96.5], "y": [102.0], "reason": ["wing"]})
    reason = artefact_verdict(var, {"a": a, "b": b, "c": c}, radius=1.5)
    assert list(reason) == ["wing", "kept", "kept"]
    # a faint or negative detection is no artefact: the source stays
    b["reason"][0] = "faint"
    assert artefact_verdict(var, {"a": a, "b": b, "c": c}, radius=1.5)[0] == "kept"
    # and a source already rejected keeps its own reason
    var["reason"][0] = "faint"
    b["reason"][0] = "wing"
    assert artefact_verdict(var, {"a": a, "b": b, "c": c}, radius=1.5)[0] == "faint"
