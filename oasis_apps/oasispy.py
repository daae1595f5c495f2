"""OasisPy's documented functions, with their names and parameters, as thin calls into OASIS.

OASIS grew out of OasisPy (UCSB Optical SETI). Its scripts call one upper-case function per
step, ``from OasisPy import subtract; subtract.SUBTRACT(path, method='ois')``; here the same
calls work after ``from oasis_apps.oasispy import *``::

    MASK(path)                                   the mask stage
    ALIGN(path, align_method='standard')         mask, psf, then align (OasisPy masked first)
    PSF(path)                                    the psf stage
    COMBINE(path)                                the combine stage (the template)
    SUBTRACT(path, method='ois', use_config_file=True)
    MR(path, method='swarp', sig_thresh=4, gauss_sig=3, gauss_filt=False, use_config_file=True)
    EXTRACT(path, method='both')
    PIPELINE(path)                               every stage
    RUN()                                        the ``oasis run`` menu
    sim_fakes(location, n_fakes, iterations, input_mode='flux', PSF='moffat',
              subtract_method='ois', f_min=0, f_max=40000)
    sim_sameField(location, numIms=100, ..., mode='moffat')
    SIM()                                        the ``oasis sim`` menu
    TEST()                                       the installation self-test
    MOSAIC()                                     a mosaic, from prompts
    GET()                                        frames into a target, from prompts
    INITIALIZE()                                 the OASIS directory tree

**Paths.** As in OasisPy, ``path`` may be a comma-separated list of target directories
(``"a, b"``); each is run in turn and the first failure stops the run. A list or tuple of
paths works too. Spaces around the commas are dropped, but unlike OasisPy a path that
itself contains spaces is kept whole. Each function returns ``{path: result}`` with the
OASIS result of each target (OasisPy returned nothing).

**Methods and the configuration file.** OasisPy's ``use_config_file=True`` read the method
from the target's ``OASIS.config``, ignoring the argument. OASIS reads
``configs/oasis.toml`` with its own precedence (function argument > file > default), and
these functions keep OasisPy's meaning where it matters: *a parameter you pass* is a
function argument and wins over the file; *a parameter left at its default* lets the file
decide (``[subtract] backend``, ``[mr] backend``, ``[extract] method``...), and OASIS's own
defaults equal OasisPy's documented ones. ``use_config_file=False`` ignores the file.

ALIGN's ``align_method='fakes'`` (photometric alignment only, for frames already
registered) runs the native align backend with ``initial = "none"``.

**What OASIS does not honour** is accepted and logged (logger ``oasis``): MR's ``'phose'``
(run as ``'sos'``), the ``sigma_clip`` parameters given to another MR method, and the
``sim_sameField`` parameters the installed same-field simulation does not take. Errors are
:class:`~oasis_core.contracts.errors.OasisError` subclasses with a one-line message; OasisPy printed
and called ``sys.exit``.
"""

from __future__ import annotations

from oasis_apps.oasispy_stages import (
    ALIGN,
    COMBINE,
    EXTRACT,
    MASK,
    MR,
    PIPELINE,
    PSF,
    RUN,
    SUBTRACT,
)
from oasis_apps.oasispy_tools import GET, INITIALIZE, MOSAIC, SIM, TEST, sim_fakes, sim_sameField

__all__ = [
    "ALIGN",
    "COMBINE",
    "EXTRACT",
    "GET",
    "INITIALIZE",
    "MASK",
    "MOSAIC",
    "MR",
    "PIPELINE",
    "PSF",
    "RUN",
    "SIM",
    "SUBTRACT",
    "TEST",
    "sim_fakes",
    "sim_sameField",
]
