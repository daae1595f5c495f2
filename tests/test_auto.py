"""Issue 13's "one choice, many spellings": the subtract backend ``auto`` as a registered
selector that does not reward an overstated noise image, and one default per setting
(``[subtract] q_floor``, the same-field simulation's ``mode``)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest


def _backend(name: str, *, noise_scale: float, q: float):
    """A subtract backend whose residual is the same scatter of unit sigma, with a noise
    image ``noise_scale`` times the truth, and which reports Q ``q``."""
    from oasis_core.contracts.backends import SubtractBackend
    from oasis_core.contracts.model import Residual

    class Fake(SubtractBackend):
        description = "test backend"

        def subtract(self, science, template, *, options, workdir):
            shape = science.shape
            rng = np.random.default_rng(3)
            data = rng.normal(0.0, 1.0, shape)
            noise = np.full(shape, noise_scale)
            return Residual(data=data, noise=noise, weight=np.ones(shape), q=q)

    Fake.name = name
    return Fake()


@pytest.fixture
def pair():
    from oasis_core.contracts.model import Frame, Template

    rng = np.random.default_rng(0)
    data = rng.normal(100.0, 10.0, (128, 128))
    return Frame(data=data, name="sci"), Template(data=data, name="tpl", inputs=())


def _run(candidates, pair, tmp_path):
    from oasis_core.engine.auto import AutoSubtract, run_auto

    auto = AutoSubtract(candidates=tuple((b.name, b, None) for b in candidates))
    return run_auto(auto, *pair, workdir=tmp_path, settings={"optimize": False, "q_floor": 0})


def test_auto_does_not_reward_an_overstated_noise_image(pair, tmp_path):
    """The issue's case: a plugin whose noise image is 1.5x too large reports Q 0.88, the
    honest one 0.69; auto keeps the honest residual, whichever comes first."""
    honest = _backend("honest", noise_scale=1.0, q=0.69)
    inflated = _backend("inflated", noise_scale=1.5, q=0.88)
    for order in ((honest, inflated), (inflated, honest)):
        res = _run(order, pair, tmp_path)
        assert res.meta["auto_choice"] == "honest" and res.q == pytest.approx(0.69)
        assert "auto_note" not in res.meta
        assert "inflated 0.880 (noise 0.6" in res.meta["auto_tried"]


def test_auto_ranks_all_by_q_and_says_so_when_none_is_honest(pair, tmp_path):
    low = _backend("low", noise_scale=1.5, q=0.7)
    high = _backend("high", noise_scale=0.5, q=0.8)
    res = _run((low, high), pair, tmp_path)
    assert res.meta["auto_choice"] == "high"
    assert "ranked all by Q" in res.meta["auto_note"]


def test_auto_does_not_stop_at_a_dishonest_residual_past_the_ceiling(pair, tmp_path):
    from oasis_core.engine.auto import AutoOptions, AutoSubtract, run_auto

    inflated = _backend("inflated", noise_scale=1.5, q=0.99)
    honest = _backend("honest", noise_scale=1.0, q=0.9)
    auto = AutoSubtract(
        candidates=((inflated.name, inflated, None), (honest.name, honest, None)),
        settings=AutoOptions(ceiling=0.5),
    )
    res = run_auto(auto, *pair, workdir=tmp_path, settings={"optimize": False})
    assert res.meta["auto_choice"] == "honest"


def test_auto_is_a_registered_backend_with_its_options():
    from oasis_core.engine.config import load_config
    from oasis_core.engine.plugins import Registry, make_plugin_manager

    registry = Registry(make_plugin_manager(autoload=False))  # the core's own, always
    assert registry.names("subtract") == ["auto"]
    full = Registry()
    record = full.get("subtract", "auto")
    assert record.dist == "oasis-dia"
    config = load_config(None, full, use_config_file=False, cli={"subtract.auto.ceiling": 0.5})
    assert config.backend_options("subtract", "auto").ceiling == 0.5
    assert not hasattr(config.settings["subtract"], "auto_ceiling")


def test_oasis_plugins_lists_auto():
    out = subprocess.run(
        [sys.executable, "-m", "oasis_apps.cli", "plugins"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rows = [[c.strip() for c in ln.split("│")[1:-1]] for ln in out.splitlines() if "│" in ln]
    assert any(r[:2] == ["subtract", "auto"] for r in rows), out


def test_context_binds_auto_and_hashes_every_candidates_options(tmp_path):
    from oasis_core.engine import pipeline as pl
    from oasis_core.engine.auto import AutoSubtract

    ctx = pl.make_context(tmp_path, use_config_file=False, options={"subtract.backend": "auto"})
    backend = ctx.backend("subtract")
    assert isinstance(backend, AutoSubtract)
    assert "ois" in [n for n, *_ in backend.candidates]
    prov = ctx.provenance("subtract", {})
    assert prov.backend == "auto" and set(prov.options) >= {"auto", "ois"}


def test_the_loop_takes_the_configs_q_floor_when_none_is_given(pair, tmp_path):
    """``q_floor`` has one default, the config's (0.5): a settings mapping without it
    masks a residual of Q 0.3."""
    from oasis_core.engine.config import SubtractSettings
    from oasis_core.engine.subtraction import run_subtraction

    backend = _backend("low", noise_scale=1.0, q=0.3)
    res = run_subtraction(backend, *pair, options=None, workdir=tmp_path, settings={})
    assert res.meta["q_floor"] == SubtractSettings().q_floor == 0.5
    assert not res.meta["usable"] and not (res.weight > 0).any()


def test_oasispy_and_samefield_same_field_defaults_are_one():
    """``sim_sameField`` (OasisPy's API) and ``sim_same_field`` share each parameter's
    default, ``mode`` the documented ``'moffat'`` (docs/python-api.md) included."""
    import inspect

    from oasis_apps.oasispy import sim_sameField
    from oasis_apps.samefield import sim_same_field

    api = inspect.signature(sim_sameField).parameters
    core = inspect.signature(sim_same_field).parameters
    shared = [n for n in api if n in core and api[n].default is not inspect.Parameter.empty]
    assert "mode" in shared and len(shared) >= 12
    for name in shared:
        assert api[name].default == core[name].default, name
    assert core["mode"].default == "moffat"
