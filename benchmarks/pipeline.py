"""Wall time, CPU time and peak memory of the demo pipeline (``oasis demo``), stage by stage.

Run::

    python benchmarks/pipeline.py [--frames 10 30 100] [--size 512 1024 2048] [--jobs 0]
                                  [--workdir DIR] [--interval 0.1] [--profile STAGE]

Every combination of ``--frames`` and ``--size`` is run in turn: the demo series is
simulated (into a temporary directory, or under ``--workdir`` where it is kept and reused by
the next run with the same frames, size and seed), then the whole pipeline runs on it with
the local executor, one stage at a time (with ``force``, so a reused series is redone), and
one row per stage is printed:

* ``wall``: elapsed seconds;
* ``cpu``: CPU seconds (user + system) of this process and of every process under it: the
  executor's workers (children of multiprocessing's fork server, so not in
  ``RUSAGE_CHILDREN`` of this process) and the programs they run. A background thread
  samples the process tree (psutil) every ``--interval`` seconds and at each stage's start
  and end; a process that ends between two samples is counted through its parent's
  ``children`` times once reaped;
* ``peak``: the highest sum, over this process and every process under it, of the
  proportional set size (PSS: each shared page split among the processes that share it,
  so the libraries every worker maps are counted once), in MiB; ``rss`` the same with the
  resident set size (shared pages counted in every process; an upper bound).

Then the demo's score (as ``oasis demo`` prints it) and, with more than one combination, a
summary table. The machine's load changes the wall times (not the CPU times much): compare
runs made under similar load. ``--profile STAGE`` runs that stage's tasks in this process
(``jobs=1``) under cProfile and prints the top functions (wall and CPU then are those of
one process). Needs psutil (``pip install psutil``; ``oasis-dia[test]`` brings it).
Numbers are for this machine; nothing here is asserted by the tests.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

try:
    import psutil
except ImportError as err:  # pragma: no cover - a message instead of a traceback
    raise SystemExit("benchmarks/pipeline.py needs psutil: pip install psutil") from err

MIB = 2**20


class TreeMonitor:
    """Samples this process and its descendants: CPU seconds and peak memory.

    :meth:`cpu` is the CPU time used so far by the whole tree, counting every process once:
    each one's own user + system time plus the ``children`` times the kernel added to it for
    the children it reaped, less what was already counted for those children by sampling
    them while they ran, less the time the sampling itself took.
    """

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self.root = psutil.Process()
        self._procs: dict[int, psutil.Process] = {}
        # pid -> (own cpu, children cpu, ppid, gone)
        self._last: dict[int, tuple[float, float, int, bool]] = {}
        self._lock = threading.Lock()
        self.peak_pss = 0.0
        self.peak_rss = 0.0
        self._overhead = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tree-monitor", daemon=True)

    def __enter__(self) -> TreeMonitor:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        """Read every process of the tree once (CPU times, PSS, RSS); the CPU time this
        costs (in this process) is kept apart and left out of :meth:`cpu`."""
        t0 = time.thread_time()
        self._sample()
        spent = time.thread_time() - t0
        with self._lock:
            self._overhead += spent

    def _sample(self) -> None:
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return
        pss = rss = 0.0
        seen = set()
        with self._lock:
            for proc in procs:
                pid = proc.pid
                known = self._procs.setdefault(pid, proc)
                if known is not proc and known.create_time() != proc.create_time():
                    self._procs[pid] = proc  # pid reused
                try:
                    with proc.oneshot():
                        t = proc.cpu_times()
                        ppid = proc.ppid()
                        try:
                            mem = proc.memory_full_info()
                            pss += getattr(mem, "pss", mem.rss)
                        except psutil.AccessDenied:
                            mem = proc.memory_info()
                            pss += mem.rss
                        rss += mem.rss
                except psutil.Error:
                    continue
                seen.add(pid)
                self._last[pid] = (
                    t.user + t.system,
                    t.children_user + t.children_system,
                    ppid,
                    False,
                )
            for pid, (own, children, ppid, gone) in list(self._last.items()):
                if pid not in seen and not gone:
                    self._last[pid] = (own, children, ppid, True)
            self.peak_pss = max(self.peak_pss, pss)
            self.peak_rss = max(self.peak_rss, rss)

    def cpu(self) -> float:
        """CPU seconds used so far by the tree (see the class docstring)."""
        self.sample()
        with self._lock:
            total = -self._overhead
            for own, children, ppid, gone in self._last.values():
                total += own + children
                if gone and ppid in self._last and not self._last[ppid][3]:
                    # reaped by a process still sampled: its times are in the parent's
                    # children times from now on (an approximation until the reaping)
                    total -= own + children
            return total

    def reset_peak(self) -> None:
        with self._lock:
            self.peak_pss = self.peak_rss = 0.0
        self.sample()


@contextmanager
def measured(monitor: TreeMonitor, rows: list[dict[str, Any]], name: str) -> Iterator[None]:
    """Append ``{stage, wall, cpu, pss, rss}`` for the block to ``rows``."""
    monitor.reset_peak()
    cpu0 = monitor.cpu()
    t0 = time.perf_counter()
    yield
    wall = time.perf_counter() - t0
    cpu = monitor.cpu() - cpu0
    rows.append(
        {
            "stage": name,
            "wall": wall,
            "cpu": cpu,
            "pss": monitor.peak_pss / MIB,
            "rss": monitor.peak_rss / MIB,
        }
    )


def _profile_stage(ctx: Any, stage: str, top: int) -> None:
    import cProfile
    import pstats

    from oasis_core.engine.pipeline import run_stages

    profiler = cProfile.Profile()
    profiler.enable()
    run_stages(ctx, [stage])
    profiler.disable()
    stats = pstats.Stats(profiler).sort_stats("cumulative")
    print(f"--- cProfile of {stage} (one process), by cumulative time ---")
    stats.print_stats(top)
    print(f"--- cProfile of {stage}, by own time ---")
    stats.sort_stats("tottime").print_stats(top)


def run_one(
    root: Path,
    n_frames: int,
    size: int,
    *,
    jobs: int,
    seed: int,
    interval: float,
    profile: list[str],
    top: int,
) -> tuple[list[dict[str, Any]], str]:
    """Simulate (or reuse) one series under ``root`` and run the pipeline stage by stage."""
    from astropy.table import Table

    from oasis_apps.demo import evaluate, simulate_target
    from oasis_core.contracts.backends import STAGES
    from oasis_core.engine.pipeline import closing_executor, make_context, run_stages

    rows: list[dict[str, Any]] = []
    with TreeMonitor(interval) as monitor:
        with measured(monitor, rows, "simulate"):
            target = simulate_target(root, "demo", n_frames=n_frames, shape=(size, size), seed=seed)
        ctx = make_context(target.path, jobs=jobs, force=True)
        with closing_executor(ctx, owned=True):
            for stage in STAGES:
                if stage in profile:
                    one = make_context(target.path, jobs=1, force=True)
                    with measured(monitor, rows, stage + "*"):
                        _profile_stage(one, stage, top)
                    continue
                with measured(monitor, rows, stage):
                    run_stages(ctx, [stage])
        truth = Table.read(root / "OASIS" / "simulations" / "demo" / "truth.ecsv")
        result = evaluate(target, truth)
    return rows, result.line()


def _table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'stage':<10} {'wall s':>8} {'cpu s':>8} {'peak MiB':>9} {'rss MiB':>9}"]
    for r in rows:
        lines.append(
            f"{r['stage']:<10} {r['wall']:8.2f} {r['cpu']:8.2f} {r['pss']:9.0f} {r['rss']:9.0f}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[12], help="series lengths")
    parser.add_argument("--size", type=int, nargs="+", default=[1024], help="frame sides (px)")
    parser.add_argument("--jobs", type=int, default=0, help="worker processes (0: one per core)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="keep the simulated series here and reuse them (default: a temporary directory)",
    )
    parser.add_argument("--interval", type=float, default=0.1, help="sampling period (s)")
    parser.add_argument(
        "--profile",
        nargs="*",
        default=[],
        metavar="STAGE",
        help="run these stages in this process under cProfile",
    )
    parser.add_argument("--top", type=int, default=25, help="functions shown per profile")
    args = parser.parse_args()

    from oasis_core.engine.executor import LocalExecutor

    workers = LocalExecutor(args.jobs).workers
    summary = []
    for size in args.size:
        for n_frames in args.frames:
            with tempfile.TemporaryDirectory() as tmp:
                root = Path(tmp)
                if args.workdir is not None:
                    root = args.workdir / f"f{n_frames}-s{size}-seed{args.seed}"
                    root.mkdir(parents=True, exist_ok=True)
                rows, line = run_one(
                    root,
                    n_frames,
                    size,
                    jobs=args.jobs,
                    seed=args.seed,
                    interval=args.interval,
                    profile=args.profile,
                    top=args.top,
                )
            pipeline_rows = [r for r in rows if r["stage"] != "simulate"]
            total = {
                "stage": "pipeline",
                "wall": sum(r["wall"] for r in pipeline_rows),
                "cpu": sum(r["cpu"] for r in pipeline_rows),
                "pss": max(r["pss"] for r in pipeline_rows),
                "rss": max(r["rss"] for r in pipeline_rows),
            }
            print(
                f"\ndemo pipeline: {n_frames} frames of {size}x{size}, {workers} worker(s), "
                f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}"
            )
            print(_table([*rows, total]))
            print(f"result: {line}", flush=True)
            summary.append((n_frames, size, total))
    if len(summary) > 1:
        head = (
            f"\n{'frames':>6} {'size':>5} {'wall s':>8} {'cpu s':>8} {'peak MiB':>9} {'rss MiB':>9}"
        )
        print(head)
        for n_frames, size, t in summary:
            print(
                f"{n_frames:6d} {size:5d} {t['wall']:8.2f} {t['cpu']:8.2f} {t['pss']:9.0f} "
                f"{t['rss']:9.0f}"
            )


if __name__ == "__main__":
    main()
