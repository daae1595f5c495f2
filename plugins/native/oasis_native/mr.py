"""Native master-residual backend: the weighted mean of the residuals in sigma units.

For residuals ``R_i`` with noise images ``sigma_i`` and weight maps ``w_i``::

    Rn_i   = (R_i - median(R_i)) / sigma_i           (Residual.normalized; 0 where w_i = 0)
    master = sum(w_i Rn_i) / sum(w_i)
    noise  = sqrt(sum(w_i**2)) / sum(w_i)
    weight = (number of residuals with w_i > 0) / N

so the master is in sigma units and its noise image is its exact 1-sigma level when the
``Rn_i`` are independent unit-variance noise (1/sqrt(N) for N equal weights): a source
detected on the master at ``k`` times its noise is a ``k``-sigma event. Where no residual
has data the master, its noise and its weight are 0.

With ``normalize = false`` the residuals are averaged in ADU instead
(``sum(w_i R_i) / sum(w_i)``, noise ``sqrt(sum(w_i**2 sigma_i**2)) / sum(w_i)``), which only
makes sense when they share one photometric scale.

Which residuals go in (flags, Q floor) is the core's choice: every residual given is used.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from oasis_core.backends import MrBackend, option
from oasis_core.errors import StageError
from oasis_core.model import Residual

__all__ = ["NativeMr", "NativeMrOptions"]


@attrs.frozen(kw_only=True)
class NativeMrOptions:
    """Options of the native master-residual backend."""

    normalize: bool = option(
        True, "average the residuals normalised by their noise (sigma units); false: in ADU"
    )


class NativeMr(MrBackend):
    """Noise-normalised weighted mean of residuals."""

    name = "native"
    Options = NativeMrOptions
    description = "weighted mean of noise-normalised residuals, with its noise image"

    def check(self, options: Any) -> None:
        """Accept: numpy only."""

    def master(
        self, residuals: Sequence[Residual], *, options: NativeMrOptions, workdir: Path
    ) -> Residual:
        """Return the master residual ``MR`` of ``residuals``.

        Parameters
        ----------
        residuals : sequence of Residual
            Residuals on one pixel grid.
        options : NativeMrOptions
        workdir : Path
            Unused.

        Returns
        -------
        Residual
            ``name = "MR"``; ``data``, ``noise`` and ``weight`` as in the module docstring;
            header from the first residual plus ``NCOMBINE`` and the inputs in ``HISTORY``.

        Raises
        ------
        StageError
            When no residual is given or the shapes differ.
        """
        return _master(list(residuals), options)


def _master(residuals: list[Residual], options: NativeMrOptions) -> Residual:
    from astropy.io import fits

    if not residuals:
        raise StageError("mr: no residual to combine")
    shape = residuals[0].data.shape
    for r in residuals[1:]:
        if r.data.shape != shape:
            raise StageError(
                f"mr: residual {r.name!r} has shape {r.data.shape}, residual "
                f"{residuals[0].name!r} has {shape}"
            )
    sum_w = np.zeros(shape, np.float64)
    sum_wr = np.zeros(shape, np.float64)
    sum_w2 = np.zeros(shape, np.float64)
    count = np.zeros(shape, np.int32)
    for r in residuals:  # one pass per residual, whole arrays
        good = (np.asarray(r.weight) > 0) & (np.asarray(r.noise) > 0) & np.isfinite(r.data)
        w = np.where(good, np.asarray(r.weight, np.float64), 0.0)
        if options.normalize:
            values = np.asarray(r.normalized, np.float64)
            var = 1.0
        else:
            values = np.where(good, np.asarray(r.data, np.float64), 0.0)
            var = np.where(good, np.asarray(r.noise, np.float64) ** 2, 0.0)
        sum_w += w
        sum_wr += w * values
        sum_w2 += w**2 * var
        count += good
    has = sum_w > 0
    safe = np.where(has, sum_w, 1.0)
    data = np.where(has, sum_wr / safe, 0.0)
    noise = np.where(has, np.sqrt(sum_w2) / safe, 0.0)

    names = [r.name for r in residuals]
    first = residuals[0].header
    header = first.copy() if isinstance(first, fits.Header) else fits.Header(dict(first or {}))
    header["NCOMBINE"] = (len(residuals), "number of residuals in the master residual")
    header["MRNORM"] = (bool(options.normalize), "residuals normalised by their noise")
    for name in names:
        header.add_history(f"oasis mr input: {name}")
    templates = {r.template for r in residuals}
    return Residual(
        data=data.astype(np.float32),
        noise=noise.astype(np.float32),
        weight=(count / len(residuals)).astype(np.float32),
        header=header,
        name="MR",
        science="",
        template=templates.pop() if len(templates) == 1 else "",
        params={"normalize": bool(options.normalize)},
        meta={
            "n_residuals": len(residuals),
            "inputs": ",".join(names),
            "frac_no_data": float(1.0 - has.mean()),
        },
    )
