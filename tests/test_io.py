"""Reading real frames of every kind in ../shared/data, and atomic writes."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from astropy.io import fits

from oasis_core.contracts.errors import InputError
from oasis_core.engine import io


def test_decam_per_amplifier_keys(shared_data):
    path = shared_data / "decam_n6" / "DEC-OBS04a.mini.fits"
    hdr = fits.getheader(path)
    frame = io.read_frame(path)
    assert frame.gain == pytest.approx(hdr["GAIN"])
    assert frame.saturation == pytest.approx(hdr["SATURATE"])
    # the same header without the plain keys falls back to the amplifiers' keys
    for key in ("GAIN", "RDNOISE", "SATURATE"):
        del hdr[key]
    assert io.header_value(hdr, io.GAIN_KEYS) == pytest.approx((hdr["GAINA"] + hdr["GAINB"]) / 2)
    assert io.header_value(hdr, io.RDNOISE_KEYS) == pytest.approx(
        (hdr["RDNOISEA"] + hdr["RDNOISEB"]) / 2
    )
    assert io.header_value(hdr, io.SATURATE_KEYS, combine="min") == pytest.approx(
        min(hdr["SATURATA"], hdr["SATURATB"])
    )
    assert frame.data.dtype == np.float32 and frame.data.dtype.isnative
    assert frame.wcs is not None
    assert (frame.data < 0).mean() > 0.2  # sky-subtracted: negative pixels are data


def test_nircam_data_in_extension(shared_data):
    path = next((shared_data / "jwst_nircam").glob("jw01324*_stamp.fits"))
    frame = io.read_frame(path)
    assert frame.shape == (900, 900)
    with fits.open(path) as hdul:
        sci = hdul["SCI"].data
    good = np.isfinite(sci)
    np.testing.assert_allclose(frame.data[good], sci[good].astype(np.float32))
    assert (frame.weight[~good] == 0).all()
    assert frame.wcs is not None


def test_isis_bare_header_and_truncated_file(shared_data, caplog):
    path = shared_data / "isis_example" / "infile3.fits"
    with caplog.at_level(logging.WARNING, logger="oasis"):
        frame = io.read_frame(path)
    assert frame.shape == (256, 256)
    assert frame.wcs is None  # CRVAL 0, CDELT 1, no CTYPE: not a sky WCS
    assert frame.gain is None and frame.readnoise is None and frame.saturation is None
    [message] = [r.getMessage() for r in caplog.records]
    assert str(path) in message and "GAIN" in message and "\n" not in message


def test_properimage_uint16_saturation_from_bzero(shared_data):
    frame = io.read_frame(shared_data / "properimage_null" / "aligned_eso085-030-004.fit")
    assert frame.shape == (682, 1024)
    assert frame.saturation == 65535.0
    assert frame.data.max() == 65535.0


def test_weight_and_mask_extensions(tmp_path):
    data = np.arange(16, dtype=np.float32).reshape(4, 4)
    data[0, 0] = np.nan
    weight = np.ones((4, 4), np.float32)
    weight[1, 1] = 0.0
    bpm = np.zeros((4, 4), np.int16)
    bpm[2, 2] = 4
    hdul = fits.HDUList(
        [
            fits.PrimaryHDU(data),
            fits.ImageHDU(weight, fits.Header([("WEIGHT", "Y")])),
            fits.ImageHDU(bpm, name="BPM"),
        ]
    )
    path = tmp_path / "f.fits"
    hdul.writeto(path)
    frame = io.read_frame(path)
    assert frame.weight[0, 0] == 0 and frame.weight[1, 1] == 0 and frame.weight[2, 2] == 0
    assert frame.weight.sum() == 13
    # WEIGHT = 'N': a binary mask, non-zero = bad
    mask = np.zeros((4, 4), np.uint8)
    mask[3, 3] = 1
    fits.HDUList(
        [fits.PrimaryHDU(np.ones((4, 4))), fits.ImageHDU(mask, fits.Header([("WEIGHT", "N")]))]
    ).writeto(tmp_path / "g.fits")
    frame = io.read_frame(tmp_path / "g.fits")
    assert frame.weight[3, 3] == 0 and frame.weight.sum() == 15


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"this is not a FITS file" * 200, "not a readable FITS file"),
        (None, "every pixel is NaN"),
        ("empty", "no 2-D image"),
    ],
)
def test_bad_files_give_one_line_errors_naming_the_file(tmp_path, content, message):
    path = tmp_path / "bad.fits"
    if content is None:
        fits.PrimaryHDU(np.full((8, 8), np.nan, np.float32)).writeto(path)
    elif content == "empty":
        fits.PrimaryHDU().writeto(path)
    else:
        path.write_bytes(content)
    with pytest.raises(InputError, match=message) as info:
        io.read_frame(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")

    def crash_while_writing():
        with io.atomic_write(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        crash_while_writing()
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]


def test_fpack_compressed_frame(tmp_path):
    data = np.random.default_rng(1).normal(100, 5, (64, 64)).astype(np.float32)
    hdul = fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(data, fits.Header([("GAIN", 2.0)]))])
    path = tmp_path / "frame.fits.fz"
    hdul.writeto(path)
    frame = io.read_frame(path)
    assert frame.name == "frame" and frame.shape == (64, 64) and frame.gain == 2.0
    assert np.abs(frame.data - data).max() < 1.0  # lossy quantisation, but close


def test_residual_round_trip(tmp_path):
    from oasis_core.contracts.model import KernelSolution, Residual

    rng = np.random.default_rng(0)
    res = Residual(
        data=rng.normal(size=(16, 16)),
        noise=np.ones((16, 16)),
        weight=np.ones((16, 16)),
        name="r",
        science="s",
        template="t",
        q=0.9,
        kernel=KernelSolution(image=np.ones((3, 3)) / 9, meta={"nstamps": 12}),
        params={"deg_spatial": 2},
        extra={"score": np.zeros((16, 16))},
        meta={"flag": ""},
    )
    io.write_residual(tmp_path / "r_residual.fits", res)
    back = io.read_residual(tmp_path / "r_residual.fits")
    np.testing.assert_array_equal(back.data, res.data.astype(np.float32))
    assert back.q == pytest.approx(0.9)
    assert back.params["deg_spatial"] == 2 and back.kernel.meta["nstamps"] == 12
    assert "score" in back.extra


def test_residual_series_reads_on_demand_and_caches_what_fits(tmp_path, monkeypatch):
    from oasis_core.contracts.model import Residual
    from oasis_core.engine import products

    paths = []
    for i in range(4):
        res = Residual(
            data=np.full((8, 8), i), noise=np.ones((8, 8)), weight=np.ones((8, 8)), name=f"r{i}"
        )
        paths.append(tmp_path / f"r{i}_residual.fits")
        io.write_residual(paths[-1], res)
    reads = []
    real = products.read_residual

    def counting(path):
        reads.append(path.name)
        return real(path)

    monkeypatch.setattr(products, "read_residual", counting)
    prepared = []
    # room for two residuals (3 images of 8x8 float32 each)
    series = io.ResidualSeries(
        paths, prepare=lambda r: prepared.append(r.name) or r, cache_bytes=2 * 768
    )
    assert len(series) == 4 and not reads  # nothing read yet
    assert [r.data[0, 0] for r in series] == [0, 1, 2, 3]
    assert [r.data[0, 0] for r in series] == [0, 1, 2, 3]
    # the first two stay in memory, the others are read at every pass
    assert reads == [f"r{i}_residual.fits" for i in (0, 1, 2, 3, 2, 3)]
    assert prepared == [f"r{i}_residual" for i in (0, 1, 2, 3, 2, 3)]
    tail = series[1:]
    assert isinstance(tail, io.ResidualSeries) and len(tail) == 3
    assert tail[0] is series[1]  # one cache
    assert series[-1].name == "r3_residual"


def test_atomic_outputs_are_readable_like_normal_files(tmp_path):
    import os
    import stat

    from oasis_core.engine.io import write_text

    write_text(tmp_path / "a.txt", "x\n")
    mode = stat.S_IMODE((tmp_path / "a.txt").stat().st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask
    assert not list(tmp_path.glob(".*.part"))


# --------------------------------------------------------- outputs checked before work


def test_check_outputs_refuses_inputs_links_duplicates_and_unwritable_folders(tmp_path):
    import os

    sci = tmp_path / "sci.fits"
    sci.write_bytes(b"x")
    (tmp_path / "link.fits").hardlink_to(sci)
    (tmp_path / "soft.fits").symlink_to(sci)
    (tmp_path / "a_file").write_text("")
    refused = {
        "sci.fits: the output is one of the inputs": {"output": sci},
        "link.fits: the output is one of the inputs .* through a hard link": {
            "output": tmp_path / "link.fits"
        },
        "soft.fits: the output is one of the inputs": {"output": tmp_path / "soft.fits"},
        "n.fits: the --noise file is also the output": {
            "output": tmp_path / "n.fits",
            "--noise file": tmp_path / "." / "n.fits",
        },
        "the folder .*nowhere of the output does not exist": {
            "output": tmp_path / "nowhere" / "o.fits"
        },
        "a_file is not a folder": {"output": tmp_path / "a_file" / "o.fits"},
        "the output is a folder": {"output": tmp_path},
    }
    for message, outputs in refused.items():
        with pytest.raises(InputError, match=message):
            io.check_outputs(inputs=[sci, None], outputs=outputs)
    io.check_outputs(inputs=[sci], outputs={"output": tmp_path / "o.fits", "--noise": None})
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "a_file",
        "link.fits",
        "sci.fits",
        "soft.fits",
    ]  # the writability test leaves nothing behind
    if os.geteuid() != 0:  # root writes into read-only folders
        (tmp_path / "ro").mkdir(mode=0o555)
        with pytest.raises(InputError, match=r"ro/o.fits: cannot write the output in .*ro"):
            io.check_outputs(inputs=[], outputs=[tmp_path / "ro" / "o.fits"])


# ---------------------------------------------------- header cards that cannot be written


def _raw_card(path, key, text):
    blob = bytearray(path.read_bytes())
    at = blob.index(f"{key:<8}=".encode())
    blob[at : at + 80] = f"{key:<8}= {text:>20}".ljust(80).encode()
    path.write_bytes(bytes(blob))


def test_unwritable_cards_are_dropped_at_read_with_one_warning(tmp_path, caplog):
    path = tmp_path / "f.fits"
    header = fits.Header()
    for key, value in (
        ("CTYPE1", "RA---TAN"),
        ("CTYPE2", "DEC--TAN"),
        ("CRVAL1", 1.0),
        ("CRVAL2", 2.0),
        ("CRPIX1", 4.0),
        ("CRPIX2", 4.0),
        ("CD1_1", -1e-4),
        ("CD2_2", 1e-4),
        ("GAIN", 1.0),
        ("FWHM", 1.0),
        ("OBJECT", "M31"),
    ):
        header[key] = value
    fits.PrimaryHDU(np.ones((8, 8), np.float32), header).writeto(path)
    _raw_card(path, "CRVAL1", "NaN")
    _raw_card(path, "GAIN", "1E999")
    _raw_card(path, "FWHM", "'fast'")  # a string where a number is expected
    with caplog.at_level(logging.WARNING, logger="oasis"):
        frame = io.read_frame(path)
    dropped = [r.getMessage() for r in caplog.records if "cannot be used" in r.getMessage()]
    assert dropped == [
        f"{path}: header cards CRVAL1 = NaN, GAIN = inf cannot be used (unparsable or not "
        "a finite number); dropped, and the WCS with it (the frame is read as having no WCS)"
    ]
    assert frame.wcs is None and frame.gain is None and frame.fwhm is None
    assert frame.header["OBJECT"] == "M31" and "CTYPE1" not in frame.header
    io.write_frame(tmp_path / "out.fits", frame)  # what failed after all the work before
    with fits.open(tmp_path / "out.fits") as hdul:
        hdul.verify("exception")


def test_a_non_positive_gain_is_ignored_and_thin_images_refused(tmp_path, caplog):
    path = tmp_path / "g.fits"
    fits.PrimaryHDU(np.ones((8, 8), np.float32), fits.Header([("GAIN", -2.0)])).writeto(path)
    with caplog.at_level(logging.WARNING, logger="oasis"):
        assert io.read_frame(path).gain is None
    assert f"{path}: header gain -2 (must be > 0): ignored" in caplog.text
    fits.PrimaryHDU(np.ones((3, 128), np.float32)).writeto(tmp_path / "thin.fits")
    with pytest.raises(InputError, match=r"thin.fits: the image is 3x128 pixels; a frame needs"):
        io.read_frame(tmp_path / "thin.fits")


def test_tan_wcs_cards_move_and_rotate_the_frame():
    """One TAN WCS for every simulated frame: a point of the unmoved frame lands at
    ``crpix + shift + R(rotation) (p - crpix)`` of the moved one."""
    import math

    from astropy.io import fits
    from astropy.wcs import WCS

    from oasis_core.engine.headers import tan_wcs_cards

    scale = 0.3 / 3600
    cd = np.array([[-scale, 0.0], [0.0, scale]])
    base = WCS(fits.Header(tan_wcs_cards((101, 121), 150.0, 2.0, cd)))
    moved = WCS(
        fits.Header(tan_wcs_cards((101, 121), 150.0, 2.0, cd, shift=(3.0, -2.0), rotation=30.0))
    )
    p = np.array([[80.0, 20.0]])  # 0-based pixel of the unmoved frame
    centre = np.array([60.0, 50.0])  # 0-based centre of a 121 x 101 frame
    t = math.radians(30.0)
    rot = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
    expected = centre + np.array([3.0, -2.0]) + (p - centre) @ rot.T
    sky = base.all_pix2world(p, 0)
    assert np.allclose(moved.all_world2pix(sky, 0), expected, atol=1e-6)


def test_a_residual_of_frames_with_long_names_writes_without_a_warning(shared_data, tmp_path):
    # the NIRCam pair's names (59 characters) left no room for the cards' comments:
    # astropy warned "Card is too long, comment will be truncated" on every write
    import warnings

    from astropy.io.fits.verify import VerifyWarning

    from oasis_core.contracts.model import Residual

    names = [p.name[:-5] for p in sorted((shared_data / "jwst_nircam").glob("jw0*_stamp.fits"))]
    assert len(names) == 2 and min(len(n) for n in names) > 55
    ones = np.ones((8, 8), np.float32)
    residual = Residual(data=ones, noise=ones, weight=ones, science=names[0], template=names[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error", VerifyWarning)
        io.write_residual(tmp_path / "r.fits", residual)
    back = io.read_residual(tmp_path / "r.fits")
    assert (back.science, back.template) == tuple(names)
