"""One run per target: two runs at once, a lock left by a killed run, every entry point."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from oasis_core.contracts.errors import TargetBusy
from oasis_core.engine import pipeline as pl
from oasis_core.engine.lock import LOCK_NAME, target_lock
from tests.integration.pipeline_kit import assert_same_outputs, copy_target, make_target

pytestmark = pytest.mark.slow

#: A process holding the locks of the targets given as arguments until it is killed.
HOLDER = textwrap.dedent(
    """
    import contextlib, sys, time
    from oasis_core.engine.lock import target_lock
    with contextlib.ExitStack() as stack:
        for path in sys.argv[1:]:
            stack.enter_context(target_lock(path, command="holder"))
        print("held", flush=True)
        time.sleep(600)
    """
)


@pytest.fixture
def holder():
    """Start a process holding the locks of the given targets; killed at the end."""
    procs = []

    def start(*paths):
        proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, *map(str, paths)],
            stdout=subprocess.PIPE,
            text=True,
        )
        procs.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def test_two_runs_at_once_one_runs_the_other_exits_2_naming_the_holder(tmp_path, small_target):
    pristine, reference = small_target
    target = copy_target(pristine, tmp_path)
    command = [sys.executable, "-m", "oasis_apps.cli", "run", str(target), "-q", "-j", "1"]
    procs = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 2], (codes, outputs)
    winner, loser = (0, 1) if codes[0] == 0 else (1, 0)
    lines = outputs[loser][1].strip().splitlines()
    assert len(lines) == 1, lines
    pattern = (
        rf"error: {re.escape(str(target))}: another OASIS run holds this target "
        rf"\(pid {procs[winner].pid} on {re.escape(socket.gethostname())}, started "
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} \(oasis run .*\)\); wait for it"
    )
    assert re.match(pattern, lines[0]), lines[0]
    assert_same_outputs(target, reference)
    assert (target / LOCK_NAME).read_text() == ""  # released
    assert not (target / ".work").exists()  # the run's scratch went with it


def test_a_lock_left_by_a_killed_run_is_taken_over(tmp_path, holder):
    target = tmp_path / "t"
    (target / ".work" / "run-20200101T000000-elsewhere-1").mkdir(parents=True)
    (target / ".work" / "download").mkdir()  # a partial download waits here: kept
    proc = holder(target)
    with (
        pytest.raises(TargetBusy, match=rf"pid {proc.pid} on .*\(holder\)\); wait"),
        target_lock(target),
    ):
        pass
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with target_lock(target, command="me") as scratch:
        assert (target / LOCK_NAME).read_text().startswith(f"pid={os.getpid()}\n")
        assert scratch.parent == target / ".work" and scratch.name.startswith("run-")
        assert sorted(p.name for p in (target / ".work").iterdir()) == ["download"]
        with target_lock(target) as again:  # reentrant within a process
            assert again == scratch
        assert (target / LOCK_NAME).read_text().startswith(f"pid={os.getpid()}\n")
    assert (target / LOCK_NAME).read_text() == ""


def test_every_entry_point_takes_the_lock(tmp_path, holder):
    from oasis_apps.compare import compare
    from oasis_apps.demo import run_demo
    from oasis_apps.fakes import sim_fakes
    from oasis_apps.samefield import sim_same_field
    from oasis_apps.selftest import run_selftest

    target = make_target(tmp_path / "root")
    oasis = tmp_path / "root" / "OASIS"
    sims = oasis / "simulations"
    holder(
        target,
        sims / "t_fakes",
        sims / "t_samefield_moffat",
        tmp_path / "demo" / "OASIS" / "targets" / "demo",
        tmp_path / "test" / "OASIS" / "targets" / "selftest",
    )
    calls = {
        "mask": lambda: pl.mask(target, jobs=1),
        "pipeline": lambda: pl.pipeline(target, jobs=1),
        "compare": lambda: compare(target, subtract="ois,zogy", jobs=1),
        "sim fakes": lambda: sim_fakes(target, iterations=1, jobs=1),
        "sim same-field": lambda: sim_same_field(target, numIms=3, jobs=1),
        "demo": lambda: run_demo(tmp_path / "demo", n_frames=3, shape=(256, 256)),
        "test": lambda: run_selftest(tmp_path / "test", n_frames=3, shape=(256, 256)),
    }
    for name, call in calls.items():
        with pytest.raises(TargetBusy, match=r"another OASIS run holds this target"):
            call()
        assert not list(target.glob("masks/*")), name  # nothing done
    assert not (tmp_path / "demo" / "OASIS" / "simulations" / "demo").exists()
    assert not (sims / "t_fakes" / "data").exists()
