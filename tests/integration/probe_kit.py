"""The probe kit: run the real ``oasis`` command in a subprocess against a scratch
workspace and check the promises every probe shares.

A :class:`Probe` is one row of a table (``PROBES`` lists in ``tests/integration/probes_*.py``,
run by ``test_probes.py``): how to set the workspace up, the command line, the exit code
and a pattern for the error line. :func:`run_probe` asserts for every row:

- the exit code;
- no ``Traceback`` on stderr (a probe of ``--debug`` says ``traceback=True``: then there
  must be one), and (for a failing command) a last line ``error: ...`` matching the
  pattern, with at most ``max_lines`` lines on stderr in all;
- no input byte changed (sha256 of every frame in ``data/`` and of the pair, before and
  after);
- nothing written outside the target or the outputs the command names, and the scratch
  folder (``TMPDIR``) left empty.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import attrs

__all__ = ["Probe", "Workspace", "make_base", "run_probe"]


@attrs.define
class Workspace:
    """A scratch folder for one probe.

    Attributes
    ----------
    dir : Path
        The workspace; nothing may be written in it outside ``target`` and the outputs.
    root : Path
        The folder holding ``OASIS/``.
    target : Path
        A small simulated target (``OASIS/targets/t``) with its frames in ``data/``.
    science, template : Path
        An aligned pair outside any target (for ``oasis subtract-pair``).
    tmp : Path
        The subprocess's ``TMPDIR``; it must be empty when the command ends.
    outputs : list of Path
        Paths the command may write outside the target (set by a probe's ``setup``).
    inputs : list of Path
        Files that must not change (the frames and the pair, plus any a setup adds).
    """

    dir: Path
    root: Path
    target: Path
    science: Path
    template: Path
    tmp: Path
    outputs: list[Path] = attrs.field(factory=list)
    inputs: list[Path] = attrs.field(factory=list)

    @property
    def frames(self) -> list[Path]:
        return sorted(p for p in (self.target / "data").iterdir() if p.is_file())


@attrs.frozen(kw_only=True)
class Probe:
    """One probe: ``oasis *argv(ws)`` must exit with ``exit``; a failing one prints one
    line matching ``stderr`` (a regex searched in the last stderr line).

    ``env`` is extra environment, or a function of the workspace returning it (a setup
    may install a plugin in the workspace and put it on ``PYTHONPATH``). ``traceback``:
    the command must print a Python traceback (``--debug``, ``OASIS_DEBUG=1``). ``skip``:
    a reason to skip the probe here (e.g. a permission probe when running as root).
    """

    id: str
    argv: Callable[[Workspace], Sequence[str]]
    exit: int = 1
    stderr: str = ""
    setup: Callable[[Workspace], None] | None = None
    env: Mapping[str, str] | Callable[[Workspace], Mapping[str, str]] = attrs.field(factory=dict)
    max_lines: int | None = 1
    timeout: float = 180.0
    check: Callable[[Workspace, subprocess.CompletedProcess[str]], None] | None = None
    traceback: bool = False
    skip: str = ""


def make_base(directory: Path) -> Path:
    """A small simulated root (4 frames of 128x128 in ``OASIS/targets/t``) plus a pair."""
    from astropy.io import fits

    from oasis_apps.get import unpack
    from oasis_core.engine.plugins import Registry
    from oasis_core.engine.tree import Target, init_root

    base = init_root(directory)
    sim_dir = base / "simulations" / "t" / "frames"
    Registry().simulator("native").simulate(
        sim_dir, n_frames=4, shape=(128, 128), seed=11, transients=2
    )
    target = Target(base / "targets" / "t").create()
    unpack([sim_dir], target)
    frames = sorted(target.data.iterdir())
    pair = directory / "pair"
    pair.mkdir()
    shutil.copyfile(frames[0], pair / "sci.fits")
    shutil.copyfile(frames[1], pair / "tmpl.fits")
    for p in (pair / "sci.fits", pair / "tmpl.fits"):
        assert fits.getdata(p).shape == (128, 128)
    return directory


def _workspace(base: Path, directory: Path) -> Workspace:
    shutil.copytree(base, directory, symlinks=True)
    tmp = directory / "tmp"
    tmp.mkdir()
    ws = Workspace(
        dir=directory,
        root=directory,
        target=directory / "OASIS" / "targets" / "t",
        science=directory / "pair" / "sci.fits",
        template=directory / "pair" / "tmpl.fits",
        tmp=tmp,
    )
    ws.inputs = [*ws.frames, ws.science, ws.template]
    return ws


def _digest(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as err:  # unreadable (a probe may chmod 000): compare the error
        return f"unreadable: {err.errno}"


def _snapshot(directory: Path) -> dict[str, str]:
    out = {}
    for dirpath, _dirs, files in os.walk(directory):
        for name in files:
            p = Path(dirpath) / name
            if p.is_symlink():
                out[str(p)] = "link:" + os.readlink(p)
            else:
                out[str(p)] = _digest(p)
    return out


def _inside(path: str, roots: Sequence[Path]) -> bool:
    return any(path == str(r) or path.startswith(str(r) + os.sep) for r in roots)


def run_probe(probe: Probe, base: Path, directory: Path) -> subprocess.CompletedProcess[str]:
    """Run ``probe`` in a fresh copy of ``base`` at ``directory``; assert the shared
    promises; return the finished process."""
    if probe.skip:
        import pytest

        pytest.skip(probe.skip)
    ws = _workspace(base, directory)
    if probe.setup is not None:
        probe.setup(ws)
    inputs = {str(p): _digest(p) for p in ws.inputs}
    before = _snapshot(ws.dir)
    extra = probe.env(ws) if callable(probe.env) else probe.env
    env = {**os.environ, "TMPDIR": str(ws.tmp), "COLUMNS": "200", **extra}
    if "OASIS_DEBUG" not in extra:
        env.pop("OASIS_DEBUG", None)
    argv = [str(a) for a in probe.argv(ws)]
    proc = subprocess.run(
        [sys.executable, "-m", "oasis_apps.cli", *argv],
        cwd=ws.dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=probe.timeout,
        check=False,
    )
    where = f"probe {probe.id}: oasis {' '.join(argv)}\nstderr:\n{proc.stderr}"
    assert proc.returncode == probe.exit, f"exit {proc.returncode}, expected {probe.exit}; {where}"
    if probe.traceback:
        assert "Traceback (most recent call last)" in proc.stderr, f"no traceback; {where}"
    else:
        assert "Traceback" not in proc.stderr, where
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    if probe.exit != 0:
        assert lines, f"no error line; {where}"
        assert lines[-1].startswith("error: "), f"last line is not 'error: ...'; {where}"
        assert re.search(probe.stderr, lines[-1]), f"{probe.stderr!r} not in the error; {where}"
        if probe.max_lines is not None:
            assert len(lines) <= probe.max_lines, f"{len(lines)} stderr lines; {where}"
    for path, digest in inputs.items():
        assert _digest(Path(path)) == digest, f"input {path} changed; {where}"
    after = _snapshot(ws.dir)
    allowed = [ws.target, *ws.outputs]
    changed = sorted(
        p
        for p in set(before) | set(after)
        if before.get(p) != after.get(p) and not _inside(p, allowed)
    )
    assert not changed, f"written outside the target and named outputs: {changed}; {where}"
    assert not any(ws.tmp.iterdir()), f"scratch left in TMPDIR: {list(ws.tmp.iterdir())}; {where}"
    if probe.check is not None:
        probe.check(ws, proc)
    return proc
