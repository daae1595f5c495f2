"""Running SWarp on images that already share one pixel grid (shared by both backends).

SWarp (Bertin et al. 2002, https://www.astromatic.net/software/swarp; Debian package
``swarp``, program ``SWarp``) resamples images onto an output grid and co-adds them. The
OASIS backends hand it images that are already registered, so this module

* writes each image and its weight map (``WEIGHT_TYPE MAP_WEIGHT``) into the workdir as
  ``in_NNN.fits`` / ``in_NNN.weight.fits``, all with one WCS (see :func:`grid_wcs_header`);
* forces the output grid to that same grid with an output header file ``coadd.head``
  (``NAXIS1``/``NAXIS2`` and the WCS), so the result has the inputs' shape and pixels;
* writes the settings that come from the backend's options into a generated configuration
  file ``oasis.swarp``, or, when the user put a ``default.swarp`` into the workdir (the core
  copies ``TARGET/configs/default.swarp`` there), uses that file instead, and in both cases
  forces on the command line what the backends depend on (:data:`FORCED`: output names,
  weights, combine type, no flux rescaling, no weight rescaling);
* runs the program in the workdir, logs the command and its output to ``swarp.log`` there,
  and reads ``coadd.fits`` and ``coadd.weight.fits`` back as float32 arrays.

A failure (non-zero exit, no output, an output of the wrong shape, a timeout) is a
:class:`~oasis_core.contracts.errors.StageError` whose one-line message names the inputs and quotes
SWarp's own error line (:func:`swarp_error`), with the workdir's ``in_NNN.fits`` names
replaced by the frame or residual names.
"""

from __future__ import annotations

import re
import shlex
import shutil
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from oasis_core.contracts.errors import BackendUnavailable, StageError
from oasis_core.engine.programs import run_program

__all__ = [
    "CONFIG_NAME",
    "FILES",
    "FORCED",
    "INSTALL_HINT",
    "RESAMPLING_TYPES",
    "USER_CONFIG",
    "SwarpImage",
    "SwarpResult",
    "find_program",
    "forced_settings",
    "grid_settings",
    "grid_wcs_header",
    "output_header_text",
    "run_swarp",
    "swarp_command",
    "swarp_config",
    "swarp_error",
    "upper_case",
]

#: The user's configuration file (copied into the workdir by the core when present).
USER_CONFIG = "default.swarp"
#: The configuration file the backends generate from their options.
CONFIG_NAME = "oasis.swarp"
#: Fixed file names in the workdir (SWarp runs there, so commands hold only these names).
FILES: Mapping[str, str] = {
    "output": "coadd.fits",
    "weight": "coadd.weight.fits",
    "head": "coadd.head",
    "log": "swarp.log",
}
#: SWarp's resampling kernels.
RESAMPLING_TYPES = ("NEAREST", "BILINEAR", "LANCZOS2", "LANCZOS3", "LANCZOS4")

#: Keys always given on the command line (after ``-c``), whatever the configuration file
#: says: the backends read these outputs and rely on this arithmetic.
FORCED: Mapping[str, str] = {
    "IMAGEOUT_NAME": FILES["output"],
    "WEIGHTOUT_NAME": FILES["weight"],
    "HEADEROUT_NAME": FILES["head"],  # the output grid (shape and WCS)
    "HEADER_SUFFIX": ".head",
    "HEADER_ONLY": "N",
    "COMBINE": "Y",
    "WEIGHT_TYPE": "MAP_WEIGHT",
    "RESCALE_WEIGHTS": "N",  # the weights are already what the backend means
    "FSCALASTRO_TYPE": "NONE",  # frames are photometrically matched: no flux scaling
    "FSCALE_KEYWORD": "OASNOFSC",  # a keyword no input has
    "FSCALE_DEFAULT": "1.0",
    "RESAMPLE_DIR": ".",
    "VMEM_DIR": ".",
    "DELETE_TMPFILES": "Y",
    "WRITE_XML": "N",
    "VERBOSE_TYPE": "QUIET",
}

INSTALL_HINT = "install it with `apt-get install swarp`"

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_NOISE_LINES = ("default.swarp not found", "FITS header data read in")


def upper_case(value: Any) -> Any:
    """Option converter: SWarp keywords in capitals, whatever case the user wrote."""
    return value.strip().upper() if isinstance(value, str) else value


def grid_settings(resampling: str, nthreads: int, subtract_back: bool) -> dict[str, str]:
    """The ``oasis.swarp`` settings both backends share: images already on one grid
    (no sub-pixels, no interpolation), saturated pixels already weight 0."""
    return {
        "RESAMPLE": "Y",
        "RESAMPLING_TYPE": resampling,
        "OVERSAMPLING": "1",
        "INTERPOLATE": "N",
        "SUBTRACT_BACK": "Y" if subtract_back else "N",
        "BLANK_BADPIXELS": "N",
        "CELESTIAL_TYPE": "NATIVE",
        "SATLEV_KEYWORD": "OASNOSAT",
        "SATLEV_DEFAULT": "1e30",
        "NTHREADS": str(nthreads),
    }


def find_program(binary: str, where: str) -> str:
    """The SWarp program to run: ``binary``, else ``SWarp`` or ``swarp`` on PATH.

    Parameters
    ----------
    binary : str
        A program name or path; ``""`` searches PATH for ``SWarp`` then ``swarp``.
    where : str
        The option table, e.g. ``"combine.swarp"`` (named in the message).

    Returns
    -------
    str
        The absolute path of the program.

    Raises
    ------
    oasis_core.contracts.errors.BackendUnavailable
        When the program is not found; the message says how to install it.
    """
    names = [binary] if binary else ["SWarp", "swarp"]
    for name in names:
        found = shutil.which(name)
        if found is not None:
            return str(Path(found).resolve())
    stage, _, backend = where.partition(".")
    if binary:
        what = "not found" if "/" in binary else "not on PATH"
        missing = f"program {binary!r} {what}"
    else:
        missing = "program 'SWarp' (or 'swarp') not on PATH"
    msg = (
        f"{stage} backend {backend!r}: {missing}; {INSTALL_HINT} or set "
        f'[{where}] binary = "/path/to/SWarp"'
    )
    raise BackendUnavailable(msg)


# ------------------------------------------------------------------ configuration


def swarp_config(settings: Mapping[str, str], *, title: str = "") -> str:
    """The text of a SWarp configuration file holding ``settings`` (``KEY value`` lines).

    Examples
    --------
    >>> print(swarp_config({"SUBTRACT_BACK": "N", "NTHREADS": "0"}), end="")
    # SWarp configuration generated by OASIS
    SUBTRACT_BACK          N
    NTHREADS               0
    """
    lines = [f"# SWarp configuration generated by OASIS{': ' + title if title else ''}"]
    lines += [f"{key:<22} {value}" for key, value in settings.items()]
    return "\n".join(lines) + "\n"


def forced_settings(combine_type: str, weight_files: Sequence[str]) -> dict[str, str]:
    """:data:`FORCED` plus the combine type and the weight map list."""
    return {
        **FORCED,
        "COMBINE_TYPE": combine_type,
        "WEIGHT_IMAGE": ",".join(weight_files),
    }


def swarp_command(
    program: str, inputs: Sequence[str], *, config: str, forced: Mapping[str, str]
) -> list[str]:
    """The command line: ``program inputs... -c config -KEY value...``.

    Parameters
    ----------
    program : str
        The program to run.
    inputs : sequence of str
        Input image names (relative to the workdir).
    config : str
        The configuration file (:data:`USER_CONFIG` or :data:`CONFIG_NAME`).
    forced : mapping
        Settings given on the command line, which take precedence over the file.

    Examples
    --------
    >>> swarp_command("SWarp", ["in_000.fits"], config="oasis.swarp",
    ...               forced={"COMBINE_TYPE": "MEDIAN"})
    ['SWarp', 'in_000.fits', '-c', 'oasis.swarp', '-COMBINE_TYPE', 'MEDIAN']
    """
    command = [program, *inputs, "-c", config]
    for key, value in forced.items():
        command += [f"-{key}", str(value)]
    return command


# ------------------------------------------------------------------------ the grid


def grid_wcs_header(headers: Sequence[Any], shape: tuple[int, int]) -> tuple[Any, str]:
    """The WCS every input and the output get, and where it comes from.

    The inputs are registered on one pixel grid, so they must all get one WCS: the first
    header's celestial WCS when it has one and every other header either has none or one
    that maps the grid's corners and centre to the same pixels within 0.01 px (the align
    stage copies the reference's WCS into each frame); else a synthetic TAN WCS
    (1 arcsec pixels centred on RA 180, Dec 0), since bare headers are common (ISIS).

    Parameters
    ----------
    headers : sequence of astropy.io.fits.Header
        The inputs' headers, first = the grid's.
    shape : tuple of int
        ``(ny, nx)`` of the grid.

    Returns
    -------
    header : astropy.io.fits.Header
        WCS cards only.
    source : str
        ``"own"`` or ``"synthetic"`` and, for a synthetic WCS chosen because the headers
        disagree, the reason (``"synthetic: ..."``).
    """
    grid = _GridWcs(shape)
    for header in headers:
        grid.add(header)
    return grid.header(), grid.source


class _GridWcs:
    """:func:`grid_wcs_header` one header at a time (for inputs written as they come):
    :meth:`add` says whether the choice changed from the first header's WCS."""

    def __init__(self, shape: tuple[int, int]) -> None:
        self.shape = shape
        self.ref: Any = None
        self.source = "own"
        self.n = 0

    def add(self, header: Any) -> bool:
        from oasis_core.engine.io import header_wcs

        self.n += 1
        if self.n == 1:
            self.ref = header_wcs(header)
            return False
        if self.ref is None:
            return False
        wcs = header_wcs(header)
        if wcs is None:
            return False
        ny, nx = self.shape
        xs = np.array([0.0, nx - 1.0, 0.0, nx - 1.0, (nx - 1) / 2.0])
        ys = np.array([0.0, 0.0, ny - 1.0, ny - 1.0, (ny - 1) / 2.0])
        try:
            world = wcs.celestial.wcs_pix2world(xs, ys, 0)
            px, py = self.ref.celestial.wcs_world2pix(world[0], world[1], 0)
            off = float(np.nanmax(np.hypot(px - xs, py - ys)))
        except Exception as err:  # wcslib raises many types on odd WCS; keep the cause
            off, why = float("inf"), f"{type(err).__name__}: {err}"
        else:
            why = f"{off:.3g} px"
        if off <= 0.01:
            return False
        self.source = f"synthetic: input {self.n - 1}'s WCS differs from input 0's by {why}"
        self.ref = None
        return True

    def header(self) -> Any:
        from astropy.wcs import WCS

        ny, nx = self.shape
        if self.ref is None:
            wcs = WCS(naxis=2)
            wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
            wcs.wcs.crval = [180.0, 0.0]
            wcs.wcs.crpix = [(nx + 1) / 2.0, (ny + 1) / 2.0]
            wcs.wcs.cd = np.array([[-1.0 / 3600.0, 0.0], [0.0, 1.0 / 3600.0]])
            if self.source == "own":
                self.source = "synthetic"
            return wcs.to_header()
        header = self.ref.celestial.to_header(relax=True)
        for key in ("DATE-OBS", "MJD-OBS", "MJDREF", "DATEREF", "MJD-AVG", "DATE-AVG"):
            header.remove(key, ignore_missing=True, remove_all=True)
        return header


def output_header_text(wcs_header: Any, shape: tuple[int, int]) -> str:
    """The ``coadd.head`` text fixing SWarp's output grid: NAXIS1/2 and the WCS cards."""
    ny, nx = shape
    cards = [f"{'NAXIS':<8}= {2:>20}", f"{'NAXIS1':<8}= {nx:>20}", f"{'NAXIS2':<8}= {ny:>20}"]
    cards += [str(card).rstrip() for card in wcs_header.cards]
    return "\n".join([*cards, "END"]) + "\n"


# ----------------------------------------------------------------------- errors


def swarp_error(stderr: str, stdout: str = "") -> str:
    """SWarp's own message from its output: the last line naming an error (with CFITSIO's
    status line when there is one), else the last meaningful line (``> WARNING: ...``),
    without the ``>`` prefix and colour codes.

    Examples
    --------
    >>> swarp_error("> WARNING: x\\n\\nFITSIO status = 108\\n> *Error*: in_001.fits not found\\n")
    '*Error*: in_001.fits not found (FITSIO status = 108)'
    >>> swarp_error("\\n> COMBINE_TYPE set to an unknown keyword\\n\\n")
    'COMBINE_TYPE set to an unknown keyword'
    """
    for text in (stderr, stdout):
        lines = []
        for raw in _ANSI.sub("", text or "").replace("\r", "\n").splitlines():
            line = raw.strip().lstrip(">").strip()
            if line and not any(n in line for n in _NOISE_LINES):
                lines.append(line)
        errors = [line for line in lines if "error" in line.lower()]
        if errors:
            fitsio = [line for line in lines if line.startswith("FITSIO status")]
            said = errors[-1]
            if fitsio and fitsio[-1] != said:
                said = f"{said} ({fitsio[-1]})"
            return said[:300]
        if lines:
            return lines[-1][:300]
    return "(no output)"


# -------------------------------------------------------------------------- running


@attrs.frozen(kw_only=True)
class SwarpImage:
    """One input of a SWarp run.

    Attributes
    ----------
    name : str
        The frame's or residual's name (used in messages and the log).
    data, weight : ndarray
        Pixels and weight map (``MAP_WEIGHT``: 0 excludes a pixel).
    header : astropy.io.fits.Header or None
        The input's own header, for its WCS (see :func:`grid_wcs_header`).
    cards : mapping
        Cards SWarp may read from the input (e.g. ``GAIN``); None values are skipped.
    """

    name: str
    data: np.ndarray = attrs.field(eq=False, repr=False)
    weight: np.ndarray = attrs.field(eq=False, repr=False)
    header: Any = attrs.field(eq=False, repr=False, default=None)
    cards: Mapping[str, Any] = attrs.field(factory=dict)


@attrs.frozen(kw_only=True)
class SwarpResult:
    """What one SWarp run produced.

    Attributes
    ----------
    data, weight : ndarray
        ``coadd.fits`` and ``coadd.weight.fits`` as float32.
    header : astropy.io.fits.Header
        SWarp's output header.
    command : str
        The command line as run (file names relative to the workdir).
    config : str
        The configuration file used (``default.swarp`` or ``oasis.swarp``).
    wcs : str
        Where the inputs' WCS came from (see :func:`grid_wcs_header`).
    seconds : float
        Run time of the program.
    """

    data: np.ndarray = attrs.field(eq=False, repr=False)
    weight: np.ndarray = attrs.field(eq=False, repr=False)
    header: Any = attrs.field(eq=False, repr=False)
    command: str
    config: str
    wcs: str
    seconds: float


def _names(names: Sequence[str], limit: int = 4) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown if len(names) <= limit else f"{shown}, ... ({len(names)} in all)"


def _with_names(message: str, names: Sequence[str]) -> str:
    """Follow each ``in_NNN[.weight].fits`` of the workdir with its input's name."""

    def name(match: re.Match[str]) -> str:
        i = int(match.group(1))
        label = names[i] if i < len(names) else "?"
        return f"{match.group(0)} ({label!r})"

    return re.sub(r"in_(\d{3,})(?:\.weight)?\.fits", name, message)


def run_swarp(
    program: str,
    images: Iterable[SwarpImage],
    *,
    settings: Mapping[str, str],
    combine_type: str,
    workdir: Path,
    where: str,
    timeout: float = 0.0,
) -> SwarpResult:
    """Co-add ``images`` (one shape, registered) with SWarp on their own grid.

    Parameters
    ----------
    program : str
        The SWarp program (see :func:`find_program`).
    images : iterable of SwarpImage
        The inputs; ``weight`` 0 excludes a pixel. Non-finite pixels get weight 0. Each
        is written to the workdir as it comes, so a generator (e.g. of residuals read one
        at a time) keeps one input in memory, not all of them.
    settings : mapping
        Settings from the backend's options, written to ``oasis.swarp``; ignored (the
        user's file holds its own) when ``workdir/default.swarp`` exists.
    combine_type : str
        SWarp's ``COMBINE_TYPE``, forced.
    workdir : Path
        Scratch directory; SWarp runs there.
    where : str
        Start of every error message, e.g. ``"combine backend 'swarp'"``.
    timeout : float
        Seconds before SWarp is stopped; 0 waits forever.

    Returns
    -------
    SwarpResult

    Raises
    ------
    oasis_core.contracts.errors.StageError
        When SWarp cannot be started, fails, times out or writes no usable output.
    """
    from astropy.io import fits

    # the names up front when the inputs are a sequence; else those seen so far
    known = isinstance(images, Sequence)
    names: list[str] = [im.name for im in images] if isinstance(images, Sequence) else []
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    inputs: list[str] = []
    weights: list[str] = []
    cards: list[Mapping[str, Any]] = []
    shape: tuple[int, ...] = ()
    grid: _GridWcs | None = None
    wcs_header: Any = None
    first = ""

    def write(i: int, data: np.ndarray, weight: np.ndarray, extra: Mapping[str, Any]) -> None:
        header = wcs_header.copy()
        for key, value in extra.items():
            if value is not None:
                header[key] = value
        fits.PrimaryHDU(data, header).writeto(workdir / inputs[i], overwrite=True)
        fits.PrimaryHDU(weight, wcs_header).writeto(workdir / weights[i], overwrite=True)

    for i, im in enumerate(images):  # one input at a time, written as it comes
        if not known:
            names.append(im.name)
        if grid is None:
            shape, first = im.data.shape, im.name
            grid = _GridWcs(shape)
        elif im.data.shape != shape:
            msg = (
                f"{where}: {_names(names)}: {im.name!r} has shape {im.data.shape}, "
                f"{first!r} has {shape}; the inputs must be registered on one grid"
            )
            raise StageError(msg)
        changed = grid.add(im.header)
        wcs_header = grid.header()
        if changed:  # the inputs already written get the synthetic grid too
            for j in range(i):
                data = np.asarray(fits.getdata(workdir / inputs[j]), np.float32)
                weight = np.asarray(fits.getdata(workdir / weights[j]), np.float32)
                write(j, data, weight, cards[j])
        data = np.asarray(im.data, np.float32)
        weight = np.asarray(im.weight, np.float32)
        finite = np.isfinite(data) & np.isfinite(weight) & (weight > 0)
        data = np.where(finite, data, np.float32(0))
        weight = np.where(finite, weight, np.float32(0))
        inputs.append(f"in_{i:03d}.fits")
        weights.append(f"in_{i:03d}.weight.fits")
        cards.append(dict(im.cards))
        write(i, data, weight, cards[i])
        del data, weight, finite
    if grid is None:
        raise StageError(f"{where}: nothing to combine")
    where = f"{where}: {_names(names)}"
    wcs_source = grid.source
    (workdir / FILES["head"]).write_text(output_header_text(wcs_header, shape))

    user = (workdir / USER_CONFIG).is_file()
    config = USER_CONFIG if user else CONFIG_NAME
    if not user:
        (workdir / CONFIG_NAME).write_text(swarp_config(settings, title=where))
    forced = forced_settings(combine_type, weights)
    command = swarp_command(program, inputs, config=config, forced=forced)
    shown = shlex.join(["SWarp", *command[1:]])
    for key in ("output", "weight"):
        (workdir / FILES[key]).unlink(missing_ok=True)  # a stale output is no output

    start = time.perf_counter()
    proc = run_program(
        command, cwd=workdir, where=where, label="SWarp", timeout=timeout, shown=shown
    )
    seconds = time.perf_counter() - start
    (workdir / FILES["log"]).write_text(
        f"# {shown}\n# config: {config}; inputs: "
        + ", ".join(f"{n}={name}" for n, name in zip(inputs, names, strict=True))
        + f"\n# exit code {proc.returncode} after {seconds:.2f} s\n"
        + f"--- stdout\n{proc.stdout}--- stderr\n{proc.stderr}"
    )

    said = _with_names(swarp_error(proc.stderr, proc.stdout), names)
    if proc.returncode != 0:
        msg = f"{where}: SWarp exited with code {proc.returncode}: {said!r}"
        raise StageError(msg, metadata={"command": shown, "returncode": proc.returncode})
    missing = [FILES[k] for k in ("output", "weight") if not (workdir / FILES[k]).is_file()]
    if missing:
        msg = f"{where}: SWarp exited 0 but wrote no {' or '.join(missing)}: {said!r}"
        raise StageError(msg, metadata={"command": shown})
    try:
        with fits.open(workdir / FILES["output"], memmap=False) as hdul:
            data, out_header = hdul[0].data, hdul[0].header
        with fits.open(workdir / FILES["weight"], memmap=False) as hdul:
            out_weight = hdul[0].data
    except (OSError, ValueError, TypeError, IndexError) as err:
        raise StageError(f"{where}: cannot read SWarp's output ({err})") from err
    for label, array in (("image", data), ("weight map", out_weight)):
        if array is None or array.shape != shape:
            got = None if array is None else array.shape
            msg = (
                f"{where}: SWarp wrote a {got} {label} for {shape} inputs (does "
                f"{config} set a grid the forced {FILES['head']} cannot override?)"
            )
            raise StageError(msg, metadata={"command": shown})
    return SwarpResult(
        data=np.asarray(data, np.float32),
        weight=np.asarray(out_weight, np.float32),
        header=out_header,
        command=shown,
        config=config,
        wcs=wcs_source,
        seconds=round(seconds, 3),
    )
