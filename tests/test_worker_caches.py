"""A worker process keeps the template it read for its extract and mr tasks; a template
written again (the next run's combine) must be read again, even when its size and
modification time are those of the old one (``cp -p``, ``rsync -t``, an atomic rewrite
within the clock's resolution)."""

from __future__ import annotations

import os

import numpy as np

from oasis_core.contracts.model import Frame
from oasis_core.engine import io, tasks, variability


def _write(path, value):
    data = np.full((64, 64), 100.0, np.float32)
    data[30:34, 30:34] = value
    io.write_frame(path, Frame(data=data, name="template", gain=1.0, readnoise=5.0))


def test_a_template_written_again_is_read_again_whatever_its_times(tmp_path):
    path = tmp_path / "template.fits"
    _write(path, 5000.0)
    first_data = tasks._template_data(path, (64, 64)).copy()
    first_stars = variability._worker_stars(path)[0].copy()
    stat = path.stat()
    _write(path, 9000.0)  # same size; the old times put back
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size
    assert path.stat().st_mtime_ns == stat.st_mtime_ns
    again = tasks._template_data(path, (64, 64))
    assert again[31, 31] == 9000.0 and first_data[31, 31] == 5000.0
    stars = variability._worker_stars(path)[0]
    assert stars.max() > first_stars.max() + 3000.0


def test_the_subtract_tasks_get_one_template_object_while_its_file_stays(tmp_path):
    """Every subtract task of a worker gets the very same template object (so the
    backend may keep what it prepared of it) until the file is written again."""
    path = tmp_path / "template.fits"
    _write(path, 5000.0)
    first = tasks.worker_template(path)
    assert tasks.worker_template(path) is first
    assert not first.data.flags.writeable
    _write(path, 9000.0)
    again = tasks.worker_template(path)
    assert again is not first and again.data[31, 31] == 9000.0
