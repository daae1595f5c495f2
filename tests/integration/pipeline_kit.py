"""Helpers for the pipeline engine's tests: a small simulated target, copies of it, the
outputs of a run compared file by file, the processes of a session.

The target (5 frames of 160x160) is the smallest on which every frame subtracts well with
the defaults, so that a test can tell a unit it made fail from one that failed on its own;
its configuration runs L.A.Cosmic once instead of four times (the mask stage's cost).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

__all__ = [
    "CATALOGS",
    "FITS_DIRS",
    "assert_same_outputs",
    "copy_target",
    "make_target",
    "session_processes",
]

#: The catalogs a run writes (text ones compared byte for byte, ECSV ones as tables).
CATALOGS = (
    "sources.txt",
    "filtered_sources.txt",
    "MR_sources.txt",
    "MR_filtered_sources.txt",
    "total_sources.txt",
    "sources.ecsv",
    "filtered_sources.ecsv",
    "MR_sources.ecsv",
    "MR_filtered_sources.ecsv",
)
#: The folders whose FITS outputs are compared array by array.
FITS_DIRS = ("masks", "psf", "aligned", "templates", "residuals")

N_FRAMES = 5
SHAPE = (160, 160)
SEED = 1


def make_target(directory: Path, *, name: str = "t") -> Path:
    """Simulate the small series into ``directory/OASIS`` and unpack it into the target
    ``OASIS/targets/<name>``; return the target's path."""
    from oasis_apps.get import unpack
    from oasis_core.engine.plugins import Registry
    from oasis_core.engine.tree import Target, init_root

    base = init_root(directory)
    frames = base / "simulations" / name / "frames"
    Registry().simulator("native").simulate(
        frames, n_frames=N_FRAMES, shape=SHAPE, seed=SEED, transients=4
    )
    target = Target(base / "targets" / name).create()
    unpack([frames], target)
    target.config_file.write_text("[mask.native]\nniter = 1\n")
    return target.path


def copy_target(source: Path, directory: Path) -> Path:
    """A copy of the target ``source`` (its outputs included) at ``directory/t``."""
    dest = directory / source.name
    shutil.copytree(source, dest, symlinks=True)
    return dest


def _fits_files(target: Path) -> list[str]:
    return sorted(
        str(p.relative_to(target)) for d in FITS_DIRS for p in (target / d).glob("*.fits")
    )


def assert_same_outputs(target: Path, reference: Path) -> None:
    """The text catalogs of ``target`` are byte-identical to ``reference``'s, its ECSV
    catalogs hold the same table, and every FITS output holds the same arrays. (Headers and
    ECSV metadata may differ: they record run times, and the hashes of files that do.)"""
    from astropy.io import fits
    from astropy.table import Table

    for name in CATALOGS:
        got, want = target / "sources" / name, reference / "sources" / name
        assert want.exists(), want
        if name.endswith(".txt"):
            assert got.read_bytes() == want.read_bytes(), f"{got} differs from {want}"
            continue
        a, b = Table.read(got, format="ascii.ecsv"), Table.read(want, format="ascii.ecsv")
        assert a.colnames == b.colnames and len(a) == len(b), name
        for column in b.colnames:
            x, y = np.asarray(a[column]), np.asarray(b[column])
            same = np.array_equal(x, y, equal_nan=x.dtype.kind == "f")  # NaN: no value
            assert same, (name, column)
    files = _fits_files(reference)
    assert _fits_files(target) == files
    for rel in files:
        with fits.open(target / rel) as a, fits.open(reference / rel) as b:
            assert len(a) == len(b), rel
            for ha, hb in zip(a, b, strict=True):
                if hb.data is None:
                    assert ha.data is None, rel
                else:
                    np.testing.assert_array_equal(ha.data, hb.data, err_msg=rel)


def session_processes(sid: int) -> list[tuple[int, str]]:
    """The live processes (not zombies) of session ``sid``: (pid, command line)."""
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[3]) == sid and fields[0] not in ("Z", "X"):
            out.append((int(proc.name), cmdline.replace(b"\0", b" ").decode(errors="replace")))
    return out
