"""FITS header values and cards: instrument defaults, times, units, unusable cards.

Header defaults
---------------
``GAIN`` (or the mean of per-amplifier ``GAINA``/``GAINB``/...), ``RDNOISE``/``READNOIS``/
``RON`` (or per-amplifier ``RDNOISEA``/``B``), ``SATURATE``/``SATLEVEL`` (or the minimum
of per-amplifier ``SATURATA``/``B``): :func:`header_value`. The time of observation
(mid-exposure MJD) is :func:`header_mjd`, the image unit :func:`header_unit`.

Header cards
------------
A card whose value cannot be parsed (``CRVAL1 = NaN``) or is not finite (``1e999``) cannot
be written back to a FITS file: :func:`sanitize_header` drops such cards, with one warning
naming the file and the cards; when one of them is a WCS card, the whole WCS is dropped (a
frame without a WCS, rather than a wrong one). :func:`set_card` writes a card with the
value's own type (never a number as a string).
"""

from __future__ import annotations

import logging
import math
import re
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from oasis_core.contracts.model import header_wcs

__all__ = [
    "EXPTIME_KEYS",
    "GAIN_KEYS",
    "MEASURED_KEYS",
    "RDNOISE_KEYS",
    "SATURATE_KEYS",
    "TIME_KEYS",
    "WCS_KEY_RE",
    "apply_cards",
    "drop_unusable_cards",
    "finite_value",
    "header_mjd",
    "header_unit",
    "header_value",
    "header_wcs",
    "sanitize_header",
    "set_card",
    "tan_wcs_cards",
    "warn_dropped_cards",
]

log = logging.getLogger("oasis")


GAIN_KEYS = ("GAIN", "EGAIN", "CCDGAIN")


RDNOISE_KEYS = ("RDNOISE", "READNOIS", "RON", "READNOISE", "RDNOISE1")


SATURATE_KEYS = ("SATURATE", "SATLEVEL", "SATURATION", "MAXLIN")


#: Keys of a FITS world coordinate system (celestial or not, with SIP distortions).
WCS_KEY_RE = re.compile(
    r"^(WCSAXES|CTYPE\d|CRVAL\d|CRPIX\d|CDELT\d|CUNIT\d|CROTA\d|CD\d_\d|PC\d_\d|"
    r"PV\d_\d+|PS\d_\d+|LONPOLE|LATPOLE|RADESYSa?|RADECSYS|EQUINOX|EPOCH|WCSNAME|"
    r"[AB]P?_\d_\d|[AB]P?_ORDER|[AB]_DMAX)$"
)


def _card_fault(card: Any) -> str | None:
    """Why ``card``'s value cannot be written back (unparsable, not finite), or None."""
    try:
        value = card.value
    except Exception:  # astropy's VerifyError (and others) on an unparsable value
        # the card as read (``card.image`` would first "fix" it into a string)
        raw = str(getattr(card, "_image", "") or "").partition("=")[2].split("/")[0].strip()
        return f"{card.keyword} = {raw or '?'}"
    if isinstance(value, (float, complex, np.floating, np.complexfloating)) and not np.all(
        np.isfinite(value)
    ):
        return f"{card.keyword} = {value}"
    return None


def drop_unusable_cards(header: Any) -> tuple[list[str], bool]:
    """Drop ``header``'s unusable cards in place (and the WCS when one is a WCS card);
    return what was wrong with each and whether the WCS was dropped."""
    faults = [(c.keyword, why) for c in list(header.cards) if (why := _card_fault(c))]
    if not faults:
        return [], False
    wcs_too = any(WCS_KEY_RE.match(key) for key, _ in faults)
    doomed = {key for key, _ in faults}
    if wcs_too:
        doomed |= {c.keyword for c in header.cards if WCS_KEY_RE.match(c.keyword)}
    for key in doomed:
        while key in header:
            del header[key]
    return [why for _, why in faults], wcs_too


def warn_dropped_cards(where: Any, faults: list[str], wcs_too: bool) -> None:
    if faults:
        log.warning(
            "%s: header card%s %s cannot be used (unparsable or not a finite number); dropped%s",
            where,
            "s" if len(faults) > 1 else "",
            ", ".join(faults),
            ", and the WCS with it (the frame is read as having no WCS)" if wcs_too else "",
        )


def sanitize_header(header: Any, where: Any) -> Any:
    """``header`` without the cards that could not be written back to a FITS file.

    A card whose value does not parse (``CRVAL1 = NaN``) or is not finite (``1e999``) is
    dropped; when one of them is a WCS card (:data:`WCS_KEY_RE`), every WCS card is
    dropped with it, so the frame has no WCS rather than a wrong one. One warning names
    ``where`` (the file) and the cards.

    Parameters
    ----------
    header : astropy.io.fits.Header
        Modified in place and returned.
    where : str or Path
        The file, for the warning.
    """
    warn_dropped_cards(where, *drop_unusable_cards(header))
    return header


def finite_value(value: Any) -> float | None:
    """``value`` as a finite float, or None (strings, complex, NaN...)."""
    if isinstance(value, bool):
        return None
    try:
        out = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return out if np.isfinite(out) else None


def header_value(header: Any, keys: tuple[str, ...], *, combine: str = "mean") -> float | None:
    """First of ``keys`` present in ``header``; else per-amplifier ``KEY{A,B,...}`` combined.

    ``combine`` is ``"mean"`` or ``"min"``. Per-amplifier keys are tried with the key
    itself and its 7-character stem (FITS keys have at most 8: ``SATURATA`` for SATURATE).
    """
    for key in keys:
        if key in header:
            value = finite_value(header[key])
            if value is not None:
                return value
    for key in keys:
        values = []
        for stem in {key, key[:7]}:
            for amp in "ABCD":
                card = stem + amp
                if len(card) <= 8 and card in header:
                    values.append(finite_value(header[card]))
        values = [v for v in values if v is not None]
        if values:
            return float(min(values) if combine == "min" else np.mean(values))
    return None


def apply_cards(header: Any, cards: Mapping[str, Any] | None) -> Any:
    """Set ``cards`` in ``header`` through :func:`set_card` (a value may be a
    ``(value, comment)`` tuple); a ``HISTORY`` entry may be a list of lines."""
    for key, value in (cards or {}).items():
        if key == "HISTORY":
            for line in value if isinstance(value, (list, tuple)) else [value]:
                header.add_history(str(line))
        else:
            set_card(header, key, value)
    return header


def set_card(header: Any, key: str, value: Any, comment: str | None = None) -> Any:
    """Set one card of ``header``: the one way the core writes a card.

    A number that is not finite (NaN, inf) or ``None`` is not a value FITS can hold: the
    card is then removed rather than written, never written as the string ``'nan'``
    (a reader sees a missing card: unknown). numpy scalars become Python ones. Keys
    longer than 8 characters or with spaces are written as ``HIERARCH`` cards.

    Parameters
    ----------
    header : astropy.io.fits.Header
        Modified in place and returned.
    key : str
        The keyword.
    value : bool, int, float, str or None
        The value; a ``(value, comment)`` tuple is accepted too.
    comment : str, optional
        The card's comment.
    """
    import warnings as _w

    from astropy.io.fits.verify import VerifyWarning

    if isinstance(value, tuple):
        value, comment = value[0], (value[1] if len(value) > 1 else comment)
    if isinstance(value, np.generic):
        value = value.item()
    plain = (len(key) <= 8 and " " not in key) or key.startswith("HIERARCH ")
    name = key if plain else f"HIERARCH {key}"
    if value is None or (isinstance(value, (float, complex)) and not np.isfinite(value)):
        header.remove(name, ignore_missing=True, remove_all=True)
        return header
    if comment is not None and not _fits_with_comment(name, value, comment):
        comment = None  # a long value keeps its card; astropy would cut the comment on write
    with _w.catch_warnings():
        _w.simplefilter("ignore", VerifyWarning)
        header[name] = value if comment is None else (value, comment)
    return header


def _fits_with_comment(name: str, value: Any, comment: str) -> bool:
    """Whether ``value`` and ``comment`` fit one card (else astropy warns, on writing the
    file, that it truncates the comment)."""
    import warnings as _w

    from astropy.io import fits
    from astropy.io.fits.verify import VerifyWarning

    with _w.catch_warnings(record=True) as caught:
        _w.simplefilter("always", VerifyWarning)
        str(fits.Card(name, value, comment))
    return not any(issubclass(w.category, VerifyWarning) for w in caught)


#: Header keys that give the time of an exposure (see :func:`header_mjd`).
TIME_KEYS = (
    "MJD-AVG",
    "DATE-AVG",
    "MJD-OBS",
    "DATE-OBS",
    "MJD-BEG",
    "DATE-BEG",
    "MJD-END",
    "DATE-END",
    "TIME-OBS",
    "UTSTART",
    "UT",
    "JD",
    "HJD",
)


#: Keys of the exposure time in seconds, in the order tried.
EXPTIME_KEYS = ("EXPTIME", "EXPOSURE", "ITIME")


def header_mjd(header: Any) -> float | None:
    """The mid-exposure time of a frame as an MJD, from its header, or None.

    ``MJD-AVG`` / ``DATE-AVG`` (the FITS mid-exposure keys) are taken as they are;
    otherwise the start, ``MJD-OBS`` (or ``MJD-BEG``), else ``DATE-OBS`` (or ``DATE-BEG``;
    a date alone is completed by ``TIME-OBS`` / ``UTSTART`` / ``UT``), plus half the
    exposure time (``EXPTIME`` / ``EXPOSURE`` / ``ITIME``, seconds; the start itself when
    none is given); else ``JD`` (the start, as a Julian date) plus half the exposure
    time; else ``HJD`` (taken as the heliocentric mid-exposure time, as it is). Dates
    are read by :class:`astropy.time.Time` in the header's ``TIMESYS`` (UTC when absent
    or unknown), and the MJD is in that scale. A header without a readable time gives
    None.
    """
    from astropy.time import Time

    if not header:
        return None
    scale = str(header.get("TIMESYS", "UTC")).strip().lower()
    if scale not in Time.SCALES:
        scale = "utc"

    def from_date(key: str) -> float | None:
        text = str(header.get(key, "")).strip()
        if not text:
            return None
        if "T" not in text:
            for clock in ("TIME-OBS", "UTSTART", "UT"):
                if str(header.get(clock, "")).strip():
                    text = f"{text}T{str(header[clock]).strip()}"
                    break
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # erfa's "dubious year" for far dates
            try:
                return float(Time(text, scale=scale).mjd)
            except (ValueError, TypeError):
                return None

    for key in ("MJD-AVG",):
        if (mid := finite_value(header.get(key))) is not None:
            return mid
    if (mid := from_date("DATE-AVG")) is not None:
        return mid
    start = finite_value(header.get("MJD-OBS"))
    if start is None:
        start = finite_value(header.get("MJD-BEG"))
    if start is None:
        start = from_date("DATE-OBS")
    if start is None:
        start = from_date("DATE-BEG")
    if start is None and (jd := finite_value(header.get("JD"))) is not None:
        start = jd - 2400000.5
    if start is None:
        hjd = finite_value(header.get("HJD"))  # heliocentric, at mid-exposure: as it is
        return None if hjd is None else hjd - 2400000.5
    exptime = header_value(header, EXPTIME_KEYS)
    if exptime is not None and exptime > 0:
        return start + exptime / 2.0 / 86400.0
    return start


def header_unit(header: Any) -> Any:
    """The astropy unit of an image from its ``BUNIT`` card, or None (no card, or a
    unit astropy does not know). ``BUNIT = ''`` is dimensionless."""
    import astropy.units as u

    if not header or "BUNIT" not in header:
        return None
    text = str(header["BUNIT"]).strip()
    for candidate in (text, text.lower()):  # 'ADU' is astropy's 'adu'
        try:
            return u.Unit(candidate)
        except (ValueError, TypeError):
            continue
    return None


# Keys under which the core stores what the stages measured.
MEASURED_KEYS = {
    "background": ("OASBKG", "median sky level [ADU]"),
    "noise": ("OASNOISE", "robust sky noise [ADU]"),
    "fwhm": ("FWHM", "PSF full width at half maximum [pix]"),
    "snr": ("OASSNR", "frame S/N figure (median PSF-star peak S/N)"),
}


def tan_wcs_cards(
    shape: tuple[int, int],
    ra0: float,
    dec0: float,
    cd: Any,
    *,
    shift: tuple[float, float] = (0.0, 0.0),
    rotation: float = 0.0,
) -> dict[str, Any]:
    """The cards of a TAN WCS centred on ``(ra0, dec0)`` (deg) with the 2x2 matrix ``cd``
    (deg/px), for a frame moved by ``shift`` px and rotated by ``rotation`` degrees: a point
    at pixel p of the unmoved frame lands at ``crpix + shift + R(rotation) (p - crpix)``.
    One definition for every simulated frame (the native simulator, same-field series).
    """
    ny, nx = shape
    t = math.radians(rotation)
    rot = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
    moved = np.asarray(cd, float) @ rot.T  # CD_k = CD_0 R^-1
    return {
        "CTYPE1": "RA---TAN",
        "CTYPE2": "DEC--TAN",
        "CUNIT1": "deg",
        "CUNIT2": "deg",
        "CRVAL1": float(ra0),
        "CRVAL2": float(dec0),
        "CRPIX1": (nx + 1) / 2.0 + shift[0],  # 1-based centre, moved by the shift
        "CRPIX2": (ny + 1) / 2.0 + shift[1],
        "CD1_1": float(moved[0, 0]),
        "CD1_2": float(moved[0, 1]),
        "CD2_1": float(moved[1, 0]),
        "CD2_2": float(moved[1, 1]),
        "RADESYS": "ICRS",
        "EQUINOX": 2000.0,
    }
