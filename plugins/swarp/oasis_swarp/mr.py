"""The ``swarp`` master-residual backend: OasisPy's master residual, co-added by SWarp.

OasisPy's default master residual is the weighted average of the noise-normalised
residuals. Each residual's ``Residual.normalized`` image (``(R - median(R)) / sigma``, 0
where its weight is 0) is written with a weight map that is ``a_i = 1 / c_i**2`` where the
residual has data (weight at least :data:`~oasis_core.contracts.model.MIN_WEIGHT`, 0.5,
below which the core counts a pixel as masked; ``noise > 0``; finite) and 0 elsewhere,
``c_i`` being its noise correlation at the PSF's scale
(:attr:`~oasis_core.contracts.model.Residual.noise_correlation`: 1 for a residual whose
science frame was not convolved), and SWarp co-adds them with ``COMBINE_TYPE WEIGHTED`` on
their own grid (``RESAMPLING_TYPE NEAREST`` by default: the residuals are registered, see
:mod:`oasis_swarp.combine`). So, as the native ``mr`` backend, over the ``n`` residuals
with data at a pixel::

    master = sum(a_i Rn_i) / sum(a_i)        (sigma units; 0 where n = 0)
    noise  = sqrt(sum(a_i**2)) / sum(a_i)    (its 1-sigma level, 1 / sqrt(n) for equal a_i)
    weight = n / N

(``n`` and ``sum(a_i**2)`` are counted here as the residuals go by). The native backend
also weights each residual by its weight map; both give the same master residual when the
weights are 0 or 1, and both leave out the same pixels.

The result is named ``MR``; its header is the first residual's plus ``NCOMBINE``,
``MRNORM``, ``BUNIT = ''`` (dimensionless: sigma units) and one ``HISTORY`` line per
input; ``meta`` holds ``n_residuals``, ``inputs``, ``frac_no_data`` and SWarp's
``swarp_seconds``, ``command``, ``config``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import attrs
import numpy as np

from oasis_core.contracts.backends import MrBackend, option
from oasis_core.contracts.errors import StageError
from oasis_core.contracts.model import MIN_WEIGHT, Residual
from oasis_core.contracts.validators import non_negative
from oasis_swarp.swarp import (
    RESAMPLING_TYPES,
    USER_CONFIG,
    SwarpImage,
    find_program,
    grid_settings,
    run_swarp,
    upper_case,
)

__all__ = ["SwarpMr", "SwarpMrOptions", "mr_settings"]


@attrs.frozen(kw_only=True)
class SwarpMrOptions:
    """Options of the ``swarp`` master-residual backend (SWarp's keyword in brackets).

    A ``default.swarp`` in the target's ``configs/`` replaces the generated configuration;
    ``COMBINE_TYPE WEIGHTED``, the weights and the outputs are forced either way.
    """

    binary: str = option("", "the SWarp program; '': 'SWarp' or 'swarp' on PATH")
    resampling_type: str = option(
        "NEAREST",
        "[RESAMPLING_TYPE] NEAREST is exact on registered residuals",
        converter=upper_case,
        choices=RESAMPLING_TYPES,
    )
    nthreads: int = option(0, "[NTHREADS] threads SWarp uses; 0: all cores", range=(0, None))
    timeout: float = option(
        900.0, "seconds before SWarp is stopped (a StageError); 0: no limit", range=non_negative
    )


def mr_settings(options: Any) -> dict[str, str]:
    """The ``oasis.swarp`` settings from the options (not the forced ones)."""
    # the normalised residuals are already centred: no background subtraction
    return grid_settings(options.resampling_type, options.nthreads, subtract_back=False)


class SwarpMr(MrBackend):
    """Weighted mean of the noise-normalised residuals by SWarp (see the module docstring)."""

    name = "swarp"
    Options = SwarpMrOptions
    description = "SWarp WEIGHTED co-add of the noise-normalised residuals (external)"
    user_files: ClassVar[tuple[str, ...]] = (USER_CONFIG,)

    def check(self, options: SwarpMrOptions) -> None:
        """Raise :class:`~oasis_core.contracts.errors.BackendUnavailable` when SWarp is missing."""
        find_program(options.binary, "mr.swarp")

    def master(
        self, residuals: Sequence[Residual], *, options: SwarpMrOptions, workdir: Path
    ) -> Residual:
        """Return the master residual ``MR`` of ``residuals``.

        Parameters
        ----------
        residuals : sequence of Residual
            Residuals on one pixel grid.
        options : SwarpMrOptions
        workdir : Path
            Scratch directory: SWarp's inputs, configuration, outputs and ``swarp.log``.

        Returns
        -------
        Residual
            ``name = "MR"``, in sigma units, with its noise and weight (module docstring).

        Raises
        ------
        oasis_core.contracts.errors.BackendUnavailable
            When SWarp is missing.
        oasis_core.contracts.errors.StageError
            When no residual is given, the shapes differ or SWarp fails.
        """
        from astropy.io import fits

        where = "mr backend 'swarp'"
        if not residuals:
            raise StageError(f"{where}: no residual to combine")
        program = find_program(options.binary, "mr.swarp")
        names: list[str] = []
        templates: set[str] = set()
        shape = residuals[0].data.shape
        count = np.zeros(shape, np.int32)
        sum_a2 = np.zeros(shape, np.float64)

        def images() -> Iterator[SwarpImage]:
            # one residual at a time, written by run_swarp as it comes: the series may be
            # read from disk as it goes (memory flat in the number of residuals)
            for r in residuals:
                names.append(r.name)
                templates.add(r.template)
                data = np.asarray(r.data)
                good = (np.asarray(r.weight) >= MIN_WEIGHT) & (np.asarray(r.noise) > 0)
                good &= np.isfinite(data)
                a = 1.0 / r.noise_correlation**2
                if good.shape == shape:  # else run_swarp names the odd one
                    count[good] += 1
                    sum_a2[good] += a * a
                yield SwarpImage(
                    name=r.name,
                    data=r.normalized,
                    weight=np.where(good, np.float32(a), np.float32(0.0)),
                    header=r.header,
                )

        out = run_swarp(
            program,
            images(),
            settings=mr_settings(options),
            combine_type="WEIGHTED",
            workdir=workdir,
            where=where,
            timeout=options.timeout,
        )

        sum_a = np.where(np.isfinite(out.weight), out.weight, 0.0)  # run_swarp: one grid
        has = (count > 0) & (sum_a > 0) & np.isfinite(out.data)
        safe = np.where(has, sum_a, 1.0)
        data = np.where(has, out.data, 0.0).astype(np.float32)
        noise = np.where(has, np.sqrt(sum_a2) / safe, 0.0).astype(np.float32)
        weight = np.where(has, count / len(names), 0.0).astype(np.float32)

        first = residuals[0].header
        header = first.copy() if isinstance(first, fits.Header) else fits.Header(dict(first or {}))
        header["NCOMBINE"] = (len(names), "number of residuals in the master residual")
        header["MRNORM"] = (True, "residuals normalised by their noise")
        header["BUNIT"] = ("", "dimensionless: residuals in units of their noise")
        for name in names:
            header.add_history(f"oasis mr input: {name}")
        return Residual(
            data=data,
            noise=noise,
            weight=weight,
            header=header,
            name="MR",
            science="",
            template=templates.pop() if len(templates) == 1 else "",
            params={"normalize": True},
            meta={
                "n_residuals": len(names),
                "inputs": ",".join(names),
                "frac_no_data": float(1.0 - has.mean()),
                "swarp_seconds": out.seconds,
                "command": out.command[:1000],
                "config": out.config,
                "wcs": out.wcs,
            },
        )
