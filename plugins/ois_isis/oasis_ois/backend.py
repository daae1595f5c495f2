"""The ``ois`` subtract backend: Alard's Optimal Image Subtraction with ISIS's parameters.

The numerics live in :mod:`oasis_ois.ois` (or ISIS's own ``mrj_phot``, see
:mod:`oasis_ois.isis`); this module turns their result into the
:class:`~oasis_core.contracts.model.Residual` the pipeline expects (Q, header cards, kernel) and
offers the optimisation candidates of :mod:`oasis_ois.optimise`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from oasis_core.contracts.backends import SubtractBackend
from oasis_core.contracts.errors import BackendUnavailable
from oasis_core.contracts.model import Frame, KernelSolution, Residual, Template
from oasis_ois.choose import solve_model
from oasis_ois.ois import OisOptions, OisSolution, _side_thread
from oasis_ois.optimise import describe_configuration, iter_candidates

__all__ = ["OisOptions", "OisSubtract"]


def _clean(value: Any) -> float | int | str | bool:
    """A meta value as a plain Python scalar (numpy scalars become float/int)."""
    if isinstance(value, bool | str | int):
        return value
    return float(value)


class OisSubtract(SubtractBackend):
    """Optimal Image Subtraction (Alard & Lupton 1998, Alard 2000) with a kernel model
    per frame: ISIS's Gaussian basis on stamps, Bramich's delta basis, cross-convolution
    or a low-order kernel (``kernel``, ``"auto"`` by default; :mod:`oasis_ois.choose`).

    Residual cards written to the header (a copy of the science header): ``Q``,
    ``NNOISE`` (robust std of the normalised residual away from sources), ``NSTAMPS``,
    ``NSTREJ`` (stamps rejected; ISIS's model), ``KMODEL`` (the kernel model used),
    ``KSUM`` (kernel sum), ``FSCALE`` (science / template flux ratio), ``DEGSPAT``,
    ``KHALF`` (kernel half size), ``CONVOLVE`` (the image convolved; ``template`` for
    cross-convolution, whose science is convolved too) and ``OISFLAG`` when the result
    is flagged. ``meta`` (``OAS`` cards) records ``choice_kernel``, ``kernel_reason`` and,
    after a fallback, ``fallback``.
    """

    name = "ois"
    auto_priority = 0  # subtract backend "auto" tries it first
    Options = OisOptions
    description = "Alard's Optimal Image Subtraction with ISIS's kernel basis (numpy/scipy)"

    def check(self, options: OisOptions) -> None:
        """Raise BackendUnavailable when ``isis_binary`` is set and cannot be found.

        Without ``isis_binary`` (the default) the backend needs nothing beyond numpy and
        scipy.
        """
        from oasis_ois.isis import find_mrj_phot, unavailable_message

        if options.isis_binary and find_mrj_phot(options.isis_binary) is None:
            raise BackendUnavailable(unavailable_message(options.isis_binary))

    def candidates(
        self, science: Frame, template: Template, *, options: OisOptions
    ) -> Iterator[OisOptions]:
        """Configurations to try on this pair, ``options`` first, then by increasing cost.

        Up to 9: lower spatial degrees, kernel and stamp sizes and Gaussian widths
        matched to the two frames' seeing (narrower with lower degrees for undersampled
        PSFs, wider for oversampled ones), sparser and denser stamp grids. The ladder and
        the cost are documented in :mod:`oasis_ois.optimise`.

        A generator: ``options`` comes first, before anything is measured; the frames'
        FWHMs, which the others need, are measured only when the core asks for a second
        configuration (the fit of the first already measured them and they are reused).

        Raises
        ------
        oasis_core.contracts.errors.ConfigError
            If ``options.isis_config`` names a file that cannot be read (at the call).
        """
        return iter_candidates(science, template, options)

    def subtract(
        self, science: Frame, template: Template, *, options: OisOptions, workdir: Path
    ) -> Residual:
        """Return science - K * template (or the science-convolved equivalent).

        Parameters
        ----------
        science, template : Frame
            Registered frames of the same shape (``data``, ``weight``, ``name``;
            ``gain``, ``saturation``, ``fwhm``, ``background`` and ``noise`` when known).
        options : OisOptions
            Its ``isis_config`` file, when set, is read first and replaces the values of
            the options it names.
        workdir : Path
            Unused by the numpy fit; with ``isis_binary`` the files for and from
            ``mrj_phot`` go there.

        Returns
        -------
        Residual
            In the science frame's photometric system, with noise, weight, Q and kernel.
            ``meta["flag"]`` is set (``"few stamps: N"``) when too few stamp stars
            survived for ISIS's requested spatial degrees, which were then lowered;
            ``meta["fallback"]`` when a simpler kernel model than asked was used;
            ``meta["config"]`` describes the configuration used (after seeing scaling),
            e.g. ``"ns=10x10 hs=15 hm=9 sig=0.7,1.5,2.0 deg=6,4,2 ds=2"`` (ISIS's) or
            ``"delta hk=4/13 ds=0 db=1 px=25783 clip=173 5 stars ..."``.

        Raises
        ------
        oasis_core.contracts.errors.StageError
            If the frames differ in shape, an image has no usable pixel, the kernel model
            asked for cannot run (e.g. ``kernel = "isis"`` and no usable stamp star), or
            ``mrj_phot`` fails.
        oasis_core.contracts.errors.ConfigError
            If the ``isis_config`` file cannot be read.
        oasis_core.contracts.errors.BackendUnavailable
            If ``isis_binary`` cannot be found.
        """
        from astropy.io import fits

        from oasis_core.engine.quality import normalized_noise, q_value
        from oasis_ois.isis import apply_isis_config, subtract_with_mrj_phot

        options = apply_isis_config(options)
        sol: OisSolution
        if options.isis_binary:
            sol = subtract_with_mrj_phot(science, template, options, workdir)
            sol = attrs.evolve(sol, meta={**sol.meta, "choice_kernel": "isis"})
        else:
            sol = solve_model(science, template, options)
        # the two figures side by side (numpy releases the GIL on whole arrays)
        with _side_thread(q_value, sol.residual, sol.noise, sol.weight) as q_result:
            nnoise = normalized_noise(sol.residual, sol.noise, sol.weight, exclude=sol.sources)
        q = q_result()
        fscale = sol.ksum if sol.direction == "template" else 1.0 / sol.ksum
        meta = {k: _clean(v) for k, v in sol.meta.items() if k != "description"}
        meta.update(fscale=float(fscale), nnoise=float(nnoise), q=float(q))
        if "description" in sol.meta:  # the delta, cross and low models describe themselves
            config = str(sol.meta["description"])
        else:
            config = describe_configuration(
                options,
                sigmas=sol.meta["sigmas"],
                half_mesh=sol.meta["half_mesh"],
                half_stamp=sol.meta["half_stamp"],
                deg_spatial=sol.meta["deg_spatial"],
            )
        if "program" in sol.meta:
            config += f" ({sol.meta['program']})"
        meta["config"] = config

        header = fits.Header()
        if isinstance(science.header, fits.Header):
            header = science.header.copy()
        else:
            header.update(dict(science.header))
        cards: list[tuple[str, Any, str]] = [
            ("Q", q, "OasisPy quality figure of the residual"),
            ("NNOISE", nnoise, "robust std of the normalised residual"),
        ]
        if "nstamps" in sol.meta:  # mrj_phot does not report its stamps
            cards += [
                ("NSTAMPS", sol.meta["nstamps"], "OIS stamps used in the kernel fit"),
                ("NSTREJ", sol.meta["nrejected"], "OIS stamp candidates rejected"),
            ]
        cards += [
            ("KMODEL", sol.meta.get("choice_kernel", "isis"), "OIS kernel model used"),
            ("KSUM", sol.ksum, "OIS kernel sum at the image centre"),
            ("FSCALE", fscale, "science / template flux ratio"),
            ("DEGSPAT", sol.meta["deg_spatial"], "OIS kernel spatial degree used"),
            ("KHALF", sol.meta["half_mesh"], "OIS kernel half size (px)"),
            ("CONVOLVE", sol.direction, "image convolved by the OIS kernel"),
        ]
        if "program" in sol.meta:
            cards.append(("OISPROG", sol.meta["program"], "program that fitted the kernel"))
        if "flag" in sol.meta:
            cards.append(("OISFLAG", sol.meta["flag"], "OIS subtraction not to be trusted"))
        for key, value, comment in cards:
            if isinstance(value, float) and not math.isfinite(value):
                value = None  # FITS has no NaN; an undefined value says "not computed"
            header[key] = (_clean(value) if value is not None else None, comment)

        kernel = KernelSolution(
            image=None if sol.kernel is None else np.asarray(sol.kernel, dtype=np.float32),
            coefficients=sol.coefficients,
            direction=sol.direction,
            meta={
                k: meta[k]
                for k in (
                    "nstamps",
                    "nrejected",
                    "ksum",
                    "fscale",
                    "deg_spatial",
                    "deg_bg",
                    "half_mesh",
                    "half_stamp",
                    "sigmas",
                    "bg",
                    "choice_kernel",
                    "lambda",
                    "cross_psf",
                )
                if k in meta
            },
        )
        return Residual(
            data=sol.residual,
            noise=sol.noise,
            weight=sol.weight,
            header=header,
            name=science.name,
            science=science.name,
            template=template.name,
            q=float(q),
            kernel=kernel,
            params=attrs.asdict(options),
            meta=meta,
        )
