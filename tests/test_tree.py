"""oasis init and oasis get --unpack."""

from __future__ import annotations

import hashlib

import numpy as np
from astropy.io import fits
from astropy.table import Table

from oasis_core.cli import main
from oasis_core.get import unpack
from oasis_core.tree import ROOT_DIRS, TARGET_DIRS, Target


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
    assert set(reasons) == {"notes.txt", "fake.fits", "table.fits"}
    assert "not a FITS file name" in reasons["notes.txt"]
    assert "no SIMPLE card" in reasons["fake.fits"]
    assert real.exists() and hashlib.sha256(real.read_bytes()).hexdigest() == before
    manifest = Table.read(target.configs / "data_manifest.ecsv")
    row = manifest[list(manifest["file"]).index("infile1.fits")]
    assert row["original"] == str(real.resolve()) and row["sha256"] == before
    # again: nothing copied twice
    report = unpack([src], target)
    assert report.copied == [] and len(report.present) == 2


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
