"""Configuration: ``configs/oasis.toml``, its defaults and its precedence.

The file has one table per stage plus ``[run]``. A stage table holds the core's settings
for that stage (``backend`` = which backend runs it, thresholds the core applies) and one
sub-table per backend, ``[<stage>.<backend>]``, validated against that backend's
``Options`` class::

    [subtract]
    backend = "ois"        # subtract backend; see `oasis plugins`
    [subtract.ois]
    deg_spatial = 2        # degree of the kernel's spatial polynomial

Precedence, highest first: command-line option > function argument > config file (unless
``use_config_file=False``) > default. Every layer is checked on its own, every value once,
against what its option declares (:func:`oasis_core.contracts.backends.option`: a range, choices; a
float is never NaN or infinite unless declared): an unknown key, a value of the wrong type
or out of range is a one-line :class:`~oasis_core.contracts.errors.ConfigError` naming where (the
file, ``argument`` or ``command line``), the table, the key, the value and the range::

    configs/oasis.toml: [subtract] q_floor = nan: must be a finite number in [0, 1]
"""

from __future__ import annotations

import difflib
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from oasis_core.contracts.backends import STAGES, option, option_check
from oasis_core.contracts.errors import ConfigError
from oasis_core.contracts.stages import StageTable
from oasis_core.contracts.validators import (
    OptionValueError,
    fraction,
    in_range,
    non_negative,
    positive,
    show,
)

__all__ = [
    "SETTINGS",
    "Config",
    "dump_config",
    "load_config",
    "move_renamed",
    "parse_assignment",
    "render_config",
]


@attrs.frozen(kw_only=True)
class RunSettings:
    """How the pipeline runs."""

    jobs: int = option(
        0, "worker processes for per-frame work (0 = one per core)", range=non_negative
    )
    executor: str = option(
        "local", "executor for per-frame work ('local' or 'dask')", choices=("local", "dask")
    )
    scheduler: str = option(
        "", "dask scheduler address, e.g. tcp://host:8786 ('' = a local cluster of `jobs` workers)"
    )
    min_frames: int = option(3, "fewest usable frames a target needs", range=(1, None))


@attrs.frozen(kw_only=True)
class MaskSettings:
    """Core settings of the mask stage."""

    backend: str = option("native", "mask backend; see `oasis plugins`")


@attrs.frozen(kw_only=True)
class PsfSettings:
    """Core settings of the psf stage (frame selection)."""

    backend: str = option("native", "psf backend; see `oasis plugins`")
    fwhm_max: float = option(
        0.0, "archive frames whose FWHM exceeds this [pix] (0 = no limit)", range=non_negative
    )
    fwhm_max_ratio: float = option(
        2.0,
        "archive frames whose FWHM exceeds this multiple of the median FWHM (0 = off)",
        range=non_negative,
    )
    snr_min: float = option(
        5.0, "archive frames whose S/N figure is below this (0 = off)", range=non_negative
    )


@attrs.frozen(kw_only=True)
class AlignSettings:
    """Core settings of the align stage."""

    backend: str = option("native", "align backend; see `oasis plugins`")
    reference: str = option(
        "snr",
        "reference frame: 'snr' (highest S/N) or 'seeing' (smallest FWHM)",
        choices=("snr", "seeing"),
    )


@attrs.frozen(kw_only=True)
class CombineSettings:
    """Core settings of the combine stage (which frames make the template)."""

    backend: str = option("native", "combine backend; see `oasis plugins`")
    fraction: float = option(
        0.34,
        "fraction of the best-seeing frames stacked into the template",
        range=in_range(0, 1, lo_open=True),
    )
    min_frames: int = option(
        5, "stack at least this many frames (when there are that many)", range=(1, None)
    )


@attrs.frozen(kw_only=True)
class SubtractSettings:
    """Core settings of the subtract stage."""

    backend: str = option("ois", "subtract backend; see `oasis plugins`")
    q_floor: float = option(
        0.5,
        "residuals with Q below this are fully masked and logged (0 = keep all)",
        range=fraction,
    )
    q_ceiling: float = option(
        0.75, "Q at which the optimisation stops: the subtraction is good enough", range=fraction
    )
    star_left_max: float = option(
        0.1,
        "residuals that leave the template's brightest stars (3 or more, their median) at more "
        "than this fraction of their flux, a wrong flux scale, are fully masked and logged like "
        "a Q below q_floor (0 = keep all)",
        range=fraction,
    )
    optimize: bool = option(
        True, "try the backend's further configurations until Q reaches q_ceiling"
    )
    max_tries: int = option(9, "at most this many configurations per frame", range=(1, None))


@attrs.frozen(kw_only=True)
class MrSettings:
    """Core settings of the master-residual stage."""

    backend: str = option(
        "native",
        "master-residual backend; see `oasis plugins` (a list: the first that can run here)",
    )


@attrs.frozen(kw_only=True)
class ExtractSettings:
    """Core settings of the extract stage (the core's filtering, the same for every backend)."""

    backend: str = option("native", "extract backend; see `oasis plugins`")
    method: str = option(
        "both",
        "'both' (residuals and master residual), 'indiv' or 'MR'",
        choices=("both", "indiv", "MR"),
    )
    majority: float = option(
        0.5, "reject sources found in more than this fraction of the residuals", range=fraction
    )
    match_radius: float = option(
        1.5, "radius for matching detections across images [pix]", range=positive
    )
    dipole_ratio: float = option(
        0.5,
        "reject as dipole when the negative lobe reaches this fraction of the peak",
        range=non_negative,
    )
    dipole_min: float = option(
        3.0,
        "...and is itself at least this many sigmas deep (PSF-smoothed residual)",
        range=non_negative,
    )
    keep_negative: bool = option(False, "keep negative (fading) sources in filtered catalogs")
    masked_max: float = option(
        0.05,
        "reject sources with more than this fraction of masked pixels within 1.5 FWHM",
        range=fraction,
    )
    snr_min: float = option(
        6.0,
        "reject sources whose PSF-weighted significance (peak_norm) is below this (the "
        "floor of the detection threshold)",
        range=non_negative,
    )
    false_per_mpix: float = option(
        0.45,
        "false detections per megapixel per residual allowed on the residual's own null "
        "(its sign-flipped significance map): the detection threshold is the level that "
        "gives them, never below snr_min (0 = snr_min alone)",
        range=non_negative,
    )
    wing_sigma: float = option(
        4.0,
        "reject sources near template stars that do not stand out of the residual imperfect "
        "PSF matching leaves there by this many of its sigmas (the wing column; 0 = off)",
        range=non_negative,
    )
    extent_max: float = option(
        1.1,
        "reject sources whose significance through a filter twice the PSF's exceeds this "
        "multiple of the PSF-matched one (a point source: 0.8-1.05; 0 = off)",
        range=non_negative,
    )
    sharp_max: float = option(
        2.5,
        "reject sources whose peak-to-flux ratio exceeds this multiple of the PSF's (0 = off)",
        range=non_negative,
    )


@attrs.frozen(kw_only=True)
class PhotometrySettings:
    """Core settings of the photometry stage (where to measure, times, light-curve
    statistics; the fit itself is the backend's)."""

    backend: str = option("native", "photometry backend; see `oasis plugins`")
    at: tuple[str, ...] = option(
        (),
        "further positions to measure: 'RA,DEC' (degrees or sexagesimal) or 'X,Ypx' "
        "(0-based template pixels)",
    )
    at_file: str = option("", "a file of further positions, one a line ('' = none)", path=True)
    catalog: bool = option(True, "measure the kept sources of the extract stage too")
    match_radius: float = option(
        1.5, "catalog positions closer than this are one source [pix]", range=positive
    )
    zero_point: float = option(
        0.0, "magnitude zero point of the template (0 = no magnitude columns)", range=(0, None)
    )
    barycentric: bool = option(
        False, "times as barycentric MJD (TDB) when the headers give coordinates and a site"
    )
    period_min: float = option(0.05, "shortest period searched [days]", range=positive)
    period_max: float = option(
        0.0, "longest period searched [days] (0 = half the time span)", range=non_negative
    )
    fap_max: float = option(
        0.01,
        "a period is reported when its false-alarm probability is below this",
        range=in_range(0, 1, lo_open=True),
    )
    plots: bool = option(True, "a PNG per source and lightcurves/index.html")


#: The settings class of ``[run]`` and of each stage's table: a view of
#: :mod:`oasis_core.contracts.stages` (each stage's ``settings``).
SETTINGS: Mapping[str, type] = StageTable(
    lambda stage: stage.settings_class, head=lambda: {"run": RunSettings}
)


@attrs.frozen(kw_only=True)
class Config:
    """The effective configuration.

    Attributes
    ----------
    settings : mapping
        Section name (``run`` or a stage) to that section's settings object.
    options : mapping
        ``(stage, backend)`` to the backend's options object, for every installed backend.
    source : Path or None
        The file that was read, if any.
    chosen : mapping
        Stage to the backend name chosen from a preference list (``backend = "a, b"``:
        the first that can run here).
    """

    settings: Mapping[str, Any]
    options: Mapping[tuple[str, str], Any]
    source: Path | None = None
    chosen: Mapping[str, str] = attrs.field(factory=dict)

    def backend(self, stage: str) -> str:
        """Name of the backend chosen for ``stage``."""
        return self.chosen.get(stage) or str(self.settings[stage].backend)

    def backend_options(self, stage: str, name: str | None = None) -> Any:
        """Options object of backend ``name`` (default: the chosen one) of ``stage``."""
        name = name or self.backend(stage)
        return self.options[(stage, name)]

    @property
    def run(self) -> RunSettings:
        return self.settings["run"]  # type: ignore[no-any-return]


def _type_name(default: Any) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        tuple: "a list",
    }.get(type(default), type(default).__name__)


def _expected(field: attrs.Attribute) -> str:
    """What a value of ``field`` must be, in words: its declared check, else its type."""
    check = option_check(field)
    return check.words() if check is not None else _type_name(field.default)


def _coerce(value: Any, field: attrs.Attribute, where: str) -> Any:
    default = field.default
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(default, str):
        if isinstance(value, str):
            return value
    elif isinstance(default, (list, tuple)):
        if isinstance(value, (list, tuple)):
            return type(default)(value)
    elif default is None:
        return value
    raise ConfigError(f"{where} {field.name} = {show(value)}: must be {_expected(field)}")


def _unknown(key: str, choices: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, choices, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else f"; known: {', '.join(choices)}"
    return ConfigError(f"{where} unknown key {key!r}{hint}")


def _build(cls: type, values: Mapping[str, Any], where: str, table: str) -> Any:
    """``cls(**values)``; a bad value is a one-line :class:`ConfigError`
    ``"<where>: [<table>] <key> = <value>: must be <range>"``."""
    fields = {f.name: f for f in attrs.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise _unknown(key, sorted(fields), f"{where}: [{table}]")
        kwargs[key] = _coerce(value, fields[key], f"{where}: [{table}]")
    try:
        return cls(**kwargs)
    except OptionValueError as err:
        raise ConfigError(f"{where}: [{table}] {err.assignment()}") from err
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: [{table}] {err}") from err


def parse_assignment(text: str) -> tuple[str, Any]:
    """Parse ``key=value`` from the command line; the value is TOML, else a plain string.

    Examples
    --------
    >>> parse_assignment("subtract.ois.deg_spatial=1")
    ('subtract.ois.deg_spatial', 1)
    """
    if "=" not in text:
        raise ConfigError(f"option {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip(), value


def _nest(flat: Mapping[str, Any], where: str) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for dotted, value in flat.items():
        parts = dotted.split(".")
        if len(parts) not in (2, 3):
            raise ConfigError(f"{where}: key {dotted!r} must be section.key or stage.backend.key")
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return tree


#: Keys that moved: (section, old key) -> (section, backend, new key). A layer that still
#: uses the old key is read as the new one, with a one-line warning.
RENAMED: dict[tuple[str, str], tuple[str, str, str]] = {
    ("subtract", "auto_ceiling"): ("subtract", "auto", "ceiling"),
}


def move_renamed(layer: dict[str, Any], where: str) -> dict[str, Any]:
    """``layer`` with the keys of :data:`RENAMED` moved to their new place (warned)."""
    import logging

    out = {k: dict(v) if isinstance(v, Mapping) else v for k, v in layer.items()}
    for (section, old), (new_section, backend, new) in RENAMED.items():
        table = out.get(section)
        if not isinstance(table, dict) or old not in table:
            continue
        value = table.pop(old)
        target = out.setdefault(new_section, {})
        sub = dict(target.get(backend) or {})
        sub.setdefault(new, value)
        target[backend] = sub
        logging.getLogger("oasis").warning(
            "%s: [%s] %s is now [%s.%s] %s; read as that (move it to silence this)",
            where,
            section,
            old,
            new_section,
            backend,
            new,
        )
    return out


def _merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def load_config(
    path: Path | None,
    registry: Any,
    *,
    use_config_file: bool = True,
    arguments: Mapping[str, Any] | None = None,
    cli: Mapping[str, Any] | None = None,
    data: Mapping[str, Any] | None = None,
) -> Config:
    """Build the effective configuration.

    Parameters
    ----------
    path : Path or None
        ``configs/oasis.toml`` of the target (ignored if missing or ``use_config_file`` is
        False).
    registry : oasis_core.engine.plugins.Registry
        Gives every installed backend's ``Options`` class.
    use_config_file : bool
        Read ``path`` (default True).
    arguments, cli : mapping of dotted key to value
        Function arguments and command-line options (``{"subtract.backend": "ois",
        "subtract.ois.deg_spatial": 1}``); ``cli`` wins over ``arguments``, which win over
        the file.
    data : mapping, optional
        The file's content, already read (instead of reading ``path``, which then only
        names it in messages).

    Raises
    ------
    ConfigError
        Unknown key, wrong type, value out of its declared range, bad TOML; one line
        naming where (file, ``argument``, ``command line``), the key, the value and the
        range.
    """
    where_file = str(path) if path is not None else "config"
    if data is not None:
        data = dict(data)
    elif use_config_file and path is not None and Path(path).exists():
        try:
            data = tomllib.loads(Path(path).read_text())
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path}: invalid TOML: {err}") from err
    else:
        data = {}
    layers = [(data, where_file)]
    if arguments:
        layers.append((_nest(arguments, "argument"), "argument"))
    if cli:
        layers.append((_nest(cli, "command line"), "command line"))

    # validate every layer with its own name, then merge
    layers = [(move_renamed(layer, where), where) for layer, where in layers]
    for layer, where in layers:
        _validate(layer, registry, where)
    merged: dict[str, Any] = {}
    for layer, _ in layers:
        merged = _merge(merged, layer)

    settings = {}
    options = {}
    for section, cls in SETTINGS.items():
        table = merged.get(section, {})
        plain = {k: v for k, v in table.items() if not isinstance(v, Mapping)}
        settings[section] = _build(cls, plain, where_file, section)
    for stage in STAGES:
        table = merged.get(stage, {})
        for name in registry.names(stage):
            record = registry.records[stage][name]
            values = table.get(name, {})
            options[(stage, name)] = _build(
                record.backend.Options, values, where_file, f"{stage}.{name}"
            )
    chosen = {s: _first_available(settings[s].backend, s, registry, options) for s in STAGES}
    return Config(
        settings=settings,
        options=options,
        source=Path(path) if (use_config_file and path) else None,
        chosen=chosen,
    )


def _first_available(value: str, stage: str, registry: Any, options: Mapping) -> str:
    """Resolve a preference list ``"a, b"``: the first installed backend that can run here
    (else the first name, so that running the stage says why it cannot)."""
    names = [n.strip() for n in str(value).split(",") if n.strip()]
    if len(names) <= 1:
        return names[0] if names else str(value)
    from oasis_core.contracts.errors import OasisError

    for name in names:
        if name not in registry.names(stage):
            continue
        try:
            registry.records[stage][name].backend.check(options[(stage, name)])
        except OasisError:
            continue
        return name
    return names[0]


def _validate(layer: Mapping[str, Any], registry: Any, where: str) -> None:
    import logging

    for section, table in layer.items():
        if section not in SETTINGS:
            raise _unknown(section, sorted(SETTINGS), f"{where}:")
        if not isinstance(table, Mapping):
            raise ConfigError(f"{where}: [{section}] must be a table")
        fields = {f.name: f for f in attrs.fields(SETTINGS[section])}
        for key, value in table.items():
            if isinstance(value, Mapping):
                if section == "run":
                    raise _unknown(key, sorted(fields), f"{where}: [run]")
                if key not in registry.names(section):
                    logging.getLogger("oasis").warning(
                        "%s: [%s.%s] is for a backend that is not installed; ignored",
                        where,
                        section,
                        key,
                    )
                    continue
                cls = registry.records[section][key].backend.Options
                _build(cls, value, where, f"{section}.{key}")
            elif key not in fields:
                raise _unknown(key, sorted(fields), f"{where}: [{section}]")
            else:
                _build(SETTINGS[section], {key: value}, where, section)
        if "backend" in table and not isinstance(table["backend"], Mapping):
            pass  # the name is resolved (and an unknown one reported) when the stage runs


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} to TOML")


def _render_table(lines: list[str], title: str, obj: Any, doc: str | None = None) -> None:
    lines.append("")
    if doc:
        lines.append(f"# {doc}")
    lines.append(f"[{title}]")
    fields = attrs.fields(type(obj))
    width = max(
        (len(f.name) + 3 + len(_toml_value(getattr(obj, f.name))) for f in fields), default=0
    )
    for f in fields:
        text = f"{f.name} = {_toml_value(getattr(obj, f.name))}"
        check = option_check(f)
        short = check.short() if check is not None else ""
        comment = f.metadata.get("help", "") + (f" {short}" if short else "")
        lines.append(f"{text.ljust(width)}  # {comment}".rstrip())


def render_config(registry: Any, config: Config | None = None) -> str:
    """The text of ``oasis.toml``: every key with its value and one-line help.

    Rendered from the settings classes and each installed backend's ``Options`` metadata,
    never from a hand-kept copy. With ``config`` the current values are written, else the
    defaults.
    """
    lines = [
        "# OASIS configuration. Every key is shown with its default.",
        "# Precedence: command line > function argument > this file > default.",
    ]
    for section, cls in SETTINGS.items():
        obj = config.settings[section] if config else cls()
        _render_table(lines, section, obj, (cls.__doc__ or "").strip().splitlines()[0])
        if section == "run":
            continue
        for name in registry.names(section):
            record = registry.records[section][name]
            opts = config.options[(section, name)] if config else record.backend.Options()
            if not attrs.fields(type(opts)):
                continue
            desc = record.backend.description or f"options of the {name!r} {section} backend"
            _render_table(lines, f"{section}.{name}", opts, f"{desc} ({record.dist})")
    return "\n".join(lines) + "\n"


def dump_config(config: Config, registry: Any) -> str:
    """The effective configuration as TOML (saved with each run)."""
    return render_config(registry, config)
