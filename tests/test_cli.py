"""The command line as a user types it."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pytest

from oasis_apps.cli import main


def oasis(*args, input=None, cwd=None, env=None):  # noqa: A002 - mirrors subprocess.run
    return subprocess.run(
        [sys.executable, "-m", "oasis_apps.cli", *args],
        input=input,
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=600,
    )


def help_text(*command):
    """``oasis COMMAND --help`` on a wide terminal (no choice list wrapped)."""
    return oasis(*command, "--help", env={**os.environ, "COLUMNS": "200"}).stdout


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
    proc = oasis("demo", str(tmp_path / "d"), "--frames", "6", "--size", "256")
    assert proc.returncode == 0, proc.stderr
    assert f"outputs in {tmp_path / 'd'}" in proc.stdout
    [line] = [ln for ln in proc.stdout.splitlines() if ln.startswith("result: ")]
    assert "frames used, mean Q" in line and "injected transients" in line
    assert (
        tmp_path / "d" / "OASIS" / "targets" / "demo" / "sources" / "total_sources.txt"
    ).exists()
    # the same demo again (its outputs are current: it resumes) as one JSON object
    again = oasis("demo", str(tmp_path / "d"), "--frames", "6", "--size", "256", "--json")
    assert again.returncode == 0, again.stderr
    summary = json.loads(again.stdout)
    assert summary["result"] == line.removeprefix("result: ")
    assert summary["frames_used"] >= 1 and 0 < summary["mean_q"] <= 1
    assert summary["target"].endswith("demo")


# ------------------------------------------------------------ every error is one line


@pytest.fixture
def failing_pair(monkeypatch):
    """``oasis subtract-pair`` whose work raises what the test sets."""
    import oasis_core.engine.pair as pair

    raised: list[BaseException] = []

    def run(*args, **kwargs):
        raise raised[0]

    monkeypatch.setattr(pair, "subtract_pair", run)
    monkeypatch.delenv("OASIS_DEBUG", raising=False)
    return raised


PAIR = ["subtract-pair", "sci.fits", "tmpl.fits", "out.fits"]


def test_an_unexpected_exception_is_one_line_naming_where_and_what(failing_pair, capsys):
    failing_pair.append(ValueError("bad\nvalue"))
    assert main(PAIR) == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    assert re.fullmatch(
        r"error: oasis_apps/cli_tools\.py:\d+ in subtract_pair \(raised in tests/test_cli\.py:\d+ "
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
    from oasis_core.contracts.errors import TargetBusy

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
        [sys.executable, "-m", "oasis_apps.cli", "run"],
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


# ------------------------------------------------ conventions: version, -q, -v, --json


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A small simulated aligned pair written to files (no warning is due on it)."""
    from astropy.io import fits
    from oasis_native.sim import simulate_pair

    where = tmp_path_factory.mktemp("pair")
    (sci, sci_header), (tpl, tpl_header), _ = simulate_pair((128, 128), seed=3)
    fits.writeto(where / "sci.fits", sci, sci_header)
    fits.writeto(where / "tmpl.fits", tpl, tpl_header)
    return where


@pytest.fixture(scope="module")
def tiny_target(tmp_path_factory):
    """The pipeline kit's small target, run once with ``-q``; that run's output."""
    from tests.integration.pipeline_kit import make_target

    target = make_target(tmp_path_factory.mktemp("tiny"))
    return target, oasis("run", str(target), "-q", "-j", "1")


def test_version_names_the_core_and_each_plugin_distribution():
    from importlib.metadata import version

    proc = oasis("--version")
    assert proc.returncode == 0 and proc.stderr == ""
    lines = proc.stdout.splitlines()
    assert lines[0] == f"oasis-dia {version('oasis-dia')}"
    plugins = " ".join(ln for ln in lines[1:] if ": plugins " in ln)
    for name in ("native", "ois", "hotpants", "swarp", "sextractor"):
        assert re.search(rf"\b{name}\b", plugins), lines


def test_help_lists_the_choices_and_completion():
    top = help_text()
    assert "--install-completion" in top and "--show-completion" in top and "--version" in top
    assert "<flux|mag>" in help_text("sim", "fakes")
    assert "<moffat|gauss>" in help_text("sim", "fakes")
    assert "<linear|log>" in help_text("sim", "fakes")
    assert "<moffat|gauss|real|sky>" in help_text("sim", "same-field")
    assert "<unpack|dl>" in help_text("get")
    assert "<frames|residuals>" in help_text("mosaic") and "<mean|median>" in help_text("mosaic")
    for command in ("run", "subtract", "compare"):
        assert "<local|dask>" in help_text(command), command
    stage = help_text("subtract")
    assert "--subtract" in stage and "oasis plugins" in stage and "--backend" not in stage
    assert "--method" not in help_text("subtract-pair")  # hidden, deprecated


def test_quiet_subtract_pair_prints_nothing(pair):
    proc = oasis("subtract-pair", "sci.fits", "tmpl.fits", "out.fits", "-q", cwd=pair)
    assert proc.returncode == 0, proc.stderr
    assert (proc.stdout, proc.stderr) == ("", "")
    assert (pair / "out.fits").is_file()


def test_quiet_run_prints_only_warnings(tiny_target):
    target, proc = tiny_target
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert all(ln.startswith("warning: ") for ln in proc.stderr.splitlines()), proc.stderr
    assert (target / "sources" / "total_sources.txt").is_file()


def test_json_subtract_pair_holds_the_summary_figures(pair):
    import json

    from astropy.table import Table

    args = ("subtract-pair", "sci.fits", "tmpl.fits", "j.fits", "--catalog", "j.ecsv")
    proc = oasis(*args, "--json", cwd=pair)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)  # the whole of stdout is one JSON object
    assert summary["output"] == "j.fits" and summary["subtract"] == "ois"
    assert 0 < summary["q"] <= 1 and summary["flag"] == "none"
    table = Table.read(pair / "j.ecsv")
    assert summary["catalog"]["detections"] == len(table) > 0
    text = oasis(*args, cwd=pair).stdout
    assert f"Q {summary['q']:.3f}, configuration {summary['choice']}/{summary['tries']}" in text
    assert f"{len(table)} detection(s), {summary['catalog']['kept']} kept" in text


def test_json_run_and_stage_commands(tiny_target):
    import json

    target, _ = tiny_target
    proc = oasis("run", str(target), "--json", "-q", "-j", "1")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["target"] == str(target)
    assert list(summary["stages"]) == [
        "mask",
        "psf",
        "align",
        "combine",
        "subtract",
        "mr",
        "extract",
        "photometry",
    ]
    extract = summary["stages"]["extract"]
    assert extract["frames"] == len(summary["stages"]["subtract"]) == 5
    assert 0 < extract["mean_q"] <= 1
    assert summary["stages"]["photometry"]["frames"] == 5  # the light curves, last
    assert "subtract: 5/5 done (5 already up to date)" in summary["summary"]
    one = json.loads(oasis("mr", str(target), "--json", "-q").stdout)
    assert one["stages"] == {"mr": str(target / "residuals" / "MR.fits")}


def test_json_plugins_lists_every_backend():
    import json

    proc = oasis("plugins", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)["backends"]
    assert {"stage": "subtract", "name": "ois"}.items() <= next(
        r for r in rows if r["name"] == "ois"
    ).items()
    assert {r["stage"] for r in rows} >= {"mask", "subtract", "extract", "simulator"}


def test_old_backend_spellings_work_and_say_they_are_deprecated(pair, tiny_target):
    proc = oasis("subtract-pair", "sci.fits", "tmpl.fits", "m.fits", "--method", "ois", cwd=pair)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "warning: --method is deprecated; use --subtract NAME\n"
    assert "m.fits: Q " in proc.stdout
    target, _ = tiny_target
    for flag in ("--backend", "-b"):
        proc = oasis("mask", str(target), flag, "native", "-q")
        assert proc.returncode == 0, proc.stderr
        assert proc.stderr == "warning: --backend is deprecated; use --mask NAME\n"
    clash = oasis(
        "subtract-pair",
        "sci.fits",
        "tmpl.fits",
        "m.fits",
        "--method",
        "zogy",
        "--subtract",
        "ois",
        cwd=pair,
    )
    assert clash.returncode == 1
    assert (
        clash.stderr == "error: give the subtract backend once: --subtract ois or --method zogy\n"
    )


def test_verbose_prints_a_line_per_frame(tiny_target):
    target, _ = tiny_target
    proc = oasis("psf", str(target), "-v", "-f", "-j", "1")
    assert proc.returncode == 0, proc.stderr
    frames = [ln for ln in proc.stderr.splitlines() if re.match(r"psf: sim_\d{3}: ", ln)]
    assert len(frames) == 5, proc.stderr
    assert oasis("psf", str(target), "-v", "-q").returncode == 1


def test_json_compare_holds_the_tables(tiny_target):
    import json

    target, _ = tiny_target
    proc = oasis("compare", str(target), "--subtract", "ois", "--json", "-q", "-j", "1")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    [row] = result["summary"]
    assert row["combination"] == "ois" and row["frames"] == 5 and 0 < row["mean_q"] <= 1
    assert len(result["frames"]) == 5 and result["report"].endswith("report.html")
