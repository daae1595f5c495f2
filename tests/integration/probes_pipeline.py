"""Probes of the pipeline engine: a read-only target, a stage that produced nothing usable,
a target outside any OASIS root (scratch stays inside it; a lock left by a dead run is
taken over; a read-only ``data/`` is fine).

Pipeline commands print warnings (a frame that failed, the reference frame) before their
``error:`` line, so those probes allow more than one stderr line.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess

from tests.integration.probe_kit import Probe, Workspace


def _read_only(*parts: str):
    """A setup taking the write permission off ``parts`` (the target when none)."""

    def setup(ws: Workspace) -> None:
        folder = ws.target.joinpath(*parts)
        folder.mkdir(exist_ok=True)
        folder.chmod(folder.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))

    return setup


def _no_lock_file(ws: Workspace, proc: subprocess.CompletedProcess[str]) -> None:
    assert not (ws.target / ".oasis.lock").exists(), "the lock file was created"
    assert not (ws.target / "masks").exists(), "work began"


#: The target moved out of the root to ``proj/nights/t``; the old scratch rule used
#: ``proj/temp/t`` (``../temp`` beside its folder), where a user's file now lies.
OUTSIDE = ("proj", "nights", "t")
USER_FILE = ("proj", "temp", "t", "mask", "sim_000", "notes.txt")


def _outside_root(ws: Workspace) -> None:
    dest = ws.dir.joinpath(*OUTSIDE)
    dest.parent.mkdir(parents=True)
    shutil.move(ws.target, dest)
    mine = ws.dir.joinpath(*USER_FILE)
    mine.parent.mkdir(parents=True)
    mine.write_text("my notes\n")
    # a lock left by a run that died (no process holds it)
    (dest / ".oasis.lock").write_text(
        "pid=999999\nhost=gone\nstart=2020-01-01T00:00:00+0000\ncommand=oasis run t\n"
    )
    data = dest / "data"
    data.chmod(data.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    ws.outputs.append(dest)
    ws.inputs = [*sorted(data.iterdir()), ws.science, ws.template, mine]


def _stayed_inside(ws: Workspace, proc: subprocess.CompletedProcess[str]) -> None:
    dest = ws.dir.joinpath(*OUTSIDE)
    temp = ws.dir / "proj" / "temp"
    folders = sorted(str(p.relative_to(temp)) for p in temp.rglob("*") if p.is_dir())
    assert folders == ["t", "t/mask", "t/mask/sim_000"], f"scratch written beside: {folders}"
    assert (dest / "sources" / "total_sources.txt").exists()
    assert (dest / ".oasis.lock").read_text() == "", "the lock was not released"
    assert not (dest / ".work").exists(), "the run's scratch was left behind"


PROBES = [
    Probe(
        id="run-read-only-target",
        setup=_read_only(),
        argv=lambda ws: ["run", ws.target, "-q", "-j", "1"],
        stderr=r"targets/t: not writable \(the target folder is read-only\); make it writable",
        check=_no_lock_file,
    ),
    Probe(
        id="mask-read-only-output-folder",
        setup=_read_only("residuals"),
        argv=lambda ws: ["mask", ws.target, "-q", "-j", "1"],
        stderr=r"targets/t: not writable \(its folder residuals/ is read-only\)",
    ),
    Probe(
        id="run-every-subtraction-fails",
        argv=lambda ws: [
            "run",
            ws.target,
            "-q",
            "-j",
            "1",
            "-o",
            "subtract.ois.kernel=isis",
            "-o",
            "subtract.ois.min_stamp_snr=1e9",
        ],
        stderr=r"^error: subtract: no frame could be subtracted \(4 failed; the first: sim_000: "
        r"every configuration failed; .*\); see .*residuals/log\.txt$",
        max_lines=None,
    ),
    Probe(
        id="run-outside-root-scratch-stays-inside",
        setup=_outside_root,
        argv=lambda ws: ["run", os.path.join(*OUTSIDE), "-q", "-j", "1"],
        exit=0,
        max_lines=None,
        check=_stayed_inside,
    ),
]
