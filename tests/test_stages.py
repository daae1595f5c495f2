"""The stage registry: one record per stage, the old tables as views of it, and a stage
added by a third-party distribution (a throwaway package registered without pip) that
runs in the pipeline after extract, with provenance, and is skipped on a rerun."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap

import pytest

from oasis_core.contracts import stages
from oasis_core.contracts.stages import Stage

BUILTIN_ORDER = ("mask", "psf", "align", "combine", "subtract", "mr", "extract", "photometry")

# The throwaway distribution: one module (hookspec, base class, settings, runner, task
# and the Stage record) and a plugin module with a backend.
STAGE_SOURCE = '''
"""A toy stage: counts the residuals."""
from pathlib import Path

import attrs
import pluggy

from oasis_core.contracts.backends import Backend, option

hookspec = pluggy.HookspecMarker("oasis")


@hookspec
def oasis_count_backends():
    """Yield the count backends this plugin provides."""


class CountBackend(Backend):
    """Counts residual files."""

    stage = "count"

    def count(self, paths, *, options, workdir):
        raise NotImplementedError


@attrs.frozen(kw_only=True)
class CountSettings:
    """Core settings of the count stage."""

    backend: str = option("simple", "count backend; see `oasis plugins`")


def run_count(ctx):
    from oasis_core.engine import pipeline as pl

    residuals = sorted(ctx.target.stage_dir("subtract").glob("*_residual.fits"))
    assert (ctx.target.stage_dir("extract") / "total_sources.txt").is_file()  # after extract
    out = ctx.target.stage_dir("count")
    out.mkdir(parents=True, exist_ok=True)
    inputs = {p.name: p for p in residuals}
    task = pl.stage_task(ctx, "count", "count", inputs, out / "count.ecsv")
    return pl.execute(ctx, "count", [task])["count"]


def count_task(task):
    from astropy.table import Table

    from oasis_core.engine import io

    n = task.backend.count(sorted(task.inputs.values()), options=task.options,
                           workdir=task.workdir)
    table = Table({"n": [n]})
    table.meta.update({k: str(v[0] if isinstance(v, tuple) else v)
                       for k, v in task.provenance.cards().items()})
    io.write_table(table, task.output)
    io.write_text(task.output.with_name("count.txt"), f"{n}\\n")
    return {"n": n}
'''

# the record is plain data: its paths are resolved on first use
STAGE_RECORD = """
from oasis_core.contracts.stages import Stage

STAGE = Stage(
    name="count",
    base="oasis_count.stage:CountBackend",
    settings="oasis_count.stage:CountSettings",
    folder="count",
    runner="oasis_count.stage:run_count",
    task="oasis_count.stage:count_task",
    after="extract",
    hookspecs="oasis_count.stage",
)
"""

PLUGIN_SOURCE = """
import attrs

from oasis_core.contracts.backends import option
from oasis_core.contracts.hookspecs import hookimpl
from oasis_count.stage import CountBackend

CHECKS = []


class SimpleCount(CountBackend):
    name = "simple"
    description = "counts the residual files"

    @attrs.frozen(kw_only=True)
    class Options:
        offset: int = option(0, "added to the count", range=(0, None))

    def check(self, options):
        CHECKS.append(options)

    def count(self, paths, *, options, workdir):
        return len(paths) + options.offset


@hookimpl
def oasis_count_backends():
    yield SimpleCount()
"""


@pytest.fixture
def toy_stage(tmp_path, monkeypatch):
    """The toy distribution ``oasis-count`` on sys.path (a dist-info with its entry
    points, as pip would leave it); the stage registry re-read before and after."""
    root = tmp_path / "site"
    package = root / "oasis_count"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "stage.py").write_text(textwrap.dedent(STAGE_SOURCE) + textwrap.dedent(STAGE_RECORD))
    (package / "plugin.py").write_text(textwrap.dedent(PLUGIN_SOURCE))
    dist = root / "oasis_count-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: oasis-count\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[oasis.stages]\ncount = oasis_count.stage:STAGE\n\n"
        "[oasis.plugins]\ncount = oasis_count.plugin\n"
    )
    monkeypatch.syspath_prepend(str(root))
    stages.reset()
    yield root
    monkeypatch.undo()
    stages.reset()


def test_builtin_stages_are_one_record_each_and_the_tables_views_of_them():
    from oasis_core.contracts.backends import BASES, STAGES, SubtractBackend
    from oasis_core.engine import runners, tasks
    from oasis_core.engine.config import SETTINGS, SubtractSettings
    from oasis_core.engine.pipeline import _RUNNERS
    from oasis_core.engine.tasks import _STAGE_TASKS
    from oasis_core.engine.tree import STAGE_DIRS

    assert tuple(s.name for s in stages.BUILTIN) == BUILTIN_ORDER
    assert tuple(STAGES) == BUILTIN_ORDER
    assert STAGES.index("mr") == 5 and STAGES[-1] == "photometry"
    assert BASES["subtract"] is SubtractBackend
    assert list(SETTINGS) == ["run", *BUILTIN_ORDER]
    assert SETTINGS["subtract"] is SubtractSettings
    assert STAGE_DIRS["align"] == "aligned" and STAGE_DIRS["mr"] == "residuals"
    assert _RUNNERS["subtract"] is runners.subtract
    assert _STAGE_TASKS["subtract"] is tasks.subtract
    assert "combine" not in _STAGE_TASKS and "mr" not in _STAGE_TASKS
    assert stages.get_stage("extract").hookspec == "oasis_extract_backends"


def test_stage_order_follows_after_and_skips_bad_records(caplog):
    def stage(name, after):
        return Stage(name=name, base="m:a", settings="m:b", folder=name, runner="m:c", after=after)

    builtin = list(stages.BUILTIN)
    with caplog.at_level(logging.WARNING, logger="oasis"):
        order = stages._ordered(
            [
                stage("late", "phot"),  # placed once "phot" is
                *builtin,
                stage("phot", "extract"),
                stage("early", "mask"),
                stage("lost", "nowhere"),
                stage("psf", "mask"),  # a second "psf"
            ]
        )
    names = [s.name for s in order]
    assert names[:3] == ["mask", "early", "psf"]
    assert names[3:] == [
        "align",
        "combine",
        "subtract",
        "mr",
        "extract",
        "phot",
        "late",
        "photometry",
    ]
    assert "'lost': runs after 'nowhere', which is not a stage" in caplog.text
    assert "stage 'psf' is defined twice" in caplog.text


def test_the_stage_names_cost_no_numpy():
    code = (
        "import sys, oasis_core.contracts.stages as s, oasis_apps.cli; "
        "assert s.stage_names()[0] == 'mask'; assert 'numpy' not in sys.modules, 'numpy'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_context_resolves_and_checks_each_backend_once_per_run(tmp_path, monkeypatch):
    from oasis_core.engine import pipeline as pl
    from oasis_core.engine.plugins import Registry
    from oasis_core.engine.tree import Target

    target = Target(tmp_path / "t").create()
    calls = []
    select = Registry.select

    def counting(self, stage, name, options):
        calls.append((stage, name))
        return select(self, stage, name, options)

    monkeypatch.setattr(Registry, "select", counting)
    ctx = pl.make_context(target.path, jobs=1)
    first = [ctx.backend("mask") for _ in range(5)]
    assert all(b is first[0] for b in first)
    assert calls == [("mask", "native")]


def test_a_third_party_stage_runs_after_extract_with_provenance_and_resumes(toy_stage, tmp_path):
    from astropy.table import Table

    from oasis_core.contracts.backends import BASES, STAGES
    from oasis_core.engine.config import SETTINGS
    from oasis_core.engine.pipeline import pipeline
    from oasis_core.engine.tree import STAGE_DIRS
    from tests.integration.pipeline_kit import make_target

    assert tuple(STAGES) == (*BUILTIN_ORDER[:-1], "count", "photometry")
    assert BASES["count"].__name__ == "CountBackend"
    assert SETTINGS["count"]().backend == "simple"
    assert STAGE_DIRS["count"] == "count"

    path = make_target(tmp_path / "root")
    result = pipeline(path, jobs=1)
    assert list(result)[-3:] == ["extract", "count", "photometry"]  # before the built-in
    n = len(list((path / "residuals").glob("*_residual.fits")))
    assert n > 0
    assert (path / "count" / "count.txt").read_text() == f"{n}\n"
    catalog = path / "count" / "count.ecsv"
    meta = Table.read(catalog).meta
    assert (meta["OASSTAGE"], meta["OASBACK"]) == ("count", "simple")
    assert meta["OASPLUG"] == "oasis-count==0.1"
    saved = (path / "configs" / "last_run.toml").read_text()
    assert '\n[count]\nbackend = "simple"' in saved and "\n[count.simple]\n" in saved
    from oasis_count.plugin import CHECKS

    assert len(CHECKS) == 1  # checked once for the run

    stamp = catalog.stat().st_mtime_ns
    again = pipeline(path, jobs=1)
    assert again["count"] == "skipped"
    assert catalog.stat().st_mtime_ns == stamp

    changed = pipeline(path, jobs=1, options={"count.simple.offset": 2})
    assert changed["count"] == {"n": n + 2, "seconds": changed["count"]["seconds"]}
    assert (path / "count" / "count.txt").read_text() == f"{n + 2}\n"


def test_a_third_party_stage_is_a_command_and_listed_by_oasis_plugins(toy_stage):
    env = {**os.environ, "PYTHONPATH": str(toy_stage)}
    run = [sys.executable, "-m", "oasis_apps.cli"]
    help_text = subprocess.run(
        [*run, "--help"], capture_output=True, text=True, check=True, env=env
    ).stdout
    assert "count" in help_text
    # `oasis run` takes a backend choice for every stage of the registry, this one's too
    run_help = subprocess.run(
        [*run, "run", "--help"], capture_output=True, text=True, check=True, env=env
    ).stdout
    for stage in ("mask", "extract", "photometry", "count"):
        assert f"--{stage} " in run_help, stage
    out = subprocess.run(
        [*run, "plugins"], capture_output=True, text=True, check=True, env=env
    ).stdout
    rows = [[c.strip() for c in ln.split("│")[1:-1]] for ln in out.splitlines() if "│" in ln]
    [row] = [r for r in rows if r[:2] == ["count", "simple"]]
    assert row[3:5] == ["oasis-count", "0.1"]
