"""The command line as a user types it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from oasis_core.cli import main


def oasis(*args, input=None, cwd=None):  # noqa: A002 - mirrors subprocess.run
    return subprocess.run(
        [sys.executable, "-m", "oasis_core.cli", *args],
        input=input,
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=600,
    )


def test_help_lists_every_command():
    out = oasis("--help").stdout
    for command in (
        "init",
        "get",
        "plugins",
        "config",
        "pipeline",
        "run",
        "demo",
        "mask",
        "psf",
        "align",
        "combine",
        "subtract",
        "mr",
        "extract",
    ):
        assert command in out


def test_config_prints_defaults_and_rejects_bad_override(capsys):
    assert main(["config", "-o", "subtract.ois.deg_spatial=1"]) == 0
    assert "deg_spatial = 1" in capsys.readouterr().out
    assert main(["config", "-o", "subtract.ois.deg_spatal=1"]) == 1
    err = capsys.readouterr().err
    assert "error: command line: [subtract.ois] unknown key 'deg_spatal'" in err


def test_interactive_menu_prompts_and_runs(tmp_path):
    """`oasis run` with no target: OasisPy's menu; choosing `initialize` creates the tree."""
    proc = oasis("run", input=f"initialize\n{tmp_path}\n")
    assert proc.returncode == 0, proc.stderr
    assert "OASIS methods:" in proc.stdout and "pipeline" in proc.stdout
    assert (tmp_path / "OASIS" / "targets").is_dir()
    proc = oasis("run", input="nonsense\n")
    assert proc.returncode == 1
    assert "error: unknown method 'nonsense'" in proc.stderr


@pytest.mark.slow
def test_demo_command_prints_where_and_the_result(tmp_path):
    proc = oasis("demo", str(tmp_path / "d"), "--frames", "6", "--size", "256", "-q")
    assert proc.returncode == 0, proc.stderr
    assert f"outputs in {tmp_path / 'd'}" in proc.stdout
    [line] = [ln for ln in proc.stdout.splitlines() if ln.startswith("result: ")]
    assert "frames used, mean Q" in line and "injected transients" in line
    assert (
        tmp_path / "d" / "OASIS" / "targets" / "demo" / "sources" / "total_sources.txt"
    ).exists()
