"""Bringing frames into a target: ``oasis get --unpack``.

Frames are *copied* (never moved) into ``data/``; each original path and its SHA-256 are
recorded in ``configs/data_manifest.ecsv``. Every file is read in full, data included, by the
core's own frame reader (:func:`oasis_core.engine.io.read_frame`) before it is copied, so what the
pipeline would refuse never enters ``data/``: a file that is not FITS, is empty, holds no 2-D
image, is truncated (fewer data bytes than its header declares; a file lacking only the final
block padding holds every pixel and is accepted) or has no finite pixel is refused with a
one-line reason. Files found in a folder whose names are not FITS names (logs, notes) are
skipped. Downloading from the LCO archive is :mod:`oasis_apps.lco` (``--mode dl``).
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterable
from pathlib import Path

import attrs

from oasis_core.contracts.errors import InputError
from oasis_core.engine import io
from oasis_core.engine.tree import Target

__all__ = ["UnpackReport", "unpack"]

log = logging.getLogger("oasis")


@attrs.frozen
class UnpackReport:
    """What :func:`unpack` did: files copied, already there, refused (with the one-line
    reason) and skipped (found in a folder, not named like FITS files)."""

    copied: list[Path]
    present: list[Path]
    refused: list[tuple[Path, str]]
    skipped: list[Path] = attrs.field(factory=list)


def _candidates(sources: Iterable[Path]) -> list[tuple[Path, bool]]:
    """Every file to consider, and whether it was named (not found in a folder)."""
    out: list[tuple[Path, bool]] = []
    for src in sources:
        src = Path(src)
        if src.is_dir():
            out.extend((p, False) for p in sorted(src.rglob("*")) if p.is_file())
        elif src.exists():
            out.append((src, True))
        else:
            raise InputError(f"{src}: no such file or directory")
    return out


def _why_not_image(path: Path) -> str | None:
    """Why ``path`` is not a frame the pipeline can use, or None. The data are read."""
    if not io.is_fits_name(path):
        return "not a FITS file name (.fits, .fit, .fts, .fz)"
    try:
        with open(path, "rb") as fh:
            head = fh.read(30)
    except OSError as err:
        return f"cannot be read ({err.strerror})"
    if not head:
        return "the file is empty"
    if not head.startswith(b"SIMPLE  =") and not path.name.lower().endswith(".gz"):
        return "not a FITS file (no SIMPLE card)"
    try:
        io.read_frame(path, warn=False)  # the pipeline's own reader and checks, data included
    except InputError as err:
        return str(err).removeprefix(f"{path}: ")
    return None


def unpack(sources: Iterable[Path], target: Target) -> UnpackReport:
    """Copy the FITS frames found in ``sources`` (files or directories) into ``target``.

    Parameters
    ----------
    sources : iterable of Path
        Files or directories (searched recursively).
    target : Target
        Created if needed.

    Returns
    -------
    UnpackReport
        A file is refused (one warning line each, naming it and why) when it is not a
        frame the pipeline can read: not FITS, empty, truncated, without a 2-D image or
        without a finite pixel. Files found in a folder whose names are not FITS names are
        skipped.

    Raises
    ------
    InputError
        A source does not exist, or ``data/`` already holds a different file of that name.
    """
    from astropy.table import Table

    target.create()
    manifest_path = target.configs / "data_manifest.ecsv"
    manifest = (
        Table.read(manifest_path, format="ascii.ecsv")
        if manifest_path.exists()
        else Table(names=("file", "original", "sha256", "copied"), dtype=(str, str, str, str))
    )
    known = {str(r["file"]): str(r["sha256"]) for r in manifest}
    copied, present, refused, skipped = [], [], [], []
    for path, named in _candidates(sources):
        if not named and not io.is_fits_name(path):
            skipped.append(path)
            log.debug("%s: skipped (not a FITS file name)", path)
            continue
        reason = _why_not_image(path)
        if reason:
            refused.append((path, reason))
            log.warning("%s: refused: %s", path, reason)
            continue
        digest = io.sha256(path)
        dest = target.data / path.name
        if dest.exists():
            if known.get(dest.name) == digest or io.sha256(dest) == digest:
                present.append(dest)
                continue
            raise InputError(f"{path}: {dest} already exists with different content")
        with io.atomic_write(dest) as tmp:
            shutil.copyfile(path, tmp)
        manifest.add_row(
            (dest.name, str(path.resolve()), digest, time.strftime("%Y-%m-%dT%H:%M:%S"))
        )
        copied.append(dest)
    if copied:
        io.write_table(manifest, manifest_path)
    return UnpackReport(copied, present, refused, skipped)
