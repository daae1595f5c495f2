"""The FITS products of the stages, written atomically and read back: frames with their
weight maps (masks, aligned frames, templates), PSF models and residuals (with their
``NOISE``, ``WEIGHT`` and ``KERNEL`` extensions), each header carrying the ``meta`` and
``params`` of the object as cards, a WCS and a correct ``BUNIT`` on every image
extension.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, overload

import numpy as np

from oasis_core.contracts.model import Frame, PsfModel, Residual, Template
from oasis_core.engine.files import atomic_write, frame_name
from oasis_core.engine.frames import read_frame
from oasis_core.engine.headers import (
    MEASURED_KEYS,
    WCS_KEY_RE,
    apply_cards,
    set_card,
)

__all__ = [
    "RESIDUAL_CACHE_BYTES",
    "FrameSeries",
    "ResidualSeries",
    "attrs_evolve",
    "image_extension",
    "read_output_frame",
    "read_psf",
    "read_residual",
    "residual_header",
    "template_inputs",
    "write_frame",
    "write_psf",
    "write_residual",
]

log = logging.getLogger("oasis")


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
    the pixels are float32, or bytes (uint8) when ``data`` is boolean (a mask);
    ``cards`` go through :func:`set_card`; when the image lies on the primary image's
    grid (its shape is ``grid``, or no ``grid`` is given) it carries the WCS cards
    (:data:`WCS_KEY_RE`) of ``wcs_from``, the primary header, so that every image of a
    file maps to the sky as the primary does.
    """
    from astropy.io import fits

    data = np.asarray(data)
    data = data.astype(np.uint8) if data.dtype == bool else data.astype(np.float32, copy=False)
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
        holes = getattr(frame, "holes", None)
        if holes is not None:  # a template's: see Template.holes
            hdul.append(
                image_extension(
                    np.asarray(holes, bool),
                    "HOLES",
                    wcs_from=header,
                    grid=frame.data.shape,
                    bunit="",
                )
            )
    with atomic_write(path) as tmp:
        hdul.writeto(tmp, overwrite=True)


def template_inputs(header: Any) -> tuple[str, ...]:
    """The names of the frames a template was stacked from: its ``OASTINn`` cards."""
    return tuple(str(header[k]) for k in header if k.startswith("OASTIN") and k[6:].isdigit())


def read_output_frame(path: Path, *, cls: type[Frame] = Frame, **fields: Any) -> Frame:
    """Read a frame the core wrote with :func:`write_frame` (data + ``WEIGHT``)."""
    frame = read_frame(path)
    if cls is Template:
        from astropy.io import fits

        inputs = template_inputs(frame.header)
        with fits.open(path, memmap=False) as hdul:
            holes = np.array(hdul["HOLES"].data, bool) if "HOLES" in hdul else None
        return Template(**{**_frame_fields(frame), "inputs": inputs, "holes": holes, **fields})
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
    set_card(header, "OASSCI", residual.science, "science frame")
    set_card(header, "OASTMPL", residual.template, "template")
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


#: Bytes of residuals a :class:`ResidualSeries` keeps in memory (the first ones read).
RESIDUAL_CACHE_BYTES = 64 * 2**20


class FrameSeries(Sequence[Frame]):
    """The frames at ``paths`` (files :func:`write_frame` wrote: data and ``WEIGHT``),
    read from their files when asked for, never kept.

    What the combine stage hands its backend: a backend that goes through the frames one
    at a time holds one; one that needs every frame at each pixel reads them by blocks of
    rows (:meth:`rows`) and takes what it needs of each frame from :meth:`described`.
    Memory then stays flat in the number of frames. A plain sequence of frames does as
    well for a backend that only iterates (a list of them is what tests and callers
    outside a target give).

    Parameters
    ----------
    paths : iterable of Path
        Frame files.
    psf_paths : iterable of Path or None, optional
        Each frame's PSF model file (:func:`write_psf`), None (or a missing file) for none.
    prepare : callable, optional
        Applied to every frame read (e.g. making its arrays read-only).
    """

    def __init__(
        self,
        paths: Iterable[Path],
        psf_paths: Iterable[Path | None] | None = None,
        *,
        prepare: Callable[[Frame], Frame] | None = None,
    ) -> None:
        self.paths = [Path(p) for p in paths]
        psfs = [None] * len(self.paths) if psf_paths is None else list(psf_paths)
        if len(psfs) != len(self.paths):
            raise ValueError("FrameSeries: one PSF path (or None) per frame")
        self.psf_paths = [None if p is None else Path(p) for p in psfs]
        self._prepare = prepare
        self._described: list[Frame] | None = None

    def __len__(self) -> int:
        return len(self.paths)

    @overload
    def __getitem__(self, index: int) -> Frame: ...

    @overload
    def __getitem__(self, index: slice) -> FrameSeries: ...

    def __getitem__(self, index: int | slice) -> Frame | FrameSeries:
        if isinstance(index, slice):
            return FrameSeries(self.paths[index], self.psf_paths[index], prepare=self._prepare)
        frame = read_output_frame(self.paths[index])
        psf = self.psf_paths[index]
        if psf is not None and psf.exists():
            frame = attrs_evolve(frame, psf=read_psf(psf))
        return self._prepare(frame) if self._prepare is not None else frame

    def described(self) -> list[Frame]:
        """Every frame without its pixels: its header, name, gain, PSF... as read, and
        its ``noise`` measured when the file gives none
        (:func:`oasis_core.engine.stacking.frame_noise`) and its sky level in
        ``meta["sky_median"]`` (``frame_background``, for a file without one), each
        frame read once (the first call; later ones reuse it). The ``data`` of each is a
        NaN image and its ``weight`` 0 of the frame's shape that take no memory: what
        the pixels are, :meth:`rows` reads."""
        if self._described is None:
            from oasis_core.engine.stacking import frame_background, frame_noise

            out = []
            for frame in self:  # one at a time
                shape = frame.shape
                out.append(
                    attrs_evolve(
                        frame,
                        data=np.broadcast_to(np.float32(np.nan), shape),
                        weight=np.broadcast_to(np.float32(0.0), shape),
                        noise=frame_noise(frame),
                        meta={**frame.meta, "sky_median": frame_background(frame)},
                    )
                )
                del frame
            self._described = out
        return self._described

    def rows(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows ``start:stop`` of every frame: ``(data, weight)``, float32 arrays of shape
        ``(len(self), stop - start, nx)``, each file read only there."""
        from astropy.io import fits

        data, weight = [], []
        for path in self.paths:
            with fits.open(path, memmap=False) as hdul:
                data.append(np.asarray(hdul[0].section[start:stop], np.float32))
                if "WEIGHT" in hdul:
                    weight.append(np.asarray(hdul["WEIGHT"].section[start:stop], np.float32))
                else:
                    weight.append(np.isfinite(data[-1]).astype(np.float32))
        return np.stack(data), np.stack(weight)


class ResidualSeries(Sequence[Residual]):
    """The residuals at ``paths``, read from their files when asked for.

    A stage that goes through a series one residual at a time (the master residual, the
    variability image) holds one residual and what it accumulates, not the whole series:
    memory stays flat in the number of frames. The first residuals read are kept while
    they fit in ``cache_bytes`` (a short series is read once); the others are read again
    at every pass. A slice is a series over the same files and cache.

    Parameters
    ----------
    paths : iterable of Path
        Residual files (:func:`write_residual`).
    prepare : callable, optional
        Applied to every residual read (e.g. making its arrays read-only).
    cache_bytes : int
        See above; 0 keeps none.
    """

    def __init__(
        self,
        paths: Iterable[Path],
        *,
        prepare: Callable[[Residual], Residual] | None = None,
        cache_bytes: int = RESIDUAL_CACHE_BYTES,
        _cache: dict[Path, Residual] | None = None,
    ) -> None:
        self.paths = [Path(p) for p in paths]
        self._prepare = prepare
        self._budget = cache_bytes
        self._cache: dict[Path, Residual] = {} if _cache is None else _cache

    def __len__(self) -> int:
        return len(self.paths)

    def headers(self) -> list[Any]:
        """The residuals' primary headers, read without their pixels."""
        from astropy.io import fits

        return [fits.getheader(p) for p in self.paths]

    @property
    def names(self) -> list[str]:
        """The residuals' frame names, from their file names (nothing is read)."""
        return [p.name.removesuffix(".fits").removesuffix("_residual") for p in self.paths]

    @overload
    def __getitem__(self, index: int) -> Residual: ...

    @overload
    def __getitem__(self, index: slice) -> ResidualSeries: ...

    def __getitem__(self, index: int | slice) -> Residual | ResidualSeries:
        if isinstance(index, slice):
            return ResidualSeries(
                self.paths[index],
                prepare=self._prepare,
                cache_bytes=self._budget,
                _cache=self._cache,
            )
        path = self.paths[index]
        cached = self._cache.get(path)
        if cached is not None:
            return cached
        residual = read_residual(path)
        if self._prepare is not None:
            residual = self._prepare(residual)
        size = _nbytes(residual)
        if sum(_nbytes(r) for r in self._cache.values()) + size <= self._budget:
            self._cache[path] = residual
        return residual


def _nbytes(residual: Residual) -> int:
    arrays = [residual.data, residual.noise, residual.weight, *residual.extra.values()]
    if residual.kernel is not None and residual.kernel.image is not None:
        arrays.append(residual.kernel.image)
    return sum(int(np.asarray(a).nbytes) for a in arrays)
