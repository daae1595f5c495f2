"""The ``oasis`` command line (typer). Commands are thin: parse, call the Python API,
render the result. Progress bars and tables (rich) live here only.

Errors: :func:`main` catches every exception at the top. An
:class:`~oasis_core.errors.OasisError` prints ``error: <message>`` and exits with its
``exit_code`` (1; 2 when the target is busy); any other exception prints one line,
``error: <file:line in function>: <Type>: <message>``, and exits 1; an interrupt (Ctrl-C)
prints ``error: interrupted`` and exits 130. The Python traceback is printed only with
``oasis --debug`` or ``OASIS_DEBUG=1``. Usage errors are click's (exit 2).

Output: a command's text summary goes to stdout, progress and log lines to stderr. Every
command that runs work takes ``-q/--quiet`` (nothing but warnings and errors) and
``-v/--verbose`` (a line per frame, debug messages); every command that prints a summary
takes ``--json`` (the summary as one JSON object, alone on stdout). A stage's backend is
chosen with ``--<stage> NAME`` everywhere; ``--backend``/``-b`` and ``--method`` are hidden
deprecated aliases that print a one-line warning.
"""

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from typer.core import TyperGroup

from oasis_core.errors import OasisError
from oasis_core.stages import stages as all_stages

__all__ = ["app", "main"]


class _Group(TyperGroup):
    """The root command group: an aborted prompt follows the one-line rule too."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except typer.Abort as err:  # click's prompt turns Ctrl-C and end of input into it
            if isinstance(err.__context__, KeyboardInterrupt):
                raise KeyboardInterrupt from err  # exit 130, "error: interrupted"
            raise OasisError(
                "no answer to a prompt (end of input); give the arguments on the command line"
            ) from err


app = typer.Typer(
    cls=_Group,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
    help="OASIS: find variable and transient objects by difference imaging.",
)

log = logging.getLogger("oasis")

PLUGINS_HINT = "see `oasis plugins`"

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
ForceOpt = Annotated[bool, typer.Option("--force", "-f", help="Redo work whose outputs exist.")]
NoConfigOpt = Annotated[bool, typer.Option("--no-config", help="Ignore configs/oasis.toml.")]
QuietOpt = Annotated[
    bool,
    typer.Option(
        "--quiet", "-q", help="Print nothing but warnings and errors (no progress, no summary)."
    ),
]
VerboseOpt = Annotated[
    bool,
    typer.Option("--verbose", "-v", help="More detail: one line per frame, debug messages."),
]
JsonOpt = Annotated[
    bool,
    typer.Option(
        "--json", help="Print the summary as one JSON object on stdout (nothing else there)."
    ),
]
ExecutorOpt = Annotated[
    Literal["local", "dask"] | None,
    typer.Option("--executor", help="Where per-frame work runs (default: local)."),
]
SchedulerOpt = Annotated[
    str | None,
    typer.Option(
        "--scheduler", help="Dask scheduler address (tcp://host:8786); default: a local cluster."
    ),
]


def _backend_opt(stage: str, what: str = "backend name") -> Any:
    return Annotated[
        str | None, typer.Option(f"--{stage}", help=f"The {stage} {what} ({PLUGINS_HINT}).")
    ]


class _Out:
    """How the running command reports: set by :func:`_output`, reset by :func:`main`."""

    quiet = False
    verbose = False
    json = False


def _output(quiet: bool = False, verbose: bool = False, as_json: bool = False) -> None:
    """Set how much the command prints (``-q``, ``-v``, ``--json``) and the log level."""
    if quiet and verbose:
        raise OasisError("give -q/--quiet or -v/--verbose, not both")
    _Out.quiet, _Out.verbose, _Out.json = quiet, verbose, as_json
    quiet_level = logging.WARNING if quiet else logging.INFO
    logging.getLogger("oasis").setLevel(logging.DEBUG if verbose or _Debug.on else quiet_level)


def _say(text: str) -> None:
    """A line of the text summary on stdout (none under ``-q`` or ``--json``)."""
    if not (_Out.quiet or _Out.json):
        typer.echo(text)


def _emit_json(summary: dict[str, Any]) -> None:
    """The summary as one JSON object on stdout, under ``--json``."""
    if _Out.json:
        import json

        typer.echo(json.dumps(_jsonable(summary), allow_nan=False))


def _jsonable(value: Any) -> Any:
    """``value`` with paths, numpy scalars, tables and errors turned into JSON values
    (NaN and infinities become null)."""
    import math

    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if hasattr(value, "colnames"):  # an astropy Table: its rows
        return [{c: _jsonable(row[c]) for c in value.colnames} for row in value]
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, BaseException):
        return f"{type(value).__name__}: {value}"
    if type(value).__name__ == "MaskedConstant":
        return None
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        with contextlib.suppress(TypeError, ValueError):
            value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def _deprecated(old: str, new: str) -> None:
    """One line saying ``old`` is a deprecated spelling of ``new``."""
    log.warning("%s is deprecated; use %s", old, new)


def _pick_backend(stage: str, new: str | None, old: str | None, old_flag: str) -> str | None:
    """The backend named by ``--<stage>`` or by its deprecated spelling ``old_flag``."""
    if old is None:
        return new
    if new is not None and new != old:
        raise OasisError(f"give the {stage} backend once: --{stage} {new} or {old_flag} {old}")
    _deprecated(old_flag, f"--{stage} NAME")
    return old


class _RichReporter:
    """Progress bars and stage summaries on stderr (none under ``-q``); the summaries are
    also kept in :attr:`lines` for ``--json``."""

    def __init__(self, quiet: bool = False) -> None:
        from rich.console import Console

        self.console = Console(stderr=True)
        self.quiet = quiet or _Out.quiet
        self.lines: list[str] = []

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
        self.lines.append(text)
        if not self.quiet:
            self.console.print(text, highlight=False, soft_wrap=True)


class _Debug:
    """Whether tracebacks are shown (``--debug`` or ``OASIS_DEBUG``); reset by :func:`main`."""

    on = False


def _env_debug() -> bool:
    return os.environ.get("OASIS_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.levelno >= logging.WARNING:
            msg = f"{record.levelname.lower()}: {msg}"
        if record.exc_info and _Debug.on:  # tracebacks of per-frame failures: --debug only
            msg += "\n" + self.formatException(record.exc_info)
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


def version_lines() -> list[str]:
    """``oasis --version``: the core's distribution and version, then one line per
    distribution that provides ``oasis.plugins`` entry points (read from the installed
    metadata; no plugin is imported).

    Returns
    -------
    list of str
        ``"oasis-dia 0.1.0"``, then ``"<distribution> <version>: plugins <names>"``.
    """
    from importlib.metadata import PackageNotFoundError, entry_points, version

    try:
        core = version("oasis-dia")
    except PackageNotFoundError:  # a source tree on sys.path, not installed
        from oasis_core import __version__ as core
    names: dict[tuple[str, str], list[str]] = {}
    for ep in entry_points(group="oasis.plugins"):
        dist = ep.dist
        key = (dist.name, dist.version) if dist is not None else ("?", "?")
        names.setdefault(key, []).append(ep.name)
    lines = [f"oasis-dia {core}"]
    for (dist_name, dist_version), plugins in sorted(names.items()):
        lines.append(f"{dist_name} {dist_version}: plugins {', '.join(sorted(plugins))}")
    return lines


def _show_version(value: bool) -> None:
    if value:
        for line in version_lines():
            typer.echo(line)
        raise typer.Exit()


@app.callback()
def _global_options(
    debug: Annotated[
        bool,
        typer.Option(
            "--debug",
            help="On an error, also print the Python traceback (and debug messages); "
            "same as OASIS_DEBUG=1.",
        ),
    ] = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_show_version,
            is_eager=True,
            help="Print the versions of OASIS and of each installed plugin distribution.",
        ),
    ] = False,
) -> None:
    if debug:
        _Debug.on = True
        _setup_logging(verbose=True)


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


def _run_and_report(target: str, stages: list[str] | None, **kwargs: Any) -> None:
    """Run ``stages`` (None: every stage) on ``target`` and print the summary: the outputs'
    place as text, or under ``--json`` ``{"target", "stages": {stage: result},
    "summary": [the stage summary lines]}``."""
    from oasis_core import pipeline as pl

    ctx = pl.make_context(target, **kwargs)
    with pl.closing_executor(ctx):
        result = pl.run_stages(ctx) if stages is None else pl.run_stages(ctx, stages)
    if stages is None:
        _say(f"outputs in {ctx.target.path}: residuals/, sources/ (see sources/total_sources.txt)")
    _emit_json(
        {
            "target": ctx.target.path,
            "stages": result,
            "summary": getattr(ctx.reporter, "lines", []),
        }
    )


def _make_stage_command(stage: str) -> None:
    def command(
        target: TargetArg,
        backend: _backend_opt(stage) = None,
        old_backend: Annotated[
            str | None,
            typer.Option("--backend", "-b", hidden=True, help=f"Deprecated: --{stage} NAME."),
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
    ) -> None:
        _output(quiet, verbose, as_json)
        name = _pick_backend(stage, backend, old_backend, "--backend")
        kwargs = _context_kwargs(
            {stage: name}, option, jobs, force, no_config, quiet, executor, scheduler
        )
        _run_and_report(target, [stage], **kwargs)

    command.__doc__ = f"Run the {stage} stage on TARGET."
    app.command(name=stage)(command)


@app.command()
def init(
    root: Annotated[Path, typer.Argument(help="Directory in which OASIS/ is created.")] = Path("."),
    target: Annotated[
        str | None, typer.Option("--target", "-t", help="Also create this target.")
    ] = None,
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
    sources: Annotated[
        list[Path] | None, typer.Argument(help="Files or directories of frames (unpack mode).")
    ] = None,
    target: Annotated[str, typer.Option("--target", "-t", help="Target name (or path).")] = "",
    unpack: Annotated[bool, typer.Option("--unpack", help="Same as --mode unpack.")] = False,
    mode: Annotated[
        Literal["unpack", "dl"] | None,
        typer.Option(help="unpack (copy local frames) or dl (download from the LCO archive)."),
    ] = None,
    object_name: Annotated[
        str | None, typer.Option("--object", help="dl: object name in the archive.")
    ] = None,
    filter_name: Annotated[
        str | None, typer.Option("--filter", help="dl: filter, e.g. rp.")
    ] = None,
    proposal: Annotated[str | None, typer.Option(help="dl: proposal id.")] = None,
    start: Annotated[str | None, typer.Option(help="dl: from date (YYYY-MM-DD).")] = None,
    end: Annotated[str | None, typer.Option(help="dl: to date, inclusive.")] = None,
    reduction: Annotated[
        int, typer.Option(help="dl: reduction level (91 = BANZAI reduced, 0 = raw).")
    ] = 91,
    limit: Annotated[int | None, typer.Option(help="dl: at most this many frames.")] = None,
    token: Annotated[
        str | None,
        typer.Option(envvar="LCO_TOKEN", help="dl: LCO API token (proprietary data)."),
    ] = None,
    api_url: Annotated[
        str | None, typer.Option("--api-url", help="dl: archive API (default: LCO's).")
    ] = None,
    root: Annotated[Path, typer.Option(help="Directory holding OASIS/.")] = Path("."),
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Bring frames into TARGET's data/: copy local FITS / .fz frames (never moving them),
    or download them from the Las Cumbres Observatory archive (--mode dl)."""
    from oasis_core.tree import Target, init_root

    _output(quiet, verbose)
    chosen = mode or ("unpack" if unpack or sources else "")
    if chosen not in ("unpack", "dl"):
        raise OasisError(
            "oasis get: give --mode unpack (or --unpack) with local frames, or --mode dl "
            "with archive criteria (--object/--proposal ...)"
        )
    if not target:
        raise OasisError("oasis get: give the target with --target NAME")
    path = Path(target)
    if not (path.is_dir() or len(path.parts) > 1):
        path = init_root(root) / "targets" / target
    t = Target(path).create()
    _write_default_config(t)
    if chosen == "unpack":
        from oasis_core.get import unpack as do_unpack

        if not sources:
            raise OasisError("oasis get --mode unpack: give the frames to copy")
        report = do_unpack(sources, t)
        _say(
            f"{t.data}: {len(report.copied)} copied, {len(report.present)} already there, "
            f"{len(report.refused)} refused, {len(report.skipped)} skipped (not FITS names)"
        )
        if report.refused:
            raise OasisError(
                f"oasis get: {len(report.refused)} file(s) refused (see above), not copied into "
                f"{t.data}; fix or remove them and run again"
            )
        return
    from oasis_core.lco import ARCHIVE_URL, download

    result = download(
        t,
        object_name=object_name,
        filter_name=filter_name,
        proposal=proposal,
        start=start,
        end=end,
        reduction=reduction,
        limit=limit,
        token=token,
        api_url=api_url or ARCHIVE_URL,
        progress=False if _Out.quiet else None,
    )
    _say(
        f"{t.data}: {len(result.downloaded)} downloaded, {len(result.present)} already there, "
        f"{len(result.failed)} failed"
    )
    if result.failed:  # each named in one warning line above
        raise OasisError(
            f"oasis get: {len(result.failed)} frame(s) not downloaded into {t.data} "
            "(the reasons are above)"
        )


@app.command()
def plugins(as_json: JsonOpt = False) -> None:
    """List every backend: stage, name, plugin distribution and version, status."""
    from oasis_core.plugins import Registry

    _output(as_json=as_json)
    registry = Registry()
    columns = ("stage", "name", "plugin", "distribution", "version", "status")
    rows = [
        (rec.stage, rec.name, rec.plugin, rec.dist, rec.version, registry.status(rec))
        for rec in registry.all_records()
    ]
    for name, rec in sorted(registry.simulators.items()):
        rows.append(("simulator", name, rec.plugin, rec.dist, rec.version, "available"))
    for broken in registry.pm.oasis_broken:  # type: ignore[attr-defined]
        rows.append(
            ("?", "?", broken.name, broken.dist, broken.version, f"failed to load: {broken.error}")
        )
    for error in registry.errors:
        rows.append(("?", "?", "", "", "", error))
    if as_json:
        _emit_json({"backends": [dict(zip(columns, row, strict=True)) for row in rows]})
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(*columns)
    for row in rows:
        table.add_row(*(str(cell) for cell in row))
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


def run(
    ctx: typer.Context,
    target: Annotated[
        str | None,
        typer.Argument(help="Target; without it, `oasis run` opens an interactive menu."),
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
    verbose: VerboseOpt = False,
    as_json: JsonOpt = False,
    executor: ExecutorOpt = None,
    scheduler: SchedulerOpt = None,
) -> None:
    """Run every stage on TARGET (mask, psf, align, combine, subtract, mr, extract); `oasis
    run` with no TARGET chooses a method from a menu."""
    _output(quiet, verbose, as_json)
    if target is None:
        if ctx.info_name == "pipeline":
            raise OasisError("oasis pipeline: give the TARGET (`oasis run` alone opens the menu)")
        _menu()
        return
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
    _run_and_report(target, None, **kwargs)


# one command, two names: OasisPy's `oasis-run` habit and the explicit `pipeline`
app.command("run")(run)
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
        where = Path(typer.prompt("directory holding OASIS/", default="."))
        get([src], name, True, "unpack", root=where)
    elif choice == "plugins":
        plugins()
    elif choice == "demo":
        demo(Path(typer.prompt("directory for the demo", default="oasis-demo")))
    elif choice == "sim":
        _sim_menu()
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
            _run_and_report(target, None, reporter=_RichReporter())
        else:
            from oasis_core import pipeline as pl

            pl.run_stages(pl.make_context(target, reporter=_RichReporter()), [choice])


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
    mask: _backend_opt("mask", "backend shared by every combination") = None,
    psf: _backend_opt("psf", "backend shared by every combination") = None,
    align: _backend_opt("align", "backend shared by every combination") = None,
    combine: _backend_opt("combine", "backend shared by every combination") = None,
    verbose: VerboseOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Run several backend combinations on TARGET side by side (upstream stages shared)
    and compare them: tables, agreement cutouts and compare/report.html."""
    from oasis_core.compare import compare as run_compare

    _output(quiet, verbose, as_json)
    shared = {"mask": mask, "psf": psf, "align": align, "combine": combine}
    kwargs = _context_kwargs(shared, option, jobs, force, no_config, quiet, executor, scheduler)
    result = run_compare(
        target, subtract=subtract, extract=extract, mr=mr, fakes=fakes, seed=seed, **kwargs
    )
    tables = (("per frame", result.frames), ("summary", result.summary), ("fakes", result.fakes))
    if not (_Out.quiet or _Out.json):
        _print_tables(tables)
    for c in result.skipped:
        _say(f"skipped {c.name}: {c.skipped}")
    _say(
        f"{len(result.agreement)} disagreement(s); tables in {result.directory}; "
        f"report: {result.report}"
    )
    _emit_json(
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


def _print_tables(tables: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    from oasis_core.report import format_rows

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
    from oasis_core.subtraction import choice_text
    from oasis_core.subtraction import subtract_pair as run_pair

    _output(quiet, verbose, as_json)
    name = _pick_backend("subtract", subtract, method, "--method") or "ois"
    options = _cli_overrides(option)
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
    _say(
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
        _say(f"{catalog}: {len(table)} detection(s), {kept} kept" + (f" ({note})" if note else ""))
    _emit_json(summary)


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
) -> None:
    """Simulate a series with transients, run the whole pipeline, and score it."""
    from oasis_core.demo import run_demo

    _output(quiet, verbose)
    kwargs: dict[str, Any] = {"reporter": _RichReporter(quiet)}
    if jobs is not None:
        kwargs["jobs"] = jobs
    result = run_demo(directory, n_frames=frames, shape=(size, size), seed=seed, **kwargs)
    _say(
        f"outputs in {result.target}: residuals/, sources/filtered_sources.txt, "
        "sources/total_sources.txt"
    )
    _say(f"result: {result.line()}")


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
    from oasis_core import mosaic as mos

    _output(quiet, verbose)
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
    _say(result.line())


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
    from oasis_core.selftest import run_selftest

    _output(quiet, verbose, as_json)
    result = run_selftest(directory, jobs=jobs, reporter=_RichReporter(quiet))
    for line in result.lines():
        if result.ok:
            _say(line)
        elif not _Out.json:  # a failure is shown even under -q: on stderr
            typer.echo(line, err=True)
    _emit_json({"ok": result.ok, "reasons": result.reasons, "target": result.target})
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
    n_fakes: Annotated[int, typer.Option("--n-fakes", "-n", help="Fakes per iteration.")] = 20,
    iterations: Annotated[int, typer.Option(help="Iterations (one frame each).")] = 50,
    input_mode: Annotated[
        Literal["flux", "mag"],
        typer.Option("--mode", help="Fake brightness in flux (ADU) or mag (with the zero point)."),
    ] = "flux",
    psf: Annotated[Literal["moffat", "gauss"], typer.Option("--psf", help="Fake profile.")] = (
        "moffat"
    ),
    subtract: Annotated[
        str, typer.Option("--subtract", help=f"Subtract backend ({PLUGINS_HINT}).")
    ] = "ois",
    f_min: Annotated[float, typer.Option("--f-min", help="Faintest fake (ADU or mag).")] = 0,
    f_max: Annotated[float, typer.Option("--f-max", help="Brightest fake (ADU or mag).")] = 40000,
    scale: Annotated[
        Literal["linear", "log"], typer.Option(help="Flux distribution in flux mode.")
    ] = "linear",
    zero_point: Annotated[float, typer.Option(help="Zero point when the header has none.")] = 25.0,
    seed: Annotated[int, typer.Option(help="Random seed (same seed: same fakes).")] = 0,
    adapt: Annotated[
        bool,
        typer.Option(
            help="Place half the fakes around the measured 50%/90% points (beyond --f-min/"
            "--f-max if needed); --no-adapt: all within the range."
        ),
    ] = True,
    jobs: JobsOpt = None,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Inject fakes into TARGET's frames and measure the detection efficiency."""
    from oasis_core.fakes import sim_fakes as run_fakes

    _output(quiet, verbose)
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
        adapt=adapt,
        jobs=jobs,
        reporter=_RichReporter(quiet),
    )
    _say(f"catalog: {result.directory / 'fakes.txt'}; plot: {result.plot}")
    _say(f"result: {result.line()}")


@sim_app.command("same-field")
def sim_same_field(
    location: Annotated[
        str,
        typer.Argument(help="Target (directory or name) or a FITS frame giving the sources."),
    ],
    num_ims: Annotated[int, typer.Option("--num-ims", "-n", help="Frames to render.")] = 100,
    mode: Annotated[
        Literal["moffat", "gauss", "real", "sky"],
        typer.Option(help="PSF: moffat, gauss, real (the frame's own) or sky (GalSim)."),
    ] = "moffat",
    bkg_mag: Annotated[
        float, typer.Option("--bkg-mag", help="Mean sky, mag/px (each frame within ±1.5).")
    ] = 22.5,
    fwhm_min: Annotated[float, typer.Option("--fwhm-min", help="Smallest FWHM, px.")] = 3.0,
    fwhm_max: Annotated[float, typer.Option("--fwhm-max", help="Largest FWHM, px.")] = 6.0,
    rot_min: Annotated[float, typer.Option("--rot-min", help="Smallest rotation, deg.")] = -2.5,
    rot_max: Annotated[float, typer.Option("--rot-max", help="Largest rotation, deg.")] = 2.5,
    shift_min: Annotated[float, typer.Option("--shift-min", help="Smallest x/y shift, px.")] = -2.0,
    shift_max: Annotated[float, typer.Option("--shift-max", help="Largest x/y shift, px.")] = 2.0,
    scale_mult: Annotated[
        tuple[float, float],
        typer.Option("--scale-mult", help="Interval of the multiplicative rescale a (a*image+b)."),
    ] = (0.0, 1.5),
    scale_add: Annotated[
        tuple[float, float],
        typer.Option("--scale-add", help="Interval of the additive rescale b, ADU."),
    ] = (-20.0, 50.0),
    zero_point: Annotated[
        float, typer.Option("--zero-point", help="Magnitude of 1 ADU (for the sky).")
    ] = 25.0,
    frame: Annotated[
        str | None, typer.Option(help="The real frame (default: the target's first frame).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Random seed (same seed: same frames).")] = 0,
    jobs: JobsOpt = None,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Render frames of one real frame's sources (varied seeing, sky, pointing, scale), run
    the pipeline, and count the false detections per frame."""
    from oasis_core.samefield import sim_same_field as run_same_field

    _output(quiet, verbose)
    result = run_same_field(
        location,
        numIms=num_ims,
        bkg_mag=bkg_mag,
        fwhm_min=fwhm_min,
        fwhm_max=fwhm_max,
        rot_min=rot_min,
        rot_max=rot_max,
        shift_min=shift_min,
        shift_max=shift_max,
        scale_mult=scale_mult,
        scale_add=scale_add,
        zero_point=zero_point,
        mode=mode,
        frame=frame,
        seed=seed,
        jobs=jobs,
        reporter=_RichReporter(quiet),
    )
    _say(f"table: {result.directory / 'samefield.txt'}; plot: {result.plot}")
    _say(f"result: {result.line()}")


def _same_field_menu() -> None:
    sim_same_field(
        typer.prompt("target or FITS frame"),
        num_ims=typer.prompt("frames to render", default=100, type=int),
        mode=typer.prompt("mode (moffat/gauss/real/sky)", default="moffat"),
        bkg_mag=typer.prompt("mean sky (mag/px)", default=22.5, type=float),
        fwhm_min=typer.prompt("FWHM lower bound", default=3.0, type=float),
        fwhm_max=typer.prompt("FWHM upper bound", default=6.0, type=float),
        rot_min=typer.prompt("minimum rotation (deg)", default=-2.5, type=float),
        rot_max=typer.prompt("maximum rotation (deg)", default=2.5, type=float),
        shift_min=typer.prompt("minimum x/y shift (px)", default=-2.0, type=float),
        shift_max=typer.prompt("maximum x/y shift (px)", default=2.0, type=float),
        scale_mult=(0.0, 1.5),
        scale_add=(-20.0, 50.0),
        zero_point=typer.prompt("zero point", default=25.0, type=float),
        frame=None,
        seed=0,
        jobs=None,
        quiet=False,
    )


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
        _same_field_menu()
    else:
        raise OasisError(f"unknown simulation {choice!r}; choose fakes or same-field")


for _stage in all_stages():  # built-in and third-party (``oasis.stages``) stages
    _make_stage_command(_stage.name)


def _one_line(text: str) -> str:
    return " ".join(text.split()) if "\n" in text or "\r" in text else text


def _where(err: BaseException) -> str:
    """Where ``err`` was raised: ``module.py:line in function`` of the innermost frame of
    OASIS's own code (a module named ``oasis*``), and the raising library's frame."""
    frames = []
    tb = err.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        spec = tb.tb_frame.f_globals.get("__spec__")  # `python -m oasis_core.cli`: __main__
        module = str(getattr(spec, "name", None) or tb.tb_frame.f_globals.get("__name__", ""))
        frames.append((module, code.co_filename, tb.tb_lineno, code.co_name))
        tb = tb.tb_next
    if not frames:
        return "oasis"

    def show(frame: tuple[str, str, int, str]) -> str:
        module, filename, line, function = frame
        name = module.replace(".", "/") + ".py" if module and module != "__main__" else filename
        return f"{name}:{line} in {function}"

    ours = [f for f in frames if f[0].split(".")[0].startswith("oasis")]
    if not ours or ours[-1] is frames[-1]:
        return show(frames[-1])
    return f"{show(ours[-1])} (raised in {show(frames[-1])})"


def _report(err: BaseException) -> int:
    """Print ``err`` as one ``error: ...`` line (and its traceback under --debug)."""
    if _Debug.on:
        import traceback

        traceback.print_exception(err, file=sys.stderr)
    if isinstance(err, OasisError):
        typer.echo(f"error: {_one_line(str(err))}", err=True)
        return int(err.exit_code)
    hint = "" if _Debug.on else " (oasis --debug shows the traceback)"
    text = _one_line(str(err))
    fault = f"{type(err).__name__}: {text}" if text else type(err).__name__
    typer.echo(f"error: {_where(err)}: {fault}{hint}", err=True)
    return 1


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app and turn every exception into one ``error: ...`` line.

    Returns
    -------
    int
        The exit status: 0; an :class:`OasisError`'s ``exit_code`` (1, or 2 when the
        target is busy); 1 for any other exception; 130 when interrupted; click's status
        (2) for a usage error.
    """
    _Debug.on = _env_debug()
    _setup_logging(verbose=_Debug.on)
    try:
        app(args=argv, prog_name="oasis")
    except SystemExit as exc:  # typer's standalone mode ends every run with one
        code = exc.code
        if code == 130:  # typer turns Ctrl-C inside a command into Exit(130)
            if _Debug.on and exc.__context__ is not None:
                import traceback

                traceback.print_exception(exc.__context__, file=sys.stderr)
            typer.echo("error: interrupted", err=True)
        return code if isinstance(code, int) else (0 if code is None else 1)
    except KeyboardInterrupt:
        typer.echo("error: interrupted", err=True)
        return 130
    except Exception as err:  # the one place every error becomes one line
        return _report(err)
    finally:
        _Debug.on = False
        _Out.quiet = _Out.verbose = _Out.json = False
    return 0


def entry() -> None:
    """Console-script entry point (``oasis``).

    The process ends with the command: the garbage left is collected once (so that every
    unreachable object is finalized, open files closed), then what lives is frozen
    (``gc.freeze``) so that the interpreter's final cyclic collections do not walk every
    imported module's objects again (0.1-0.3 s with astropy loaded); the operating system
    takes the memory back.
    """
    import gc

    code = main()
    gc.collect()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    entry()
