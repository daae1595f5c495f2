"""The crowded-and-elongated figure of issue 12: a crowded series of odd PSFs, every frame
subtracted with the defaults against a median template of the best-seeing frames.

The series (:func:`oasis_native.sim.simulate_series`): 256 x 256 frames with 2 stars per
100 px**2, seeing 3.0-6.4 px (two frames twice the template's), and frames of
ellipticity 0.5 along axes the template's (near-round) PSF does not share, on one grid
(no pointing offsets: this figure is the subtraction's, not the resampling's). The
template is the native combine backend's sigma-clipped weighted mean of the five
best-seeing frames; those frames are subtracted too (their noise is partly in the
template). Not its default weighted median: the median of frames of different PSFs has a
PSF that depends on the star's brightness (the middle frame's profile where the noise is
small against the PSFs' differences, nearer their mean where it is not), which no kernel
can match on bright and faint stars at once; on this series it leaves a star-aperture RMS
of 1.13-1.15 on three frames whatever the kernel model. Every frame must reach Q >= 0.9
and a star-aperture RMS <= 1.1 (the normalised residual's RMS within one FWHM of the
template's bright unsaturated stars, the median over the stars, as
``benchmarks/subtract.py`` measures it), and none be masked.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from oasis_core.contracts.model import Frame
from oasis_core.engine.quality import bright_stars, star_aperture_rms
from oasis_core.engine.subtraction import run_subtraction

pytestmark = pytest.mark.slow

#: Per frame: FWHM (px), ellipticity, position angle (deg). The first five make the
#: template (round, 3.0-3.2 px); then 2x the seeing, and elongated frames.
FRAMES = [
    (3.0, 0.0, 0.0),
    (3.1, 0.05, 30.0),
    (3.2, 0.0, 0.0),
    (3.0, 0.1, 0.0),
    (3.1, 0.05, 60.0),
    (6.0, 0.0, 0.0),
    (6.4, 0.1, 0.0),
    (3.6, 0.5, 90.0),
    (3.5, 0.5, 45.0),
    (5.0, 0.5, 0.0),
]
N_TEMPLATE = 5


@pytest.fixture(scope="module")
def crowded():
    from oasis_native.sim import simulate_series

    from oasis_core.engine.plugins import Registry

    series = simulate_series(
        len(FRAMES),
        (256, 256),
        seed=4,
        n_transients=2,
        star_density=2.0,
        frame_fwhm=[f for f, _, _ in FRAMES],
        frame_ellipticity=[e for _, e, _ in FRAMES],
        frame_angle=[a for _, _, a in FRAMES],
        max_shift=0.0,
        max_rotation_deg=0.0,
        cosmic_rays=False,
        hot_pixels=False,
        sky_subtracted=True,  # a median of frames of different skies follows the middle one
    )
    frames = [
        Frame(
            data=data,
            header=header,
            name=name,
            gain=header["GAIN"],
            readnoise=header["RDNOISE"],
            saturation=header["SATURATE"],
        )
        for (data, header), name in zip(series.frames, series.names, strict=True)
    ]
    registry = Registry()
    record = registry.get("combine", "native")
    options = record.backend.Options(method="mean")
    combine = registry.select("combine", "native", options)
    template = combine.combine(frames[:N_TEMPLATE], options=options, workdir=Path("unused"))
    assert set(template.inputs) == set(series.names[:N_TEMPLATE])
    return series, frames, template


def test_crowded_elongated_series_is_noise_limited_on_every_frame(crowded):
    from oasis_core.engine.plugins import Registry

    series, frames, template = crowded
    from astropy.wcs import WCS

    sx, sy = WCS(series.frames[0][1]).all_world2pix(series.stars["ra"], series.stars["dec"], 0)
    on_chip = np.sum((sx >= 0) & (sx < 256) & (sy >= 0) & (sy < 256))
    assert on_chip / 256**2 * 100 >= 1.95  # 2 stars per 100 px**2
    registry = Registry()
    backend = registry.select("subtract", "ois", registry.get("subtract", "ois").backend.Options())
    options = backend.Options()  # the defaults: kernel "auto"
    x, y = bright_stars(template.data)
    assert x.size >= 15
    figures = {}
    for frame, (fwhm, _, _) in zip(frames, FRAMES, strict=True):
        res = run_subtraction(
            backend,
            frame,
            template,
            options=options,
            workdir=Path("unused"),
            settings={"q_floor": 0.5, "q_ceiling": 0.75},
        )
        rms = star_aperture_rms(res.data, res.noise, res.weight, x, y, max(fwhm, 3.0))
        figures[frame.name] = (round(res.q, 3), round(rms, 3), res.meta["choice_kernel"])
        assert res.meta["usable"], (frame.name, res.meta["flag"])
    bad = {k: v for k, v in figures.items() if not (v[0] >= 0.9 and v[1] <= 1.1)}
    assert not bad, figures
    # the elongated frames are matched by more than ISIS's Gaussian stamps
    kernels = [figures[n][2] for n in series.names[7:]]
    assert set(kernels) <= {"cross", "delta"}, figures
