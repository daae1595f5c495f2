"""The commands built on the pipeline: ``compare``, ``subtract-pair``, ``demo``,
``mosaic`` and ``test``."""

import logging
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from oasis_apps.cli_base import (
    PLUGINS_HINT,
    ExecutorOpt,
    ForceOpt,
    JobsOpt,
    JsonOpt,
    NoConfigOpt,
    OptionOpt,
    Out,
    QuietOpt,
    RichReporter,
    SchedulerOpt,
    TargetArg,
    VerboseOpt,
    app,
    backend_option,
    cli_overrides,
    context_kwargs,
    emit_json,
    pick_backend,
    say,
    set_output,
)
from oasis_core.contracts.errors import OasisError

__all__ = ["compare", "demo", "mosaic", "print_tables", "selftest", "subtract_pair"]

log = logging.getLogger("oasis")


@app.command()
def compare(
    target: TargetArg,
    subtract: Annotated[
        str | None,
        typer.Option(
            help="Subtract backends to compare, comma-separated (ois,zogy,auto...; "
            f"{PLUGINS_HINT})."
        ),
    ] = None,
    extract: Annotated[
        str | None,
        typer.Option(help="Extract backends to compare, comma-separated (native,sextractor)."),
    ] = None,
    mr: Annotated[
        str | None, typer.Option(help="Master-residual backends to compare, comma-separated.")
    ] = None,
    fakes: Annotated[
        int, typer.Option(help="Fakes injected per frame; report completeness (0 = none).")
    ] = 0,
    seed: Annotated[int, typer.Option(help="Random seed of the fakes.")] = 0,
    option: OptionOpt = None,
    jobs: JobsOpt = None,
    force: ForceOpt = False,
    no_config: NoConfigOpt = False,
    quiet: QuietOpt = False,
    executor: ExecutorOpt = None,
    scheduler: SchedulerOpt = None,
    mask: backend_option("mask", "backend shared by every combination") = None,
    psf: backend_option("psf", "backend shared by every combination") = None,
    align: backend_option("align", "backend shared by every combination") = None,
    combine: backend_option("combine", "backend shared by every combination") = None,
    verbose: VerboseOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Run several backend combinations on TARGET side by side (upstream stages shared)
    and compare them: tables, agreement cutouts and compare/report.html."""
    from oasis_apps.compare import compare as run_compare

    set_output(quiet, verbose, as_json)
    shared = {"mask": mask, "psf": psf, "align": align, "combine": combine}
    kwargs = context_kwargs(shared, option, jobs, force, no_config, quiet, executor, scheduler)
    result = run_compare(
        target, subtract=subtract, extract=extract, mr=mr, fakes=fakes, seed=seed, **kwargs
    )
    tables = (("per frame", result.frames), ("summary", result.summary), ("fakes", result.fakes))
    if not (Out.quiet or Out.json):
        print_tables(tables)
    for c in result.skipped:
        say(f"skipped {c.name}: {c.skipped}")
    say(
        f"{len(result.agreement)} disagreement(s); tables in {result.directory}; "
        f"report: {result.report}"
    )
    emit_json(
        {
            "directory": result.directory,
            "report": result.report,
            "summary": result.summary,
            "frames": result.frames,
            "fakes": result.fakes,
            "skipped": {c.name: c.skipped for c in result.skipped},
            "disagreements": len(result.agreement),
        }
    )


def print_tables(tables: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    from oasis_apps.report import format_rows

    console = Console(width=200)
    for title, table in tables:
        if table is not None:
            shown = Table(*table.colnames, title=title)
            for cells in format_rows(table):
                shown.add_row(*cells)
            console.print(shown)


@app.command("subtract-pair")
def subtract_pair(
    science: Annotated[Path, typer.Argument(help="Science frame (FITS).")],
    template: Annotated[Path, typer.Argument(help="Template frame, aligned with SCIENCE.")],
    output: Annotated[Path, typer.Argument(help="Residual to write (FITS).")],
    subtract: Annotated[
        str | None,
        typer.Option(
            "--subtract", help=f"Subtract backend: ois (default), zogy, auto... ({PLUGINS_HINT})."
        ),
    ] = None,
    noise: Annotated[Path | None, typer.Option(help="Also write the noise image here.")] = None,
    catalog: Annotated[
        Path | None,
        typer.Option(
            help="Also detect and filter the residual's candidates (the extract stage's "
            "detection and the core's filters) and write them here (ECSV)."
        ),
    ] = None,
    option: OptionOpt = None,
    method: Annotated[
        str | None, typer.Option("--method", hidden=True, help="Deprecated: --subtract NAME.")
    ] = None,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Subtract one already aligned pair outside any target tree (as hotpants users do)."""
    from oasis_core.engine.pair import subtract_pair as run_pair
    from oasis_core.engine.subtraction import choice_text

    set_output(quiet, verbose, as_json)
    name = pick_backend("subtract", subtract, method, "--method") or "ois"
    options = cli_overrides(option)
    residual = run_pair(
        science, template, output, method=name, noise=noise, catalog=catalog, options=options
    )
    flag = residual.meta.get("flag") or "none"
    chose = choice_text(residual.meta)
    summary: dict[str, Any] = {
        "output": output,
        "subtract": name,
        "q": residual.q,
        "choice": residual.meta.get("choice", 1),
        "tries": residual.meta.get("tries", 1),
        "choices": chose,
        "flag": flag,
        "noise": noise,
    }
    say(
        f"{output}: Q {residual.q:.3f}, configuration {summary['choice']}/{summary['tries']}"
        + (f", choices: {chose}" if chose else "")
        + f", flag: {flag}"
    )
    if catalog is not None:
        from astropy.table import Table

        table = Table.read(catalog, format="ascii.ecsv")
        kept = int(sum(1 for r in table["reason"] if str(r) == "kept")) if len(table) else 0
        note = str(table.meta.get("OASNOTE", ""))
        summary["catalog"] = {"path": catalog, "detections": len(table), "kept": kept}
        summary["catalog"]["note"] = note
        say(f"{catalog}: {len(table)} detection(s), {kept} kept" + (f" ({note})" if note else ""))
    emit_json(summary)


@app.command()
def demo(
    directory: Annotated[Path, typer.Argument(help="Where to create OASIS/ for the demo.")] = Path(
        "oasis-demo"
    ),
    frames: Annotated[int, typer.Option(help="Frames to simulate.")] = 12,
    size: Annotated[int, typer.Option(help="Frame side in pixels.")] = 1024,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 1,
    jobs: JobsOpt = None,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Simulate a series with transients, run the whole pipeline, and score it."""
    import attrs

    from oasis_apps.demo import run_demo

    set_output(quiet, verbose, as_json)
    kwargs: dict[str, Any] = {"reporter": RichReporter(quiet)}
    if jobs is not None:
        kwargs["jobs"] = jobs
    result = run_demo(directory, n_frames=frames, shape=(size, size), seed=seed, **kwargs)
    say(
        f"outputs in {result.target}: residuals/, sources/filtered_sources.txt, "
        "sources/total_sources.txt"
    )
    say(f"result: {result.line()}")
    emit_json({**attrs.asdict(result), "max_false": result.max_false, "result": result.line()})


@app.command()
def mosaic(
    inputs: Annotated[
        list[str] | None,
        typer.Argument(
            help="Frames or residuals (files, directories, patterns); prompted if none."
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-O", help="Mosaic FITS to write (a PNG goes beside)."),
    ] = None,
    kind: Annotated[
        Literal["frames", "residuals"],
        typer.Option(help="From a target: frames (aligned/ or data/) or residuals."),
    ] = "frames",
    background_match: Annotated[
        bool,
        typer.Option(
            "--background-match/--no-background-match",
            help="Match the inputs' backgrounds where they overlap (Montage mBgModel).",
        ),
    ] = True,
    target: Annotated[
        str | None, typer.Option("--target", "-t", help="Mosaic this target's frames or residuals.")
    ] = None,
    combine: Annotated[Literal["mean", "median"], typer.Option(help="Co-addition.")] = "mean",
    workdir: Annotated[
        Path | None, typer.Option(help="Keep Montage's intermediate files here.")
    ] = None,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Mosaic frames or residuals with MontagePy (OasisPy's MOSAIC); prompts when run bare."""
    from oasis_apps import mosaic as mos

    set_output(quiet, verbose)
    if not inputs and target is None:
        params = mos.ask_parameters(
            lambda question, default: typer.prompt(question, default=default or None)
        )
        if output is not None:
            params["output"] = output
    else:
        if inputs and target is not None:
            raise OasisError("oasis mosaic: give input files or --target, not both")
        params = {
            "inputs": target if target is not None else inputs,
            "output": output or Path("mosaic.fits"),
            "kind": kind,
            "background_match": background_match,
            "combine": combine,
        }
    result = mos.mosaic(**params, workdir=workdir)
    say(result.line())


@app.command("test")
def selftest(
    directory: Annotated[
        Path, typer.Argument(help="Where to simulate the test series (OASIS/ is made there).")
    ] = Path("oasis-selftest"),
    jobs: JobsOpt = None,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Installation self-test: 30 simulated frames, 3 controls in one; the pipeline must
    find exactly them in the master residual."""
    from oasis_apps.selftest import run_selftest

    set_output(quiet, verbose, as_json)
    result = run_selftest(directory, jobs=jobs, reporter=RichReporter(quiet))
    for line in result.lines():
        if result.ok:
            say(line)
        elif not Out.json:  # a failure is shown even under -q: on stderr
            typer.echo(line, err=True)
    emit_json({"ok": result.ok, "reasons": result.reasons, "target": result.target})
    if not result.ok:
        raise typer.Exit(1)
