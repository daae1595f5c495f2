"""For plugin authors: a simulated pair with known answers and a contract check.

Three tools, all usable from a plugin's own tests (``pytest``) and behind
``oasis plugins --check NAME``:

* :func:`synthetic_pair`: an aligned science/template pair simulated in memory with numpy
  (Gaussian stars, a flat sky, Poisson and read noise, transients in the science frame
  only), whose every answer is known: positions and fluxes of the transients, the noise
  of each frame, the noise a perfect residual has, and the frames' PSFs;
* :func:`check_backend`: runs one backend of any stage on such simulated input and checks
  the stage contract (:mod:`oasis_core.contracts.backends`): read-only inputs left unchanged,
  output types and shapes, weights in [0, 1], noise finite and > 0, Q finite in [0, 1],
  the backend's name and options, and that its ``meta``/``params`` make valid FITS header
  cards (the output is written with the core's own writer). It returns a
  :class:`CheckReport` (Q and the normalised noise for residuals) or raises one
  :class:`ContractError` listing every breach;
* :func:`plugin_registry` and :func:`register_plugin`: a registry with a plugin object
  registered explicitly (a test's or a notebook's), which tolerates the same plugin being
  installed too: the explicit object replaces the installed copy instead of failing.

The simulator is a small numpy one of its own (the core imports no plugin); it is meant
to be fast (a 160x160 pair in a few milliseconds) rather than realistic.

Examples
--------
>>> pair = synthetic_pair(seed=1)
>>> pair.science.shape == pair.template.shape, len(pair.truth)
(True, 2)
"""

from oasis_core.testing.contract import CheckReport, ContractError, check_backend
from oasis_core.testing.registry import plugin_registry, register_plugin
from oasis_core.testing.synthetic import SyntheticPair, readonly_frame, synthetic_pair

__all__ = [
    "CheckReport",
    "ContractError",
    "SyntheticPair",
    "check_backend",
    "plugin_registry",
    "readonly_frame",
    "register_plugin",
    "synthetic_pair",
]
