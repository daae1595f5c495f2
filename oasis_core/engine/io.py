"""Input and output of the core, in one place: a facade over

- :mod:`~oasis_core.engine.files`: frame names, checksums, :func:`atomic_write` (a temporary
  file in the same directory, then :func:`os.replace`, so a crash never leaves a
  half-written file under a final name), :func:`check_outputs`, text and tables;
- :mod:`~oasis_core.engine.frames`: reading a frame once (data, header, weight map, gain,
  read noise, saturation), :func:`frame_from_arrays`;
- :mod:`~oasis_core.engine.products`: the stages' FITS products written and read back;
- :mod:`~oasis_core.engine.headers`: header values, times, units, cards.

Only the core touches files; plugins and applications call ``io.read_frame``,
``io.write_residual``... from here.
"""

from __future__ import annotations

from oasis_core.engine.files import (
    FITS_SUFFIXES,
    atomic_write,
    check_outputs,
    frame_name,
    is_fits_name,
    sha256,
    write_table,
    write_text,
)
from oasis_core.engine.frames import (
    BPM_NAMES,
    MIN_SIDE,
    frame_from_arrays,
    read_frame,
    read_shape,
)
from oasis_core.engine.headers import (
    EXPTIME_KEYS,
    GAIN_KEYS,
    MEASURED_KEYS,
    RDNOISE_KEYS,
    SATURATE_KEYS,
    TIME_KEYS,
    WCS_KEY_RE,
    apply_cards,
    drop_unusable_cards,
    finite_value,
    header_mjd,
    header_unit,
    header_value,
    header_wcs,
    sanitize_header,
    set_card,
    warn_dropped_cards,
)
from oasis_core.engine.products import (
    RESIDUAL_CACHE_BYTES,
    FrameSeries,
    ResidualSeries,
    attrs_evolve,
    image_extension,
    read_output_frame,
    read_psf,
    read_residual,
    residual_header,
    template_inputs,
    write_frame,
    write_psf,
    write_residual,
)

__all__ = [
    "BPM_NAMES",
    "EXPTIME_KEYS",
    "FITS_SUFFIXES",
    "GAIN_KEYS",
    "MEASURED_KEYS",
    "MIN_SIDE",
    "RDNOISE_KEYS",
    "RESIDUAL_CACHE_BYTES",
    "SATURATE_KEYS",
    "TIME_KEYS",
    "WCS_KEY_RE",
    "FrameSeries",
    "ResidualSeries",
    "apply_cards",
    "atomic_write",
    "attrs_evolve",
    "check_outputs",
    "drop_unusable_cards",
    "finite_value",
    "frame_from_arrays",
    "frame_name",
    "header_mjd",
    "header_unit",
    "header_value",
    "header_wcs",
    "image_extension",
    "is_fits_name",
    "read_frame",
    "read_output_frame",
    "read_psf",
    "read_residual",
    "read_shape",
    "residual_header",
    "sanitize_header",
    "set_card",
    "sha256",
    "template_inputs",
    "warn_dropped_cards",
    "write_frame",
    "write_psf",
    "write_residual",
    "write_table",
    "write_text",
]
