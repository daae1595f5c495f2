"""Bringing frames into a target: ``oasis get --unpack``.

Frames are *copied* (never moved) into ``data/``; each original path and its SHA-256 are
recorded in ``configs/data_manifest.ecsv``. Files that are not images are refused with a one-line
reason each. Downloading from an archive (mode ``dl``) arrives with a later issue.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterable
from pathlib import Path

import attrs

from oasis_core import io
from oasis_core.errors import InputError
from oasis_core.tree import Target

__all__ = ["UnpackReport", "unpack"]

log = logging.getLogger("oasis")


@attrs.frozen
class UnpackReport:
    """What :func:`unpack` did: files copied, already there, and refused with why."""

    copied: list[Path]
    present: list[Path]
    refused: list[tuple[Path, str]]


def _candidates(sources: Iterable[Path]) -> list[Path]:
    out: list[Path] = []
    for src in sources:
        src = Path(src)
        if src.is_dir():
            out.extend(sorted(p for p in src.rglob("*") if p.is_file()))
        elif src.exists():
            out.append(src)
        else:
            raise InputError(f"{src}: no such file or directory")
    return out


def _why_not_image(path: Path) -> str | None:
    if not io.is_fits_name(path):
        return "not a FITS file name (.fits, .fit, .fts, .fz)"
    try:
        with open(path, "rb") as fh:
            head = fh.read(30)
    except OSError as err:
        return f"cannot be read ({err.strerror})"
    if not head.startswith(b"SIMPLE  =") and not path.name.lower().endswith(".gz"):
        return "not a FITS file (no SIMPLE card)"
    try:
        io.read_shape(path)
    except InputError as err:
        return str(err).split(": ", 1)[-1]
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
    copied, present, refused = [], [], []
    for path in _candidates(sources):
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
    return UnpackReport(copied, present, refused)
