"""The in-memory API: ``oasis_core.subtract_pair`` on arrays, CCDData and paths."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits
from astropy.nddata import CCDData, StdDevUncertainty
from astropy.table import Table

import oasis_core
from oasis_core.contracts.errors import OasisError
from oasis_core.engine.io import read_residual
from oasis_core.engine.pair import subtract_pair as command_pair


@pytest.fixture(scope="module")
def sim_files(tmp_path_factory):
    """A simulated 160x160 pair on disk (with a sky, GAIN, RDNOISE, SATURATE, WCS)."""
    from oasis_native.sim import simulate_pair

    (sci, sci_hdr), (tpl, tpl_hdr), _ = simulate_pair((160, 160), seed=3)
    folder = tmp_path_factory.mktemp("apipair")
    fits.PrimaryHDU(sci, sci_hdr).writeto(folder / "sci.fits")
    fits.PrimaryHDU(tpl, tpl_hdr).writeto(folder / "tpl.fits")
    return folder / "sci.fits", folder / "tpl.fits", sci, tpl


@pytest.fixture(scope="module")
def sim_command(sim_files, tmp_path_factory):
    """What ``oasis subtract-pair`` makes of the simulated pair: (Residual, file)."""
    sci, tpl, _, _ = sim_files
    out = tmp_path_factory.mktemp("apicmd") / "diff.fits"
    residual = command_pair(sci, tpl, out)
    return residual, out


def _same_as_file(ccd, path):
    """``ccd`` equals the residual file ``path`` pixel for pixel, and in Q."""
    written = read_residual(path)
    np.testing.assert_array_equal(ccd.data, written.data)
    np.testing.assert_array_equal(ccd.uncertainty.array, written.noise)
    np.testing.assert_array_equal(ccd.mask, written.weight == 0)
    assert ccd.meta["OASQ"] == fits.getheader(path)["OASQ"]


def test_is_exported_lazily():
    import subprocess
    import sys

    code = (
        "import sys, oasis_core; assert 'oasis_core.engine.api' not in sys.modules; "
        "assert 'oasis_core.engine.subtraction' not in sys.modules; "
        "f = oasis_core.subtract_pair; assert f.__module__ == 'oasis_core.engine.api'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert "subtract_pair" in oasis_core.__all__


def test_ccddata_from_files_equals_the_command(sim_files, sim_command, tmp_path):
    sci, tpl, _, _ = sim_files
    residual, out = sim_command
    ccd = oasis_core.subtract_pair(CCDData.read(sci), CCDData.read(tpl))
    assert isinstance(ccd, CCDData)
    assert isinstance(ccd.uncertainty, StdDevUncertainty)
    _same_as_file(ccd, out)
    assert ccd.meta["OASQ"] == pytest.approx(residual.q)
    assert ccd.meta["OAS CHOICE_KERNEL"] == residual.meta["choice_kernel"]
    assert ccd.meta["OAS USABLE"] is True
    assert ccd.meta["OASBACK"] == "ois"
    assert ccd.wcs is not None and ccd.wcs.has_celestial
    assert str(ccd.unit) == "adu"
    # paths in give the same again
    _same_as_file(oasis_core.subtract_pair(str(sci), tpl), out)


def test_output_writes_what_the_command_writes_and_nothing_without_it(
    sim_files, sim_command, tmp_path, monkeypatch
):
    sci, tpl, _, _ = sim_files
    _, out = sim_command
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in sci.parent.iterdir())
    oasis_core.subtract_pair(CCDData.read(sci), CCDData.read(tpl))
    assert list(tmp_path.iterdir()) == []
    assert sorted(p.name for p in sci.parent.iterdir()) == before

    ccd = oasis_core.subtract_pair(CCDData.read(sci), CCDData.read(tpl), tmp_path / "d.fits")
    assert [p.name for p in tmp_path.iterdir()] == ["d.fits"]
    with fits.open(tmp_path / "d.fits") as mine, fits.open(out) as theirs:
        assert [h.name for h in mine] == [h.name for h in theirs]
        for a, b in zip(mine, theirs, strict=True):
            np.testing.assert_array_equal(a.data, b.data)
    _same_as_file(ccd, tmp_path / "d.fits")


def test_bare_arrays_give_a_sane_residual_with_q(sim_files, sim_command):
    _, _, sci, tpl = sim_files
    residual, _ = sim_command
    ccd = oasis_core.subtract_pair(sci, tpl)
    q = ccd.meta["OASQ"]
    assert isinstance(q, float) and q >= residual.q - 0.02
    good = ~ccd.mask
    assert abs(good.mean() - (residual.weight > 0).mean()) < 0.05
    assert np.isfinite(ccd.data[good]).all()
    normalised = ccd.data[good] / ccd.uncertainty.array[good]
    spread = 1.4826 * np.median(np.abs(normalised - np.median(normalised)))
    assert 0.7 < spread < 1.3
    assert ccd.wcs is None  # no header, no WCS
    assert sci.flags.writeable  # the caller's arrays are left as they were
    assert np.isfinite(sci).all()


def test_a_mask_and_an_unusable_uncertainty_give_weight_zero(sim_files):
    sci_path, tpl_path, _, _ = sim_files
    sci = CCDData.read(sci_path)
    mask = np.zeros(sci.shape, bool)
    mask[40:60, 70:90] = True
    sci.mask = mask
    tpl = CCDData.read(tpl_path)
    sigma = np.full(tpl.shape, 20.0)
    sigma[100:110, 10:30] = np.nan
    tpl.uncertainty = StdDevUncertainty(sigma)
    ccd = oasis_core.subtract_pair(sci, tpl)
    assert ccd.mask[40:60, 70:90].all()
    assert ccd.mask[100:110, 10:30].all()
    assert not ccd.mask[110:130, 110:130].any()
    # a masked array's mask too
    masked = np.ma.MaskedArray(np.asarray(sci.data), mask=mask)
    assert oasis_core.subtract_pair(masked, np.asarray(tpl.data)).mask[40:60, 70:90].all()


def test_options_are_the_backends_and_are_checked(sim_files):
    _, _, sci, tpl = sim_files
    ccd = oasis_core.subtract_pair(sci, tpl, kernel="delta")
    assert ccd.meta["OAS CHOICE_KERNEL"] == "delta"


@pytest.mark.parametrize(
    ("call", "words"),
    [
        (lambda s, t: oasis_core.subtract_pair(s, t[:100]), ["template", "shape", "(100, 160)"]),
        (lambda s, t: oasis_core.subtract_pair(np.stack([s, s]), t), ["science", "2-D"]),
        (lambda s, t: oasis_core.subtract_pair(s, np.full_like(t, np.nan)), ["template", "NaN"]),
        (lambda s, t: oasis_core.subtract_pair(s, t, method="nope"), ["'nope'", "installed"]),
        (lambda s, t: oasis_core.subtract_pair(s, t, bogus=1), ["bogus", "subtract.ois"]),
        (lambda s, t: oasis_core.subtract_pair(s, t, kernel="x"), ["kernel", "must be one of"]),
        (lambda s, t: oasis_core.subtract_pair([[1.0]], t), ["science", "list"]),
    ],
)
def test_bad_input_is_one_line_naming_it(sim_files, call, words):
    _, _, sci, tpl = sim_files
    with pytest.raises(OasisError) as err:
        call(sci, tpl)
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_a_real_pair_as_ccddata_equals_the_command(shared_data, tmp_path):
    sci = shared_data / "decam_n6" / "DEC-OBS18a.mini.fits"
    tpl = shared_data / "decam_n6" / "DEC-OBS04a.mini.fits"
    out = tmp_path / "diff.fits"
    residual = command_pair(sci, tpl, out)
    ccd = oasis_core.subtract_pair(CCDData.read(sci, unit="adu"), CCDData.read(tpl, unit="adu"))
    _same_as_file(ccd, out)
    assert ccd.meta["OASQ"] == pytest.approx(residual.q) and residual.q > 0.9
    assert ccd.wcs is not None and ccd.wcs.has_celestial


def test_run_returns_the_catalogs_as_tables_with_units(tmp_path):
    """``oasis_core.run``: the pipeline from Python, its catalogs as astropy Tables that
    go into SkyCoord and Time as they are; backends per stage by keyword."""
    from astropy.coordinates import SkyCoord
    from astropy.time import Time

    import oasis_core
    from oasis_core.contracts.errors import InputError
    from tests.integration.pipeline_kit import make_target

    target = make_target(tmp_path)
    result = oasis_core.run(target, jobs=1, subtract="ois")
    assert result.target == target
    assert set(result.catalogs) == {
        "sources",
        "filtered_sources",
        "mr_sources",
        "mr_filtered_sources",
        "variables",
        "lightcurves",
    }
    assert len(result["lightcurves"]) == len(result["variables"]) * 5
    found = result["sources"]
    on_disk = Table.read(target / "sources" / "sources.ecsv", format="ascii.ecsv")
    assert len(found) == len(on_disk) > 0
    assert list(found["frame"]) == list(on_disk["frame"])
    coords = SkyCoord(found["ra"], found["dec"])
    assert np.all(np.isfinite(coords.ra.deg))
    assert np.all(np.isfinite(Time(found["mjd"], format="mjd").mjd))
    summary = result.summary["extract"]
    assert summary["frames"] == 5 and summary["found"] == len(found)
    assert summary["filtered"] == len(result["filtered_sources"])
    assert "rows" in repr(result)
    # an unknown stage is one line, before any work
    with pytest.raises(InputError, match="unknown stage 'substract'"):
        oasis_core.run(target, substract="ois")
