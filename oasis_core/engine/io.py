"""Reading frames and writing every output atomically.

Only the core touches files. Frames are read once (data, header, weight from a ``WEIGHT``
or bad-pixel-mask extension, gain / read noise / saturation from the header) and outputs
are written through :func:`atomic_write` (a temporary file in the same directory, then
:func:`os.replace`), so a crash never leaves a half-written file under a final name.

Header defaults
---------------
Read by :func:`oasis_core.engine.headers.header_value` (re-exported here with the other
header functions): ``GAIN``, ``RDNOISE``, ``SATURATE`` or their per-amplifier forms. When
the header has no saturation level and the file stores integers, the largest value the
integer type holds is used (e.g. 65535 for BITPIX
16 with BZERO 32768). A missing key falls back with a warning naming the file.

Mask conventions (OasisPy's)
----------------------------
An extension whose header has ``WEIGHT = 'Y'`` is a weight map (0 = bad); ``WEIGHT = 'N'``
marks a binary mask (non-zero = bad). An extension named ``BPM``, ``MASK`` or ``DQ`` is a
bad-pixel mask (non-zero = bad). Either seeds the frame's weight map; non-finite pixels
always get weight 0.

Header cards
------------
A card whose value cannot be parsed (``CRVAL1 = NaN``) or is not finite (``1e999``) cannot
be written back to a FITS file. :func:`read_frame` drops such cards when it reads the frame,
with one warning naming the file and the cards, so that no output ever inherits them; when
one of them is a WCS card, the whole WCS is dropped (a frame without a WCS, rather than a
wrong one).

Outputs
-------
:func:`check_outputs` is called by every command that writes to paths the user names,
before any work: no output may be an input or another output (the same path after
resolving links, or the same file through a hard link), and each output's folder must
exist and be writable.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from oasis_core.contracts.errors import InputError
from oasis_core.contracts.model import Frame, PsfModel, Residual, Template
from oasis_core.engine.headers import (
    EXPTIME_KEYS,
    GAIN_KEYS,
    RDNOISE_KEYS,
    SATURATE_KEYS,
    TIME_KEYS,
    WCS_KEY_RE,
    apply_cards,
    drop_unusable_cards,
    finite_value,
    header_mjd,
    header_unit,
    header_value,
    header_wcs,
    sanitize_header,
    set_card,
    warn_dropped_cards,
)

__all__ = [
    "EXPTIME_KEYS",
    "FITS_SUFFIXES",
    "GAIN_KEYS",
    "MEASURED_KEYS",
    "MIN_SIDE",
    "RDNOISE_KEYS",
    "SATURATE_KEYS",
    "TIME_KEYS",
    "apply_cards",
    "atomic_write",
    "check_outputs",
    "frame_from_arrays",
    "frame_name",
    "header_mjd",
    "header_unit",
    "header_value",
    "header_wcs",
    "image_extension",
    "is_fits_name",
    "read_frame",
    "read_output_frame",
    "read_psf",
    "read_residual",
    "read_shape",
    "residual_header",
    "sanitize_header",
    "set_card",
    "sha256",
    "write_frame",
    "write_psf",
    "write_residual",
    "write_table",
    "write_text",
]

log = logging.getLogger("oasis")

FITS_SUFFIXES = (".fits", ".fit", ".fts", ".fits.fz", ".fit.fz", ".fz", ".fits.gz", ".fit.gz")
BPM_NAMES = ("BPM", "MASK", "DQ", "BADPIX")

#: The fewest pixels a frame may have along an axis: thinner images are not frames, and the
#: C code of some backends (astroscrappy's median filters) corrupts memory on them.
MIN_SIDE = 4


# Keys under which the core stores what the stages measured.
MEASURED_KEYS = {
    "background": ("OASBKG", "median sky level [ADU]"),
    "noise": ("OASNOISE", "robust sky noise [ADU]"),
    "fwhm": ("FWHM", "PSF full width at half maximum [pix]"),
    "snr": ("OASSNR", "frame S/N figure (median PSF-star peak S/N)"),
}


def is_fits_name(path: Path) -> bool:
    """True when ``path``'s name ends with a FITS suffix (``.fits``, ``.fit``, ``.fz``...)."""
    name = path.name.lower()
    return any(name.endswith(s) for s in FITS_SUFFIXES)


def frame_name(path: Path) -> str:
    """The frame's short name: the file name without its FITS suffixes."""
    name = path.name
    for suffix in sorted(FITS_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@functools.cache
def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it to ``path``.

    On any exception the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with contextlib.suppress(FileNotFoundError):  # mkstemp's 0600: as a normal file
            os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def _identity(path: Path) -> tuple[str, tuple[int, int] | None]:
    """``path`` resolved (links followed) and its ``(st_dev, st_ino)`` when it exists."""
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except OSError:
        return real, None
    return real, (st.st_dev, st.st_ino)


def check_outputs(
    *,
    inputs: Iterable[Path | None],
    outputs: Mapping[str, Path | None] | Iterable[Path | None],
) -> None:
    """Refuse, before any work, output paths that would destroy data or cannot be written.

    Parameters
    ----------
    inputs : iterable of Path
        The files the command reads (``None`` entries are ignored).
    outputs : mapping or iterable of Path
        The files the command writes, optionally by what the user calls them
        (``{"output": p, "--noise": q}``); ``None`` entries are ignored.

    Raises
    ------
    InputError
        When an output is an input or another output (the same path once links are
        resolved, or the same file through a hard link), is a folder, or its folder is
        missing, not a folder or not writable. The message names the path.

    Examples
    --------
    >>> check_outputs(inputs=[Path("sci.fits")], outputs={"output": Path("sci.fits")})
    ... # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    oasis_core.contracts.errors.InputError: sci.fits: the output is one of the inputs ...
    """
    labelled = (
        list(outputs.items()) if isinstance(outputs, Mapping) else [("output", p) for p in outputs]
    )
    seen: list[tuple[str, Path, str, tuple[int, int] | None]] = [
        ("input", Path(p), *_identity(Path(p))) for p in inputs if p is not None
    ]
    for label, out in labelled:
        if out is None:
            continue
        out = Path(out)
        real, inode = _identity(out)
        for kind, other, other_real, other_inode in seen:
            same_file = inode is not None and inode == other_inode
            if real == other_real or same_file:
                how = " through a hard link" if real != other_real else ""
                if kind == "input":
                    raise InputError(
                        f"{out}: the {label} is one of the inputs ({other}){how}; writing "
                        "it would destroy that input: choose another path"
                    )
                raise InputError(
                    f"{out}: the {label} is also the {kind} ({other}){how}; one would "
                    "overwrite the other: choose another path"
                )
        if os.path.isdir(real):
            raise InputError(f"{out}: the {label} is a folder; give a file name")
        folder = Path(real).parent
        if not folder.exists():
            raise InputError(
                f"{out}: the folder {folder} of the {label} does not exist; create it first"
            )
        if not folder.is_dir():
            raise InputError(
                f"{out}: {folder} is not a folder; choose another path for the {label}"
            )
        try:  # the only test that holds for root, read-only mounts and ACLs alike
            fd, probe = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".check", dir=folder)
        except OSError as err:
            raise InputError(
                f"{out}: cannot write the {label} in {folder} ({err.strerror or err}); "
                "choose a writable folder"
            ) from err
        os.close(fd)
        os.unlink(probe)
        seen.append((label, out, real, inode))


def write_text(path: Path, text: str) -> None:
    """Write a text file atomically."""
    with atomic_write(path) as tmp:
        tmp.write_text(text)


def write_table(table: Any, path: Path, *, fmt: str | None = None) -> None:
    """Write an astropy Table atomically (ECSV by default, by suffix otherwise).

    In ECSV, the columns that have no description yet and are named in the catalog
    schema (:data:`oasis_core.engine.sources.CATALOG_COLUMNS`) get its unit and description
    (``table`` itself is not changed), so every catalog carries them whoever built it.
    """
    path = Path(path)
    if fmt is None:
        fmt = "ascii.ecsv" if path.suffix == ".ecsv" else "ascii.fixed_width_two_line"
    if fmt == "ascii.ecsv":
        from oasis_core.engine.sources import describe_columns

        table = describe_columns(table.copy(copy_data=False), missing_only=True)
    with atomic_write(path) as tmp:
        if len(table) == 0 and fmt.startswith("ascii.fixed_width"):
            # astropy cannot size the columns of an empty fixed-width table
            tmp.write_text(" ".join(table.colnames) + "\n")
        else:
            table.write(tmp, format=fmt, overwrite=True)


def _truncation(path: Path) -> str | None:
    """Why ``path`` holds fewer data bytes than its headers declare, or None.

    Only the data count: a file that lacks just the final block padding (the ISIS example
    frames) holds every pixel and passes. Compressed streams (``.gz``) are not measured
    here (their size on disk says nothing); a short stream fails when its data are read.
    """
    from astropy.io import fits

    try:
        with open(path, "rb") as fh:
            if fh.read(4).startswith((b"\x1f\x8b", b"BZh", b"PK\x03\x04")):
                return None  # gzip, bzip2, zip: whatever the file's name
        size = path.stat().st_size
        with warnings.catch_warnings():
            _quiet_fits_warnings()
            # the HDUs as stored: a tile-compressed image is the binary table it is on disk
            with fits.open(path, memmap=False, disable_image_compression=True) as hdul:
                for i, hdu in enumerate(hdul):
                    hdr = hdu.header
                    naxis = int(hdr.get("NAXIS", 0))
                    first = 2 if hdr.get("GROUPS") and hdr.get("NAXIS1") == 0 else 1
                    count = 1
                    for k in range(first, naxis + 1):
                        count *= int(hdr.get(f"NAXIS{k}", 0))
                    items = int(hdr.get("PCOUNT", 0)) + (count if naxis else 0)
                    nbytes = abs(int(hdr.get("BITPIX", 8))) // 8 * int(hdr.get("GCOUNT", 1)) * items
                    short = hdul.fileinfo(i)["datLoc"] + nbytes - size
                    if short > 0:
                        return (
                            f"truncated: HDU {i} declares {nbytes} bytes of data but the file "
                            f"stops {short} bytes short of them (pixels missing, not just the "
                            "final padding); copy or download it again"
                        )
    except (OSError, ValueError, TypeError, IndexError, KeyError):
        return None  # not readable as FITS at all: the caller's own open says why
    return None


def _open(path: Path) -> Any:
    from astropy.io import fits

    why = _truncation(Path(path))
    if why is not None:
        raise InputError(f"{path}: {why}")
    try:
        return fits.open(path, memmap=False)
    except FileNotFoundError as err:
        raise InputError(f"{path}: no such file") from err
    except (OSError, ValueError, TypeError, IndexError) as err:
        raise InputError(f"{path}: not a readable FITS file ({err})") from err


def _image_hdu_index(hdul: Any, path: Path) -> int:
    """Index of the HDU holding the frame: ``SCI`` if present, else the first 2-D image."""
    candidates = []
    for i, hdu in enumerate(hdul):
        if hdu.header.get("NAXIS", 0) == 2 or (
            getattr(hdu, "is_image", False) and hdu.header.get("ZNAXIS", 0) == 2
        ):
            candidates.append(i)
    if not candidates:
        raise InputError(f"{path}: no 2-D image in any HDU")
    for i in candidates:
        if str(hdul[i].header.get("EXTNAME", "")).upper() == "SCI":
            return i
    for i in candidates:
        extname = str(hdul[i].header.get("EXTNAME", "")).upper()
        if extname not in BPM_NAMES and extname not in ("WEIGHT", "NOISE", "ERR", "KERNEL"):
            return i
    return candidates[0]


def _quiet_fits_warnings() -> None:
    """Silence what astropy says about files it can read all the same (missing final
    padding, non-standard cards); call inside ``warnings.catch_warnings()``."""
    from astropy.io.fits.verify import VerifyWarning
    from astropy.utils.exceptions import AstropyUserWarning

    warnings.simplefilter("ignore", VerifyWarning)
    warnings.filterwarnings(
        "ignore", message="File may have been truncated", category=AstropyUserWarning
    )


def read_shape(path: Path) -> tuple[int, int]:
    """Shape (ny, nx) of the frame stored in ``path``, reading headers only."""
    with warnings.catch_warnings():
        _quiet_fits_warnings()
        with _open(path) as hdul:
            hdr = hdul[_image_hdu_index(hdul, path)].header
            nx = hdr.get("ZNAXIS1", hdr.get("NAXIS1"))
            ny = hdr.get("ZNAXIS2", hdr.get("NAXIS2"))
    return int(ny), int(nx)


def _integer_saturation(hdu: Any) -> float | None:
    bitpix = hdu.header.get("ZBITPIX", hdu.header.get("BITPIX"))
    if bitpix not in (8, 16, 32):
        return None
    bzero = float(hdu.header.get("BZERO", 0.0))
    bscale = float(hdu.header.get("BSCALE", 1.0))
    top = {8: 255, 16: 32767, 32: 2147483647}[bitpix]
    return top * bscale + bzero


def _weight_from_extensions(hdul: Any, index: int, shape: tuple[int, int], path: Path) -> Any:
    weight = np.ones(shape, dtype=np.float32)
    for i, hdu in enumerate(hdul):
        if i == index or hdu.data is None or getattr(hdu.data, "ndim", 0) != 2:
            continue
        flag = str(hdu.header.get("WEIGHT", "")).strip().upper()
        extname = str(hdu.header.get("EXTNAME", "")).strip().upper()
        if not flag and extname not in BPM_NAMES:
            continue
        if hdu.data.shape != shape:
            raise InputError(
                f"{path}: extension {extname or i} has shape {hdu.data.shape}, "
                f"the image has {shape}"
            )
        values = np.asarray(hdu.data)
        if flag == "Y":
            weight = np.minimum(weight, np.clip(np.nan_to_num(values, nan=0.0), 0, 1))
        else:  # 'N' or a bad-pixel mask: non-zero = bad
            weight[values != 0] = 0.0
    return weight


def read_frame(
    path: Path, *, weight_path: Path | None = None, name: str | None = None, warn: bool = True
) -> Frame:
    """Read a frame from a FITS (or fpack ``.fz``) file.

    Parameters
    ----------
    path : Path
        The image file. The data are taken from the ``SCI`` extension when there is one,
        else from the first 2-D image HDU.
    weight_path : Path, optional
        A weight-map file (as the mask stage writes) that replaces the weight derived from
        the file's own extensions (the two are combined with a minimum).
    name : str, optional
        The frame's name; defaults to the file name without suffixes.
    warn : bool
        Log a warning naming the file when a header key is missing (once per frame and
        run is enough: the pipeline warns when it first reads a frame).

    Returns
    -------
    Frame
        With ``gain``, ``readnoise``, ``saturation`` from the header and, when the file was
        written by OASIS, the measured ``background``, ``noise``, ``fwhm``, ``snr``.

    Raises
    ------
    InputError
        When the file is not FITS, holds no 2-D image, an image thinner than
        :data:`MIN_SIDE` pixels, or no finite pixel.
    """
    from astropy.io import fits

    path = Path(path)
    with warnings.catch_warnings():
        _quiet_fits_warnings()
        with _open(path) as hdul:
            index = _image_hdu_index(hdul, path)
            hdu = hdul[index]
            try:
                raw = hdu.data
            except (OSError, ValueError, TypeError) as err:
                raise InputError(f"{path}: cannot read the image data ({err})") from err
            _check_image(raw, path)
            data = np.array(raw, dtype=np.float32)  # native byte order, a private copy
            header = hdu.header.copy()
            faults, wcs_dropped = drop_unusable_cards(header)
            if index > 0:
                # keys such as GAIN often live in the primary header only
                primary = hdul[0].header.copy()
                more, more_wcs = drop_unusable_cards(primary)
                faults += [f for f in more if f not in faults]
                wcs_dropped = wcs_dropped or more_wcs
                for card in primary.cards:
                    if (
                        card.keyword
                        and card.keyword not in header
                        and card.keyword
                        not in (
                            "SIMPLE",
                            "EXTEND",
                            "NEXTEND",
                            "BITPIX",
                            "NAXIS",
                            "COMMENT",
                            "HISTORY",
                        )
                    ):
                        header[card.keyword] = (card.value, card.comment)
            weight = _weight_from_extensions(hdul, index, data.shape, path)
            int_sat = _integer_saturation(hdu)
    warn_dropped_cards(path, faults, wcs_dropped)
    if weight_path is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=fits.verify.VerifyWarning)
            extra = np.asarray(fits.getdata(weight_path), dtype=np.float32)
        if extra.shape != data.shape:
            raise InputError(f"{weight_path}: weight map shape {extra.shape} != {data.shape}")
        weight = np.minimum(weight, extra)
    return frame_from_arrays(
        data,
        weight=weight,
        header=header,
        where=path,
        path=path,
        name=name or frame_name(path),
        integer_saturation=int_sat,
        warn=warn,
        copy=False,
    )


def _check_image(data: Any, where: Any) -> None:
    """Refuse what is not a frame: not 2-D, empty, or thinner than :data:`MIN_SIDE`."""
    if data is None or np.size(data) == 0:
        raise InputError(f"{where}: the image is empty")
    if np.ndim(data) != 2:
        raise InputError(
            f"{where}: the image has {np.ndim(data)} dimension(s) {np.shape(data)}; a frame "
            "is a 2-D image"
        )
    if min(np.shape(data)) < MIN_SIDE:
        raise InputError(
            f"{where}: the image is {data.shape[0]}x{data.shape[1]} pixels; a frame "
            f"needs at least {MIN_SIDE} along each axis"
        )


def frame_from_arrays(
    data: Any,
    *,
    weight: Any = None,
    header: Any = None,
    where: Any = "frame",
    path: Path | None = None,
    name: str = "frame",
    integer_saturation: float | None = None,
    warn: bool = True,
    copy: bool = True,
) -> Frame:
    """A frame from its pixels, weight and header: what :func:`read_frame` makes of a file,
    for pixels already in memory (one mechanism for both).

    Parameters
    ----------
    data : array_like
        The 2-D image (copied as float32; the caller's array is never touched).
    weight : array_like, optional
        Weight map in [0, 1] (default 1); non-finite pixels get weight 0 either way.
    header : astropy.io.fits.Header or mapping, optional
        Gives gain, read noise and saturation (see the module doc) and, when OASIS wrote
        it, the measured ``background``, ``noise``, ``fwhm``, ``snr``. Cards that cannot be
        written back are dropped (:func:`sanitize_header`).
    where : str or Path
        What the messages name (the file, or e.g. ``"science (array)"``).
    path : Path, optional
        The file the frame was read from.
    name : str
        The frame's short name.
    integer_saturation : float, optional
        The saturation level implied by the file's integer type, used when the header
        gives none.
    warn : bool
        Log a warning naming ``where`` when a header key is missing.
    copy : bool
        Copy ``data`` and ``weight`` (default); False when they are the caller's own
        private copies (:func:`read_frame`'s).

    Raises
    ------
    InputError
        When the image is not 2-D, is thinner than :data:`MIN_SIDE` pixels, the weight
        map has another shape, no pixel is finite or every pixel is masked.
    """
    from astropy.io import fits

    _check_image(data, where)
    as_array = np.array if copy else np.asarray  # a private copy, native byte order
    data = as_array(data, dtype=np.float32)
    weight = (
        np.ones(data.shape, np.float32) if weight is None else as_array(weight, dtype=np.float32)
    )
    if weight.shape != data.shape:
        raise InputError(f"{where}: weight map shape {weight.shape} != {data.shape}")
    if header is None:
        header = fits.Header()
    elif not isinstance(header, fits.Header):
        header = fits.Header(list(dict(header).items()))
    sanitize_header(header, where)
    finite = np.isfinite(data)
    if not finite.all():
        if not finite.any():
            raise InputError(f"{where}: every pixel is NaN or infinite")
        weight[~finite] = 0.0
    del finite
    if not (weight > 0).any():
        raise InputError(f"{where}: every pixel is masked")

    gain = header_value(header, GAIN_KEYS)
    readnoise = header_value(header, RDNOISE_KEYS)
    saturation = header_value(header, SATURATE_KEYS, combine="min")
    unusable = []
    if gain is not None and not gain > 0:
        unusable.append(f"gain {gain:g} (must be > 0)")
        gain = None
    if readnoise is not None and not readnoise >= 0:
        unusable.append(f"read noise {readnoise:g} (must be >= 0)")
        readnoise = None
    if unusable and warn:
        log.warning("%s: header %s: ignored", where, " and ".join(unusable))
    missing = []
    if gain is None:
        missing.append("GAIN (backends estimate the noise from the sky)")
    if readnoise is None:
        missing.append("RDNOISE (noise measured from the sky instead)")
    if saturation is None:
        if integer_saturation is not None:
            saturation = integer_saturation
        else:
            missing.append("SATURATE (no saturation masking beyond the data's own plateau)")
    if missing and warn and "OASSTAGE" not in header:
        log.warning("%s: header has no %s", where, "; no ".join(missing))
    measured = {
        attr: value
        for attr, (key, _) in MEASURED_KEYS.items()
        if key in header and (value := finite_value(header[key])) is not None
    }
    return Frame(
        data=data,
        weight=weight,
        header=header,
        path=path,
        name=name,
        gain=gain,
        readnoise=readnoise,
        saturation=saturation,
        **measured,
    )


def _clean_header(header: Any) -> Any:
    """A copy of ``header`` without the structural keys of its original HDU and without
    the provenance and measurement cards of the stage that wrote it (the new stage writes
    its own)."""
    from astropy.io import fits

    out = fits.Header()
    skip = {
        "SIMPLE",
        "BITPIX",
        "NAXIS",
        "NAXIS1",
        "NAXIS2",
        "EXTEND",
        "BZERO",
        "BSCALE",
        "PCOUNT",
        "GCOUNT",
        "XTENSION",
        "EXTNAME",
        "CHECKSUM",
        "DATASUM",
        "BLANK",
        "ZIMAGE",
        "ZBITPIX",
        "ZNAXIS",
        "ZNAXIS1",
        "ZNAXIS2",
        "ZCMPTYPE",
        "ZTILE1",
        "ZTILE2",
        "ZQUANTIZ",
        "ZDITHER0",
        "TFIELDS",
        "INHERIT",
    }
    for card in header.cards if hasattr(header, "cards") else []:
        if card.keyword in skip or card.keyword.startswith(
            (
                "ZNAME",
                "ZVAL",
                "TTYPE",
                "TFORM",
                "OASIN",
                "OASSTAGE",
                "OASBACK",
                "OASPLUG",
                "OASOPTH",
                "OASVER",
                "OAS ",  # measurements of the previous stage (HIERARCH); the new one adds its own
            )
        ):
            continue
        with contextlib.suppress(ValueError, KeyError):
            out.append(card, end=True)
    return out


def _frame_header(frame: Frame, extra: Mapping[str, Any] | None) -> Any:
    header = _clean_header(frame.header)
    for attr, (key, comment) in MEASURED_KEYS.items():
        value = getattr(frame, attr)
        if value is not None and np.isfinite(value):
            header[key] = (float(value), comment)
    if frame.gain is not None:
        header["GAIN"] = (float(frame.gain), "e-/ADU")
    if frame.readnoise is not None:
        header["RDNOISE"] = (float(frame.readnoise), "read noise [e-]")
    if frame.saturation is not None and np.isfinite(frame.saturation):
        header["SATURATE"] = (float(frame.saturation), "saturation level [ADU]")
    _put_meta(header, frame.meta)
    apply_cards(header, extra)
    return header


def image_extension(
    data: Any,
    name: str,
    *,
    wcs_from: Any = None,
    grid: tuple[int, ...] | None = None,
    bunit: str | None = None,
    **cards: Any,
) -> Any:
    """An image extension of an output: the one way the core builds one.

    ``EXTNAME`` is ``name``; ``BUNIT`` is ``bunit`` (``''``: dimensionless; None: no card);
    ``cards`` go through :func:`set_card`; when the image lies on the primary image's
    grid (its shape is ``grid``, or no ``grid`` is given) it carries the WCS cards
    (:data:`WCS_KEY_RE`) of ``wcs_from``, the primary header, so that every image of a
    file maps to the sky as the primary does.
    """
    from astropy.io import fits

    data = np.asarray(data, np.float32)
    h = fits.Header()
    h["EXTNAME"] = name
    if bunit is not None:
        h["BUNIT"] = (bunit, "dimensionless" if bunit == "" else "unit of the pixel values")
    for key, value in cards.items():
        set_card(h, key, value)
    if wcs_from is not None and (grid is None or tuple(data.shape) == tuple(grid)):
        for card in wcs_from.cards:
            if WCS_KEY_RE.match(card.keyword) and card.keyword not in h:
                h.append(card)
    return fits.ImageHDU(data, h)


def _put_meta(header: Any, meta: Mapping[str, Any]) -> None:
    """Record ``meta`` as HIERARCH OAS <key> cards (long names allowed), through
    :func:`set_card`: a value that is not a finite number writes no card."""
    for key, value in meta.items():
        if isinstance(value, (bool, int, float, str, np.integer, np.floating)):
            set_card(header, f"HIERARCH OAS {key.upper()}", value)


def write_frame(
    path: Path,
    frame: Frame,
    *,
    header_extra: Mapping[str, Any] | None = None,
    weight_only: bool = False,
) -> None:
    """Write ``frame`` atomically: data in the primary HDU, a ``WEIGHT`` ('Y') extension.

    With ``weight_only`` the primary HDU holds the weight map itself (``WEIGHT = 'Y'``),
    which is what the mask stage stores.
    """
    from astropy.io import fits

    header = _frame_header(frame, header_extra)
    if weight_only:
        header["WEIGHT"] = ("Y", "this HDU is a weight map (0 = bad pixel)")
        header["BUNIT"] = ("", "dimensionless")
        hdul = fits.HDUList([fits.PrimaryHDU(np.asarray(frame.weight, np.float32), header)])
    else:
        hdul = fits.HDUList(
            [
                fits.PrimaryHDU(np.asarray(frame.data, np.float32), header),
                image_extension(
                    frame.weight,
                    "WEIGHT",
                    wcs_from=header,
                    grid=frame.data.shape,
                    bunit="",
                    WEIGHT=("Y", "this HDU is a weight map (0 = bad pixel)"),
                ),
            ]
        )
    with atomic_write(path) as tmp:
        hdul.writeto(tmp, overwrite=True)


def read_output_frame(path: Path, *, cls: type[Frame] = Frame, **fields: Any) -> Frame:
    """Read a frame the core wrote with :func:`write_frame` (data + ``WEIGHT``)."""
    frame = read_frame(path)
    if cls is Template:
        inputs = tuple(str(v) for k, v in frame.header.items() if k.startswith("OASTIN"))
        return Template(**{**_frame_fields(frame), "inputs": inputs, **fields})
    return attrs_evolve(frame, **fields) if fields else frame


def _frame_fields(frame: Frame) -> dict[str, Any]:
    import attrs

    return {f.name: getattr(frame, f.name) for f in attrs.fields(Frame)}


def attrs_evolve(obj: Any, **changes: Any) -> Any:
    """``attrs.evolve`` (kept here so callers need not import attrs)."""
    import attrs

    return attrs.evolve(obj, **changes)


def write_psf(path: Path, psf: PsfModel, *, header_extra: Mapping[str, Any] | None = None) -> None:
    """Write a PSF model atomically: the stamp, with FWHM, model and parameters in the header."""
    from astropy.io import fits

    header = fits.Header()
    header["FWHM"] = (float(psf.fwhm), "PSF FWHM [pix]")
    header["PSFMODEL"] = (psf.model, "PSF model")
    header["NSTARS"] = (int(psf.nstars), "stars used")
    _put_meta(header, {f"P_{k}": v for k, v in psf.params.items()})
    apply_cards(header, header_extra)
    with atomic_write(path) as tmp:
        fits.PrimaryHDU(np.asarray(psf.image, np.float32), header).writeto(tmp, overwrite=True)


def read_psf(path: Path) -> PsfModel:
    """Read a PSF model written by :func:`write_psf`.

    ``files`` are the files the psf backend produced and the core kept beside it (their
    names are in the ``OASFILES`` card), those that still exist.
    """
    from astropy.io import fits

    with fits.open(path, memmap=False) as hdul:
        hdr = hdul[0].header
        params = {k[len("OAS P_") :].lower(): v for k, v in hdr.items() if k.startswith("OAS P_")}
        kept = [n for n in str(hdr.get("OASFILES", "")).split(",") if n]
        files = tuple(p for p in (Path(path).parent / n for n in kept) if p.exists())
        return PsfModel(
            image=np.array(hdul[0].data, dtype=np.float32),
            fwhm=float(hdr["FWHM"]),
            model=str(hdr.get("PSFMODEL", "empirical")),
            params=params,
            nstars=int(hdr.get("NSTARS", 0)),
            files=files,
        )


def residual_header(residual: Residual, header_extra: Mapping[str, Any] | None = None) -> Any:
    """The primary header :func:`write_residual` writes for ``residual``: its own header
    cleaned, Q, the inputs' names, ``meta``/``params``/kernel as ``OAS`` cards, then
    ``header_extra``."""
    header = _clean_header(residual.header)
    set_card(header, "OASQ", float(residual.q), "quality Q = 1/(1+chi2/Npix); none: unknown")
    header["OASSCI"] = (residual.science, "science frame")
    header["OASTMPL"] = (residual.template, "template")
    _put_meta(header, residual.meta)
    _put_meta(header, {f"PAR_{k}": v for k, v in residual.params.items()})
    if residual.kernel is not None:
        header["OASCONV"] = (residual.kernel.direction, "image convolved")
        _put_meta(header, {f"K_{k}": v for k, v in residual.kernel.meta.items()})
    apply_cards(header, header_extra)
    return header


def write_residual(
    path: Path, residual: Residual, *, header_extra: Mapping[str, Any] | None = None
) -> None:
    """Write a residual atomically: data, ``NOISE``, ``WEIGHT``, ``KERNEL`` and extra images.

    ``BUNIT`` of the data is the residual header's (the science frame's unit; ``''`` for
    a master residual in sigma units); ``NOISE`` has the same, ``WEIGHT`` and ``KERNEL``
    are dimensionless (``''``). Every extension on the residual's grid carries its WCS.
    """
    from astropy.io import fits

    header = residual_header(residual, header_extra)
    unit = str(header["BUNIT"]) if "BUNIT" in header else None
    grid = {"wcs_from": header, "grid": residual.data.shape}
    hdus = [
        fits.PrimaryHDU(np.asarray(residual.data, np.float32), header),
        image_extension(residual.noise, "NOISE", bunit=unit, **grid),
        image_extension(residual.weight, "WEIGHT", bunit="", WEIGHT="Y", **grid),
    ]
    if residual.kernel is not None and residual.kernel.image is not None:
        hdus.append(image_extension(residual.kernel.image, "KERNEL", bunit=""))
    for key, image in residual.extra.items():
        hdus.append(image_extension(image, key.upper()[:8], **grid))
    with atomic_write(path) as tmp:
        fits.HDUList(hdus).writeto(tmp, overwrite=True)


def read_residual(path: Path) -> Residual:
    """Read a residual written by :func:`write_residual`."""
    from astropy.io import fits

    from oasis_core.contracts.model import KernelSolution

    with fits.open(path, memmap=False) as hdul:
        header = hdul[0].header.copy()
        images = {h.header.get("EXTNAME", ""): np.array(h.data, np.float32) for h in hdul[1:]}
        data = np.array(hdul[0].data, np.float32)
    meta: dict[str, Any] = {}
    params: dict[str, Any] = {}
    kmeta: dict[str, Any] = {}
    for key, value in header.items():
        if key.startswith("OAS PAR_"):
            params[key[8:].lower()] = value
        elif key.startswith("OAS K_"):
            kmeta[key[6:].lower()] = value
        elif key.startswith("OAS "):
            meta[key[4:].lower()] = value
    kernel = None
    if "OASCONV" in header or "KERNEL" in images:
        kernel = KernelSolution(
            image=images.get("KERNEL"), direction=str(header.get("OASCONV", "template")), meta=kmeta
        )
    q = header.get("OASQ", "nan")
    extra = {k.lower(): v for k, v in images.items() if k not in ("NOISE", "WEIGHT", "KERNEL")}
    return Residual(
        data=data,
        noise=images["NOISE"],
        weight=images["WEIGHT"],
        header=header,
        name=frame_name(Path(path)),
        science=str(header.get("OASSCI", "")),
        template=str(header.get("OASTMPL", "")),
        q=float(q),
        kernel=kernel,
        params=params,
        extra=extra,
        meta=meta,
    )
