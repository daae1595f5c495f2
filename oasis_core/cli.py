"""The ``oasis`` command line (typer). Commands are thin: parse, call the Python API,
render the result. Progress bars and tables (rich) live here only."""

import contextlib
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from oasis_core.backends import STAGES
from oasis_core.errors import OasisError

__all__ = ["app", "main"]

app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    help="OASIS: find variable and transient objects by difference imaging.",
)

log = logging.getLogger("oasis")

TargetArg = Annotated[
    str, typer.Argument(help="Target directory, or a name under ./OASIS/targets.")
]
OptionOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--option",
        "-o",
        help="Override a config key: section.key=value or stage.backend.key=value (repeatable).",
    ),
]
JobsOpt = Annotated[
    int | None, typer.Option("--jobs", "-j", help="Worker processes (0 = all cores).")
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Redo work whose outputs exist.")]
NoConfigOpt = Annotated[bool, typer.Option("--no-config", help="Ignore configs/oasis.toml.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
ExecutorOpt = Annotated[
    str | None,
    typer.Option("--executor", help="Executor for per-frame work: local or dask."),
]
SchedulerOpt = Annotated[
    str | None,
    typer.Option(
        "--scheduler", help="Dask scheduler address (tcp://host:8786); default: a local cluster."
    ),
]


def _backend_opt(stage: str) -> Any:
    return Annotated[str | None, typer.Option(f"--{stage}", help=f"{stage} backend name.")]


class _RichReporter:
    """Progress bars on stderr."""

    def __init__(self, quiet: bool = False) -> None:
        from rich.console import Console

        self.console = Console(stderr=True)
        self.quiet = quiet

    @contextlib.contextmanager
    def progress(self, label: str, total: int) -> Iterator[Callable[[], None]]:
        if self.quiet or total == 0:
            yield lambda: None
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        with Progress(
            TextColumn("{task.description:<9}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
            transient=False,
        ) as bar:
            task = bar.add_task(label, total=total)
            yield lambda: bar.advance(task)

    def result(self, text: str) -> None:
        if not self.quiet:
            self.console.print(text, highlight=False, soft_wrap=True)


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.levelno >= logging.WARNING:
            return f"{record.levelname.lower()}: {msg}"
        return msg


class _StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at the time (tests swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(ValueError):  # a closed stream: nowhere to report
            sys.stderr.write(self.format(record) + "\n")


def _setup_logging(verbose: bool = False) -> None:
    logger = logging.getLogger("oasis")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(_Formatter())
        logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)


def _cli_overrides(options: list[str] | None) -> dict[str, Any]:
    from oasis_core.config import parse_assignment

    return dict(parse_assignment(o) for o in options or [])


def _context_kwargs(
    backends: dict[str, str | None],
    options: list[str] | None,
    jobs: int | None,
    force: bool,
    no_config: bool,
    quiet: bool,
    executor: str | None = None,
    scheduler: str | None = None,
) -> dict[str, Any]:
    cli = _cli_overrides(options)
    if executor is not None:
        cli["run.executor"] = executor
    if scheduler is not None:
        cli["run.scheduler"] = scheduler
    for stage, name in backends.items():
        if name:
            cli[f"{stage}.backend"] = name
    if jobs is not None:
        cli["run.jobs"] = jobs
    return {
        "cli": cli,
        "force": force,
        "use_config_file": not no_config,
        "reporter": _RichReporter(quiet),
    }


def _make_stage_command(stage: str) -> None:
    def command(
        target: TargetArg,
        backend: Annotated[
            str | None, typer.Option("--backend", "-b", help=f"{stage} backend name.")
        ] = None,
        option: OptionOpt = None,
        jobs: JobsOpt = None,
        force: ForceOpt = False,
        no_config: NoConfigOpt = False,
        quiet: QuietOpt = False,
        executor: ExecutorOpt = None,
        scheduler: SchedulerOpt = None,
    ) -> None:
        from oasis_core import pipeline as pl

        kwargs = _context_kwargs(
            {stage: backend}, option, jobs, force, no_config, quiet, executor, scheduler
        )
        ctx = pl.make_context(target, **kwargs)
        with pl.closing_executor(ctx):
            pl.run_stages(ctx, [stage])

    command.__doc__ = f"Run the {stage} stage on TARGET."
    app.command(name=stage)(command)


@app.command()
def init(
    root: Annotated[Path, typer.Argument(help="Directory in which OASIS/ is created.")] = Path("."),
    target: Annotated[str | None, typer.Option(help="Also create this target.")] = None,
) -> None:
    """Create ROOT/OASIS/{targets,simulations,temp,archive} (and a target with its config)."""
    from oasis_core.tree import Target, init_root

    base = init_root(root)
    typer.echo(f"created {base}")
    if target:
        t = Target(base / "targets" / target).create()
        _write_default_config(t)
        typer.echo(f"created target {t.path} (config: {t.config_file})")


def _write_default_config(target: Any) -> None:
    from oasis_core import io
    from oasis_core.config import render_config
    from oasis_core.plugins import Registry

    if not target.config_file.exists():
        io.write_text(target.config_file, render_config(Registry()))


@app.command()
def get(
    sources: Annotated[list[Path], typer.Argument(help="Files or directories of frames.")],
    target: Annotated[str, typer.Option("--target", "-t", help="Target name (or path).")],
    unpack: Annotated[
        bool, typer.Option("--unpack", help="Copy local frames (the only mode for now).")
    ] = False,
    root: Annotated[Path, typer.Option(help="Directory holding OASIS/.")] = Path("."),
) -> None:
    """Copy FITS / .fz frames into TARGET's data/ (never moving them)."""
    from oasis_core.get import unpack as do_unpack
    from oasis_core.tree import Target, init_root

    if not unpack:
        raise OasisError(
            "oasis get: give --unpack to copy local frames (downloading from "
            "an archive is not available yet)"
        )
    path = Path(target)
    if not (path.is_dir() or len(path.parts) > 1):
        path = init_root(root) / "targets" / target
    t = Target(path).create()
    _write_default_config(t)
    report = do_unpack(sources, t)
    typer.echo(
        f"{t.data}: {len(report.copied)} copied, {len(report.present)} already there, "
        f"{len(report.refused)} refused"
    )


@app.command()
def plugins() -> None:
    """List every backend: stage, name, plugin distribution and version, status."""
    from rich.console import Console
    from rich.table import Table

    from oasis_core.plugins import Registry

    registry = Registry()
    table = Table("stage", "name", "plugin", "distribution", "version", "status")
    for rec in registry.all_records():
        table.add_row(rec.stage, rec.name, rec.plugin, rec.dist, rec.version, registry.status(rec))
    for name, rec in sorted(registry.simulators.items()):
        table.add_row("simulator", name, rec.plugin, rec.dist, rec.version, "available")
    for broken in registry.pm.oasis_broken:  # type: ignore[attr-defined]
        table.add_row(
            "?", "?", broken.name, broken.dist, broken.version, f"failed to load: {broken.error}"
        )
    for error in registry.errors:
        table.add_row("?", "?", "", "", "", error)
    Console(width=200).print(table)


@app.command()
def config(
    target: Annotated[
        str | None,
        typer.Argument(
            help="Target whose effective configuration to print; without it, the defaults."
        ),
    ] = None,
    option: OptionOpt = None,
) -> None:
    """Print the configuration (every key, its value and its meaning) as TOML."""
    from oasis_core.config import load_config, render_config
    from oasis_core.plugins import Registry
    from oasis_core.tree import find_target

    registry = Registry()
    path = find_target(target).config_file if target else None
    cfg = load_config(path, registry, cli=_cli_overrides(option))
    typer.echo(render_config(registry, cfg), nl=False)


def _pipeline_command(
    target: str,
    mask: str | None,
    psf: str | None,
    align: str | None,
    combine: str | None,
    subtract: str | None,
    mr: str | None,
    extract: str | None,
    option: list[str] | None,
    jobs: int | None,
    force: bool,
    no_config: bool,
    quiet: bool,
    executor: str | None = None,
    scheduler: str | None = None,
) -> dict[str, Any]:
    from oasis_core import pipeline as pl

    backends = {
        "mask": mask,
        "psf": psf,
        "align": align,
        "combine": combine,
        "subtract": subtract,
        "mr": mr,
        "extract": extract,
    }
    kwargs = _context_kwargs(backends, option, jobs, force, no_config, quiet, executor, scheduler)
    ctx = pl.make_context(target, **kwargs)
    with pl.closing_executor(ctx):
        result = pl.run_stages(ctx)
    typer.echo(
        f"outputs in {ctx.target.path}: residuals/, sources/ (see sources/total_sources.txt)"
    )
    return result


@app.command()
def pipeline(
    target: TargetArg,
    mask: _backend_opt("mask") = None,
    psf: _backend_opt("psf") = None,
    align: _backend_opt("align") = None,
    combine: _backend_opt("combine") = None,
    subtract: _backend_opt("subtract") = None,
    mr: _backend_opt("mr") = None,
    extract: _backend_opt("extract") = None,
    option: OptionOpt = None,
    jobs: JobsOpt = None,
    force: ForceOpt = False,
    no_config: NoConfigOpt = False,
    quiet: QuietOpt = False,
    executor: ExecutorOpt = None,
    scheduler: SchedulerOpt = None,
) -> None:
    """Run every stage on TARGET (mask, psf, align, combine, subtract, mr, extract)."""
    _pipeline_command(
        target,
        mask,
        psf,
        align,
        combine,
        subtract,
        mr,
        extract,
        option,
        jobs,
        force,
        no_config,
        quiet,
        executor,
        scheduler,
    )


@app.command()
def run(
    target: Annotated[
        str | None, typer.Argument(help="Target; without it, an interactive menu.")
    ] = None,
    mask: _backend_opt("mask") = None,
    psf: _backend_opt("psf") = None,
    align: _backend_opt("align") = None,
    combine: _backend_opt("combine") = None,
    subtract: _backend_opt("subtract") = None,
    mr: _backend_opt("mr") = None,
    extract: _backend_opt("extract") = None,
    option: OptionOpt = None,
    jobs: JobsOpt = None,
    force: ForceOpt = False,
    no_config: NoConfigOpt = False,
    quiet: QuietOpt = False,
    executor: ExecutorOpt = None,
    scheduler: SchedulerOpt = None,
) -> None:
    """Run the pipeline on TARGET, or (with no argument) choose a method from a menu."""
    if target is not None:
        _pipeline_command(
            target,
            mask,
            psf,
            align,
            combine,
            subtract,
            mr,
            extract,
            option,
            jobs,
            force,
            no_config,
            quiet,
            executor,
            scheduler,
        )
        return
    _menu()


MENU = [
    ("initialize", "create the OASIS directory tree"),
    ("get", "copy local frames into a target"),
    *[(s, f"run the {s} stage on a target") for s in STAGES],
    ("pipeline", "run every stage on a target"),
    ("demo", "simulate a series and run the whole pipeline on it"),
    ("sim", "fake-source and same-field simulations"),
    ("test", "installation self-test"),
    ("plugins", "list the installed backends"),
]


def _menu() -> None:
    """OasisPy's ``oasis-run``: pick a method, answer its prompts."""
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
        get([src], name, True, Path(typer.prompt("directory holding OASIS/", default=".")))
    elif choice == "plugins":
        plugins()
    elif choice == "demo":
        demo(Path(typer.prompt("directory for the demo", default="oasis-demo")))
    elif choice == "sim":
        _sim_menu()
    elif choice == "test":
        where = typer.prompt("directory for the test", default="oasis-selftest")
        selftest(Path(where), None, False)
    else:
        target = typer.prompt("target (path or name)")
        if choice == "pipeline":
            _pipeline_command(
                target, None, None, None, None, None, None, None, None, None, False, False, False
            )
        else:
            from oasis_core import pipeline as pl

            pl.run_stages(pl.make_context(target, reporter=_RichReporter()), [choice])


@app.command("subtract-pair")
def subtract_pair(
    science: Annotated[Path, typer.Argument(help="Science frame (FITS).")],
    template: Annotated[Path, typer.Argument(help="Template frame, aligned with SCIENCE.")],
    output: Annotated[Path, typer.Argument(help="Residual to write (FITS).")],
    method: Annotated[str, typer.Option(help="Subtract backend (ois, zogy, hotpants...).")] = "ois",
    noise: Annotated[Path | None, typer.Option(help="Also write the noise image here.")] = None,
    option: OptionOpt = None,
) -> None:
    """Subtract one already aligned pair outside any target tree (as hotpants users do)."""
    from oasis_core.subtraction import subtract_pair as run_pair

    options = _cli_overrides(option)
    residual = run_pair(science, template, output, method=method, noise=noise, options=options)
    flag = residual.meta.get("flag") or "none"
    typer.echo(
        f"{output}: Q {residual.q:.3f}, configuration {residual.meta.get('choice', 1)}"
        f"/{residual.meta.get('tries', 1)}, flag: {flag}"
    )


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
) -> None:
    """Simulate a series with transients, run the whole pipeline, and score it."""
    from oasis_core.demo import run_demo

    kwargs: dict[str, Any] = {"reporter": _RichReporter(quiet)}
    if jobs is not None:
        kwargs["jobs"] = jobs
    result = run_demo(directory, n_frames=frames, shape=(size, size), seed=seed, **kwargs)
    typer.echo(
        f"outputs in {result.target}: residuals/, sources/filtered_sources.txt, "
        "sources/total_sources.txt"
    )
    typer.echo(f"result: {result.line()}")


@app.command("test")
def selftest(
    directory: Annotated[
        Path, typer.Argument(help="Where to simulate the test series (OASIS/ is made there).")
    ] = Path("oasis-selftest"),
    jobs: JobsOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Installation self-test: 30 simulated frames, 3 controls in one; the pipeline must
    find exactly them in the master residual."""
    from oasis_core.selftest import run_selftest

    result = run_selftest(directory, jobs=jobs, reporter=_RichReporter(quiet))
    for line in result.lines():
        typer.echo(line)
    if not result.ok:
        raise typer.Exit(1)


sim_app = typer.Typer(
    help="Simulations: fake-source completeness (fakes) and false detections (same-field).",
    invoke_without_command=True,
    no_args_is_help=False,
)
app.add_typer(sim_app, name="sim")


@sim_app.callback()
def sim(ctx: typer.Context) -> None:
    """Without a sub-command: choose a simulation and answer its prompts (OasisPy's SIM)."""
    if ctx.invoked_subcommand is None:
        _sim_menu()


@sim_app.command("fakes")
def sim_fakes(
    target: TargetArg,
    n_fakes: Annotated[int, typer.Option("--n-fakes", help="Fakes per iteration.")] = 20,
    iterations: Annotated[int, typer.Option(help="Iterations (one frame each).")] = 50,
    input_mode: Annotated[
        str, typer.Option("--mode", help="'flux' (ADU) or 'mag' (with the zero point).")
    ] = "flux",
    psf: Annotated[str, typer.Option("--psf", help="Fake profile: moffat or gauss.")] = "moffat",
    subtract: Annotated[str, typer.Option(help="Subtract backend.")] = "ois",
    f_min: Annotated[float, typer.Option("--f-min", help="Faintest fake (ADU or mag).")] = 0,
    f_max: Annotated[float, typer.Option("--f-max", help="Brightest fake (ADU or mag).")] = 40000,
    scale: Annotated[
        str, typer.Option(help="Flux distribution in flux mode: linear or log.")
    ] = "linear",
    zero_point: Annotated[
        float, typer.Option(help="Zero point when the header has none.")
    ] = 25.0,
    seed: Annotated[int, typer.Option(help="Random seed (same seed: same fakes).")] = 0,
    jobs: JobsOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Inject fakes into TARGET's frames and measure the detection efficiency."""
    from oasis_core.fakes import sim_fakes as run_fakes

    result = run_fakes(
        target,
        n_fakes=n_fakes,
        iterations=iterations,
        input_mode=input_mode,
        PSF=psf,
        subtract_method=subtract,
        f_min=f_min,
        f_max=f_max,
        flux_scale=scale,
        zero_point=zero_point,
        seed=seed,
        jobs=jobs,
        reporter=_RichReporter(quiet),
    )
    typer.echo(f"catalog: {result.directory / 'fakes.txt'}; plot: {result.plot}")
    typer.echo(f"result: {result.line()}")


def _sim_menu() -> None:
    choice = typer.prompt("simulation (fakes / same-field)").strip()
    if choice == "fakes":
        target = typer.prompt("target (path or name)")
        sim_fakes(
            target,
            n_fakes=typer.prompt("fakes per iteration", default=20, type=int),
            iterations=typer.prompt("iterations", default=50, type=int),
            input_mode=typer.prompt("input mode (flux/mag)", default="flux"),
            psf=typer.prompt("PSF (moffat/gauss)", default="moffat"),
            subtract=typer.prompt("subtract method", default="ois"),
            f_min=typer.prompt("faintest fake", default=0.0, type=float),
            f_max=typer.prompt("brightest fake", default=40000.0, type=float),
            scale="linear",
            zero_point=25.0,
            seed=0,
            jobs=None,
            quiet=False,
        )
    elif choice in ("same-field", "samefield", "same_field"):
        same = globals().get("sim_same_field")
        if same is None:
            raise OasisError("same-field simulation is not available")
        same_field_menu = globals()["_same_field_menu"]
        same_field_menu()
    else:
        raise OasisError(f"unknown simulation {choice!r}; choose fakes or same-field")


for _stage in STAGES:
    _make_stage_command(_stage)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app; an :class:`OasisError` becomes ``error: ...``, exit 1."""
    _setup_logging()
    try:
        app(args=argv, prog_name="oasis")
    except OasisError as err:
        typer.echo(f"error: {err}", err=True)
        return 1
    except SystemExit as exc:  # typer's standalone mode ends every run with one
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    return 0


def entry() -> None:
    """Console-script entry point (``oasis``)."""
    sys.exit(main())


if __name__ == "__main__":
    entry()
