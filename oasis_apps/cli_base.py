"""What every ``oasis`` command shares: the typer app, the common options, how a command
reports (text on stdout, ``-q``, ``-v``, ``--json``), logging to stderr, progress bars, and
the way a command turns its options into a run's context. The commands themselves are in
:mod:`oasis_apps.cli_stages`, :mod:`oasis_apps.cli_tools`, :mod:`oasis_apps.cli_sim` and
:mod:`oasis_apps.cli_menu`; :mod:`oasis_apps.cli` puts them together.
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

from oasis_core.contracts.errors import OasisError

__all__ = [
    "PLUGINS_HINT",
    "Debug",
    "ExecutorOpt",
    "ForceOpt",
    "JobsOpt",
    "JsonOpt",
    "NoConfigOpt",
    "OptionOpt",
    "Out",
    "QuietOpt",
    "RichReporter",
    "SchedulerOpt",
    "TargetArg",
    "VerboseOpt",
    "app",
    "backend_option",
    "cli_overrides",
    "context_kwargs",
    "deprecated",
    "emit_json",
    "env_debug",
    "jsonable",
    "pick_backend",
    "run_and_report",
    "say",
    "set_output",
    "setup_logging",
    "version_lines",
]


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


def backend_option(stage: str, what: str = "backend name") -> Any:
    return Annotated[
        str | None, typer.Option(f"--{stage}", help=f"The {stage} {what} ({PLUGINS_HINT}).")
    ]


class Out:
    """How the running command reports: set by :func:`set_output`, reset by :func:`main`."""

    quiet = False
    verbose = False
    json = False


def set_output(quiet: bool = False, verbose: bool = False, as_json: bool = False) -> None:
    """Set how much the command prints (``-q``, ``-v``, ``--json``) and the log level."""
    if quiet and verbose:
        raise OasisError("give -q/--quiet or -v/--verbose, not both")
    Out.quiet, Out.verbose, Out.json = quiet, verbose, as_json
    quiet_level = logging.WARNING if quiet else logging.INFO
    logging.getLogger("oasis").setLevel(logging.DEBUG if verbose or Debug.on else quiet_level)


def say(text: str) -> None:
    """A line of the text summary on stdout (none under ``-q`` or ``--json``)."""
    if not (Out.quiet or Out.json):
        typer.echo(text)


def emit_json(summary: dict[str, Any]) -> None:
    """The summary as one JSON object on stdout, under ``--json``."""
    if Out.json:
        import json

        typer.echo(json.dumps(jsonable(summary), allow_nan=False))


def jsonable(value: Any) -> Any:
    """``value`` with paths, numpy scalars, tables and errors turned into JSON values
    (NaN and infinities become null)."""
    import math

    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if hasattr(value, "colnames"):  # an astropy Table: its rows
        return [{c: jsonable(row[c]) for c in value.colnames} for row in value]
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in value]
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


def deprecated(old: str, new: str) -> None:
    """One line saying ``old`` is a deprecated spelling of ``new``."""
    log.warning("%s is deprecated; use %s", old, new)


def pick_backend(stage: str, new: str | None, old: str | None, old_flag: str) -> str | None:
    """The backend named by ``--<stage>`` or by its deprecated spelling ``old_flag``."""
    if old is None:
        return new
    if new is not None and new != old:
        raise OasisError(f"give the {stage} backend once: --{stage} {new} or {old_flag} {old}")
    deprecated(old_flag, f"--{stage} NAME")
    return old


class RichReporter:
    """Progress bars and stage summaries on stderr (none under ``-q``); the summaries are
    also kept in :attr:`lines` for ``--json``."""

    def __init__(self, quiet: bool = False) -> None:
        from rich.console import Console

        self.console = Console(stderr=True)
        self.quiet = quiet or Out.quiet
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


class Debug:
    """Whether tracebacks are shown (``--debug`` or ``OASIS_DEBUG``); reset by :func:`main`."""

    on = False


def env_debug() -> bool:
    return os.environ.get("OASIS_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.levelno >= logging.WARNING:
            msg = f"{record.levelname.lower()}: {msg}"
        if record.exc_info and Debug.on:  # tracebacks of per-frame failures: --debug only
            msg += "\n" + self.formatException(record.exc_info)
        return msg


class _StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at the time (tests swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(ValueError):  # a closed stream: nowhere to report
            sys.stderr.write(self.format(record) + "\n")


def setup_logging(verbose: bool = False) -> None:
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
        Debug.on = True
        setup_logging(verbose=True)


def cli_overrides(options: list[str] | None) -> dict[str, Any]:
    from oasis_core.engine.config import parse_assignment

    return dict(parse_assignment(o) for o in options or [])


def context_kwargs(
    backends: dict[str, str | None],
    options: list[str] | None,
    jobs: int | None,
    force: bool,
    no_config: bool,
    quiet: bool,
    executor: str | None = None,
    scheduler: str | None = None,
) -> dict[str, Any]:
    cli = cli_overrides(options)
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
        "reporter": RichReporter(quiet),
    }


def run_and_report(target: str, stages: list[str] | None, **kwargs: Any) -> None:
    """Run ``stages`` (None: every stage) on ``target`` and print the summary: the outputs'
    place as text, or under ``--json`` ``{"target", "stages": {stage: result},
    "summary": [the stage summary lines]}``."""
    from oasis_core.engine import pipeline as pl

    ctx = pl.make_context(target, **kwargs)
    with pl.closing_executor(ctx):
        result = pl.run_stages(ctx) if stages is None else pl.run_stages(ctx, stages)
    if stages is None:
        say(f"outputs in {ctx.target.path}: residuals/, sources/ (see sources/total_sources.txt)")
    emit_json(
        {
            "target": ctx.target.path,
            "stages": result,
            "summary": getattr(ctx.reporter, "lines", []),
        }
    )
