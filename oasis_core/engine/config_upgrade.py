"""``oasis config upgrade``: a target's ``oasis.toml`` moved to the installed version.

:func:`upgrade_config` reads the file, moves renamed keys
(:data:`~oasis_core.engine.config.RENAMED`), leaves out the keys the installed version
does not know, carries over the options of backends not installed here, checks every
value as a run would, and renders the whole file again with every key of the installed
version (the file's values kept, the others at their defaults).
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from oasis_core.contracts.backends import STAGES
from oasis_core.contracts.errors import ConfigError
from oasis_core.engine.config import (
    RENAMED,
    SETTINGS,
    load_config,
    move_renamed,
    render_config,
)

__all__ = ["Upgrade", "upgrade_config"]


@attrs.frozen(kw_only=True)
class Upgrade:
    """What :func:`upgrade_config` did to a target's ``oasis.toml``.

    Attributes
    ----------
    text : str
        The new file: every key of the installed version, the file's own values kept.
    moved : list of str
        ``"[old] key -> [new] key"`` for each key that moved (:data:`RENAMED`).
    dropped : list of str
        ``"[section] key"`` for each key the installed version does not know.
    kept : list of str
        The tables of backends not installed here, carried over as they were.
    added : int
        Keys the file did not set, now written with their defaults.
    """

    text: str
    moved: list[str]
    dropped: list[str]
    kept: list[str]
    added: int


def upgrade_config(path: Path, registry: Any) -> Upgrade:
    """A target's ``oasis.toml`` moved to the installed version's keys and defaults.

    Moved keys (:data:`RENAMED`) are written under their new name, keys the installed
    version does not know are left out (and listed), the options of backends not installed
    here are carried over unchanged at the end, and every key the file did not set is
    written with its default. The values the file sets are checked as :func:`load_config`
    checks them. Nothing is written here: ``oasis config upgrade`` writes the text (and
    keeps the old file beside it).

    Raises
    ------
    ConfigError
        The file is missing, is not TOML, or sets a known key to a bad value.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such configuration file")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: invalid TOML: {err}") from err
    moved = [
        f"[{section}] {old} -> [{new_section}.{backend}] {new}"
        for (section, old), (new_section, backend, new) in RENAMED.items()
        if isinstance(raw.get(section), Mapping) and old in raw[section]
    ]
    data = move_renamed(raw, str(path)) if moved else raw
    known, dropped, foreign = _split_known(data, registry)
    config = load_config(path, registry, data=known)
    text = render_config(registry, config)
    if foreign:
        text += "\n# Options of backends not installed here, carried over as they were.\n"
        for section, name, table in foreign:
            text += f"[{section}.{name}]\n" + "".join(
                f"{key} = {_toml_value(value)}\n" for key, value in table.items()
            )
    total = sum(len(attrs.fields(type(obj))) for obj in config.settings.values()) + sum(
        len(attrs.fields(type(obj))) for obj in config.options.values()
    )
    given = sum(
        len(value) if isinstance(value, Mapping) else 1
        for table in known.values()
        for value in table.values()
    )
    return Upgrade(
        text=text,
        moved=moved,
        dropped=dropped,
        kept=[f"[{section}.{name}]" for section, name, _ in foreign],
        added=max(0, total - given),
    )


def _split_known(
    data: Mapping[str, Any], registry: Any
) -> tuple[dict[str, Any], list[str], list[tuple[str, str, dict[str, Any]]]]:
    """(the keys the installed version knows, the unknown ones as ``"[section] key"``, the
    tables of stage backends not installed here)."""
    known: dict[str, Any] = {}
    dropped: list[str] = []
    foreign: list[tuple[str, str, dict[str, Any]]] = []
    for section, table in data.items():
        if section not in SETTINGS or not isinstance(table, Mapping):
            dropped.append(f"[{section}]")
            continue
        fields = {f.name for f in attrs.fields(SETTINGS[section])}
        out: dict[str, Any] = {}
        for key, value in table.items():
            if isinstance(value, Mapping) and section in STAGES:
                if key in registry.names(section):
                    names = {
                        f.name for f in attrs.fields(registry.records[section][key].backend.Options)
                    }
                    sub = {k: v for k, v in value.items() if k in names}
                    dropped += [f"[{section}.{key}] {k}" for k in value if k not in names]
                    if sub:
                        out[key] = sub
                else:
                    foreign.append((section, key, dict(value)))
            elif key in fields:
                out[key] = value
            else:
                dropped.append(f"[{section}] {key}")
        if out:
            known[section] = out
    return known, dropped, foreign


def _toml_value(value: Any) -> str:
    """``value`` as a TOML value (the types a TOML file gives back)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
