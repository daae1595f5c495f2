"""oasis init and oasis get --unpack."""

from __future__ import annotations

import hashlib
import logging

import numpy as np
from astropy.io import fits
from astropy.table import Table

from oasis_apps.cli import main
from oasis_apps.get import unpack
from oasis_core.engine.tree import ROOT_DIRS, TARGET_DIRS, Target


def test_init_creates_tree_and_config(tmp_path):
    assert main(["init", str(tmp_path), "--target", "m31"]) == 0
    for name in ROOT_DIRS:
        assert (tmp_path / "OASIS" / name).is_dir()
    target = tmp_path / "OASIS" / "targets" / "m31"
    for name in TARGET_DIRS:
        assert (target / name).is_dir()
    text = (target / "configs" / "oasis.toml").read_text()
    assert 'backend = "ois"' in text


def test_unpack_copies_records_and_refuses(tmp_path, shared_data, capsys):
    src = tmp_path / "incoming"
    src.mkdir()
    (src / "notes.txt").write_text("observing log")
    (src / "fake.fits").write_text("not really FITS")
    (src / "table.fits").write_bytes(b"")
    fits.HDUList([fits.PrimaryHDU(np.ones((8, 8), np.float32))]).writeto(src / "ok.fits")
    fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(np.ones((8, 8), np.float32))]).writeto(
        src / "packed.fits.fz"
    )
    real = shared_data / "isis_example" / "infile1.fits"
    before = hashlib.sha256(real.read_bytes()).hexdigest()
    target = Target(tmp_path / "OASIS" / "targets" / "t")
    report = unpack([src, real], target)
    assert sorted(p.name for p in report.copied) == ["infile1.fits", "ok.fits", "packed.fits.fz"]
    reasons = {p.name: r for p, r in report.refused}
    assert set(reasons) == {"fake.fits", "table.fits"}
    assert [p.name for p in report.skipped] == ["notes.txt"]  # found in a folder: not a frame
    assert "no SIMPLE card" in reasons["fake.fits"]
    assert reasons["table.fits"] == "the file is empty"
    assert real.exists() and hashlib.sha256(real.read_bytes()).hexdigest() == before
    manifest = Table.read(target.configs / "data_manifest.ecsv")
    row = manifest[list(manifest["file"]).index("infile1.fits")]
    assert row["original"] == str(real.resolve()) and row["sha256"] == before
    # again: nothing copied twice
    report = unpack([src], target)
    assert report.copied == [] and len(report.present) == 2


def _image_bytes(data, *, weight=None) -> bytes:
    import io as pyio

    hdus = [fits.PrimaryHDU(np.asarray(data, np.float32))]
    if weight is not None:
        hdus.append(fits.ImageHDU(np.asarray(weight, np.float32), name="WEIGHT"))
        hdus[-1].header["WEIGHT"] = "Y"
    buf = pyio.BytesIO()
    fits.HDUList(hdus).writeto(buf)
    return buf.getvalue()


def test_unpack_reads_the_data_and_refuses_bad_frames(tmp_path, shared_data, caplog):
    """A truncated file and a frame without a finite pixel are refused in one line each;
    a file lacking only its final block padding (the ISIS frames) holds every pixel and is
    copied."""
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    good = _image_bytes(rng.normal(100, 5, (64, 64)))
    data_end = 2880 + 64 * 64 * 4  # one header block, then the pixels; padding after
    assert len(good) > data_end
    (src / "nopad.fits").write_bytes(good[:data_end])  # every pixel, no final padding
    (src / "short.fits").write_bytes(good[: data_end - 4])  # one pixel missing
    (src / "header_only.fits").write_bytes(good[:2880])
    two = _image_bytes(rng.normal(100, 5, (64, 64)), weight=np.ones((64, 64)))
    (src / "short_weight.fits").write_bytes(two[: len(two) - 2880 - 100])  # in the WEIGHT HDU
    nan = np.full((64, 64), np.nan)
    nan[3, 3] = np.inf
    (src / "nan.fits").write_bytes(_image_bytes(nan))
    (src / "notes.fits").write_bytes(b"SIMPLE  = oops, an observing log")
    isis = shared_data / "isis_example" / "infile2.fits"
    assert isis.stat().st_size % 2880 != 0  # the shared frames lack their final padding
    target = Target(tmp_path / "OASIS" / "targets" / "t")
    with caplog.at_level(logging.WARNING, logger="oasis"):
        report = unpack([src, isis], target)
    assert sorted(p.name for p in report.copied) == ["infile2.fits", "nopad.fits"]
    reasons = {p.name: r for p, r in report.refused}
    assert sorted(reasons) == [
        "header_only.fits",
        "nan.fits",
        "notes.fits",
        "short.fits",
        "short_weight.fits",
    ]
    assert reasons["short.fits"].startswith(
        "truncated: HDU 0 declares 16384 bytes of data but the file stops 4 bytes short"
    )
    assert "pixels missing, not just the final padding" in reasons["short.fits"]
    assert "stops 16384 bytes short" in reasons["header_only.fits"]
    assert reasons["short_weight.fits"].startswith("truncated: HDU 1 declares 16384 bytes")
    assert reasons["nan.fits"] == "every pixel is NaN or infinite"
    # one warning line per refused file, naming it
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == len(reasons)
    for path, reason in report.refused:
        assert f"{path}: refused: {reason}" in lines
    assert all("\n" not in line for line in lines)
    assert sorted(p.name for p in target.data.iterdir()) == ["infile2.fits", "nopad.fits"]
    copied = fits.getdata(target.data / "nopad.fits")
    assert copied.shape == (64, 64) and np.isfinite(copied).all()


def test_get_cli_exits_1_when_a_file_is_refused(tmp_path, shared_data, capsys):
    bad = tmp_path / "bad.fits"
    bad.write_bytes(_image_bytes(np.full((32, 32), np.nan)))
    isis = shared_data / "isis_example" / "infile4.fits"
    argv = ["get", "--unpack", str(bad), str(isis), "--target", "t", "--root", str(tmp_path)]
    assert main(argv) == 1
    out, err = capsys.readouterr()
    assert "1 copied, 0 already there, 1 refused" in out
    lines = err.strip().splitlines()
    assert lines[0] == f"warning: {bad}: refused: every pixel is NaN or infinite"
    assert lines[-1].startswith("error: oasis get: 1 file(s) refused") and len(lines) == 2
    assert [p.name for p in (tmp_path / "OASIS/targets/t/data").iterdir()] == ["infile4.fits"]


def test_get_cli_needs_a_mode_and_reports(tmp_path, shared_data, capsys):
    # neither frames nor a mode: say what to give
    assert main(["get", "--target", "x", "--root", str(tmp_path)]) == 1
    assert "--mode unpack" in capsys.readouterr().err
    # --mode unpack without frames
    assert main(["get", "--mode", "unpack", "--target", "x", "--root", str(tmp_path)]) == 1
    assert "give the frames" in capsys.readouterr().err
    # frames given: they are copied (the unpack mode)
    args = ["get", str(shared_data / "decam_n6"), "--target", "x", "--root", str(tmp_path)]
    assert main(args) == 0
    assert "10 copied" in capsys.readouterr().out
    assert (
        main(
            [
                "get",
                "--unpack",
                str(shared_data / "decam_n6"),
                "--target",
                "decam",
                "--root",
                str(tmp_path),
            ]
        )
        == 0
    )
    assert "10 copied" in capsys.readouterr().out
    assert len(list((tmp_path / "OASIS/targets/decam/data").glob("*.fits"))) == 10
