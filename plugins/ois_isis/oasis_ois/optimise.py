"""The ``ois`` backend's optimisation candidates: which configurations to try on a pair.

The core's optimisation loop (``[subtract] optimize``) runs the backend with each option
set of :func:`candidate_options` in turn, stops at the first whose Q reaches ``[subtract]
q_ceiling`` and keeps the best. OasisPy's loop did this by stepping ``deg_spatial``, the
stamp count and the kernel and stamp half sizes through fixed lists; here the ladder is
built from the pair's seeing, so that a pair ISIS's fixed defaults cannot match (very
broad, very narrow or very different PSFs) gets configurations that can.

The ladder
----------
Let ``s = FWHM / 2.355`` of each frame (``Frame.fwhm``, else measured), ``f_ref`` the
broader FWHM, and ``w = max(sigma_match, 1 px)`` with ``sigma_match = sqrt(|s_sci**2 -
s_tpl**2|)`` the width of the Gaussian that turns the narrower PSF into the broader one.
The *matched* geometry is hotpants' and OasisPy's rule of thumb: Gaussians of widths
``(0.5, 1, 2) * w``, a kernel half size ``max(half_mesh_size, 3 w, f_ref)`` (the kernel
must reach the wings of the broader PSF) and a stamp half size ``max(half_stamp_size,
hm + 4, 2 f_ref)``: like ``seeing_scale``, it never makes the kernel or the stamps smaller
than the options say (smaller kernels lose the wings of Moffat-like PSFs). The
configurations derived from the seeing set ``seeing_scale=False``: their geometry
already is the seeing's.

1. the options given, always first: the core's contract, and the configuration that
   passes on most pairs; with ``kernel = "auto"`` (the default) they are followed by
   the other kernel models (:func:`oasis_ois.choose.other_models`: none when the pair
   has too few stars), and the ladder below is ISIS's (``kernel = "isis"``);
2. the given options (after ``isis_config``) with ``deg_spatial - 1``: fewer terms for
   sparse fields and flat PSFs;
3. the given widths with the matched kernel and stamp half sizes (when they differ);
4. the matched geometry, with the given degrees and ``deg_spatial``;
5. the matched geometry with ``deg_spatial - 1``;
6. *undersampled* pairs (broader FWHM < 2.5 px): the matched geometry (widths 0.5, 1
   and 2 px) with every Gaussian's degree lowered by 2, not below 2 (6, 4, 2 -> 4, 2,
   2): narrow PSFs are matched by near-delta kernels, and high degrees fit pixelisation
   noise; *oversampled* pairs (broader FWHM > 6 px): widths ``1.5 w`` with the kernel
   and stamps grown by 1.5 too (broad PSFs have broad matching kernels with extended
   wings);
7. a sparse grid: the matched geometry on half the stamp cells (at least 3 x 3) with
   ``deg_spatial`` at most 1 (few usable stars, e.g. broad PSFs on a small frame);
8. a dense grid: the matched geometry on 1.5 times the stamp cells with ``deg_spatial
   + 1`` (at most 3), for PSFs that vary over the field.

Without both FWHMs only 2, 7 and 8 (on the given geometry) and ``deg_spatial = 0`` are
offered. Duplicates are dropped; 2-8 are sorted by :func:`configuration_cost`, cheapest
first (a stable sort: the numbering above breaks ties), so a candidate may be cheaper
than the options given, and at most :data:`MAX_CANDIDATES` configurations are returned.

Undersampled pairs are limited by pixelisation more than by the kernel basis: on
simulated Moffat pairs of FWHM 1.0-1.6 px, Q rises from ~0.6 (ISIS's defaults) to ~0.7-0.8
with these configurations, mostly thanks to the lower spatial degree. Oversampled pairs
(FWHM 12 and 15 px) go from Q ~0.4 with ISIS's fixed basis (``seeing_scale`` off) to
~0.98.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import attrs

from oasis_core.contracts.model import Frame
from oasis_ois.ois import FWHM_PER_SIGMA, OisOptions, _nterms, measured_fwhm

__all__ = [
    "MAX_CANDIDATES",
    "OVERSAMPLED_FWHM",
    "UNDERSAMPLED_FWHM",
    "candidate_options",
    "configuration_cost",
    "describe_configuration",
    "iter_candidates",
    "pair_fwhm",
]

#: At most this many configurations are offered (the options given included).
MAX_CANDIDATES = 9

#: Pairs whose broader PSF is narrower than this (px FWHM) get the narrow configuration.
UNDERSAMPLED_FWHM = 2.5

#: Pairs whose broader PSF is broader than this (px FWHM) get the wide configuration.
OVERSAMPLED_FWHM = 6.0

#: Smallest base width ``w`` (px) of the matched Gaussians.
MIN_WIDTH = 1.0


def _degrees(options: OisOptions) -> list[int]:
    return [options.deg_gauss1, options.deg_gauss2, options.deg_gauss3][: options.ngauss]


def _sigmas(options: OisOptions) -> list[float]:
    return [options.sigma_gauss1, options.sigma_gauss2, options.sigma_gauss3][: options.ngauss]


def configuration_cost(options: OisOptions) -> int:
    """A relative cost of a kernel fit with ``options``, for ordering configurations.

    ``cost = n_stamps * (2 half_stamp_size + 1)**2 * (2 half_mesh_size + 1) * n_basis
    * n_spatial``: stamps x stamp pixels x kernel width (the work of convolving each
    stamp pixel with each basis function, separably) x basis functions x spatial terms
    (the size of the global system). ``n_basis = sum((d + 1)(d + 2) / 2)`` over the
    Gaussians' degrees, ``n_spatial = (deg_spatial + 1)(deg_spatial + 2) / 2``. It grows
    with every one of these options and is computed from the options alone (with
    ``seeing_scale`` the fit may use a larger geometry than the options say).

    Examples
    --------
    >>> configuration_cost(OisOptions())  # ISIS's defaults: 100 stamps, 49 x 6 terms
    536814600
    >>> configuration_cost(OisOptions(deg_spatial=1)) < configuration_cost(OisOptions())
    True
    """
    nstamps = options.nstamps_x * options.nstamps_y
    npix = (2 * options.half_stamp_size + 1) ** 2
    nbasis = sum(_nterms(d) for d in _degrees(options))
    return int(
        nstamps * npix * (2 * options.half_mesh_size + 1) * nbasis * _nterms(options.deg_spatial)
    )


def _fmt(value: float) -> str:
    """0.7 -> '0.7', 2 -> '2.0', 0.25 -> '0.25', 1.914 -> '1.91'."""
    text = f"{value:.2f}".rstrip("0")
    return text + "0" if text.endswith(".") else text


def describe_configuration(
    options: OisOptions,
    *,
    sigmas: Any = None,
    half_mesh: int | None = None,
    half_stamp: int | None = None,
    deg_spatial: int | None = None,
) -> str:
    """A short human description of a configuration, for logs.

    The keywords replace the options' values with those a fit really used (after seeing
    scaling or lowering the spatial degree).

    Examples
    --------
    >>> describe_configuration(OisOptions())
    'ns=10x10 hs=15 hm=9 sig=0.7,1.5,2.0 deg=6,4,2 ds=2'
    """
    if sigmas is None:
        sigmas = _sigmas(options)
    elif isinstance(sigmas, str):
        sigmas = [float(s) for s in sigmas.split(",")]
    hm = options.half_mesh_size if half_mesh is None else half_mesh
    hs = options.half_stamp_size if half_stamp is None else half_stamp
    ds = options.deg_spatial if deg_spatial is None else deg_spatial
    return (
        f"ns={options.nstamps_x}x{options.nstamps_y} hs={hs} hm={hm} "
        f"sig={','.join(_fmt(s) for s in sigmas)} "
        f"deg={','.join(str(d) for d in _degrees(options))} ds={ds}"
    )


def pair_fwhm(
    science: Frame, template: Frame, options: OisOptions
) -> tuple[float | None, float | None]:
    """The FWHMs (px) of the two frames: ``Frame.fwhm``, else measured as the fit does
    (a fit of these frames with these options already did: its measurement is reused).

    A frame whose FWHM cannot be measured (no usable star or pixel) gives None.
    """
    return (
        measured_fwhm(science, options, "science"),
        measured_fwhm(template, options, "template"),
    )


def _matched(
    options: OisOptions, width: float, f_ref: float, *, factor: float = 1.0, **changes: Any
) -> OisOptions:
    """Widths (0.5, 1, 2) * factor * width and half sizes to match (``factor`` 1.5: the
    oversampled configuration); see the module doc."""
    w = factor * width
    hm = max(options.half_mesh_size, math.ceil(max(3.0 * w, factor * f_ref)))
    hs = max(options.half_stamp_size, hm + 4, math.ceil(2.0 * factor * f_ref))
    return attrs.evolve(
        options,
        sigma_gauss1=round(0.5 * w, 2),
        sigma_gauss2=round(w, 2),
        sigma_gauss3=round(2.0 * w, 2),
        half_mesh_size=hm,
        half_stamp_size=hs,
        seeing_scale=False,
        **changes,
    )


def _sparse(options: OisOptions) -> OisOptions:
    return attrs.evolve(
        options,
        nstamps_x=max(3, options.nstamps_x // 2),
        nstamps_y=max(3, options.nstamps_y // 2),
        deg_spatial=min(options.deg_spatial, 1),
    )


def _dense(options: OisOptions) -> OisOptions:
    return attrs.evolve(
        options,
        nstamps_x=math.ceil(1.5 * options.nstamps_x),
        nstamps_y=math.ceil(1.5 * options.nstamps_y),
        deg_spatial=min(options.deg_spatial + 1, 3),
    )


def _low_degree(degree: int) -> int:
    """A Gaussian's degree for undersampled pairs: 2 lower, but not below 2."""
    return max(degree - 2, min(degree, 2))


def _lower(options: OisOptions, by: int = 1) -> OisOptions:
    return attrs.evolve(options, deg_spatial=max(0, options.deg_spatial - by))


def candidate_options(science: Frame, template: Frame, options: OisOptions) -> list[OisOptions]:
    """The configurations to try on a pair, ``options`` first; see the module doc.

    :func:`iter_candidates` gives the same lazily.

    Parameters
    ----------
    science, template : Frame
        The pair (their ``fwhm`` is used when set, otherwise measured).
    options : OisOptions
        The configured options; their ``isis_config`` file is applied to build the
        others, which carry its values and ``isis_config=""``.

    Returns
    -------
    list of OisOptions
        ``options``, then (``kernel = "auto"``) the other kernel models, then up to
        ``MAX_CANDIDATES - 1`` in all distinct ISIS alternatives by increasing
        :func:`configuration_cost`.

    Raises
    ------
    oasis_core.contracts.errors.ConfigError
        If the ``isis_config`` file cannot be read.
    """
    return list(iter_candidates(science, template, options))


def iter_candidates(science: Frame, template: Frame, options: OisOptions) -> Iterator[OisOptions]:
    """:func:`candidate_options` as a generator: ``options`` comes first, before anything
    is measured; the FWHMs the others need are measured (or taken from the fit that
    already measured them) only when the second configuration is asked for.

    Raises
    ------
    oasis_core.contracts.errors.ConfigError
        If the ``isis_config`` file cannot be read (at the call, not at the first item).
    """
    from oasis_ois.isis import apply_isis_config

    base = apply_isis_config(options)

    def generate() -> Iterator[OisOptions]:
        yield options
        models: list[OisOptions] = []
        if base.kernel == "auto" and not base.isis_binary:
            from oasis_ois.choose import auto_alternatives

            models, kernels_ok = auto_alternatives(science, template, base)
            yield from models
            if not kernels_ok:
                return  # too few stars: no model with a free shape (see oasis_ois.choose)
        room = MAX_CANDIDATES - 1 - len(models)
        yield from _alternatives(science, template, options, base)[:room]

    return generate()


def _alternatives(
    science: Frame, template: Frame, options: OisOptions, base: OisOptions
) -> list[OisOptions]:
    """The configurations after ``options`` (``base``: ``options`` after its
    ``isis_config``), distinct and by increasing cost; with ``kernel = "auto"`` they are
    ISIS configurations (``kernel = "isis"``)."""
    if base.kernel == "auto":
        base = attrs.evolve(base, kernel="isis")
    fwhm_s, fwhm_t = pair_fwhm(science, template, base)
    alts: list[OisOptions] = []
    if base.deg_spatial > 0:
        alts.append(_lower(base))
    if fwhm_s and fwhm_t:
        s_s, s_t = fwhm_s / FWHM_PER_SIGMA, fwhm_t / FWHM_PER_SIGMA
        f_ref = max(fwhm_s, fwhm_t)
        width = max(math.sqrt(abs(s_s**2 - s_t**2)), MIN_WIDTH)
        matched = _matched(base, width, f_ref)
        sizes = (matched.half_mesh_size, matched.half_stamp_size)
        if sizes != (base.half_mesh_size, base.half_stamp_size):
            alts.append(
                attrs.evolve(
                    base, half_mesh_size=sizes[0], half_stamp_size=sizes[1], seeing_scale=False
                )
            )
        alts.append(matched)
        if matched.deg_spatial > 0:
            alts.append(_lower(matched))
        if f_ref < UNDERSAMPLED_FWHM:
            low = {f"deg_gauss{i}": _low_degree(getattr(base, f"deg_gauss{i}")) for i in (1, 2, 3)}
            alts.append(attrs.evolve(matched, **low))
        if f_ref > OVERSAMPLED_FWHM:
            alts.append(_matched(base, width, f_ref, factor=1.5))
        alts.append(_sparse(matched))
        alts.append(_dense(matched))
    else:
        if base.deg_spatial > 1:
            alts.append(attrs.evolve(base, deg_spatial=0))
        alts.append(_sparse(base))
        alts.append(_dense(base))
    alts = sorted(alts, key=configuration_cost)  # stable: the ladder's order breaks ties
    out: list[OisOptions] = []
    seen = {options, base}
    for alt in alts:
        if alt not in seen and len(out) < MAX_CANDIDATES - 1:
            seen.add(alt)
            out.append(alt)
    return out
