"""The ``ois`` backend's kernel models and how ``kernel = "auto"`` picks one per frame.

Models (``[subtract.ois] kernel``):

``isis``
    ISIS's Gaussian basis fitted on stamps (:func:`oasis_ois.ois.solve_prepared`): fast on
    large well-populated frames whose PSFs differ by a roughly round kernel.
``delta``
    Bramich's pixel basis fitted over the whole image (:mod:`oasis_ois.delta`): crowded
    fields, few stars, elongated matching kernels.
``cross``
    Both images convolved toward a common PSF (:mod:`oasis_ois.crossconv`), for pairs
    whose PSFs are *crossed*: neither contains the other.
``low``
    A flux scale, a shift and a background (:mod:`oasis_ois.low`), for frames with
    too few stars for a kernel's shape.

``auto`` (the default) prepares the pair once, takes its census of stars
(:func:`oasis_ois.stars.census`: stars in both frames, variables rejected, the PSFs'
second moments) and picks (:func:`choose`):

1. fewer than :data:`MIN_KERNEL_STARS` usable stars: ``low`` (a fallback);
2. crossed PSFs: ``cross``;
3. enough stars for ISIS's stamps at the spatial degree asked (3 per term), a frame at
   least :data:`ISIS_GRID` stamps (stamp plus kernel) wide, and a matching kernel that is
   not strongly elongated (the moment difference's eigenvalues differ by less than
   :data:`ISIS_ANISOTROPY` times the template's mean moment): ``isis``;
4. otherwise ``delta`` (its spatial degree lowered to the stars: 10 per term).

The image convolved is the one whose PSF is contained in the other's (the moments' rule,
:meth:`oasis_ois.stars.Census.direction`; the FWHMs' when no star has moments), unless
``convolve`` names one. If the chosen model fails (e.g. ISIS finds no usable stamp), the
next one is used and the fallback recorded. The core's optimisation loop then tries the
other models (:func:`other_models`) when Q stays below ``[subtract] q_ceiling``, keeping
the best; with fewer than :data:`MIN_KERNEL_STARS` stars it tries nothing else (a model
with free shape on one star would fit a transient away). From the second configuration
on the same frames (any kernel model) the prepared pair and its census are kept and
reused by the next ones (they depend only on ``saturation``, ``pix_min``,
``min_stamp_snr`` and ``sigma_clip``), until the science frame is collected or another
pair is tried.

Every residual records (``meta``, hence ``OAS`` header cards and ``residuals/log.txt``):
``choice_kernel`` (the model used), ``kernel_reason`` (why), ``fallback`` (a sentence,
when a simpler model than asked was used: the core flags the residual, never masks it
for that) and ``config`` (the model's description).
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import attrs

from oasis_core.contracts.errors import StageError
from oasis_core.contracts.model import Frame
from oasis_ois.ois import (
    STAMPS_PER_TERM,
    OisOptions,
    OisSolution,
    _direction,
    _Image,
    _nterms,
    _single_threaded_blas,
    _source_mask,
    prepare_pair,
    solve_prepared,
)
from oasis_ois.stars import Census, census

__all__ = [
    "ISIS_ANISOTROPY",
    "ISIS_GRID",
    "MIN_KERNEL_STARS",
    "MODELS",
    "Choice",
    "auto_alternatives",
    "choose",
    "other_models",
    "solve_model",
]

#: The kernel models, in the order ``auto`` falls back through them.
MODELS = ("isis", "delta", "cross", "low")

#: Fewer usable stars than this: the low-order kernel (nothing with a free shape).
MIN_KERNEL_STARS = 3

#: ISIS's stamps (stamp and kernel half sizes) need a frame this many stamps wide.
ISIS_GRID = 4

#: ISIS's Gaussians match elongated kernels poorly: ``isis`` only when the eigenvalues of
#: the moment difference differ by less than this times the template's mean moment.
ISIS_ANISOTROPY = 0.5


@attrs.frozen(kw_only=True)
class Choice:
    """A kernel model picked for a pair.

    Attributes
    ----------
    model : str
        One of :data:`MODELS`.
    direction : str
        The image convolved, ``"template"`` or ``"science"`` (``cross`` convolves both).
    reason : str
        Why, for the record (``kernel_reason``).
    fallback : str
        Non-empty when the model is simpler than the frame's options ask (``fallback``).
    """

    model: str
    direction: str
    reason: str
    fallback: str = ""


def _moment_direction(options: OisOptions, stars: Census, sci: _Image, tpl: _Image) -> str:
    if options.convolve != "auto":
        return options.convolve
    rule = stars.direction()
    if rule in ("template", "science"):
        return rule
    return _direction(options, sci, tpl)


def choose(options: OisOptions, stars: Census, sci: _Image, tpl: _Image) -> Choice:
    """The kernel model for a prepared pair (see the module doc): ``options.kernel`` when
    it names one, else the ``auto`` rules."""
    direction = _moment_direction(options, stars, sci, tpl)
    n = stars.n
    if options.kernel != "auto":
        return Choice(model=options.kernel, direction=direction, reason="kernel option")
    if n < MIN_KERNEL_STARS:
        what = "no star" if n == 0 else f"{n} star{'s' if n > 1 else ''}"
        return Choice(
            model="low",
            direction=direction,
            reason=f"auto: {stars.describe()}",
            fallback=f"low-order kernel: {what} in both frames",
        )
    if stars.direction() == "crossed":
        return Choice(
            model="cross",
            direction="template",
            reason=f"auto: crossed PSFs ({stars.describe()})",
        )
    need = STAMPS_PER_TERM * _nterms(options.deg_spatial)
    eig = stars.eigen
    elongated = eig is not None and eig[0] - eig[1] > ISIS_ANISOTROPY * stars.template_moment
    room = ISIS_GRID * (2 * (options.half_stamp_size + options.half_mesh_size) + 1)
    small = min(sci.data.shape) < room
    if n >= need and not elongated and not small:
        return Choice(model="isis", direction=direction, reason=f"auto: {stars.describe()}")
    if elongated:
        why = "elongated matching kernel"
    elif small:
        why = f"frame smaller than {room} px for isis's stamps"
    else:
        why = f"fewer than {need} stars for isis"
    return Choice(model="delta", direction=direction, reason=f"auto: {why} ({stars.describe()})")


def other_models(options: OisOptions, stars: Census, first: str) -> list[str]:
    """The models the optimisation tries after ``first`` (auto only): none with fewer
    than :data:`MIN_KERNEL_STARS` stars, else ``cross`` (when the PSFs are not nested
    one-way), ``delta`` and ``isis``, without ``first``."""
    if options.kernel != "auto" or stars.n < MIN_KERNEL_STARS:
        return []
    order = ["delta", "cross", "isis"] if first == "isis" else ["cross", "delta", "isis"]
    return [m for m in order if m != first]


def auto_alternatives(
    science: Frame, template: Frame, options: OisOptions
) -> tuple[list[OisOptions], bool]:
    """The optimisation's configurations after ``options`` (``kernel = "auto"``): the
    other models (:func:`other_models`), and whether further ISIS configurations may be
    tried (not with fewer than :data:`MIN_KERNEL_STARS` stars). The pair is prepared
    again (only when the core asks for a second configuration)."""
    known = _recalled(science, template, options)
    if known is None:
        with _single_threaded_blas():
            sci, tpl = prepare_pair(science, template, options)
            stars = census(sci, tpl, options)
        first = choose(options, stars, sci, tpl).model
    else:
        stars, first = known
    models = [attrs.evolve(options, kernel=m) for m in other_models(options, stars, first)]
    return models, stars.n >= MIN_KERNEL_STARS


# What solve_model found for a pair, for the optimisation's candidates of the same frames:
# (id(science), id(template)) -> (weak references to both, the options, census, model)
_MEMO: dict[tuple[int, int], tuple[Any, Any, OisOptions, Census, str]] = {}
_MEMO_SIZE = 4
_MEMO_LOCK = threading.Lock()


def _remember(
    science: Frame, template: Frame, options: OisOptions, stars: Census, model: str
) -> None:
    try:
        refs = (weakref.ref(science), weakref.ref(template))
    except TypeError:  # frames without weak references: nothing to remember
        return
    with _MEMO_LOCK:
        while len(_MEMO) >= _MEMO_SIZE:
            _MEMO.pop(next(iter(_MEMO)))
        _MEMO[(id(science), id(template))] = (*refs, options, stars, model)


def _recalled(science: Frame, template: Frame, options: OisOptions) -> tuple[Census, str] | None:
    """The census and model :func:`solve_model` found for these very frames and options."""
    with _MEMO_LOCK:
        entry = _MEMO.get((id(science), id(template)))
    if entry is None or entry[0]() is not science or entry[1]() is not template:
        return None
    if entry[2] != options:
        return None
    return entry[3], entry[4]


def solve_model(science: Frame, template: Frame, options: OisOptions) -> OisSolution:
    """Subtract a pair with the kernel model of ``options.kernel`` (``auto``: chosen here).

    Returns
    -------
    OisSolution
        ``meta`` with ``choice_kernel``, ``kernel_reason`` and, after a fallback,
        ``fallback`` (see the module doc).

    Raises
    ------
    StageError
        As the models do, when no model can subtract the pair.
    """
    with _single_threaded_blas():
        prepared = _prepared(science, template, options)
        if prepared is None:
            sci, tpl = prepare_pair(science, template, options)
            stars = census(sci, tpl, options)
            if _seen(science, template):  # a further configuration: more may follow
                _keep_prepared(science, template, options, (sci, tpl, stars))
        else:
            sci, tpl, stars = prepared
        choice = choose(options, stars, sci, tpl)
        if options.kernel == "auto":
            _remember(science, template, options, stars, choice.model)
        sources = None if choice.model == "isis" else _source_mask(sci, tpl)
        order = [choice.model]
        if options.kernel == "auto":
            # if the model fails (no usable stamp...), the next one that can run
            order += [m for m in ("delta", "low") if m not in order]
            if stars.n < MIN_KERNEL_STARS:
                order = ["low"]
        failures: list[str] = []
        for model in order:
            if sources is None and model != "isis":
                sources = _source_mask(sci, tpl)
            try:
                sol = _run(model, science, template, sci, tpl, options, stars, choice, sources)
            except StageError as err:
                if model == order[-1]:
                    if failures:
                        raise StageError(f"{err} (after: {'; '.join(failures)})") from err
                    raise
                failures.append(f"{model} failed: {err}")
                continue
            break
    meta: dict[str, Any] = dict(sol.meta)
    meta["choice_kernel"] = model
    meta["kernel_reason"] = choice.reason
    fallback = choice.fallback if model == choice.model else ""
    if failures:
        fallback = "; ".join([*failures, f"{model} kernel used"])
    if model == "low" and not fallback:
        fallback = f"low-order kernel: {meta.get('low_terms', '')}"
    if fallback:
        meta["fallback"] = fallback
    return attrs.evolve(sol, meta=meta)


def _run(
    model: str,
    science: Frame,
    template: Frame,
    sci: _Image,
    tpl: _Image,
    options: OisOptions,
    stars: Census,
    choice: Choice,
    sources: Any,
) -> OisSolution:
    from oasis_ois.crossconv import solve_cross
    from oasis_ois.delta import solve_delta
    from oasis_ois.low import solve_low

    if model == "isis":
        return solve_prepared(science, template, sci, tpl, options, direction=choice.direction)
    if model == "delta":
        return solve_delta(
            science,
            template,
            sci,
            tpl,
            options,
            stars,
            direction=choice.direction,
            sources=sources,
        )
    if model == "cross":
        return solve_cross(science, template, sci, tpl, options, stars, sources=sources)
    return solve_low(
        science, template, sci, tpl, options, stars, direction=choice.direction, sources=sources
    )


# The prepared pair and its census, kept from the second configuration the optimisation
# tries on the same frames to the last (preparation and census depend only on these
# options): id(science), id(template) -> (the options' values, (sci, tpl, census)).
# An entry goes when its science frame is collected; one pair is kept at a time.
_PREPARED: dict[tuple[int, int], tuple[Any, Any, tuple[Any, ...], tuple[Any, ...]]] = {}


def _prepared_key(options: OisOptions) -> tuple[Any, ...]:
    return (options.saturation, options.pix_min, options.min_stamp_snr, options.sigma_clip)


# The frames solve_model has prepared: (id(science), id(template)) -> weak references.
_SEEN: dict[tuple[int, int], tuple[Any, Any]] = {}


def _seen(science: Frame, template: Frame) -> bool:
    """Whether :func:`solve_model` already prepared these very frames (the optimisation's
    first configuration); the first call on a pair records it and returns False."""
    key = (id(science), id(template))
    with _MEMO_LOCK:
        entry = _SEEN.get(key)
        if entry is not None and entry[0]() is science and entry[1]() is template:
            return True
        try:
            refs = (weakref.ref(science), weakref.ref(template))
        except TypeError:  # frames without weak references: never kept
            return False
        while len(_SEEN) >= _MEMO_SIZE:
            _SEEN.pop(next(iter(_SEEN)))
        _SEEN[key] = refs
    return False


def _keep_prepared(
    science: Frame, template: Frame, options: OisOptions, pair: tuple[Any, ...]
) -> None:
    try:
        refs = (weakref.ref(science), weakref.ref(template))
    except TypeError:  # frames without weak references: nothing to keep
        return
    key = (id(science), id(template))
    with _MEMO_LOCK:
        _PREPARED.clear()
        _PREPARED[key] = (*refs, _prepared_key(options), pair)
    weakref.finalize(science, _drop_prepared, key)


def _drop_prepared(key: tuple[int, int]) -> None:
    with _MEMO_LOCK:
        _PREPARED.pop(key, None)


def _prepared(science: Frame, template: Frame, options: OisOptions) -> tuple[Any, ...] | None:
    """The pair :func:`_keep_prepared` kept for these very frames and options, or None."""
    with _MEMO_LOCK:
        entry = _PREPARED.get((id(science), id(template)))
    if entry is None or entry[0]() is not science or entry[1]() is not template:
        return None
    if entry[2] != _prepared_key(options):
        return None
    return entry[3]
