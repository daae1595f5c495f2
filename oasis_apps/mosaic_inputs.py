"""The inputs of a mosaic (:mod:`oasis_apps.mosaic`): files, directories, glob patterns, or a
target's aligned frames or residuals.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from pathlib import Path

from oasis_core.contracts.errors import InputError
from oasis_core.engine import io
from oasis_core.engine.tree import Target, find_target

__all__ = ["KINDS", "resolve_inputs"]

KINDS = ("frames", "residuals")
_GLOB_CHARS = set("*?[")


def _fits_in(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file() and io.is_fits_name(p))


def _looks_like_target(directory: Path) -> bool:
    return any((directory / sub).is_dir() for sub in ("data", "aligned", "residuals"))


def _target_inputs(target: Target, kind: str) -> list[Path]:
    if kind == "residuals":
        where = target.stage_dir("subtract")
        found = sorted(where.glob("*_residual.fits")) if where.is_dir() else []
        if not found:
            raise InputError(
                f"{where}: no *_residual.fits to mosaic; run `oasis subtract {target.path}` first"
            )
        return found
    for where in (target.stage_dir("align"), target.data):
        if where.is_dir() and (found := _fits_in(where)):
            return found
    raise InputError(
        f"{target.path}: no frames in aligned/ or data/ to mosaic; copy some in with "
        "`oasis get --unpack`"
    )


def _expand(spec: str | os.PathLike[str]) -> list[Path]:
    path = Path(spec)
    if path.is_file():
        return [path]
    if path.is_dir():
        found = _fits_in(path)
        if not found:
            raise InputError(f"{path}: no FITS files in this directory")
        return found
    if _GLOB_CHARS & set(str(spec)):
        found = sorted(Path(p) for p in glob.glob(os.fspath(spec)) if Path(p).is_file())
        if not found:
            raise InputError(f"{spec}: no file matches this pattern")
        return found
    raise InputError(f"{path}: no such file")


def resolve_inputs(
    inputs: Sequence[str | os.PathLike[str]] | str | os.PathLike[str] | Target,
    *,
    kind: str = "frames",
) -> list[Path]:
    """The files to mosaic.

    Parameters
    ----------
    inputs : sequence of paths, or a target
        Files, directories (their FITS files) or glob patterns; or one target (a
        :class:`~oasis_core.engine.tree.Target`, its directory, or its name under
        ``./OASIS/targets``). From a target, ``kind="frames"`` takes ``aligned/`` (or
        ``data/`` before alignment) and ``kind="residuals"`` takes
        ``residuals/*_residual.fits``.
    kind : {"frames", "residuals"}
        What to take from a target.

    Returns
    -------
    list of Path
        Without duplicates, in the order given (sorted within a directory or pattern).

    Raises
    ------
    InputError
        When ``kind`` is unknown, a file is missing, or nothing is found.
    """
    if kind not in KINDS:
        raise InputError(f"mosaic: kind {kind!r} is not one of {', '.join(KINDS)}")
    if isinstance(inputs, Target):
        return _target_inputs(inputs, kind)
    if isinstance(inputs, (str, os.PathLike)):
        path = Path(inputs)
        if path.is_dir() and _looks_like_target(path):
            return _target_inputs(Target(path), kind)
        if path.exists() or _GLOB_CHARS & set(str(inputs)):
            return _expand(inputs)
        return _target_inputs(find_target(str(inputs)), kind)
    specs = list(inputs)
    if len(specs) == 1:
        return resolve_inputs(specs[0], kind=kind)
    paths: list[Path] = []
    for spec in specs:
        paths.extend(_expand(spec))
    unique = list(dict.fromkeys(p.resolve() for p in paths))
    if not unique:
        raise InputError("mosaic: no input files given")
    return unique
