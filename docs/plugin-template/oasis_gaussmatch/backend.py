"""A subtract backend: convolve the sharper frame with a Gaussian to match the other.

Deliberately simple (one Gaussian kernel from the two FWHMs, no fit), but complete: it
returns the residual with its noise image, weight map, Q, kernel and the choices it made,
and it accounts for the noise a science frame shares with a template it is part of.
"""

import math

import attrs
import numpy as np

from oasis_core.contracts.backends import SubtractBackend, option
from oasis_core.contracts.errors import StageError
from oasis_core.contracts.model import KernelSolution, Residual

FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))


@attrs.frozen(kw_only=True)
class GaussMatchOptions:
    truncate: float = option(4.0, "kernel half-width in kernel sigmas", range=(1.0, 10.0))


class GaussMatch(SubtractBackend):
    name = "gaussmatch"
    description = "Gaussian PSF matching from the two FWHMs (the plugin template)"
    Options = GaussMatchOptions
    needs_psf = True  # oasis subtract-pair measures both frames' PSF (fwhm) first

    def subtract(self, science, template, *, options, workdir):
        from scipy import ndimage

        from oasis_core.engine.quality import q_value

        if not (science.fwhm and template.fwhm):
            raise StageError(f"{science.name}: gaussmatch needs both frames' fwhm (psf stage)")
        sigma = math.sqrt(abs(science.fwhm**2 - template.fwhm**2)) / FWHM_PER_SIGMA
        kernel = _gaussian(sigma, options.truncate)
        convolve_template = template.fwhm <= science.fwhm
        # sky removed, on the common photometric scale the align stage gave both frames
        sci = np.asarray(science.data, np.float64) - (science.background or 0.0)
        tpl = np.asarray(template.data, np.float64) - (template.background or 0.0)
        var_sci, var_tpl = _variance(science, sci), _variance(template, tpl)
        var_science = var_sci  # before any convolution
        if convolve_template:
            tpl = ndimage.convolve(tpl, kernel, mode="nearest")
            var_tpl = ndimage.convolve(var_tpl, kernel**2, mode="nearest")
        else:
            sci = ndimage.convolve(sci, kernel, mode="nearest")
            var_sci = ndimage.convolve(var_sci, kernel**2, mode="nearest")
        variance = var_sci + var_tpl
        inputs = getattr(template, "inputs", ())
        if science.name in inputs:
            # the science frame is one of the N frames averaged into the template: its
            # noise is in both, Cov = k0 var_S / N, counted twice in var(S - K*T)
            k0 = float(kernel[kernel.shape[0] // 2, kernel.shape[1] // 2])
            shared = 2.0 * k0 * var_science / len(inputs)
            variance = np.maximum(variance - shared, 0.25 * variance)
        data = sci - tpl
        noise = np.sqrt(variance)
        bad = (np.asarray(science.weight) == 0) | (np.asarray(template.weight) == 0)
        bad = ndimage.binary_dilation(bad, np.ones(kernel.shape, bool))
        weight = np.where(bad, 0.0, np.minimum(science.weight, template.weight))
        direction = "template" if convolve_template else "science"
        return Residual(
            data=data,
            noise=noise,
            weight=weight,
            header=science.header,
            q=q_value(data, noise, weight),  # the backend computes Q
            kernel=KernelSolution(image=kernel, direction=direction, meta={"sigma": sigma}),
            meta={
                "fwhm": max(science.fwhm, template.fwhm),  # of the residual's sources
                "choice_kernel": f"gaussian sigma {sigma:.2f} px on the {direction}",
            },
        )


def _gaussian(sigma, truncate):
    """A normalised Gaussian stamp (a delta when the PSFs already match)."""
    if sigma < 0.1:
        return np.ones((1, 1))
    half = max(1, math.ceil(truncate * sigma))
    y, x = np.mgrid[-half : half + 1, -half : half + 1]
    kernel = np.exp(-(x**2 + y**2) / (2.0 * sigma**2))
    return kernel / kernel.sum()


def _variance(frame, signal):
    """Per-pixel variance in the frame's ADU: its sky noise squared plus the sources'
    Poisson noise (``gain`` is e-/ADU on the frame's current scale)."""
    variance = np.full(frame.shape, float(frame.noise or 0.0) ** 2)
    if frame.gain:
        variance += np.clip(signal, 0.0, None) / frame.gain
    return variance
