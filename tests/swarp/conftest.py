"""Fixtures of the swarp plugin's tests: stand-in ``SWarp`` programs and frames."""

from __future__ import annotations

import stat
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from oasis_core.contracts.model import Frame, Residual, readonly

#: A stand-in for SWarp written in Python: it records its arguments and configuration to
#: ``args.json`` in its working directory, then does what its mode says. ``numpy`` computes
#: the co-add SWarp would (masked median or weighted mean on the ``coadd.head`` grid) and
#: writes ``IMAGEOUT_NAME``/``WEIGHTOUT_NAME``, so every step around the program (inputs,
#: configuration, forced settings, output parsing) is tested without SWarp installed.
STAND_IN = """\
import json, os, sys, time
args = sys.argv[1:]
cut = args.index("-c")
inputs, config = args[:cut], args[cut + 1]
keys = [k.lstrip("-") for k in args[cut + 2 :: 2]]
forced = dict(zip(keys, args[cut + 3 :: 2]))
text = open(config).read() if os.path.exists(config) else None
json.dump({"inputs": inputs, "config": config, "config_text": text, "forced": forced,
           "keys": keys}, open("args.json", "w"))
MODE
"""

MODES = {
    "numpy": """
import numpy as np
from astropy.io import fits
head = fits.Header.fromstring(open(forced["HEADEROUT_NAME"]).read(), sep="\\n")
shape = (head["NAXIS2"], head["NAXIS1"])
data = np.array([fits.getdata(p).astype(np.float64) for p in inputs])
w = np.array([fits.getdata(p).astype(np.float64) for p in forced["WEIGHT_IMAGE"].split(",")])
assert data.shape[1:] == shape, (data.shape, shape)
good = w > 0
if forced["COMBINE_TYPE"] == "MEDIAN":
    out = np.nanmedian(np.where(good, data, np.nan), axis=0)
else:
    out = (w * data).sum(0) / np.where(good.any(0), w.sum(0), 1.0)
out = np.where(good.any(0), out, 0.0)
h = fits.Header({"SOFTVERS": "stand-in"})
fits.PrimaryHDU(out.astype(np.float32), h).writeto(forced["IMAGEOUT_NAME"])
fits.PrimaryHDU(w.sum(0).astype(np.float32)).writeto(forced["WEIGHTOUT_NAME"])
""",
    "fail": """
sys.stderr.write("\\n> WARNING: something harmless\\n\\nFITSIO status = 108\\n"
                 "> *Error*: in_001.fits not found\\n\\n")
sys.exit(2)
""",
    "silent": "sys.exit(0)",
    "sleep": "time.sleep(30)",
    "small": """
import numpy as np
from astropy.io import fits
fits.PrimaryHDU(np.zeros((5, 5), np.float32)).writeto(forced["IMAGEOUT_NAME"])
fits.PrimaryHDU(np.ones((5, 5), np.float32)).writeto(forced["WEIGHTOUT_NAME"])
""",
}


def write_program(path: Path, body: str) -> Path:
    """An executable Python script at ``path`` running ``body``."""
    path.write_text(f"#!{sys.executable}\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


@pytest.fixture
def stand_in(tmp_path):
    """A function of the mode returning the path of a stand-in SWarp (see STAND_IN)."""

    def make(mode: str) -> str:
        directory = tmp_path / f"bin_{mode}"
        directory.mkdir(exist_ok=True)
        body = STAND_IN.replace("MODE", textwrap.dedent(MODES[mode]))
        return str(write_program(directory / "SWarp", body))

    return make


def make_frame(data, weight=None, *, name="f", header=None, noise=None, **kw):
    """A Frame with read-only arrays, as the core hands them out."""
    f = Frame(
        data=np.asarray(data, np.float32),
        weight=None if weight is None else np.asarray(weight, np.float32),
        header=header,
        name=name,
        noise=noise,
        **kw,
    )
    readonly(f.data)
    readonly(f.weight)
    return f


def make_residual(data, noise, weight, name, template="template"):
    """A Residual with read-only arrays."""
    r = Residual(
        data=np.asarray(data, np.float32),
        noise=np.asarray(noise, np.float32),
        weight=np.asarray(weight, np.float32),
        name=name,
        science=name,
        template=template,
    )
    for a in (r.data, r.noise, r.weight):
        readonly(a)
    return r
