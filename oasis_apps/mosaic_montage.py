"""Running MontagePy for a mosaic (:mod:`oasis_apps.mosaic`): the inputs staged with a
header Montage reads, then its steps (image tables, common header, reprojection,
background matching, co-addition) in a scratch directory, each checked.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from oasis_core.contracts.errors import BackendUnavailable, InputError, StageError
from oasis_core.engine import io

__all__ = [
    "COMBINE_MODES",
    "Staged",
    "check_result",
    "import_montage",
    "montage_header",
    "montage_version",
    "run_montage",
    "stage_input",
    "unique_names",
    "workspace",
]

log = logging.getLogger("oasis")


#: ``combine`` name -> Montage mAdd ``coadd`` code.
COMBINE_MODES = {"mean": 0, "median": 1}


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
class Staged:
    source: Path
    name: str
    staged: Path
    scale: float  # deg / pixel
    bunit: str
    filter: str


def stage_input(path: Path, index: int, directory: Path) -> Staged:
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
    return Staged(
        source=path,
        name=frame.name,
        staged=staged,
        scale=scale,
        bunit=str(frame.header.get("BUNIT", "")).strip(),
        filter=str(frame.header.get("FILTER", "")).strip(),
    )


def import_montage() -> Any:
    try:
        import MontagePy.main as montage
    except ImportError as err:
        raise BackendUnavailable(
            f"mosaic: MontagePy is not installed ({err}); install the mosaic extra: "
            "pip install 'oasis-dia[mosaic]'"
        ) from err
    return montage


def montage_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"MontagePy=={version('MontagePy')}"
    except PackageNotFoundError:
        return "MontagePy"


def check_result(result: Mapping[str, Any], step: str) -> Mapping[str, Any]:
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


def unique_names(staged: Sequence[Staged]) -> list[str]:
    names = [s.name for s in staged]
    if len(set(names)) == len(names):
        return names
    return [f"{i}_{n}" for i, n in enumerate(names)]


def run_montage(
    montage: Any,
    staged: list[Staged],
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
    found = check_result(montage.mImgtbl(str(raw), str(raw_tbl)), "mImgtbl")
    if int(found.get("count", 0)) != len(staged):
        raise StageError(
            f"mosaic: MontagePy mImgtbl accepted {found.get('count')} of {len(staged)} inputs "
            f"({found.get('badwcs', 0)} with a WCS it cannot use)"
        )
    scale = min(s.scale for s in staged)
    check_result(montage.mMakeHdr(str(raw_tbl), str(hdr), pixelScale=scale), "mMakeHdr")
    check_result(
        montage.mProjExec(str(raw), str(raw_tbl), str(hdr), projdir=str(proj)), "mProjExec"
    )
    for s in staged:
        if not (proj / f"hdu0_{s.staged.name}").exists():
            raise StageError(f"{s.source}: MontagePy mProjExec could not reproject this input")
    check_result(montage.mImgtbl(str(proj), str(proj_tbl)), "mImgtbl (projected)")

    corrections: dict[str, float] = {}
    overlaps = 0
    add_dir, add_tbl = proj, proj_tbl
    if background_match and len(staged) > 1:
        diffs_tbl, fits_tbl, corr_tbl = work / "diffs.tbl", work / "fits.tbl", work / "corr.tbl"
        overlaps = int(
            check_result(montage.mOverlaps(str(proj_tbl), str(diffs_tbl)), "mOverlaps")["count"]
        )
        if overlaps == 0:
            log.warning("mosaic: no two inputs overlap; backgrounds left as they are")
        else:
            fitted = check_result(
                montage.mDiffFitExec(str(proj), str(diffs_tbl), str(hdr), str(diff), str(fits_tbl)),
                "mDiffFitExec",
            )
            if int(fitted.get("fit_failed", 0)) or int(fitted.get("diff_failed", 0)):
                log.warning(
                    "mosaic: MontagePy mDiffFitExec could not fit %s of %s overlaps",
                    int(fitted.get("fit_failed", 0)) + int(fitted.get("diff_failed", 0)),
                    overlaps,
                )
            check_result(montage.mBgModel(str(proj_tbl), str(fits_tbl), str(corr_tbl)), "mBgModel")
            check_result(
                montage.mBgExec(str(proj), str(proj_tbl), str(corr_tbl), str(corr)), "mBgExec"
            )
            # the tables name files by absolute path when given absolute directories
            by_file = {r["cntr"]: Path(r["fname"]).name for r in _read_table(proj_tbl)}
            by_staged = {
                f"hdu0_{s.staged.name}": name
                for s, name in zip(staged, unique_names(staged), strict=True)
            }
            for row in _read_table(corr_tbl):
                name = by_staged.get(by_file.get(row["id"], ""))
                if name is not None:
                    corrections[name] = float(row["c"])
            add_dir, add_tbl = corr, work / "corr_images.tbl"
            check_result(montage.mImgtbl(str(corr), str(add_tbl)), "mImgtbl (corrected)")
    out = work / "mosaic.fits"
    check_result(
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
def workspace(workdir: Path | None) -> Iterator[Path]:
    """A fresh directory for one run: inside ``workdir`` (kept) or a temporary one."""
    if workdir is not None:
        Path(workdir).mkdir(parents=True, exist_ok=True)
        yield Path(tempfile.mkdtemp(prefix="mosaic-", dir=workdir))
        return
    with tempfile.TemporaryDirectory(prefix="oasis-mosaic-") as tmp:
        yield Path(tmp)
