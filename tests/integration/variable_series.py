"""A simulated series with known light curves, for the photometry stage's tests.

40 frames of 128x128 (``oasis_native.sim``), a field of constant stars, with five injected
sources:

- ``variable``: a sinusoid (period :data:`PERIOD` days) that is bright on the template
  nights (the best-seeing frames are those where it is near maximum);
- ``fading``: an exponential decline through the series;
- ``transient``: nothing until the last :data:`N_TRANSIENT` frames (never on a template
  night), then on;
- ``constant``: a constant star;
- ``microlensing``: a star that brightens in a Paczynski bump (Einstein time
  :data:`T_E` days, impact parameter :data:`U0`) over a few nights that are not template
  nights, then returns to its level.

:func:`make_variable_target` writes it into a target and returns the truth: per source
its frame-0 pixel position and, per frame, its flux.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

__all__ = ["KINDS", "N_FRAMES", "PERIOD", "SHAPE", "make_variable_target", "simulate"]

T_E = 4.0  # days
U0 = 0.15
MICRO_BASE = 1500.0

N_FRAMES = 40
SHAPE = (128, 128)
SEED = 11
PERIOD = 3.7  # days
N_TRANSIENT = 8
#: name -> frame-0 position (x, y)
POSITIONS = {
    "variable": (40.0, 44.0),
    "fading": (88.0, 40.0),
    "transient": (44.0, 88.0),
    "constant": (86.0, 86.0),
    "microlensing": (64.0, 64.0),
}
KINDS = {
    "variable": "variable",
    "fading": "fading",
    "transient": "transient",
    "constant": "constant",
    "microlensing": "transient",  # appears on a star: only ever brighter than the template
}


def _paczynski(t: float, t_peak: float) -> float:
    u = math.hypot(U0, (t - t_peak) / T_E)
    return (u * u + 2.0) / (u * math.sqrt(u * u + 4.0))


def _functions(t0: float, t_on: float, t_peak: float = 0.0):  # type: ignore[no-untyped-def]
    return {
        "variable": lambda t: 4000.0 + 2500.0 * math.sin(2 * math.pi * (t - t0) / PERIOD),
        "fading": lambda t: 9000.0 * math.exp(-(t - t0) / 25.0),
        "transient": lambda t: 5000.0 if t >= t_on else 0.0,
        "constant": lambda t: 5000.0,
        "microlensing": lambda t: MICRO_BASE * _paczynski(t, t_peak),
    }


def simulate(**kwargs):  # type: ignore[no-untyped-def]
    from oasis_native.sim import simulate_series

    return simulate_series(
        N_FRAMES,
        SHAPE,
        seed=SEED,
        n_transients=0,
        galaxy=False,
        max_rotation_deg=0.0,
        **kwargs,
    )


def make_variable_target(directory: Path) -> tuple[Path, dict]:
    """The series in a target at ``directory/OASIS/targets/var``; returns its path and
    the truth ``{"mjd": [...], "frames": [...], name: {"xy": (x, y), "flux": [...]}}``."""
    from oasis_native.sim import write_series

    from oasis_core.engine.tree import Target, init_root

    first = simulate(frame_fwhm=[3.0] * N_FRAMES)  # the times (the same whatever the PSFs)
    mjd = np.array([float(h["MJD-OBS"]) + 30.0 / 86400.0 for _, h in first.frames])
    t_on = float(mjd[N_FRAMES - N_TRANSIENT]) - 1e-6
    fns = _functions(float(mjd[0]), t_on)
    # the best-seeing third (the template) is where the variable is brightest, never
    # where the transient is on
    phase_flux = np.array([fns["variable"](t) for t in mjd])
    candidates = np.argsort(-phase_flux[: N_FRAMES - N_TRANSIENT], kind="stable")
    n_template = math.ceil(0.34 * N_FRAMES)
    best = set(candidates[:n_template].tolist())
    rng = np.random.default_rng(SEED)
    fwhm = [
        float(rng.uniform(2.6, 2.9)) if k in best else float(rng.uniform(3.2, 4.2))
        for k in range(N_FRAMES)
    ]
    # the bump's peak on the middle night of the longest run of non-template nights
    # before the transient
    free = [k for k in range(N_FRAMES - N_TRANSIENT) if k not in best]
    runs: list[list[int]] = []
    for k in free:
        if runs and runs[-1][-1] == k - 1:
            runs[-1].append(k)
        else:
            runs.append([k])
    longest = max(runs, key=len)
    fns = _functions(float(mjd[0]), t_on, float(mjd[longest[len(longest) // 2]]))
    order = list(POSITIONS)
    series = simulate(
        frame_fwhm=fwhm,
        variables=[(*POSITIONS[n], fns[n]) for n in order],
    )
    base = init_root(directory)
    target = Target(base / "targets" / "var").create()
    write_series(series, target.data)
    target.config_file.write_text("[mask.native]\nniter = 1\n")
    truth: dict = {"mjd": mjd.tolist(), "frames": list(series.names)}
    for name, fluxes in zip(order, series.stars.meta["variables"], strict=True):
        truth[name] = {"xy": POSITIONS[name], "flux": list(fluxes)}
    return target.path, truth
