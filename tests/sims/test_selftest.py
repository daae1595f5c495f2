"""``oasis test``: the self-test passes on a good installation and fails when a control
source is missing."""

from __future__ import annotations

import subprocess
import sys

import pytest

from oasis_apps.selftest import FAILURE, SUCCESS, run_selftest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def selftest_dir(tmp_path_factory):
    """The default self-test (30 frames), run as a user runs it."""
    directory = tmp_path_factory.mktemp("selftest")
    proc = subprocess.run(
        [sys.executable, "-m", "oasis_apps.cli", "test", str(directory)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    return directory, proc


def test_self_test_succeeds(selftest_dir):
    directory, proc = selftest_dir
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == SUCCESS
    frames = list((directory / "OASIS" / "targets" / "selftest" / "data").glob("*.fits"))
    assert len(frames) == 30
    controls = directory / "OASIS" / "simulations" / "selftest" / "controls.ecsv"
    assert controls.exists()


def test_self_test_fails_without_one_control(tmp_path):
    # control 2 left out (12 frames: enough for the others, in half the time); a folder of
    # its own, or the default run's 30 simulated frames would be reused
    result = run_selftest(tmp_path, controls=(0, 2), jobs=2, n_frames=12)
    assert len(list((result.target / "data").glob("*.fits"))) == 12
    assert not result.ok
    assert result.lines()[0] == FAILURE
    missing = [r for r in result.reasons if r.startswith("control 2 ")]
    assert missing and "never injected" in missing[0]
    # the two that were injected are still found: only the missing one is reported
    assert not any(r.startswith(("control 1 ", "control 3 ")) for r in result.reasons)
