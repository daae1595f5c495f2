"""``oasis sim fakes``: how faint a transient the data can show (OasisPy's ``sim_fakes``).

The target is copied to ``OASIS/simulations/<name>_fakes/`` and run through the pipeline
once there (with the chosen subtract backend); this registration, template and set of
residuals are shared by every iteration. Each iteration then picks a frame whose residual
is usable, injects ``n_fakes`` point sources (a Moffat or Gaussian profile with that
frame's own FWHM) at random positions unmasked in the frame, the template and the frame's
residual into its *aligned* image, subtracts the template with the subtract backend,
detects with the extract backend and applies the core's filters (the majority test
against the other residuals' detections), and matches the fakes to the kept sources.
Iterations are independent tasks on the pipeline's executor, so they run in parallel and
an interrupted run resumes.

Every fake counts: an iteration where nothing survives the filters (the faint end) is 0
found, not dropped. The frame's quality verdict is the pipeline's own (its fakes, all at
once, do not fail the Q floor). An iteration that fails (an error) stops the run with a
one-line :class:`~oasis_core.contracts.errors.StageError` and no summary; the finished iterations
are kept for the next run.

The iterations run in passes (``adapt``, the default): the first half samples the
requested flux range, the rest are placed between the last bin under 50 % and the first
at 90 % of the curve measured so far (beyond the requested range when the transition lies
outside it), so that both points are measured between bins of fakes. A point the bins do
not bracket is reported as such, never extrapolated (:func:`efficiency_limits`).

Outputs in ``<simulation>/fakes/``:

* ``fakes.ecsv`` / ``fakes.txt``: every fake: ``iteration``, ``image``, ``x``, ``y``,
  ``flux`` (injected, ADU), ``mag`` (with the zero point), ``detected``, ``flux_out``
  (measured), ``snr_out``, ``noise`` (residual noise at the position), ``fwhm``, ``q``
  (the injected residual's Q) and ``usable``;
* ``efficiency.png``: detected fraction of equal-count bins (:func:`efficiency_bins`)
  against injected flux (or magnitude) with binomial (Wilson) error bars and the measured
  50 % and 90 % completeness points marked;
* ``summary.txt``: those points and ``flux_5sigma``: 5 sigma of the residual noise summed
  over the catalogs' PSF aperture (radius 1.5 FWHM), ``5 sigma_pix sqrt(pi) 1.5 FWHM``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from oasis_core.contracts.errors import InputError, StageError
from oasis_core.engine import io
from oasis_core.engine.lock import LOCK_NAME, hold, holds_targets, scratch_dir, target_lock

__all__ = [
    "EfficiencyBins",
    "FakesResult",
    "efficiency_bins",
    "efficiency_figure",
    "efficiency_limits",
    "efficiency_plot",
    "inject",
    "render_stamps",
    "sim_fakes",
]

log = logging.getLogger("oasis")

#: Radius of the PSF aperture of :attr:`FakesResult.flux_5sigma`, in FWHM (the aperture the
#: catalogs' fluxes are measured in).
APERTURE_FWHM = 1.5

#: Most fakes per frame (``n_fakes``, ``oasis compare --fakes``): they are placed 3 FWHM
#: apart by a pairwise test, whose time grows as the square of their number.
MAX_FAKES = 1000

#: Header keys read for the photometric zero point, in order.
ZERO_POINT_KEYS = ("MAGZERO", "MAGZP", "ZP", "ZEROPT", "PHOTZP")


@attrs.frozen
class FakesResult:
    """What :func:`sim_fakes` measured.

    ``flux_50`` and ``flux_90`` are ``nan`` unless measured: bracketed by a bin of fakes
    below the level and one at or above it (:meth:`EfficiencyBins.brackets`); ``line()``
    then says where the curve lies instead (every bin above the level, or none reaching it).
    """

    table: Any
    directory: Path
    plot: Path | None
    flux_50: float
    flux_90: float
    flux_5sigma: float
    input_mode: str

    def line(self) -> str:
        n = len(self.table)
        det = int(np.sum(self.table["detected"])) if n else 0
        zp = float(self.table.meta.get("zero_point", 25.0)) if n else 25.0

        def adu(flux: float) -> str:
            text = f"{flux:.4g} ADU"
            return text + (f" ({_to_mag(flux, zp):.2f} mag)" if self.input_mode == "mag" else "")

        def show(flux: float, level: float) -> str:
            if np.isfinite(flux):
                return f"at {adu(flux)}"
            if not n:
                return "not measured (no fakes)"
            bins = efficiency_bins(
                np.asarray(self.table["flux"], float), np.asarray(self.table["detected"])
            )
            return bins.unmeasured(level, adu)

        return (
            f"{det}/{n} fakes detected; 50% completeness {show(self.flux_50, 0.5)}, "
            f"90% {show(self.flux_90, 0.9)}; 5 sigma of the residual noise in the PSF "
            f"aperture (radius {APERTURE_FWHM:g} FWHM): {self.flux_5sigma:.4g} ADU"
        )


# --------------------------------------------------------------------------- rendering


def _sigma(fwhm: float) -> float:
    return fwhm / (2.0 * np.sqrt(2.0 * np.log(2.0)))


def render_stamps(
    dx: np.ndarray, dy: np.ndarray, fwhm: float, model: str = "moffat", beta: float = 2.5
) -> np.ndarray:
    """Unit-flux PSF stamps sampled at offsets ``dx``, ``dy`` (arrays broadcast to
    ``(n, k, k)``) from each source's centre, for a ``"moffat"`` or ``"gauss"`` profile of
    FWHM ``fwhm`` pixels; each stamp is normalised by the profile's analytic total flux,
    so flux falling outside the stamp is lost as it would be on the sky."""
    r2 = dx * dx + dy * dy
    if model in ("gauss", "gaussian"):
        s2 = _sigma(fwhm) ** 2
        return np.exp(-0.5 * r2 / s2) / (2.0 * np.pi * s2)
    if model == "moffat":
        alpha = fwhm / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))
        return (beta - 1.0) / (np.pi * alpha**2) * (1.0 + r2 / alpha**2) ** (-beta)
    raise InputError(f"fake PSF {model!r} is not known; use 'moffat' or 'gauss'")


def inject(
    data: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    flux: np.ndarray,
    fwhm: float,
    model: str = "moffat",
) -> np.ndarray:
    """A copy of ``data`` with point sources of ``flux`` ADU added at (``x``, ``y``)
    (0-based pixel centres), all at once (no loop over sources)."""
    out = np.array(data, dtype=np.float32, copy=True)
    x, y, flux = (np.atleast_1d(np.asarray(a, float)) for a in (x, y, flux))
    if x.size == 0:
        return out
    half = int(np.ceil(4.0 * fwhm)) + 2
    offs = np.arange(-half, half + 1)
    ix, iy = np.rint(x).astype(int), np.rint(y).astype(int)
    px = ix[:, None, None] + offs[None, None, :]
    py = iy[:, None, None] + offs[None, :, None]
    stamps = render_stamps(px - x[:, None, None], py - y[:, None, None], fwhm, model)
    stamps *= flux[:, None, None]
    px, py = np.broadcast_arrays(px, py)
    inside = (px >= 0) & (px < out.shape[1]) & (py >= 0) & (py < out.shape[0])
    np.add.at(out, (py[inside], px[inside]), stamps[inside].astype(np.float32))
    return out


def _to_mag(flux: float | np.ndarray, zero_point: float) -> Any:
    with np.errstate(divide="ignore", invalid="ignore"):
        return zero_point - 2.5 * np.log10(flux)


def _to_flux(mag: np.ndarray, zero_point: float) -> np.ndarray:
    return 10.0 ** (-0.4 * (np.asarray(mag, float) - zero_point))


def zero_point_of(header: Mapping[str, Any], default: float) -> float:
    """The photometric zero point from the header (``MAGZERO``, ``MAGZP``...), else
    ``default``."""
    for key in ZERO_POINT_KEYS:
        value = header.get(key)
        if isinstance(value, (int, float)) and np.isfinite(value):
            return float(value)
    return float(default)


# ------------------------------------------------------------------ one iteration (a task)


@attrs.frozen(kw_only=True)
class _Iteration:
    """One iteration: inject into one aligned frame, subtract, detect, match. Picklable."""

    index: int
    frame: str
    science: Path
    science_psf: Path
    template: Path
    template_psf: Path
    x: tuple[float, ...]
    y: tuple[float, ...]
    flux: tuple[float, ...]
    psf_model: str
    zero_point: float
    subtract_backend: Any
    subtract_options: Any
    subtract_settings: Mapping[str, Any]
    extract_backend: Any
    extract_options: Any
    filters: Mapping[str, Any]
    catalogs: tuple[Path, ...]
    output: Path
    workdir: Path
    key: str


def _run_iteration(it: _Iteration) -> dict[str, Any]:
    from astropy.table import Table

    from oasis_core.contracts.model import Template
    from oasis_core.engine.outputs import load_output
    from oasis_core.engine.pipeline import detect
    from oasis_core.engine.sources import filter_detections, match_catalogs
    from oasis_core.engine.subtraction import residual_cards, run_subtraction

    it.workdir.mkdir(parents=True, exist_ok=True)
    try:
        science = load_output(it.science, it.science_psf)
        template = load_output(it.template, it.template_psf, cls=Template)
        fwhm = float(science.fwhm or (science.psf.fwhm if science.psf else 3.0))
        x, y, flux = (np.asarray(v, float) for v in (it.x, it.y, it.flux))
        data = inject(science.data, x, y, flux, fwhm, it.psf_model)
        science = attrs.evolve(science, data=data)
        residual = run_subtraction(
            it.subtract_backend,
            science,
            template,
            options=it.subtract_options,
            workdir=it.workdir,
            settings=it.subtract_settings,
        )
        header = residual.header.copy()
        for key, value in residual_cards(residual, science, template).items():
            header[key] = value
        residual = attrs.evolve(
            residual,
            header=header,
            name=f"{it.frame}_residual",
            science=it.frame,
            template=template.name,
            psf=science.psf,
        )
        # a residual the quality rules reject (Q below the floor: no weight left) is an
        # outcome, as in the pipeline: its fakes count, none found
        usable = bool(residual.meta.get("usable", True)) and bool((residual.weight > 0).any())
        if usable:
            found = detect(
                it.extract_backend, residual, options=it.extract_options, workdir=it.workdir
            )
            others = [Table.read(p, format="ascii.ecsv") for p in it.catalogs]
            positives = [t[np.asarray(t["sign"]) > 0] for t in others]
            positives.append(found[np.asarray(found["sign"]) > 0])
            found = filter_detections(
                found, catalogs=positives, n_residuals=len(positives), **it.filters
            )
            kept = found[found["reason"] == "kept"]
        else:
            kept = Table(
                {"x": np.zeros(0), "y": np.zeros(0), "flux": np.zeros(0), "snr": np.zeros(0)}
            )
        fakes = Table(
            {
                "iteration": np.full(len(x), it.index, dtype=np.int32),
                "image": np.full(len(x), it.frame),
                "x": x,
                "y": y,
                "flux": flux,
                "mag": _to_mag(flux, it.zero_point),
            }
        )
        match = match_catalogs(fakes, kept, float(it.filters["match_radius"]))
        hit = match >= 0
        fakes["detected"] = hit
        # nothing kept (the faint end) is an outcome, 0 recovered: index only the matches
        for col, name in (("flux_out", "flux"), ("snr_out", "snr")):
            values = np.full(len(x), np.nan)
            values[hit] = np.asarray(kept[name], float)[match[hit]]
            fakes[col] = values
        ix = np.clip(np.rint(x).astype(int), 0, residual.noise.shape[1] - 1)
        iy = np.clip(np.rint(y).astype(int), 0, residual.noise.shape[0] - 1)
        fakes["noise"] = residual.noise[iy, ix].astype(float)
        fakes["fwhm"] = np.full(len(x), fwhm)
        fakes["q"] = np.full(len(x), float(residual.q))
        fakes["usable"] = np.full(len(x), usable)
        fakes.meta["OASFAKES"] = it.key
        io.write_table(fakes, it.output)
    finally:
        shutil.rmtree(it.workdir, ignore_errors=True)
    return {"detected": int(hit.sum()), "n": len(x)}


# ------------------------------------------------------------------------ the simulation


def _simulation_path(target: Any, suffix: str) -> Path:
    """``OASIS/simulations/<name>_<suffix>`` (inside the target when not in a root)."""
    oasis = target.path.parent.parent
    base = oasis / "simulations" if target.path.parent.name == "targets" else target.path
    return (base / f"{target.name}_{suffix}").resolve()


def _simulation_copy(target: Any, suffix: str) -> Any:
    """Copy ``target`` into :func:`_simulation_path` (once; ``data/`` arrives last, so a
    copy cut short is made again); return it. The source is locked while it is copied."""
    import os

    from oasis_core.engine.tree import Target

    dest = _simulation_path(target, suffix)
    if not (dest / "data").is_dir():
        tmp = dest.with_name(dest.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        with target_lock(target.path):  # no run writes the source while it is copied
            shutil.copytree(
                target.path,
                tmp,
                ignore=shutil.ignore_patterns(
                    "compare", ".work", "simulations", LOCK_NAME, dest.name, tmp.name
                ),
                symlinks=True,
            )
        dest.mkdir(parents=True, exist_ok=True)
        for child in sorted(tmp.iterdir(), key=lambda p: p.name == "data"):
            old = dest / child.name
            if old.is_dir():  # left by a copy cut short
                shutil.rmtree(old)
            os.replace(child, old)
        tmp.rmdir()
    return Target(dest)


def _positions(
    rng: np.random.Generator, weight: np.ndarray, n: int, fwhm: float
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` random positions on unmasked pixels, away from edges and from each other."""
    from scipy import ndimage

    margin = int(np.ceil(4 * fwhm)) + 5
    # clear of masked pixels by more than the core's masked-pixel test radius (1.5 FWHM)
    usable = ndimage.binary_erosion(weight > 0, iterations=int(np.ceil(1.5 * fwhm)) + 1)
    usable[:margin] = usable[-margin:] = False
    usable[:, :margin] = usable[:, -margin:] = False
    yy, xx = np.nonzero(usable)
    if len(xx) == 0:
        raise InputError("no unmasked area left to inject fakes into")
    xs: list[float] = []
    ys: list[float] = []
    sep2 = (3.0 * fwhm) ** 2
    for _ in range(50):  # draw in batches; keep those far enough from the others
        pick = rng.integers(0, len(xx), size=4 * n)
        cx = xx[pick] + rng.uniform(-0.5, 0.5, pick.size)
        cy = yy[pick] + rng.uniform(-0.5, 0.5, pick.size)
        for px, py in zip(cx, cy, strict=True):
            if all((px - a) ** 2 + (py - b) ** 2 > sep2 for a, b in zip(xs, ys, strict=True)):
                xs.append(float(px))
                ys.append(float(py))
                if len(xs) == n:
                    return np.array(xs), np.array(ys)
    return np.array(xs), np.array(ys)


def _weight(path: Path) -> np.ndarray:
    """The ``WEIGHT`` extension of an aligned frame or template (ones when it has none)."""
    from astropy.io import fits

    with fits.open(path, memmap=False) as hdul:
        if "WEIGHT" in hdul:
            return np.asarray(hdul["WEIGHT"].data, np.float32)
        return np.ones(hdul[0].shape, np.float32)


def _iteration_table(path: Path, key: str) -> Any:
    """The fakes of a finished iteration whose key is ``key`` (meta cleared), or None."""
    from astropy.table import Table

    if not path.exists():
        return None
    table = Table.read(path, format="ascii.ecsv")
    if table.meta.get("OASFAKES") != key:
        return None
    table.meta.clear()
    return table


def _draw_fluxes(
    rng: np.random.Generator, n: int, mode: str, lo: float, hi: float, scale: str, zp: float
) -> np.ndarray:
    if mode == "mag":
        return _to_flux(rng.uniform(min(lo, hi), max(lo, hi), n), zp)
    if scale == "log":
        lo = max(lo, 1e-3 * hi, 1e-6)
        return 10.0 ** rng.uniform(np.log10(lo), np.log10(hi), n)
    return rng.uniform(lo, hi, n)


@holds_targets
def sim_fakes(
    location: str | Path,
    n_fakes: int = 20,
    iterations: int = 50,
    input_mode: str = "flux",
    PSF: str = "moffat",
    subtract_method: str = "ois",
    f_min: float = 0,
    f_max: float = 40000,
    *,
    flux_scale: str = "linear",
    zero_point: float = 25.0,
    seed: int = 0,
    jobs: int | None = None,
    plot: bool = True,
    adapt: bool = True,
    registry: Any = None,
    reporter: Any = None,
    use_config_file: bool = True,
) -> FakesResult:
    """Inject fakes into a target's frames, run the pipeline, and measure completeness.

    Parameters follow OasisPy's ``sim_fakes``: ``n_fakes`` per iteration, ``iterations``,
    ``input_mode`` ``"flux"`` (``f_min``..``f_max`` in ADU) or ``"mag"`` (magnitudes with
    the frame's zero point: a ``MAGZERO``/``MAGZP``/``ZP`` card, else ``zero_point``),
    ``PSF`` ``"moffat"`` or ``"gauss"``, ``subtract_method`` the subtract backend.
    ``flux_scale="log"`` draws fluxes uniformly in log (more fakes near the limit);
    ``seed`` makes the run repeatable (and resumable).

    With ``adapt`` (the default) the iterations run in passes: the first half samples the
    requested range, the other two quarters are placed (uniformly in log flux) around the
    transition the fakes so far show, beyond the requested range when it lies outside, so
    that the 50 % and 90 % points are measured between bins of fakes, never extrapolated.
    Without it every iteration samples the requested range. The number of fakes is always
    ``n_fakes * iterations``; an iteration where nothing is detected counts (0 found).

    Returns
    -------
    FakesResult
        The table of every fake, the 50 % and 90 % completeness fluxes (``nan`` unless
        bracketed by bins of fakes) and the 5-sigma flux of a point source in the residual
        noise.

    Raises
    ------
    StageError
        An iteration failed (an error, not "nothing found"); the finished iterations are
        kept for the next run and no summary is written.
    """
    from astropy.io import fits
    from astropy.table import vstack

    from oasis_core.contracts.validators import (
        finite,
        integer,
        non_negative,
        one_of,
        satisfies,
        show,
    )
    from oasis_core.engine.pipeline import Reporter, make_context, run_stages
    from oasis_core.engine.provenance import option_files, options_dict
    from oasis_core.engine.sources import filter_options
    from oasis_core.engine.tree import find_target

    where = "oasis sim fakes"  # every argument checked before any work, one line each
    one_of("flux", "mag").require(input_mode, "input_mode", where)
    one_of("moffat", "gauss", "gaussian").require(PSF, "PSF", where)
    one_of("linear", "log").require(flux_scale, "flux_scale", where)
    for name, value, check in (
        ("n_fakes", n_fakes, integer(1, MAX_FAKES)),
        ("iterations", iterations, integer(1)),
        ("seed", seed, integer(0)),
        ("zero_point", zero_point, finite),
        ("f_min", f_min, non_negative if input_mode == "flux" else finite),
    ):
        check.require(value, name, where)
    above = satisfies(
        lambda v: finite.test(v) and v > f_min, f"a finite number > f_min ({show(f_min)})"
    )
    (above if input_mode == "flux" else finite).require(f_max, "f_max", where)
    source = find_target(location)
    hold(_simulation_path(source, "fakes"))  # one run per simulation, until the end
    sim = _simulation_copy(source, "fakes")
    ctx = make_context(
        sim.path,
        backends={"subtract": subtract_method},
        jobs=jobs,
        registry=registry,
        reporter=reporter or Reporter(),
        use_config_file=use_config_file,
    )
    run_stages(ctx)  # the shared run: resumes, so a second call costs nothing
    from oasis_core.engine.outputs import psf_path, residual_path, template_path, usable_residuals

    names = usable_residuals(ctx)[0]  # the usable ones (their own recorded verdict)
    if not names:
        raise InputError(f"{sim.path}: no usable residual to inject fakes against")
    template = template_path(ctx)
    align_dir = ctx.target.stage_dir("align")
    det_dir = ctx.target.stage_dir("extract") / "detections"
    settings = ctx.config.settings["extract"]
    filters = filter_options(settings)
    params = {  # numbers as the command line gives them: 100 and 100.0 are one request
        "n_fakes": int(n_fakes),
        "input_mode": input_mode,
        "psf": PSF,
        "subtract": subtract_method,
        "f_min": float(f_min),
        "f_max": float(f_max),
        "scale": flux_scale,
        "seed": int(seed),
        "options": options_dict(ctx.config.backend_options("subtract")),
        "files": option_files(ctx.config.backend_options("subtract")),  # what they name
        "extract": ctx.config.backend("extract"),
    }
    key = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:16]
    out_dir = sim.path / "fakes"
    it_dir = out_dir / "iterations"
    it_dir.mkdir(parents=True, exist_ok=True)
    headers = {n: fits.getheader(align_dir / f"{n}.fits") for n in names}
    template_weight = _weight(template)
    fwhms = {n: float(fits.getheader(psf_path(ctx, n)).get("FWHM", 3.0)) for n in names}

    def task(i: int, span: tuple[float, float] | None, pass_key: str) -> _Iteration | None:
        """Iteration ``i`` (None when its output is current); fluxes over the requested
        range (``span`` None) or log-uniform over ``span`` (ADU)."""
        rng = np.random.default_rng([seed, i])
        frame = names[int(rng.integers(len(names)))]
        output = it_dir / f"iter_{i:04d}.ecsv"
        zp = zero_point_of(headers[frame], zero_point)
        if _iteration_table(output, pass_key) is not None:
            return None
        # where the pipeline can see: unmasked in the frame, the template and the frame's
        # residual (subtraction masks more, e.g. where the kernel could not be applied)
        weight = np.minimum(_weight(align_dir / f"{frame}.fits"), template_weight)
        weight = np.minimum(weight, _weight(residual_path(ctx, frame)))
        xs, ys = _positions(rng, weight, n_fakes, fwhms[frame])
        if span is None:
            flux = _draw_fluxes(rng, len(xs), input_mode, f_min, f_max, flux_scale, zp)
        else:
            flux = 10.0 ** rng.uniform(np.log10(span[0]), np.log10(span[1]), len(xs))
        return _Iteration(
            index=i,
            frame=frame,
            science=align_dir / f"{frame}.fits",
            science_psf=psf_path(ctx, frame),
            template=template,
            template_psf=template.with_name("template.psf.fits"),
            x=tuple(xs),
            y=tuple(ys),
            flux=tuple(flux),
            psf_model="gauss" if PSF.startswith("gauss") else "moffat",
            zero_point=zp,
            subtract_backend=ctx.backend("subtract"),
            subtract_options=ctx.config.backend_options("subtract"),
            # the frame passed the Q floor without fakes (only usable residuals are picked);
            # its fakes, all at once, must not fail it (one real transient would not)
            subtract_settings={**options_dict(ctx.config.settings["subtract"]), "q_floor": 0.0},
            extract_backend=ctx.backend("extract"),
            extract_options=ctx.config.backend_options("extract"),
            filters=filters,
            catalogs=tuple(det_dir / f"{n}.ecsv" for n in names if n != frame),
            output=output,
            workdir=scratch_dir(ctx.target.path) / "fakes" / f"iter_{i:04d}",
            key=pass_key,
        )

    # Passes: the first samples the requested range; the next ones are placed around the
    # transition measured so far, so that its 50 % and 90 % points are measured, not
    # extrapolated. Every iteration counts, those where nothing is found included.
    done: dict[int, Any] = {}
    failed: list[tuple[str, str]] = []
    first = 0
    with ctx.reporter.progress("fakes", iterations) as advance:
        for number, size in enumerate(_pass_sizes(iterations, adapt)):
            span = None
            pass_key = key
            if number:
                so_far = vstack([done[i] for i in sorted(done)])
                span = _next_range(
                    np.asarray(so_far["flux"], float),
                    np.asarray(so_far["detected"], bool),
                    _flux_5sigma(so_far),
                )
                pass_key = hashlib.sha256(f"{key} {span[0]!r} {span[1]!r}".encode()).hexdigest()
                pass_key = pass_key[:16]
                log.info(
                    "fakes: pass %d: %d iterations at %.4g to %.4g ADU", number + 1, size, *span
                )
            indices = range(first, first + size)
            first += size
            tasks = [t for t in (task(i, span, pass_key) for i in indices) if t is not None]
            for _ in range(size - len(tasks)):
                advance()
            for outcome in ctx.executor.run(_run_iteration, [(f"{t.index}", t) for t in tasks]):
                advance()
                if not outcome.ok:
                    why = " ".join(str(outcome.error).split()) or type(outcome.error).__name__
                    failed.append((outcome.key, why))
                    log.warning("fakes: iteration %s failed: %s", outcome.key, why)
            for i in indices:
                table_i = _iteration_table(it_dir / f"iter_{i:04d}.ecsv", pass_key)
                if table_i is not None:
                    done[i] = table_i
            if failed:
                break
    if failed:  # a real failure (not "nothing found"): no summary from part of the fakes
        for name in ("fakes.txt", "fakes.ecsv", "efficiency.png", "summary.txt"):
            (out_dir / name).unlink(missing_ok=True)
        first_key, first_why = failed[0]
        raise StageError(
            f"{sim.path}: fakes: {len(failed)} iteration(s) failed (iteration {first_key}: "
            f"{first_why}); the {len(done)} finished are kept: run the same command again "
            "to retry the others",
            metadata={"failed": len(failed), "finished": len(done)},
        )
    table = vstack([done[i] for i in sorted(done)])
    zp_all = float(np.median([zero_point_of(h, zero_point) for h in headers.values()]))
    table.meta.update({"zero_point": zp_all, "input_mode": input_mode, "psf": PSF})
    f50, f90 = efficiency_limits(np.asarray(table["flux"], float), np.asarray(table["detected"]))
    flux_5sigma = _flux_5sigma(table)
    for col in table.itercols():
        if col.dtype.kind == "f":
            col.info.format = ".4g"
    io.write_table(table, out_dir / "fakes.txt")
    io.write_table(table, out_dir / "fakes.ecsv")
    png = None
    if plot:
        png = out_dir / "efficiency.png"
        efficiency_plot(table, png, f50, f90, flux_5sigma, input_mode, zp_all)
    result = FakesResult(table, out_dir, png, f50, f90, flux_5sigma, input_mode)
    io.write_text(out_dir / "summary.txt", result.line() + "\n")
    ctx.reporter.result("fakes: " + result.line())
    return result


# -------------------------------------------------------------------- efficiency and plot


def _logistic(logf: np.ndarray, top: float, mu: float, width: float) -> np.ndarray:
    from scipy.special import expit  # no overflow far from the transition

    return top * expit((logf - mu) / width)


def _fit_curve(flux: np.ndarray, detected: np.ndarray) -> tuple[float, float, float] | None:
    """Logistic fit in log10 flux, ``(top, mu, width)``, or None (too few fakes, all
    detected or none, or no convergence)."""
    from scipy.optimize import curve_fit

    flux = np.asarray(flux, float)
    good = np.isfinite(flux) & (flux > 0)
    logf, det = np.log10(flux[good]), np.asarray(detected, float)[good]
    if len(logf) < 5 or det.min() == det.max():
        return None
    p0 = (max(det.mean(), 0.5), float(np.median(logf)), 0.1)
    try:
        (top, mu, width), _ = curve_fit(
            _logistic,
            logf,
            det,
            p0=p0,
            bounds=([0.0, logf.min() - 2, 1e-3], [1.0, logf.max() + 2, 5.0]),
            maxfev=5000,
        )
    except (RuntimeError, ValueError):
        return None
    return float(top), float(mu), float(width)


@attrs.frozen
class EfficiencyBins:
    """Fakes binned by injected flux (equal numbers per bin, in log flux).

    Attributes
    ----------
    flux : ndarray
        Median injected flux of each bin's fakes (where the bin is plotted).
    low, high : ndarray
        The bin's flux edges.
    n, detected : ndarray
        Fakes injected and detected in the bin.
    """

    flux: np.ndarray = attrs.field(eq=False)
    low: np.ndarray = attrs.field(eq=False)
    high: np.ndarray = attrs.field(eq=False)
    n: np.ndarray = attrs.field(eq=False)
    detected: np.ndarray = attrs.field(eq=False)

    @property
    def fraction(self) -> np.ndarray:
        """Detected fraction of each bin."""
        return self.detected / np.maximum(self.n, 1)

    @property
    def monotone(self) -> np.ndarray:
        """The bins' fractions made non-decreasing with flux (weighted isotonic fit, pool
        adjacent violators): completeness as the data show it, without binomial wiggles."""
        blocks: list[list[float]] = []  # [detected, fakes, bins] (every bin has fakes)
        for k, n in zip(self.detected, self.n, strict=True):
            blocks.append([float(k), float(n), 1])
            while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
                k2, n2, c2 = blocks.pop()
                blocks[-1] = [blocks[-1][0] + k2, blocks[-1][1] + n2, blocks[-1][2] + c2]
        return np.concatenate([np.full(int(c), k / n) for k, n, c in blocks] or [np.zeros(0)])

    def crossing(self, level: float) -> tuple[int, int] | str:
        """The adjacent bins between which the completeness crosses ``level`` (indices:
        the first under it, the second at or above it, by :attr:`monotone`), or where the
        crossing lies when no bins bracket it: ``"below"`` (every bin at or above the
        level) or ``"above"`` (none reaches it)."""
        g = self.monotone
        if not len(g) or g[-1] < level:
            return "above"
        first = int(np.argmax(g >= level))
        return "below" if first == 0 else (first - 1, first)

    def brackets(self, flux: float, level: float) -> bool:
        """True when ``flux`` (a completeness ``level`` point) is measured, not
        extrapolated: a bin below it is under ``level`` and a bin above it reaches it."""
        if not np.isfinite(flux) or not len(self.n):
            return False
        frac = self.fraction
        below = (self.flux < flux) & (frac < level)
        above = (self.flux > flux) & (frac >= level)
        return bool(below.any() and above.any())

    def unmeasured(self, level: float, show: Any = None) -> str:
        """Why the ``level`` point is not measured, in words (``show`` formats a flux)."""
        show = show or (lambda f: f"{f:.4g} ADU")
        if not len(self.n):
            return "not measured (no fakes)"
        frac = self.fraction
        pct = f"{level:.0%}"
        if frac.min() >= level:
            return f"below the faintest bin ({show(self.flux[0])}: {frac[0]:.0%} detected)"
        if frac.max() < level:
            return f"not reached (at most {frac.max():.0%} detected, up to {show(self.flux[-1])})"
        return f"not bracketed by the bins (the {pct} crossing is not measured)"


def efficiency_bins(flux: np.ndarray, detected: np.ndarray) -> EfficiencyBins:
    """Bin fakes by injected flux: ``len // 25`` bins (5 to 20, fewer when there are fewer
    than 5 fakes) holding equal numbers of fakes (quantiles of log flux); empty bins are
    dropped. Fakes with a flux that is not positive are left out."""
    flux = np.asarray(flux, float)
    det = np.asarray(detected, bool)
    good = np.isfinite(flux) & (flux > 0)
    flux, det = flux[good], det[good]
    if not len(flux):
        empty = np.zeros(0)
        return EfficiencyBins(empty, empty, empty, empty.astype(int), empty.astype(int))
    logf = np.log10(flux)
    nbins = int(min(np.clip(len(flux) // 25, 5, 20), len(flux)))
    edges = np.unique(np.quantile(logf, np.linspace(0, 1, nbins + 1)))
    if len(edges) < 2:
        edges = np.array([logf[0], logf[0]])
    idx = np.clip(np.digitize(logf, edges) - 1, 0, len(edges) - 2)
    m = len(edges) - 1
    n = np.bincount(idx, minlength=m)
    k = np.bincount(idx, weights=det, minlength=m).astype(int)
    keep = np.flatnonzero(n > 0)
    centre = np.array([10 ** np.median(logf[idx == i]) for i in keep])
    return EfficiencyBins(centre, 10 ** edges[keep], 10 ** edges[keep + 1], n[keep], k[keep])


def efficiency_limits(flux: np.ndarray, detected: np.ndarray) -> tuple[float, float]:
    """Fluxes at 50 % and 90 % completeness, each measured between two adjacent bins of
    :func:`efficiency_bins` whose (monotone) completeness straddles the level, or ``nan``
    when no two bins do (never extrapolated).

    The value is the logistic fit's (in log flux) when the fit agrees with every bin
    (within 3 binomial sigma plus one fake) and crosses the level between those two bins;
    otherwise the straddling bins' completeness interpolated in log flux.
    """
    flux = np.asarray(flux, float)
    det = np.asarray(detected, bool)
    bins = efficiency_bins(flux, det)
    fit = _fit_curve(flux, det)
    if fit is not None and not _fit_agrees(fit, flux, det, bins):
        fit = None
    g = bins.monotone

    def at(level: float) -> float:
        where = bins.crossing(level)
        if isinstance(where, str):
            return float("nan")
        i, j = where
        lo, hi = float(bins.flux[i]), float(bins.flux[j])
        if fit is not None and fit[0] > level:
            top, mu, width = fit
            value = float(10 ** (mu - width * np.log(top / level - 1.0)))
            if lo < value < hi:
                return value
        t = (level - g[i]) / (g[j] - g[i])
        return float(10 ** (np.log10(lo) + t * (np.log10(hi) - np.log10(lo))))

    return at(0.5), at(0.9)


def _fit_agrees(
    fit: tuple[float, float, float], flux: np.ndarray, detected: np.ndarray, bins: EfficiencyBins
) -> bool:
    """True when the logistic ``fit`` predicts every bin's detections within 3 binomial
    sigma plus one fake (a fit across a gap in the fluxes can cross anywhere in it)."""
    good = np.isfinite(flux) & (flux > 0)
    flux, detected = flux[good], detected[good]
    p = _logistic(np.log10(flux), *fit)
    for low, high, k in zip(bins.low, bins.high, bins.detected, strict=True):
        inside = (flux >= low) & (flux <= high)
        expected = float(p[inside].sum())
        sigma = float(np.sqrt((p[inside] * (1 - p[inside])).sum()))
        if abs(k - expected) > 3.0 * sigma + 1.0:
            return False
    return True


def _flux_5sigma(table: Any) -> float:
    """5 sigma of the residual noise summed over the catalogs' PSF aperture (radius
    :data:`APERTURE_FWHM` FWHM): ``5 sigma_pix sqrt(pi) r``."""
    radius = APERTURE_FWHM * float(np.median(table["fwhm"]))
    return float(5.0 * np.median(table["noise"]) * np.sqrt(np.pi) * radius)


def _pass_sizes(iterations: int, adapt: bool) -> list[int]:
    """Iterations per pass: half over the requested range, then two passes placed around
    the transition measured so far (one pass without ``adapt``)."""
    if not adapt:
        return [iterations]
    first = -(-iterations // 2)
    rest = iterations - first
    second = -(-rest // 2)
    return [size for size in (first, second, rest - second) if size > 0]


def _next_range(flux: np.ndarray, detected: np.ndarray, flux_5sigma: float) -> tuple[float, float]:
    """Flux range (ADU) for the next pass: from the last bin under 50 % to the first bin at
    90 % (by :meth:`EfficiencyBins.crossing`), widened by 25 % each way, so that the next
    fakes fall where the curve rises. When no bin is under 50 % the range starts a factor 3
    below the faintest fakes or the 5-sigma flux (where a point source's transition lies),
    whichever is fainter; when none reaches 90 % it ends a factor 3 above the brightest
    fakes or the 5-sigma flux, whichever is brighter."""
    bins = efficiency_bins(flux, detected)
    anchor = flux_5sigma if np.isfinite(flux_5sigma) and flux_5sigma > 0 else None
    faint, bright = float(bins.flux[0]), float(bins.flux[-1])
    c50, c90 = bins.crossing(0.5), bins.crossing(0.9)
    if isinstance(c50, tuple):
        lo = float(bins.flux[c50[0]])
    elif c50 == "below":
        lo = min(faint, anchor or faint) / 3.0
    else:  # never 50 %: from the brightest fakes up
        lo = bright
    if isinstance(c90, tuple):
        hi = float(bins.flux[c90[1]])
    elif c90 == "below":
        hi = faint
    else:
        hi = max(bright, anchor or bright) * 3.0
    hi = max(hi, 1.5 * lo)
    return lo / 1.25, hi * 1.25


def _tick_text(value: float) -> str:
    if 1e-2 <= abs(value) < 1e5:
        return f"{value:g}"
    return f"{value:.0e}".replace("e+0", "e").replace("e-0", "e-").replace("e+", "e")


def _log_ticks(lo: float, hi: float, most: int = 7) -> list[float]:
    """Round tick values for a log axis from ``lo`` to ``hi``: the first of 1-2-5, 1-3 or
    decades giving 3 to ``most`` ticks; else every few decades (a wide range) or linear
    steps (a narrow one); else 2 round values."""
    from matplotlib.ticker import MaxNLocator

    e0, e1 = int(np.floor(np.log10(lo))), int(np.ceil(np.log10(hi)))
    tried = []
    for subs in ((1, 2, 5), (1, 3), (1,)):
        ticks = [m * 10.0**e for e in range(e0, e1 + 1) for m in subs]
        ticks = [t for t in ticks if lo <= t <= hi]
        if 3 <= len(ticks) <= most:
            return ticks
        tried.append(ticks)
    decades = tried[-1]
    if len(decades) > most:
        return decades[:: -(-len(decades) // most)]
    linear = [float(t) for t in MaxNLocator(nbins=5).tick_values(lo, hi) if lo <= t <= hi]
    if len(linear) >= 3:
        return linear
    for ticks in tried:
        if 2 <= len(ticks) <= most:
            return ticks
    return [lo, hi]


def _overlap(boxes: list[Any]) -> bool:
    return any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])


def _thin_ticks(fig: Any, axis: Any) -> None:
    """Drop every other tick of ``axis`` until no two tick labels overlap once drawn."""
    from matplotlib.ticker import FixedLocator

    for _ in range(8):
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        boxes = [
            t.get_window_extent(renderer)
            for t in axis.get_ticklabels()
            if t.get_visible() and t.get_text()
        ]
        if len(boxes) < 3 or not _overlap(boxes):
            return
        locs = list(axis.get_majorticklocs())
        axis.set_major_locator(FixedLocator(locs[::2]))


def efficiency_figure(
    table: Any,
    f50: float,
    f90: float,
    flux_5sigma: float,
    input_mode: str,
    zero_point: float,
) -> Any:
    """The efficiency figure (a matplotlib ``Figure``, Agg): the detected fraction of each
    bin of :func:`efficiency_bins` with Wilson binomial error bars, against injected flux
    (magnitude in ``mag`` mode), with the measured 50 % and 90 % points and the 5-sigma
    flux marked. Tick labels never overlap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from astropy.stats import binom_conf_interval
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    bins = efficiency_bins(np.asarray(table["flux"], float), np.asarray(table["detected"]))
    frac = bins.fraction
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    mag = input_mode == "mag"

    def x_of(flux: Any) -> Any:
        return _to_mag(flux, zero_point) if mag else flux

    if len(bins.n):
        lo, hi = binom_conf_interval(bins.detected, bins.n, interval="wilson")
        ax.errorbar(
            x_of(bins.flux),
            frac,
            yerr=[np.clip(frac - lo, 0, None), np.clip(hi - frac, 0, None)],
            fmt="o-",
            capsize=3,
            label=f"{int(bins.n.sum())} fakes in {len(bins.n)} bins",
        )
    marks = [bins.low[0], bins.high[-1]] if len(bins.n) else []
    for value, style, label in (
        (f50, "--", "50%"),
        (f90, "-", "90%"),
        (flux_5sigma, ":", "5σ in the PSF aperture"),
    ):
        if np.isfinite(value) and value > 0:
            marks.append(value)
            xv = x_of(value)
            shown = f"{xv:.2f} mag" if mag else f"{xv:.4g} ADU"
            ax.axvline(xv, ls=style, color="0.3", label=f"{label}: {shown}")
    for level in (0.5, 0.9):
        ax.axhline(level, color="0.85", lw=0.8, zorder=0)
    ax.set_ylabel("fraction detected")
    ax.set_ylim(-0.03, 1.05)
    ax.yaxis.set_major_locator(FixedLocator([0.0, 0.2, 0.4, 0.6, 0.8, 1.0]))
    if marks:
        f_lo, f_hi = min(marks) / 1.25, max(marks) * 1.25
    else:
        f_lo, f_hi = 1.0, 10.0
    if mag:
        ax.set_xlabel(f"injected magnitude (zero point {zero_point:.2f})")
        ax.set_xlim(x_of(f_lo), x_of(f_hi))  # bright to the right
    else:
        ax.set_xscale("log")
        ax.set_xlim(f_lo, f_hi)
        ax.xaxis.set_major_locator(FixedLocator(_log_ticks(f_lo, f_hi)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: _tick_text(v)))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("injected flux [ADU]")
    ax.set_title("Detection efficiency of injected point sources")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    _thin_ticks(fig, ax.xaxis)
    _thin_ticks(fig, ax.yaxis)
    return fig


def efficiency_plot(
    table: Any,
    path: Path,
    f50: float,
    f90: float,
    flux_5sigma: float,
    input_mode: str,
    zero_point: float,
) -> None:
    """Write :func:`efficiency_figure` to ``path`` (PNG, atomically)."""
    import matplotlib.pyplot as plt

    fig = efficiency_figure(table, f50, f90, flux_5sigma, input_mode, zero_point)
    try:
        with io.atomic_write(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)


def fakes_summary(results: Sequence[FakesResult]) -> str:
    """One line per result (for several targets)."""
    return "\n".join(r.line() for r in results)
