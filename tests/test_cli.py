"""The command line as a user types it."""

from __future__ import annotations

import re
import signal
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
        # a row of a panel starts with its name, then the description (a bare substring
        # test would pass on "run" inside any description); continuation lines are indented
        rows = [
            ln.split(None, 2) for ln in out.splitlines() if ln.startswith("│ ") and ln[2] != " "
        ]
        described = {r[1]: r[2] for r in rows if len(r) == 3 and not r[1].startswith("-")}
        assert described.get(command, "").strip(" │"), f"{command!r} not listed in --help"


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


# ------------------------------------------------------------ every error is one line


@pytest.fixture
def failing_pair(monkeypatch):
    """``oasis subtract-pair`` whose work raises what the test sets."""
    import oasis_core.subtraction as subtraction

    raised: list[BaseException] = []

    def run(*args, **kwargs):
        raise raised[0]

    monkeypatch.setattr(subtraction, "subtract_pair", run)
    monkeypatch.delenv("OASIS_DEBUG", raising=False)
    return raised


PAIR = ["subtract-pair", "sci.fits", "tmpl.fits", "out.fits"]


def test_an_unexpected_exception_is_one_line_naming_where_and_what(failing_pair, capsys):
    failing_pair.append(ValueError("bad\nvalue"))
    assert main(PAIR) == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    assert re.fullmatch(
        r"error: oasis_core/cli\.py:\d+ in subtract_pair \(raised in tests/test_cli\.py:\d+ "
        r"in run\): ValueError: bad value \(oasis --debug shows the traceback\)",
        lines[0],
    ), lines[0]


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_prints_the_traceback_then_the_line(failing_pair, capsys, monkeypatch, how):
    failing_pair.append(KeyError("x"))
    if how == "env":
        monkeypatch.setenv("OASIS_DEBUG", "1")
    assert main(["--debug", *PAIR] if how == "flag" else PAIR) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):")
    assert err.splitlines()[-1].endswith("in run): KeyError: 'x'")
    # the next run without --debug is quiet again
    monkeypatch.delenv("OASIS_DEBUG", raising=False)
    assert main(PAIR) == 1
    assert "Traceback" not in capsys.readouterr().err


def test_an_oasis_error_keeps_its_exit_code(failing_pair, capsys):
    from oasis_core.errors import TargetBusy

    failing_pair.append(TargetBusy("t: busy: run 42 on host h since 10:00"))
    assert main(PAIR) == 2
    assert capsys.readouterr().err == "error: t: busy: run 42 on host h since 10:00\n"


def test_an_interrupt_is_one_line_and_exit_130(failing_pair, capsys):
    failing_pair.append(KeyboardInterrupt())
    assert main(PAIR) == 130
    assert capsys.readouterr().err == "error: interrupted\n"


def test_usage_errors_stay_clicks(capsys):
    assert main(["subtract-pair"]) == 2
    assert "Missing argument" in capsys.readouterr().err
    assert main(["--no-such-option"]) == 2


def _interruptible() -> None:
    """In the child: Ctrl-C as a terminal delivers it (whatever another test left in this
    process's signal disposition or mask, which a child inherits)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_at_a_prompt_and_end_of_input(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "oasis_core.cli", "run"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        preexec_fn=_interruptible,
    )
    try:
        shown = ""
        while not shown.rstrip().endswith("method (number or name):"):  # the prompt is up
            char = proc.stdout.read(1)
            assert char, f"no prompt: {shown}"
            shown += char
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)  # stdin stays open: the interrupt, not an end of input, ends it
    finally:
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err == "error: interrupted\n", err
    closed = oasis("run", input="", cwd=tmp_path)
    assert closed.returncode == 1
    assert closed.stderr == (
        "error: no answer to a prompt (end of input); give the arguments on the command line\n"
    )
