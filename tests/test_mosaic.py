"""``oasis_apps.mosaic``: Montage mosaics of real DECam and JWST/NIRCam frames.

The DECam frames of ``../shared/data/decam_n6`` are all on one grid, so the tests cut
overlapping pieces out of two exposures (copies in ``tmp_path``, WCS shifted with them):
``left`` = columns 0-159 of ``DEC-OBS04a``, ``right`` = columns 96-255 of ``DEC-OBS04b``.
Their union is the whole 256x256 field; columns 96-159 are covered twice.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from oasis_apps.mosaic import (
    MOSAIC,
    ask_parameters,
    default_preview,
    montage_header,
    mosaic,
    resolve_inputs,
)
from oasis_core.contracts.errors import BackendUnavailable, InputError, StageError
from oasis_core.engine import io
from oasis_core.engine.tree import Target


def _have_montage() -> bool:
    try:
        import MontagePy.main  # noqa: F401
    except ImportError:
        return False
    return True


needs_montage = pytest.mark.skipif(
    not _have_montage(),
    reason="MontagePy not installed (pip install 'oasis-dia[mosaic]')",
)

LEFT = (0, 160)  # columns of DEC-OBS04a
RIGHT = (96, 256)  # columns of DEC-OBS04b
OFFSET = 40.0  # ADU added to the right piece (the sky noise is ~10 ADU per pixel)


def _cut(src: Path, dest: Path, x0: int, x1: int, *, add: float = 0.0) -> Path:
    """Columns x0..x1-1 of ``src`` (header kept, CRPIX1 shifted) written to ``dest``."""
    with fits.open(src) as hdul:
        header = hdul[0].header.copy()
        data = np.array(hdul[0].data[:, x0:x1], dtype=np.float64) + add
    header["CRPIX1"] -= x0
    fits.PrimaryHDU(data, header).writeto(dest)
    return dest


@pytest.fixture(scope="module")
def pieces(shared_data, tmp_path_factory):
    d = tmp_path_factory.mktemp("decam_pieces")
    src = shared_data / "decam_n6"
    return {
        "left": _cut(src / "DEC-OBS04a.mini.fits", d / "left.fits", *LEFT),
        "right": _cut(src / "DEC-OBS04b.mini.fits", d / "right.fits", *RIGHT),
        "right_offset": _cut(
            src / "DEC-OBS04b.mini.fits", d / "right_offset.fits", *RIGHT, add=OFFSET
        ),
    }


@pytest.fixture(scope="module")
def pair(pieces, tmp_path_factory):
    out = tmp_path_factory.mktemp("mosaic_pair") / "pair.fits"
    result = mosaic([pieces["left"], pieces["right"]], out)
    return result


def _sky(path: Path) -> tuple[np.ndarray, WCS]:
    with fits.open(path) as hdul:
        return np.array(hdul[0].data, dtype=np.float64), WCS(hdul[0].header, naxis=2)


def _mosaic_regions(result, pieces):
    """Mosaic pixels covered by the left piece only and by the right piece only."""
    data, wcs = _sky(result.output)
    ny, nx = data.shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    ra, dec = wcs.wcs_pix2world(xx.ravel(), yy.ravel(), 0)
    _, w_in = _sky(pieces["left"])
    x_in, y_in = w_in.all_world2pix(ra, dec, 0)
    x_full = (x_in + LEFT[0]).reshape(ny, nx)  # column in the original 256x256 grid
    y_in = y_in.reshape(ny, nx)
    inside = (y_in > 8) & (y_in < 247) & np.isfinite(data)
    left_only = inside & (x_full > 8) & (x_full < RIGHT[0] - 4)
    right_only = inside & (x_full > LEFT[1] + 4) & (x_full < 247)
    return data, left_only, right_only


def _robust_median(values: np.ndarray) -> float:
    from astropy.stats import sigma_clipped_stats

    return float(sigma_clipped_stats(values, sigma=3.0, maxiters=5)[1])


@needs_montage
def test_mosaic_covers_the_union_of_the_footprints(pair, pieces):
    data, wcs = _sky(pair.output)
    assert pair.shape == data.shape and pair.n_inputs == 2
    weight = fits.getdata(pair.output, "WEIGHT")
    for name in ("left", "right"):
        piece, w_in = _sky(pieces[name])
        ny, nx = piece.shape
        yy, xx = np.mgrid[0:ny:5, 0:nx:5]
        ra, dec = w_in.all_pix2world(xx.ravel(), yy.ravel(), 0)
        mx, my = wcs.all_world2pix(ra, dec, 0)
        ix, iy = np.round(mx).astype(int), np.round(my).astype(int)
        assert ix.min() >= 0 and iy.min() >= 0
        assert ix.max() < data.shape[1] and iy.max() < data.shape[0]
        assert np.isfinite(data[iy, ix]).all(), name
        assert (weight[iy, ix] > 0).all(), name
    # the mosaic is the union (256 x 256 px of sky), not the bounding box of something bigger
    covered = int((weight > 0).sum())
    assert covered == pytest.approx(256 * 256, rel=0.03)
    assert data.size < 1.1 * 256 * 256
    # no sky outside the union: pixels with no input are blank
    assert not np.isfinite(data[weight == 0]).any()


def _stars(image: np.ndarray, lo: float, hi: float, margin: int = 26):
    from scipy import ndimage

    peaks = (image == ndimage.maximum_filter(image, 21)) & (image > lo) & (image < hi)
    ys, xs = np.nonzero(peaks)
    keep = (
        (xs > margin)
        & (ys > margin)
        & (xs < image.shape[1] - margin)
        & (ys < image.shape[0] - margin)
    )
    return xs[keep], ys[keep]


def _centroid(image, x, y, r=5):
    yy, xx = np.mgrid[int(y) - r : int(y) + r + 1, int(x) - r : int(x) + r + 1]
    stamp = np.clip(np.nan_to_num(image[yy, xx] - np.nanmedian(image[yy, xx])), 0, None)
    return float((stamp * xx).sum() / stamp.sum()), float((stamp * yy).sum() / stamp.sum())


def _aperture_flux(image, x, y, r=12.0, r_in=17.0, r_out=24.0):
    yy, xx = np.mgrid[0 : image.shape[0], 0 : image.shape[1]]
    rr = np.hypot(xx - x, yy - y)
    sky = np.nanmedian(image[(rr > r_in) & (rr < r_out)])
    return float(np.nansum(image[rr < r] - sky))


def _flux_at(path: Path, ra: float, dec: float) -> float:
    image, wcs = _sky(path)
    x, y = wcs.all_world2pix(ra, dec, 0)
    xc, yc = _centroid(image, x, y)
    assert np.hypot(xc - x, yc - y) < 0.25  # the WCS (TPV distortion included) is honoured
    return _aperture_flux(image, xc, yc)


@needs_montage
def test_star_flux_in_the_mosaic_equals_the_input(pair, pieces):
    """Stars seen by one input keep its flux; stars seen by both get the mean of theirs."""
    full, w_full = _sky(pieces["left"])  # columns 0-159 of the original grid
    expected_kinds = set()
    xs, ys = _stars(full, 500.0, 30000.0)
    right, _ = _sky(pieces["right"])
    rx, ry = _stars(right, 500.0, 30000.0)
    stars = [_centroid(full, x, y) for x, y in zip(xs, ys, strict=True)]
    stars += [
        (cx + RIGHT[0], cy)
        for cx, cy in (_centroid(right, x, y) for x, y in zip(rx, ry, strict=True))
    ]
    for x, y in stars:
        # x in the original grid; aperture radius 12, sky annulus out to 24
        if x < RIGHT[0] - 12:
            sources = ["left"]
        elif RIGHT[0] + 24 <= x < LEFT[1] - 24:
            sources = ["left", "right"]
        elif x >= LEFT[1] + 12:
            sources = ["right"]
        else:
            continue  # the aperture straddles the edge of a piece
        ra, dec = w_full.all_pix2world(x, y, 0)
        expected = np.mean([_flux_at(pieces[name], ra, dec) for name in sources])
        assert _flux_at(pair.output, ra, dec) == pytest.approx(expected, rel=0.03), (x, y)
        expected_kinds.add(len(sources))
    assert expected_kinds == {1, 2}


@needs_montage
def test_background_matching_removes_an_offset(pair, pieces, tmp_path):
    base_data, base_left, base_right = _mosaic_regions(pair, pieces)
    base_step = _robust_median(base_data[base_right]) - _robust_median(base_data[base_left])

    inputs = [pieces["left"], pieces["right_offset"]]
    raw = mosaic(inputs, tmp_path / "raw.fits", background_match=False)
    matched = mosaic(inputs, tmp_path / "matched.fits", workdir=tmp_path / "work")
    assert not raw.background_matched and raw.corrections == {}
    assert matched.background_matched and matched.meta["overlaps"] == 1
    assert any((tmp_path / "work").glob("mosaic-*/corr.tbl"))  # workdir kept

    data, left, right = _mosaic_regions(raw, pieces)
    raw_step = _robust_median(data[right]) - _robust_median(data[left])
    assert raw_step - base_step == pytest.approx(OFFSET, abs=1.0)

    data, left, right = _mosaic_regions(matched, pieces)
    n = min(left.sum(), right.sum())
    sigma = 1.4826 * np.median(np.abs(data[left] - np.median(data[left])))
    step = _robust_median(data[right]) - _robust_median(data[left])
    # the step between the pieces is the one of the unmodified pair, within the noise
    assert abs(step - base_step) < 5 * sigma * np.sqrt(2.0 / n) + 0.5
    # Montage's fitted corrections differ by the offset we added
    c_off = matched.corrections["right_offset"] - matched.corrections["left"]
    c_base = pair.corrections["right"] - pair.corrections["left"]
    assert c_off - c_base == pytest.approx(OFFSET, abs=1.0)
    header = fits.getheader(matched.output)
    assert header["OASBGM"] is True and fits.getheader(raw.output)["OASBGM"] is False
    history = "\n".join(str(h) for h in header["HISTORY"])
    assert "removed from right_offset" in history


@needs_montage
def test_output_header_weight_and_preview(pair, pieces):
    header = fits.getheader(pair.output)
    assert header["OASSTAGE"] == "mosaic" and header["NCOMBINE"] == 2
    assert header["OASBACK"] == "montage" and header["OASPLUG"].startswith("MontagePy==")
    assert header["OASIN0"].startswith("left:") and header["OASIN1"].startswith("right:")
    assert header["OASIN0"].split(":")[1] == io.sha256(pieces["left"])[:32]
    history = "\n".join(str(h) for h in header["HISTORY"])
    assert f"mosaic input 1/2: {pieces['left']}" in history.replace("\n", "")
    assert "OASIN2" not in header
    # the mosaic reads back as a frame: data, weight from the WEIGHT extension, WCS
    frame = io.read_frame(pair.output, warn=False)
    assert frame.wcs is not None and frame.shape == pair.shape
    assert ((frame.weight > 0) == np.isfinite(fits.getdata(pair.output))).all()
    assert "TAN" in pair.wcs and f"{pair.pixel_scale:.4f} arcsec/px" in pair.wcs
    assert pair.pixel_scale == pytest.approx(0.2623, abs=0.002)  # DECam
    # PNG preview beside it
    assert pair.preview == default_preview(pair.output) == pair.output.with_suffix(".png")
    assert pair.preview.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "2 frames" in pair.line()


def test_frame_without_wcs_is_a_one_line_error(pieces, shared_data, tmp_path):
    bare = shared_data / "isis_example" / "infile3.fits"
    out = tmp_path / "m.fits"
    with pytest.raises(InputError) as info:
        mosaic([pieces["left"], bare], out)
    message = str(info.value)
    assert "\n" not in message and message.startswith((str(bare), str(bare.resolve())))
    assert "WCS" in message
    assert not out.exists() and not default_preview(out).exists()


def _nircam_in_extension(src: Path, dest: Path) -> Path:
    """A 160x160 piece of a NIRCam stamp laid out as JWST does: empty primary, SCI, ERR."""
    with fits.open(src) as hdul:
        sci = hdul[0].header.copy()
        data = np.array(hdul[0].data[370:530, 370:530], dtype=np.float32)
    sci["CRPIX1"] -= 370
    sci["CRPIX2"] -= 370
    primary = fits.Header()
    primary["TELESCOP"] = "JWST"
    err = fits.Header()
    err["EXTNAME"] = "ERR"
    fits.HDUList(
        [
            fits.PrimaryHDU(header=primary),
            fits.ImageHDU(data, sci),
            fits.ImageHDU(np.ones_like(data), err),
        ]
    ).writeto(dest)
    return dest


@needs_montage
def test_nircam_residuals_of_a_target_with_data_in_an_extension(shared_data, tmp_path):
    target = Target(tmp_path / "OASIS" / "targets" / "a2744").create()
    (target.path / "residuals").mkdir(exist_ok=True)
    stamps = sorted((shared_data / "jwst_nircam").glob("jw0*_stamp.fits"))
    assert len(stamps) == 2
    for i, stamp in enumerate(stamps):
        _nircam_in_extension(stamp, target.path / "residuals" / f"epoch{i}_residual.fits")
    # not residuals: left out
    fits.PrimaryHDU(np.zeros((4, 4))).writeto(target.path / "residuals" / "MR.fits")
    answers = iter([str(target.path), "residuals", str(tmp_path / "nircam.fits"), "y", "median"])
    result = MOSAIC(ask=lambda question, default: next(answers))
    assert [p.name for p in result.inputs] == ["epoch0_residual.fits", "epoch1_residual.fits"]
    assert result.kind == "residuals" and result.meta["combine"] == "median"
    header = fits.getheader(result.output)
    assert header["OASKIND"] == "residuals" and header["BUNIT"] == "MJy/sr"
    assert header["FILTER"] == "F200W"
    # both pieces cover the same sky: the mosaic is about as big as one of them
    weight = fits.getdata(result.output, "WEIGHT")
    assert (weight > 0).sum() == pytest.approx(160 * 160, rel=0.05)
    assert result.pixel_scale == pytest.approx(0.0308, abs=0.001)
    data = fits.getdata(result.output)
    with fits.open(target.path / "residuals" / "epoch0_residual.fits") as hdul:
        piece = hdul["SCI"].data
    assert np.nanmedian(data) == pytest.approx(np.nanmedian(piece), abs=0.05)


def test_resolve_inputs_from_a_target_and_patterns(pieces, tmp_path):
    target = Target(tmp_path / "t").create()
    with pytest.raises(InputError, match="no frames in aligned/ or data/"):
        resolve_inputs(target)
    with pytest.raises(InputError, match=r"no \*_residual.fits.*oasis subtract"):
        resolve_inputs(target.path, kind="residuals")
    for name in ("b", "a"):
        fits.PrimaryHDU(np.zeros((4, 4))).writeto(target.data / f"{name}.fits")
    assert [p.name for p in resolve_inputs(target.path)] == ["a.fits", "b.fits"]
    (target.path / "aligned").mkdir()
    fits.PrimaryHDU(np.zeros((4, 4))).writeto(target.path / "aligned" / "a_aligned.fits")
    assert [p.name for p in resolve_inputs([target.path])] == ["a_aligned.fits"]
    pattern = str(pieces["left"].parent / "right*.fits")
    assert [p.name for p in resolve_inputs([pattern])] == ["right.fits", "right_offset.fits"]
    both = resolve_inputs([pieces["left"], pieces["left"], pattern])
    assert [p.name for p in both] == ["left.fits", "right.fits", "right_offset.fits"]
    with pytest.raises(InputError, match="no such file"):
        resolve_inputs([pieces["left"], tmp_path / "missing.fits"])
    with pytest.raises(InputError, match="no file matches"):
        resolve_inputs([str(tmp_path / "*.fit")])
    with pytest.raises(InputError, match="kind 'frame'"):
        resolve_inputs([pieces["left"]], kind="frame")


def test_bad_arguments_fail_before_montage_runs(pieces, tmp_path):
    with pytest.raises(InputError, match="combine 'sum' is not one of mean, median"):
        mosaic([pieces["left"], pieces["right"]], tmp_path / "m.fits", combine="sum")
    with pytest.raises(InputError, match="output is one of the inputs"):
        mosaic([pieces["left"], pieces["right"]], pieces["left"])


def test_missing_montagepy_is_backend_unavailable(pieces, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "MontagePy.main", None)
    with pytest.raises(BackendUnavailable, match=r"pip install 'oasis-dia\[mosaic\]'"):
        mosaic([pieces["left"]], tmp_path / "m.fits")


def test_oasis_mosaic_without_montagepy_says_which_extra_in_one_line(
    pieces, tmp_path, monkeypatch, capsys
):
    from oasis_apps.cli import main

    monkeypatch.setitem(sys.modules, "MontagePy", None)
    monkeypatch.setitem(sys.modules, "MontagePy.main", None)
    code = main(["mosaic", str(pieces["left"]), "-O", str(tmp_path / "m.fits")])
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1 and err.startswith("error: mosaic: MontagePy is not installed")
    assert "pip install 'oasis-dia[mosaic]'" in err
    assert not (tmp_path / "m.fits").exists()


def test_montage_failure_is_a_one_line_stage_error():
    from oasis_apps.mosaic_montage import check_result

    with pytest.raises(StageError, match=r"^mosaic: MontagePy mAdd failed: Bad template\.$"):
        check_result({"status": "1", "msg": b"Bad template.\n"}, "mAdd")
    assert check_result({"status": "0", "count": 2}, "mImgtbl")["count"] == 2


def test_montage_header_uses_a_cd_matrix(shared_data):
    path = shared_data / "jwst_nircam"
    stamp = sorted(path.glob("jw0*_stamp.fits"))[0]
    wcs = io.read_frame(stamp, warn=False).wcs  # PC matrix + CDELT in the file
    header = montage_header(wcs, (900, 900))
    assert "PC1_1" not in header and "CDELT1" not in header
    cd = np.array([[header["CD1_1"], header["CD1_2"]], [header["CD2_1"], header["CD2_2"]]])
    np.testing.assert_allclose(cd, wcs.pixel_scale_matrix)
    assert header["NAXIS1"] == 900 and header["CTYPE1"] == "RA---TAN"


def test_prompts():
    answers = iter(["a.fits, b.fits", "frames", "out.fits", "n", "mean"])
    params = ask_parameters(lambda question, default: next(answers))
    assert params == {
        "inputs": ["a.fits", "b.fits"],
        "output": Path("out.fits"),
        "kind": "frames",
        "background_match": False,
        "combine": "mean",
    }
    with pytest.raises(InputError, match="no inputs given"):
        ask_parameters(lambda question, default: default)
    answers = iter(["a.fits", "frames", "out.fits", "maybe"])
    with pytest.raises(InputError, match="'maybe' is not yes or no"):
        ask_parameters(lambda question, default: next(answers))
