"""Mosaics of frames or residuals with MontagePy (OasisPy's ``MOSAIC``).

:func:`mosaic` reprojects a set of frames (or residuals) onto one sky grid, matches their
backgrounds and co-adds them, with Montage's own steps::

    mImgtbl -> mMakeHdr -> mProjExec -> [mOverlaps -> mDiffFitExec -> mBgModel -> mBgExec]
            -> mAdd

The inputs are read with :func:`oasis_core.engine.io.read_frame` (so the image may sit in an
extension, e.g. ``SCI``) and staged in the scratch directory as plain FITS files: data in
the primary HDU, masked pixels (weight 0) as NaN so that Montage leaves them out, and the
celestial WCS in CD-matrix form (Montage ignores the scale of a ``PC`` matrix). Every input
needs a celestial WCS; distorted ones (TPV, SIP) are handled by Montage.

Units: Montage preserves surface brightness. The mosaic's pixel scale is the finest of the
inputs', so for inputs on that scale a pixel keeps its value (ADU per pixel) and the flux of
a star summed in an aperture is kept too (to the ~1 % of the inputs' own distortion).

Background matching (Montage's mBgModel) removes the *differences* between the inputs'
levels where they overlap (a plane per input: level and slopes); the mean level of the set is
kept, so an offset added to one of N inputs is spread over all of them.

The output FITS holds the mosaic (float32, NaN where no input covers the sky) and a
``WEIGHT`` extension (``WEIGHT = 'Y'``: the covered area of each pixel, 1 = the best-covered
pixels, 0 = none), the provenance cards of :mod:`oasis_core.engine.provenance` (``OASSTAGE =
'mosaic'``, ``OASINn`` per input) and ``HISTORY`` cards listing every input and the background
level removed from it. A PNG preview (asinh stretch of the zscale range) is written next to
it.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from oasis_core.contracts.errors import BackendUnavailable, InputError, StageError
from oasis_core.engine import io
from oasis_core.engine.tree import Target, find_target

__all__ = [
    "COMBINE_MODES",
    "KINDS",
    "MOSAIC",
    "MosaicResult",
    "ask_parameters",
    "default_preview",
    "montage_header",
    "mosaic",
    "resolve_inputs",
    "write_preview",
]

log = logging.getLogger("oasis")

KINDS = ("frames", "residuals")
#: ``combine`` name -> Montage mAdd ``coadd`` code.
COMBINE_MODES = {"mean": 0, "median": 1}

_GLOB_CHARS = set("*?[")


@attrs.frozen(kw_only=True)
class MosaicResult:
    """What :func:`mosaic` made.

    Attributes
    ----------
    output : Path
        The mosaic FITS file.
    preview : Path
        Its PNG preview.
    inputs : tuple of Path
        The frames (or residuals) co-added, in order.
    n_inputs : int
        ``len(inputs)``.
    shape : tuple of int
        ``(ny, nx)`` of the mosaic.
    wcs : str
        One-line summary of the mosaic's WCS: projection, centre, pixel scale, rotation.
    center : tuple of float
        ``(ra, dec)`` of the mosaic's centre [deg].
    pixel_scale : float
        Mosaic pixel scale [arcsec].
    kind : str
        ``"frames"`` or ``"residuals"``.
    background_matched : bool
        Whether the backgrounds were matched (False when asked not to, for one input, or
        when no two inputs overlap).
    corrections : mapping
        Per input name (prefixed with its index when names repeat), the background level
        Montage subtracted (the constant term of the fitted plane); empty without
        background matching.
    meta : mapping
        ``seconds``, ``overlaps`` (pairs of overlapping inputs), ``combine``, ``montage``.
    """

    output: Path
    preview: Path
    inputs: tuple[Path, ...]
    n_inputs: int
    shape: tuple[int, int]
    wcs: str
    center: tuple[float, float]
    pixel_scale: float
    kind: str
    background_matched: bool
    corrections: Mapping[str, float] = attrs.field(factory=dict)
    meta: Mapping[str, float | int | str] = attrs.field(factory=dict)

    def line(self) -> str:
        """One-line summary for the CLI."""
        matched = "backgrounds matched" if self.background_matched else "no background matching"
        return (
            f"{self.output}: {self.n_inputs} {self.kind}, {self.shape[1]}x{self.shape[0]} px, "
            f"{matched}; {self.wcs}; preview {self.preview}"
        )


# --------------------------------------------------------------------------- inputs


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


# --------------------------------------------------------------------------- staging


def montage_header(wcs: Any, shape: tuple[int, int]) -> Any:
    """FITS header of ``wcs`` for Montage: celestial axes only, CD matrix, no PC/CDELT.

    Parameters
    ----------
    wcs : astropy.wcs.WCS
        A celestial WCS (distortions such as TPV or SIP are kept).
    shape : tuple of int
        ``(ny, nx)`` of the image.

    Returns
    -------
    astropy.io.fits.Header
    """
    from astropy.io import fits
    from astropy.wcs import FITSFixedWarning

    cel = wcs.celestial
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        header = cel.to_header(relax=True)
    cd = cel.wcs.cd if cel.wcs.has_cd() else cel.pixel_scale_matrix
    for key in ("PC1_1", "PC1_2", "PC2_1", "PC2_2", "CDELT1", "CDELT2", "CROTA1", "CROTA2"):
        header.remove(key, ignore_missing=True)
    for i in range(2):
        for j in range(2):
            header[f"CD{i + 1}_{j + 1}"] = float(cd[i, j])
    out = fits.Header()
    out["NAXIS"] = 2
    out["NAXIS1"] = int(shape[1])
    out["NAXIS2"] = int(shape[0])
    out.extend(header, update=True)
    return out


@attrs.frozen
class _Staged:
    source: Path
    name: str
    staged: Path
    scale: float  # deg / pixel
    bunit: str
    filter: str


def _stage(path: Path, index: int, directory: Path) -> _Staged:
    from astropy.io import fits
    from astropy.wcs.utils import proj_plane_pixel_scales

    frame = io.read_frame(path, warn=False)
    wcs = frame.wcs
    if wcs is None:
        raise InputError(
            f"{path}: no celestial WCS in the header (CTYPE1/2, CRVAL, CD or CDELT); "
            "a mosaic needs every input placed on the sky: solve its astrometry first "
            "(e.g. astrometry.net)"
        )
    data = np.where(frame.weight > 0, frame.data, np.nan).astype(np.float32)
    header = montage_header(wcs, data.shape)
    staged = directory / f"in{index:03d}.fits"
    fits.PrimaryHDU(data, header).writeto(staged, overwrite=True)
    scale = float(np.mean(np.abs(proj_plane_pixel_scales(wcs.celestial))))
    return _Staged(
        source=path,
        name=frame.name,
        staged=staged,
        scale=scale,
        bunit=str(frame.header.get("BUNIT", "")).strip(),
        filter=str(frame.header.get("FILTER", "")).strip(),
    )


# --------------------------------------------------------------------------- Montage


def _montage() -> Any:
    try:
        import MontagePy.main as montage
    except ImportError as err:
        raise BackendUnavailable(
            f"mosaic: MontagePy is not installed ({err}); install the mosaic extra: "
            "pip install 'oasis-dia[mosaic]'"
        ) from err
    return montage


def _montage_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"MontagePy=={version('MontagePy')}"
    except PackageNotFoundError:
        return "MontagePy"


def _check(result: Mapping[str, Any], step: str) -> Mapping[str, Any]:
    """Raise a one-line StageError when a Montage call reports an error."""
    if str(result.get("status", "1")) != "0":
        msg = result.get("msg", b"")
        if isinstance(msg, bytes):
            msg = msg.decode(errors="replace")
        raise StageError(f"mosaic: MontagePy {step} failed: {str(msg).strip() or 'no message'}")
    return result


def _read_table(path: Path) -> list[dict[str, str]]:
    """Rows of a Montage table (IPAC format; values may hold spaces) as dicts of strings."""
    from astropy.table import Table

    table = Table.read(path, format="ascii.ipac")
    return [{name: str(row[name]).strip() for name in table.colnames} for row in table]


def _run_montage(
    montage: Any,
    staged: list[_Staged],
    work: Path,
    *,
    background_match: bool,
    combine: str,
) -> tuple[Path, Path, dict[str, float], int]:
    """Montage's steps in ``work``; return the mosaic, its area image, the background
    corrections per input name and the number of overlapping pairs."""
    raw, proj, diff, corr = (work / d for d in ("raw", "proj", "diff", "corr"))
    for d in (proj, diff, corr):
        d.mkdir(exist_ok=True)
    raw_tbl, proj_tbl, hdr = work / "raw.tbl", work / "proj.tbl", work / "mosaic.hdr"
    found = _check(montage.mImgtbl(str(raw), str(raw_tbl)), "mImgtbl")
    if int(found.get("count", 0)) != len(staged):
        raise StageError(
            f"mosaic: MontagePy mImgtbl accepted {found.get('count')} of {len(staged)} inputs "
            f"({found.get('badwcs', 0)} with a WCS it cannot use)"
        )
    scale = min(s.scale for s in staged)
    _check(montage.mMakeHdr(str(raw_tbl), str(hdr), pixelScale=scale), "mMakeHdr")
    _check(montage.mProjExec(str(raw), str(raw_tbl), str(hdr), projdir=str(proj)), "mProjExec")
    for s in staged:
        if not (proj / f"hdu0_{s.staged.name}").exists():
            raise StageError(f"{s.source}: MontagePy mProjExec could not reproject this input")
    _check(montage.mImgtbl(str(proj), str(proj_tbl)), "mImgtbl (projected)")

    corrections: dict[str, float] = {}
    overlaps = 0
    add_dir, add_tbl = proj, proj_tbl
    if background_match and len(staged) > 1:
        diffs_tbl, fits_tbl, corr_tbl = work / "diffs.tbl", work / "fits.tbl", work / "corr.tbl"
        overlaps = int(
            _check(montage.mOverlaps(str(proj_tbl), str(diffs_tbl)), "mOverlaps")["count"]
        )
        if overlaps == 0:
            log.warning("mosaic: no two inputs overlap; backgrounds left as they are")
        else:
            fitted = _check(
                montage.mDiffFitExec(str(proj), str(diffs_tbl), str(hdr), str(diff), str(fits_tbl)),
                "mDiffFitExec",
            )
            if int(fitted.get("fit_failed", 0)) or int(fitted.get("diff_failed", 0)):
                log.warning(
                    "mosaic: MontagePy mDiffFitExec could not fit %s of %s overlaps",
                    int(fitted.get("fit_failed", 0)) + int(fitted.get("diff_failed", 0)),
                    overlaps,
                )
            _check(montage.mBgModel(str(proj_tbl), str(fits_tbl), str(corr_tbl)), "mBgModel")
            _check(montage.mBgExec(str(proj), str(proj_tbl), str(corr_tbl), str(corr)), "mBgExec")
            # the tables name files by absolute path when given absolute directories
            by_file = {r["cntr"]: Path(r["fname"]).name for r in _read_table(proj_tbl)}
            by_staged = {
                f"hdu0_{s.staged.name}": name
                for s, name in zip(staged, _unique_names(staged), strict=True)
            }
            for row in _read_table(corr_tbl):
                name = by_staged.get(by_file.get(row["id"], ""))
                if name is not None:
                    corrections[name] = float(row["c"])
            add_dir, add_tbl = corr, work / "corr_images.tbl"
            _check(montage.mImgtbl(str(corr), str(add_tbl)), "mImgtbl (corrected)")
    out = work / "mosaic.fits"
    _check(
        montage.mAdd(
            str(add_dir),
            str(add_tbl),
            str(hdr),
            str(out),
            haveAreas=True,
            coadd=COMBINE_MODES[combine],
        ),
        "mAdd",
    )
    return out, work / "mosaic_area.fits", corrections, overlaps


@contextlib.contextmanager
def _workspace(workdir: Path | None) -> Iterator[Path]:
    """A fresh directory for one run: inside ``workdir`` (kept) or a temporary one."""
    if workdir is not None:
        Path(workdir).mkdir(parents=True, exist_ok=True)
        yield Path(tempfile.mkdtemp(prefix="mosaic-", dir=workdir))
        return
    with tempfile.TemporaryDirectory(prefix="oasis-mosaic-") as tmp:
        yield Path(tmp)


# --------------------------------------------------------------------------- output


def _wcs_summary(header: Any, shape: tuple[int, int]) -> tuple[str, tuple[float, float], float]:
    from astropy.wcs.utils import proj_plane_pixel_scales

    wcs = io.header_wcs(header)
    ny, nx = shape
    ra, dec = (float(v) for v in wcs.wcs_pix2world((nx - 1) / 2, (ny - 1) / 2, 0))
    scale = float(np.mean(proj_plane_pixel_scales(wcs))) * 3600.0
    rot = float(header.get("CROTA2", 0.0))
    ctype = "/".join(wcs.wcs.ctype)
    text = (
        f"{ctype} centre RA {ra:.6f} Dec {dec:+.6f} deg, {scale:.4f} arcsec/px, "
        f"rotation {rot:.3f} deg"
    )
    return text, (ra, dec), scale


def default_preview(output: Path) -> Path:
    """Where the PNG preview of ``output`` goes: same directory, same name, ``.png``."""
    output = Path(output)
    return output.with_name(io.frame_name(output) + ".png")


def write_preview(data: Any, path: Path, *, title: str = "") -> None:
    """Write a PNG of ``data`` (asinh stretch of the zscale range; NaN shown grey).

    Parameters
    ----------
    data : 2-D array
        The image.
    path : Path
        The PNG to write (atomically).
    title : str
        Figure title.
    """
    from astropy.visualization import AsinhStretch, ImageNormalize, ZScaleInterval
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    image = np.asarray(data, dtype=float)
    finite = image[np.isfinite(image)]
    vmin, vmax = ZScaleInterval().get_limits(finite) if finite.size else (0.0, 1.0)
    if not vmax > vmin:
        vmax = vmin + 1.0
    norm = ImageNormalize(vmin=vmin, vmax=vmax, stretch=AsinhStretch(), clip=True)
    ny, nx = image.shape
    width = 7.0
    fig = Figure(figsize=(width, max(2.5, width * ny / nx)), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    cmap = colormaps["gray"].with_extremes(bad="0.5")
    ax.imshow(np.ma.masked_invalid(image), origin="lower", cmap=cmap, norm=norm)
    ax.set_xlabel("x [px]")
    ax.set_ylabel("y [px]")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    with io.atomic_write(path) as tmp:
        fig.savefig(tmp, format="png")


def _common(values: Sequence[str]) -> str:
    return values[0] if values and all(v == values[0] for v in values) else ""


def _unique_names(staged: Sequence[_Staged]) -> list[str]:
    names = [s.name for s in staged]
    if len(set(names)) == len(names):
        return names
    return [f"{i}_{n}" for i, n in enumerate(names)]


def _output_header(
    mosaic_header: Any,
    staged: Sequence[_Staged],
    names: Sequence[str],
    *,
    kind: str,
    combine: str,
    matched: bool,
    corrections: Mapping[str, float],
    scale: float,
) -> Any:
    from astropy.io import fits

    from oasis_core.engine.provenance import Provenance

    header = fits.Header()
    skip = {"SIMPLE", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "EXTEND", "COMMENT", "HISTORY"}
    for card in mosaic_header.cards:
        if card.keyword not in skip:
            header.append(card, end=True)
    if bunit := _common([s.bunit for s in staged]):
        header["BUNIT"] = bunit
    if band := _common([s.filter for s in staged]):
        header["FILTER"] = band
    header["NCOMBINE"] = (len(staged), "inputs co-added")
    header["OASKIND"] = (kind, "mosaic of frames or residuals")
    header["OASCOMB"] = (combine, "co-addition (Montage mAdd)")
    header["OASBGM"] = (matched, "backgrounds matched (Montage mBgModel)")
    prov = Provenance(
        stage="mosaic",
        backend="montage",
        plugin=_montage_version(),
        inputs={n: s.source for n, s in zip(names, staged, strict=True)},
        options={
            "kind": kind,
            "background_match": matched,
            "combine": combine,
            "pixel_scale_deg": scale,
        },
    )
    cards = prov.header_cards()
    history = list(cards.pop("HISTORY"))
    for i, (name, s) in enumerate(zip(names, staged, strict=True), 1):
        history.append(f"mosaic input {i}/{len(staged)}: {s.source}")
        if name in corrections:
            history.append(f"mosaic background {corrections[name]:+.6g} removed from {name}")
    io.apply_cards(header, {**cards, "HISTORY": history})
    return header


def mosaic(
    inputs: Sequence[str | os.PathLike[str]] | str | os.PathLike[str] | Target,
    output: str | os.PathLike[str],
    *,
    kind: str = "frames",
    background_match: bool = True,
    combine: str = "mean",
    workdir: str | os.PathLike[str] | None = None,
) -> MosaicResult:
    """Reproject ``inputs`` onto one sky grid, match their backgrounds and co-add them.

    Parameters
    ----------
    inputs : sequence of paths, or a target
        Frame or residual files (directories and glob patterns are expanded), or a target
        (see :func:`resolve_inputs`).
    output : path
        The mosaic FITS file to write (atomically); a PNG preview goes beside it
        (:func:`default_preview`).
    kind : {"frames", "residuals"}
        What to take from a target; recorded in the header (``OASKIND``).
    background_match : bool
        Match the inputs' background levels and slopes where they overlap (Montage
        mOverlaps, mDiffFitExec, mBgModel, mBgExec) before co-adding.
    combine : {"mean", "median"}
        How overlapping pixels are combined (Montage mAdd; the mean is area-weighted).
    workdir : path, optional
        Scratch space; Montage's tables and intermediate images are kept in a new
        ``mosaic-*`` directory inside it. Default: a temporary directory, removed after.

    Returns
    -------
    MosaicResult

    Raises
    ------
    InputError
        A missing or unreadable input, an input without a celestial WCS, an unknown
        ``kind`` or ``combine``; before any work, ``output`` or its PNG preview being an
        input (or each other) or not writable (:func:`oasis_core.engine.io.check_outputs`).
    BackendUnavailable
        When MontagePy cannot be imported.
    StageError
        When a Montage step fails.
    """
    from astropy.io import fits

    if combine not in COMBINE_MODES:
        raise InputError(f"mosaic: combine {combine!r} is not one of {', '.join(COMBINE_MODES)}")
    paths = resolve_inputs(inputs, kind=kind)
    output = Path(output)
    io.check_outputs(
        inputs=paths, outputs={"output": output, "PNG preview": default_preview(output)}
    )
    start = time.perf_counter()
    with _workspace(Path(workdir) if workdir is not None else None) as work:
        (work / "raw").mkdir()
        staged = [_stage(p, i, work / "raw") for i, p in enumerate(paths)]
        montage = _montage()
        matched = background_match and len(staged) > 1
        image, area_path, corrections, overlaps = _run_montage(
            montage, staged, work, background_match=matched, combine=combine
        )
        matched = matched and overlaps > 0
        with fits.open(image, memmap=False) as hdul:
            data = np.array(hdul[0].data, dtype=np.float32)
            montage_hdr = hdul[0].header.copy()
        with fits.open(area_path, memmap=False) as hdul:
            area = np.nan_to_num(np.array(hdul[0].data, dtype=np.float64), nan=0.0)
    names = _unique_names(staged)
    scale = min(s.scale for s in staged)
    header = _output_header(
        montage_hdr,
        staged,
        names,
        kind=kind,
        combine=combine,
        matched=matched,
        corrections=corrections,
        scale=scale,
    )
    covered = np.isfinite(data) & (area > 0)
    weight = np.where(covered, area / area[covered].max() if covered.any() else 0.0, 0.0)
    whdr = fits.Header()
    whdr["EXTNAME"] = "WEIGHT"
    whdr["WEIGHT"] = ("Y", "this HDU is a weight map (0 = bad pixel)")
    hdul = fits.HDUList(
        [fits.PrimaryHDU(data, header), fits.ImageHDU(weight.astype(np.float32), whdr)]
    )
    with io.atomic_write(output) as tmp:
        hdul.writeto(tmp, overwrite=True)
    preview = default_preview(output)
    summary, center, pixel_scale = _wcs_summary(header, data.shape)
    write_preview(data, preview, title=f"{output.name}: {len(staged)} {kind}")
    seconds = time.perf_counter() - start
    log.info("mosaic: %s from %d %s in %.1f s", output, len(staged), kind, seconds)
    return MosaicResult(
        output=output,
        preview=preview,
        inputs=tuple(paths),
        n_inputs=len(paths),
        shape=(int(data.shape[0]), int(data.shape[1])),
        wcs=summary,
        center=center,
        pixel_scale=pixel_scale,
        kind=kind,
        background_matched=matched,
        corrections=corrections,
        meta={
            "seconds": round(seconds, 3),
            "overlaps": overlaps,
            "combine": combine,
            "montage": _montage_version(),
        },
    )


# --------------------------------------------------------------------------- prompts


def _yes(answer: str) -> bool:
    value = answer.strip().lower()
    if value in ("y", "yes", "true", "1"):
        return True
    if value in ("n", "no", "false", "0"):
        return False
    raise InputError(f"mosaic: answer {answer!r} is not yes or no")


def _default_ask(question: str, default: str) -> str:
    suffix = f" [{default}]" if default else ""
    answer = input(f"-> {question}{suffix}: ").strip()
    return answer or default


def ask_parameters(ask: Callable[[str, str], str] | None = None) -> dict[str, Any]:
    """Prompt for :func:`mosaic`'s parameters (OasisPy's ``MOSAIC`` dialogue).

    Parameters
    ----------
    ask : callable, optional
        ``ask(question, default) -> answer``; default: :func:`input` on the terminal (an
        empty answer takes the default). The CLI passes :func:`typer.prompt`.

    Returns
    -------
    dict
        Keyword arguments for :func:`mosaic`: ``inputs`` (a target, or files and glob
        patterns separated by spaces or commas), ``output``, ``kind``, ``background_match``,
        ``combine``.

    Raises
    ------
    InputError
        When no inputs are given or a yes/no answer is neither.
    """
    ask = ask or _default_ask
    answer = ask("frames to mosaic: a target, or files / patterns (space-separated)", "")
    specs = [s for s in answer.replace(",", " ").split() if s]
    if not specs:
        raise InputError("mosaic: no inputs given; name a target or some FITS files")
    kind = ask("kind of input (frames/residuals)", "frames").strip()
    output = ask("mosaic to write", "mosaic.fits").strip()
    matched = _yes(ask("match the backgrounds (y/n)", "y"))
    combine = ask("combine (mean/median)", "mean").strip()
    inputs: Any = specs[0] if len(specs) == 1 else specs
    return {
        "inputs": inputs,
        "output": Path(output),
        "kind": kind,
        "background_match": matched,
        "combine": combine,
    }


def MOSAIC(ask: Callable[[str, str], str] | None = None) -> MosaicResult:
    """OasisPy's ``MOSAIC()``: ask for every parameter, then run :func:`mosaic`.

    Parameters
    ----------
    ask : callable, optional
        See :func:`ask_parameters`.

    Returns
    -------
    MosaicResult
    """
    return mosaic(**ask_parameters(ask))
