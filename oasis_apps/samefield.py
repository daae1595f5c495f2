"""``oasis sim same-field``: false detections on frames where nothing varies (OasisPy's
``sim_sameField``).

From one real frame a source catalog is made (``sep``: background-subtracted detection,
Kron-aperture fluxes, i.e. SExtractor's ``FLUX_AUTO``). ``numIms`` frames of that field are
rendered with the *same sources and fluxes* but their own seeing, sky, pointing and
photometric scale, written as a new target and run through the whole pipeline. Nothing
varies on the sky, so every source kept in ``sources/filtered_sources.txt`` is a false
detection; their number per frame is the figure of merit.

Each frame ``i`` (random draws are uniform in the given intervals and reproducible from
``seed``):

* **pointing**: a rotation ``theta`` in ``[rot_min, rot_max]`` degrees about the frame centre
  ``c`` and a shift ``d`` in ``[shift_min, shift_max]`` px on each axis: a source at pixel
  ``p`` of the real frame lands at ``R(theta) (p - c) + c + d``. The header carries a TAN WCS
  that says so (``CRPIX = c + d``, ``CD = CD_0 R^-1``, ``CD_0`` the real frame's linear WCS at
  its centre, or 0.5"/px when it has none), so the frames are alignable from their pixels and
  from their WCS alike;
* **seeing**: a FWHM in ``[fwhm_min, fwhm_max]`` px;
* **sky**: a sky magnitude ``m`` in ``[bkg_mag - 1.5, bkg_mag + 1.5]`` (OasisPy's documented
  range), i.e. ``10**(-0.4 (m - zero_point))`` ADU per pixel (OasisPy's
  ``2.512**(zero_point - m)``);
* **noise**: Poisson noise in electrons with the real frame's ``GAIN`` (1 e-/ADU when its
  header has none) plus Gaussian noise of standard deviation ``noise`` ADU drawn in
  ``[sigma - 5, sigma + 5]`` (at least ``sigma / 2``), ``sigma`` the real frame's sky noise
  (``sep``'s global RMS): OasisPy's choice, which keeps the sources' S/N that of the real
  frame whatever ``bkg_mag`` says. The header's ``RDNOISE`` is that noise in electrons, so
  the pipeline's noise model is exact. Pixels are then clipped at the real frame's
  ``SATURATE`` (else 65535 ADU);
* **scale**: OasisPy's linear rescale of the finished frame, ``a * image + b`` with ``a`` in
  ``scale_mult`` and ``b`` in ``scale_add`` (a change of photometric scale and pedestal; the
  S/N is unchanged). Unlike OasisPy the rescale applies in every mode, and the header keeps
  the noise model true: ``GAIN = gain / a``, ``SATURATE = a * saturation + b``.

OasisPy also multiplied every flux by a random factor in [0, 2] per frame; the issue asks for
the *same* fluxes, so that is not done (``scale_mult`` already varies the flux scale).

Modes (the PSF the sources are drawn with):

* ``moffat`` (beta 2.5) and ``gauss``: :func:`oasis_apps.fakes.render_stamps` profiles
  sampled at pixel centres, every source at once (sources are grouped by stamp size: a
  bright star's stamp reaches out to where its profile falls below 1/20 of the sky noise);
* ``real``: the real frame's own PSF model (measured by the configured psf backend) zoomed
  to each frame's FWHM and shifted to each source's sub-pixel position by spline
  interpolation (:func:`scipy.ndimage.map_coordinates`), all sources at once;
* ``sky``: GalSim, standing in for SkyMaker (not packaged anywhere installable): a
  ``galsim.Kolmogorov`` seeing profile of the frame's FWHM, integrated over the pixels,
  drawn per source on its own stamp (GalSim draws one profile at a time), with the sky and
  ``galsim.CCDNoise`` (photon and read noise). Needs ``pip install 'oasis-dia[sims]'``.

Outputs: the target ``<simulations>/<name>_samefield_<mode>/`` (its ``data/`` holds the
rendered frames ``<name>_sf000.fits``...; every pipeline output as usual) and, in its
``samefield/`` directory, ``samefield.ecsv`` / ``samefield.txt`` (one row per frame: its
draws, its status in the run and its number of false detections), ``false_detections.png``
(a bar per frame) and ``summary.txt`` (:meth:`SameFieldResult.line`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from oasis_apps.samefield_draw import (
    FrameDraw,
    draw_frames,
    frame_psf,
    linear_wcs,
    source_catalog,
    transform_positions,
    wcs_cards,
)
from oasis_apps.samefield_render import (
    DEFAULT_GAIN,
    DEFAULT_SATURATION,
    MODES,
    import_galsim,
    render_frame,
    render_sources,
)
from oasis_apps.samefield_target import (
    frame_header,
    mark,
    prepare_target,
    resolve_source,
    simulations_dir,
    write_fits,
)
from oasis_core.contracts.errors import InputError
from oasis_core.engine import io
from oasis_core.engine.lock import hold, holds_targets

__all__ = [
    "MODES",
    "FrameDraw",
    "SameFieldResult",
    "draw_frames",
    "frame_psf",
    "render_frame",
    "render_sources",
    "sim_sameField",
    "sim_same_field",
    "source_catalog",
    "transform_positions",
]

log = logging.getLogger("oasis")

_VERSION = 2  # bump when rendering changes: old simulations are redone


# ------------------------------------------------------------------------------ results


@attrs.frozen(kw_only=True)
class SameFieldResult:
    """What :func:`sim_same_field` measured.

    Attributes
    ----------
    target : Path
        The simulated target (``<simulations>/<name>_samefield_<mode>``).
    source : Path
        The real frame the catalog was made from.
    mode : str
    n_sources : int
        Sources in the catalog (rendered in every frame).
    table : astropy.table.Table
        One row per rendered frame: ``frame``, ``fwhm``, ``rotation``, ``shift_x``,
        ``shift_y``, ``sky_mag``, ``sky`` (ADU, before the rescale), ``noise`` (ADU, the
        Gaussian part, before the rescale), ``scale``, ``offset``,
        ``status`` (``used`` or why the run left the frame out) and ``false`` (kept sources:
        all false; 0 for frames not used).
    false_per_frame : mapping
        Frame name to false detections, for the frames the pipeline used.
    directory : Path
        Where the summary files are (``<target>/samefield``).
    plot : Path or None
        ``false_detections.png``.
    """

    target: Path
    source: Path
    mode: str
    n_sources: int
    table: Any = attrs.field(eq=False, repr=False)
    false_per_frame: Mapping[str, int]
    directory: Path
    plot: Path | None = None

    @property
    def mean_false(self) -> float:
        """Mean false detections per used frame (``nan`` when no frame was used)."""
        values = list(self.false_per_frame.values())
        return float(np.mean(values)) if values else float("nan")

    @property
    def max_false(self) -> int:
        return max(self.false_per_frame.values(), default=0)

    def line(self) -> str:
        n = len(self.table)
        used = len(self.false_per_frame)
        total = sum(self.false_per_frame.values())
        return (
            f"same-field ({self.mode}): {n} frames of {self.n_sources} sources from "
            f"{self.source.name}; {used} used by the pipeline; {total} false detection(s), "
            f"{self.mean_false:.2f} per frame on average (at most {self.max_false})"
        )


# ---------------------------------------------------------------------------- arguments


_WHERE = "oasis sim same-field"


def _interval(value: Any, low: str, high: str) -> tuple[float, float]:
    """``value`` as (low, high), two finite numbers in order (the shared checks: one line
    naming the parameter, its value and its range)."""
    from oasis_core.contracts.validators import finite, satisfies, show

    try:
        lo, hi = value
    except (TypeError, ValueError) as err:
        msg = f"{_WHERE}: {low}, {high} = {value!r}: must be two numbers (low, high)"
        raise InputError(msg) from err
    finite.require(lo, low, _WHERE)
    above = satisfies(
        lambda v: finite.test(v) and v >= lo, f"a finite number >= {low} ({show(lo)})"
    )
    above.require(hi, high, _WHERE)
    return float(lo), float(hi)


# --------------------------------------------------------------------------- simulation


@holds_targets
def sim_same_field(
    location: str | Path,
    numIms: int = 100,
    bkg_mag: float = 22.5,
    fwhm_min: float = 3,
    fwhm_max: float = 6,
    rot_min: float = -2.5,
    rot_max: float = 2.5,
    shift_min: float = -2,
    shift_max: float = 2,
    scale_mult: tuple[float, float] = (0, 1.5),
    scale_add: tuple[float, float] = (-20, 50),
    zero_point: float = 25,
    mode: str = "moffat",
    *,
    frame: str | Path | None = None,
    seed: int = 0,
    jobs: int | None = None,
    registry: Any = None,
    reporter: Any = None,
    plot: bool = True,
) -> SameFieldResult:
    """Render ``numIms`` frames of one real frame's sources, run the pipeline, count the
    (necessarily false) detections per frame.

    Parameters
    ----------
    location : str or Path
        A target (directory or name under ``./OASIS/targets``) or a FITS frame.
    numIms : int
        Frames to render (at least 3).
    bkg_mag : float
        Mean sky brightness, mag per pixel; each frame's is drawn in ``bkg_mag`` ± 1.5.
    fwhm_min, fwhm_max : float
        FWHM interval, px.
    rot_min, rot_max : float
        Rotation interval about the frame centre, degrees.
    shift_min, shift_max : float
        Shift interval on each axis, px.
    scale_mult, scale_add : (float, float)
        Intervals of the linear rescale ``a * image + b`` of each finished frame.
    zero_point : float
        Magnitude of 1 ADU (for the sky).
    mode : str
        ``"moffat"``, ``"gauss"``, ``"real"`` or ``"sky"`` (GalSim).
    frame : str or Path, optional
        The real frame (a path, or a file name in the target's ``data/``); default: the
        target's first frame.
    seed : int
        Same seed, same frames (and a rerun resumes the pipeline).
    jobs : int, optional
        Worker processes of the pipeline.
    registry, reporter : optional
        As for :func:`oasis_core.engine.pipeline.make_context`.
    plot : bool
        Write ``false_detections.png``.

    Returns
    -------
    SameFieldResult

    Raises
    ------
    InputError
        A parameter out of range (the message names it), no frame, or no source found.
    BackendUnavailable
        Mode ``"sky"`` without GalSim.
    """
    from oasis_core.engine.pipeline import Reporter, make_context, run_stages
    from oasis_core.engine.plugins import Registry

    intervals = _check_arguments(
        mode=mode,
        numIms=numIms,
        seed=seed,
        bkg_mag=bkg_mag,
        zero_point=zero_point,
        fwhm=(fwhm_min, fwhm_max),
        rotation=(rot_min, rot_max),
        shift=(shift_min, shift_max),
        scale_mult=scale_mult,
        scale_add=scale_add,
    )
    registry = registry if registry is not None else Registry()
    reporter = reporter or Reporter()

    source_path, source_target = resolve_source(location, frame)
    real = io.read_frame(source_path)
    gain = real.gain if real.gain and real.gain > 0 else DEFAULT_GAIN
    saturation = real.saturation if real.saturation else DEFAULT_SATURATION
    params = {
        "version": _VERSION,
        "source": io.sha256(source_path),
        "mode": mode,
        "numIms": int(numIms),
        "bkg_mag": float(bkg_mag),
        **intervals,  # fwhm, rotation, shift, scale_mult, scale_add
        "zero_point": float(zero_point),
        "seed": int(seed),
    }
    name = source_target.name if source_target is not None else io.frame_name(source_path)
    sim_dir = (simulations_dir(source_target) / f"{name}_samefield_{mode}").resolve()
    hold(sim_dir)  # one run per simulation, until the end
    target, current = prepare_target(sim_dir, params, source_target, registry)
    out_dir = target.path / "samefield"
    catalog, current = _catalog(out_dir / "catalog.ecsv", real, source_path, current=current)
    draws = draw_frames(
        int(numIms),
        seed=seed,
        bkg_mag=float(bkg_mag),
        zero_point=float(zero_point),
        noise=float(catalog.meta["noise"]),
        **intervals,
    )
    names = [f"{io.frame_name(source_path)}_sf{i:03d}" for i in range(len(draws))]
    if not current:
        psf = None
        if mode == "real":
            config = source_target.config_file if source_target is not None else None
            psf = frame_psf(real, registry=registry, config_file=config)
        _render_frames(
            target,
            real,
            catalog,
            dict(zip(names, draws, strict=True)),
            mode=mode,
            source=source_path,
            gain=gain,
            saturation=saturation,
            psf=psf,
            seed=int(seed),
            reporter=reporter,
        )
        io.write_table(catalog, out_dir / "catalog.ecsv")
        mark(target, params, complete=True)

    ctx = make_context(target.path, jobs=jobs, registry=registry, reporter=reporter)
    run_stages(ctx)
    statuses, false = _false_detections(ctx, names)
    table = _frame_table(names, draws, statuses, false)
    table.meta.update({"mode": mode, "source": str(source_path), "n_sources": len(catalog)})
    result = SameFieldResult(
        target=target.path,
        source=source_path,
        mode=mode,
        n_sources=len(catalog),
        table=table,
        false_per_frame=false,
        directory=out_dir,
        plot=out_dir / "false_detections.png" if plot else None,
    )
    _write_result(result)
    reporter.result(result.line())
    return result


#: OasisPy's spelling.
sim_sameField = sim_same_field


def _write_result(result: SameFieldResult) -> None:
    """The frame table (ECSV and text), the plot when asked for, the summary line."""
    io.write_table(result.table, result.directory / "samefield.ecsv")
    io.write_table(result.table, result.directory / "samefield.txt")
    if result.plot is not None:
        false_plot(result, result.plot)
    io.write_text(result.directory / "summary.txt", result.line() + "\n")


def _check_arguments(
    *,
    mode: str,
    numIms: int,
    seed: int,
    bkg_mag: float,
    zero_point: float,
    fwhm: Any,
    rotation: Any,
    shift: Any,
    scale_mult: Any,
    scale_add: Any,
) -> dict[str, tuple[float, float]]:
    """Every argument checked, before any work; the intervals as (low, high) floats."""
    from oasis_core.contracts.validators import finite, integer, non_negative, one_of, positive

    one_of(*MODES).require(mode, "mode", _WHERE)
    integer(3).require(numIms, "numIms", _WHERE)
    integer(0).require(seed, "seed", _WHERE)
    finite.require(bkg_mag, "bkg_mag", _WHERE)
    finite.require(zero_point, "zero_point", _WHERE)
    positive.require(fwhm[0], "fwhm_min", _WHERE)
    intervals = {
        "fwhm": _interval(fwhm, "fwhm_min", "fwhm_max"),
        "rotation": _interval(rotation, "rot_min", "rot_max"),
        "shift": _interval(shift, "shift_min", "shift_max"),
        "scale_mult": _interval(scale_mult, "scale_mult[0]", "scale_mult[1]"),
    }
    non_negative.require(intervals["scale_mult"][0], "scale_mult[0]", _WHERE)
    positive.require(intervals["scale_mult"][1], "scale_mult[1]", _WHERE)
    intervals["scale_add"] = _interval(scale_add, "scale_add[0]", "scale_add[1]")
    if mode == "sky":
        import_galsim()  # fail before any work
    return intervals


def _catalog(path: Path, real: Any, source_path: Path, *, current: bool) -> tuple[Any, bool]:
    """The sources to render: those saved with current frames, else measured on ``real``;
    and whether the frames are still current."""
    from astropy.table import Table

    if current and path.exists():
        return Table.read(path, format="ascii.ecsv"), True
    catalog = source_catalog(real)
    if len(catalog) == 0:
        raise InputError(f"{source_path}: no source found to simulate from")
    return catalog, False


def _render_frames(
    target: Any,
    real: Any,
    catalog: Any,
    draws: Mapping[str, FrameDraw],
    *,
    mode: str,
    source: Path,
    gain: float,
    saturation: float,
    psf: Any,
    seed: int,
    reporter: Any,
) -> None:
    """Render and write each frame (``draws``: its draws by frame name) into the target."""
    shape = real.data.shape
    ra0, dec0, cd0 = linear_wcs(real.header, shape)
    with reporter.progress("render", len(draws)) as advance:
        for i, (frame_name, draw) in enumerate(draws.items()):
            data = render_frame(
                shape,
                catalog,
                draw,
                mode,
                gain=gain,
                saturation=saturation,
                psf=psf,
                seed=[seed, i],
            )
            header = frame_header(
                real.header,
                draw,
                wcs_cards(shape, ra0, dec0, cd0, draw),
                index=i,
                mode=mode,
                source=source,
                n_sources=len(catalog),
                gain=gain,
                saturation=saturation,
            )
            write_fits(target.data / f"{frame_name}.fits", data, header)
            advance()


def _false_detections(ctx: Any, names: Sequence[str]) -> tuple[dict[str, str], dict[str, int]]:
    """Per frame, its status in the run; per frame the run used, the sources it kept."""
    from astropy.table import Table

    from oasis_core.engine.outputs import usable_residuals

    good, _ = usable_residuals(ctx)
    found_path = ctx.target.stage_dir("extract") / "filtered_sources.ecsv"
    kept = Table.read(found_path, format="ascii.ecsv") if found_path.exists() else Table()
    frames_col = np.asarray(kept["frame"]).astype(str) if len(kept) else np.array([], str)
    statuses = _statuses(ctx, names, set(good))
    false = {n: int(np.sum(frames_col == n)) for n in names if statuses[n] == "used"}
    return statuses, false


def _frame_table(
    names: Sequence[str],
    draws: Sequence[FrameDraw],
    statuses: Mapping[str, str],
    false: Mapping[str, int],
) -> Any:
    """One row per frame: its draws, its status in the run, its false detections."""
    from astropy.table import Table

    table = Table(
        {
            "frame": names,
            "fwhm": [d.fwhm for d in draws],
            "rotation": [d.rotation for d in draws],
            "shift_x": [d.shift_x for d in draws],
            "shift_y": [d.shift_y for d in draws],
            "sky_mag": [d.sky_mag for d in draws],
            "sky": [d.sky for d in draws],
            "noise": [d.noise for d in draws],
            "scale": [d.scale for d in draws],
            "offset": [d.offset for d in draws],
            "status": [statuses[n] for n in names],
            "false": [false.get(n, 0) for n in names],
        }
    )
    for col in table.itercols():
        if col.dtype.kind == "f":
            col.info.format = ".4g"
    return table


def _statuses(ctx: Any, names: Sequence[str], good: set[str]) -> dict[str, str]:
    """Per frame: ``used`` or why the run left it out."""
    from astropy.io import fits

    from oasis_core.engine.outputs import residual_path

    out = {}
    align_dir = ctx.target.stage_dir("align")
    for n in names:
        if n in good:
            out[n] = "used"
        elif (ctx.target.archive / f"{n}.fits").exists():
            out[n] = "archived by the psf stage"
        elif not (align_dir / f"{n}.fits").exists():
            out[n] = "not aligned"
        elif not residual_path(ctx, n).exists():
            out[n] = "not subtracted"
        else:
            q = fits.getheader(residual_path(ctx, n)).get("OASQ", "nan")
            out[n] = f"Q {float(q):.3f} below the floor"
    return out


def false_plot(result: SameFieldResult, path: Path) -> None:
    """PNG bar chart of the false detections per frame (frames the run used)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result.false_per_frame)
    values = [result.false_per_frame[n] for n in names]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.22 * len(names) + 2), 4.0), dpi=110)
    ax.bar(np.arange(len(names)), values, color="tab:red", width=0.8)
    if names:
        ax.axhline(result.mean_false, color="0.3", ls="--", label=f"mean {result.mean_false:.2f}")
        ax.legend(loc="upper right", fontsize=8)
    ax.set_xticks(np.arange(len(names)))
    ax.set_xticklabels([n.rsplit("_", 1)[-1] for n in names], rotation=90, fontsize=7)
    ax.set_xlabel("frame")
    ax.set_ylabel("false detections (filtered sources)")
    ax.set_title(
        f"Same-field simulation ({result.mode}): {len(names)} frames, {result.n_sources} sources"
    )
    ax.set_ylim(0, max([*values, 1]) * 1.15)
    fig.tight_layout()
    with io.atomic_write(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
