"""The ``oasis-<method>`` shell commands of OasisPy: each asks for its inputs, then runs the
function of :mod:`oasis_apps.oasispy` of the same name.

OasisPy installed ``oasis-initialize``, ``oasis-get``, ``oasis-mask``, ``oasis-align``,
``oasis-psf``, ``oasis-combine``, ``oasis-subtract``, ``oasis-mr``, ``oasis-extract``,
``oasis-pipeline``, ``oasis-simulate``, ``oasis-test`` and ``oasis-run``; ``oasis-sim`` and
``oasis-mosaic`` are added here. Each is an entry point in :data:`COMMANDS`::

    $ oasis-subtract
    path(s) of the target directory (comma-separated for several): OASIS/targets/M31
    subtraction method (ois/hotpants/zogy...); blank: as configured: hotpants

An :class:`~oasis_core.contracts.errors.OasisError` is printed as ``error: <message>`` on stderr and
the command exits with status 1 (as ``oasis`` does); so does an answer cut short (Ctrl-C,
end of input). Other exceptions keep their traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

__all__ = [
    "COMMANDS",
    "align",
    "combine",
    "extract",
    "get",
    "initialize",
    "mask",
    "mosaic",
    "mr",
    "pipeline",
    "psf",
    "run",
    "sim",
    "subtract",
    "test",
]

PATH_PROMPT = "path(s) of the target directory (comma-separated for several)"


def _main(body: Callable[[], Any]) -> None:
    """Run ``body`` as a command: set up logging, turn errors into ``error: ...`` and an
    exit status (0 on success, 1 on an OASIS error or an aborted prompt)."""
    import typer

    from oasis_apps.cli_base import setup_logging
    from oasis_core.contracts.errors import OasisError

    setup_logging()
    try:
        outcome = body()
    except OasisError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(1)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(1)
    sys.exit(1 if outcome is False else 0)


def _ask(text: str, default: Any = None, **kwargs: Any) -> Any:
    import typer

    return typer.prompt(text, default=default, **kwargs)


def _ask_path() -> str:
    return str(_ask(PATH_PROMPT))


def _ask_method(text: str) -> str:
    """A method name, or "" (just Enter) for the one configured in configs/oasis.toml."""
    return str(_ask(f"{text}; blank: as configured", "", show_default=False)).strip()


def initialize() -> None:
    """``oasis-initialize``: ask where, then create the OASIS directory tree."""
    from oasis_apps.oasispy import INITIALIZE

    _main(lambda: INITIALIZE())


def get() -> None:
    """``oasis-get``: copy (unpack) or download (dl) frames into a target."""
    from oasis_apps.oasispy import GET

    _main(GET)


def mask() -> None:
    """``oasis-mask``: ask for the target(s), then mask their frames."""
    from oasis_apps.oasispy import MASK

    _main(lambda: MASK(_ask_path()))


def align() -> None:
    """``oasis-align``: ask for the target(s), then align their frames."""
    from oasis_apps.oasispy import ALIGN

    _main(lambda: ALIGN(_ask_path()))


def psf() -> None:
    """``oasis-psf``: ask for the target(s), then measure their PSFs."""
    from oasis_apps.oasispy import PSF

    _main(lambda: PSF(_ask_path()))


def combine() -> None:
    """``oasis-combine``: ask for the target(s), then build their templates."""
    from oasis_apps.oasispy import COMBINE

    _main(lambda: COMBINE(_ask_path()))


def subtract() -> None:
    """``oasis-subtract``: ask for the target(s) and the method, then subtract."""
    from oasis_apps.oasispy import SUBTRACT

    def body() -> Any:
        path = _ask_path()
        method = _ask_method("subtraction method (ois/hotpants/zogy...)")
        return SUBTRACT(path, method=method) if method else SUBTRACT(path)

    _main(body)


def mr() -> None:
    """``oasis-mr``: ask for the target(s) and the stacking method (and, for sigma_clip,
    its threshold and smoothing), then build the master residual. A method typed in is
    used without reading the config file, as OasisPy's ``oasis-mr`` did; a blank answer
    uses the configured one."""
    import typer

    from oasis_apps.oasispy import MR

    def body() -> Any:
        path = _ask_path()
        method = _ask_method("master residual method (swarp/sos/sos_abs/sigma_clip)")
        if not method:
            return MR(path)
        if method != "sigma_clip":
            return MR(path, method=method, use_config_file=False)
        thresh = _ask("sigma threshold", 4.0, type=float)
        filt = typer.confirm("smooth the master residual with a Gaussian?", default=False)
        sig = _ask("Gaussian sigma [pix]", 3.0, type=float) if filt else 3.0
        return MR(
            path,
            method=method,
            sig_thresh=thresh,
            gauss_sig=sig,
            gauss_filt=filt,
            use_config_file=False,
        )

    _main(body)


def extract() -> None:
    """``oasis-extract``: ask for the method and the target(s), then extract sources."""
    from oasis_apps.oasispy import EXTRACT

    def body() -> Any:
        method = _ask_method("extract method (both/indiv/MR)")
        path = _ask_path()
        return EXTRACT(path, method=method) if method else EXTRACT(path)

    _main(body)


def pipeline() -> None:
    """``oasis-pipeline``: ask for the target(s), then run every stage."""
    from oasis_apps.oasispy import PIPELINE

    _main(lambda: PIPELINE(_ask_path()))


def run() -> None:
    """``oasis-run``: the menu of every method."""
    from oasis_apps.oasispy import RUN

    _main(RUN)


def sim() -> None:
    """``oasis-sim`` (and OasisPy's ``oasis-simulate``): choose a simulation."""
    from oasis_apps.oasispy import SIM

    _main(SIM)


def test() -> None:
    """``oasis-test``: the installation self-test; exit status 1 when it fails."""
    from oasis_apps.oasispy import TEST

    _main(TEST)


def mosaic() -> None:
    """``oasis-mosaic``: ask for the frames and the output, then build the mosaic."""
    from oasis_apps.oasispy import MOSAIC

    _main(lambda: MOSAIC())


#: Shell command name to entry point (the ``[project.scripts]`` table).
COMMANDS: dict[str, Callable[[], None]] = {
    "oasis-initialize": initialize,
    "oasis-get": get,
    "oasis-mask": mask,
    "oasis-align": align,
    "oasis-psf": psf,
    "oasis-combine": combine,
    "oasis-subtract": subtract,
    "oasis-mr": mr,
    "oasis-extract": extract,
    "oasis-pipeline": pipeline,
    "oasis-run": run,
    "oasis-sim": sim,
    "oasis-simulate": sim,
    "oasis-test": test,
    "oasis-mosaic": mosaic,
}
