"""``oasis lightcurve TARGET [--at RA,DEC | X,Ypx ...] [--at-file F]``: the photometry
stage alone (forced PSF photometry on every usable residual at the kept sources and the
positions given), then the light curves, ``sources/variables.ecsv`` and
``lightcurves/index.html``."""

from pathlib import Path
from typing import Annotated

import typer

from oasis_apps.cli_base import (
    ForceOpt,
    JobsOpt,
    JsonOpt,
    NoConfigOpt,
    OptionOpt,
    QuietOpt,
    TargetArg,
    VerboseOpt,
    app,
    backend_option,
    context_kwargs,
    run_and_report,
    say,
    set_output,
)

__all__ = ["lightcurve"]


@app.command()
def lightcurve(
    target: TargetArg,
    at: Annotated[
        list[str] | None,
        typer.Option(
            "--at",
            help="Also measure here: 'RA,DEC' (degrees or sexagesimal) or 'X,Ypx' "
            "(0-based template pixels); repeatable.",
        ),
    ] = None,
    at_file: Annotated[
        Path | None,
        typer.Option("--at-file", help="A file of positions to measure, one a line."),
    ] = None,
    no_catalog: Annotated[
        bool, typer.Option("--no-catalog", help="Only the positions given, not the kept sources.")
    ] = False,
    photometry: backend_option("photometry") = None,
    option: OptionOpt = None,
    jobs: JobsOpt = None,
    force: ForceOpt = False,
    no_config: NoConfigOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Light curves of TARGET's sources: forced photometry on every residual."""
    set_output(quiet, verbose, as_json)
    kwargs = context_kwargs({"photometry": photometry}, option, jobs, force, no_config, quiet)
    if at:
        kwargs["cli"]["photometry.at"] = tuple(at)
    if at_file is not None:
        kwargs["cli"]["photometry.at_file"] = str(at_file.resolve())
    if no_catalog:
        kwargs["cli"]["photometry.catalog"] = False
    run_and_report(target, ["photometry"], **kwargs)
    say("light curves in lightcurves/ (index.html, lightcurves.ecsv), sources/variables.ecsv")
