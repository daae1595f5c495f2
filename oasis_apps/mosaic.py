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

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from oasis_apps.mosaic_inputs import KINDS, resolve_inputs
from oasis_apps.mosaic_montage import (
    COMBINE_MODES,
    Staged,
    import_montage,
    montage_header,
    montage_version,
    run_montage,
    stage_input,
    unique_names,
    workspace,
)
from oasis_core.contracts.errors import InputError
from oasis_core.engine import io
from oasis_core.engine.tree import Target

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


def _output_header(
    mosaic_header: Any,
    staged: Sequence[Staged],
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
        plugin=montage_version(),
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
    with workspace(Path(workdir) if workdir is not None else None) as work:
        (work / "raw").mkdir()
        staged = [stage_input(p, i, work / "raw") for i, p in enumerate(paths)]
        montage = import_montage()
        matched = background_match and len(staged) > 1
        image, area_path, corrections, overlaps = run_montage(
            montage, staged, work, background_match=matched, combine=combine
        )
        matched = matched and overlaps > 0
        with fits.open(image, memmap=False) as hdul:
            data = np.array(hdul[0].data, dtype=np.float32)
            montage_hdr = hdul[0].header.copy()
        with fits.open(area_path, memmap=False) as hdul:
            area = np.nan_to_num(np.array(hdul[0].data, dtype=np.float64), nan=0.0)
    names = unique_names(staged)
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
    _write_mosaic(output, data, header, area)
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
            "montage": montage_version(),
        },
    )


def _write_mosaic(output: Path, data: np.ndarray, header: Any, area: np.ndarray) -> None:
    """Write the mosaic with a ``WEIGHT`` extension: each pixel's input area relative to
    the largest (0 where nothing covers it)."""
    from astropy.io import fits

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
