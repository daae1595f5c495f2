"""The core's subtraction rules: the optimisation loop, the Q floor, subtract-pair."""

from __future__ import annotations

import logging

import attrs
import numpy as np
import pytest
from astropy.io import fits

from oasis_core.backends import SubtractBackend, option
from oasis_core.errors import StageError
from oasis_core.model import Frame, Residual, Template
from oasis_core.subtraction import run_subtraction


@attrs.frozen(kw_only=True)
class ScriptedOptions:
    step: int = option(0, "which scripted configuration this is")


class Scripted(SubtractBackend):
    """Returns a residual whose Q is scripted per configuration."""

    name = "scripted"
    Options = ScriptedOptions

    def __init__(self, qs):
        self.qs = qs
        self.asked = 0
        self.ran = []

    def candidates(self, science, template, *, options):
        for step in range(len(self.qs)):
            self.asked += 1
            yield attrs.evolve(options, step=step)

    def subtract(self, science, template, *, options, workdir):
        self.ran.append(options.step)
        q = self.qs[options.step]
        if q is None:
            raise StageError(f"{science.name}: configuration {options.step} failed")
        shape = science.data.shape
        return Residual(
            data=np.zeros(shape),
            noise=np.ones(shape),
            weight=np.ones(shape),
            q=q,
            meta={"config": f"step {options.step}"},
        )


@pytest.fixture
def pair():
    data = np.zeros((32, 32), np.float32)
    return Frame(data=data, name="sci"), Template(data=data, name="tpl")


SETTINGS = {"optimize": True, "max_tries": 9, "q_ceiling": 0.75, "q_floor": 0.5}


def test_stops_at_the_first_good_configuration_and_asks_lazily(pair, tmp_path):
    backend = Scripted([0.4, 0.6, 0.8, 0.95])
    res = run_subtraction(
        backend, *pair, options=ScriptedOptions(), workdir=tmp_path, settings=SETTINGS
    )
    assert backend.ran == [0, 1, 2]
    assert backend.asked == 3  # the fourth configuration was never even proposed
    assert res.q == 0.8
    assert res.meta["choice"] == 3 and res.meta["tries"] == 3
    assert res.meta["config"] == "step 2" and res.params["step"] == 2
    assert res.meta["flag"] == "" and res.weight.all()


def test_keeps_the_best_when_none_reaches_the_ceiling(pair, tmp_path):
    backend = Scripted([0.55, 0.7, None, 0.6])
    res = run_subtraction(
        backend, *pair, options=ScriptedOptions(), workdir=tmp_path, settings=SETTINGS
    )
    assert backend.ran == [0, 1, 2, 3]
    assert res.q == 0.7 and res.meta["choice"] == 2 and res.meta["tries"] == 4


def test_below_the_floor_is_masked_flagged_and_logged(pair, tmp_path, caplog):
    backend = Scripted([0.2, 0.3])
    with caplog.at_level(logging.WARNING, logger="oasis"):
        res = run_subtraction(
            backend, *pair, options=ScriptedOptions(), workdir=tmp_path, settings=SETTINGS
        )
    assert res.q == 0.3
    assert not res.weight.any()
    assert "below the floor 0.5" in res.meta["flag"]
    assert any("sci: Q 0.300 below the floor" in r.getMessage() for r in caplog.records)


def test_max_tries_and_optimize_off(pair, tmp_path):
    backend = Scripted([0.1, 0.2, 0.3, 0.4])
    run_subtraction(
        backend,
        *pair,
        options=ScriptedOptions(),
        workdir=tmp_path,
        settings={**SETTINGS, "max_tries": 2},
    )
    assert backend.ran == [0, 1]
    backend = Scripted([None, 0.9])
    with pytest.raises(StageError, match="configuration 0 failed"):
        run_subtraction(
            backend,
            *pair,
            options=ScriptedOptions(),
            workdir=tmp_path,
            settings={**SETTINGS, "optimize": False},
        )


def test_every_configuration_failing_is_one_error(pair, tmp_path):
    with pytest.raises(StageError, match="every configuration failed"):
        run_subtraction(
            Scripted([None, None]),
            *pair,
            options=ScriptedOptions(),
            workdir=tmp_path,
            settings=SETTINGS,
        )


def test_subtract_pair_cli(tmp_path, capsys):
    from oasis_native.sim import simulate_pair

    from oasis_core.cli import main

    (sci, sh), (tpl, th), truth = simulate_pair((256, 256), seed=4, transients=2)
    fits.PrimaryHDU(sci, sh).writeto(tmp_path / "sci.fits")
    fits.PrimaryHDU(tpl, th).writeto(tmp_path / "tpl.fits")
    out, noise = tmp_path / "diff.fits", tmp_path / "noise.fits"
    code = main(
        [
            "subtract-pair",
            str(tmp_path / "sci.fits"),
            str(tmp_path / "tpl.fits"),
            str(out),
            "--noise",
            str(noise),
            "-o",
            "deg_spatial=1",
        ]
    )
    assert code == 0
    assert f"{out}: Q " in capsys.readouterr().out
    header = fits.getheader(out)
    assert header["OASBACK"] == "ois" and header["OAS PAR_DEG_SPATIAL"] == 1
    assert header["OASQ"] > 0.75
    np.testing.assert_array_equal(fits.getdata(noise), fits.getdata(out, "NOISE"))
    # the brightest transient is in the residual, in the science frame's flux scale
    row = truth[np.argmax(truth["flux"])]
    x, y = round(float(row["x"])), round(float(row["y"]))
    assert fits.getdata(out)[y - 1 : y + 2, x - 1 : x + 2].sum() > 0
    # frames of different shapes are refused with one line naming the template
    fits.PrimaryHDU(tpl[:200]).writeto(tmp_path / "small.fits")
    code = main(
        [
            "subtract-pair",
            str(tmp_path / "sci.fits"),
            str(tmp_path / "small.fits"),
            str(tmp_path / "x.fits"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 1 and "small.fits: shape (200, 256) differs" in err
