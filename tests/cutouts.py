"""Small aligned cutouts from the shared real series, with point sources injected into the
science cutout only: the shape survey alerts and targeted follow-up give.

:func:`decam_stamps` and :func:`isis_stamps` write 63x63 science/template pairs as FITS
(headers kept, so GAIN, SATURATE... are read as from any file) and return one
:class:`Stamp` per pair. Three kinds of stamp:

``blank``
    a point source injected at the centre of an empty patch of sky;
``galaxy``
    injected on an extended object (a galaxy, or a blend in the ISIS field);
``star``
    no injection: the stamp is centred on a real star, which must subtract away.

The injected flux is drawn so that its expected matched-filter significance in the
residual (``snr``: flux x sqrt(sum P^2) / sqrt(sky variance of both frames)) spans 5-80.
:func:`measure_flux` measures a residual's flux at a position (aperture of 2.5 FWHM,
corrected by the PSF's own fraction in it).
"""

from __future__ import annotations

import math
from pathlib import Path

import attrs
import numpy as np

__all__ = ["Stamp", "decam_stamps", "empirical_psf", "isis_stamps", "measure_flux"]

SIZE = 63


@attrs.frozen
class Stamp:
    """One cutout pair on disk and what was injected."""

    science: Path
    template: Path
    kind: str
    x: float
    y: float
    flux: float
    snr: float
    fwhm: float
    series: str
    psf: np.ndarray = attrs.field(eq=False, repr=False)


def _sky_noise(data: np.ndarray) -> tuple[float, float]:
    from astropy.stats import sigma_clipped_stats

    finite = data[np.isfinite(data)]
    _, med, std = sigma_clipped_stats(finite, sigma=3.0, maxiters=5)
    return float(med), float(std)


def empirical_psf(data: np.ndarray, half: int = 12) -> tuple[np.ndarray, float]:
    """A unit-sum PSF stamp from the frame's bright isolated unsaturated stars (median of
    their sub-pixel-centred cutouts) and its FWHM (half-maximum area)."""
    import sep
    from scipy import ndimage

    data = np.ascontiguousarray(np.nan_to_num(data, nan=np.nanmedian(data)), dtype=np.float64)
    sky, noise = _sky_noise(data)
    work = data - sky
    objects = sep.extract(work, 8.0, err=noise, minarea=9)
    peak = float(np.nanmax(work))
    ny, nx = data.shape
    stamps = []
    for obj in sorted(objects, key=lambda o: -o["flux"]):
        x, y = float(obj["x"]), float(obj["y"])
        if not (half + 2 <= x < nx - half - 2 and half + 2 <= y < ny - half - 2):
            continue
        if obj["peak"] > 0.6 * peak or obj["flag"] != 0:
            continue
        d = np.hypot(objects["x"] - x, objects["y"] - y)
        if np.any((d > 0) & (d < 1.5 * half) & (objects["flux"] > 0.05 * obj["flux"])):
            continue
        ix, iy = round(x), round(y)
        cut = work[iy - half - 1 : iy + half + 2, ix - half - 1 : ix + half + 2]
        cut = ndimage.shift(cut, (iy - y, ix - x), order=3, mode="nearest")[1:-1, 1:-1]
        total = cut.sum()
        if total > 0:
            stamps.append(cut / total)
        if len(stamps) >= 15:
            break
    if len(stamps) < 3:
        raise ValueError(f"only {len(stamps)} isolated stars for the PSF")
    psf = np.median(stamps, axis=0)
    psf = np.clip(psf, 0, None)
    psf /= psf.sum()
    return psf, _psf_fwhm(psf)


def _inject(image: np.ndarray, psf: np.ndarray, x: float, y: float, flux: float) -> np.ndarray:
    from scipy import ndimage

    half = psf.shape[0] // 2
    ix, iy = round(x), round(y)
    shifted = ndimage.shift(psf, (y - iy, x - ix), order=3, mode="constant")
    out = image.copy()
    ny, nx = image.shape
    y0, y1 = max(iy - half, 0), min(iy + half + 1, ny)
    x0, x1 = max(ix - half, 0), min(ix + half + 1, nx)
    out[y0:y1, x0:x1] += (
        flux * shifted[y0 - (iy - half) : y1 - (iy - half), x0 - (ix - half) : x1 - (ix - half)]
    )
    return out


def _psf_fwhm(psf: np.ndarray) -> float:
    """A PSF stamp's FWHM from its half-maximum area."""
    return 2.0 * math.sqrt(float(np.sum(psf >= psf.max() / 2)) / math.pi)


def measure_flux(residual: np.ndarray, x: float, y: float, psf: np.ndarray, fwhm: float) -> float:
    """Flux in a circular aperture of radius 2.5 FWHM at (x, y), divided by the fraction of
    ``psf`` inside the same aperture; the local background is the median of an annulus
    (3-4.5 FWHM) when it fits in the image, else 0.

    ``fwhm`` is the residual's PSF FWHM: when the science frame was the image convolved it
    is wider than ``psf`` (the science PSF), which is then broadened to it (a Gaussian)
    for the fraction."""
    ny, nx = residual.shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    r = np.hypot(xx - x, yy - y)
    radius = 2.5 * fwhm
    good = np.isfinite(residual)
    annulus = good & (r >= 3 * fwhm) & (r < 4.5 * fwhm)
    sky = float(np.median(residual[annulus])) if annulus.sum() > 30 else 0.0
    inside = good & (r <= radius)
    own = _psf_fwhm(psf)
    if fwhm > 1.05 * own:
        from scipy import ndimage

        sigma = math.sqrt(fwhm**2 - own**2) / (2 * math.sqrt(2 * math.log(2)))
        psf = np.pad(psf, math.ceil(4 * sigma))
        psf = ndimage.gaussian_filter(psf, sigma)
        psf /= psf.sum()
    h = psf.shape[0] // 2
    py, px = np.mgrid[-h : h + 1, -h : h + 1]
    frac = float(psf[np.hypot(px, py) <= radius].sum())
    return float(np.sum(residual[inside] - sky)) / frac


def _write(path: Path, data: np.ndarray, header: object) -> Path:
    from astropy.io import fits

    hdr = fits.Header()
    for card in header.cards:  # type: ignore[attr-defined]
        if card.keyword in ("", "COMMENT", "HISTORY") or card.keyword.startswith(
            ("NAXIS", "BITPIX")
        ):
            continue
        if card.keyword in ("SIMPLE", "EXTEND", "XTENSION", "PCOUNT", "GCOUNT", "EXTNAME"):
            continue
        hdr[card.keyword] = (card.value, card.comment)
    fits.PrimaryHDU(np.asarray(data, np.float32), header=hdr).writeto(path, overwrite=True)
    return path


def _shift_wcs(header: object, x0: int, y0: int) -> object:
    hdr = header.copy()  # type: ignore[attr-defined]
    for axis, off in ((1, x0), (2, y0)):
        key = f"CRPIX{axis}"
        if key in hdr:
            hdr[key] = float(hdr[key]) - off
    return hdr


def _positions(template: np.ndarray, rng: np.random.Generator, fwhm: float, n: int) -> dict:
    """Stamp centres in the template: blank sky, extended objects and stars."""
    import sep

    data = np.ascontiguousarray(np.nan_to_num(template), dtype=np.float64)
    sky, noise = _sky_noise(data)
    work = data - sky
    objects = sep.extract(work, 3.0, err=noise, minarea=5)
    ny, nx = data.shape
    m = SIZE // 2 + 1
    inner = (
        (objects["x"] > m) & (objects["x"] < nx - m) & (objects["y"] > m) & (objects["y"] < ny - m)
    )
    peak = float(np.nanmax(work))
    size = np.sqrt(objects["a"] * objects["b"])
    star_size = float(np.median(size[objects["flux"] > np.percentile(objects["flux"], 70)]))
    extended = inner & (size > 1.4 * star_size) & (objects["peak"] > 5 * noise)
    stars = (
        inner
        & (size < 1.2 * star_size)
        & (objects["peak"] > 30 * noise)
        & (objects["peak"] < 0.5 * peak)
    )
    # blank: far from every detection
    blank = []
    for _ in range(4000):
        x, y = rng.uniform(m, nx - m), rng.uniform(m, ny - m)
        if np.min(np.hypot(objects["x"] - x, objects["y"] - y)) > 2.5 * fwhm:
            blank.append((x, y))
        if len(blank) >= n:
            break
    return {
        "blank": blank,
        "galaxy": [(float(o["x"]), float(o["y"])) for o in objects[extended]][:n],
        "star": [(float(o["x"]), float(o["y"])) for o in objects[stars]][:n],
    }


def _stamps_from_pairs(
    pairs: list[tuple[np.ndarray, object, np.ndarray, object, str]],
    out: Path,
    series: str,
    *,
    per_pair: dict[str, int],
    seed: int,
) -> list[Stamp]:
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    stamps = []
    for sci, sci_hdr, tpl, tpl_hdr, label in pairs:
        psf, fwhm = empirical_psf(sci)
        _, sig_s = _sky_noise(sci)
        _, sig_t = _sky_noise(tpl)
        norm = math.sqrt(float(np.sum(psf**2))) / math.hypot(sig_s, sig_t)
        where = _positions(tpl, rng, fwhm, max(per_pair.values()) * 3)
        for kind, count in per_pair.items():
            choices = where[kind]
            picks = rng.permutation(len(choices))[:count] if choices else []
            for k in picks:
                cx, cy = choices[int(k)]
                x0 = round(cx) - SIZE // 2
                y0 = round(cy) - SIZE // 2
                s = np.array(sci[y0 : y0 + SIZE, x0 : x0 + SIZE], np.float64)
                t = np.array(tpl[y0 : y0 + SIZE, x0 : x0 + SIZE], np.float64)
                x = SIZE // 2 + (cx - round(cx)) + rng.uniform(-0.5, 0.5)
                y = SIZE // 2 + (cy - round(cy)) + rng.uniform(-0.5, 0.5)
                flux = snr = 0.0
                if kind != "star":
                    snr = float(np.exp(rng.uniform(np.log(5.0), np.log(80.0))))
                    flux = snr / norm
                    s = _inject(s, psf, x, y, flux)
                else:
                    x, y = SIZE // 2 + (cx - round(cx)), SIZE // 2 + (cy - round(cy))
                stem = f"{series}_{label}_{kind}_{len(stamps):03d}"
                stamps.append(
                    Stamp(
                        science=_write(out / f"{stem}_sci.fits", s, _shift_wcs(sci_hdr, x0, y0)),
                        template=_write(out / f"{stem}_tpl.fits", t, _shift_wcs(tpl_hdr, x0, y0)),
                        kind=kind,
                        x=float(x),
                        y=float(y),
                        flux=float(flux),
                        snr=snr,
                        fwhm=fwhm,
                        series=series,
                        psf=psf,
                    )
                )
    return stamps


def decam_stamps(
    shared_data: Path, out: Path, *, seed: int = 0, per_pair: dict[str, int] | None = None
) -> list[Stamp]:
    """Cutouts of the DECam pairs (epoch 18 science minus epoch 04 template, exposure by
    exposure): per pair 5 blank, 3 galaxy and 2 star stamps (or ``per_pair``)."""
    from astropy.io import fits

    pairs = []
    for letter in "abcde":
        with (
            fits.open(shared_data / "decam_n6" / f"DEC-OBS18{letter}.mini.fits") as s,
            fits.open(shared_data / "decam_n6" / f"DEC-OBS04{letter}.mini.fits") as t,
        ):
            pairs.append(
                (
                    s[0].data.astype(np.float64),
                    s[0].header,
                    t[0].data.astype(np.float64),
                    t[0].header,
                    letter,
                )
            )
    counts = per_pair or {"blank": 5, "galaxy": 3, "star": 2}
    return _stamps_from_pairs(pairs, out, "decam", per_pair=counts, seed=seed)


def isis_stamps(
    shared_data: Path,
    out: Path,
    *,
    seed: int = 0,
    frames: int = 6,
    per_pair: dict[str, int] | None = None,
) -> list[Stamp]:
    """Cutouts of the ISIS example (crowded): frames 1.. aligned onto frame 0 with the
    native align backend, each minus frame 0; per pair 5 blank-ish, 2 blend and 2 star
    stamps (or ``per_pair``; in a field this crowded 'blank' means the faintest patch
    found)."""
    from oasis_core.engine import io
    from oasis_core.engine.plugins import Registry

    registry = Registry()
    backend = registry.select("align", "native", registry.get("align", "native").backend.Options())
    options = registry.get("align", "native").backend.Options()
    ref = io.read_frame(shared_data / "isis_example" / "infile0.fits", warn=False)
    pairs = []
    for i in range(1, frames + 1):
        frame = io.read_frame(shared_data / "isis_example" / f"infile{i}.fits", warn=False)
        aligned = backend.align(frame, ref, options=options, workdir=out)
        sci = np.where(aligned.weight > 0, aligned.data, np.nan)
        pairs.append((sci, frame.header, np.asarray(ref.data, np.float64), ref.header, str(i)))
    counts = per_pair or {"blank": 5, "galaxy": 2, "star": 2}
    return _stamps_from_pairs(pairs, out, "isis", per_pair=counts, seed=seed)
