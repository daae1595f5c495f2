"""Bad input: one-line errors or warnings naming the file, and inputs never changed."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
from astropy.io import fits

from oasis_apps.cli import main
from oasis_core.contracts.errors import InputError
from oasis_core.engine.pipeline import mask
from oasis_core.engine.tree import Target
from tests.conftest import checksums


@pytest.fixture
def target(tmp_path, sim_frames):
    paths, _ = sim_frames
    t = Target(tmp_path / "OASIS" / "targets" / "bad").create()
    for p in paths:
        shutil.copyfile(p, t.data / p.name)
    return t


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_bad_files_are_named_and_left_unchanged(target, caplog):
    (target.data / "notes.txt").write_text("seeing was bad")
    (target.data / "garbage.fits").write_bytes(b"\x00" * 5000)
    fits.PrimaryHDU(np.full((256, 256), np.nan, np.float32)).writeto(target.data / "nan.fits")
    fits.PrimaryHDU(np.zeros((0,), np.float32)).writeto(target.data / "empty.fits")
    small = fits.getdata(next(target.data.glob("sim_000*")))[:200, :180]
    fits.PrimaryHDU(small).writeto(target.data / "small.fits")
    before = checksums(sorted(target.data.iterdir()))
    with caplog.at_level(logging.WARNING, logger="oasis"):
        mask(target.path, jobs=2)
    messages = _warnings(caplog)
    for name, why in [
        ("notes.txt", "not a FITS file name"),
        ("garbage.fits", "not a readable FITS file"),
        ("nan.fits", "every pixel is NaN"),
        ("empty.fits", "no 2-D image"),
        ("small.fits", "shape (200, 180) differs"),
    ]:
        hits = [m for m in messages if str(target.data / name) in m and why in m]
        assert hits, f"no warning naming {name} ({why}) in {messages}"
        assert all("\n" not in m for m in hits)
    assert checksums(sorted(target.data.iterdir())) == before
    weights = sorted(p.name for p in (target.path / "masks").glob("*.weight.fits"))
    assert "nan.weight.fits" not in weights and "sim_000.weight.fits" in weights


def test_missing_header_key_falls_back_with_a_warning(target, caplog):
    path = next(target.data.glob("sim_001*"))
    with fits.open(path, mode="update") as hdul:
        del hdul[0].header["GAIN"]
    with caplog.at_level(logging.WARNING, logger="oasis"):
        mask(target.path, jobs=1)
    assert any(str(path) in m and "no GAIN (backends estimate" in m for m in _warnings(caplog))
    assert (target.path / "masks" / "sim_001.weight.fits").exists()


def test_too_few_usable_frames_is_an_error(target, capsys):
    for p in sorted(target.data.glob("*.fits"))[2:]:
        p.unlink()
    with pytest.raises(InputError, match=r"only 2 usable frame\(s\)"):
        mask(target.path, jobs=1)
    assert main(["psf", str(target.path), "-q"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and str(target.path) in err[-1]


def test_unknown_backend_on_the_command_line(target, capsys):
    assert main(["mask", str(target.path), "--mask", "nope", "-q"]) == 1
    err = capsys.readouterr().err
    assert "error: mask backend 'nope' is not installed; installed: native" in err


def test_stage_without_its_inputs_says_what_to_run(target, capsys):
    mask(target.path, jobs=1)
    assert main(["align", str(target.path), "-q"]) == 1
    assert "run `oasis psf` first" in capsys.readouterr().err
