"""The frames the combine stage hands its backend (:class:`oasis_core.engine.io.FrameSeries`):
read from their files when asked for, by blocks of rows for a backend that needs every
frame at each pixel, so that a template of N frames holds no N frames in memory."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from oasis_core.contracts.model import Frame
from oasis_core.engine import io
from oasis_core.engine.stacking import frame_background, psf_change

SHAPE = (256, 192)


def _frames(tmp_path, n=12):
    rng = np.random.default_rng(7)
    paths, frames = [], []
    for i in range(n):
        data = rng.normal(100.0 + i, 5.0, SHAPE).astype(np.float32)
        weight = np.ones(SHAPE, np.float32)
        weight[10 + i : 14 + i, 20:40] = 0.0  # a masked patch that moves
        data[3, 5] = np.nan
        frame = Frame(
            data=data,
            weight=weight,
            name=f"f{i:02d}",
            gain=1.5,
            readnoise=5.0,
            fwhm=3.0 + 0.1 * i,
            saturation=6e4,
        )
        path = tmp_path / f"f{i:02d}.fits"
        io.write_frame(path, frame)
        paths.append(path)
        frames.append(io.read_output_frame(path))
    return paths, frames


def test_a_series_reads_rows_and_describes_frames_as_the_files_hold_them(tmp_path):
    paths, frames = _frames(tmp_path, n=4)
    series = io.FrameSeries(paths)
    assert len(series) == 4 and series[2].name == "f02"
    assert np.array_equal(series[1].data, frames[1].data, equal_nan=True)
    data, weight = series.rows(30, 47)
    assert data.shape == weight.shape == (4, 17, SHAPE[1]) and data.dtype == np.float32
    for i, f in enumerate(frames):
        assert np.array_equal(data[i], f.data[30:47], equal_nan=True)
        assert np.array_equal(weight[i], f.weight[30:47])
    described = series.described()
    assert [d.name for d in described] == [f.name for f in frames]
    for d, f in zip(described, frames, strict=True):
        assert d.shape == f.shape and d.fwhm == pytest.approx(f.fwhm)
        assert d.gain == f.gain and d.saturation == f.saturation
        # the sky level measured from the pixels, which the description does not hold
        assert frame_background(d) == pytest.approx(frame_background(f))
        assert d.data.strides == (0, 0) and np.isnan(d.data).all() and not d.weight.any()
    assert series.described() is described  # read once
    assert isinstance(series[1:3], io.FrameSeries) and len(series[1:3]) == 2
    # the coverage of the stack's inputs, from the files one at a time
    assert np.array_equal(psf_change(series), psf_change(frames))


def test_a_template_of_frames_on_disk_takes_memory_flat_in_their_number(tmp_path, monkeypatch):
    """The native combine on a series: the same template as from the frames in memory,
    and the memory it allocates does not grow with the number of frames. All the frames
    were held at once before (the 33 of a night of 100 frames of 2048^2: 1.6 GB)."""
    import oasis_native.combine as native

    monkeypatch.setattr(native, "_CHUNK", 1 << 15)  # blocks of a few rows
    options = native.NativeCombineOptions()
    peaks = {}
    for n in (6, 24):
        folder = tmp_path / str(n)
        folder.mkdir()
        paths, frames = _frames(folder, n)
        expected = native.NativeCombine().combine(frames, options=options, workdir=folder)
        del frames
        series = io.FrameSeries(paths)
        tracemalloc.start()
        try:
            got = native.NativeCombine().combine(series, options=options, workdir=folder)
            peaks[n] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert np.array_equal(got.data, expected.data)
        assert np.array_equal(got.weight, expected.weight)
        assert got.inputs == expected.inputs and got.gain == pytest.approx(expected.gain)
    frame_bytes = 2 * 4 * SHAPE[0] * SHAPE[1]  # data and weight, float32
    # 18 more frames: 3.5 MB more if they were held; a few rows of each at most
    assert peaks[24] - peaks[6] < 2 * frame_bytes, peaks
