"""Provenance headers and the resume rule.

Every output carries, in its header (a catalog, in its ECSV metadata):

========  ===========================================================
``OASVER``   OASIS version
``OASSTAGE`` stage
``OASBACK``  backend name
``OASPLUG``  plugin ``dist==version``
``OASOPTH``  hash of the options (backend options, the core settings that matter, and
             the contents of every file an option names)
``OASINn``   each input's name and sha256 (``name:sha256``, both cut to 32 characters)
``HISTORY``  the full options, one card per option
========  ===========================================================

A unit of work is skipped when its output exists and its ``OASINn`` and ``OASOPTH`` match
the current inputs and options (:func:`is_current`); otherwise it is redone.

An option declared with ``option(..., path=True)`` names a file (e.g.
``subtract.ois.isis_config``): the hash covers that file's sha256 (or ``missing``), so
editing the file redoes the work, as editing the option would. The user's configuration
files in the target's ``configs/`` (a backend's ``user_files``) are inputs of the units
that use them, with the same effect.

File digests are cached per process by path, device, inode, size, modification *and*
status-change time (:func:`oasis_core.engine.files.file_key`): an edit that keeps the
size and restores the modification time (``cp -p``, ``rsync -t``, ``tar``,
``touch -r``) still changes the status-change time, which no user can set, so it is
never mistaken for the old content.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from oasis_core import __version__
from oasis_core.engine.files import file_key
from oasis_core.engine.io import sha256

__all__ = [
    "MISSING",
    "Provenance",
    "digest_of",
    "digests_known",
    "is_current",
    "option_files",
    "options_dict",
    "options_hash",
    "recorded",
    "remember_digests",
]

#: The digest recorded for a file an option names that does not exist.
MISSING = "missing"


def options_dict(options: Any) -> dict[str, Any]:
    """A plain dict of an options object (attrs instance, or a mapping of them)."""
    if attrs.has(type(options)):
        return attrs.asdict(options, recurse=True)
    return {k: options_dict(v) if attrs.has(type(v)) else v for k, v in dict(options or {}).items()}


def options_hash(*options: Any) -> str:
    """A short stable hash of one or more options objects."""
    blob = json.dumps([options_dict(o) for o in options], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


_HASH_CACHE: dict[tuple[str, int, int, int, int, int], str] = {}


def digests_known(paths: Any) -> dict[tuple[str, int, int, int, int, int], str]:
    """The digests this process knows of ``paths`` as they are now (by their file keys),
    without reading any: what a task takes to its worker, which then hashes none of its
    inputs again (:func:`remember_digests`)."""
    out = {}
    for p in paths:
        try:
            key = file_key(Path(p))
        except OSError:
            continue
        if key in _HASH_CACHE:
            out[key] = _HASH_CACHE[key]
    return out


def remember_digests(digests: Mapping[Any, str]) -> None:
    """Take digests made elsewhere (a worker that wrote a file and hashed it, the main
    process that knew a task's inputs), by file key: a file whose key has changed since
    is hashed again when asked for."""
    for key, digest in digests.items():
        _HASH_CACHE[tuple(key)] = str(digest)


def digest_of(path: Path) -> dict[tuple[str, int, int, int, int, int], str]:
    """``{file key: sha256}`` of ``path`` (hashed now unless known): what a worker that
    wrote the file hands back with its result."""
    return {file_key(Path(path)): _file_hash(Path(path))}


def _file_hash(path: Path) -> str:
    key = file_key(path)
    if key not in _HASH_CACHE:
        _HASH_CACHE[key] = sha256(path)
    return _HASH_CACHE[key]


def _named_file_digest(value: str) -> str:
    path = Path(value)
    try:
        return _file_hash(path)[:32] if path.is_file() else MISSING
    except OSError as err:  # unreadable: its own marker, so that fixing it redoes the work
        return f"unreadable:{err.errno}"


def option_files(options: Any, prefix: str = "") -> dict[str, str]:
    """The files named by ``path=True`` options: dotted option name to the file's sha256
    (32 hex digits), ``"missing"`` when there is no such file.

    ``options`` is an options object or a mapping of them (the subtract backend ``auto``
    hashes every candidate's options); an empty value names no file.

    Examples
    --------
    >>> from oasis_core.contracts.backends import option
    >>> @attrs.frozen
    ... class Opts:
    ...     config: str = option("", "a configuration file", path=True)
    >>> option_files(Opts("/nonexistent/file"))
    {'config': 'missing'}
    >>> option_files(Opts(""))
    {}
    """
    out: dict[str, str] = {}
    if attrs.has(type(options)):
        for field in attrs.fields(type(options)):
            value = getattr(options, field.name)
            if field.metadata.get("path") and isinstance(value, str | Path) and str(value):
                out[prefix + field.name] = _named_file_digest(str(value))
            elif attrs.has(type(value)) or isinstance(value, Mapping):
                out.update(option_files(value, f"{prefix}{field.name}."))
    elif isinstance(options, Mapping):
        for key, value in options.items():
            out.update(option_files(value, f"{prefix}{key}."))
    return out


@attrs.frozen(kw_only=True)
class Provenance:
    """What an output was made from."""

    stage: str
    backend: str
    plugin: str
    inputs: Mapping[str, Path] = attrs.field(factory=dict)
    options: Any = None
    settings: Any = None
    #: The files the options name and their digests, read when the provenance is made
    #: (before the work), see :func:`option_files`.
    files: Mapping[str, str] = attrs.field(
        init=False, default=attrs.Factory(lambda self: option_files(self.options), takes_self=True)
    )

    def digest(self) -> str:
        """The ``OASOPTH`` hash: the options, the settings and the named files' contents."""
        if self.files:
            return options_hash(self.options, self.settings, {"files": dict(self.files)})
        return options_hash(self.options, self.settings)

    def input_cards(self) -> list[str]:
        return [
            f"{name[:32]}:{_file_hash(Path(p))[:32]}" for name, p in sorted(self.inputs.items())
        ]

    def cards(self) -> dict[str, Any]:
        """Header cards to add to the output."""
        cards: dict[str, Any] = {
            "OASVER": (__version__, "OASIS version"),
            "OASSTAGE": (self.stage, "OASIS stage"),
            "OASBACK": (self.backend, "backend"),
            "OASPLUG": (self.plugin, "plugin distribution==version"),
            "OASOPTH": (self.digest(), "hash of the options"),
        }
        for i, card in enumerate(self.input_cards()):
            cards[f"OASIN{i}"] = card
        return cards

    def header_cards(self) -> dict[str, Any]:
        """:meth:`cards` plus ``HISTORY`` lines with every option."""
        cards = self.cards()
        cards["HISTORY"] = [
            f"{self.stage}.{self.backend}.{key} = {value!r}"[:72]
            for key, value in options_dict(self.options).items()
        ] + [f"{self.stage}.{self.backend}.{key}: sha256 {d}"[:72] for key, d in self.files.items()]
        return cards


def recorded(path: Path) -> Mapping[str, Any] | None:
    """The provenance cards recorded in ``path``: a FITS header, or an ECSV catalog's
    metadata; None when the file is missing or unreadable."""
    path = Path(path)
    if not path.exists():
        return None
    if path.suffix == ".ecsv":
        from astropy.table import Table

        try:
            return dict(Table.read(path, format="ascii.ecsv").meta)
        except Exception:  # astropy's readers raise many kinds: an unreadable catalog is redone
            return None
    from astropy.io import fits

    try:
        return fits.getheader(path)
    except (OSError, ValueError):
        return None


def is_current(path: Path, prov: Provenance) -> bool:
    """True when ``path`` (a FITS output or an ECSV catalog) exists and was made from the
    same inputs (all of them, no more, no fewer) and options."""
    found = recorded(path)
    if found is None:
        return False
    expected = prov.cards()
    for key in ("OASSTAGE", "OASBACK", "OASOPTH"):
        if str(found.get(key)) != str(expected[key][0]):
            return False
    wanted = [str(v) for k, v in expected.items() if k.startswith("OASIN")]
    have = []
    while f"OASIN{len(have)}" in found:
        have.append(str(found[f"OASIN{len(have)}"]))
    return wanted == have
