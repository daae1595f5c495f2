"""The plugin author's kit (oasis_core.testing): the simulated pair's known answers, the
contract check on real and on broken backends, registration that tolerates an installed
copy of the same plugin."""

from __future__ import annotations

import numpy as np
import pytest

from oasis_core.contracts.backends import SubtractBackend
from oasis_core.contracts.hookspecs import hookimpl
from oasis_core.engine.plugins import Registry, make_plugin_manager
from oasis_core.testing import ContractError, check_backend, plugin_registry, synthetic_pair


@pytest.fixture(scope="module")
def pair():
    return synthetic_pair(seed=2)


def test_synthetic_pair_has_the_answers_it_claims(pair):
    sci, tpl = pair.science, pair.template
    assert sci.shape == tpl.shape == (160, 160)
    # a same-PSF pair: its difference is pure noise of the claimed sigma away from stars
    same = synthetic_pair(seed=2, fwhm_science=2.6, fwhm_template=2.6, transients=())
    diff = same.science.data - same.template.data
    sigma = np.sqrt(same.variance_science + same.variance_template)
    z = diff / sigma
    n = z.size
    assert abs(z.mean()) < 5 / np.sqrt(n)
    assert 0.95 < z.std() < 1.05
    sky = np.median(np.sqrt(same.variance_science + same.variance_template))
    assert sky == pytest.approx(same.residual_sigma, rel=0.02)
    # the transients are where the truth says, in the science frame only
    for row in pair.truth:
        x, y = round(row["x"]), round(row["y"])
        stamp = (sci.data - tpl.data)[y - 2 : y + 3, x - 2 : x + 3]
        assert stamp.max() > 5 * pair.residual_sigma
    assert sci.background == tpl.background == 400.0
    assert tpl.gain == pytest.approx(4 * sci.gain) and tpl.inputs == tuple(
        f"exposure_{i}" for i in range(4)
    )
    shared = synthetic_pair(seed=2, science_in_template=True)
    assert "science" in shared.template.inputs
    assert shared.residual_sigma < pair.residual_sigma


@pytest.mark.parametrize("name", ["ois", "zogy"])
def test_check_backend_passes_builtin_subtract_backends_with_honest_figures(pair, name):
    backend = Registry().get("subtract", name).backend
    report = check_backend(backend, "subtract", pair=pair)
    assert report.q > 0.9
    assert 0.85 < report.normalized_noise < 1.15
    assert report.line().startswith(f"subtract {name}: Q 0.9")
    # inputs were handed out read-only and left as they were
    assert isinstance(report.output.q, float)


def test_check_backend_passes_every_stage_of_the_native_plugin(pair):
    registry = Registry()
    for stage in ("mask", "psf", "align", "combine", "mr", "extract"):
        report = check_backend(registry.get(stage, "native").backend, pair=pair)
        assert report.stage == stage
    assert report.figures["detections"] >= 1  # the extract backend found the transients


def _subtract(**behaviour):
    """A subtract backend whose faults are chosen by the test."""

    class Bad(SubtractBackend):
        name = behaviour.get("name", "bad")

        def subtract(self, science, template, *, options, workdir):
            from oasis_core.contracts.model import Residual

            data = np.asarray(science.data) - np.asarray(template.data)
            if behaviour.get("in_place"):
                science.data[0, 0] = 0.0
            noise = np.full(data.shape, 20.0)
            if behaviour.get("zero_noise"):
                noise[5, 5] = 0.0
            if behaviour.get("shape"):
                data, noise = data[1:], noise[1:]
            return Residual(
                data=data,
                noise=noise,
                weight=np.ones(data.shape),
                q=behaviour.get("q", 0.9),
                meta=behaviour.get("meta", {}),
            )

    return Bad()


def test_check_backend_names_each_breach(pair):
    with pytest.raises(ContractError, match=r"edits its input in place \(assignment"):
        check_backend(_subtract(in_place=True), pair=pair)
    with pytest.raises(ContractError, match=r"returned shape \(159, 160\), expected \(160, 160\)"):
        check_backend(_subtract(shape=True), pair=pair)
    with pytest.raises(ContractError) as info:
        check_backend(
            _subtract(q=float("nan"), zero_noise=True, meta={"stamps": [1, 2]}, name="Bad"),
            pair=pair,
        )
    message = str(info.value)
    assert "\n" not in message and message.startswith("subtract backend 'Bad': ")
    for breach in (
        "name 'Bad' must match",
        "noise not finite and > 0",
        "Q = nan: must be finite in [0, 1]; compute it with oasis_core.engine.quality.q_value",
        "meta['stamps'] is a list: only bool, int, float and str become header cards",
    ):
        assert breach in message
    assert isinstance(info.value, AssertionError)  # a plugin's test fails on it


class Copy:
    """A second object providing the installed 'ois' backend (a plugin's dev copy)."""

    @hookimpl
    def oasis_subtract_backends(self):
        from oasis_ois.backend import OisSubtract

        yield OisSubtract()


def test_registering_an_installed_plugin_again_is_tolerated():
    import oasis_ois.plugin

    # the README's recipe, when the plugin is also installed (it was a ValueError)
    pm = make_plugin_manager()
    assert pm.register(oasis_ois.plugin, name="ois") == "ois"
    assert pm.register(oasis_ois.plugin, name="other") == "ois"
    registry = Registry(pm)
    assert registry.get("subtract", "ois").plugin == "ois" and not registry.duplicates
    # another object under the installed plugin's name replaces the installed copy
    pm = make_plugin_manager()
    copy = Copy()
    pm.register(copy, name="ois")
    assert pm.get_plugin("ois") is copy
    assert Registry(pm).get("subtract", "ois").dist == "oasis-ois"
    # the helper: under any name, the installed provider of the same backend gives way
    registry = plugin_registry(("dev-ois", Copy()))
    record = registry.get("subtract", "ois")
    assert record.plugin == "dev-ois" and not registry.duplicates
    assert registry.names("subtract") == Registry().names("subtract")
