"""The README's quickstart and the Gluon tutorial's code, run for real."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT


def test_quickstart_runs_as_the_readme_shows():
    # The README's main command, then the quickstart script, both in the repository root.
    subprocess.run([sys.executable, "-m", "losscc.cli", "build", "specs/"], cwd=ROOT, check=True,
                   capture_output=True)
    run = subprocess.run([sys.executable, "examples/quickstart.py"], cwd=ROOT, check=True,
                         capture_output=True, text=True)
    lines = run.stdout.splitlines()
    # Expected numbers by hand: 0.5 * (1 - 2)**2 = 0.5; weights [1, 2] -> [0.5, 1.0];
    # gradient x - y = -1; Huber(rho=0.5): 0.5/0.5*0.2**2 = 0.04 and |3 - 1| - 0.25 = 1.75.
    assert lines[0] == "[0.5 0.5]"
    assert lines[1] == "[0.5 1. ]"
    assert lines[2] == "[0.5 0.5] [-1. -1.]"
    assert abs(float(lines[3]) - 0.895) < 1e-12


def test_import_by_name_with_build_on_sys_path(built):
    code = "import losses_under_test as L, numpy as np; print(L.L2Loss()(np.ones(2), np.ones(2) * 2))"
    run = subprocess.run([sys.executable, "-c", code], cwd=built.parent, check=True,
                         capture_output=True, text=True)
    assert run.stdout.strip() == "[0.5 0.5]"


def test_tutorial_basic_usage(losses):
    # The tutorial's "Basic Usages": L2Loss of ones against twos, then with weights [1, 2].
    loss = losses.L2Loss()
    x, y = np.ones((2,)), np.ones((2,)) * 2
    np.testing.assert_array_equal(loss(x, y), 0.5 * (x - y) ** 2)
    np.testing.assert_array_equal(loss(x, y, np.array([1, 2])), [0.5, 1.0])


def test_tutorial_dense_layer_gradient(losses):
    # The tutorial's net = nn.Dense(1) on X of shape (2, 4), l = loss(net(X), y), l.backward():
    # the weight gradient is the chain rule through value_and_grad, checked here against the
    # closed form d/dW sum_i 0.5 (x_i.W + b - y_i)^2 = sum_i (x_i.W + b - y_i) x_i.
    rng = np.random.default_rng(0)
    X = rng.uniform(size=(2, 4))
    W, b = rng.normal(size=(4, 1)), np.zeros(1)
    y = np.ones(2) * 2
    out = X @ W + b  # shape (2, 1), like Gluon's Dense(1)
    loss = losses.L2Loss()
    value, dout = loss.value_and_grad(out, y)  # the label (2,) is reshaped like out (2, 1)
    assert value.shape == (2,)
    weight_grad = X.T @ dout
    residual = (X @ W + b).ravel() - y
    np.testing.assert_allclose(value, 0.5 * residual**2, rtol=1e-15)
    np.testing.assert_allclose(weight_grad.ravel(), X.T @ residual, rtol=1e-14)
    np.testing.assert_allclose(dout.sum(axis=0), residual.sum(), rtol=1e-14)  # bias gradient


def test_readme_spec_example_builds_and_is_right(tmp_path):
    # The "Adding a loss" spec, taken verbatim from the README.
    import re

    import losscc
    from losscc.build import build

    readme = (ROOT / "README.md").read_text()
    spec = re.search(r"```yaml\n(name: quantile.*?)```", readme, re.S).group(1)
    (tmp_path / "quantile.yaml").write_text(spec)
    report = build([tmp_path / "quantile.yaml"], out=tmp_path / "out", log=lambda *a: None)
    mod = losscc.load(report.path)
    p = np.array([-800.0, -3.0, 0.0, 0.5, 2.0, 900.0])
    y = np.array([0.0, 1.0, 0.0, -1.0, 2.5, 0.0])
    v, g = mod.QuantileLoss(tau=0.9).value_and_grad(p, y)
    # numpy reference by hand: tau * e above the prediction, (tau - 1) * e below, e = y - p;
    # the gradient -tau or 1 - tau, and 0 at the kink (p == y)
    e = y - p
    np.testing.assert_allclose(v, np.maximum(0.9 * e, -0.1 * e), rtol=1e-15)
    np.testing.assert_allclose(g, np.where(e > 0, -0.9, np.where(e < 0, 0.1, 0.0)), rtol=1e-15)
    for ex in mod.QuantileLoss._meta["examples"]:
        val, grad = mod.QuantileLoss(**ex["options"]).value_and_grad(
            np.array([ex["inputs"]["pred"]]), np.array([ex["inputs"]["label"]]))
        assert abs(val[0] - ex["loss"]) <= 1e-15 and abs(grad[0] - ex["grad"]) <= 1e-15


def test_tutorial_softmax_cross_entropy(losses):
    # The tutorial's SoftmaxCrossEntropyLoss on [[1, 10], [8, 2]], labels [0, 1], in float32
    # (MXNet's nd.array default) and float64. By mpmath: logsumexp(1, 10) - 1 =
    # 9.0001234021897233, logsumexp(8, 2) - 2 = 6.0024756851377304.
    loss = losses.SoftmaxCrossEntropyLoss()
    for dtype in (np.float32, np.float64):
        x = np.array([[1, 10], [8, 2]], dtype=dtype)
        value, grad = loss.value_and_grad(x, np.array([0, 1]))
        np.testing.assert_allclose(value, [9.0001234021897233, 6.0024756851377304],
                                   rtol=2 * np.finfo(dtype).eps)
        # the gradient is softmax - onehot, its rows sum to 0
        softmax = np.exp(x - x.max(1, keepdims=True))
        softmax /= softmax.sum(1, keepdims=True)
        np.testing.assert_allclose(grad, softmax - np.eye(2), rtol=4 * np.finfo(dtype).eps)
        # logits of 1e4: finite, and exactly 9e4 and 6e4 (the other class is e^-9e4 away)
        np.testing.assert_allclose(loss(x * 10000, np.array([0, 1])), [90000, 60000], rtol=0)


def test_the_scale_out_example_runs_as_the_readme_shows():
    """README "Scaling out": examples/scale_out.py on two local worker processes. Expected
    mean: E[logsumexp(z) - z_y] for z of 10 iid N(0, 1) and a uniform label y is
    2.7277 +- 0.0007 (a numpy Monte Carlo over 2e6 draws, scipy's logsumexp, seed 123); the
    example's mean over 4e6 samples has a standard deviation of 0.0005, so 0.005 is 6 sigma
    of both. The gradient's rows are softmax - one-hot: they sum to 0 up to rounding."""
    pytest.importorskip("dask.distributed")
    subprocess.run([sys.executable, "-m", "losscc.cli", "build", "specs/"], cwd=ROOT, check=True,
                   capture_output=True)
    run = subprocess.run([sys.executable, "examples/scale_out.py"], cwd=ROOT, check=True,
                         capture_output=True, text=True, timeout=300)
    lines = run.stdout.splitlines()
    assert abs(float(lines[0]) - 2.7277) < 0.005, lines
    shapes, biggest = lines[1].rsplit(" ", 1)
    assert shapes == "(4000000,) (4000000, 10)" and float(biggest) < 1e-14, lines
