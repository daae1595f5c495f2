"""The stage contract checked on simulated input (:func:`check_backend`): read-only
inputs left unchanged, output types and shapes, weights in [0, 1], noise finite and > 0,
Q finite in [0, 1], names, options, and ``meta``/``params`` that make valid FITS cards."""

from __future__ import annotations

import hashlib
import math
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from oasis_core.contracts.errors import OasisError
from oasis_core.contracts.model import Frame, Residual, Template, readonly
from oasis_core.testing.synthetic import SyntheticPair, readonly_frame, synthetic_pair

__all__ = [
    "CheckReport",
    "ContractError",
    "check_backend",
]


class ContractError(OasisError, AssertionError):
    """A backend breaks the stage contract; the message lists every breach in one line.

    An :class:`AssertionError` too, so that a plugin's test fails (not errors) on it.
    """


@attrs.frozen(kw_only=True)
class CheckReport:
    """What :func:`check_backend` found.

    Attributes
    ----------
    stage, backend : str
    output : object
        What the stage method returned.
    q, normalized_noise : float or None
        For a residual (subtract, mr): its Q and the robust scatter of its normalised
        residual away from sources (1 when its noise image is honest).
    figures : dict
        Further numbers, by stage (``fwhm`` for psf, ``masked_fraction`` for mask,
        ``detections`` for extract...).
    """

    stage: str
    backend: str
    output: Any = attrs.field(eq=False, repr=False)
    q: float | None = None
    normalized_noise: float | None = None
    figures: dict[str, Any] = attrs.field(factory=dict)

    def line(self) -> str:
        """One line: ``<stage> <backend>: Q 0.982, normalised noise 1.01``."""
        parts = []
        if self.q is not None:
            parts.append(f"Q {self.q:.3f}")
        if self.normalized_noise is not None:
            parts.append(f"normalised noise {self.normalized_noise:.2f}")
        for key, value in self.figures.items():
            parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
        return f"{self.stage} {self.backend}: " + (", ".join(parts) or "ok")


def _digest(array: Any) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def _inputs(stage: str, pair: SyntheticPair) -> tuple[tuple[Any, ...], list[Any]]:
    """The positional arguments of ``stage``'s method, and the objects to watch."""
    if stage == "mask":
        weight = np.ones(pair.science.shape, np.float32)
        weight[:4, :] = 0  # the incoming zeros a mask backend must keep
        frame = readonly_frame(attrs.evolve(pair.science, weight=weight))
        return (frame,), [frame]
    if stage in ("psf",):
        frame = readonly_frame(attrs.evolve(pair.science, psf=None, fwhm=None))
        return (frame,), [frame]
    if stage == "align":
        frame = readonly_frame(attrs.evolve(pair.science))
        reference = readonly_frame(attrs.evolve(pair.template))
        return (frame, reference), [frame, reference]
    if stage == "combine":
        frames = [readonly_frame(attrs.evolve(f)) for f in pair.exposures]
        return (frames,), frames
    if stage == "subtract":
        science = readonly_frame(attrs.evolve(pair.science))
        template = readonly_frame(attrs.evolve(pair.template))
        return (science, template), [science, template]
    if stage == "mr":
        residuals = [_readonly_residual(pair.ideal_residual(seed=s)) for s in range(3)]
        return (residuals,), residuals
    if stage == "extract":
        residual = _readonly_residual(pair.ideal_residual())
        return (residual,), [residual]
    raise ValueError(f"check_backend: no simulated input for stage {stage!r}")


def _readonly_residual(residual: Residual) -> Residual:
    for array in (residual.data, residual.noise, residual.weight):
        readonly(array)
    return residual


def _arrays(obj: Any) -> dict[str, Any]:
    names = ("data", "weight", "noise")
    return {n: getattr(obj, n) for n in names if getattr(obj, n, None) is not None}


_METHODS = {
    "mask": "mask",
    "psf": "psf",
    "align": "align",
    "combine": "combine",
    "subtract": "subtract",
    "mr": "master",
    "extract": "extract",
}


def check_backend(
    backend: Any,
    stage: str | None = None,
    *,
    options: Any = None,
    pair: SyntheticPair | None = None,
    workdir: Path | None = None,
) -> CheckReport:
    """Run ``backend`` on simulated input and check the stage contract.

    The input comes from ``pair`` (default ``synthetic_pair()``): the science frame for
    mask and psf, science and template for align and subtract, the template's exposures
    for combine, ideal residuals of the pair for mr and extract. Its arrays are read-only,
    as the core hands them out. Checked:

    * the backend: an instance of the stage's base class, ``name`` matching
      ``[a-z0-9][a-z0-9_-]*``, ``Options()`` made from defaults, every option with a help;
    * the inputs: unchanged (an in-place edit of a read-only array is reported as such);
    * the output: its type (``Frame``, ``Template``, ``Residual``, a Table with columns
      ``x``, ``y``, ``flux``, ``snr``), its shape (the reference's for align), the
      frame's ``name`` kept, ``weight`` finite in [0, 1] with the incoming zeros kept
      (mask); ``noise`` finite and > 0 where the weight is > 0 (residuals; frames'
      scalar ``noise`` when set); ``Q`` finite in [0, 1] (subtract); ``fwhm`` finite and
      > 0 (psf);
    * the header cards: ``meta``, ``params`` and the kernel's ``meta`` hold only bool,
      int, float or str values, and the output is written with the core's writer
      (:func:`oasis_core.engine.io.write_residual` / :func:`~oasis_core.engine.io.write_frame`) with
      every warning an error, each scalar ``meta`` key then present as an ``OAS <KEY>``
      card.

    Parameters
    ----------
    backend : Backend
        The plugin's backend object.
    stage : str, optional
        Default: ``backend.stage``.
    options : object, optional
        The backend's options; default ``backend.Options()``.
    pair : SyntheticPair, optional
        The simulated input; default :func:`synthetic_pair` with its defaults.
    workdir : Path, optional
        Scratch directory for the backend; default a temporary one, removed after.

    Returns
    -------
    CheckReport
        With Q and the normalised noise for subtract and mr backends.

    Raises
    ------
    ContractError
        Listing every breach found, in one line.
    BackendUnavailable
        From the backend's own ``check`` (a missing program).
    """
    from oasis_core.contracts.backends import BASES, NAME_RE

    stage = stage or getattr(backend, "stage", "")
    if stage not in _METHODS:
        raise ContractError(
            f"check_backend: unknown stage {stage!r}; stages: {', '.join(_METHODS)}"
        )
    name = str(getattr(backend, "name", "") or "")
    problems: list[str] = []
    base = BASES[stage]
    if not isinstance(backend, base):
        problems.append(f"not a {base.__name__}")
    if not NAME_RE.match(name):
        problems.append(f"name {name!r} must match [a-z0-9][a-z0-9_-]*")
    if options is None:
        try:
            options = backend.Options()
        except Exception as err:  # reported, with its cause, as a breach
            raise ContractError(
                f"{stage} backend {name!r}: Options() fails with its defaults: "
                f"{type(err).__name__}: {err}"
            ) from err
    if attrs.has(type(options)):
        undocumented = [f.name for f in attrs.fields(type(options)) if not f.metadata.get("help")]
        if undocumented:
            problems.append(f"options without a help: {', '.join(undocumented)} (use option())")
    backend.check(options)
    pair = pair or synthetic_pair()
    args, watched = _inputs(stage, pair)
    before = [{k: _digest(v) for k, v in _arrays(obj).items()} for obj in watched]
    with _scratch(workdir) as scratch:
        try:
            output = getattr(backend, _METHODS[stage])(*args, options=options, workdir=scratch)
        except Exception as err:
            if _read_only_fault(err):
                raise ContractError(
                    f"{stage} backend {name!r} edits its input in place "
                    f"({_read_only_fault(err)}); derive new arrays and return new objects "
                    "(attrs.evolve)"
                ) from err
            raise
        for obj, digests in zip(watched, before, strict=True):
            changed = [k for k, v in _arrays(obj).items() if _digest(v) != digests[k]]
            if changed:
                problems.append(f"modified its input {obj.name!r} ({', '.join(changed)})")
        report = _check_output(stage, name, output, args, problems, scratch)
    if problems:
        raise ContractError(f"{stage} backend {name!r}: " + "; ".join(problems))
    return report


def _read_only_fault(err: BaseException | None) -> str:
    """The message of the in-place write to a read-only array behind ``err``, or ''."""
    while err is not None:
        if isinstance(err, ValueError) and "read-only" in str(err):
            return str(err)
        err = err.__cause__
    return ""


@contextmanager
def _scratch(workdir: Path | None) -> Iterator[Path]:
    if workdir is not None:
        Path(workdir).mkdir(parents=True, exist_ok=True)
        yield Path(workdir)
        return
    with tempfile.TemporaryDirectory(prefix="oasis-check-") as tmp:
        yield Path(tmp)


def _check_output(
    stage: str, name: str, output: Any, args: tuple[Any, ...], problems: list[str], scratch: Path
) -> CheckReport:
    figures: dict[str, Any] = {}
    q = nnoise = None
    if stage == "extract":
        figures = _check_table(output, args[0], problems)
        return CheckReport(stage=stage, backend=name, output=output, figures=figures)
    expected = {"mask": Frame, "psf": Frame, "align": Frame, "combine": Template}.get(
        stage, Residual
    )
    if not isinstance(output, expected):
        problems.append(f"returned {type(output).__name__}, not a {expected.__name__}")
        return CheckReport(stage=stage, backend=name, output=output)
    shape = (args[1] if stage == "align" else _first(args[0])).data.shape
    if output.data.shape != shape:
        problems.append(f"returned shape {output.data.shape}, expected {shape}")
        return CheckReport(stage=stage, backend=name, output=output)
    weight = np.asarray(output.weight)
    if not (np.isfinite(weight).all() and weight.min() >= 0 and weight.max() <= 1):
        problems.append("weight not finite in [0, 1]")
    if stage in ("mask", "psf", "align") and output.name != args[0].name:
        problems.append(
            f"returned a frame named {output.name!r}; keep the input's {args[0].name!r}"
        )
    if stage == "mask":
        if (weight[np.asarray(args[0].weight) == 0] > 0).any():
            problems.append("a pixel the incoming weight excludes (0) got a weight > 0")
        figures["masked fraction"] = round(float((weight == 0).mean()), 4)
    if isinstance(output, Residual):
        q, nnoise = _check_residual(output, args, stage, problems)
    else:
        _check_frame_numbers(output, stage, problems, figures)
    _check_cards(output, problems, scratch)
    return CheckReport(
        stage=stage, backend=name, output=output, q=q, normalized_noise=nnoise, figures=figures
    )


def _first(arg: Any) -> Any:
    return arg[0] if isinstance(arg, (list, tuple)) else arg


def _check_residual(
    output: Residual, args: tuple[Any, ...], stage: str, problems: list[str]
) -> tuple[float | None, float | None]:
    from oasis_core.engine.quality import normalized_noise, q_value, source_footprint

    good = np.asarray(output.weight) > 0
    noise = np.asarray(output.noise)
    if not good.any():
        problems.append("every pixel has weight 0")
        return None, None
    if not (np.isfinite(noise[good]).all() and (noise[good] > 0).all()):
        problems.append("noise not finite and > 0 where the weight is > 0")
    if not np.isfinite(np.asarray(output.data)[good]).all():
        problems.append("data not finite where the weight is > 0")
    q = float(output.q)
    if stage == "subtract" and not (math.isfinite(q) and 0 <= q <= 1):
        problems.append(
            f"Q = {q}: must be finite in [0, 1]; compute it with "
            "oasis_core.engine.quality.q_value(data, noise, weight)"
        )
    if stage == "mr" and not math.isfinite(q):  # a master residual's Q is optional
        q = q_value(output.data, output.noise, output.weight)
    template = args[1] if stage == "subtract" else None
    exclude = source_footprint(template.data, output.weight) if template is not None else None
    nnoise = normalized_noise(output.data, output.noise, output.weight, exclude=exclude)
    return q, float(nnoise)


def _check_frame_numbers(output: Frame, stage: str, problems: list[str], figures: dict) -> None:
    for attr in ("noise", "background", "fwhm", "gain"):
        value = getattr(output, attr)
        if value is not None and not math.isfinite(float(value)):
            problems.append(f"{attr} = {value}: not finite")
    if output.noise is not None and not float(output.noise) > 0:
        problems.append(f"noise = {output.noise}: must be > 0")
    if stage == "psf":
        if output.fwhm is None or not float(output.fwhm) > 0:
            problems.append(f"fwhm = {output.fwhm}: a psf backend sets it, finite and > 0")
        else:
            figures["fwhm"] = round(float(output.fwhm), 3)
        if output.noise is None or output.background is None:
            problems.append("a psf backend sets background and noise")
    if output.noise is not None:
        figures.setdefault("noise", round(float(output.noise), 3))


def _non_scalars(where: str, mapping: Any) -> list[str]:
    return [
        f"{where}[{k!r}] is a {type(v).__name__}: only bool, int, float and str become header cards"
        for k, v in dict(mapping or {}).items()
        if not isinstance(v, (bool, int, float, str, np.integer, np.floating))
    ]


def _check_cards(output: Any, problems: list[str], scratch: Path) -> None:
    """Write ``output`` as the core does, every warning an error, and read the cards back."""
    from astropy.io import fits

    from oasis_core.engine import io

    problems += _non_scalars("meta", output.meta)
    if isinstance(output, Residual):
        problems += _non_scalars("params", output.params)
        if output.kernel is not None:
            problems += _non_scalars("kernel.meta", output.kernel.meta)
    path = scratch / "oasis-check-output.fits"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            if isinstance(output, Residual):
                io.write_residual(path, output)
            else:
                io.write_frame(path, output)
            header = fits.getheader(path)
    except Exception as err:  # reported with its cause: the card that cannot be written
        problems.append(f"its header cannot be written: {type(err).__name__}: {err}")
        return
    finally:
        path.unlink(missing_ok=True)
    for key, value in dict(output.meta or {}).items():
        if isinstance(value, float) and not math.isfinite(value):
            continue  # not a FITS value: no card (unknown)
        if isinstance(value, (bool, int, float, str)) and f"OAS {str(key).upper()}" not in header:
            problems.append(f"meta[{key!r}] did not become the card 'OAS {str(key).upper()}'")


def _check_table(table: Any, residual: Residual, problems: list[str]) -> dict[str, Any]:
    colnames = list(getattr(table, "colnames", []) or [])
    if not colnames and not hasattr(table, "colnames"):
        problems.append(f"returned {type(table).__name__}, not an astropy Table")
        return {}
    missing = [c for c in ("x", "y", "flux", "snr") if c not in colnames]
    if missing:
        problems.append(f"no column {', '.join(missing)}")
        return {}
    x, y = np.asarray(table["x"], float), np.asarray(table["y"], float)
    ny, nx = residual.data.shape
    if len(x) and not (np.isfinite(x).all() and np.isfinite(y).all()):
        problems.append("x, y not finite")
    elif len(x) and ((x < -0.5) | (x > nx - 0.5) | (y < -0.5) | (y > ny - 0.5)).any():
        problems.append("x, y outside the image (0-based pixels, x along the last axis)")
    return {"detections": len(x)}
