"""``oasis sim fakes``: injection, the efficiency curve and its limits, on a real run."""

from __future__ import annotations

import numpy as np
import pytest

from oasis_core.errors import InputError
from oasis_core.fakes import efficiency_limits, inject, render_stamps, sim_fakes


@pytest.mark.parametrize("model", ["moffat", "gauss"])
def test_injected_flux_is_the_requested_flux(model):
    data = np.zeros((200, 200), np.float32)
    x = np.array([50.3, 120.7, 160.0])
    y = np.array([60.6, 100.2, 150.5])
    out = inject(data, x, y, np.array([1000.0, 2500.0, 400.0]), 4.0, model)
    assert data.max() == 0  # the input is never modified
    for xi, yi, f in zip(x, y, (1000.0, 2500.0, 400.0), strict=True):
        box = out[int(yi) - 18 : int(yi) + 19, int(xi) - 18 : int(xi) + 19]
        # all but the wings beyond the stamp (Moffat beta 2.5: ~2 % beyond 4.5 FWHM)
        assert box.sum() == pytest.approx(f, rel=0.03)
        peak = np.unravel_index(np.argmax(box), box.shape)
        assert abs(peak[0] - 18 - (yi - int(yi))) <= 1 and abs(peak[1] - 18 - (xi - int(xi))) <= 1


def test_profiles_have_the_requested_fwhm():
    r = np.linspace(0, 10, 2001)
    for model in ("moffat", "gauss"):
        prof = render_stamps(r, np.zeros_like(r), 5.0, model)
        half = r[np.argmin(np.abs(prof - prof[0] / 2))]
        assert 2 * half == pytest.approx(5.0, abs=0.02)
    with pytest.raises(InputError, match="moffat"):
        render_stamps(r, r, 3.0, "airy")


def test_efficiency_limits_of_a_known_curve():
    rng = np.random.default_rng(1)
    flux = 10 ** rng.uniform(1, 4, 4000)
    # true curve: 50 % at 300 ADU, width 0.1 dex -> 90 % at 300 * 10**(0.1 ln 9)
    p = 1 / (1 + np.exp(-(np.log10(flux) - np.log10(300)) / 0.1))
    detected = rng.uniform(size=flux.size) < p
    f50, f90 = efficiency_limits(flux, detected)
    assert f50 == pytest.approx(300, rel=0.06)
    assert f90 == pytest.approx(300 * 10 ** (0.1 * np.log(9)), rel=0.08)
    # never 90 %: not reached
    f50, f90 = efficiency_limits(flux, detected & (rng.uniform(size=flux.size) < 0.8))
    assert np.isfinite(f50) and np.isnan(f90)


def test_bad_arguments_are_one_line_errors(tmp_path):
    with pytest.raises(InputError, match="input_mode"):
        sim_fakes(tmp_path, input_mode="counts")
    with pytest.raises(InputError, match="PSF"):
        sim_fakes(tmp_path, PSF="airy")


@pytest.mark.slow
def test_fakes_on_a_simulated_target(sim_target_done):
    from astropy.table import Table

    source = sim_target_done.path
    before = sorted(p.name for p in (source / "residuals").iterdir())
    result = sim_fakes(
        source, n_fakes=20, iterations=8, f_min=100, f_max=6000, flux_scale="log", jobs=2
    )
    sim = result.directory.parent
    assert sim.parent.name == "simulations" and sim.name == f"{source.name}_fakes"
    assert sorted(p.name for p in (source / "residuals").iterdir()) == before  # untouched
    table = Table.read(result.directory / "fakes.ecsv")
    assert len(table) == 160
    assert set(table.colnames) >= {"iteration", "image", "x", "y", "flux", "detected", "flux_out"}
    flux = np.asarray(table["flux"])
    det = np.asarray(table["detected"])
    bright = flux > 3 * result.flux_5sigma
    faint = flux < 0.4 * result.flux_5sigma
    assert bright.sum() > 10 and faint.sum() > 10
    assert det[bright].mean() >= 0.85
    assert det[faint].mean() <= 0.1
    # the figure: 90 % completeness reached within a factor 2 of 5 sigma in the PSF
    # aperture: at least 90 % found from 2x that flux (to 4x), and not below half of it
    near = (flux >= 2 * result.flux_5sigma) & (flux <= 4 * result.flux_5sigma)
    below = flux < 0.5 * result.flux_5sigma
    assert near.sum() >= 15 and det[near].mean() >= 0.9
    assert det[below].mean() < 0.9
    assert result.flux_50 < result.flux_90
    # detected fakes are measured at their flux (within the noise)
    ok = det & bright
    ratio = np.asarray(table["flux_out"])[ok] / flux[ok]
    assert np.median(ratio) == pytest.approx(1.0, abs=0.08)
    png = result.plot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "90%" in (result.directory / "summary.txt").read_text()
    # a second run resumes: nothing is redone
    stamps = {p: p.stat().st_mtime_ns for p in (result.directory / "iterations").iterdir()}
    again = sim_fakes(
        source, n_fakes=20, iterations=8, f_min=100, f_max=6000, flux_scale="log", jobs=2
    )
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert again.flux_90 == result.flux_90
