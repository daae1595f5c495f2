"""External programs run through oasis_core.engine.programs.run_program: one-line errors, and a
program never outlives the process that started it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from oasis_core.contracts.errors import StageError
from oasis_core.engine.programs import run_program


def test_missing_program_is_one_line(tmp_path):
    with pytest.raises(StageError, match=r"^f1: cannot run Prog \('no-such-prog-x'\)") as err:
        run_program(["no-such-prog-x"], cwd=tmp_path, where="f1", label="Prog")
    assert "\n" not in str(err.value)


def test_timeout_is_one_line(tmp_path):
    with pytest.raises(StageError, match=r"f2: Prog did not finish within 0.2 s"):
        run_program(["sleep", "5"], cwd=tmp_path, where="f2", label="Prog", timeout=0.2)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_program_dies_with_its_parent(tmp_path):
    pidfile = tmp_path / "pid"
    script = textwrap.dedent(
        f"""
        from pathlib import Path
        from oasis_core.engine.programs import run_program
        run_program(["sh", "-c", "echo $$ > {pidfile}.tmp && mv {pidfile}.tmp {pidfile}; sleep 60"],
                    cwd=Path({str(tmp_path)!r}), where="x", label="sh")
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", script])
    try:
        for _ in range(200):
            if pidfile.exists():
                break
            time.sleep(0.05)
        child = int(pidfile.read_text())
        assert _alive(child)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        for _ in range(100):
            if not _alive(child):
                break
            time.sleep(0.05)
        assert not _alive(child), "the program outlived the process that started it"
    finally:
        if parent.poll() is None:
            parent.kill()
