"""Resume follows the contents of the files the configuration names.

Editing the ISIS file named by ``subtract.ois.isis_config`` redoes the subtraction;
editing the target's ``configs/default.sex`` redoes the stage whose backend reads it
(``extract.sextractor``), also when the edit keeps the file's size and modification time
(``cp -p``, ``rsync -t``) in a process that already hashed it; files left alone leave
every unit "already up to date".
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from oasis_core.engine.pipeline import pipeline

#: The stages' options: an extract backend that reads configs/default.sex, ois reading an
#: ISIS file named relative to the target (the tests run from inside the target).
OPTIONS = {
    "extract.backend": "sextractor",
    "subtract.ois.isis_config": "configs/isis_config",
    "run.min_frames": 3,
}


@contextlib.contextmanager
def _inside(path: Path) -> Iterator[None]:
    old = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def _run(target: Path) -> None:
    with _inside(target):
        pipeline(target, jobs=1, options=OPTIONS)


@pytest.fixture(scope="module")
def done(tmp_path_factory) -> Path:
    """A small simulated target after one full run with those options."""
    from oasis_apps.get import unpack
    from oasis_core.engine.plugins import Registry
    from oasis_core.engine.tree import Target, init_root

    if not (shutil.which("source-extractor") or shutil.which("sex")):
        pytest.fail("SExtractor is needed (it is installed on the test machine)")
    base = init_root(tmp_path_factory.mktemp("resume_files"))
    Registry().simulator("native").simulate(
        base / "sim", n_frames=4, shape=(192, 192), seed=11, transients=2
    )
    target = Target(base / "targets" / "t").create()
    unpack([base / "sim"], target)
    (target.configs / "isis_config").write_text("deg_spatial 2\n")
    (target.configs / "default.sex").write_text("DETECT_THRESH    1.5\n")
    _run(target.path)
    return target.path


@pytest.fixture
def target(done, tmp_path) -> Path:
    """A copy of the finished target; it must still be current as it is."""
    copy = tmp_path / "t"
    shutil.copytree(done, copy)
    before = _stamps(copy)
    _run(copy)
    assert _stamps(copy) == before, "unchanged files: nothing may be redone"
    return copy


def _stamps(target: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of every stage output: an output rewritten gets new ones."""
    out = {}
    for pattern in (
        "masks/*.fits",
        "psf/*.psf.fits",
        "aligned/*.fits",
        "templates/template.fits",
        "residuals/*_residual.fits",
        "sources/detections/*.ecsv",
    ):
        for p in sorted(target.glob(pattern)):
            st = p.stat()
            out[str(p.relative_to(target))] = (st.st_ino, st.st_mtime_ns)
    return out


def _redone(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]], prefix: str):
    keys = [k for k in before if k.startswith(prefix)]
    assert keys, f"no {prefix} outputs"
    return sum(before[k] != after.get(k) for k in keys), len(keys)


def _edit(path: Path, text: str, *, keep_stat: bool) -> None:
    st = path.stat()
    path.write_text(text)
    if keep_stat:  # as cp -p / rsync -t leave it: same size, the old modification time
        assert path.stat().st_size == st.st_size
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.parametrize("keep_stat", [False, True], ids=["edited", "edited-keeping-mtime"])
def test_editing_the_isis_config_file_redoes_the_subtraction(target, keep_stat):
    before = _stamps(target)
    _edit(target / "configs" / "isis_config", "deg_spatial 1\n", keep_stat=keep_stat)
    _run(target)
    after = _stamps(target)
    done, total = _redone(before, after, "residuals/")
    assert done == total, f"{done}/{total} residuals redone after editing the ISIS file"
    assert _redone(before, after, "aligned/")[0] == 0, "upstream work was redone"
    # and the new state is current again
    _run(target)
    assert _stamps(target) == after


@pytest.mark.parametrize("keep_stat", [False, True], ids=["edited", "edited-keeping-mtime"])
def test_editing_configs_default_sex_redoes_the_stage_that_reads_it(target, keep_stat):
    before = _stamps(target)
    _edit(target / "configs" / "default.sex", "DETECT_THRESH    2.5\n", keep_stat=keep_stat)
    _run(target)
    after = _stamps(target)
    done, total = _redone(before, after, "sources/detections/")
    assert done == total, f"{done}/{total} catalogs redone after editing default.sex"
    for stage in ("psf/", "aligned/", "residuals/"):  # their backends do not read it
        assert _redone(before, after, stage)[0] == 0, f"{stage} redone needlessly"
    _run(target)
    assert _stamps(target) == after
