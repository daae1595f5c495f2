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

from oasis_apps.fakes_efficiency import (
    EfficiencyBins,
    efficiency_bins,
    efficiency_figure,
    efficiency_limits,
    efficiency_plot,
    flux_5sigma,
    next_range,
    pass_sizes,
)
from oasis_apps.fakes_inject import (
    APERTURE_FWHM,
    MAX_FAKES,
    draw_fluxes,
    fake_positions,
    inject,
    render_stamps,
    to_mag,
    weight_map,
    zero_point_of,
)
from oasis_apps.fakes_iteration import FakesIteration, iteration_table, run_iteration
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
            return text + (f" ({to_mag(flux, zp):.2f} mag)" if self.input_mode == "mag" else "")

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

    from oasis_core.engine.outputs import psf_path, template_path, usable_residuals
    from oasis_core.engine.pipeline import Reporter, make_context, run_stages
    from oasis_core.engine.sources import filter_options
    from oasis_core.engine.tree import find_target

    _check_arguments(
        n_fakes=n_fakes,
        iterations=iterations,
        input_mode=input_mode,
        PSF=PSF,
        f_min=f_min,
        f_max=f_max,
        flux_scale=flux_scale,
        zero_point=zero_point,
        seed=seed,
    )
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
    names = usable_residuals(ctx)[0]  # the usable ones (their own recorded verdict)
    if not names:
        raise InputError(f"{sim.path}: no usable residual to inject fakes against")
    template = template_path(ctx)
    align_dir = ctx.target.stage_dir("align")
    filters = filter_options(ctx.config.settings["extract"])
    params = {  # numbers as the command line gives them: 100 and 100.0 are one request
        "n_fakes": int(n_fakes),
        "input_mode": input_mode,
        "psf": PSF,
        "subtract": subtract_method,
        "f_min": float(f_min),
        "f_max": float(f_max),
        "scale": flux_scale,
        "seed": int(seed),
    }
    key = _request_key(ctx, params)
    out_dir = sim.path / "fakes"
    it_dir = out_dir / "iterations"
    it_dir.mkdir(parents=True, exist_ok=True)
    headers = {n: fits.getheader(align_dir / f"{n}.fits") for n in names}
    sampler = _Sampler(
        ctx=ctx,
        names=names,
        headers=headers,
        template=template,
        template_weight=weight_map(template),
        fwhms={n: float(fits.getheader(psf_path(ctx, n)).get("FWHM", 3.0)) for n in names},
        filters=filters,
        it_dir=it_dir,
        n_fakes=n_fakes,
        input_mode=input_mode,
        psf=PSF,
        f_min=f_min,
        f_max=f_max,
        flux_scale=flux_scale,
        zero_point=zero_point,
        seed=seed,
    )
    done, failed = _run_passes(sampler, key, iterations=iterations, adapt=adapt)
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
    return _summarise(
        ctx,
        done,
        out_dir,
        zero_point=float(np.median([zero_point_of(h, zero_point) for h in headers.values()])),
        input_mode=input_mode,
        psf=PSF,
        plot=plot,
    )


def _check_arguments(
    *,
    n_fakes: int,
    iterations: int,
    input_mode: str,
    PSF: str,
    f_min: float,
    f_max: float,
    flux_scale: str,
    zero_point: float,
    seed: int,
) -> None:
    """Every argument of :func:`sim_fakes` checked before any work, one line each."""
    from oasis_core.contracts.validators import (
        finite,
        integer,
        non_negative,
        one_of,
        satisfies,
        show,
    )

    where = "oasis sim fakes"
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


def _request_key(ctx: Any, params: Mapping[str, Any]) -> str:
    """The key of a request: its parameters, the subtract options (and the files they
    name) and the extract backend; an iteration made for another key is redone."""
    from oasis_core.engine.provenance import option_files, options_dict

    params = {
        **params,
        "options": options_dict(ctx.config.backend_options("subtract")),
        "files": option_files(ctx.config.backend_options("subtract")),  # what they name
        "extract": ctx.config.backend("extract"),
    }
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:16]


@attrs.frozen(kw_only=True)
class _Sampler:
    """What the iterations are drawn from: the shared run's usable frames (their headers
    and FWHMs), its template, and the requested fakes."""

    ctx: Any
    names: Sequence[str]
    headers: Mapping[str, Any]
    fwhms: Mapping[str, float]
    template: Path
    template_weight: np.ndarray = attrs.field(eq=False, repr=False)
    filters: Mapping[str, Any]
    it_dir: Path
    n_fakes: int
    input_mode: str
    psf: str
    f_min: float
    f_max: float
    flux_scale: str
    zero_point: float
    seed: int

    def task(self, i: int, span: tuple[float, float] | None, pass_key: str) -> Any:
        """Iteration ``i`` (a :class:`FakesIteration`; None when its output is current);
        fluxes over the requested range (``span`` None) or log-uniform over ``span``
        (ADU)."""
        from oasis_core.engine.outputs import psf_path, residual_path
        from oasis_core.engine.provenance import options_dict

        ctx = self.ctx
        align_dir = ctx.target.stage_dir("align")
        det_dir = ctx.target.stage_dir("extract") / "detections"
        rng = np.random.default_rng([self.seed, i])
        frame = self.names[int(rng.integers(len(self.names)))]
        output = self.it_dir / f"iter_{i:04d}.ecsv"
        zp = zero_point_of(self.headers[frame], self.zero_point)
        if iteration_table(output, pass_key) is not None:
            return None
        # where the pipeline can see: unmasked in the frame, the template and the frame's
        # residual (subtraction masks more, e.g. where the kernel could not be applied)
        weight = np.minimum(weight_map(align_dir / f"{frame}.fits"), self.template_weight)
        weight = np.minimum(weight, weight_map(residual_path(ctx, frame)))
        xs, ys = fake_positions(rng, weight, self.n_fakes, self.fwhms[frame])
        if span is None:
            flux = draw_fluxes(
                rng, len(xs), self.input_mode, self.f_min, self.f_max, self.flux_scale, zp
            )
        else:
            flux = 10.0 ** rng.uniform(np.log10(span[0]), np.log10(span[1]), len(xs))
        return FakesIteration(
            index=i,
            frame=frame,
            science=align_dir / f"{frame}.fits",
            science_psf=psf_path(ctx, frame),
            template=self.template,
            template_psf=self.template.with_name("template.psf.fits"),
            x=tuple(xs),
            y=tuple(ys),
            flux=tuple(flux),
            psf_model="gauss" if self.psf.startswith("gauss") else "moffat",
            zero_point=zp,
            subtract_backend=ctx.backend("subtract"),
            subtract_options=ctx.config.backend_options("subtract"),
            # the frame passed the Q floor without fakes (only usable residuals are picked);
            # its fakes, all at once, must not fail it (one real transient would not)
            subtract_settings={**options_dict(ctx.config.settings["subtract"]), "q_floor": 0.0},
            extract_backend=ctx.backend("extract"),
            extract_options=ctx.config.backend_options("extract"),
            filters=self.filters,
            catalogs=tuple(det_dir / f"{n}.ecsv" for n in self.names if n != frame),
            output=output,
            workdir=scratch_dir(ctx.target.path) / "fakes" / f"iter_{i:04d}",
            key=pass_key,
        )


def _run_passes(
    sampler: _Sampler, key: str, *, iterations: int, adapt: bool
) -> tuple[dict[int, Any], list[tuple[str, str]]]:
    """Run the iterations in passes; (the finished iterations' tables by index, the
    failures as (iteration, why)).

    The first pass samples the requested range; the next ones are placed around the
    transition measured so far, so that its 50 % and 90 % points are measured, not
    extrapolated. Every iteration counts, those where nothing is found included."""
    from astropy.table import vstack

    ctx = sampler.ctx
    done: dict[int, Any] = {}
    failed: list[tuple[str, str]] = []
    first = 0
    with ctx.reporter.progress("fakes", iterations) as advance:
        for number, size in enumerate(pass_sizes(iterations, adapt)):
            span = None
            pass_key = key
            if number:
                so_far = vstack([done[i] for i in sorted(done)])
                span = next_range(
                    np.asarray(so_far["flux"], float),
                    np.asarray(so_far["detected"], bool),
                    flux_5sigma(so_far),
                )
                pass_key = hashlib.sha256(f"{key} {span[0]!r} {span[1]!r}".encode()).hexdigest()
                pass_key = pass_key[:16]
                log.info(
                    "fakes: pass %d: %d iterations at %.4g to %.4g ADU", number + 1, size, *span
                )
            indices = range(first, first + size)
            first += size
            tasks = [t for t in (sampler.task(i, span, pass_key) for i in indices) if t is not None]
            for _ in range(size - len(tasks)):
                advance()
            for outcome in ctx.executor.run(run_iteration, [(f"{t.index}", t) for t in tasks]):
                advance()
                if not outcome.ok:
                    why = " ".join(str(outcome.error).split()) or type(outcome.error).__name__
                    failed.append((outcome.key, why))
                    log.warning("fakes: iteration %s failed: %s", outcome.key, why)
            for i in indices:
                table_i = iteration_table(sampler.it_dir / f"iter_{i:04d}.ecsv", pass_key)
                if table_i is not None:
                    done[i] = table_i
            if failed:
                break
    return done, failed


def _summarise(
    ctx: Any,
    done: Mapping[int, Any],
    out_dir: Path,
    *,
    zero_point: float,
    input_mode: str,
    psf: str,
    plot: bool,
) -> FakesResult:
    """Every fake in one table, the limits, the figure and the summary line, written."""
    from astropy.table import vstack

    table = vstack([done[i] for i in sorted(done)])
    table.meta.update({"zero_point": zero_point, "input_mode": input_mode, "psf": psf})
    f50, f90 = efficiency_limits(np.asarray(table["flux"], float), np.asarray(table["detected"]))
    limit_5sigma = flux_5sigma(table)
    for col in table.itercols():
        if col.dtype.kind == "f":
            col.info.format = ".4g"
    io.write_table(table, out_dir / "fakes.txt")
    io.write_table(table, out_dir / "fakes.ecsv")
    png = None
    if plot:
        png = out_dir / "efficiency.png"
        efficiency_plot(table, png, f50, f90, limit_5sigma, input_mode, zero_point)
    result = FakesResult(table, out_dir, png, f50, f90, limit_5sigma, input_mode)
    io.write_text(out_dir / "summary.txt", result.line() + "\n")
    ctx.reporter.result("fakes: " + result.line())
    return result


# ------------------------------------------------------------------------------- summary


def fakes_summary(results: Sequence[FakesResult]) -> str:
    """One line per result (for several targets)."""
    return "\n".join(r.line() for r in results)
