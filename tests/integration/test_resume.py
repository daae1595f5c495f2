"""Killing `oasis pipeline` mid-run and running it again finishes without redoing work."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from oasis_core.demo import simulate_target
from oasis_core.pipeline import pipeline

pytestmark = pytest.mark.slow


def test_killed_run_resumes(tmp_path):
    target = simulate_target(tmp_path, "resume", n_frames=6, shape=(256, 256), seed=11)
    proc = subprocess.Popen(
        [sys.executable, "-m", "oasis_core.cli", "pipeline", str(target.path), "-j", "1", "-q"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 240
    aligned = target.path / "aligned"
    while time.monotonic() < deadline and proc.poll() is None:
        if len(list(aligned.glob("*.fits"))) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be interrupted"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (target.path / "sources" / "total_sources.txt").exists()
    done = sorted(target.path.glob("masks/*.fits")) + sorted(aligned.glob("*.fits"))
    assert len(list(target.path.glob("masks/*.fits"))) == 6
    before = {p: p.stat().st_mtime_ns for p in done}
    pipeline(target.path, jobs=2)
    assert {p: p.stat().st_mtime_ns for p in done} == before, "finished frames were redone"
    assert (target.path / "sources" / "total_sources.txt").exists()
    assert len(list(aligned.glob("*.fits"))) == 6
    assert not list(target.path.rglob(".*.part"))
