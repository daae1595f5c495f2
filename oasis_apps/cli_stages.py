"""The commands that work on a target: one per stage (built-in and third-party), ``init``,
``get``, ``plugins`` and ``config``."""

import logging
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from typer.core import TyperGroup

from oasis_apps.cli_base import (
    ExecutorOpt,
    ForceOpt,
    JobsOpt,
    JsonOpt,
    NoConfigOpt,
    OptionOpt,
    Out,
    QuietOpt,
    SchedulerOpt,
    TargetArg,
    VerboseOpt,
    app,
    backend_option,
    cli_overrides,
    context_kwargs,
    emit_json,
    pick_backend,
    run_and_report,
    say,
    set_output,
)
from oasis_core.contracts.errors import OasisError

__all__ = ["config", "get", "init", "make_stage_command", "plugins", "write_default_config"]

log = logging.getLogger("oasis")


def make_stage_command(stage: str) -> None:
    def command(
        target: TargetArg,
        backend: backend_option(stage) = None,
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
        set_output(quiet, verbose, as_json)
        name = pick_backend(stage, backend, old_backend, "--backend")
        kwargs = context_kwargs(
            {stage: name}, option, jobs, force, no_config, quiet, executor, scheduler
        )
        run_and_report(target, [stage], **kwargs)

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
    from oasis_core.engine.tree import Target, init_root

    base = init_root(root)
    typer.echo(f"created {base}")
    if target:
        t = Target(base / "targets" / target).create()
        write_default_config(t)
        typer.echo(f"created target {t.path} (config: {t.config_file})")


def write_default_config(target: Any) -> None:
    from oasis_core.engine import io
    from oasis_core.engine.config import render_config
    from oasis_core.engine.plugins import Registry

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
    from oasis_core.engine.tree import Target, init_root

    set_output(quiet, verbose)
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
    write_default_config(t)
    if chosen == "unpack":
        from oasis_apps.get import unpack as do_unpack

        if not sources:
            raise OasisError("oasis get --mode unpack: give the frames to copy")
        report = do_unpack(sources, t)
        say(
            f"{t.data}: {len(report.copied)} copied, {len(report.present)} already there, "
            f"{len(report.refused)} refused, {len(report.skipped)} skipped (not FITS names)"
        )
        if report.refused:
            raise OasisError(
                f"oasis get: {len(report.refused)} file(s) refused (see above), not copied into "
                f"{t.data}; fix or remove them and run again"
            )
        return
    from oasis_apps.lco import ARCHIVE_URL, download

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
        progress=False if Out.quiet else None,
    )
    say(
        f"{t.data}: {len(result.downloaded)} downloaded, {len(result.present)} already there, "
        f"{len(result.failed)} failed"
    )
    if result.failed:  # each named in one warning line above
        raise OasisError(
            f"oasis get: {len(result.failed)} frame(s) not downloaded into {t.data} "
            "(the reasons are above)"
        )


@app.command()
def plugins(
    as_json: JsonOpt = False,
    check: Annotated[
        str | None,
        typer.Option(
            "--check",
            metavar="NAME",
            help="Run plugin NAME's backends on a simulated pair: Q and normalised noise.",
        ),
    ] = None,
) -> None:
    """List every backend: stage, name, plugin distribution and version, status, description."""
    from oasis_apps.plugincheck import plugin_rows, run_check
    from oasis_core.engine.plugins import Registry

    set_output(as_json=as_json)
    registry = Registry()
    if check is not None:
        run_check(check, registry, say=say, emit_json=emit_json if as_json else None)
        return
    columns, rows = plugin_rows(registry)
    if as_json:
        emit_json({"backends": [dict(zip(columns, row, strict=True)) for row in rows]})
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(*columns)
    for row in rows:
        table.add_row(*(str(cell) for cell in row))
    Console(width=200).print(table)


class _ShowByDefault(TyperGroup):
    """``oasis config [TARGET]`` is ``oasis config show [TARGET]``: a first word that is
    not a sub-command is the target."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if not args or (args[0] not in self.commands and args[0] not in ("--help", "-h")):
            args = ["show", *args]
        return super().parse_args(ctx, args)


config_app = typer.Typer(
    cls=_ShowByDefault,
    help="Print the configuration (`oasis config [TARGET]`) or upgrade a target's "
    "(`oasis config upgrade TARGET`).",
)
app.add_typer(config_app, name="config")


@config_app.command("show")
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
    from oasis_core.engine.config import load_config, render_config
    from oasis_core.engine.plugins import Registry
    from oasis_core.engine.tree import find_target

    registry = Registry()
    path = find_target(target).config_file if target else None
    cfg = load_config(path, registry, cli=cli_overrides(option))
    typer.echo(render_config(registry, cfg), nl=False)


@config_app.command("upgrade")
def config_upgrade(
    target: TargetArg,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the new file; change nothing.")
    ] = False,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Move TARGET's configs/oasis.toml to this version: moved keys renamed, unknown keys
    left out, new keys at their defaults, your values kept; the old file is kept as
    configs/oasis.toml.bak."""
    from oasis_core.engine import io
    from oasis_core.engine.config_upgrade import upgrade_config
    from oasis_core.engine.plugins import Registry
    from oasis_core.engine.tree import find_target

    set_output(quiet, as_json=as_json)
    path = find_target(target).config_file
    result = upgrade_config(path, Registry())
    backup = path.with_name(path.name + ".bak")
    if dry_run:
        typer.echo(result.text, nl=False)
    else:
        io.write_text(backup, path.read_text())
        io.write_text(path, result.text)
    summary = {
        "file": path,
        "backup": None if dry_run else backup,
        "moved": result.moved,
        "dropped": result.dropped,
        "kept": result.kept,
        "added": result.added,
        "written": not dry_run,
    }
    parts = [f"{len(result.moved)} moved", f"{len(result.dropped)} left out", f"{result.added} new"]
    for label, items in (("moved", result.moved), ("left out", result.dropped)):
        for item in items:
            log.info("%s: %s %s", path, label, item)
    where = "not written (--dry-run)" if dry_run else f"upgraded; the old file is {backup}"
    if not dry_run:
        say(f"{path}: {where}; keys: {', '.join(parts)}")
    emit_json(summary)
