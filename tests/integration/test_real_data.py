"""The pipeline and the subtraction on every folder of real frames in ../shared/data."""

from __future__ import annotations

from pathlib import Path

import attrs
import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from oasis_apps.get import unpack
from oasis_core.contracts.errors import InputError
from oasis_core.contracts.model import Template
from oasis_core.engine import io
from oasis_core.engine.config import load_config
from oasis_core.engine.pipeline import detect, pipeline
from oasis_core.engine.plugins import Registry
from oasis_core.engine.quality import normalized_noise
from oasis_core.engine.sources import detection_threshold, filter_detections, filter_options
from oasis_core.engine.subtraction import residual_cards
from oasis_core.engine.tree import Target

pytestmark = pytest.mark.slow


def _source_pixels(template_path: Path) -> np.ndarray:
    """Pixels on and around the template's sources (to measure noise away from them)."""
    from scipy import ndimage

    data = fits.getdata(template_path).astype(float)
    med = np.median(data)
    sigma = 1.4826 * np.median(np.abs(data - med))
    smooth = ndimage.gaussian_filter(data, 1.5)
    return ndimage.maximum_filter(smooth > med + 3 * sigma / 2.5, size=9)


@pytest.fixture(scope="module")
def decam_target(decam_target_done):
    """The DECam frames after a run with the defaults (its inputs left unchanged), shared
    with the AstrOmatic tests' native chain (``tests/conftest.py``)."""
    return decam_target_done


def test_decam_residuals_are_noise_limited(decam_target):
    """Sky-subtracted frames, per-amplifier keys: every residual's R_norm has unit scatter."""
    target, result = decam_target
    residuals = sorted((target.path / "residuals").glob("*_residual.fits"))
    assert len(residuals) == 10
    sources = _source_pixels(target.path / "templates" / "template.fits")
    for path in residuals:
        res = io.read_residual(path)
        nn = normalized_noise(res.data, res.noise, res.weight, exclude=sources)
        # issue 2 asks 0.8-1.3; the ois backend of issue 3 must reach 0.8-1.2
        assert 0.8 <= nn <= 1.2, f"{path.name}: normalised noise {nn:.3f}"
        assert res.q > 0.75, f"{path.name}: Q {res.q:.3f}"
    assert result["extract"]["not_subtracted"] == []


def test_decam_residuals_keep_the_flux_scale(decam_target):
    """Two epochs of one night, same exposure time and photometric scale: every frame's
    kernel keeps the flux scale whichever image it convolves, and the residual's star
    check (``OAS STAR_LEFT``, the log's ``left``) finds the stars subtracted to a few
    percent. The frames sharper than the template (18c, 18e: the science convolved) had
    kernel sums of 0.75 and their stars left at -34 %, with Q 0.98 and no flag."""
    target, _ = decam_target
    log = (target.path / "residuals" / "log.txt").read_text()
    assert " left " in log.splitlines()[0]
    directions = set()
    for path in sorted((target.path / "residuals").glob("*_residual.fits")):
        res = io.read_residual(path)
        directions.add(res.kernel.direction)
        assert res.meta["fscale"] == pytest.approx(1.0, abs=0.08), path.name
        assert res.meta["star_left_n"] >= 3, path.name
        assert abs(res.meta["star_left"]) < 0.05, f"{path.name}: {res.meta['star_left']}"
        assert "stars left" not in str(res.meta.get("flag", ""))
    assert directions == {"template", "science"}


def test_decam_frames_get_a_full_kernel_model_or_the_log_says_why(decam_target):
    """256x256 cutouts with 4-6 stars each: ISIS's stamps were too few for its spatial
    degree on every frame ("few stamps: 2-5", degree 0). The default kernel now fits at
    least 8 of the 10 with a full model (the delta basis or cross-convolution, whose
    spatial degree follows the stars, or ISIS's at its full degree); for every other
    frame the residuals' log says why (its fallback, or why it was not subtracted; a
    frame the align stage could not register is the align stage's to explain)."""
    target, _ = decam_target
    log = (target.path / "residuals" / "log.txt").read_text()
    lines = {line.split()[0]: line for line in log.splitlines()[1:] if line.strip()}
    full = 0
    for name, line in lines.items():
        path = target.path / "residuals" / f"{name}_residual.fits"
        if not path.exists():
            assert "not subtracted" in line or "failed" in line, line
            continue
        header = fits.getheader(path)
        model = header["OAS CHOICE_KERNEL"]
        assert header["KMODEL"] == model
        assert f"kernel={model}" in line, line
        assert header["OAS KERNEL_REASON"].startswith("auto: ")
        if model in ("delta", "cross") or (model == "isis" and header["DEGSPAT"] == 2):
            full += 1
            assert "fallback" not in header.get("OAS FLAG", "")
        else:
            assert header["OAS FALLBACK"] and header["OAS FALLBACK"] in line, line
    assert full >= 8, log


def test_decam_catalogs_have_sky_coordinates(decam_target):
    target, _ = decam_target
    table = Table.read(target.path / "sources" / "sources.ecsv")
    assert {"ra", "dec", "reason", "n_frames"} <= set(table.colnames)
    # the sky position of each source is the template's WCS at its (0-based) pixel, and
    # it lies on the frame (ECSV keeps 1e-6 deg: 0.014 DECam pixel)
    from astropy.wcs import WCS

    header = fits.getheader(target.path / "templates" / "template.fits")
    x, y = WCS(header).all_world2pix(table["ra"], table["dec"], 0)
    np.testing.assert_allclose(x, table["x"], atol=0.05)
    np.testing.assert_allclose(y, table["y"], atol=0.05)
    assert np.all((x > -0.5) & (x < header["NAXIS1"] - 0.5))
    assert np.all((y > -0.5) & (y < header["NAXIS2"] - 0.5))


def _assert_every_kept_source_has_a_light_curve(path: Path) -> Table:
    """Every source kept by the extract stage (``filtered_sources``, ``MR_filtered_sources``)
    lies within ``[photometry] match_radius`` of a source with a light curve: one row per
    usable residual, a finite flux on most; returns the light curves."""
    curves = Table.read(path / "lightcurves" / "lightcurves.ecsv")
    variables = Table.read(path / "sources" / "variables.ecsv")
    residuals = sorted((path / "residuals").glob("*_residual.fits"))
    assert len(curves) == len(variables) * len(residuals)
    kept = [
        Table.read(path / "sources" / f"{stem}.ecsv")
        for stem in ("filtered_sources", "MR_filtered_sources")
    ]
    xs = np.concatenate([np.asarray(t["x"], float) for t in kept])
    ys = np.concatenate([np.asarray(t["y"], float) for t in kept])
    assert len(xs) > 0
    d = np.hypot(xs[:, None] - variables["x"][None, :], ys[:, None] - variables["y"][None, :])
    assert np.all(d.min(axis=1) <= 1.5 + 1e-6)
    for sid in variables["source_id"]:
        curve = curves[curves["source_id"] == sid]
        assert len(set(curve["frame"])) == len(residuals)
        assert np.isfinite(np.asarray(curve["flux"], float)).mean() >= 0.5
    return curves


def test_decam_every_kept_source_has_a_light_curve_with_header_times(decam_target):
    """The light curves' times are the frames' mid-exposure MJD (MJD-OBS + EXPTIME/2).
    (The shared cutouts all carry one header time, 2018-08-04T09:23:31.6, although they
    come from two epochs: the times are the headers', as they are.)"""
    target, result = decam_target
    curves = _assert_every_kept_source_has_a_light_curve(target.path)
    assert result["photometry"]["frames"] == 10
    for row in curves[:: max(1, len(curves) // 20)]:
        header = fits.getheader(target.path / "data" / f"{row['frame']}.fits")
        expected = header["MJD-OBS"] + header["EXPTIME"] / 2 / 86400
        assert row["mjd"] == pytest.approx(expected, abs=1e-8)
    assert (target.path / "lightcurves" / "index.html").is_file()


def test_isis_unregistered_bare_headers_end_to_end(tmp_path, shared_data):
    """No WCS, gain or saturation; translations up to 5 x 6.7 px: alignment from pixels."""
    target = Target(tmp_path / "isis").create()
    unpack(sorted((shared_data / "isis_example").glob("*.fits")), target)
    pipeline(target.path, jobs=2)
    reference = (target.path / "aligned" / "reference.txt").read_text().strip()
    shifts = []
    for path in sorted((target.path / "aligned").glob("*.fits")):
        hdr = fits.getheader(path)
        shifts.append(np.hypot(hdr.get("OAS CENTRE_SHIFT_X", 0), hdr.get("OAS CENTRE_SHIFT_Y", 0)))
    assert len(shifts) == 10 and reference.startswith("infile")
    assert max(shifts) > 2.0  # the frames really were moved
    psf = Table.read(target.path / "psf" / "psf.ecsv")
    assert np.all((psf["fwhm"] > 3.5) & (psf["fwhm"] < 6.0))
    qs = [fits.getheader(p)["OASQ"] for p in (target.path / "residuals").glob("*_residual.fits")]
    assert len(qs) == 10 and min(qs) > 0.5
    # light curves for every kept source; the bare headers give no time: mjd masked, the
    # frames in name order
    curves = _assert_every_kept_source_has_a_light_curve(target.path)
    assert np.ma.getmaskarray(curves["mjd"]).all()


def _prepared(path: Path, registry, cfg, workdir):
    frame = io.read_frame(path)
    for stage in ("mask", "psf"):
        name = cfg.backend(stage)
        backend = registry.select(stage, name, cfg.backend_options(stage, name))
        method = getattr(backend, stage)
        frame = method(frame, options=cfg.backend_options(stage, name), workdir=workdir)
    return frame


def _subtract_pair(science: Path, template: Path, tmp_path):
    registry = Registry()
    cfg = load_config(None, registry)
    sci = _prepared(science, registry, cfg, tmp_path)
    ref = _prepared(template, registry, cfg, tmp_path)
    tmpl = Template(**{f.name: getattr(ref, f.name) for f in attrs.fields(type(ref))})
    sub = registry.select("subtract", "ois", cfg.backend_options("subtract", "ois"))
    residual = sub.subtract(
        sci, tmpl, options=cfg.backend_options("subtract", "ois"), workdir=tmp_path
    )
    ext = registry.select("extract", "native", cfg.backend_options("extract", "native"))
    header = residual.header.copy()
    for key, value in residual_cards(residual, sci, tmpl).items():
        header[key] = value
    residual = attrs.evolve(residual, header=header)
    table = detect(
        ext,
        residual,
        options=cfg.backend_options("extract", "native"),
        workdir=tmp_path,
        template=tmpl.data,
    )
    filtered = filter_detections(
        table,
        catalogs=[table[table["sign"] > 0]],
        n_residuals=1,
        **filter_options(cfg.settings["extract"]),
    )
    return residual, filtered


def test_properimage_null_pair_has_almost_no_false_detections(tmp_path, shared_data):
    """Same field, same seeing, 74 s apart: every kept detection is false."""
    folder = shared_data / "properimage_null"
    residual, table = _subtract_pair(
        folder / "aligned_eso085-030-004.fit", folder / "aligned_eso085-030-005.fit", tmp_path
    )
    assert residual.q > 0.9
    assert 0.8 <= residual.meta["nnoise"] <= 1.2
    kept = table[table["reason"] == "kept"]
    assert len(kept) <= 3, kept
    # the pair's own null (0.47 Mpix away from masks and stars' wings) puts 0.45 false
    # detections per Mpix at about 4.9 sigma: snr_min (6) is the threshold
    assert table.meta["wing_stars"] >= 5
    _, level = detection_threshold(table.meta, snr_min=6.0, false_per_mpix=0.45)
    assert 4.5 < level < 5.5
    assert np.all(table["threshold"] == 6.0)
    # saturated stars (65535) are masked, never fitted nor detected
    data = fits.getdata(folder / "aligned_eso085-030-004.fit")
    assert np.all(residual.weight[data >= 65535] == 0)


def test_properimage_pair_alone_is_too_few_frames(tmp_path, shared_data):
    target = Target(tmp_path / "pi").create()
    unpack([shared_data / "properimage_null"], target)
    with pytest.raises(InputError, match=r"only 2 usable frame\(s\)"):
        pipeline(target.path, jobs=1)


def test_nircam_pair_in_extensions(tmp_path, shared_data):
    """JWST i2d stamps: data in the SCI extension, no gain: the noise comes from the sky."""
    a, b = sorted((shared_data / "jwst_nircam").glob("*_stamp.fits"))
    residual, _ = _subtract_pair(a, b, tmp_path)
    assert residual.data.shape == (900, 900)
    # two programmes, drizzled, a year apart: real changes and correlated noise keep Q
    # a little below a null pair's
    assert residual.q > 0.7
    assert 0.8 <= residual.meta["nnoise"] <= 1.3
