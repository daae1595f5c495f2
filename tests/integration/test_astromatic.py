"""The pipeline with the AstrOmatic backends (PSFEx, SWarp, SExtractor) end to end, and
its detections against the native backends' on the same data."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from oasis_apps.demo import evaluate
from oasis_apps.get import unpack
from oasis_core.engine.pipeline import pipeline
from oasis_core.engine.tree import Target, init_root

ASTRO = {"psf": "psfex", "combine": "swarp", "mr": "swarp", "extract": "sextractor"}
MISSING = [
    p
    for p, names in {
        "SExtractor": ("source-extractor", "sex"),
        "SWarp": ("SWarp", "swarp"),
        "PSFEx": ("psfex",),
    }.items()
    if not any(shutil.which(n) for n in names)
]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        bool(MISSING), reason=f"not installed: {', '.join(MISSING)} (tools/install-programs)"
    ),
]


def _pixels(table, template: Path) -> np.ndarray:
    """Catalog positions on ``template``'s grid, through the sky coordinates."""
    wcs = WCS(fits.getheader(template))
    x, y = wcs.all_world2pix(np.asarray(table["ra"]), np.asarray(table["dec"]), 0)
    return np.column_stack([x, y])


def _matched(a, a_tpl: Path, b, b_tpl: Path, radius: float = 1.5) -> np.ndarray:
    """For each row of ``a``: is there a row of ``b`` of the same frame within ``radius``
    pixels (positions compared on ``a``'s template grid)?"""
    pa, pb = _pixels(a, a_tpl), _pixels(b, a_tpl)
    del b_tpl
    out = np.zeros(len(a), bool)
    for i, (frame, xy) in enumerate(zip(a["frame"], pa, strict=True)):
        same = np.asarray(b["frame"]) == frame
        if same.any():
            out[i] = np.hypot(*(pb[same] - xy).T).min() <= radius
    return out


def _shown(a, target: Path, sigma: float = 5.0) -> np.ndarray:
    """For each row of ``a``: does ``target``'s residual of the same frame exceed ``sigma``
    (residual / noise) within 1 px of it? (A blob one chain splits in two, the other may
    detect as one source a few px away; its residual still shows both.)"""
    out = np.zeros(len(a), bool)
    for i, row in enumerate(a):
        path = target / "residuals" / f"{row['frame']}_residual.fits"
        with fits.open(path) as hdul:
            x, y = _pixels(a[i : i + 1], path)[0]
            ix, iy = round(x), round(y)
            box = (slice(max(iy - 1, 0), iy + 2), slice(max(ix - 1, 0), ix + 2))
            z = hdul[0].data[box] / hdul["NOISE"].data[box]
            out[i] = bool(np.any(np.where(hdul["WEIGHT"].data[box] > 0, z, 0.0) >= sigma))
    return out


@pytest.fixture(scope="module")
def sim_pair(sim_target_done, tmp_path_factory):
    """The shared simulated target (native run) and a copy run with the AstrOmatic ones."""
    root = init_root(tmp_path_factory.mktemp("astro"))
    copy = Target(root / "targets" / "sim").create()
    for name in ("data", "configs"):
        shutil.copytree(sim_target_done.path / name, copy.path / name, dirs_exist_ok=True)
    result = pipeline(copy.path, backends=ASTRO, jobs=2)
    return sim_target_done, copy, result


def test_astromatic_pipeline_on_the_simulation(sim_pair):
    _, astro, result = sim_pair
    for stage, name in ASTRO.items():
        path = {
            "psf": next((astro.path / "psf").glob("*.psf.fits")),
            "combine": astro.path / "templates" / "template.fits",
            "mr": astro.path / "residuals" / "MR.fits",
        }.get(stage)
        if path is not None:
            assert fits.getheader(path)["OASBACK"] == name, stage
    frames = sorted((astro.path / "sources" / "detections").glob("*.ecsv"))
    det = Table.read(next(p for p in frames if p.stem not in ("MR", "VAR")))
    assert det.meta["OASBACK"] == "sextractor"
    assert "spread_model" in det.colnames  # measured with the frame's PSFEx model
    # PSFEx's own files are kept beside each PSF
    assert list((astro.path / "psf").glob("*.psf")) and list((astro.path / "psf").glob("*.cat"))
    assert result["extract"]["not_subtracted"] == []


def test_astromatic_transients_agree_with_native(sim_pair):
    native, astro, _ = sim_pair
    truth_path = native.path.parent.parent / "simulations" / native.name / "truth.ecsv"
    truth = Table.read(truth_path)
    got_native = evaluate(native, truth)
    got_astro = evaluate(astro, truth)
    assert got_astro.recovered == got_native.recovered >= 0.8 * got_native.recoverable
    assert got_astro.max_false <= 5, got_astro.false_per_frame
    # every bright transient kept by one chain is kept by the other within 1.5 px
    n_tpl = native.path / "templates" / "template.fits"
    a_tpl = astro.path / "templates" / "template.fits"
    kept_n = Table.read(native.path / "sources" / "filtered_sources.ecsv")
    kept_a = Table.read(astro.path / "sources" / "filtered_sources.ecsv")
    bright = truth[truth["peak_snr"] >= 10]
    truth_rows = Table({"frame": bright["frame"], "ra": bright["ra"], "dec": bright["dec"]})
    in_native = _matched(truth_rows, n_tpl, kept_n, n_tpl, radius=2.0)
    in_astro = _matched(truth_rows, n_tpl, kept_a, a_tpl, radius=2.0)
    assert in_native.sum() >= 0.8 * len(bright)
    np.testing.assert_array_equal(in_astro, in_native)
    transients_n = kept_n[_matched(kept_n, n_tpl, truth_rows, n_tpl, radius=2.0)]
    assert _matched(transients_n, n_tpl, kept_a, a_tpl).all()


@pytest.fixture(scope="module")
def decam_pair(tmp_path_factory, shared_data, decam_target_done):
    """The DECam frames run with the default (native) backends, the session's run shared
    with the real-data tests, and with the AstrOmatic ones."""
    frames = sorted((shared_data / "decam_n6").glob("*.fits"))
    target = Target(tmp_path_factory.mktemp("astro") / "decam").create()
    unpack(frames, target)
    return {
        "native": decam_target_done,
        "astro": (target, pipeline(target.path, backends=ASTRO, jobs=2)),
    }


def test_astromatic_on_decam_agrees_with_native(decam_pair):
    """Sky-subtracted DECam frames: the two chains keep the same significant sources."""
    (native, _), (astro, result) = decam_pair["native"], decam_pair["astro"]
    assert result["extract"]["not_subtracted"] == []
    for path in sorted((astro.path / "residuals").glob("*_residual.fits")):
        assert fits.getheader(path)["OASQ"] > 0.75, path.name
    n_tpl = native.path / "templates" / "template.fits"
    a_tpl = astro.path / "templates" / "template.fits"
    kept_n = Table.read(native.path / "sources" / "filtered_sources.ecsv")
    kept_a = Table.read(astro.path / "sources" / "filtered_sources.ecsv")
    all_n = Table.read(native.path / "sources" / "sources.ecsv")
    all_a = Table.read(astro.path / "sources" / "sources.ecsv")
    # a source one chain keeps at >= 15 sigma, the other mostly detects there too (within
    # 3 px), or its residual shows it at >= 5 sigma: the two deblend and background-fit
    # extended residuals differently, so a blob one splits in two the other may keep whole
    strong_n = kept_n[np.asarray(kept_n["peak_norm"]) >= 15]
    strong_a = kept_a[np.asarray(kept_a["peak_norm"]) >= 15]
    assert len(strong_n) >= 3 and len(strong_a) >= 3
    seen_n = _matched(strong_n, n_tpl, all_a, a_tpl, radius=3.0) | _shown(strong_n, astro.path)
    seen_a = _matched(strong_a, n_tpl, all_n, n_tpl, radius=3.0) | _shown(strong_a, native.path)
    assert seen_n.mean() >= 0.8 and seen_a.mean() >= 0.8
    # the variable of the first epoch (kept in several frames at one place): both chains
    # keep it within 1.5 px in the same frames
    xy = _pixels(kept_n, n_tpl)
    counts = np.array([(np.hypot(*(xy - p).T) <= 1.5).sum() for p in xy])
    variable = kept_n[counts == counts.max()]
    assert len(variable) >= 4
    assert _matched(variable, n_tpl, kept_a, a_tpl).all()
    # sources kept in several frames: most kept by both (the faint ones may differ)
    assert _matched(kept_n[counts >= 3], n_tpl, kept_a, a_tpl).mean() >= 0.7


def test_a_frame_psfex_cannot_model_is_reported_and_the_rest_go_on(sim_frames, tmp_path, caplog):
    """A frame without stars: one line naming it and the program's complaint; the other
    frames get their PSF."""
    import logging

    from oasis_core.engine.pipeline import mask, psf

    paths, _ = sim_frames
    target = Target(tmp_path / "t").create()
    unpack(paths[:4], target)
    header = fits.getheader(paths[0])
    rng = np.random.default_rng(0)
    blank = rng.normal(300.0, 15.0, fits.getdata(paths[0]).shape).astype(np.float32)
    fits.PrimaryHDU(blank, header).writeto(target.data / "blank.fits")
    mask(target.path, jobs=2)
    with caplog.at_level(logging.WARNING, logger="oasis"):
        psf(target.path, backends={"psf": "psfex"}, jobs=2)
    lines = [r.getMessage() for r in caplog.records if "blank" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0], lines
    assert "psfex" in lines[0].lower() or "sextractor" in lines[0].lower() or "star" in lines[0]
    made = sorted(p.name for p in (target.path / "psf").glob("*.psf.fits"))
    assert made == sorted(f"{p.stem}.psf.fits" for p in paths[:4])
