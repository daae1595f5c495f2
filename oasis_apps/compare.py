"""``oasis compare``: several backend combinations on one target, side by side, measured on
the same inputs.

``compare(path, subtract="ois,zogy", extract="native,sextractor")`` runs every combination
of the choices given (the other stages use the configured backend). The stages upstream of
subtract (mask, psf, align, combine) do not vary: they run once, in the target's own
directories, exactly as ``oasis pipeline`` would (and are skipped when already current).
Subtract, mr and extract run per combination under ``TARGET/compare/<combination>/``
(:class:`~oasis_core.engine.tree.Target` with a variant), so no combination overwrites another
and the plain pipeline's residuals and sources are left alone; combinations that share a
subtract choice share its residuals (hard links). A backend that cannot run here is listed
as skipped with the reason. ``subtract="auto"`` is a choice like any other
(:func:`~oasis_core.engine.auto.run_auto`).

Per frame and combination the comparison records Q, the normalised residual noise (1.4826
MAD of (R - median) / noise away from stars), the star-aperture RMS (bright unsaturated
template stars, 1.0 is noise-limited), run time, peak memory, the kept detections and
those confirmed by the master residual. Peak memory is measured in the worker with
:mod:`tracemalloc` (every NumPy and Python allocation of the subtraction); for a backend
that runs an external program the program's maximum resident size
(``getrusage(RUSAGE_CHILDREN)``) is taken when larger. Run times are measured under
tracemalloc, which slows allocation-heavy Python code a little.

Outputs in ``TARGET/compare/``: ``frames.ecsv``/``.md`` (per frame), ``summary.ecsv``/
``.md`` (per combination), ``agreement.ecsv``/``.md`` (sources kept by some combinations
and not by others), ``fakes.ecsv``/``.md`` with ``fakes=N`` and ``report.html`` with its
figures in ``figures/`` (see :mod:`oasis_apps.report`).

With ``fakes=N``, N point sources per frame (random unmasked positions, log-uniform fluxes
from half to twenty times the 5-sigma flux of the frame's sky noise in the PSF aperture)
are injected once into copies of the aligned frames (``compare/fakes/``); every
combination then subtracts and extracts those same frames (``compare/<combination>/
fakes/``), and completeness (fakes matched by a kept source) and false detections (kept
sources matching no fake; a real transient would count here too, equally for every
combination) are reported per combination.
"""

from __future__ import annotations

import logging
import sys
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from oasis_apps.compare_choices import (
    SHARED_STAGES,
    VARIABLE_STAGES,
    Combination,
    combinations,
    parse_choices,
)
from oasis_apps.compare_fakes import run_fakes
from oasis_apps.compare_stages import (
    combination_context,
    count_detections,
    residual_metrics,
    run_downstream,
    run_shared,
    subtract_all,
    template_stars,
    variant,
)
from oasis_apps.compare_tables import (
    FRAME_COLUMNS,
    agreement_table,
    make_table,
    previous_rows,
    save_table,
    summary_table,
)
from oasis_core.contracts.errors import BackendUnavailable, InputError
from oasis_core.engine import io, outputs
from oasis_core.engine.lock import hold, holds_targets

__all__ = [
    "SHARED_STAGES",
    "VARIABLE_STAGES",
    "Combination",
    "CompareResult",
    "compare",
    "parse_choices",
    "residual_metrics",
]

log = logging.getLogger("oasis")


@attrs.frozen
class CompareResult:
    """What :func:`compare` measured (the tables are also saved in ``directory``)."""

    directory: Path
    combinations: tuple[Combination, ...]
    frames: Any
    summary: Any
    agreement: Any
    fakes: Any
    report: Path | None
    runs: Mapping[str, Path]
    aligned: Path
    template: Path
    errors: Mapping[str, str] = attrs.field(factory=dict)

    @property
    def skipped(self) -> list[Combination]:
        return [c for c in self.combinations if c.skipped]

    def text(self) -> str:
        """The summary and per-frame tables as Markdown (what the CLI prints)."""
        from oasis_apps.report import markdown_table

        parts = ["## Summary", "", markdown_table(self.summary), "", "## Per frame", ""]
        parts.append(markdown_table(self.frames))
        if self.fakes is not None:
            parts += ["", "## Fakes", "", markdown_table(self.fakes)]
        parts += ["", f"{len(self.agreement)} source(s) kept by some combinations only"]
        if self.report is not None:
            parts.append(f"report: {self.report}")
        return "\n".join(parts) + "\n"


# --------------------------------------------------------------------------- compare


@holds_targets
def compare(
    path: str | Path,
    *,
    subtract: str | Sequence[str] | None = None,
    mr: str | Sequence[str] | None = None,
    extract: str | Sequence[str] | None = None,
    fakes: int = 0,
    seed: int = 0,
    report: bool = True,
    max_cutouts: int = 100,
    options: Mapping[str, Any] | None = None,
    cli: Mapping[str, Any] | None = None,
    use_config_file: bool = True,
    jobs: int | None = None,
    force: bool = False,
    reporter: Any = None,
    registry: Any = None,
    executor: Any = None,
) -> CompareResult:
    """Run every combination of the backend choices on the target at ``path``.

    Parameters
    ----------
    path : str or Path
        Target directory or name.
    subtract, mr, extract : str or sequence of str, optional
        The backends to compare for that stage (``"ois,zogy"`` or a list; ``"auto"`` is
        a subtract choice). Stages not given use the configured backend.
    fakes : int
        Inject this many fakes per frame into the shared aligned frames and report
        completeness and false detections per combination (0 = no fakes).
    seed : int
        Seed of the fakes' positions and fluxes.
    report : bool
        Write ``compare/report.html`` (and its figures).
    max_cutouts : int
        At most this many disagreements get a cutout strip in the report (the brightest).
    options, cli, use_config_file, jobs, force, reporter, registry, executor
        As for :func:`oasis_core.engine.pipeline.make_context`.

    Returns
    -------
    CompareResult
        The tables (also saved under ``TARGET/compare/``) and where the report is.

    Raises
    ------
    InputError
        When no stage has a choice given.
    UnknownBackend
        For a backend name that is not installed.
    BackendUnavailable
        When no combination can run here.
    """
    from oasis_core.engine import pipeline as pl
    from oasis_core.engine.plugins import Registry

    choices = _checked_choices(
        subtract=subtract, mr=mr, extract=extract, fakes=fakes, seed=seed, max_cutouts=max_cutouts
    )
    common: dict[str, Any] = {
        "options": options,
        "cli": cli,
        "use_config_file": use_config_file,
        "jobs": jobs,
        "force": force,
        "reporter": reporter,
        "registry": registry if registry is not None else Registry(),
    }
    base = pl.make_context(path, **common, executor=executor)
    hold(base.target.path)  # one run per target: held until the comparison ends
    common.update(executor=base.executor, reporter=base.reporter)
    combos = combinations(base, choices)
    runnable = [c for c in combos if not c.skipped]
    for c in combos:
        if c.skipped:
            log.warning("compare: %s skipped: %s", c.name, c.skipped)
    if not runnable:
        raise BackendUnavailable(
            "compare: no combination can run here: "
            + "; ".join(f"{c.name}: {c.skipped}" for c in combos)
        )
    run_shared(base)
    stars = template_stars(base)
    out_dir = base.target.path / "compare"
    rows, errors, runs = _run_combinations(path, runnable, common, stars, out_dir)
    frames = make_table(rows, FRAME_COLUMNS)
    frames.sort(["frame", "combination"])
    fake_table = None
    if fakes > 0:
        fake_table = run_fakes(base, runnable, common, stars, fakes, seed, path)
    radius = base.config.settings["extract"].match_radius
    agreement = agreement_table({c.name: variant(base, c.name) for c in runnable}, radius)
    summary = summary_table(combos, frames, fake_table, errors, runs)
    for stem, table in (
        ("frames", frames),
        ("summary", summary),
        ("agreement", agreement),
        ("fakes", fake_table),
    ):
        if table is not None:
            save_table(table, out_dir / stem)
    result = CompareResult(
        directory=out_dir,
        combinations=tuple(combos),
        frames=frames,
        summary=summary,
        agreement=agreement,
        fakes=fake_table,
        report=None,
        runs=runs,
        aligned=base.target.stage_dir("align"),
        template=outputs.template_path(base),
        errors=errors,
    )
    if report:
        from oasis_apps.report import write_report

        html = write_report(result, out_dir / "report.html", max_cutouts=max_cutouts)
        result = attrs.evolve(result, report=html)
    base.reporter.result(
        f"compare: {len(runnable)} combination(s) run, {len(combos) - len(runnable)} skipped; "
        f"tables in {out_dir}"
    )
    return result


def _checked_choices(
    *,
    subtract: str | Sequence[str] | None,
    mr: str | Sequence[str] | None,
    extract: str | Sequence[str] | None,
    fakes: int,
    seed: int,
    max_cutouts: int,
) -> dict[str, list[str]]:
    """The backends to compare by stage, every argument checked before any work."""
    from oasis_apps.fakes_inject import MAX_FAKES
    from oasis_core.contracts.validators import integer

    for name, value, check in (
        ("fakes", fakes, integer(0, MAX_FAKES)),
        ("seed", seed, integer(0)),
        ("max_cutouts", max_cutouts, integer(0)),
    ):
        check.require(value, name, "oasis compare")  # before any work
    choices = {
        s: parse_choices(v)
        for s, v in (("subtract", subtract), ("mr", mr), ("extract", extract))
        if parse_choices(v)
    }
    if not choices:
        raise InputError("compare: give the backends to compare, e.g. --subtract=ois,zogy")
    return choices


def _run_combinations(
    path: str | Path,
    runnable: Sequence[Combination],
    common: Mapping[str, Any],
    stars: Any,
    out_dir: Path,
) -> tuple[list[dict[str, Any]], dict[str, str], dict[str, Path]]:
    """Run each combination's subtract, mr and extract stages; (a row per frame and
    combination, the error of each combination that failed, each one's directory)."""
    from oasis_core.engine.config import dump_config

    previous = previous_rows(out_dir / "frames.ecsv")
    measured: dict[tuple[str, str], dict[str, Any]] = {}
    first_dir: dict[str, Path] = {}
    rows: list[dict[str, Any]] = []
    errors: dict[str, str] = {}
    runs: dict[str, Path] = {}
    for combo in runnable:
        ctx = variant(combination_context(path, combo, common), combo.name)
        runs[combo.name] = out_dir / combo.name
        io.write_text(runs[combo.name] / "config.toml", dump_config(ctx.config, ctx.registry))
        choice = combo.backends.get("subtract") or ctx.config.backend("subtract")
        names = subtract_all(
            ctx, combo, stars, measured, first_dir.get(choice), previous.get(combo.name)
        )
        first_dir.setdefault(choice, ctx.target.stage_dir("subtract"))
        error = run_downstream(ctx, combo.name)
        if error:
            errors[combo.name] = error
        counts = count_detections(ctx, names)
        for name in names:
            m = measured.get((choice, name), {})
            n, confirmed = counts.get(name, (0, 0))
            rows.append(
                {
                    "frame": name,
                    "combination": combo.name,
                    "subtract": m.get("subtract", choice),
                    "q": m.get("q", np.nan),
                    "noise_norm": m.get("noise_norm", np.nan),
                    "star_rms": m.get("star_rms", np.nan),
                    "seconds": m.get("seconds", np.nan),
                    "peak_mb": m.get("peak_mb", np.nan),
                    "detections": n,
                    "confirmed": confirmed,
                    "flag": m.get("flag", ""),
                }
            )
    return rows, errors, runs


class _CallableCompareModule(types.ModuleType):
    """Lets ``oasis_core.compare(path, subtract="ois,zogy")`` run :func:`compare` while
    ``oasis_apps.compare`` stays this module."""

    def __call__(self, path: str | Path, **choices: Any) -> CompareResult:
        return compare(path, **choices)


sys.modules[__name__].__class__ = _CallableCompareModule
