"""Fixtures of the sextractor plugin tests: LDAC catalogs written by hand and stand-in
programs (Python scripts) that act as SExtractor / PSFEx without them being installed."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits


def write_ldac(path: Path, columns: dict, header_cards: dict | None = None) -> Path:
    """Write a FITS_LDAC catalog as SExtractor does: an image header stored as a table of
    80-character cards (``LDAC_IMHEAD``), then the objects (``LDAC_OBJECTS``)."""
    head = fits.Header()
    head["NAXIS1"] = 64
    for key, value in (header_cards or {}).items():
        head[key] = value
    cards = np.array([str(c).ljust(80) for c in head.cards])
    imhead = fits.BinTableHDU.from_columns(
        [
            fits.Column(
                name="Field Header Card",
                format=f"{cards.size * 80}A",
                dim=f"(80, {cards.size})",
                array=cards[None],
            )
        ],
        name="LDAC_IMHEAD",
    )
    cols = []
    for name, values in columns.items():
        arr = np.asarray(values)
        if arr.ndim == 1:
            fmt = {"i": "J", "f": "D"}[arr.dtype.kind]
            cols.append(fits.Column(name=name, format=f"1{fmt}", array=arr))
        else:
            n = int(np.prod(arr.shape[1:]))
            cols.append(fits.Column(name=name, format=f"{n}E", array=arr.reshape(len(arr), n)))
    objects = fits.BinTableHDU.from_columns(cols, name="LDAC_OBJECTS")
    fits.HDUList([fits.PrimaryHDU(), imhead, objects]).writeto(path, overwrite=True)
    return path


FAKE = """#!{python}
# a stand-in for {name}: logs its arguments, then acts as the mode says
import json, os, shutil, sys
args = sys.argv[1:]
with open({log!r}, "a") as fh:
    fh.write(json.dumps({{"cwd": os.getcwd(), "args": args}}) + "\\n")
mode = {mode!r}
def val(key):
    return args[args.index(key) + 1]
if mode == "fail":
    sys.stderr.write("\\x1b[1M> \\n----- started\\n")
    sys.stderr.write("> *Error*: cannot open frame.fits: corrupt\\n\\n")
    sys.exit(2)
if mode == "silent":
    sys.stderr.write("> WARNING: nothing to do\\n")
    sys.exit(0)
# 'copy': copy prepared outputs into place
outputs = json.loads({outputs!r})
if "-CATALOG_NAME" in args:
    name = val("-CATALOG_NAME")
    source = outputs.get(args[0] + ":" + name, outputs.get(name))
    shutil.copyfile(source, name)
else:  # psfex: the .psf beside the catalog, the XML
    for name, source in outputs.items():
        shutil.copyfile(source, name)
"""


@pytest.fixture
def fake_program(tmp_path, monkeypatch):
    """Install stand-in programs first on PATH. ``install(name, mode, outputs)`` writes
    ``bin/name``; its calls are logged (``calls(name)`` returns them)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")

    def install(name: str, mode: str = "copy", outputs: dict | None = None) -> Path:
        path = bindir / name
        path.write_text(
            FAKE.format(
                python=sys.executable,
                name=name,
                log=str(tmp_path / f"{name}.log"),
                mode=mode,
                outputs=json.dumps({k: str(v) for k, v in (outputs or {}).items()}),
            )
        )
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        return path

    def calls(name: str) -> list[dict]:
        log = tmp_path / f"{name}.log"
        if not log.exists():
            return []
        return [json.loads(line) for line in log.read_text().splitlines()]

    install.calls = calls  # type: ignore[attr-defined]
    return install


def option_value(args: list[str], key: str) -> str | None:
    """The value following ``-KEY`` in an argument vector (None when absent)."""
    flag = f"-{key}"
    return args[args.index(flag) + 1] if flag in args else None
