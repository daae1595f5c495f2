"""Tests of the native master-residual backend."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from oasis_native.mr import NativeMr, NativeMrOptions

from oasis_core.errors import StageError
from oasis_core.model import Residual, readonly


def residual(data, noise, weight, name, template="tpl"):
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


def run(residuals, **opts):
    return NativeMr().master(residuals, options=NativeMrOptions(**opts), workdir=Path("."))


def hand_residuals():
    # r1: good pixels 1, 3, 5 -> median 3, noise 1 -> Rn1 = [[-2, 0], [2, (masked)]]
    r1 = residual([[1, 3], [5, 7]], [[1, 1], [1, 1]], [[1, 1], [1, 0]], "r1")
    # r2: good pixels 0, 6, 8, 2 -> median 4, noise 2 -> Rn2 = [[-2, 1], [2, -1]]
    r2 = residual([[0, 6], [8, 2]], [[2, 2], [2, 2]], [[1, 0.5], [1, 1]], "r2")
    return r1, r2


def test_hand_computed_weighted_mean_and_noise():
    r1, r2 = hand_residuals()
    mr = run([r1, r2])
    # (0,1): weights 1 and 0.5 -> (1 * 0 + 0.5 * 1) / 1.5; noise sqrt(1 + 0.25) / 1.5
    # (1,1): only r2 (weight 1) -> -1, noise 1
    np.testing.assert_allclose(mr.data, [[-2, 1 / 3], [2, -1]], rtol=1e-6)
    np.testing.assert_allclose(
        mr.noise, [[np.sqrt(2) / 2, np.sqrt(1.25) / 1.5], [np.sqrt(2) / 2, 1]], rtol=1e-6
    )
    np.testing.assert_allclose(mr.weight, [[1, 1], [1, 0.5]])
    assert mr.name == "MR"
    assert mr.template == "tpl"
    assert mr.header["NCOMBINE"] == 2
    assert "r1" in str(mr.header["HISTORY"])
    assert "r2" in str(mr.header["HISTORY"])
    assert mr.meta["n_residuals"] == 2
    for a in (mr.data, mr.noise, mr.weight):
        assert a.dtype == np.float32


def test_adu_mean_without_normalisation():
    r1, r2 = hand_residuals()
    mr = run([r1, r2], normalize=False)
    # (0,0): (1 + 0) / 2, noise sqrt(1 + 4) / 2; (0,1): (3 + 0.5 * 6) / 1.5,
    # noise sqrt(1 + 0.25 * 4) / 1.5; (1,1): r2 only
    np.testing.assert_allclose(mr.data, [[0.5, 4], [6.5, 2]], rtol=1e-6)
    np.testing.assert_allclose(
        mr.noise, [[np.sqrt(5) / 2, np.sqrt(2) / 1.5], [np.sqrt(5) / 2, 2]], rtol=1e-6
    )


def test_pixels_without_data_get_weight_zero():
    w = np.ones((3, 3))
    w[1, 1] = 0
    r1 = residual(np.arange(9.0).reshape(3, 3), np.ones((3, 3)), w, "a")
    r2 = residual(np.arange(9.0).reshape(3, 3), np.ones((3, 3)), w, "b", template="other")
    mr = run([r1, r2])
    assert mr.weight[1, 1] == 0
    assert mr.data[1, 1] == 0
    assert mr.noise[1, 1] == 0
    assert (mr.weight[w > 0] == 1).all()
    assert mr.template == ""  # two different templates


def test_master_is_in_sigma_units():
    rng = np.random.default_rng(11)
    shape = (128, 128)
    residuals = []
    for i, sigma in enumerate((1.0, 3.0, 10.0, 30.0)):
        weight = np.ones(shape)
        weight[:, : 32 * i] = 0.5  # intermediate weights on part of the frame
        weight[i * 10 : i * 10 + 5, :] = 0.0
        data = 7.0 * i + rng.normal(0, sigma, shape)  # offsets are removed by the median
        residuals.append(residual(data, np.full(shape, sigma), weight, f"r{i}"))
    mr = run(residuals)
    z = mr.data / mr.noise
    assert np.mean(z) == pytest.approx(0.0, abs=5 / np.sqrt(z.size))
    assert np.std(z) == pytest.approx(1.0, abs=0.03)
    assert mr.noise[100, 100] == pytest.approx(0.5)  # 4 equal weights: 1/sqrt(4)
    assert mr.weight[2, 100] == pytest.approx(0.75)  # r0 masked there


def test_inputs_not_modified_and_errors():
    r1, r2 = hand_residuals()
    before = r1.data.copy()
    run([r1, r2])
    np.testing.assert_array_equal(r1.data, before)
    with pytest.raises(StageError, match="no residual"):
        run([])
    r3 = residual(np.zeros((3, 2)), np.ones((3, 2)), np.ones((3, 2)), "odd")
    with pytest.raises(StageError, match="'odd'"):
        run([r1, r3])
