"""The Dask executor: outcomes and errors, the pipeline's catalogs, a worker killed mid-run."""

from __future__ import annotations

import importlib.util
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from oasis_core.contracts.errors import BackendUnavailable, ConfigError, StageError
from oasis_core.engine import io

needs_dask = pytest.mark.skipif(
    importlib.util.find_spec("distributed") is None,
    reason="dask.distributed not installed (pip install 'oasis-dia[dask]')",
)


# Tasks run in worker processes, which import them from this module (tests/ is a package).


def _square_or_fail(x: int) -> int:
    if x == 3:
        raise StageError("frame 3: no stars")
    if x == 4:
        raise ValueError("frame 4: bad value")
    return x * x


def _counted(arg: tuple[Path, str]) -> str:
    """Append a line per call; fail with ``kind`` on the first call only."""
    path, kind = arg
    with path.open("a") as fh:
        fh.write("call\n")
    calls = path.read_text().count("call")
    if kind == "stage":
        raise StageError(f"{path.name}: deterministic failure")
    if kind == "oserror" and calls == 1:
        raise OSError(f"{path.name}: transient failure")
    return f"{kind} after {calls} call(s)"


def _slow_write(arg: tuple[Path, float]) -> dict[str, int]:
    """Write ``out`` atomically, sleeping while the temp file is open (the worker's pid is
    its first line); first remove the temp files of an attempt killed mid-write."""
    out, seconds = arg
    stale = list(out.parent.glob(f".{out.name}.*.part"))
    for part in stale:
        part.unlink()
    with io.atomic_write(out) as tmp, tmp.open("w") as fh:
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        time.sleep(seconds)
        fh.write(f"{out.name} complete\n")
    return {"pid": os.getpid(), "stale": len(stale)}


@pytest.fixture
def executor():
    from oasis_core.engine.executor_dask import DaskExecutor

    with DaskExecutor(workers=2) as ex:
        yield ex


def test_missing_dask_is_a_one_line_error(monkeypatch):
    from oasis_core.engine import executor_dask

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "distributed" else real(name)
    )
    with pytest.raises(BackendUnavailable) as info:
        executor_dask.DaskExecutor()
    assert str(info.value) == (
        "executor 'dask' needs dask.distributed: pip install 'oasis-dia[dask]'"
    )


@needs_dask
def test_dask_is_imported_only_when_a_cluster_is_needed():
    import subprocess
    import sys

    code = (
        "import sys, oasis_core.engine.executor_dask as m; m.DaskExecutor(workers=1); "
        "print(sorted(k for k in sys.modules if k.split('.')[0] in ('dask', 'distributed')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


@needs_dask
def test_outcomes_and_errors(executor):
    assert list(executor.run(_square_or_fail, [])) == []
    outcomes = list(executor.run(_square_or_fail, [(f"f{i}", i) for i in range(6)]))
    by_key = {o.key: o for o in outcomes}
    assert sorted(by_key) == [f"f{i}" for i in range(6)]
    assert {k: o.value for k, o in by_key.items() if o.ok} == {
        "f0": 0,
        "f1": 1,
        "f2": 4,
        "f5": 25,
    }
    assert isinstance(by_key["f3"].error, StageError)
    assert str(by_key["f3"].error) == "frame 3: no stars"
    assert isinstance(by_key["f4"].error, ValueError)
    assert by_key["f3"].value is None and by_key["f4"].value is None
    pids = set(executor.client.run(os.getpid).values())
    assert len(pids) == 2 and os.getpid() not in pids, "tasks run in 2 worker processes"
    # the same keys again: each run submits fresh tasks (nothing cached by key)
    again = list(executor.run(_square_or_fail, [("f2", 2), ("f2", 2)]))
    assert [o.value for o in again] == [4, 4]


@needs_dask
def test_oasis_errors_are_not_retried_others_are(executor, tmp_path):
    args = [(k, (tmp_path / f"{k}.log", k)) for k in ("stage", "oserror", "ok")]
    by_key = {o.key: o for o in executor.run(_counted, args)}
    assert isinstance(by_key["stage"].error, StageError)
    assert (tmp_path / "stage.log").read_text().count("call") == 1
    assert by_key["oserror"].value == "oserror after 2 call(s)"
    assert by_key["ok"].value == "ok after 1 call(s)"


@needs_dask
def test_scheduler_address_uses_that_cluster_and_leaves_it_running():
    from distributed import LocalCluster

    from oasis_core.engine.executor_dask import DaskExecutor

    with LocalCluster(
        n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster:
        with DaskExecutor(scheduler=cluster.scheduler_address, workers=5) as ex:
            outcomes = list(ex.run(_square_or_fail, [("a", 2), ("b", 3)]))
            assert len(ex.client.scheduler_info()["workers"]) == 1, "workers= is ignored"
            pids = set(ex.client.run(os.getpid).values())
        assert {o.key: o.value for o in outcomes if o.ok} == {"a": 4}
        assert isinstance(next(o.error for o in outcomes if not o.ok), StageError)
        assert cluster.status.name == "running" and len(cluster.workers) == 1
        assert os.getpid() not in pids


@needs_dask
def test_unreachable_scheduler_is_a_config_error():
    import dask

    from oasis_core.engine.executor_dask import DaskExecutor

    ex = DaskExecutor(scheduler="tcp://127.0.0.1:9")  # discard port: nothing listens
    with (
        dask.config.set({"distributed.comm.timeouts.connect": "1s"}),
        pytest.raises(ConfigError, match=r"\[run\] scheduler: cannot connect") as info,
    ):
        list(ex.run(abs, [("a", -1)]))
    assert "\n" not in str(info.value) and "'tcp://127.0.0.1:9'" in str(info.value)
    ex.close()


@needs_dask
def test_killed_worker_run_still_completes(executor, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    client = executor.client
    worker_pids = set(client.run(os.getpid).values())
    killed: list[tuple[int, str]] = []  # (pid, output name) of the attempt killed

    def kill_one_writer() -> None:
        deadline = time.monotonic() + 30
        while not killed and time.monotonic() < deadline:
            for part in out_dir.glob(".*.part"):
                try:
                    pid = int(part.read_text().split("\n", 1)[0])
                except (OSError, ValueError):
                    continue  # renamed meanwhile, or the pid not flushed yet
                if pid in worker_pids:  # never signal anything but our own worker
                    os.kill(pid, signal.SIGKILL)
                    killed.append((pid, part.name[1:].rsplit(".", 2)[0]))
                    return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_one_writer)
    killer.start()
    names = [f"frame{i}.txt" for i in range(8)]
    try:
        outcomes = list(executor.run(_slow_write, [(n, (out_dir / n, 1.0)) for n in names]))
    finally:
        killer.join()
    assert len(killed) == 1, "a worker must have been killed mid-write"
    assert sorted(o.key for o in outcomes) == names
    assert all(o.ok for o in outcomes), [o.error for o in outcomes if not o.ok]
    # the killed task ran again in another process and removed the dead attempt's file
    pid, victim = killed[0]
    assert victim in names
    assert {o.key: o.value["stale"] for o in outcomes if o.value["stale"]} == {victim: 1}
    for name in names:
        lines = (out_dir / name).read_text().splitlines()
        assert lines[1] == f"{name} complete", name
    assert int((out_dir / victim).read_text().split()[0]) != pid
    assert sorted(p.name for p in out_dir.iterdir()) == names, "no temp file left behind"
    assert len(set(client.run(os.getpid).values())) == 2, "the nanny restarted the worker"


@needs_dask
@pytest.mark.slow
def test_pipeline_gives_the_local_executors_catalogs(tmp_path):
    from astropy.table import Table

    from oasis_core.engine.executor_dask import DaskExecutor
    from oasis_core.engine.pipeline import make_context, run_stages
    from tests.integration.pipeline_kit import make_target

    # the pipeline kit's small target (5 frames of 160x160, with transients)
    target = make_target(tmp_path)
    catalogs = ("sources.ecsv", "MR_sources.ecsv")
    run_stages(make_context(target, jobs=2))
    local = {c: Table.read(target / "sources" / c) for c in catalogs}
    residuals = sorted(target.glob("residuals/*_residual.fits"))
    before = {p: p.stat().st_mtime_ns for p in residuals}
    with DaskExecutor(workers=2) as ex:
        run_stages(make_context(target, executor=ex, force=True))
    assert residuals and all(p.stat().st_mtime_ns != before[p] for p in residuals), (
        "force redoes the work"
    )
    assert len(local["sources.ecsv"]) > 0
    for name in catalogs:
        dask_t = Table.read(target / "sources" / name)
        ref = local[name]
        assert dask_t.colnames == ref.colnames, name
        assert len(dask_t) == len(ref), name
        for col in ref.colnames:
            a, b = np.asarray(dask_t[col]), np.asarray(ref[col])
            if a.dtype.kind in "fc":
                np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9, err_msg=f"{name}:{col}")
            else:
                assert np.array_equal(a, b), f"{name}:{col}"
    assert not list(target.rglob(".*.part"))
