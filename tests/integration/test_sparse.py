"""Sparse fields: a pair with five stars, cosmic rays and no header keywords at all (no GAIN,
RDNOISE, SATURATE, WCS, FWHM...), as a wide-field survey's quiet corner or a small
telescope's raw frame gives, and the real sparse pairs of the shared data (properimage,
JWST NIRCam).

Every subtract backend installed here must run on it through ``oasis subtract-pair``'s
function with default options, and the native PSF must find the simulated FWHM within 10%.
"""

from __future__ import annotations

import math
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from oasis_core.engine.pair import subtract_pair
from oasis_core.engine.plugins import Registry

SHAPE = (200, 240)
FWHM_SCIENCE, FWHM_TEMPLATE, BETA = 3.6, 3.0, 3.0
SKY, GAIN, READNOISE = 300.0, 1.5, 6.0
# five stars (x, y, peak S/N in the science frame) and the transient
STARS = [
    (40.3, 52.7, 150.0),
    (181.6, 40.2, 60.0),
    (120.4, 150.9, 300.0),
    (60.8, 160.1, 30.0),
    (200.2, 110.5, 90.0),
]
TRANSIENT = (110.6, 70.2, 40.0)
COSMIC_RAYS = 25  # per frame: more sharp detections than stars
METHODS = sorted(Registry().names("subtract"))


def _moffat_image(shape, sources, fwhm, oversample=5):
    """Pixel-integrated (oversampled) Moffat stars ``(x, y, total flux)``."""
    ny, nx = shape
    alpha = fwhm / (2.0 * math.sqrt(2.0 ** (1.0 / BETA) - 1.0))
    image = np.zeros(shape)
    half = math.ceil(6 * fwhm)
    sub = (np.arange(oversample) + 0.5) / oversample - 0.5
    for x, y, flux in sources:
        ix, iy = round(x), round(y)
        g = np.arange(-half, half + 1)
        yy = (iy + g)[:, None, None, None] + sub[None, None, :, None] - y
        xx = (ix + g)[None, :, None, None] + sub[None, None, None, :] - x
        prof = (1.0 + (xx**2 + yy**2) / alpha**2) ** (-BETA)
        prof = prof.mean(axis=(2, 3))
        norm = (BETA - 1.0) / (math.pi * alpha**2)  # the Moffat's total is pi alpha^2/(b-1)
        y0, x0 = iy - half, ix - half
        ys, xs = (
            slice(max(y0, 0), min(iy + half + 1, ny)),
            slice(max(x0, 0), min(ix + half + 1, nx)),
        )
        image[ys, xs] += (
            flux * norm * prof[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0]
        )
    return image


def _flux_for_peak_snr(snr, fwhm):
    alpha = fwhm / (2.0 * math.sqrt(2.0 ** (1.0 / BETA) - 1.0))
    sigma = math.sqrt(SKY / GAIN + (READNOISE / GAIN) ** 2)
    return snr * sigma * math.pi * alpha**2 / (BETA - 1.0)


def _cosmic_rays(rng: np.random.Generator, sigma: float) -> np.ndarray:
    """Sharp tracks 1-5 px long, 15-250 sigma per pixel (as :mod:`oasis_native.sim`), none
    within 30 px of the transient (whose flux is measured: no subtraction masks them)."""
    image = np.zeros(SHAPE)
    for _ in range(COSMIC_RAYS):
        x0, y0 = TRANSIENT[:2]
        while math.hypot(x0 - TRANSIENT[0], y0 - TRANSIENT[1]) < 30:
            x0, y0 = rng.uniform(0, SHAPE[1] - 1), rng.uniform(0, SHAPE[0] - 1)
        angle, amp = rng.uniform(0, np.pi), sigma * np.exp(rng.uniform(np.log(15), np.log(250)))
        for t in range(int(rng.integers(1, 6))):
            x, y = round(x0 + t * np.cos(angle)), round(y0 + t * np.sin(angle))
            if 0 <= x < SHAPE[1] and 0 <= y < SHAPE[0]:
                image[y, x] += amp * rng.uniform(0.5, 1.0)
    return image


def _write(path: Path, data: np.ndarray) -> Path:
    """A FITS file with nothing in its header but the structure keys."""
    fits.PrimaryHDU(data.astype(np.float32)).writeto(path)
    return path


@pytest.fixture(scope="module")
def sparse_pair(tmp_path_factory) -> tuple[Path, Path, float]:
    rng = np.random.default_rng(12)
    out = tmp_path_factory.mktemp("sparse")
    flux = [(x, y, _flux_for_peak_snr(s, FWHM_SCIENCE)) for x, y, s in STARS]
    transient_flux = _flux_for_peak_snr(TRANSIENT[2], FWHM_SCIENCE)
    frames = []
    for fwhm, extra in ((FWHM_SCIENCE, [(*TRANSIENT[:2], transient_flux)]), (FWHM_TEMPLATE, [])):
        model = SKY + _moffat_image(SHAPE, flux + extra, fwhm)
        electrons = rng.poisson(model * GAIN) + rng.normal(0.0, READNOISE, SHAPE)
        frames.append(electrons / GAIN + _cosmic_rays(rng, math.sqrt(SKY / GAIN)))
    science = _write(out / "science.fits", frames[0])
    template = _write(out / "template.fits", frames[1])
    return science, template, transient_flux


def test_native_psf_fwhm_on_the_bare_sparse_pair(sparse_pair, tmp_path) -> None:
    from oasis_native.psf import NativePsf, NativePsfOptions

    from oasis_core.engine import io

    science, template, _ = sparse_pair
    for path, truth in ((science, FWHM_SCIENCE), (template, FWHM_TEMPLATE)):
        frame = io.read_frame(path, warn=False)
        assert frame.gain is None and frame.saturation is None and frame.fwhm is None
        out = NativePsf().psf(frame, options=NativePsfOptions(), workdir=tmp_path)
        assert out.fwhm == pytest.approx(truth, rel=0.1)
        assert out.psf.params["psf_source"] == "fit"
        assert out.psf.nstars >= 4  # the five stars (the transient is one more point source)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_on_the_bare_sparse_pair(sparse_pair, tmp_path, method) -> None:
    if method == "hotpants" and shutil.which("hotpants") is None:
        pytest.skip("hotpants is not on PATH (real-program backend)")
    science, template, transient_flux = sparse_pair
    out = tmp_path / f"{method}.fits"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # astropy on the bare headers
        residual = subtract_pair(science, template, out, method=method)
    assert out.exists()
    good = residual.weight > 0
    assert good.mean() > 0.5
    assert np.all(np.isfinite(residual.data[good]))
    assert np.isfinite(residual.q) and residual.q > 0.5
    if method == "zogy":
        assert residual.meta["psf_source_science"].startswith("fit")
    # the transient keeps its science flux (aperture of 3 FWHM, local sky)
    x, y, _ = TRANSIENT
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]]
    r = np.hypot(xx - x, yy - y)
    sky = np.median(residual.data[(r > 15) & (r < 25)])
    flux = float(np.sum(residual.data[r < 3 * FWHM_SCIENCE] - sky))
    assert flux == pytest.approx(transient_flux, rel=0.1)


@pytest.mark.parametrize(
    ("folder", "names", "fwhm"),
    [
        ("properimage_null", ("aligned_eso085-030-004.fit", "aligned_eso085-030-005.fit"), 2.7),
        (
            "jwst_nircam",
            (
                "jw02561001002-02561-o001_t003_nircam_clear-f200w_i2d_stamp.fits",
                "jw01324001001-01324-o001_t001_nircam_clear-f200w_i2d_stamp.fits",
            ),
            2.45,
        ),
    ],
)
def test_real_sparse_pairs(shared_data, tmp_path, folder, names, fwhm) -> None:
    """No GAIN / RDNOISE / SATURATE / WCS (properimage), data in an extension and a field of
    galaxies with a dozen stars (JWST F200W, whose i2d PSF is about 0.075 arcsec, 2.4 px).

    The properimage PSF: individual Moffat fits to its 57 brightest unsaturated stars give a
    median FWHM of 2.63 px (16-84%: 2.38-2.88); the 3.1 px of the inventory is the
    half-maximum area of a stack centred on isophotal barycentres, which blurs it."""
    from oasis_native.psf import NativePsf, NativePsfOptions

    from oasis_core.engine import io

    science, template = (shared_data / folder / n for n in names)
    for path in (science, template):
        frame = io.read_frame(path, warn=False)
        out = NativePsf().psf(frame, options=NativePsfOptions(), workdir=tmp_path)
        assert out.fwhm == pytest.approx(fwhm, rel=0.1)
        assert out.psf.params["psf_source"] == "fit" and out.psf.params["psf_flag"] == ""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        residual = subtract_pair(science, template, tmp_path / "zogy.fits", method="zogy")
    assert residual.q > 0.5
    assert residual.meta["psf_source_science"].startswith("fit")
