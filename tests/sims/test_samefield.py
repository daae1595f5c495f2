"""``oasis sim same-field``: the rendering of each mode, the draws, the WCS, the noise model
in the headers, and one end-to-end run on a real frame."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest

from oasis_apps.samefield import (
    FrameDraw,
    draw_frames,
    frame_psf,
    render_frame,
    render_sources,
    sim_same_field,
    sim_sameField,
    source_catalog,
    transform_positions,
)
from oasis_core.contracts.errors import BackendUnavailable, InputError
from oasis_core.contracts.model import PsfModel

PROPERIMAGE = "properimage_null/aligned_eso085-030-004.fit"


def _galsim_or_skip():
    return pytest.importorskip("galsim", reason="GalSim not installed (pip install galsim)")


def _radial_fwhm(image, x, y):
    """FWHM of a circular source centred on pixel (x, y): twice the radius where the
    profile, as a function of radius, falls to half the central pixel's value."""
    ny, nx = image.shape
    yy, xx = np.mgrid[:ny, :nx]
    r = np.hypot(xx - x, yy - y).ravel()
    v = image.ravel() / image[y, x]
    order = np.argsort(r)
    r, v = r[order], v[order]
    below = np.flatnonzero(v < 0.5)[0]
    r0, r1, v0, v1 = r[below - 1], r[below], v[below - 1], v[below]
    return 2.0 * (r0 + (0.5 - v0) * (r1 - r0) / (v1 - v0))


def _moffat_psf(fwhm, half=20, beta=2.5):
    off = np.arange(-half, half + 1)
    alpha = fwhm / (2.0 * math.sqrt(2.0 ** (1.0 / beta) - 1.0))
    r2 = off[None, :] ** 2 + off[:, None] ** 2
    img = (1.0 + r2 / alpha**2) ** (-beta)
    return PsfModel(image=img / img.sum(), fwhm=fwhm, model="moffat")


def _frame_header(draw, shape, gain=2.0, saturation=6e4):
    """The header the simulation writes for a frame of ``draw`` (default real-frame WCS)."""
    from pathlib import Path

    from oasis_apps.samefield_draw import linear_wcs, wcs_cards
    from oasis_apps.samefield_target import frame_header

    ra0, dec0, cd0 = linear_wcs(None, shape)
    wcs = wcs_cards(shape, ra0, dec0, cd0, draw)
    return frame_header(
        {},
        draw,
        wcs,
        index=0,
        mode="moffat",
        source=Path("x.fits"),
        n_sources=0,
        gain=gain,
        saturation=saturation,
    )


def _draw(**kw):
    base = {
        "fwhm": 4.0,
        "rotation": 0.0,
        "shift_x": 0.0,
        "shift_y": 0.0,
        "sky_mag": 22.5,
        "scale": 1.0,
        "offset": 0.0,
        "noise": 5.0,
        "zero_point": 25.0,
    }
    base.update(kw)
    return FrameDraw(**base)


@pytest.fixture(scope="module")
def real_crop(shared_data, tmp_path_factory):
    """A 320 px section of the ProperImage frame, written to a temporary file (the real
    frame is read in place); SATURATE added (the frame is 16-bit: 65535)."""
    from astropy.io import fits

    with fits.open(shared_data / PROPERIMAGE) as hdul:
        data = np.asarray(hdul[0].data[150:470, 600:920], np.float32)
        header = hdul[0].header.copy()
    for key in ("BZERO", "BSCALE"):
        header.remove(key, ignore_missing=True)
    header["SATURATE"] = 65535.0
    path = tmp_path_factory.mktemp("samefield_src") / "eso085.fits"
    fits.PrimaryHDU(data, header).writeto(path)
    return path


# ------------------------------------------------------------------------------ rendering


@pytest.mark.parametrize("mode", ["moffat", "gauss", "real", "sky"])
def test_rendered_source_has_the_flux_and_fwhm_asked_for(mode):
    if mode == "sky":
        _galsim_or_skip()
    psf = _moffat_psf(3.0) if mode == "real" else None
    image = render_sources((121, 121), [60.0], [60.0], [1.0e5], 5.0, mode, psf=psf, floor=1e-3)
    # flux: all of it but the wings beyond the stamp (a fraction of a percent; the
    # Kolmogorov profile's wings are the heaviest)
    tol = 0.02 if mode == "sky" else 0.005
    assert image.sum() == pytest.approx(1.0e5, rel=tol)
    # the peak is on the source's pixel and the profile is symmetric about it
    assert np.unravel_index(np.argmax(image), image.shape) == (60, 60)
    np.testing.assert_allclose(image, image[::-1, ::-1], rtol=1e-6, atol=1e-6 * image.max())
    # FWHM: sampled profiles exactly; GalSim integrates over the pixels, which widens a
    # 5 px FWHM by a few per cent
    fwhm = _radial_fwhm(image, 60, 60)
    if mode == "sky":
        assert 5.0 <= fwhm <= 5.0 * 1.06
    else:
        assert fwhm == pytest.approx(5.0, rel=0.02)


@pytest.mark.parametrize("mode", ["moffat", "gauss", "real", "sky"])
def test_subpixel_positions_are_rendered_where_asked(mode):
    import sep

    if mode == "sky":
        _galsim_or_skip()
    psf = _moffat_psf(3.5) if mode == "real" else None
    x = np.array([30.3, 70.75, 45.5, 90.1])
    y = np.array([25.6, 40.2, 80.45, 88.9])
    image = render_sources((120, 120), x, y, np.full(4, 5e4), 3.5, mode, psf=psf)
    xw, yw, flag = sep.winpos(image.astype(np.float64), x + 0.4, y - 0.3, 3.5 / 2.3548)
    assert not flag.any()
    np.testing.assert_allclose(xw, x, atol=0.02)
    np.testing.assert_allclose(yw, y, atol=0.02)


def test_unknown_mode_and_missing_psf_are_errors():
    with pytest.raises(InputError, match="mode 'airy'"):
        render_sources((10, 10), [5], [5], [1], 3.0, "airy")
    with pytest.raises(InputError, match="psf="):
        render_sources((10, 10), [5], [5], [1], 3.0, "real")


def test_sky_mode_without_galsim_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "galsim", None)  # import galsim -> ImportError
    with pytest.raises(BackendUnavailable, match=r"pip install 'oasis-dia\[sims\]'"):
        render_sources((20, 20), [10], [10], [100], 3.0, "sky")
    with pytest.raises(BackendUnavailable, match="GalSim"):
        sim_same_field(tmp_path, mode="sky")


# ------------------------------------------------------------------- geometry and noise


def test_positions_follow_the_rotation_and_the_shift():
    # rotation about the centre (99.5, 74.5) of a 200 x 150 frame, then the shift
    x, y = transform_positions(
        np.array([99.5, 199.5, 99.5]), np.array([74.5, 74.5, 124.5]), (150, 200), 90.0, 2, -1
    )
    np.testing.assert_allclose(x, [101.5, 101.5, 51.5], atol=1e-9)
    np.testing.assert_allclose(y, [73.5, 173.5, 73.5], atol=1e-9)


@pytest.mark.parametrize("mode", ["moffat", "sky"])
def test_rendered_frame_positions_and_wcs_follow_the_pointing(mode, tmp_path):
    """Stars measured on a rendered, noisy frame sit where the rotation and shift put them,
    and the frame's WCS gives them the sky position they had on the real frame."""
    import sep
    from astropy.table import Table
    from astropy.wcs import WCS

    if mode == "sky":
        _galsim_or_skip()
    shape = (200, 240)
    gx, gy = np.meshgrid(np.linspace(30, 210, 5), np.linspace(30, 170, 4))
    catalog = Table({"x": gx.ravel() + 0.3, "y": gy.ravel() - 0.2, "flux": np.full(20, 2e5)})
    draw = _draw(rotation=1.7, shift_x=1.35, shift_y=-0.8, fwhm=3.5, noise=3.0)
    data = render_frame(shape, catalog, draw, mode, gain=2.0, seed=1).astype(np.float64)
    xs, ys = transform_positions(catalog["x"], catalog["y"], shape, 1.7, 1.35, -0.8)
    sub = data - np.median(data)
    xw, yw, _ = sep.winpos(sub, xs, ys, 3.5 / 2.3548)
    np.testing.assert_allclose(xw, xs, atol=0.03)
    np.testing.assert_allclose(yw, ys, atol=0.03)

    base = _frame_header(_draw(), shape)
    moved = _frame_header(draw, shape)
    sky0 = WCS(base).all_pix2world(np.c_[catalog["x"], catalog["y"]], 0)
    sky1 = WCS(moved).all_pix2world(np.c_[xs, ys], 0)
    # the same sky position to 1e-3 px (0.5 mas)
    np.testing.assert_allclose(sky1, sky0, atol=1e-3 * 0.5 / 3600)


def test_wcs_of_a_real_frame_is_linearised_at_its_centre(shared_data):
    from oasis_apps.samefield_draw import linear_wcs
    from oasis_core.engine import io

    frame = io.read_frame(shared_data / "decam_n6" / "DEC-OBS04a.mini.fits")
    ra0, dec0, cd = linear_wcs(frame.header, frame.data.shape)
    wcs = io.header_wcs(frame.header)
    ra, dec = wcs.all_pix2world(127.5, 127.5, 0)
    assert (ra0, dec0) == pytest.approx((float(ra), float(dec)), abs=1e-9)
    # DECam: 0.263"/px
    assert math.sqrt(abs(np.linalg.det(cd))) * 3600 == pytest.approx(0.263, rel=0.02)


@pytest.mark.parametrize("mode", ["gauss", "sky"])
def test_sky_level_and_noise_match_bkg_mag_and_the_header(mode, tmp_path):
    from astropy.io import fits
    from astropy.table import Table

    from oasis_apps.samefield_target import write_fits
    from oasis_core.engine import io

    if mode == "sky":
        _galsim_or_skip()
    shape = (256, 256)
    empty = Table({"x": [], "y": [], "flux": []}, dtype=(float, float, float))
    draw = _draw(sky_mag=20.0, scale=0.37, offset=-12.0, noise=4.0)
    gain = 2.5
    data = render_frame(shape, empty, draw, mode, gain=gain, seed=3).astype(np.float64)
    sky = 10 ** (-0.4 * (20.0 - 25.0))  # 100 ADU
    assert draw.sky == pytest.approx(sky)
    sigma = 0.37 * math.sqrt(sky / gain + 4.0**2)
    n = data.size
    assert abs(data.mean() - (0.37 * sky - 12.0)) < 5 * sigma / math.sqrt(n)
    assert data.std() == pytest.approx(sigma, rel=0.02)
    # the header's GAIN and RDNOISE describe those pixels exactly
    header = _frame_header(draw, shape, gain=gain, saturation=60000.0)
    write_fits(tmp_path / "f.fits", data.astype(np.float32), header)
    frame = io.read_frame(tmp_path / "f.fits")
    hdr = fits.getheader(tmp_path / "f.fits")
    model = math.sqrt(
        (data.mean() - hdr["SFOFFSET"]) / frame.gain + (frame.readnoise / frame.gain) ** 2
    )
    assert data.std() == pytest.approx(model, rel=0.02)
    assert frame.saturation == pytest.approx(0.37 * 60000.0 - 12.0, rel=1e-6)


def test_saturated_pixels_sit_at_the_header_level(tmp_path):
    from astropy.table import Table

    catalog = Table({"x": [50.0], "y": [50.0], "flux": [5e6]})
    draw = _draw(scale=0.8, offset=7.0)
    data = render_frame((100, 100), catalog, draw, "moffat", saturation=30000.0, seed=0)
    level = np.float32(np.float64(30000.0) * 0.8 + 7.0)
    assert data.max() == level
    assert (data == level).sum() > 5


def test_draws_are_in_their_intervals_and_reproducible():
    kw = {
        "bkg_mag": 21.0,
        "fwhm": (2.5, 4.5),
        "rotation": (-1.0, 3.0),
        "shift": (-2.0, 1.0),
        "scale_mult": (0.0, 1.5),
        "scale_add": (-20.0, 50.0),
        "noise": 30.0,
    }
    draws = draw_frames(400, seed=5, **kw)
    assert draws == draw_frames(400, seed=5, **kw)
    assert draws != draw_frames(400, seed=6, **kw)
    for name, (lo, hi) in (
        ("fwhm", (2.5, 4.5)),
        ("rotation", (-1.0, 3.0)),
        ("shift_x", (-2.0, 1.0)),
        ("shift_y", (-2.0, 1.0)),
        ("sky_mag", (19.5, 22.5)),
        ("scale", (0.015, 1.5)),
        ("offset", (-20.0, 50.0)),
        ("noise", (25.0, 35.0)),
    ):
        v = np.array([getattr(d, name) for d in draws])
        assert v.min() >= lo and v.max() <= hi, name
        # spread over the interval
        assert v.max() - v.min() > 0.9 * (hi - lo), name
    # OasisPy's noise interval keeps at least half the real frame's noise
    small = draw_frames(200, noise=4.0)
    assert min(d.noise for d in small) >= 2.0


def test_bad_parameters_are_one_line_errors_naming_them(tmp_path):
    for kwargs, match in (
        ({"mode": "airy"}, "mode = 'airy': must be one of moffat, gauss, real, sky"),
        ({"numIms": 2}, "numIms"),
        ({"fwhm_min": 0}, "fwhm_min"),
        ({"fwhm_min": 6, "fwhm_max": 3}, r"fwhm_max = 3: must be a finite number >= fwhm_min"),
        ({"rot_min": 3, "rot_max": -3}, "rot_min"),
        ({"scale_mult": (-1, 1)}, "scale_mult"),
        ({"scale_add": (1,)}, "scale_add"),
    ):
        with pytest.raises(InputError, match=match) as info:
            sim_same_field(tmp_path, **kwargs)
        assert "\n" not in str(info.value)
    with pytest.raises(InputError, match="no such directory"):
        sim_same_field(tmp_path / "nowhere")
    assert sim_sameField is sim_same_field


# ------------------------------------------------------------------------ real frames


def test_catalog_recovers_rendered_fluxes():
    from astropy.table import Table

    from oasis_core.contracts.model import Frame

    rng = np.random.default_rng(2)
    x = rng.uniform(20, 236, 25)
    y = rng.uniform(20, 236, 25)
    flux = 10 ** rng.uniform(3.5, 5.0, 25)
    truth = Table({"x": x, "y": y, "flux": flux})
    # keep sources apart so that each has its own aperture
    d = np.hypot(x[:, None] - x[None, :], y[:, None] - y[None, :]) + 1e3 * np.eye(25)
    keep = d.min(axis=1) > 25
    data = render_frame((256, 256), truth[keep], _draw(fwhm=3.5, noise=3.0), "moffat", seed=4)
    cat = source_catalog(Frame(data=data, name="sim"))
    assert cat.meta["noise"] == pytest.approx(math.sqrt(10.0 + 9.0), rel=0.1)
    assert len(cat) == keep.sum()
    assert list(cat["flux"]) == sorted(cat["flux"], reverse=True)
    for xi, yi, fi in zip(x[keep], y[keep], flux[keep], strict=True):
        j = np.argmin(np.hypot(cat["x"] - xi, cat["y"] - yi))
        assert math.hypot(cat["x"][j] - xi, cat["y"][j] - yi) < 0.1
        # Kron aperture: ~95 % of a Moffat's flux, within the noise
        assert cat["flux"][j] == pytest.approx(0.95 * fi, rel=0.06)


def test_real_psf_of_a_real_frame(real_crop):
    from oasis_core.engine import io

    frame = io.read_frame(real_crop)
    psf = frame_psf(frame)
    # INVENTORY: FWHM about 3.1 px
    assert 2.6 < psf.fwhm < 3.7
    image = render_sources((81, 81), [40.0], [40.0], [1e5], 2 * psf.fwhm, "real", psf=psf)
    assert image.sum() == pytest.approx(1e5, rel=1e-6)
    assert _radial_fwhm(image, 40, 40) == pytest.approx(2 * psf.fwhm, rel=0.08)


@pytest.mark.slow
def test_same_field_run_on_a_real_frame_has_few_false_detections(real_crop, tmp_path, monkeypatch):
    from astropy.io import fits
    from astropy.table import Table

    monkeypatch.chdir(tmp_path)
    result = sim_same_field(real_crop, numIms=8, mode="moffat", seed=1, jobs=2)
    assert result.target == (tmp_path / "OASIS" / "simulations" / "eso085_samefield_moffat")
    data = sorted((result.target / "data").glob("*.fits"))
    assert len(data) == 8
    hdr = fits.getheader(data[3])
    row = result.table[3]
    assert hdr["SFFWHM"] == pytest.approx(row["fwhm"], abs=1e-3)
    assert hdr["GAIN"] == pytest.approx(1.0 / row["scale"])
    assert result.n_sources > 40
    # every frame but at most one goes through the whole pipeline
    assert len(result.false_per_frame) >= 7
    # the counts are the rows of filtered_sources per frame
    kept = Table.read(result.target / "sources" / "filtered_sources.ecsv", format="ascii.ecsv")
    for name, n in result.false_per_frame.items():
        assert n == int(np.sum(np.asarray(kept["frame"]).astype(str) == name))
    assert result.mean_false <= 1.0, result.line()
    for f in ("samefield.ecsv", "samefield.txt", "false_detections.png", "summary.txt"):
        assert (result.directory / f).stat().st_size > 0
    assert (result.directory / "summary.txt").read_text().strip() == result.line()
    # a rerun renders nothing and resumes the pipeline: the same answer
    before = data[0].stat().st_mtime_ns
    again = sim_same_field(real_crop, numIms=8, mode="moffat", seed=1, jobs=2)
    assert data[0].stat().st_mtime_ns == before
    assert dict(again.false_per_frame) == dict(result.false_per_frame)


def test_simulation_directory_is_reused_only_when_complete_and_identical(tmp_path):
    from oasis_apps.samefield_target import mark, prepare_target
    from oasis_core.engine.plugins import Registry

    registry = Registry()
    params = {"mode": "moffat", "fwhm": (3.0, 6.0), "seed": 0}
    sim = tmp_path / "x_samefield_moffat"
    target, current = prepare_target(sim, params, None, registry)
    assert not current and target.config_file.is_file()
    (target.data / "x_sf000.fits").write_bytes(b"partial")
    # interrupted before every frame was written: redone from scratch
    target, current = prepare_target(sim, params, None, registry)
    assert not current and not (target.data / "x_sf000.fits").exists()
    mark(target, params, complete=True)
    assert prepare_target(sim, params, None, registry)[1]
    # other parameters: redone
    assert not prepare_target(sim, {**params, "seed": 1}, None, registry)[1]
    # a directory that is not a simulation of ours is never removed
    other = tmp_path / "mine"
    (other / "data").mkdir(parents=True)
    with pytest.raises(InputError, match="not a same-field simulation"):
        prepare_target(other, params, None, registry)
    assert (other / "data").is_dir()
