"""The native plugin's :class:`~oasis_core.contracts.backends.Simulator` (wraps
:mod:`oasis_native.sim`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from oasis_core.contracts.backends import Simulator

__all__ = ["NativeSimulator"]


class NativeSimulator(Simulator):
    """Star field, galaxy, varying Moffat PSF, sky, noise, cosmic rays, transients."""

    name = "native"
    description = "numpy simulator of a series of frames with injected transients"

    def simulate(
        self,
        directory: Path,
        *,
        n_frames: int,
        shape: tuple[int, int],
        seed: int,
        transients: int | None = None,
    ) -> Any:
        from oasis_native.sim import simulate_series, write_series

        extra = {} if transients is None else {"n_transients": int(transients)}
        series = simulate_series(n_frames=n_frames, shape=shape, seed=seed, **extra)
        write_series(series, directory)
        return series.truth
