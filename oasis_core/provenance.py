"""Provenance headers and the resume rule.

Every output carries, in its header:

========  ===========================================================
``OASVER``   OASIS version
``OASSTAGE`` stage
``OASBACK``  backend name
``OASPLUG``  plugin ``dist==version``
``OASOPTH``  hash of the options (backend options and the core settings that matter)
``OASINn``   each input's name and sha256 (``name:sha256``, both cut to 32 characters)
``HISTORY``  the full options, one card per option
========  ===========================================================

A unit of work is skipped when its output exists and its ``OASINn`` and ``OASOPTH`` match
the current inputs and options (:func:`is_current`); otherwise it is redone.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from oasis_core import __version__
from oasis_core.io import sha256

__all__ = ["Provenance", "is_current", "options_dict", "options_hash"]


def options_dict(options: Any) -> dict[str, Any]:
    """A plain dict of an options object (attrs instance or mapping)."""
    if attrs.has(type(options)):
        return attrs.asdict(options, recurse=True)
    return dict(options or {})


def options_hash(*options: Any) -> str:
    """A short stable hash of one or more options objects."""
    blob = json.dumps([options_dict(o) for o in options], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


_HASH_CACHE: dict[tuple[str, int, int], str] = {}


def _file_hash(path: Path) -> str:
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _HASH_CACHE:
        _HASH_CACHE[key] = sha256(path)
    return _HASH_CACHE[key]


@attrs.frozen(kw_only=True)
class Provenance:
    """What an output was made from."""

    stage: str
    backend: str
    plugin: str
    inputs: Mapping[str, Path] = attrs.field(factory=dict)
    options: Any = None
    settings: Any = None

    def digest(self) -> str:
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
        ]
        return cards


def is_current(path: Path, prov: Provenance) -> bool:
    """True when ``path`` exists and was made from the same inputs and options."""
    if not Path(path).exists():
        return False
    from astropy.io import fits

    try:
        header = fits.getheader(path)
    except (OSError, ValueError):
        return False
    expected = prov.cards()
    for key in ("OASSTAGE", "OASBACK", "OASOPTH"):
        if header.get(key) != expected[key][0]:
            return False
    wanted = [v for k, v in expected.items() if k.startswith("OASIN")]
    found = [header[k] for k in sorted(header) if k.startswith("OASIN") and k[5:].isdigit()]
    found = [header[f"OASIN{i}"] for i in range(len(found))]
    return wanted == found
