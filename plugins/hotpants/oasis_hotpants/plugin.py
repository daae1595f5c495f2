"""Entry point of the built-in ``hotpants`` plugin: Becker's HOTPANTS subtract backend.

This package is registered through the ``oasis.plugins`` entry-point group; its backends
arrive with a later issue, so for now it registers no backend and ``oasis plugins`` lists
nothing for it.
"""

from __future__ import annotations

__all__: list[str] = []
