"""Losses with several differentiable inputs and optional inputs, built from specs written here."""

from __future__ import annotations

import numpy as np
import pytest

import losscc
from losscc.build import build

SPEC = """\
name: weighted_gap
summary: A loss differentiable in both arrays, with an optional scale input.
reference: a test spec
inputs:
  pred: {}
  target: {differentiable: true}
  scale: {default: 2.0}
params:
  power: {default: 3.0, min: 1}
loss: scale * abs(pred - target)**power / power + sigmoid(target)
"""


@pytest.fixture(scope="module")
def gap(tmp_path_factory):
    d = tmp_path_factory.mktemp("multi")
    (d / "weighted_gap.yaml").write_text(SPEC)
    report = build([d / "weighted_gap.yaml"], out=d / "out", name="multi", log=lambda *a: None)
    return losscc.load(report.path).weighted_gap


def _ref(p, t, s, power):
    """numpy by hand: d/dp = s |p-t|^(power-1) sign(p-t); d/dt = -that + sigmoid'(t)."""
    e = p - t
    sig = 1 / (1 + np.exp(-t))
    value = s * np.abs(e) ** power / power + sig
    dp = s * np.abs(e) ** (power - 1) * np.sign(e)
    return value, dp, -dp + sig * (1 - sig)


def test_gradients_of_both_inputs_in_input_order(gap):
    rng = np.random.default_rng(1)
    p, t = rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
    value, (gp, gt) = gap(power=2.5).value_and_grad(p, t)
    v, dp, dt = _ref(p, t, 2.0, 2.5)
    np.testing.assert_allclose(value, v.mean(axis=1), rtol=1e-14)
    np.testing.assert_allclose(gp, dp / 3, rtol=1e-13)
    np.testing.assert_allclose(gt, dt / 3, rtol=1e-13)
    g2 = gap(power=2.5).grad(p, t)
    assert isinstance(g2, tuple) and len(g2) == 2
    grad, hess = gap(power=2.5).grad_hess(p, t)  # second derivative w.r.t. pred only
    np.testing.assert_array_equal(grad, gp)
    np.testing.assert_allclose(hess, 2.0 * 1.5 * np.abs(p - t) ** 0.5 / 3, rtol=1e-13)


def test_gradient_of_a_broadcast_input_is_summed_back_to_its_shape(gap):
    # target of shape (4, 1) is broadcast over 3 features: its gradient sums over them,
    # as autograd's sum_to_size would.
    rng = np.random.default_rng(2)
    p, t = rng.normal(size=(4, 3)), rng.normal(size=(4, 1))
    _, (gp, gt) = gap().value_and_grad(p, t)
    _, dp, dt = _ref(p, np.broadcast_to(t, p.shape), 2.0, 3.0)
    assert gt.shape == (4, 1)
    np.testing.assert_allclose(gt, (dt / 3).sum(axis=1, keepdims=True), rtol=1e-13)


def test_optional_input_default_and_given(gap):
    p, t = np.array([1.0, -1.0]), np.array([0.0, 0.0])
    np.testing.assert_allclose(gap()(p, t), 2.0 / 3 + 0.5, rtol=1e-15)          # default scale 2
    np.testing.assert_allclose(gap()(p, t, scale=np.array([3.0, 6.0])), [1.5, 2.5], rtol=1e-15)
    with pytest.raises(ValueError, match="power must be >= 1, got 0.5"):
        gap(power=0.5)
    with pytest.raises(TypeError, match=r"grad_out must be a tuple of 2 arrays"):
        gap().grad(p, t, grad_out=np.empty(2))


def test_spec_names_never_collide_with_generated_c_names(tmp_path):
    # Inputs and params named like the kernel's own variables and arguments.
    spec = """\
name: clash
summary: Names that a naive template would reuse.
reference: a test spec
inputs:
  hout: {}
  sw: {}
  vout: {default: 1.0}
  total: {default: 2.0}
params:
  b: {default: 1.0}
  nf: {default: 3.0}
loss: (hout - sw)**2 * vout + b * nf + total
"""
    (tmp_path / "clash.yaml").write_text(spec)
    report = build([tmp_path / "clash.yaml"], out=tmp_path / "out", name="clash", log=lambda *a: None)
    loss = losscc.load(report.path).clash()
    v, g = loss.value_and_grad(np.array([3.0]), np.array([1.0]))
    assert v[0] == 4.0 + 3.0 + 2.0 and g[0] == 4.0  # by hand: (3-1)^2 + 1*3 + 2, 2*(3-1)
