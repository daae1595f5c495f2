"""Native master-residual backend: the weighted mean of the residuals in sigma units.

For residuals ``R_i`` with noise images ``sigma_i``, weight maps ``w_i`` and noise
correlation ``c_i``::

    Rn_i   = (R_i - median(R_i)) / sigma_i           (Residual.normalized; 0 where w_i = 0)
    a_i    = w_i / c_i**2
    master = sum(a_i Rn_i) / sum(a_i)
    noise  = sqrt(sum(a_i**2)) / sum(a_i)
    weight = (number of residuals with data) / N

``c_i`` is how much more the residual's noise spreads at the PSF's scale than its noise
image says (:attr:`~oasis_core.contracts.model.Residual.noise_correlation`, which the core
measures on every residual: :func:`oasis_core.engine.sources.noise_correlation`).
A residual whose science frame was convolved, or both frames (cross-convolution), has
noise shared between neighbouring pixels: its pixels are unit-variance in ``Rn_i`` but a
point source's flux on it is ``c_i`` times noisier, and so are its kernel's wing errors.
Weighted by its pixels alone, one such residual in six put a 9-sigma ring at a bright
star into the master residual of a simulated null night (issue 14).

where a residual has data at a pixel when its weight there is at least
:data:`~oasis_core.contracts.model.MIN_WEIGHT` (0.5; below, the core counts the pixel as
masked: less than half of the data behind it, a template's median of one or two frames
beside a saturated star), its noise is positive and its value finite; the sums run over
those residuals.

so the master is in sigma units and its noise image is its exact 1-sigma level when the
``Rn_i`` are independent unit-variance noise (1/sqrt(N) for N equal weights): a source
detected on the master at ``k`` times its noise is a ``k``-sigma event. Where no residual
has data the master, its noise and its weight are 0.

With ``normalize = false`` the residuals are averaged in ADU instead
(``sum(w_i R_i) / sum(w_i)``, noise ``sqrt(sum(w_i**2 sigma_i**2)) / sum(w_i)``), which only
makes sense when they share one photometric scale.

Which residuals go in (flags, Q floor) is the core's choice: every residual given is used.

OasisPy's other stacking methods are backends of their own, selected as ``--mr=NAME``. They
combine the same normalised residuals ``Rn_i`` pixel by pixel over the ``n`` residuals that
have data there (OasisPy stacked the raw residuals; in sigma units every frame counts alike
and the noise image below is exact for unit Gaussian noise; "have data" as above):

* ``sos``: ``sum(Rn_i**2)``, noise ``sqrt(2 n)`` (the spread of a chi-square with ``n``
  degrees of freedom; its mean ``n`` is the background);
* ``sos_abs``: ``sum(Rn_i * |Rn_i|)``, which keeps the sign; noise ``sqrt(3 n)``;
* ``sigma_clip``: the median of the ``Rn_i``, unless the largest (smallest) lies at least
  ``sig_thresh`` standard deviations of the ``Rn_i`` above (below) that median: then that
  value (the largest when both do); noise ``sqrt(pi / 2) / sqrt(n)``, the spread of a
  median. With ``gauss_filt`` the result is smoothed with a Gaussian of ``gauss_sig``
  pixels and the noise divided by ``2 sqrt(pi) gauss_sig`` (smoothed white noise).

Where no residual has data the master, its noise and its weight are 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from oasis_core.contracts.backends import MrBackend, option
from oasis_core.contracts.errors import StageError
from oasis_core.contracts.model import MIN_WEIGHT, Residual
from oasis_core.contracts.validators import non_negative, positive

__all__ = [
    "NativeMr",
    "NativeMrOptions",
    "SigmaClipMr",
    "SigmaClipOptions",
    "SosAbsMr",
    "SosMr",
]


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
        return _master(residuals, options)


def _master(residuals: Sequence[Residual], options: NativeMrOptions) -> Residual:
    # one pass, one residual at a time: the series may be read from disk as it goes
    if not residuals:
        raise StageError("mr: no residual to combine")
    first = residuals[0]
    shape = first.data.shape
    names: list[str] = []
    templates: set[str] = set()
    sum_w = np.zeros(shape, np.float64)
    sum_wr = np.zeros(shape, np.float64)
    sum_w2 = np.zeros(shape, np.float64)
    count = np.zeros(shape, np.int32)
    correlations: list[float] = []
    zero = np.float32(0.0)
    for r in residuals:  # one pass per residual, whole arrays (its terms in float32)
        good = _has_data(r)
        c = r.noise_correlation
        correlations.append(c)
        w = np.where(good, np.asarray(r.weight, np.float32) * np.float32(1.0 / (c * c)), zero)
        if options.normalize:
            values = np.asarray(r.normalized, np.float32)
            w2 = w * w
        else:
            values = np.where(good, np.asarray(r.data, np.float32), zero)
            w2 = w * w * np.where(good, np.asarray(r.noise, np.float32) ** 2, zero)
        _check_shape(r, first)
        sum_w += w
        sum_wr += w * values
        sum_w2 += w2
        count += good
        names.append(r.name)
        templates.add(r.template)
    has = sum_w > 0
    safe = np.where(has, sum_w, 1.0)
    data = np.where(has, sum_wr / safe, 0.0)
    noise = np.where(has, np.sqrt(sum_w2) / safe, 0.0)
    params = {"normalize": bool(options.normalize)}
    out = _finish([first], data, noise, count, params, names=names, templates=templates)
    return attrs.evolve(
        out, meta={**out.meta, "noise_correlation_max": round(max(correlations), 3)}
    )


# ------------------------------------------------------------------ OasisPy's other methods


@attrs.frozen(kw_only=True)
class SigmaClipOptions:
    """Options of the ``sigma_clip`` master residual (OasisPy's names)."""

    sig_thresh: float = option(
        4.0,
        "a pixel at least this many sigmas from the median is taken as the stacked value",
        range=non_negative,
    )
    gauss_filt: bool = option(False, "smooth the master residual with a Gaussian")
    gauss_sig: float = option(3.0, "sigma of that Gaussian [pix]", range=positive)


class _StackMr(MrBackend):
    """A pixel-wise combination of the normalised residuals (see the module docstring)."""

    def check(self, options: Any) -> None:
        """Accept: numpy only."""

    def master(self, residuals: Sequence[Residual], *, options: Any, workdir: Path) -> Residual:
        """Return the master residual ``MR`` of ``residuals`` (sigma units, with its noise).

        Raises
        ------
        StageError
            When no residual is given or the shapes differ.
        """
        residuals = list(residuals)
        _check_shapes(residuals)
        shape = residuals[0].data.shape
        data = np.zeros(shape, np.float32)
        count = np.zeros(shape, np.int32)
        step = max(1, (1 << 22) // max(1, len(residuals) * shape[1]))  # ~16 MB per block
        norms = [r.normalized for r in residuals]
        goods = [_has_data(r) for r in residuals]
        for y0 in range(0, shape[0], step):  # row blocks: whole-array work, bounded memory
            rows = slice(y0, y0 + step)
            stack = np.stack([n[rows] for n in norms])
            good = np.stack([g[rows] for g in goods])
            count[rows] = good.sum(axis=0)
            data[rows] = self._combine(stack, good, options)
        noise = np.where(count > 0, self._noise(count, options), 0.0).astype(np.float32)
        data = np.where(count > 0, data, 0.0).astype(np.float32)
        data, noise = self._smooth(data, noise, count, options)
        return _finish(residuals, data, noise, count, {"method": self.name})

    def _combine(self, stack: np.ndarray, good: np.ndarray, options: Any) -> np.ndarray:
        raise NotImplementedError

    def _noise(self, count: np.ndarray, options: Any) -> np.ndarray:
        raise NotImplementedError

    def _smooth(
        self, data: np.ndarray, noise: np.ndarray, count: np.ndarray, options: Any
    ) -> tuple[np.ndarray, np.ndarray]:
        return data, noise


class SosMr(_StackMr):
    """OasisPy's ``sos``: pixel-wise sum of squares of the normalised residuals."""

    name = "sos"
    description = "pixel-wise sum of squares of the normalised residuals (OasisPy's sos)"

    def _combine(self, stack: np.ndarray, good: np.ndarray, options: Any) -> np.ndarray:
        return np.where(good, stack * stack, 0.0).sum(axis=0)

    def _noise(self, count: np.ndarray, options: Any) -> np.ndarray:
        return np.sqrt(2.0 * count)


class SosAbsMr(_StackMr):
    """OasisPy's ``sos_abs``: pixel-wise sum of p*|p|, which keeps the sign."""

    name = "sos_abs"
    description = "pixel-wise sum of p*|p| of the normalised residuals, sign kept (OasisPy's)"

    def _combine(self, stack: np.ndarray, good: np.ndarray, options: Any) -> np.ndarray:
        return np.where(good, stack * np.abs(stack), 0.0).sum(axis=0)

    def _noise(self, count: np.ndarray, options: Any) -> np.ndarray:
        return np.sqrt(3.0 * count)


class SigmaClipMr(_StackMr):
    """OasisPy's ``sigma_clip``: the median, or the outlying value when one stands out."""

    name = "sigma_clip"
    Options = SigmaClipOptions
    description = "median of the normalised residuals unless one is sig_thresh sigmas out"

    def _combine(self, stack: np.ndarray, good: np.ndarray, options: Any) -> np.ndarray:
        import warnings

        values = np.where(good, stack, np.nan)
        with warnings.catch_warnings():  # all-NaN columns (no data) give NaN, set to 0 later
            warnings.simplefilter("ignore", RuntimeWarning)
            median = np.nanmedian(values, axis=0)
            std = np.nanstd(values, axis=0)
            high = np.nanmax(values, axis=0)
            low = np.nanmin(values, axis=0)
        thresh = float(options.sig_thresh) * std
        out = np.where(low <= median - thresh, low, median)
        out = np.where(high >= median + thresh, high, out)
        out = np.where(std > 0, out, median)  # one residual, or all equal: the median
        return np.nan_to_num(out, nan=0.0)

    def _noise(self, count: np.ndarray, options: Any) -> np.ndarray:
        return np.sqrt(np.pi / 2.0) / np.sqrt(np.maximum(count, 1))

    def _smooth(
        self, data: np.ndarray, noise: np.ndarray, count: np.ndarray, options: Any
    ) -> tuple[np.ndarray, np.ndarray]:
        if not options.gauss_filt or options.gauss_sig <= 0:
            return data, noise
        from scipy.ndimage import gaussian_filter

        sigma = float(options.gauss_sig)
        data = gaussian_filter(data, sigma, mode="constant").astype(np.float32)
        noise = gaussian_filter(noise, sigma, mode="nearest") / (2.0 * np.sqrt(np.pi) * sigma)
        return data, np.where(count > 0, noise, 0.0).astype(np.float32)


def _has_data(residual: Residual) -> np.ndarray:
    """The pixels where ``residual`` has data to stack: weight at least
    :data:`~oasis_core.contracts.model.MIN_WEIGHT` (the core counts lower weights as
    masked), positive noise, finite value."""
    return (
        (np.asarray(residual.weight) >= MIN_WEIGHT)
        & (np.asarray(residual.noise) > 0)
        & np.isfinite(residual.data)
    )


def _check_shapes(residuals: list[Residual]) -> None:
    if not residuals:
        raise StageError("mr: no residual to combine")
    for r in residuals[1:]:
        _check_shape(r, residuals[0])


def _check_shape(residual: Residual, first: Residual) -> None:
    if residual.data.shape != first.data.shape:
        raise StageError(
            f"mr: residual {residual.name!r} has shape {residual.data.shape}, residual "
            f"{first.name!r} has {first.data.shape}"
        )


def _finish(
    residuals: list[Residual],
    data: np.ndarray,
    noise: np.ndarray,
    count: np.ndarray,
    params: dict[str, Any],
    *,
    names: list[str] | None = None,
    templates: set[str] | None = None,
) -> Residual:
    """The master residual with the header, weight and meta every mr backend gives;
    ``names`` and ``templates`` (default: those of ``residuals``) when ``residuals`` holds
    only the first one."""
    from astropy.io import fits

    names = [r.name for r in residuals] if names is None else names
    first = residuals[0].header
    header = first.copy() if isinstance(first, fits.Header) else fits.Header(dict(first or {}))
    header["NCOMBINE"] = (len(names), "number of residuals in the master residual")
    if "method" in params:
        header["MRMETHOD"] = (str(params["method"]), "master-residual method")
    if "normalize" in params:
        header["MRNORM"] = (bool(params["normalize"]), "residuals normalised by their noise")
    if params.get("normalize", True):  # in sigma units; in ADU the residuals' BUNIT holds
        header["BUNIT"] = ("", "dimensionless: residuals in units of their noise")
    for name in names:
        header.add_history(f"oasis mr input: {name}")
    templates = {r.template for r in residuals} if templates is None else templates
    return Residual(
        data=np.asarray(data, np.float32),
        noise=np.asarray(noise, np.float32),
        weight=(count / len(names)).astype(np.float32),
        header=header,
        name="MR",
        science="",
        template=templates.pop() if len(templates) == 1 else "",
        params=params,
        meta={
            "n_residuals": len(names),
            "inputs": ",".join(names),
            "frac_no_data": float(1.0 - (count > 0).mean()),
        },
    )
