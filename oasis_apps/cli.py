"""The ``oasis`` command line (typer). Commands are thin: parse, call the Python API,
render the result. Progress bars and tables (rich) live here only.

Errors: :func:`main` catches every exception at the top. An
:class:`~oasis_core.contracts.errors.OasisError` prints ``error: <message>`` and exits with its
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

import importlib
import logging
import sys

import typer

from oasis_apps.cli_base import (
    Debug,
    Out,
    app,
    env_debug,
    setup_logging,
)
from oasis_apps.cli_stages import make_stage_command
from oasis_core.contracts.errors import OasisError
from oasis_core.contracts.stages import stages as all_stages

__all__ = ["app", "entry", "main"]

log = logging.getLogger("oasis")


#: The modules whose commands make up ``oasis``, in the order ``oasis --help`` lists them.
COMMAND_MODULES = ("cli_stages", "cli_menu", "cli_tools", "cli_sim", "cli_lightcurve")
for _module in COMMAND_MODULES:
    importlib.import_module(f"oasis_apps.{_module}")
for _stage in all_stages():  # built-in and third-party (``oasis.stages``) stages
    make_stage_command(_stage.name)


def _one_line(text: str) -> str:
    return " ".join(text.split()) if "\n" in text or "\r" in text else text


def _where(err: BaseException) -> str:
    """Where ``err`` was raised: ``module.py:line in function`` of the innermost frame of
    OASIS's own code (a module named ``oasis*``), and the raising library's frame."""
    frames = []
    tb = err.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        spec = tb.tb_frame.f_globals.get("__spec__")  # `python -m oasis_apps.cli`: __main__
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
    if Debug.on:
        import traceback

        traceback.print_exception(err, file=sys.stderr)
    if isinstance(err, OasisError):
        typer.echo(f"error: {_one_line(str(err))}", err=True)
        return int(err.exit_code)
    hint = "" if Debug.on else " (oasis --debug shows the traceback)"
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
    Debug.on = env_debug()
    setup_logging(verbose=Debug.on)
    try:
        app(args=argv, prog_name="oasis")
    except SystemExit as exc:  # typer's standalone mode ends every run with one
        code = exc.code
        if code == 130:  # typer turns Ctrl-C inside a command into Exit(130)
            if Debug.on and exc.__context__ is not None:
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
        Debug.on = False
        Out.quiet = Out.verbose = Out.json = False
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
