"""Shared fixtures: a fresh plugin manager, the real data folder, simulated targets."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def checksums(paths):
    """sha256 of every file in ``paths``."""
    return {str(p): hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths}


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
    """A simulated target (8 frames, 384x384) after a full pipeline run with defaults."""
    from oasis_apps.demo import simulate_target
    from oasis_core.engine.pipeline import pipeline

    root = tmp_path_factory.mktemp("simroot")
    target = simulate_target(root, "sim", n_frames=8, shape=(384, 384), seed=7)
    pipeline(target.path, jobs=2)
    return target


#: The test files that take longest (their module fixtures run whole pipelines): started
#: first, so that the two workers (``-n 2 --dist loadfile``) end together.
LONGEST_FIRST = (
    "tests/test_compare.py",
    "tests/sims/test_selftest.py",
    "tests/integration/test_astromatic.py",
    "tests/test_executor_dask.py",
    "tests/integration/test_photometry_sim.py",
    "tests/integration/test_cutouts.py",
    "tests/integration/test_pipeline_sim.py",
    "tests/hotpants/test_hotpants.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    root = Path(str(config.rootpath))

    def key(item):
        path = Path(str(item.path)).relative_to(root).as_posix()
        return rank.get(path, len(rank))

    items.sort(key=key)  # stable: the order within a file and among the others is kept
