"""The ``ois`` backend's optimisation candidates (:mod:`oasis_ois.optimise`).

The core's loop is mirrored by :func:`optimise`: try each candidate in turn, stop at the
first whose Q reaches the ceiling (0.75, ``[subtract] q_ceiling``), keep the best.
"""

from __future__ import annotations

import re
from pathlib import Path

import attrs
import numpy as np
import pytest
from oasis_ois.backend import OisOptions, OisSubtract
from oasis_ois.optimise import (
    MAX_CANDIDATES,
    configuration_cost,
    describe_configuration,
)

from oasis_core.contracts.model import Frame, Residual, Template

Q_CEILING = 0.75
WORKDIR = Path("unused")
CONFIG_RE = re.compile(r"^ns=\d+x\d+ hs=\d+ hm=\d+ sig=[\d.,]+ deg=[\d,]+ ds=\d+$")


def optimise(
    science: Frame, template: Template, options: OisOptions
) -> tuple[list[OisOptions], list[Residual], int]:
    """The core's loop: (candidates, residuals tried, index of the one kept)."""
    for frame in (science, template):  # the core hands out read-only arrays
        frame.data.flags.writeable = False
        frame.weight.flags.writeable = False
    backend = OisSubtract()
    candidates = list(backend.candidates(science, template, options=options))
    tried: list[Residual] = []
    best = 0
    for opts in candidates:
        res = backend.subtract(science, template, options=opts, workdir=WORKDIR)
        tried.append(res)
        if res.q > tried[best].q:
            best = len(tried) - 1
        if res.q >= Q_CEILING:
            break
    return candidates, tried, best


@pytest.fixture(scope="module")
def oversampled_pair(render_sources) -> tuple[Frame, Template]:
    """Bright Moffat stars (beta 3) of FWHM 12 px (template) and 15 px (science).

    The matching kernel is a ~3.8 px sigma Gaussian with Moffat wings: ISIS's fixed basis
    (0.7, 1.5, 2.0 px in a 19 px kernel, 31 px stamps) cannot represent it. Stars are
    rendered out to 60 px so that no truncation edge is left to match.
    """
    rng = np.random.default_rng(5)
    shape = (320, 320)
    n = 50
    x, y = rng.uniform(2, 317, n), rng.uniform(2, 317, n)
    flux = 10 ** rng.uniform(5.0, 6.5, n)
    sci = 1.2 * render_sources(shape, x, y, flux, 15.0, radius=60)
    tpl = render_sources(shape, x, y, flux, 12.0, radius=60)
    yy, xx = np.mgrid[:320, :320]
    sci += 40.0 * (1.0 + 0.3 * (xx - 160) / 320 - 0.2 * (yy - 160) / 320)
    sci += rng.normal(0, 1, shape) * np.sqrt((1000.0 + sci) / 4.0)
    tpl += rng.normal(0, 1, shape) * np.sqrt((300.0 + tpl) / 4.0)
    return (
        Frame(data=sci.astype(np.float32), name="sci", gain=4.0, fwhm=15.0),
        Template(data=tpl.astype(np.float32), name="tpl", gain=4.0, fwhm=12.0),
    )


def test_seeing_scale_off_default_fails_and_a_later_candidate_passes(oversampled_pair):
    science, template = oversampled_pair
    # the ISIS model's ladder (kernel "auto" would try its other models first)
    options = OisOptions(kernel="isis", seeing_scale=False)  # seeing_scale would rescue it
    candidates, tried, best = optimise(science, template, options)
    assert candidates[0] is options
    assert tried[0].q < Q_CEILING, tried[0].meta["config"]  # ISIS's defaults cannot match
    assert best > 0
    assert tried[best].q >= Q_CEILING
    assert best == len(tried) - 1  # the loop stopped at the first good one
    chosen = candidates[best]
    # the configuration that works is wider than ISIS's fixed one
    assert chosen.half_mesh_size > options.half_mesh_size
    assert chosen.sigma_gauss2 > options.sigma_gauss2
    costs = [configuration_cost(o) for o in candidates[1:]]
    assert costs == sorted(costs)
    for res in tried:
        assert CONFIG_RE.match(str(res.meta["config"])), res.meta["config"]


def test_easy_pair_passes_with_the_first_candidate(pair_factory):
    science, template = pair_factory(1)
    candidates, tried, best = optimise(science, template, OisOptions())
    assert len(candidates) > 1  # there were alternatives, the loop did not need them
    assert len(tried) == 1 and best == 0
    assert tried[0].q >= Q_CEILING
    assert tried[0].meta["config"] == "ns=10x10 hs=15 hm=9 sig=0.7,1.5,2.0 deg=6,4,2 ds=2"


@pytest.mark.parametrize(
    ("fwhm_t", "fwhm_s"), [(12.0, 15.0), (15.0, 12.0), (1.2, 1.6), (3.0, 4.5), (None, None)]
)
def test_candidates_are_valid_distinct_and_ordered_by_cost(fwhm_t, fwhm_s):
    rng = np.random.default_rng(0)
    data = rng.normal(0.0, 1.0, (64, 64)).astype(np.float32)
    science = Frame(data=data, name="sci", fwhm=fwhm_s)
    template = Template(data=data, name="tpl", fwhm=fwhm_t)
    options = OisOptions(kernel="isis", deg_spatial=2)  # the ISIS ladder: noise has no star
    candidates = list(OisSubtract().candidates(science, template, options=options))
    assert candidates[0] is options
    assert 1 < len(candidates) <= MAX_CANDIDATES
    assert len(set(candidates)) == len(candidates)
    for opts in candidates:
        assert isinstance(opts, OisOptions)
        attrs.validate(opts)
        # every scalar option keeps the type attrs declared
        assert isinstance(opts.half_mesh_size, int) and isinstance(opts.nstamps_x, int)
        assert opts.half_stamp_size > opts.half_mesh_size
    costs = [configuration_cost(o) for o in candidates[1:]]
    assert costs == sorted(costs)


def test_ladder_follows_the_sampling():
    def ladder(fwhm_t: float, fwhm_s: float) -> list[OisOptions]:
        data = np.zeros((64, 64), np.float32)
        return list(
            OisSubtract().candidates(
                Frame(data=data, fwhm=fwhm_s),
                Template(data=data, fwhm=fwhm_t),
                options=OisOptions(kernel="isis"),
            )
        )

    default = OisOptions()
    # undersampled: smaller widths and lower Gaussian degrees are offered
    under = ladder(1.2, 1.6)
    assert any(o.sigma_gauss1 < default.sigma_gauss1 for o in under)
    assert any(o.deg_gauss1 < default.deg_gauss1 for o in under)
    assert all(o.sigma_gauss3 <= default.sigma_gauss3 for o in under)
    # oversampled: wider Gaussians and larger kernels and stamps, never smaller
    over = ladder(12.0, 15.0)
    assert max(o.sigma_gauss2 for o in over) > 1.4 * 3.82  # up to 1.5 sigma_match
    assert max(o.half_mesh_size for o in over) >= 15
    assert all(o.half_mesh_size >= default.half_mesh_size for o in over)
    # lower spatial degrees come before higher ones at equal geometry
    assert [o.deg_spatial for o in over[1:]].index(1) < [o.deg_spatial for o in over].index(3)


def test_configuration_cost_grows_with_every_option():
    base = OisOptions()
    cost = configuration_cost(base)
    for change in (
        {"nstamps_x": 11},
        {"nstamps_y": 11},
        {"half_stamp_size": 16},
        {"half_mesh_size": 10},
        {"deg_gauss1": 7},
        {"deg_gauss3": 3},
        {"deg_spatial": 3},
    ):
        assert configuration_cost(attrs.evolve(base, **change)) > cost, change
    assert configuration_cost(attrs.evolve(base, ngauss=2)) < cost
    # the parameters not in the fit's size do not change it
    assert configuration_cost(attrs.evolve(base, sigma_gauss2=3.0, seeing_scale=False)) == cost


def test_describe_configuration_uses_the_values_really_used():
    options = OisOptions(ngauss=2, deg_spatial=1)
    assert describe_configuration(options) == "ns=10x10 hs=15 hm=9 sig=0.7,1.5 deg=6,4 ds=1"
    text = describe_configuration(
        options, sigmas="1.91,3.82", half_mesh=15, half_stamp=30, deg_spatial=0
    )
    assert text == "ns=10x10 hs=30 hm=15 sig=1.91,3.82 deg=6,4 ds=0"


def test_candidates_are_lazy_and_reuse_the_fits_fwhm(pair_factory, monkeypatch):
    import oasis_ois.ois as ois_module
    from oasis_ois.optimise import candidate_options

    science, template = pair_factory(1)  # no Frame.fwhm: the FWHMs must be measured
    assert science.fwhm is None and template.fwhm is None
    prepared: list[str] = []
    prepare = ois_module._prepare

    def counting(frame, options, what):
        prepared.append(what)
        return prepare(frame, options, what)

    monkeypatch.setattr(ois_module, "_prepare", counting)
    options = OisOptions()
    backend = OisSubtract()
    ladder = backend.candidates(science, template, options=options)
    assert next(ladder) is options
    assert prepared == []  # the first configuration needs nothing measured
    backend.subtract(science, template, options=options, workdir=WORKDIR)
    assert sorted(prepared) == ["science", "template"]  # side by side: in either order
    rest = list(ladder)
    assert len(prepared) == 2  # the fit's FWHMs were reused
    assert 1 <= len(rest) <= MAX_CANDIDATES - 1
    assert [options, *rest] == candidate_options(science, template, options)
    assert len(prepared) == 2
