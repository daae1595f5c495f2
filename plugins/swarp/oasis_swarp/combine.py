"""The ``swarp`` combine backend: the template as SWarp's co-add of the aligned frames.

The frames reach the combine stage already chosen, registered onto the reference frame's
grid and photometrically matched. Each is written with its weight map as SWarp's
``MAP_WEIGHT``: the frame's weight divided by its sky variance (``Frame.noise``, else a
robust estimate), relative to the least noisy frame, so that ``WEIGHTED`` is the
inverse-variance mean and ``CLIPPED`` sees each frame's noise; ``MEDIAN`` (the default,
OasisPy's) only uses which pixels have weight 0. All frames and the output get one WCS
(the frames' own when they share it, else a synthetic TAN one) and the output grid is
forced to the first frame's, so the template has the frames' shape and pixels. No flux
rescaling (``FSCALASTRO_TYPE NONE``, no ``FLXSCALE``), no weight rescaling, no background
subtraction unless ``subtract_back``; negative (sky-subtracted) pixels are kept.

Resampling
    The frames are already on the output grid, so resampling is the identity and
    ``NEAREST`` (the default) reproduces every pixel exactly. SWarp's interpolating
    kernels also work but are not free here: an output pixel whose kernel footprint
    touches a pixel of weight 0 or the frame's edge gets weight 0 from that frame, so
    ``LANCZOS3`` drops each frame within 3 px of each of its masked pixels (cosmic rays,
    saturated stars) and leaves the template's outer 2-3 px without data.

Template properties
    * ``data``: SWarp's co-add; where no frame has data, the median of the frames'
      backgrounds (else 0) with ``weight`` 0.
    * ``weight``: SWarp's output weight divided by its maximum (in [0, 1]).
    * ``header``: the first frame's, plus ``NCOMBINE``, ``COMBTYPE`` and one ``HISTORY``
      line per input.
    * ``gain``/``readnoise``: as the native backend's, ``N**2 / sum(1 / gain_i)`` times
      ``2/pi`` for ``MEDIAN`` (None for ``MIN``, ``MAX``, ``SUM``); ``saturation``: the
      smallest input's; ``background``: median of the inputs'; ``noise``: measured on the
      result; ``fwhm``: median of the inputs'.
    * ``meta``: ``ncombine``, ``combine_method``, ``frac_no_data``, ``swarp_seconds``,
      ``swarp_version``, ``command``, ``config`` (``oasis.swarp`` or the user's
      ``default.swarp``) and ``wcs`` (``own`` or ``synthetic``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import attrs
import numpy as np

from oasis_core.contracts.backends import CombineBackend, option
from oasis_core.contracts.errors import StageError
from oasis_core.contracts.model import Frame, Template
from oasis_core.contracts.validators import non_negative
from oasis_core.engine.stacking import frame_noise, median_or_none, stack_template
from oasis_swarp.swarp import (
    RESAMPLING_TYPES,
    USER_CONFIG,
    SwarpImage,
    find_program,
    grid_settings,
    run_swarp,
    upper_case,
)

__all__ = ["COMBINE_TYPES", "SwarpCombine", "SwarpCombineOptions", "combine_settings"]

#: SWarp's ``COMBINE_TYPE`` values that give an image in the frames' units.
COMBINE_TYPES = ("MEDIAN", "AVERAGE", "WEIGHTED", "CLIPPED", "MIN", "MAX", "SUM")

_MEAN_LIKE = ("AVERAGE", "WEIGHTED", "CLIPPED")


@attrs.frozen(kw_only=True)
class SwarpCombineOptions:
    """Options of the ``swarp`` combine backend (SWarp's keyword in brackets).

    With a ``default.swarp`` in the target's ``configs/``, SWarp reads that file instead
    of one generated from ``resampling_type``, ``subtract_back`` and ``nthreads``;
    ``combine_type`` and the settings the backend depends on are forced either way.
    """

    binary: str = option("", "the SWarp program; '': 'SWarp' or 'swarp' on PATH")
    combine_type: str = option(
        "MEDIAN",
        f"[COMBINE_TYPE] one of {', '.join(COMBINE_TYPES)}",
        converter=upper_case,
        choices=COMBINE_TYPES,
    )
    resampling_type: str = option(
        "NEAREST",
        "[RESAMPLING_TYPE] NEAREST is exact on registered frames; the others lose pixels "
        "near masked ones and the edges",
        converter=upper_case,
        choices=RESAMPLING_TYPES,
    )
    subtract_back: bool = option(False, "[SUBTRACT_BACK] let SWarp subtract each sky")
    nthreads: int = option(0, "[NTHREADS] threads SWarp uses; 0: all cores", range=(0, None))
    timeout: float = option(
        900.0, "seconds before SWarp is stopped (a StageError); 0: no limit", range=non_negative
    )


def combine_settings(options: Any) -> dict[str, str]:
    """The ``oasis.swarp`` settings from the options (not the forced ones).

    Examples
    --------
    >>> combine_settings(SwarpCombineOptions(subtract_back=True))["SUBTRACT_BACK"]
    'Y'
    """
    return {
        **grid_settings(options.resampling_type, options.nthreads, options.subtract_back),
        "GAIN_KEYWORD": "GAIN",
        "GAIN_DEFAULT": "0.0",
        "COPY_KEYWORDS": "OBJECT",
    }


class SwarpCombine(CombineBackend):
    """SWarp's co-add of the aligned frames (see the module docstring)."""

    name = "swarp"
    Options = SwarpCombineOptions
    description = "SWarp co-add (median by default) on the frames' own grid (external)"
    user_files: ClassVar[tuple[str, ...]] = (USER_CONFIG,)

    def check(self, options: SwarpCombineOptions) -> None:
        """Raise :class:`~oasis_core.contracts.errors.BackendUnavailable` when SWarp is missing."""
        find_program(options.binary, "combine.swarp")

    def combine(
        self, frames: Sequence[Frame], *, options: SwarpCombineOptions, workdir: Path
    ) -> Template:
        """Return the template of ``frames`` co-added by SWarp.

        Parameters
        ----------
        frames : sequence of Frame
            The chosen frames, aligned on one grid and flux scale.
        options : SwarpCombineOptions
        workdir : Path
            Scratch directory: SWarp's inputs, configuration, outputs and ``swarp.log``.

        Returns
        -------
        Template
            See the module docstring.

        Raises
        ------
        oasis_core.contracts.errors.BackendUnavailable
            When SWarp is missing.
        oasis_core.contracts.errors.StageError
            When no frame is given, the shapes differ or SWarp fails.
        """

        where = "combine backend 'swarp'"
        frames = list(frames)
        if not frames:
            raise StageError(f"{where}: no frame to combine")
        program = find_program(options.binary, "combine.swarp")
        noises = np.array([frame_noise(f) for f in frames])
        images = [
            SwarpImage(
                name=f.name,
                data=f.data,
                weight=np.asarray(f.weight, np.float32) * np.float32((noises.min() / s) ** 2),
                header=f.header,
                cards={"GAIN": f.gain},
            )
            for f, s in zip(frames, noises, strict=True)
        ]
        out = run_swarp(
            program,
            images,
            settings=combine_settings(options),
            combine_type=options.combine_type,
            workdir=workdir,
            where=where,
            timeout=options.timeout,
        )

        wmax = float(out.weight.max()) if out.weight.size else 0.0
        has = out.weight > 0
        weight = np.where(has, out.weight / (wmax if wmax > 0 else 1.0), 0.0).astype(np.float32)
        background = median_or_none([f.background for f in frames])
        fill = np.float32(background if background is not None else 0.0)
        data = np.where(has & np.isfinite(out.data), out.data, fill).astype(np.float32)
        weight[~np.isfinite(out.data)] = 0.0
        statistic = (
            "median"
            if options.combine_type == "MEDIAN"
            else ("mean" if options.combine_type in _MEAN_LIKE else None)
        )
        return stack_template(
            frames,
            data,
            weight,
            statistic=statistic,
            cards={"COMBTYPE": (options.combine_type, "SWarp COMBINE_TYPE (oasis swarp)")},
            meta={
                "combine_method": f"swarp {options.combine_type}",
                "swarp_seconds": out.seconds,
                "swarp_version": str(out.header.get("SOFTVERS", "")).strip(),
                "command": out.command[:1000],
                "config": out.config,
                "wcs": out.wcs,
            },
        )
