"""``oasis run`` (also ``oasis pipeline``): every stage on a target, or, with no target,
OasisPy's menu of methods (:func:`menu`), each asking for its inputs."""

import inspect
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from oasis_apps.cli_base import (
    ExecutorOpt,
    ForceOpt,
    JobsOpt,
    JsonOpt,
    NoConfigOpt,
    OptionOpt,
    QuietOpt,
    RichReporter,
    SchedulerOpt,
    VerboseOpt,
    app,
    backend_option,
    context_kwargs,
    run_and_report,
    set_output,
)
from oasis_core.contracts.errors import OasisError
from oasis_core.contracts.stages import stages as all_stages

__all__ = ["MENU", "menu", "run"]

log = logging.getLogger("oasis")


def run(
    ctx: typer.Context,
    target: Annotated[
        str | None,
        typer.Argument(help="Target; without it, `oasis run` opens an interactive menu."),
    ] = None,
    option: OptionOpt = None,
    jobs: JobsOpt = None,
    force: ForceOpt = False,
    no_config: NoConfigOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
    as_json: JsonOpt = False,
    executor: ExecutorOpt = None,
    scheduler: SchedulerOpt = None,
    **backends: str | None,
) -> None:
    """Run every stage on TARGET, in order; `oasis run` with no TARGET chooses a method
    from a menu."""
    set_output(quiet, verbose, as_json)
    if target is None:
        if ctx.info_name == "pipeline":
            raise OasisError("oasis pipeline: give the TARGET (`oasis run` alone opens the menu)")
        menu()
        return
    kwargs = context_kwargs(backends, option, jobs, force, no_config, quiet, executor, scheduler)
    run_and_report(target, None, **kwargs)


def _with_stage_options(command: Callable[..., None]) -> Callable[..., None]:
    """``command`` with one ``--<stage> NAME`` option per stage of the registry (built-in
    and third-party, in run order), taken in by its ``**backends``."""
    signature = inspect.signature(command)
    fixed = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
    stage_params = [
        inspect.Parameter(
            stage.name,
            inspect.Parameter.KEYWORD_ONLY,
            default=None,
            annotation=backend_option(stage.name),
        )
        for stage in all_stages()
    ]
    command.__signature__ = signature.replace(parameters=[*fixed, *stage_params])  # type: ignore[attr-defined]
    return command


# one command, two names: OasisPy's `oasis-run` habit and the explicit `pipeline`
app.command("run")(_with_stage_options(run))
app.command("pipeline")(run)


MENU = [
    ("initialize", "create the OASIS directory tree"),
    ("get", "copy local frames into a target (oasis get --mode dl downloads from LCO)"),
    *[(s.name, s.description or f"run the {s.name} stage on a target") for s in all_stages()],
    ("pipeline", "run every stage on a target"),
    ("compare", "compare backend combinations on a target"),
    ("demo", "simulate a series and run the whole pipeline on it"),
    ("sim", "fake-source and same-field simulations"),
    ("test", "installation self-test"),
    ("mosaic", "mosaic frames or residuals (MontagePy)"),
    ("plugins", "list the installed backends"),
]


def menu() -> None:
    """OasisPy's ``oasis-run``: pick a method, answer its prompts."""
    from oasis_apps.cli_sim import sim_menu
    from oasis_apps.cli_stages import get, init, plugins
    from oasis_apps.cli_tools import compare, demo, mosaic, selftest

    typer.echo("OASIS methods:")
    for i, (name, text) in enumerate(MENU, 1):
        typer.echo(f"  {i:2d}. {name:<10} {text}")
    choice = typer.prompt("method (number or name)").strip()
    names = [m[0] for m in MENU]
    if choice.isdigit() and 1 <= int(choice) <= len(MENU):
        choice = names[int(choice) - 1]
    if choice not in names:
        raise OasisError(f"unknown method {choice!r}; choose one of {', '.join(names)}")
    if choice == "initialize":
        init(Path(typer.prompt("directory for OASIS/", default=".")), None)
    elif choice == "get":
        src = Path(typer.prompt("frames to copy (file or directory)"))
        name = typer.prompt("target name")
        where = Path(typer.prompt("directory holding OASIS/", default="."))
        get([src], name, True, "unpack", root=where)
    elif choice == "plugins":
        plugins()
    elif choice == "demo":
        demo(Path(typer.prompt("directory for the demo", default="oasis-demo")))
    elif choice == "sim":
        sim_menu()
    elif choice == "compare":
        compare(
            typer.prompt("target (path or name)"),
            subtract=typer.prompt("subtract backends (comma-separated)", default="ois,zogy"),
            extract=None,
            mr=None,
            fakes=0,
            seed=0,
            option=None,
            jobs=None,
            force=False,
            no_config=False,
            quiet=False,
            executor=None,
            scheduler=None,
        )
    elif choice == "mosaic":
        mosaic(None, None, "frames", True, None, "mean", None)
    elif choice == "test":
        where = typer.prompt("directory for the test", default="oasis-selftest")
        selftest(Path(where), None, False)
    else:
        target = typer.prompt("target (path or name)")
        if choice == "pipeline":
            run_and_report(target, None, reporter=RichReporter())
        else:
            from oasis_core.engine import pipeline as pl

            pl.run_stages(pl.make_context(target, reporter=RichReporter()), [choice])
