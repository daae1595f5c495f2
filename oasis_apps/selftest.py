"""``oasis test``: the installation self-test (OasisPy's ``TEST()``).

OasisPy ran its pipeline on a real DECam series of HAT-P-37 with three fake stars added to
one frame and compared the master residual's catalog with the fakes' positions. A real
series is not ours to ship, so this test simulates one with the same characteristics:
30 frames of one field (stars, a galaxy, varying seeing and sky, cosmic rays, pointing
offsets), no transient of its own, and three bright point sources added to one frame at
known positions (the *controls*). It then runs the whole pipeline with the configured
backends and passes only when

* each control is in the master residual's filtered catalog (``MR_filtered_sources``)
  within ``match_radius`` pixels, and
* nothing else in that catalog is as significant as the faintest control.

It prints ``TEST SUCCESSFUL!`` or ``Test failure: Results do not match controls`` and
why, one line per reason.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from oasis_core.engine import io
from oasis_core.engine.lock import hold, holds_targets

__all__ = ["SelfTestResult", "run_selftest"]

log = logging.getLogger("oasis")

SUCCESS = "TEST SUCCESSFUL!"
FAILURE = "Test failure: Results do not match controls"

#: Fraction of the frame side at which the controls sit (x, y), away from the centre
#: where the simulated galaxy lies.
CONTROL_POSITIONS = ((0.25, 0.30), (0.70, 0.25), (0.40, 0.75))


@attrs.frozen
class SelfTestResult:
    """The outcome of :func:`run_selftest`."""

    ok: bool
    reasons: tuple[str, ...]
    target: Path
    controls: Any

    def lines(self) -> list[str]:
        if self.ok:
            return [SUCCESS]
        return [FAILURE, *(f"  {r}" for r in self.reasons)]

    def __bool__(self) -> bool:
        return self.ok


def _quiet_spot(data: np.ndarray, x: float, y: float, radius: int = 14) -> tuple[float, float]:
    """Move (x, y) to the nearby pixel whose surroundings are faintest (no star under a
    control)."""
    from scipy import ndimage

    sky = float(np.median(data))
    box = ndimage.maximum_filter(np.abs(data - sky), size=2 * radius + 1)
    ix, iy = round(x), round(y)
    lo_y, lo_x = max(iy - 40, radius), max(ix - 40, radius)
    hi_y = min(iy + 41, data.shape[0] - radius)
    hi_x = min(ix + 41, data.shape[1] - radius)
    window = box[lo_y:hi_y, lo_x:hi_x]
    j, i = np.unravel_index(int(np.argmin(window)), window.shape)
    return float(lo_x + i) + 0.3, float(lo_y + j) + 0.6


def _accepts_transients(simulator: Any) -> bool:
    import inspect

    try:
        return "transients" in inspect.signature(simulator.simulate).parameters
    except (TypeError, ValueError):
        return False


def prepare(
    directory: Path,
    *,
    n_frames: int = 30,
    shape: tuple[int, int] = (512, 512),
    seed: int = 37,
    controls: Sequence[int] = (0, 1, 2),
    snr: float = 150.0,
    simulator: str = "native",
    registry: Any = None,
) -> tuple[Any, Any]:
    """Simulate the series, add the controls listed in ``controls`` (indices into
    :data:`CONTROL_POSITIONS`) to one frame, and unpack it into a target.

    Returns the target and the table of *all three* controls (x, y in that frame, ra, dec
    and whether each was injected): a control left out must then be missed, which is how
    a test makes the self-test fail.
    """
    from astropy.io import fits
    from astropy.table import Table
    from astropy.wcs import WCS

    from oasis_apps.fakes import inject
    from oasis_apps.get import unpack
    from oasis_core.engine.plugins import Registry
    from oasis_core.engine.tree import Target, init_root

    registry = registry or Registry()
    base = init_root(directory)
    name = "selftest"
    frames_dir = base / "simulations" / name / "frames"
    sim = registry.simulator(simulator)
    kwargs: dict[str, Any] = {"n_frames": n_frames, "shape": shape, "seed": seed}
    if _accepts_transients(sim):
        kwargs["transients"] = 0
    if not frames_dir.is_dir() or len(list(frames_dir.glob("*.fits"))) < n_frames:
        sim.simulate(frames_dir, **kwargs)
    paths = sorted(frames_dir.glob("*.fits"))
    if len(paths) < n_frames:
        from oasis_core.contracts.errors import InputError

        raise InputError(f"{frames_dir}: the simulator wrote {len(paths)} of {n_frames} frames")
    host = paths[len(paths) // 2]  # a frame in the middle of the series carries the controls
    with fits.open(host) as hdul:
        data = np.asarray(hdul[0].data, np.float32)
        header = hdul[0].header
    gain = float(header.get("GAIN", 1.0) or 1.0)
    rdnoise = float(header.get("RDNOISE", 0.0) or 0.0)
    fwhm = next((float(header[k]) for k in ("FWHM", "SEEING", "SIMFWHM") if k in header), 3.5)
    sky = float(np.median(data))
    sigma_pix = np.sqrt(max(sky, 0.0) / gain + (rdnoise / gain) ** 2) or float(np.std(data))
    # PSF-weighted S/N = flux / (sigma sqrt(4 pi s^2)) for a Gaussian core of FWHM
    s = fwhm / 2.3548
    flux = snr * sigma_pix * np.sqrt(4 * np.pi) * s
    spots = [_quiet_spot(data, fx * shape[1], fy * shape[0]) for fx, fy in CONTROL_POSITIONS]
    xs = np.array([p[0] for p in spots])
    ys = np.array([p[1] for p in spots])
    chosen = np.zeros(len(spots), bool)
    chosen[list(controls)] = True
    injected_path = host.with_name(host.stem + "_controls.fits")
    out = inject(data, xs[chosen], ys[chosen], np.full(chosen.sum(), flux), fwhm, "moffat")
    hdr = header.copy()
    hdr["HISTORY"] = f"oasis test: {int(chosen.sum())} control source(s) of {flux:.0f} ADU added"
    with io.atomic_write(injected_path) as tmp:
        fits.PrimaryHDU(out, hdr).writeto(tmp)
    wcs = WCS(header) if header.get("CTYPE1") else None
    ra, dec = wcs.all_pix2world(xs, ys, 0) if wcs is not None else (xs * np.nan, ys * np.nan)
    table = Table(
        {
            "id": np.arange(1, len(spots) + 1),
            "frame": np.full(len(spots), host.stem),
            "x": xs,
            "y": ys,
            "ra": ra,
            "dec": dec,
            "flux": np.full(len(spots), flux),
            "injected": chosen,
        }
    )
    target = Target(base / "targets" / name)
    if target.path.exists():
        import shutil

        shutil.rmtree(target.path)  # a fresh target each time: the controls may differ
    target.create()
    sources = [p for p in paths if p != host] + [injected_path]
    unpack(sources, target)
    # the host frame is known to the pipeline by the name of its copy
    table["frame"] = np.full(len(spots), injected_path.stem)
    io.write_table(table, base / "simulations" / name / "controls.ecsv")
    return target, table


def check(target: Any, controls: Any, *, match_radius: float = 2.0) -> SelfTestResult:
    """Compare the master residual's filtered catalog with the controls."""
    from astropy.io import fits
    from astropy.table import Table
    from astropy.wcs import WCS

    reasons: list[str] = []
    catalog_path = target.path / "sources" / "MR_filtered_sources.ecsv"
    if not catalog_path.exists():
        return SelfTestResult(False, (f"{catalog_path}: missing",), target.path, controls)
    catalog = Table.read(catalog_path, format="ascii.ecsv")
    template = target.path / "templates" / "template.fits"
    twcs = WCS(fits.getheader(template))
    if np.all(np.isfinite(controls["ra"])) and twcs.has_celestial:
        cx, cy = twcs.all_world2pix(controls["ra"], controls["dec"], 0)
    else:  # no WCS: the template grid is the reference frame's; assume the host's grid
        cx, cy = np.asarray(controls["x"]), np.asarray(controls["y"])
    found_rows: list[int] = []
    snr = np.asarray(catalog["snr"], float) if len(catalog) else np.zeros(0)
    for i, (x, y) in enumerate(zip(cx, cy, strict=True)):
        if len(catalog) == 0:
            d = np.array([np.inf])
        else:
            d = np.hypot(np.asarray(catalog["x"]) - x, np.asarray(catalog["y"]) - y)
        j = int(np.argmin(d))
        if d[j] <= match_radius:
            found_rows.append(j)
        else:
            reasons.append(
                f"control {controls['id'][i]} at ({x:.1f}, {y:.1f}) is not in "
                f"{catalog_path.name}"
                + ("" if controls["injected"][i] else " (it was never injected)")
            )
    if found_rows:
        faintest = float(np.min(snr[found_rows]))
        others = [k for k in range(len(catalog)) if k not in found_rows and snr[k] >= faintest]
        for k in others:
            reasons.append(
                f"unexpected source at ({catalog['x'][k]:.1f}, {catalog['y'][k]:.1f}) with "
                f"S/N {snr[k]:.1f}, at least the faintest control's {faintest:.1f}"
            )
    return SelfTestResult(not reasons, tuple(reasons), target.path, controls)


@holds_targets
def run_selftest(
    directory: str | Path | None = None,
    *,
    n_frames: int = 30,
    shape: tuple[int, int] = (512, 512),
    seed: int = 37,
    controls: Sequence[int] = (0, 1, 2),
    jobs: int | None = None,
    reporter: Any = None,
    registry: Any = None,
) -> SelfTestResult:
    """Simulate, run the pipeline, compare with the controls (see the module docstring).

    ``directory`` defaults to ``./oasis-selftest``. ``controls`` lists which of the three
    control sources are actually injected; leaving one out must fail the test.
    """
    from oasis_core.engine.pipeline import make_context, run_stages
    from oasis_core.engine.tree import init_root

    directory = Path(directory or "oasis-selftest")
    hold(init_root(directory) / "targets" / "selftest")  # the target prepare() makes
    target, table = prepare(
        directory, n_frames=n_frames, shape=shape, seed=seed, controls=controls, registry=registry
    )
    kwargs: dict[str, Any] = {"registry": registry, "use_config_file": False}
    if reporter is not None:
        kwargs["reporter"] = reporter
    ctx = make_context(target.path, jobs=jobs, **kwargs)
    run_stages(ctx)
    radius = max(2.0, ctx.config.settings["extract"].match_radius)
    return check(target, table, match_radius=radius)
