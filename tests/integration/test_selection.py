"""The PSF selection archives outliers (moved, never deleted) and says why."""

from __future__ import annotations

import shutil

import numpy as np
from astropy.table import Table

import oasis_core
from oasis_core.engine.tree import Target
from tests.conftest import checksums


def test_frames_beyond_thresholds_are_archived_and_logged(tmp_path, sim_frames):
    paths, _ = sim_frames
    target = Target(tmp_path / "sel").create()
    for p in paths:
        shutil.copyfile(p, target.data / p.name)
    before = checksums(sorted(target.data.glob("*.fits")))
    oasis_core.mask(target.path, jobs=1)
    oasis_core.psf(target.path, jobs=1)
    stats = Table.read(target.path / "psf" / "psf.ecsv")
    assert np.all(stats["usable"])
    limit = float(np.sort(stats["fwhm"])[-2]) - 1e-3  # the two worst-seeing frames exceed it
    worst = sorted(str(f) for f in stats["frame"][stats["fwhm"] > limit])
    assert len(worst) == 2
    oasis_core.psf(target.path, jobs=1, options={"psf.fwhm_max": limit})
    archived = sorted(p.stem for p in target.archive.glob("*.fits"))
    assert archived == worst
    assert sorted(p.stem for p in target.data.glob("*.fits")) == sorted(
        str(f) for f in stats["frame"] if str(f) not in worst
    )
    # moved, not changed and not lost
    after = checksums(sorted(target.data.glob("*.fits")) + sorted(target.archive.glob("*.fits")))
    assert sorted(v for v in after.values()) == sorted(before.values())
    log = (target.archive / "log.txt").read_text().splitlines()
    assert len(log) == 2 and all("FWHM above fwhm_max" in line for line in log)
    stats = Table.read(target.path / "psf" / "psf.ecsv")
    assert sorted(str(f) for f in stats["frame"][~stats["usable"]]) == worst
    # the callable module: oasis_core.pipeline(path) runs the rest on the usable frames
    result = oasis_core.pipeline(target.path, jobs=1)
    assert result["extract"]["frames"] == 4
    catalog = Table.read(target.path / "sources" / "sources.ecsv")
    assert catalog.meta["OASSTAGE"] == "extract" and catalog.meta["OASBACK"] == "native"
