"""Running an external program for a backend: one call, one-line errors.

Backends that wrap a program (hotpants, SExtractor, PSFEx, SWarp, a third party's) run it
through :func:`run_program`, so a program that cannot start or does not finish becomes
the same one-line :class:`~oasis_core.contracts.errors.StageError` everywhere; what its exit code
and output mean stays the backend's business. A program dies with the process that started
it (Linux's ``PR_SET_PDEATHSIG``), so a killed run leaves no SExtractor or hotpants behind.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path

from oasis_core.contracts.errors import StageError

__all__ = ["run_program"]


def run_program(
    command: Sequence[str],
    *,
    cwd: Path,
    where: str,
    label: str,
    timeout: float = 0.0,
    shown: str = "",
) -> subprocess.CompletedProcess[str]:
    """Run ``command`` in ``cwd``, capturing its text output, with no stdin.

    Parameters
    ----------
    command : sequence of str
        The program and its arguments.
    cwd : Path
        The backend's workdir.
    where : str
        The unit of work, for the message (a frame's name...).
    label : str
        The program's name, for the message (``"SWarp"``).
    timeout : float
        Seconds; 0 means no limit.
    shown : str
        The command as recorded with the error (``StageError.metadata["command"]``).

    Returns
    -------
    subprocess.CompletedProcess
        Whatever the exit code: the caller judges it.

    Raises
    ------
    StageError
        ``"<where>: cannot run <label> (<program>): <why>"`` when it cannot start, and
        ``"<where>: <label> did not finish within <timeout> s (option timeout)"``.
    """
    import sys

    from oasis_core.engine.executor import die_with_parent

    metadata = {"command": shown or " ".join(command)}
    try:
        return subprocess.run(
            list(command),
            cwd=cwd,
            capture_output=True,
            text=True,
            errors="replace",
            stdin=subprocess.DEVNULL,
            timeout=timeout if timeout > 0 else None,
            check=False,
            preexec_fn=die_with_parent if sys.platform.startswith("linux") else None,
        )
    except subprocess.TimeoutExpired as err:
        msg = f"{where}: {label} did not finish within {timeout:g} s (option timeout)"
        raise StageError(msg, metadata=metadata) from err
    except OSError as err:
        msg = f"{where}: cannot run {label} ({command[0]!r}): {err}"
        raise StageError(msg, metadata=metadata) from err
