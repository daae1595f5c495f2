"""The photometry stage end to end on one simulated series with known light curves
(:mod:`tests.integration.variable_series`: 40 frames of 128x128, a sinusoidal variable
bright on the template nights, a fading source, a transient, a microlensing bump on a star
and a constant star): the four that vary are found by detection (the variability image)
and kept whichever their sign, the light curves match the injected difference flux within
their errors, the kinds and the period are right, the outputs carry units, descriptions
and provenance, a rerun resumes, ``oasis lightcurve --at`` adds positions, and
``index.html`` loads in headless Chromium."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from oasis_core.engine.pipeline import photometry, pipeline
from tests.integration.pipeline_kit import copy_target
from tests.integration.variable_series import KINDS, PERIOD, make_variable_target

pytestmark = pytest.mark.slow

CHROMIUM = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome")


@pytest.fixture(scope="module")
def variable_run(tmp_path_factory):
    """The series after a full pipeline run; the four sources also given as ``at``
    (RA,DEC), so that each has its light curve whatever the detection found."""
    path, truth = make_variable_target(tmp_path_factory.mktemp("var"))
    wcs0 = WCS(fits.getheader(path / "data" / f"{truth['frames'][0]}.fits"))
    at = []
    for name in KINDS:
        ra, dec = wcs0.all_pix2world([truth[name]["xy"][0]], [truth[name]["xy"][1]], 0)
        at.append(f"{ra[0]:.7f},{dec[0]:.7f}")
    config = path / "configs" / "oasis.toml"
    config.write_text(config.read_text() + f"\n[photometry]\nat = {json.dumps(at)}\n")
    result = pipeline(path, jobs=2)
    return path, truth, result, at


def _source_of(path, truth, name):
    """The light curve and the variables row of the source nearest the injected one."""
    variables = Table.read(path / "sources" / "variables.ecsv")
    curves = Table.read(path / "lightcurves" / "lightcurves.ecsv")
    header = fits.getheader(path / "data" / f"{truth['frames'][0]}.fits")
    ra, dec = WCS(header).all_pix2world([truth[name]["xy"][0]], [truth[name]["xy"][1]], 0)
    x, y = WCS(fits.getheader(path / "templates" / "template.fits")).all_world2pix(ra, dec, 0)
    d = np.hypot(variables["x"] - x[0], variables["y"] - y[0])
    row = variables[int(np.argmin(d))]
    assert d.min() < 0.05, f"{name}: no source at the given position"
    return row, curves[curves["source_id"] == row["source_id"]]


def test_every_varying_source_is_found_kept_and_nothing_else_varies(variable_run):
    """Without the positions given, the detection finds the four sources that vary (each
    ``at`` position matches a catalog source), the variable that is brighter on the
    template nights (negative in the master residual) is kept rather than dropped as
    ``negative``, and the variability image reports nothing else."""
    path, truth, result, _ = variable_run
    positions = Table.read(path / "lightcurves" / "positions.ecsv")
    template_wcs = WCS(fits.getheader(path / "templates" / "template.fits"))
    wcs0 = WCS(fits.getheader(path / "data" / f"{truth['frames'][0]}.fits"))
    where = {}
    for name in KINDS:
        ra, dec = wcs0.all_pix2world([truth[name]["xy"][0]], [truth[name]["xy"][1]], 0)
        x, y = template_wcs.all_world2pix(ra, dec, 0)
        where[name] = (float(x[0]), float(y[0]))
        row = positions[np.argmin(np.hypot(positions["x"] - x[0], positions["y"] - y[0]))]
        if name == "constant":
            assert row["origin"] == "user"
            assert np.ma.is_masked(row["image_kind"]) or row["image_kind"] == ""
        else:
            assert row["origin"] == "catalog,user", f"{name}: not found by detection"
            assert row["image_kind"] in ("transient", "fading", "variable"), name
    varying = Table.read(path / "sources" / "VAR_filtered_sources.ecsv")
    assert len(varying) == 4 == result["extract"]["var_filtered"]
    for x, y in zip(varying["x"], varying["y"], strict=True):
        d = min(np.hypot(x - a, y - b) for a, b in where.values())
        assert d < 1.5, f"a variable at ({x:.1f}, {y:.1f}) that was not injected"
    mr = Table.read(path / "sources" / "MR_filtered_sources.ecsv")
    x, y = where["variable"]
    near = mr[np.hypot(mr["x"] - x, mr["y"] - y) < 1.5]
    assert len(near) == 1 and near["sign"][0] == -1 and near["kind"][0] == "variable"
    total = (path / "sources" / "total_sources.txt").read_text()
    assert "variability-image sources after filtering: 4" in total


@pytest.mark.parametrize("name", list(KINDS))
def test_light_curves_match_the_injected_flux_kind_and_period(variable_run, name):
    """Difference flux = injected flux - its level on the template (one constant, fitted):
    reduced chi-square 0.7-1.5 against the reported errors on the clean frames; the kind
    right; the variable's period within 0.5% and no period for the others."""
    path, truth, _, _ = variable_run
    row, curve = _source_of(path, truth, name)
    assert row["kind"] == KINDS[name]
    injected = dict(zip(truth["frames"], truth[name]["flux"], strict=True))
    true = np.array([injected[f] for f in curve["frame"]])
    flux, err = np.asarray(curve["flux"]), np.asarray(curve["flux_err"])
    clean = (np.asarray(curve["flag"]) == 0) & np.isfinite(flux)
    assert clean.sum() >= 28  # 7 of the 40 tiny residuals lose half their pixels to borders
    w = 1 / err[clean] ** 2
    level = np.sum(w * (true - flux)[clean]) / np.sum(w)  # the source on the template
    chi2 = np.sum(((flux - (true - level)) / err)[clean] ** 2) / (clean.sum() - 1)
    assert 0.7 <= chi2 <= 1.5, f"{name}: reduced chi-square {chi2:.2f}"
    if name == "transient":
        assert abs(level) < 3 * np.median(err[clean])  # nothing on the template
    if name == "variable":
        assert row["period"] == pytest.approx(PERIOD, rel=0.005)
        assert row["period_fap"] < 1e-3
        assert level > np.median(true)  # bright on the template nights
    else:
        assert np.ma.is_masked(row["period"])
    assert np.all(np.diff(np.asarray(curve["mjd"])) > 0)  # time order, from the headers
    mjd = {
        f: fits.getheader(path / "data" / f"{f}.fits")["MJD-OBS"] + 30 / 86400
        for f in curve["frame"]
    }
    np.testing.assert_allclose(curve["mjd"], [mjd[f] for f in curve["frame"]], atol=1e-8)


def test_outputs_have_units_descriptions_provenance_and_pages(variable_run):
    path, truth, result, _ = variable_run
    summary = result["photometry"]
    assert summary["frames"] == len(truth["frames"]) and summary["not_measured"] == []
    curves = Table.read(path / "lightcurves" / "lightcurves.ecsv")
    variables = Table.read(path / "sources" / "variables.ecsv")
    expected = [
        "source_id",
        "x",
        "y",
        "ra",
        "dec",
        "frame",
        "mjd",
        "flux",
        "flux_err",
        "ref_flux",
        "flag",
    ]
    assert set(expected) <= set(curves.colnames)
    per_source = ["source_id", "x", "y", "ra", "dec", "kind", "n_frames", "chi2_dof"]
    per_source += ["stetson_j", "amplitude", "period", "period_fap"]
    assert set(per_source) <= set(variables.colnames)
    for table in (curves, variables):
        for col in table.itercols():
            assert col.info.description, f"{col.info.name}: no description"
    assert str(curves["flux"].unit) == "adu" and str(curves["mjd"].unit) == "d"
    assert str(variables["period"].unit) == "d"
    assert len(curves) == len(variables) * summary["frames"]  # long format: all x all
    assert curves.meta["OASSTAGE"] == "photometry" and curves.meta["OASBACK"] == "native"
    assert sum(summary["kinds"].values()) == len(variables)
    html = (path / "lightcurves" / "index.html").read_text()
    for sid in variables["source_id"]:
        png = path / "lightcurves" / f"source_{sid}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f'src="source_{sid}.png"' in html
    assert "://" not in html.replace("http://www.w3.org", "")  # self-contained


def test_rerun_resumes_and_a_changed_option_redoes(variable_run, tmp_path):
    path = copy_target(variable_run[0], tmp_path)
    main = path / "lightcurves" / "lightcurves.ecsv"
    frame = path / "lightcurves" / "frames" / "sim_000.fits"
    stamps = (main.stat().st_mtime_ns, frame.stat().st_mtime_ns)
    again = photometry(path, jobs=1)
    assert (main.stat().st_mtime_ns, frame.stat().st_mtime_ns) == stamps
    assert again["kinds"] == variable_run[2]["photometry"]["kinds"]
    changed = photometry(path, jobs=1, options={"photometry.native.radius": 2.0})
    assert frame.stat().st_mtime_ns != stamps[1] and changed["frames"] == 40


def test_lightcurve_command_measures_given_positions(variable_run, tmp_path, capsys):
    from oasis_apps.cli import main

    path = copy_target(variable_run[0], tmp_path)
    positions = tmp_path / "at.txt"
    positions.write_text("# two more\n30 30px\n100.5,20.25px\n")
    code = main(
        [
            "lightcurve",
            str(path),
            "--at",
            "64,64px",
            "--at-file",
            str(positions),
            "--no-catalog",
            "--json",
            "-j",
            "1",
            "-o",
            "photometry.plots=false",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    summary = json.loads(out)["stages"]["photometry"]
    assert summary["sources"] == 3
    table = Table.read(path / "lightcurves" / "positions.ecsv")
    np.testing.assert_allclose(table["x"], [64.0, 30.0, 100.5])
    assert list(table["origin"]) == ["user"] * 3


def _chromium() -> str | None:
    for name in CHROMIUM:
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.mark.skipif(
    _chromium() is None, reason="no headless Chromium (apt-get install chromium-headless-shell)"
)
def test_index_page_loads_every_image_in_headless_chromium(variable_run):
    path = variable_run[0]
    page = path / "lightcurves" / "index.html"
    run = subprocess.run(
        [
            _chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--allow-file-access-from-files",
            "--virtual-time-budget=5000",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert 'data-images="ok"' in run.stdout, run.stdout[:2000]
    assert 'data-errors="0"' in run.stdout
    assert run.stdout.count("<img") == len(Table.read(path / "sources" / "variables.ecsv"))


def test_a_failed_photometry_leaves_no_light_curve_of_an_earlier_run(
    variable_run, tmp_path, monkeypatch
):
    from oasis_native.photometry import NativePhotometry

    from oasis_core.contracts.errors import StageError

    path = copy_target(variable_run[0], tmp_path)

    def broken(self, image, positions, **kwargs):
        raise StageError(f"{image.name}: broken on purpose")

    monkeypatch.setattr(NativePhotometry, "photometry", broken)
    with pytest.raises(StageError, match=r"the template could not be measured.*on purpose"):
        photometry(path, jobs=1, force=True)
    assert not (path / "lightcurves" / "lightcurves.ecsv").exists()
    assert not (path / "lightcurves" / "index.html").exists()
    assert not (path / "sources" / "variables.ecsv").exists()
    assert (path / "sources" / "filtered_sources.ecsv").exists()  # extract's stay
