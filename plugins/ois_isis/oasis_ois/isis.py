"""ISIS's own files and program for the ``ois`` backend.

Two ways to use C. Alard's ISIS package (http://www2.iap.fr/users/alard/package.html)
with OASIS:

* **its configuration file** (``subtract.ois.isis_config``): an ISIS ``default_config``
  whose values replace the options of the same names (:func:`apply_isis_config`);
* **its program** (``subtract.ois.isis_binary``): ISIS's ``mrj_phot`` fits the kernel
  and subtracts instead of the numpy code (:func:`subtract_with_mrj_phot`).

The ``default_config`` format
-----------------------------
One parameter a line, ``name value``; anything after the value is ignored, as ISIS does
(ISIS's own files end their lines with ``/*** ... ***/`` comments), and so are blank
lines and ``#`` comments. The names (:data:`ISIS_KEYS`) are ISIS's: ``nstamps_x``,
``nstamps_y``, ``sub_x``, ``sub_y``, ``half_mesh_size``, ``half_stamp_size``, ``deg_bg``,
``saturation``, ``pix_min``, ``min_stamp_center``, ``ngauss``, ``deg_gauss1..3``,
``sigma_gauss1..3`` and ``deg_spatial``. Any other name is an error (a
:class:`~oasis_core.contracts.errors.ConfigError` naming the file, the line and the key), and
so is a value of the wrong type. ``sub_x`` and ``sub_y`` (ISIS cuts the image into that many
pieces, each with its own kernel) are accepted and ignored: the numpy fit always solves
the whole image with a spatially varying kernel (``deg_spatial``), and the files written
for ``mrj_phot`` ask for one piece.

The file is read when the backend runs (and when it lists its optimisation candidates);
its values replace the options' values, whether those came from the defaults or from
``oasis.toml``. They keep the meanings documented in :class:`~oasis_ois.ois.OisOptions`:
in particular ``min_stamp_center`` is counted above each frame's sky there, and
``pix_min`` is a cut on the pixel values as in ISIS (ISIS's usual ``pix_min 5`` masks
most of the sky of a sky-subtracted frame).

Running ``mrj_phot``
--------------------
ISIS runs ``mrj_phot REFERENCE IMAGE -c CONFIG`` in the directory holding the files
(without ``-c`` it reads ``./default_config``). It convolves REFERENCE (the first
argument) by the kernel to match IMAGE and writes, in the current directory,
``conv0.fits``, the convolved reference plus the differential background, and
``conv.fits``, the subtracted image ``(conv0 - IMAGE) / kernel_sum``, i.e.
*reference minus image* in the reference's photometric scale, 0 within
``half_mesh_size`` of the edges and on pixels below ``pix_min``; it prints the kernel
sum (``sum_kernel 0 0: 1.2034``) among its progress lines, and also writes the kernel
coefficients (``kc_*``, ``kt_*``). It exits with 0 even when it gives up ("cannot find
any configuration file"), so the outputs, not the exit code alone, say whether it
worked.

:func:`subtract_with_mrj_phot` writes the image to convolve (the narrower PSF's, as
``convolve`` says) as ``ref.fits`` and the other as ``img.fits`` into ``workdir``, with
the pixels the numpy path would not use set below ``pix_min`` (ISIS's defect marker), and
a ``default_config`` from the options after seeing scaling, with each frame's own
saturation level, sky-relative thresholds turned into ISIS's raw ones and no lower cut
written as ``-1e30``. The residual is then

* template convolved (ISIS's usual use): ``science - conv0 = -kernel_sum * conv``;
* science convolved: ``conv`` itself, which is science - template in the science
  frame's photometric scale.

Its noise image is the numpy path's, ``var_unconvolved + sum(K**2) var_convolved``, with
``sum(K**2)`` measured as the squared ratio of the sky noise of ``conv0`` to that of the
convolved image (ISIS does not write the kernel as an image); Q, the weight map (edges,
masked pixels and their kernel footprint) and the normalised noise are computed as for
the numpy path.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import shutil
import subprocess
import warnings
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from oasis_core.contracts.errors import BackendUnavailable, ConfigError, StageError
from oasis_core.contracts.model import Frame
from oasis_core.contracts.validators import OptionValueError
from oasis_ois.ois import (
    OisOptions,
    OisSolution,
    _check_shapes,
    _direction,
    _effective_geometry,
    _prepare,
    _residual_weight,
    _sky_stats,
    _source_mask,
)

__all__ = [
    "IGNORED_KEYS",
    "ISIS_KEYS",
    "ISIS_URL",
    "apply_isis_config",
    "find_mrj_phot",
    "isis_command",
    "read_isis_config",
    "read_isis_image",
    "subtract_with_mrj_phot",
    "unavailable_message",
    "write_isis_config",
]

#: Where ISIS is distributed.
ISIS_URL = "http://www2.iap.fr/users/alard/package.html"

#: The parameters of ISIS's ``default_config``, in ISIS's order, with their types.
ISIS_KEYS: dict[str, type] = {
    "nstamps_x": int,
    "nstamps_y": int,
    "sub_x": int,
    "sub_y": int,
    "half_mesh_size": int,
    "half_stamp_size": int,
    "deg_bg": int,
    "saturation": float,
    "pix_min": float,
    "min_stamp_center": float,
    "ngauss": int,
    "deg_gauss1": int,
    "deg_gauss2": int,
    "deg_gauss3": int,
    "sigma_gauss1": float,
    "sigma_gauss2": float,
    "sigma_gauss3": float,
    "deg_spatial": int,
}

#: ISIS keys accepted in a ``default_config`` but without effect here (see the module doc).
IGNORED_KEYS: tuple[str, ...] = ("sub_x", "sub_y")

#: What ISIS's ``default_config`` says of each parameter (written as its comments).
_COMMENTS = {
    "nstamps_x": "Number of stamps along X axis",
    "nstamps_y": "Number of stamps along Y axis",
    "sub_x": "Number of sub_division of the image along X axis",
    "sub_y": "Number of sub_division of the image along Y axis",
    "half_mesh_size": "Half kernel size",
    "half_stamp_size": "Half stamp size",
    "deg_bg": "Degree to fit differential background variations",
    "saturation": "Saturation level",
    "pix_min": "Minimum value of the pixels to fit",
    "min_stamp_center": "Minimum value for object to enter kernel fit",
    "ngauss": "Number of Gaussians",
    "deg_gauss1": "Degree associated with 1st Gaussian",
    "deg_gauss2": "Degree associated with 2nd Gaussian",
    "deg_gauss3": "Degree associated with 3rd Gaussian",
    "sigma_gauss1": "Sigma of 1st Gaussian",
    "sigma_gauss2": "Sigma of 2nd Gaussian",
    "sigma_gauss3": "Sigma of 3rd Gaussian",
    "deg_spatial": "Degree of the fit of the spatial variations of the Kernel",
}

#: Stands for "no level" in the files written for ISIS (its parser wants a number).
NO_LEVEL = 1.0e30

_COMMENT = re.compile(r"/\*.*?(\*/|$)|#.*$")
_SUM_KERNEL = re.compile(r"sum_kernel[^:\n]*:\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)")


# ------------------------------------------------------------------ default_config


def read_isis_config(path: str | os.PathLike[str]) -> dict[str, int | float]:
    """Read an ISIS ``default_config`` file.

    Parameters
    ----------
    path : str or Path
        The file: ``name value`` lines (see the module doc).

    Returns
    -------
    dict
        ISIS name -> value (``int`` or ``float`` as in :data:`ISIS_KEYS`), for the names
        the file sets; the last line wins when a name is repeated, as in ISIS.

    Raises
    ------
    oasis_core.contracts.errors.ConfigError
        If the file cannot be read, a name is not one of ISIS's or a value is not a
        number of the right type.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "default_config"
    >>> _ = p.write_text("nstamps_x  8   /*** Number of stamps along X axis ***/\\n"
    ...                  "sigma_gauss1 0.9\\n")
    >>> read_isis_config(p)
    {'nstamps_x': 8, 'sigma_gauss1': 0.9}
    """
    path = Path(path)
    try:
        text = path.read_text(errors="replace")
    except OSError as err:
        msg = (
            f"{path}: cannot read the ISIS config file ({err.strerror or err}); "
            "check subtract.ois.isis_config"
        )
        raise ConfigError(msg) from err
    values: dict[str, int | float] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        tokens = _COMMENT.sub(" ", line).split()
        if not tokens:
            continue
        name = tokens[0]
        where = f"{path}:{lineno}"
        if name not in ISIS_KEYS:
            close = difflib.get_close_matches(name, ISIS_KEYS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            msg = f"{where}: unknown ISIS key {name!r}{hint}; ISIS keys: {', '.join(ISIS_KEYS)}"
            raise ConfigError(msg)
        if len(tokens) < 2:
            raise ConfigError(f"{where}: ISIS key {name!r} has no value")
        values[name] = _parse_value(name, tokens[1], where)
    return values


def _parse_value(name: str, text: str, where: str) -> int | float:
    kind = ISIS_KEYS[name]
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if kind is int:
        if not (math.isfinite(value) and value.is_integer()):
            raise ConfigError(f"{where}: ISIS key {name!r} must be an integer, got {text!r}")
        return int(value)
    if math.isnan(value):
        raise ConfigError(f"{where}: ISIS key {name!r} must be a number, got {text!r}")
    return value


def apply_isis_config(options: OisOptions) -> OisOptions:
    """``options`` with the values of its ``isis_config`` file, or ``options`` itself.

    The returned options have ``isis_config=""`` (the file has been applied); ``sub_x`` and
    ``sub_y`` are ignored (see the module doc).

    Raises
    ------
    oasis_core.contracts.errors.ConfigError
        If the file cannot be read or parsed (see :func:`read_isis_config`) or a value is
        out of range for the option (e.g. ``ngauss 4``).
    """
    if not options.isis_config:
        return options
    values = read_isis_config(options.isis_config)
    updates = {k: v for k, v in values.items() if k not in IGNORED_KEYS}
    try:
        return attrs.evolve(options, isis_config="", **updates)
    except OptionValueError as err:
        msg = f"{options.isis_config}: {err.assignment()} (subtract.ois.isis_config)"
        raise ConfigError(msg) from err
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{options.isis_config}: {err}") from err


def _number(value: float) -> str:
    """A value as ISIS's ``sscanf`` reads it (no inf or nan)."""
    if not math.isfinite(value):
        value = math.copysign(NO_LEVEL, value)
    if float(value).is_integer() and abs(value) < 1e15:
        return f"{value:.1f}"
    return f"{value:.6g}"


def write_isis_config(options: OisOptions, path: str | os.PathLike[str]) -> Path:
    """Write ``options`` as an ISIS ``default_config`` file (for ``mrj_phot``).

    Every ISIS key is written, in ISIS's order with ISIS's comments; ``sub_x`` and
    ``sub_y`` are 1. Values are written as given, except those ISIS cannot read: an
    infinite ``pix_min`` (no lower cut) becomes ``-1e30``, a ``saturation`` of 0 (which
    here means "each frame's own level", unknown to this function) becomes ``1e30``,
    and ``min_stamp_center`` is rounded up to an integer (ISIS reads it with ``%i``).
    :func:`subtract_with_mrj_phot` resolves the frame-dependent values first.

    Parameters
    ----------
    options : OisOptions
    path : str or Path
        The file to write (replaced if it exists).

    Returns
    -------
    Path
        ``path``.
    """
    sat = options.saturation if options.saturation > 0 else NO_LEVEL
    values: dict[str, Any] = {
        "nstamps_x": options.nstamps_x,
        "nstamps_y": options.nstamps_y,
        "sub_x": 1,
        "sub_y": 1,
        "half_mesh_size": options.half_mesh_size,
        "half_stamp_size": options.half_stamp_size,
        "deg_bg": options.deg_bg,
        "saturation": _number(sat),
        "pix_min": _number(options.pix_min),
        "min_stamp_center": math.ceil(options.min_stamp_center),
        "ngauss": options.ngauss,
        "deg_gauss1": options.deg_gauss1,
        "deg_gauss2": options.deg_gauss2,
        "deg_gauss3": options.deg_gauss3,
        "sigma_gauss1": f"{options.sigma_gauss1:.6g}",
        "sigma_gauss2": f"{options.sigma_gauss2:.6g}",
        "sigma_gauss3": f"{options.sigma_gauss3:.6g}",
        "deg_spatial": options.deg_spatial,
    }
    lines = [f"{k:<17} {v!s:<10} /*** {_COMMENTS[k]} ***/" for k, v in values.items()]
    path = Path(path)
    path.write_text("\n".join(lines) + "\n")
    return path


# ------------------------------------------------------------------------ mrj_phot


def find_mrj_phot(binary: str) -> str | None:
    """The full path of the ISIS program ``binary`` (a name on PATH or a path), or None."""
    return shutil.which(binary)


def unavailable_message(binary: str) -> str:
    """The one-line message of a missing ``mrj_phot``."""
    return (
        f"subtract backend 'ois': ISIS program {binary!r} (subtract.ois.isis_binary) not "
        f"found or not executable; install ISIS by C. Alard from {ISIS_URL} and give the "
        'path of its bin/mrj_phot, or set subtract.ois.isis_binary = "" to use the '
        "built-in numpy fit"
    )


def isis_command(binary: str, reference: str, image: str, config: str) -> list[str]:
    """The ``mrj_phot`` command line: ``binary reference image -c config``.

    ``reference`` is the image ISIS convolves; all three files are named relative to the
    directory the program runs in (it writes its outputs there).

    Examples
    --------
    >>> isis_command("mrj_phot", "ref.fits", "img.fits", "default_config")
    ['mrj_phot', 'ref.fits', 'img.fits', '-c', 'default_config']
    """
    return [binary, reference, image, "-c", config]


def _last_line(output: str) -> str:
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    return lines[-1] if lines else "(no output)"


def _kernel_sum(output: str) -> float | None:
    """The first ``sum_kernel ...: value`` that ``mrj_phot`` printed."""
    match = _SUM_KERNEL.search(output)
    return float(match.group(1)) if match else None


def _write_fits(path: Path, data: np.ndarray) -> None:
    from astropy.io import fits

    fits.PrimaryHDU(data.astype(">f4")).writeto(path, overwrite=True)


def read_isis_image(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """An image ISIS wrote, as float32 of ``shape``.

    Raises
    ------
    ValueError
        If the file is missing, not FITS, holds no image or one of another shape.
    """
    from astropy.io import fits
    from astropy.utils.exceptions import AstropyUserWarning

    if not path.exists():
        raise ValueError(f"no {path.name}")
    with warnings.catch_warnings():
        # ISIS writes no final FITS block padding; every pixel is there
        warnings.filterwarnings(
            "ignore", message="File may have been truncated", category=AstropyUserWarning
        )
        try:
            with fits.open(path, memmap=False) as hdul:
                data = None if hdul[0].data is None else np.array(hdul[0].data, np.float32)
        except (OSError, IndexError, TypeError) as err:
            raise ValueError(f"{path.name} is not a readable FITS image ({err})") from err
    if data is None or data.shape != shape:
        got = "no image" if data is None else f"shape {data.shape}"
        raise ValueError(f"{path.name} has {got}, expected {shape}")
    return data


def subtract_with_mrj_phot(
    science: Frame, template: Frame, options: OisOptions, workdir: Path
) -> OisSolution:
    """Subtract with ISIS's ``mrj_phot`` (``options.isis_binary``); see the module doc.

    Parameters
    ----------
    science, template : Frame
        Registered frames of the same shape.
    options : OisOptions
        With ``isis_binary`` set (and ``isis_config`` already applied).
    workdir : Path
        Where the FITS files, the ``default_config`` and ISIS's outputs go.

    Returns
    -------
    OisSolution
        ``kernel`` is None (ISIS does not write it as an image), ``coefficients`` empty.

    Raises
    ------
    oasis_core.contracts.errors.BackendUnavailable
        If the program cannot be found or started.
    oasis_core.contracts.errors.StageError
        If the frames differ in shape, or the program fails, times out or writes no
        usable ``conv.fits``; the message quotes its last output line.
    """
    binary = find_mrj_phot(options.isis_binary)
    if binary is None:
        raise BackendUnavailable(unavailable_message(options.isis_binary))
    _check_shapes(science, template)
    sci = _prepare(science, options, "science")
    tpl = _prepare(template, options, "template")
    direction = _direction(options, sci, tpl)
    conv, ref = (tpl, sci) if direction == "template" else (sci, tpl)
    conv_frame, ref_frame = (template, science) if direction == "template" else (science, template)
    sigmas, degrees, hm, hs, sigma_match = _effective_geometry(options, ref.fwhm, conv.fwhm)

    # ISIS's raw-pixel values of the frame-dependent options
    levels = [f.saturation for f in (science, template) if f.saturation]
    saturation = options.saturation if options.saturation > 0 else min(levels, default=NO_LEVEL)
    pix_min = options.pix_min if math.isfinite(options.pix_min) else -NO_LEVEL
    above = options.min_stamp_center or options.min_stamp_snr * conv.noise
    widths = [options.sigma_gauss1, options.sigma_gauss2, options.sigma_gauss3]
    widths[: len(sigmas)] = sigmas
    written = attrs.evolve(
        options,
        half_mesh_size=hm,
        half_stamp_size=hs,
        sigma_gauss1=widths[0],
        sigma_gauss2=widths[1],
        sigma_gauss3=widths[2],
        saturation=saturation,
        pix_min=pix_min,
        min_stamp_center=conv.sky + above,
    )
    workdir.mkdir(parents=True, exist_ok=True)
    defect = pix_min - max(1.0, abs(pix_min))  # below pix_min: ISIS's defect marker
    for name, frame, im in (("ref.fits", conv_frame, conv), ("img.fits", ref_frame, ref)):
        data = np.where(im.bad, np.float32(defect), np.asarray(frame.data, np.float32))
        _write_fits(workdir / name, data)
    write_isis_config(written, workdir / "default_config")
    for stale in ("conv.fits", "conv0.fits"):
        (workdir / stale).unlink(missing_ok=True)

    cmd = isis_command(binary, "ref.fits", "img.fits", "default_config")
    where = (
        f"subtract backend 'ois': {Path(binary).name} on science {science.name!r} / "
        f"template {template.name!r}"
    )
    try:
        run = subprocess.run(  # the user's configured program, no shell
            cmd,
            cwd=workdir,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            timeout=options.isis_timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as err:
        out = err.stdout or ""  # bytes whatever text= says
        if isinstance(out, bytes):
            out = out.decode(errors="replace")
        msg = (
            f"{where} timed out after {options.isis_timeout:g} s "
            f"(subtract.ois.isis_timeout); last output: {_last_line(out)}"
        )
        raise StageError(msg) from err
    except OSError as err:
        msg = f"{unavailable_message(options.isis_binary)} ({err.strerror or err})"
        raise BackendUnavailable(msg) from err
    last = _last_line(run.stdout)
    if run.returncode != 0:
        raise StageError(f"{where} failed with exit code {run.returncode}: {last}")
    shape = science.shape
    try:
        diff = read_isis_image(workdir / "conv.fits", shape)
    except ValueError as err:
        raise StageError(f"{where} wrote no usable output ({err}): {last}") from err
    conv0: np.ndarray | None
    try:
        conv0 = read_isis_image(workdir / "conv0.fits", shape)
    except ValueError:
        conv0 = None
    # usable: not masked, away from the edges and masked pixels, not zeroed by ISIS
    weight = _residual_weight(ref, conv, hm)
    weight[~np.isfinite(diff) | (diff == 0)] = 0.0
    good = weight > 0
    ksum = _kernel_sum(run.stdout)
    if ksum is None and conv0 is not None and good.any():
        # conv = (conv0 - image) / ksum: least squares over the good pixels
        d = diff[good].astype(np.float64)
        ksum = float((d * (conv0[good] - np.asarray(ref_frame.data)[good])).sum() / (d * d).sum())
    if ksum is None or not math.isfinite(ksum) or ksum == 0:
        msg = f"{where}: no kernel sum in its output nor a conv0.fits to derive it: {last}"
        raise StageError(msg)

    # sum(K**2), the variance factor of the convolved image: from the sky noise of conv0
    # (correlated noise: no pixel differences), else that of a Gaussian of sigma_match
    k2 = ksum**2 * min(1.0, 1.0 / (4.0 * math.pi * (sigma_match or 0.0) ** 2 + 1e-12))
    if conv0 is not None and good.sum() > 1000:
        _, noise0 = _sky_stats(conv0, good, differences=False)
        if math.isfinite(noise0) and noise0 > 0:
            k2 = min((noise0 / conv.noise) ** 2, 4.0 * ksum**2)
    noise2 = ref.variance() + np.float32(k2) * conv.variance()
    if direction == "template":
        residual = -ksum * diff  # science - (K * template + background)
        noise = np.sqrt(noise2)
    else:
        residual = diff  # (K * science + bg - template) / ksum: science's scale already
        noise = np.sqrt(noise2) / abs(ksum)
    residual = np.where(good, residual, 0.0)

    meta: dict[str, Any] = {
        "program": Path(binary).name,
        "ksum": ksum,
        "deg_spatial": options.deg_spatial,
        "deg_bg": options.deg_bg,
        "half_mesh": hm,
        "half_stamp": hs,
        "sigmas": ",".join(f"{s:.3g}" for s in sigmas),
        "degrees": ",".join(str(d) for d in degrees),
        "fwhm": float("nan") if ref.fwhm is None else ref.fwhm,
        "fwhm_science": float("nan") if sci.fwhm is None else sci.fwhm,
        "fwhm_template": float("nan") if tpl.fwhm is None else tpl.fwhm,
        "kernel_sq_sum": k2,
    }
    if sigma_match is not None:
        meta["sigma_match"] = sigma_match
    return OisSolution(
        residual=residual.astype(np.float32),
        noise=noise.astype(np.float32),
        weight=weight,
        kernel=None,
        coefficients=np.zeros((0, 0)),
        bg_coefficients=np.zeros(0),
        direction=direction,
        ksum=ksum,
        sources=_source_mask(ref, conv),
        meta=meta,
    )
