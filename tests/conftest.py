"""Shared fixtures: a fresh plugin manager, the real data folder, simulated targets."""

from __future__ import annotations

import fcntl
import hashlib
import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def checksums(paths):
    """sha256 of every file in ``paths``."""
    return {str(p): hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths}


def built_once(tmp_path_factory, name: str, build: Callable[[Path], object]) -> Path:
    """A folder that ``build(folder)`` fills once per test session, the xdist workers'
    included (the first to ask builds it under a file lock; the others wait for it), and
    a private copy of it for the caller, who may change the copy at will."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the session's folder, above each worker's own
    shared = base / f"built-{name}"
    with (base / f"built-{name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (shared / ".built").exists():
            shutil.rmtree(shared, ignore_errors=True)  # a build that failed half-way
            shared.mkdir()
            build(shared)
            (shared / ".built").touch()
    copy = tmp_path_factory.mktemp(name)
    shutil.copytree(shared, copy, symlinks=True, dirs_exist_ok=True)
    (copy / ".built").unlink()
    return copy


@pytest.fixture
def plugin_manager():
    from oasis_core.engine.plugins import make_plugin_manager

    return make_plugin_manager()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"real test data not found at {SHARED_DATA} (../shared/data)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def sim_frames(tmp_path_factory):
    """Six simulated 256x256 frames on disk (read-only use) and their truth table."""
    from oasis_native.sim import simulate_series, write_series

    series = simulate_series(n_frames=6, shape=(256, 256), seed=3, n_transients=3)
    directory = tmp_path_factory.mktemp("simframes")
    paths = write_series(series, directory)
    return paths, series.truth


@pytest.fixture(scope="session")
def sim_target_done(tmp_path_factory):
    """A simulated target (8 frames, 384x384) after a full pipeline run with defaults
    (run once per session; each worker gets its own copy)."""
    from oasis_core.engine.tree import Target

    def build(root: Path) -> None:
        from oasis_apps.demo import simulate_target
        from oasis_core.engine.pipeline import pipeline

        target = simulate_target(root, "sim", n_frames=8, shape=(384, 384), seed=7)
        pipeline(target.path, jobs=2)

    root = built_once(tmp_path_factory, "simroot", build)
    return Target(root / "OASIS" / "targets" / "sim")


@pytest.fixture(scope="session")
def decam_target_done(tmp_path_factory, shared_data):
    """The ten DECam frames (``decam_n6``) unpacked into a target and run with the default
    backends (jobs 2): ``(target, the pipeline's result)``. Run once per session; each
    worker gets its own copy (the result is that of the one run)."""
    from oasis_core.engine.tree import Target

    originals = sorted((shared_data / "decam_n6").glob("*.fits"))

    def build(root: Path) -> None:
        from oasis_apps.get import unpack
        from oasis_core.engine.pipeline import pipeline

        target = Target(root / "OASIS" / "targets" / "decam").create()
        before = checksums(originals)
        unpack(originals, target)
        out = pipeline(target.path, jobs=2)
        assert checksums(originals) == before, "the pipeline changed its input frames"
        (root / "result.pickle").write_bytes(pickle.dumps(out))

    root = built_once(tmp_path_factory, "decam", build)
    result = pickle.loads((root / "result.pickle").read_bytes())
    return Target(root / "OASIS" / "targets" / "decam"), result


#: The test files that take longest (their module fixtures run whole pipelines), longest
#: first as measured (``--durations``): started first, so that the two workers
#: (``-n 2 --dist loadfile --no-loadscope-reorder``) end together.
LONGEST_FIRST = (
    "tests/test_compare.py",
    "tests/integration/test_astromatic.py",
    "tests/sims/test_selftest.py",
    "tests/integration/test_probes.py",
    "tests/test_cli.py",
    "tests/integration/test_cutouts.py",
    "tests/integration/test_photometry_sim.py",
    "tests/integration/test_real_data.py",
    "tests/integration/test_stale.py",
    "tests/sims/test_fakes.py",
    "tests/integration/test_resume.py",
    "tests/integration/test_resume_files.py",
    "tests/test_fuzz.py",
    "tests/hotpants/test_hotpants.py",
    "tests/test_mosaic.py",
    "tests/test_executor_dask.py",
    "tests/native/test_psf.py",
    "tests/integration/test_kill.py",
    "tests/test_oasispy.py",
    "tests/integration/test_pipeline_sim.py",
    "tests/integration/test_selection.py",
    "tests/test_plugins.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    root = Path(str(config.rootpath))

    def key(item):
        path = Path(str(item.path)).relative_to(root).as_posix()
        return rank.get(path, len(rank))

    items.sort(key=key)  # stable: the order within a file and among the others is kept
