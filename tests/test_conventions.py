"""The data conventions astronomers expect (issue 13, item 5).

Catalogs carry astropy units and descriptions and the frame's mid-exposure ``mjd``, so a
plain run's catalogs load into ``SkyCoord`` and ``Time`` without conversion; FITS outputs
have the right ``BUNIT``, no number written as a string, and the image's WCS on every
extension on its grid.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from oasis_core.contracts.model import Residual
from oasis_core.engine import io

CATALOGS = ("sources", "filtered_sources", "MR_sources", "MR_filtered_sources")


@pytest.fixture(scope="module")
def run_target(tmp_path_factory) -> Path:
    """A 5-frame 160x160 simulated target after a plain run."""
    from oasis_core.engine.pipeline import pipeline
    from tests.integration.pipeline_kit import make_target

    target = make_target(tmp_path_factory.mktemp("conv"))
    pipeline(target, jobs=1)
    return target


def _catalogs(target: Path) -> dict[str, Table]:
    out = {n: Table.read(target / "sources" / f"{n}.ecsv") for n in CATALOGS}
    for path in sorted((target / "sources" / "detections").glob("*.ecsv")):
        out[f"detections/{path.stem}"] = Table.read(path)
    return out


def _fits_outputs(target: Path) -> list[Path]:
    return sorted(
        p
        for d in ("masks", "aligned", "templates", "residuals", "psf")
        for p in (target / d).glob("*.fits")
    )


def _frame_mjd(target: Path) -> dict[str, float]:
    """Mid-exposure MJD of every input frame, from its raw header: MJD-OBS + EXPTIME/2."""
    out = {}
    for path in (target / "data").iterdir():
        header = fits.getheader(path)
        out[io.frame_name(path)] = header["MJD-OBS"] + header["EXPTIME"] / 2 / 86400
    return out


def test_catalogs_load_into_skycoord_and_time(run_target):
    from astropy.coordinates import SkyCoord
    from astropy.time import Time

    tables = _catalogs(run_target)
    assert len(tables["sources"]) > 0 and len(tables["MR_sources"]) > 0
    for name in CATALOGS:
        t = tables[name]
        coords = SkyCoord(t["ra"], t["dec"])  # no unit= needed
        assert np.allclose(coords.ra.deg, np.asarray(t["ra"]))
    times = Time(tables["sources"]["mjd"], format="mjd")
    assert not np.any(np.ma.getmaskarray(times.mjd))
    # every per-frame row has its own frame's mid-exposure time
    want = _frame_mjd(run_target)
    for row in tables["sources"]:
        assert row["mjd"] == pytest.approx(want[row["frame"]], abs=1e-6)
    for name, t in tables.items():
        if name.startswith("detections/") and name not in ("detections/MR", "detections/VAR"):
            assert np.allclose(np.asarray(t["mjd"]), want[name.split("/")[1]], atol=1e-6)
    # the master residual has no single time: masked, and Time still loads it
    mr = tables["MR_sources"]
    assert np.all(np.ma.getmaskarray(mr["mjd"]))
    assert Time(mr["mjd"], format="mjd").shape == (len(mr),)


def test_every_catalog_column_has_a_unit_and_description(run_target):
    import astropy.units as u

    for name, t in _catalogs(run_target).items():
        for col in t.itercols():
            assert col.info.description, (name, col.name)
            if col.dtype.kind in "fiu":
                assert col.unit is not None, (name, col.name)
        assert t["x"].unit == u.pix and t["y"].unit == u.pix, name
        assert t["snr"].unit == u.dimensionless_unscaled, name
        # fluxes in the residual's unit: adu for a frame's, sigma (dimensionless) for the
        # master residual's and the variability image's
        flux_unit = u.dimensionless_unscaled if "MR" in name or "VAR" in name else u.adu
        assert t["flux"].unit == flux_unit and t["flux_err"].unit == flux_unit, name
        if "ra" in t.colnames:
            assert t["ra"].unit == u.deg and t["dec"].unit == u.deg
        assert t["mjd"].unit == u.day


def test_bunit_of_every_image(run_target):
    residuals = sorted((run_target / "residuals").glob("*.fits"))
    mr = run_target / "residuals" / "MR.fits"
    var = run_target / "residuals" / "VAR.fits"
    assert mr in residuals and var in residuals and len(residuals) > 2
    for path in residuals:
        with fits.open(path) as hdul:
            # the master residual and the variability image are in sigma units
            image = "" if path in (mr, var) else "adu"
            assert hdul[0].header["BUNIT"] == image, path
            assert hdul["NOISE"].header["BUNIT"] == image, path
            assert hdul["WEIGHT"].header["BUNIT"] == "", path
    for path in (run_target / "masks").glob("*.fits"):
        assert fits.getheader(path)["BUNIT"] == "", path  # a weight map
    for path in (run_target / "aligned").glob("*.fits"):
        with fits.open(path) as hdul:
            assert hdul[0].header["BUNIT"] == "adu" and hdul["WEIGHT"].header["BUNIT"] == ""
    with fits.open(mr) as hdul:  # nor does it claim the first frame's time
        assert "DATE-OBS" not in hdul[0].header and "MJD-OBS" not in hdul[0].header


def test_no_number_written_as_a_string(run_target):
    for path in _fits_outputs(run_target):
        with fits.open(path) as hdul:
            for hdu in hdul:
                for card in hdu.header.cards:
                    value = card.value
                    if isinstance(value, str):
                        assert value.strip().lower() not in ("nan", "inf", "-inf", "+inf"), (
                            path,
                            card.keyword,
                        )


def test_extensions_on_the_grid_carry_the_wcs(run_target):
    from astropy.wcs import WCS

    checked = 0
    for path in _fits_outputs(run_target):
        with fits.open(path) as hdul:
            primary = hdul[0]
            if primary.data is None or "CTYPE1" not in primary.header:
                continue
            ref = WCS(primary.header)
            for hdu in hdul[1:]:
                if hdu.data is None or hdu.data.shape != primary.data.shape:
                    assert hdu.name == "KERNEL" or hdu.data is None, (path, hdu.name)
                    continue
                wcs = WCS(hdu.header)
                assert wcs.has_celestial, (path, hdu.name)
                assert np.allclose(wcs.wcs.crval, ref.wcs.crval), (path, hdu.name)
                assert np.allclose(wcs.pixel_scale_matrix, ref.pixel_scale_matrix)
                checked += 1
    assert checked > 10


def test_set_card_writes_no_card_for_a_number_that_is_not_finite():
    header = fits.Header({"OASQ": 0.9})
    io.set_card(header, "OASQ", float("nan"), "quality")
    io.set_card(header, "HIERARCH OAS X", np.float32("inf"))
    io.set_card(header, "HIERARCH OAS Y", np.float64(2.5))
    assert "OASQ" not in header and "OAS X" not in header
    assert header["OAS Y"] == 2.5 and isinstance(header["OAS Y"], float)


def test_residual_without_q_has_no_oasq_card(tmp_path):
    ones = np.ones((16, 16), np.float32)
    residual = Residual(
        data=ones,
        noise=ones,
        weight=ones,
        header={"BUNIT": "adu", "CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN"},
        q=float("nan"),
        meta={"nnoise": float("nan"), "stamps": 3},
    )
    path = tmp_path / "r.fits"
    io.write_residual(path, residual)
    header = fits.getheader(path)
    assert "OASQ" not in header and "OAS NNOISE" not in header and header["OAS STAMPS"] == 3
    back = io.read_residual(path)
    assert np.isnan(back.q)
    with fits.open(path) as hdul:
        assert hdul["NOISE"].header["BUNIT"] == "adu"
        assert hdul["NOISE"].header["CTYPE1"] == "RA---TAN"


@pytest.mark.parametrize(
    ("cards", "want"),
    [
        ({"MJD-OBS": 59000.0, "EXPTIME": 86.4}, 59000.0005),
        ({"DATE-OBS": "2020-05-31T00:00:00", "EXPTIME": 172.8}, 59000.001),
        ({"DATE-OBS": "2020-05-31", "UT": "12:00:00"}, 59000.5),
        ({"DATE-AVG": "2020-05-31T12:00:00", "MJD-OBS": 1.0, "EXPTIME": 100.0}, 59000.5),
        ({"MJD-AVG": 59000.25}, 59000.25),
        ({"DATE-OBS": "not a date"}, None),
        ({"OBJECT": "x"}, None),
    ],
)
def test_header_mjd(cards, want):
    got = io.header_mjd(fits.Header(cards))
    assert got == (None if want is None else pytest.approx(want, abs=1e-9))


def test_decam_rows_get_the_frames_mid_exposure_time(tmp_path, shared_data):
    """Real frames: DECam headers carry DATE-OBS, MJD-OBS (the start) and EXPTIME."""
    from astropy.time import Time

    from oasis_core.engine.pair import subtract_pair

    folder = shared_data / "decam_n6"
    science, template = folder / "DEC-OBS18a.mini.fits", folder / "DEC-OBS04a.mini.fits"
    catalog = tmp_path / "cat.ecsv"
    subtract_pair(science, template, tmp_path / "r.fits", catalog=catalog)
    table = Table.read(catalog)
    assert len(table) > 0
    header = fits.getheader(science)
    start = Time(header["DATE-OBS"], scale="utc").mjd
    assert start == pytest.approx(header["MJD-OBS"], abs=1e-7)
    want = start + header["EXPTIME"] / 2 / 86400
    times = Time(table["mjd"], format="mjd")
    assert np.allclose(times.mjd, want, atol=1e-7)
    assert table["mjd"].unit == "d" and table["x"].unit == "pix"
    assert table["flux"].unit is None  # DECam gives no BUNIT: no unit is invented
