"""Running SExtractor and PSFEx: finding the programs, building their command lines,
reading their catalogs and turning their failures into one-line errors.

Both programs are driven entirely from the command line (``-KEY value``), with ``-c`` naming
the user's configuration file when the target provides one (``configs/default.sex`` or
``configs/default.psfex``, copied into the backend's workdir by the core) and ``/dev/null``
otherwise, so that a stray ``default.sex`` in the working directory is never read by
accident. Keys are split in two groups:

* *forced* keys, which the backend depends on (catalog name and type, parameter file,
  weight maps, gain, PSF file...), are always passed and so override the user's file;
* *tunable* keys, derived from the backend's options (thresholds, filter, deblending...),
  are passed only when the user gave no configuration file: a user's file rules them.

A user's ``default.param`` is merged with the parameters the backend reads (the backend's
own entries win over a user's entry of the same name, e.g. a different ``VIGNET`` size);
a user's ``default.conv`` replaces the generated Gaussian filter, which is otherwise written
as ``default.conv`` (marked as generated), the name a user's ``default.sex`` usually gives.
"""

from __future__ import annotations

import math
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from oasis_core.contracts.errors import BackendUnavailable, StageError
from oasis_core.engine.programs import run_program as run_process

__all__ = [
    "CONV_NAME",
    "GENERATED",
    "INSTALL_HINT",
    "NULL_CONFIG",
    "command_line",
    "error_line",
    "find_program",
    "gaussian_kernel",
    "is_user_file",
    "merge_parameters",
    "provide_conv",
    "read_ldac",
    "run_program",
    "write_conv",
    "write_image",
]

#: How to get the programs (Debian / Ubuntu package names).
INSTALL_HINT = "install them with `apt-get install source-extractor psfex`"

#: Second line of the filter files the backends write (tells them from a user's).
GENERATED = "# oasis: "

#: The detection filter's file name (SExtractor's default ``FILTER_NAME``).
CONV_NAME = "default.conv"

#: The configuration file passed with ``-c`` when the user gave none.
NULL_CONFIG = "/dev/null"

#: Names tried on PATH for each program when its ``*_binary`` option is empty.
DEFAULT_NAMES: Mapping[str, tuple[str, ...]] = {
    "sextractor": ("source-extractor", "sex"),
    "psfex": ("psfex",),
}

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def find_program(program: str, binary: str, *, where: str, option_key: str) -> str:
    """Resolve the program to run: ``binary`` (a name on PATH or a path) or the defaults.

    Parameters
    ----------
    program : str
        ``"sextractor"`` or ``"psfex"``.
    binary : str
        The option's value; ``""`` tries :data:`DEFAULT_NAMES` on PATH in turn.
    where : str
        Who asks, e.g. ``"psf backend 'psfex'"`` (starts the error message).
    option_key : str
        The option to name in the fix, e.g. ``"psf.psfex.sextractor_binary"``.

    Returns
    -------
    str
        Absolute path of the executable.

    Raises
    ------
    BackendUnavailable
        When the program is not found.
    """
    names = (binary,) if binary else DEFAULT_NAMES[program]
    for name in names:
        found = shutil.which(name)
        if found is not None:
            return str(Path(found).resolve())
    tried = " or ".join(repr(n) for n in names)
    what = "not found" if binary and "/" in binary else "not on PATH"
    msg = f"{where}: program {tried} {what}; {INSTALL_HINT}, or set {option_key}"
    raise BackendUnavailable(msg)


def _fmt(value: Any) -> str:
    """A configuration value as SExtractor / PSFEx read it on the command line."""
    if isinstance(value, bool):
        return "Y" if value else "N"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list | tuple):
        return ",".join(_fmt(v) for v in value)
    return str(value)


def command_line(
    program: str,
    inputs: Sequence[str],
    *,
    forced: Mapping[str, Any],
    tunable: Mapping[str, Any],
    user_config: str | None,
) -> list[str]:
    """The argument vector of one SExtractor or PSFEx run.

    Parameters
    ----------
    program : str
        The executable.
    inputs : sequence of str
        The input file names (image or catalog).
    forced : mapping
        Keys the backend depends on, always passed.
    tunable : mapping
        Keys from the options, passed only when ``user_config`` is None.
    user_config : str or None
        The user's configuration file name (passed with ``-c``); None: ``-c /dev/null``.

    Returns
    -------
    list of str

    Examples
    --------
    >>> command_line("sex", ["a.fits"], forced={"CATALOG_NAME": "a.cat"},
    ...              tunable={"FILTER": True}, user_config=None)
    ['sex', 'a.fits', '-c', '/dev/null', '-FILTER', 'Y', '-CATALOG_NAME', 'a.cat']
    >>> command_line("sex", ["a.fits"], forced={"CATALOG_NAME": "a.cat"},
    ...              tunable={"FILTER": True}, user_config="default.sex")
    ['sex', 'a.fits', '-c', 'default.sex', '-CATALOG_NAME', 'a.cat']
    """
    args = [program, *inputs, "-c", user_config or NULL_CONFIG]
    keys: dict[str, Any] = {} if user_config else dict(tunable)
    keys.update(forced)
    for key, value in keys.items():
        args += [f"-{key}", _fmt(value)]
    return args


def error_line(*texts: str) -> str:
    """The program's own error message: the last line mentioning an error, else the last
    non-empty line (terminal escape codes and the ``>`` prompt removed)."""
    for text in texts:
        lines = [_ANSI.sub("", line).strip(" >\t\r") for line in (text or "").splitlines()]
        lines = [line for line in lines if line]
        if not lines:
            continue
        errors = [line for line in lines if "error" in line.lower()]
        return (errors or lines)[-1][:300]
    return "(no output)"


def run_program(
    args: Sequence[str],
    *,
    cwd: Path,
    where: str,
    label: str,
    outputs: Iterable[str],
    timeout: float,
) -> subprocess.CompletedProcess[str]:
    """Run one program in ``cwd``; check it exits 0 and writes ``outputs``.

    Parameters
    ----------
    args : sequence of str
        Argument vector (``args[0]`` the executable).
    cwd : Path
        Working directory (file names in ``args`` are relative to it).
    where : str
        The unit of work, e.g. ``"psf backend 'psfex': frame 'a'"``.
    label : str
        The program's name in messages (``"SExtractor"``, ``"PSFEx"``).
    outputs : iterable of str
        Files (relative to ``cwd``) the run must produce; stale copies are removed first.
    timeout : float
        Seconds; 0 means no limit.

    Returns
    -------
    subprocess.CompletedProcess

    Raises
    ------
    StageError
        When the program cannot start, times out, exits non-zero or writes no output;
        the message ends with the program's own last error line.
    """
    outputs = list(outputs)
    for name in outputs:
        (cwd / name).unlink(missing_ok=True)
    shown = shlex.join([Path(args[0]).name, *args[1:]])
    proc = run_process(args, cwd=cwd, where=where, label=label, timeout=timeout, shown=shown)
    if proc.returncode != 0:
        msg = (
            f"{where}: {label} exited with code {proc.returncode}: "
            f"{error_line(proc.stderr, proc.stdout)!r}"
        )
        raise StageError(msg, metadata={"command": shown, "returncode": proc.returncode})
    missing = [name for name in outputs if not (cwd / name).is_file()]
    if missing:
        msg = (
            f"{where}: {label} exited 0 but wrote no {' or '.join(missing)}: "
            f"{error_line(proc.stderr, proc.stdout)!r}"
        )
        raise StageError(msg, metadata={"command": shown})
    return proc


def _param_name(entry: str) -> str:
    """``"FLUX_APER(1)"`` -> ``"FLUX_APER"``."""
    return entry.split("(", 1)[0].strip().upper()


def merge_parameters(needed: Sequence[str], user_text: str | None = None) -> list[str]:
    """The catalog parameters: ``needed`` plus the user's extra ones.

    Parameters
    ----------
    needed : sequence of str
        Parameters the backend reads, e.g. ``["X_IMAGE", "VIGNET(25,25)"]``.
    user_text : str, optional
        The text of a user's ``default.param`` (``#`` comments allowed, one parameter
        per line); its entries whose name the backend already asks for (whatever the
        size in brackets) are dropped.

    Returns
    -------
    list of str

    Examples
    --------
    >>> merge_parameters(["X_IMAGE", "VIGNET(25,25)"], "VIGNET(9,9)\\nCLASS_STAR  # s/g\\n")
    ['X_IMAGE', 'VIGNET(25,25)', 'CLASS_STAR']
    """
    out = list(needed)
    seen = {_param_name(p) for p in needed}
    for raw in (user_text or "").splitlines():
        entry = raw.split("#", 1)[0].strip()
        if not entry:
            continue
        entry = entry.split()[0]
        name = _param_name(entry)
        if name not in seen:
            seen.add(name)
            out.append(entry)
    return out


def gaussian_kernel(fwhm: float) -> np.ndarray:
    """A Gaussian detection filter of the given FWHM, +-1 FWHM wide (at least 3 x 3),
    peak 1 (SExtractor normalises it, ``CONV NORM``)."""
    sigma = fwhm / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    half = max(1, math.ceil(fwhm))
    r = np.arange(-half, half + 1, dtype=np.float64)
    return np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2.0 * sigma * sigma))


def write_conv(path: Path, kernel: np.ndarray, comment: str = "") -> None:
    """Write ``kernel`` as a SExtractor filter file (``CONV NORM``), marked as generated
    (its second line starts with :data:`GENERATED`)."""
    lines = ["CONV NORM", f"{GENERATED}{comment}"]
    lines += [" ".join(f"{v:.6f}" for v in row) for row in np.asarray(kernel, np.float64)]
    Path(path).write_text("\n".join(lines) + "\n")


def is_user_file(workdir: Path, name: str) -> bool:
    """True when ``workdir / name`` is there and is the user's (not a filter file the
    backend generated, see :func:`write_conv`)."""
    path = Path(workdir) / name
    if not path.is_file():
        return False
    with open(path, errors="replace") as fh:
        head = [fh.readline(), fh.readline()]
    return not head[1].startswith(GENERATED)


def provide_conv(workdir: Path, kernel: np.ndarray, comment: str) -> bool:
    """Make ``workdir/default.conv`` the detection filter: the user's when they gave one,
    else ``kernel`` (written under the name SExtractor looks for by default, so that a
    user's ``default.sex`` naming ``default.conv`` finds it). Returns True for the user's."""
    if is_user_file(workdir, CONV_NAME):
        return True
    write_conv(Path(workdir) / CONV_NAME, kernel, comment)
    return False


def write_image(path: Path, array: np.ndarray) -> None:
    """Write a float32 image with a minimal header (no WCS: SExtractor works in pixels)."""
    from astropy.io import fits

    fits.PrimaryHDU(np.asarray(array, dtype=np.float32)).writeto(path, overwrite=True)


def read_ldac(path: Path) -> tuple[dict[str, np.ndarray], Any]:
    """Read a FITS_LDAC catalog.

    Parameters
    ----------
    path : Path

    Returns
    -------
    columns : dict of str to ndarray
        The ``LDAC_OBJECTS`` columns (native byte order; float columns as float64).
    header : astropy.io.fits.Header
        The image header SExtractor stored in ``LDAC_IMHEAD`` (with its ``SEXBKGND``,
        ``SEXBKDEV``... cards); empty when the catalog has none.

    Raises
    ------
    OSError, ValueError, KeyError
        When the file is not a FITS_LDAC catalog.
    """
    from astropy.io import fits

    with fits.open(path, memmap=False) as hdul:
        objects = None
        header = fits.Header()
        for hdu in hdul[1:]:
            name = hdu.header.get("EXTNAME", "")
            if name == "LDAC_IMHEAD" and len(hdu.data):
                cards = np.asarray(hdu.data[0][0]).ravel()
                text = "".join(str(c).ljust(80)[:80] for c in cards)
                header = fits.Header.fromstring(text)
            elif name == "LDAC_OBJECTS":
                objects = hdu
        if objects is None:
            raise KeyError(f"{path.name}: no LDAC_OBJECTS table")
        columns: dict[str, np.ndarray] = {}
        for name in objects.columns.names:
            array = np.asarray(objects.data[name])
            kind = np.float64 if array.dtype.kind == "f" else array.dtype.newbyteorder("=")
            columns[name] = array.astype(kind)
    return columns, header
