"""``kill -9`` of a ``-j 2`` run: nothing of it survives, and a rerun finishes the work to
the outputs of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from oasis_core.engine.pipeline import pipeline
from tests.integration.pipeline_kit import assert_same_outputs, copy_target, session_processes

pytestmark = pytest.mark.slow

#: Where to kill: a label and the output whose appearance shows the run is there.
POINTS = [
    ("mask", "masks/*.weight.fits"),
    ("subtract", "residuals/*_residual.fits"),
    ("extract", "sources/detections/*.ecsv"),
]


def _kill_when(target, pattern: str) -> list[tuple[int, str]]:
    """Start ``oasis run -j 2`` in a new session, SIGKILL its main process when
    ``pattern`` matches a file; return the session's processes just before the kill."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "oasis_apps.cli", "run", str(target), "-q", "-j", "2"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline and not any(target.glob(pattern)):
        time.sleep(0.01)
    alive = session_processes(proc.pid)
    if proc.poll() is not None:
        pytest.fail(f"the run ended (exit {proc.returncode}) before {pattern} appeared")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 5
    while session_processes(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = session_processes(proc.pid)
    if left:  # do not leave them running for the next tests
        for pid, _ in left:
            os.kill(pid, signal.SIGKILL)
    assert not left, f"still alive 5 s after the main process was killed: {left}"
    return alive


def test_sigkill_leaves_no_process_and_a_rerun_finishes_identically(tmp_path, small_target):
    pristine, reference = small_target
    target = copy_target(pristine, tmp_path)
    for label, pattern in POINTS:
        alive = _kill_when(target, pattern)
        # the main process had workers (and the fork server, the resource tracker) to orphan
        assert len(alive) >= 3, (label, alive)
    assert not (target / "sources" / "total_sources.txt").exists()
    pipeline(target, jobs=1)
    assert_same_outputs(target, reference)
    assert not list(target.rglob(".*.part"))
    assert not (target / ".work").exists()
