"""Reading frames: data, header, weight map, instrument values.

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
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from oasis_core.contracts.errors import InputError
from oasis_core.contracts.model import Frame
from oasis_core.engine.files import frame_name
from oasis_core.engine.headers import (
    GAIN_KEYS,
    MEASURED_KEYS,
    RDNOISE_KEYS,
    SATURATE_KEYS,
    drop_unusable_cards,
    finite_value,
    header_value,
    sanitize_header,
    warn_dropped_cards,
)

__all__ = [
    "BPM_NAMES",
    "MIN_SIDE",
    "frame_from_arrays",
    "instrument_values",
    "read_frame",
    "read_shape",
]

log = logging.getLogger("oasis")


BPM_NAMES = ("BPM", "MASK", "DQ", "BADPIX")


#: The fewest pixels a frame may have along an axis: thinner images are not frames, and the
#: C code of some backends (astroscrappy's median filters) corrupts memory on them.
MIN_SIDE = 4


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
        if i == index:
            continue
        flag = str(hdu.header.get("WEIGHT", "")).strip().upper()
        extname = str(hdu.header.get("EXTNAME", "")).strip().upper()
        if not flag and extname not in BPM_NAMES:
            continue  # decided by the header: the pixels of other extensions are not read
        if hdu.data is None or getattr(hdu.data, "ndim", 0) != 2:
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

    gain, readnoise, saturation = instrument_values(
        header, where, integer_saturation=integer_saturation, warn=warn
    )
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


def instrument_values(
    header: Any, where: Any, *, integer_saturation: float | None = None, warn: bool = True
) -> tuple[float | None, float | None, float | None]:
    """(gain, read noise, saturation) from ``header`` (see the module doc); a value that
    cannot be right (gain <= 0, negative read noise) is ignored and a missing one named,
    each in one warning naming ``where`` (``warn``; none for the core's own outputs)."""
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
    return gain, readnoise, saturation
