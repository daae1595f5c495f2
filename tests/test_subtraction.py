"""The core's subtraction rules: the optimisation loop, the Q floor, subtract-pair."""

from __future__ import annotations

import logging

import attrs
import numpy as np
import pytest
from astropy.io import fits
from hypothesis import given, settings
from hypothesis import strategies as st

from oasis_core.contracts.backends import SubtractBackend, option
from oasis_core.contracts.errors import StageError
from oasis_core.contracts.model import Frame, Residual, Template
from oasis_core.engine.subtraction import run_subtraction


@attrs.frozen(kw_only=True)
class ScriptedOptions:
    step: int = option(0, "which scripted configuration this is")


class Scripted(SubtractBackend):
    """Returns a residual whose Q is scripted per configuration."""

    name = "scripted"
    Options = ScriptedOptions

    def __init__(self, qs):
        self.qs = qs
        self.asked = 0
        self.ran = []

    def candidates(self, science, template, *, options):
        for step in range(len(self.qs)):
            self.asked += 1
            yield attrs.evolve(options, step=step)

    def subtract(self, science, template, *, options, workdir):
        self.ran.append(options.step)
        q = self.qs[options.step]
        if q is None:
            raise StageError(f"{science.name}: configuration {options.step} failed")
        shape = science.data.shape
        return Residual(
            data=np.zeros(shape),
            noise=np.ones(shape),
            weight=np.ones(shape),
            q=q,
            meta={"config": f"step {options.step}"},
        )


@pytest.fixture
def pair():
    data = np.zeros((32, 32), np.float32)
    return Frame(data=data, name="sci"), Template(data=data, name="tpl")


SETTINGS = {"optimize": True, "max_tries": 9, "q_ceiling": 0.75, "q_floor": 0.5}


def test_stops_at_the_first_good_configuration_and_asks_lazily(pair, tmp_path):
    backend = Scripted([0.4, 0.6, 0.8, 0.95])
    res = run_subtraction(
        backend, *pair, options=ScriptedOptions(), workdir=tmp_path, settings=SETTINGS
    )
    assert backend.ran == [0, 1, 2]
    assert backend.asked == 3  # the fourth configuration was never even proposed
    assert res.q == 0.8
    assert res.meta["choice"] == 3 and res.meta["tries"] == 3
    assert res.meta["config"] == "step 2" and res.params["step"] == 2
    assert res.meta["flag"] == "" and res.weight.all()


def test_keeps_the_best_when_none_reaches_the_ceiling(pair, tmp_path):
    backend = Scripted([0.55, 0.7, None, 0.6])
    res = run_subtraction(
        backend, *pair, options=ScriptedOptions(), workdir=tmp_path, settings=SETTINGS
    )
    assert backend.ran == [0, 1, 2, 3]
    assert res.q == 0.7 and res.meta["choice"] == 2 and res.meta["tries"] == 4


def test_below_the_floor_is_masked_flagged_and_logged(pair, tmp_path, caplog):
    backend = Scripted([0.2, 0.3])
    with caplog.at_level(logging.WARNING, logger="oasis"):
        res = run_subtraction(
            backend, *pair, options=ScriptedOptions(), workdir=tmp_path, settings=SETTINGS
        )
    assert res.q == 0.3
    assert not res.weight.any()
    assert "below the floor 0.5" in res.meta["flag"]
    assert any("sci: Q 0.300 below the floor" in r.getMessage() for r in caplog.records)


def test_max_tries_and_optimize_off(pair, tmp_path):
    backend = Scripted([0.1, 0.2, 0.3, 0.4])
    run_subtraction(
        backend,
        *pair,
        options=ScriptedOptions(),
        workdir=tmp_path,
        settings={**SETTINGS, "max_tries": 2},
    )
    assert backend.ran == [0, 1]
    backend = Scripted([None, 0.9])
    with pytest.raises(StageError, match="configuration 0 failed"):
        run_subtraction(
            backend,
            *pair,
            options=ScriptedOptions(),
            workdir=tmp_path,
            settings={**SETTINGS, "optimize": False},
        )


def test_every_configuration_failing_is_one_error(pair, tmp_path):
    with pytest.raises(StageError, match="every configuration failed"):
        run_subtraction(
            Scripted([None, None]),
            *pair,
            options=ScriptedOptions(),
            workdir=tmp_path,
            settings=SETTINGS,
        )


def test_subtract_pair_cli(tmp_path, capsys):
    from oasis_native.sim import simulate_pair

    from oasis_apps.cli import main

    (sci, sh), (tpl, th), truth = simulate_pair((256, 256), seed=4, transients=2)
    fits.PrimaryHDU(sci, sh).writeto(tmp_path / "sci.fits")
    fits.PrimaryHDU(tpl, th).writeto(tmp_path / "tpl.fits")
    out, noise = tmp_path / "diff.fits", tmp_path / "noise.fits"
    code = main(
        [
            "subtract-pair",
            str(tmp_path / "sci.fits"),
            str(tmp_path / "tpl.fits"),
            str(out),
            "--noise",
            str(noise),
            "-o",
            "deg_spatial=1",
        ]
    )
    assert code == 0
    assert f"{out}: Q " in capsys.readouterr().out
    header = fits.getheader(out)
    assert header["OASBACK"] == "ois" and header["OAS PAR_DEG_SPATIAL"] == 1
    assert header["OASQ"] > 0.75
    np.testing.assert_array_equal(fits.getdata(noise), fits.getdata(out, "NOISE"))
    # the brightest transient is in the residual, in the science frame's flux scale
    row = truth[np.argmax(truth["flux"])]
    x, y = round(float(row["x"])), round(float(row["y"]))
    assert fits.getdata(out)[y - 1 : y + 2, x - 1 : x + 2].sum() > 0
    # frames of different shapes are refused with one line naming the template
    fits.PrimaryHDU(tpl[:200]).writeto(tmp_path / "small.fits")
    code = main(
        [
            "subtract-pair",
            str(tmp_path / "sci.fits"),
            str(tmp_path / "small.fits"),
            str(tmp_path / "x.fits"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 1 and "small.fits: shape (200, 256) differs" in err


# ------------------------------------------------------------------ what was done


def test_choices_and_their_line():
    from oasis_core.engine.subtraction import choice_text, choices

    meta = {"choice": 2, "choice_kernel": "delta basis", "choice_psf": "", "q": 0.9}
    assert choices(meta) == {"kernel": "delta basis"}  # empty ones say nothing
    assert choice_text({**meta, "choice_align": "wcs"}) == "kernel=delta basis, align=wcs"
    assert choice_text({"q": 1.0}) == ""


class Chooser(Scripted):
    """A backend that records a choice and, on request, a fallback."""

    def __init__(self, qs, fallback=""):
        super().__init__(qs)
        self.fallback = fallback

    def subtract(self, science, template, *, options, workdir):
        res = super().subtract(science, template, options=options, workdir=workdir)
        meta = {**res.meta, "choice_kernel": "constant"}
        if self.fallback:
            meta["fallback"] = self.fallback
        return attrs.evolve(res, meta=meta)


def test_aligned_frame_choices_travel_into_the_residual(pair, tmp_path):
    science, template = pair
    header = fits.Header()
    header["HIERARCH OAS CHOICE_ALIGN"] = "phase correlation"
    header["HIERARCH OAS FALLBACK"] = "alignment by phase correlation (2 stars)"
    header["HIERARCH OAS SHIFT_X"] = 1.5  # not a choice: stays behind
    science = attrs.evolve(science, header=header)
    res = run_subtraction(
        Chooser([0.9]), science, template, options=ScriptedOptions(), workdir=tmp_path,
        settings=SETTINGS,
    )  # fmt: skip
    assert res.meta["choice_align"] == "phase correlation"
    assert res.meta["choice_kernel"] == "constant"
    assert "shift_x" not in res.meta
    # the align stage's fallback flags the residual; it is not masked
    assert res.meta["flag"] == "fallback: alignment by phase correlation (2 stars)"
    assert res.weight.all() and res.meta["usable"]


def test_a_fallback_is_flagged_not_masked(pair, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="oasis"):
        res = run_subtraction(
            Chooser([0.9], fallback="low-order kernel: 1 star"),
            *pair,
            options=ScriptedOptions(),
            workdir=tmp_path,
            settings=SETTINGS,
        )
    assert res.meta["flag"] == "fallback: low-order kernel: 1 star"
    assert res.weight.all() and res.meta["usable"]
    assert any("fallback: low-order kernel" in r.getMessage() for r in caplog.records)
    from oasis_core.engine import io

    io.write_residual(tmp_path / "r.fits", res)
    header = fits.getheader(tmp_path / "r.fits")
    assert header["OAS CHOICE_KERNEL"] == "constant"
    assert header["OAS FALLBACK"] == "low-order kernel: 1 star"
    assert header["OAS FLAG"] == "fallback: low-order kernel: 1 star"


def test_a_bright_transient_alone_does_not_sink_q(tmp_path):
    """On a small frame a transient alone pulls Q below the floor: Q is measured again
    away from the residual's new sources (where the template has nothing)."""
    from oasis_core.engine.quality import q_value
    from oasis_core.engine.subtraction import judge_residual

    rng = np.random.default_rng(2)
    shape = (63, 63)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    source = 4e5 * np.exp(-((xx - 31) ** 2 + (yy - 31) ** 2) / (2 * 1.7**2)) / (2 * np.pi * 1.7**2)
    data = rng.normal(0, 10, shape) + source
    noise, weight = np.full(shape, 10.0), np.ones(shape)
    q = q_value(data, noise, weight)
    residual = Residual(data=data, noise=noise, weight=weight, q=q, meta={"fwhm": 4.0})
    empty = Template(data=rng.normal(100, 10, shape), name="tpl", fwhm=4.0)
    assert q < 0.9  # the source alone; the rest is pure noise
    judged = judge_residual(residual, "cutout", 0.9, template=empty)
    assert judged.meta["usable"] and judged.weight.all() and not judged.meta["flag"]
    assert judged.meta["q_new_excluded"] > 0.95
    assert judged.q == q  # the backend's Q is kept as it is
    # the same excess where the template has a star is a subtraction error: masked
    star = Template(data=empty.data + source, name="tpl", fwhm=4.0)
    judged = judge_residual(residual, "cutout", 0.9, template=star)
    assert not judged.meta["usable"] and not judged.weight.any()
    assert "below the floor" in judged.meta["flag"]
    # without a template, the plain rule
    assert not judge_residual(residual, "cutout", 0.9).meta["usable"]


# ------------------------------------------------------------------ a pair to a catalog


@pytest.fixture(scope="module")
def sim_pair(tmp_path_factory):
    from oasis_native.sim import simulate_pair

    directory = tmp_path_factory.mktemp("pair")
    (sci, sh), (tpl, th), truth = simulate_pair((256, 256), seed=4, transients=3)
    fits.PrimaryHDU(sci, sh).writeto(directory / "sci.fits")
    fits.PrimaryHDU(tpl, th).writeto(directory / "tpl.fits")
    return directory / "sci.fits", directory / "tpl.fits", truth


def test_subtract_pair_catalog_is_the_pipelines_for_that_residual(sim_pair, tmp_path):
    from astropy.table import Table

    from oasis_core.engine import io
    from oasis_core.engine.config import load_config
    from oasis_core.engine.pair import subtract_pair
    from oasis_core.engine.pipeline import detect, filter_sources
    from oasis_core.engine.plugins import Registry

    sci, tpl, truth = sim_pair
    out, catalog = tmp_path / "diff.fits", tmp_path / "cands.ecsv"
    subtract_pair(sci, tpl, out, catalog=catalog)
    table = Table.read(catalog, format="ascii.ecsv")
    assert {"frame", "x", "y", "ra", "dec", "flux", "flux_err", "snr", "reason"} <= set(
        table.colnames
    )
    assert table.meta["OASSTAGE"] == "extract" and table.meta["OASBACK"] == "native"
    kept = table[table["reason"] == "kept"]
    # the transients are candidates, with sky coordinates from the science frame's WCS
    for row in truth:
        d = np.hypot(kept["x"] - row["x"], kept["y"] - row["y"])
        assert d.min() < 2.0, row
    wcs = io.header_wcs(fits.getheader(sci))
    ra, dec = wcs.all_pix2world(kept["x"], kept["y"], 0)
    np.testing.assert_allclose(kept["ra"], ra, atol=1e-9)
    np.testing.assert_allclose(kept["dec"], dec, atol=1e-9)
    # exactly the engine's detection and filters on the residual as written
    registry = Registry()
    config = load_config(None, registry, use_config_file=False)
    residual = io.read_residual(out)
    psf_backend = registry.select("psf", "native", config.backend_options("psf"))
    measured = psf_backend.psf(
        io.read_frame(sci), options=config.backend_options("psf"), workdir=tmp_path
    )
    residual = attrs.evolve(residual, psf=measured.psf)
    extractor = registry.select("extract", "native", config.backend_options("extract"))
    raw = detect(extractor, residual, options=config.backend_options("extract"), workdir=tmp_path)
    expected = filter_sources(
        raw,
        settings=config.settings["extract"],
        catalogs=[raw[raw["sign"] > 0]],
        n_residuals=1,
        frame=residual.science,
        wcs=wcs,
    )
    assert list(table["reason"]) == list(expected["reason"])
    np.testing.assert_allclose(table["flux"], expected["flux"], rtol=1e-6)


def test_subtract_pair_catalog_is_checked_as_an_output(sim_pair, tmp_path):
    from oasis_core.contracts.errors import InputError
    from oasis_core.engine.pair import subtract_pair

    sci, tpl, _ = sim_pair
    out = tmp_path / "diff.fits"
    with pytest.raises(InputError, match=r"the --catalog file is also the output"):
        subtract_pair(sci, tpl, out, catalog=out)
    with pytest.raises(InputError, match=r"the --catalog file is one of the inputs"):
        subtract_pair(sci, tpl, out, catalog=sci)
    with pytest.raises(InputError, match=r"the --catalog file is also the --noise file"):
        subtract_pair(sci, tpl, out, noise=tmp_path / "n.fits", catalog=tmp_path / "n.fits")
    assert not out.exists()  # refused before any work


def test_subtract_pair_cli_catalog_and_choices(sim_pair, tmp_path, capsys):
    from oasis_apps.cli import main

    sci, tpl, _ = sim_pair
    out, catalog = tmp_path / "diff.fits", tmp_path / "c.ecsv"
    assert main(["subtract-pair", str(sci), str(tpl), str(out), "--catalog", str(catalog)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{out}: Q ")
    assert lines[1].startswith(f"{catalog}: ") and " kept" in lines[1]


def test_subtract_pair_below_the_floor_gives_an_empty_catalog(sim_pair, tmp_path):
    from astropy.table import Table

    from oasis_core.engine.pair import subtract_pair

    sci, tpl, _ = sim_pair
    catalog = tmp_path / "c.ecsv"
    res = subtract_pair(
        sci, tpl, tmp_path / "d.fits", catalog=catalog, options={"subtract.q_floor": 1.0}
    )
    assert not res.meta["usable"]
    table = Table.read(catalog, format="ascii.ecsv")
    assert len(table) == 0 and "reason" in table.colnames
    assert "not usable" in table.meta["OASNOTE"]


def test_subtract_pair_auto_records_the_backend_chosen(sim_pair, tmp_path):
    from oasis_core.engine.pair import subtract_pair

    sci, tpl, _ = sim_pair
    out = tmp_path / "diff.fits"
    res = subtract_pair(sci, tpl, out, method="auto", options={"subtract.auto.ceiling": 0.0})
    header = fits.getheader(out)
    assert header["OASBACK"] == "auto" and header["OASAUTO"] == res.meta["choice_backend"]
    assert header["OAS CHOICE_BACKEND"] == res.meta["auto_choice"]


def test_subtract_pair_noise_file_is_the_residuals_noise_extension(sim_pair, tmp_path):
    """``--noise`` writes the NOISE image as the residual file holds it: the same pixels,
    the residual's unit and its WCS."""
    from astropy.wcs import WCS

    from oasis_core.engine.pair import subtract_pair

    sci, tpl, _ = sim_pair
    out, noise = tmp_path / "diff.fits", tmp_path / "noise.fits"
    subtract_pair(sci, tpl, out, noise=noise)
    with fits.open(out) as res, fits.open(noise) as alone:
        np.testing.assert_array_equal(alone[0].data, res["NOISE"].data)
        assert alone[0].header["BUNIT"] == res["NOISE"].header["BUNIT"]
        assert WCS(alone[0].header).has_celestial == WCS(res[0].header).has_celestial
        assert WCS(res[0].header).has_celestial
        assert alone[0].header["CRVAL1"] == res[0].header["CRVAL1"]


class LeavesStars(SubtractBackend):
    """Returns the stars left at ``left`` of their flux, over pure noise, with a high Q
    (as the ``ois`` delta basis did on DECam frames sharper than their template)."""

    name = "leaves-stars"
    Options = ScriptedOptions

    def __init__(self, stars, left, q=0.98):
        self.stars, self.left, self.q = stars, left, q

    def subtract(self, science, template, *, options, workdir):
        rng = np.random.default_rng(5)
        shape = science.data.shape
        data = self.left * self.stars + rng.normal(0.0, 10.0, shape)
        return Residual(
            data=data,
            noise=np.full(shape, 10.0),
            weight=np.ones(shape),
            q=self.q,
            meta={"config": "fixed", "fscale": 1.0 / (1.0 + self.left), "fwhm": 3.5},
        )


@pytest.fixture
def star_pair():
    """Six stars of 1e5-5e5 ADU on a sky-subtracted 128 x 128 pair (noise 10 ADU)."""
    rng = np.random.default_rng(4)
    yy, xx = np.mgrid[:128, :128]
    places = [(25, 30), (90, 25), (60, 64), (30, 100), (100, 95), (64, 20)]
    sigma = 3.5 / 2.3548
    stars = sum(
        f * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2)) / (2 * np.pi * sigma**2)
        for (x, y), f in zip(places, np.linspace(1e5, 5e5, len(places)), strict=True)
    )
    science = Frame(data=stars + rng.normal(0, 10, stars.shape), name="sci", fwhm=3.5)
    template = Template(data=stars + rng.normal(0, 5, stars.shape), name="tpl", fwhm=3.5)
    return science, template, stars


def test_stars_left_at_tens_of_percent_are_masked_flagged_and_logged(star_pair, tmp_path, caplog):
    """A wrong flux scale leaves every star at the same fraction of its flux; Q (0.98
    here) does not see it on a frame of few stars, the star check does."""
    science, template, stars = star_pair
    with caplog.at_level(logging.WARNING, logger="oasis"):
        res = run_subtraction(
            LeavesStars(stars, -0.3),
            science,
            template,
            options=ScriptedOptions(),
            workdir=tmp_path,
            settings=SETTINGS,
        )
    assert res.q == 0.98  # Q alone would have shipped it
    assert res.meta["star_left"] == pytest.approx(-0.3, abs=0.01)
    assert res.meta["star_left_n"] == 6
    assert "stars left at -30% of their flux" in res.meta["flag"]
    assert res.meta["usable"] is False and not res.weight.any()
    assert any("sci: stars left at -30%" in r.getMessage() for r in caplog.records)


def test_stars_left_at_a_few_percent_pass_and_the_limit_can_be_lifted(star_pair, tmp_path):
    science, template, stars = star_pair
    args = {"options": ScriptedOptions(), "workdir": tmp_path}
    res = run_subtraction(LeavesStars(stars, 0.02), science, template, settings=SETTINGS, **args)
    assert res.meta["star_left"] == pytest.approx(0.02, abs=0.005)
    assert res.meta["flag"] == "" and res.meta["usable"] and res.weight.all()
    off = {**SETTINGS, "star_left_max": 0.0}
    res = run_subtraction(LeavesStars(stars, -0.3), science, template, settings=off, **args)
    assert res.meta["star_left"] == pytest.approx(-0.3, abs=0.01)  # measured all the same
    assert res.meta["flag"] == "" and res.weight.all()


def test_the_star_check_is_in_the_header_and_the_residuals_log(star_pair, tmp_path):
    from oasis_core.engine import io
    from oasis_core.engine.runners import _star_left_text

    science, template, stars = star_pair
    res = run_subtraction(
        LeavesStars(stars, -0.3),
        science,
        template,
        options=ScriptedOptions(),
        workdir=tmp_path,
        settings=SETTINGS,
    )
    io.write_residual(tmp_path / "r.fits", res)
    header = fits.getheader(tmp_path / "r.fits")
    assert header["OAS STAR_LEFT"] == pytest.approx(-0.3, abs=0.01)
    assert "stars left at -30%" in header["OAS FLAG"] and header["OAS USABLE"] is False
    assert _star_left_text(header["OAS STAR_LEFT"]).startswith("-30.")
    assert _star_left_text(None) == "-"


def test_judge_records_how_correlated_every_residuals_noise_is():
    # white noise: 1; noise smoothed (a convolved science frame) but with a noise image
    # of its pixels' spread: at the PSF's scale (sigma 1.7 px) it spreads ~4x as much
    # (||G_k * G_m|| / (||G_k|| ||G_m||) for Gaussians of 1.5 and 1.7 px: 3.99)
    from scipy.ndimage import gaussian_filter

    from oasis_core.contracts.model import Residual
    from oasis_core.engine.subtraction import judge_residual

    rng = np.random.default_rng(7)
    smooth = gaussian_filter(rng.normal(0, 1, (300, 300)), 1.5)
    ones = np.ones((300, 300))
    for data, low, high in (
        (rng.normal(0, 1, (300, 300)), 0.99, 1.1),
        (smooth / smooth.std(), 3.5, 4.5),
    ):
        residual = Residual(data=data, noise=ones, weight=ones, q=0.99, meta={"fwhm": 4.0})
        judged = judge_residual(residual, "r", 0.5)
        assert low < judged.meta["noise_correlation"] < high
        assert judged.noise_correlation == max(1.0, judged.meta["noise_correlation"])


@given(
    seed=st.integers(0, 2**16),
    density=st.sampled_from([0.0, 1e-4, 1e-2, 0.3]),
    radius=st.integers(1, 6),
    shape=st.tuples(st.integers(1, 80), st.integers(1, 80)),
)
@settings(max_examples=60, deadline=None)
def test_holes_grow_by_a_disk_as_a_binary_dilation_would(seed, density, radius, shape):
    # judge_residual grows the template's holes by a FWHM; sparse holes are grown by
    # placing the disk at each pixel, which must be scipy's dilation exactly
    from scipy.ndimage import binary_dilation

    from oasis_core.engine.subtraction import grow_disk

    mask = np.random.default_rng(seed).random(shape) < density
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    want = binary_dilation(mask, structure=xx**2 + yy**2 <= radius**2)
    assert (grow_disk(mask, radius) == want).all()
