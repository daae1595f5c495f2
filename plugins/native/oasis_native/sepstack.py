"""sep's extraction with its pixel stack sized to the image's need.

sep keeps one process-wide stack for the pixels above the threshold of the objects being
built, and allocates and links all of it at every ``sep.extract`` call: 45 to 60 ms for a
stack of 2048^2 entries, against a few ms for sep's default (300,000). Setting it to the
image's size before every call, the safe choice for crowded fields, so cost more than the
search itself on most frames. :func:`extract` runs sep with the stack it has (at least
its default) and only when sep runs out of it, again with one of the image's size; the
stack is restored afterwards, so no call depends on what another left set.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["extract"]

#: The first stack tried: sep's default.
FIRST_STACK = 300_000


def extract(data: np.ndarray, thresh: float, *, largest: int | None = None, **kwargs: Any) -> Any:
    """``sep.extract(data, thresh, **kwargs)``, first with a stack of
    :data:`FIRST_STACK` pixels, then, if sep runs out of it, with ``largest`` (default:
    the image's size)."""
    import sep

    largest = int(data.size if largest is None else largest)
    previous = sep.get_extract_pixstack()
    sizes = [min(FIRST_STACK, largest)]
    if largest > sizes[0]:
        sizes.append(largest)
    try:
        for size in sizes:
            sep.set_extract_pixstack(size)
            try:
                return sep.extract(data, thresh, **kwargs)
            except Exception as err:  # sep raises a bare Exception when the stack is full
                if "pixel buffer full" not in str(err) or size == sizes[-1]:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover
    finally:
        sep.set_extract_pixstack(previous)
