"""Gradient-boosting objectives (losscc/boosting.py) trained by XGBoost and LightGBM.

References: the libraries' own built-in objectives (reg:squarederror, binary:logistic,
LightGBM's regression), started from the same margin; for a loss they lack (log cosh), the
first tree's leaf values against -eta * sum(g) / (sum(h) + lambda) with g = tanh(pred -
label) and h = 1 - g^2 computed by numpy.
"""

from __future__ import annotations

import copy
import inspect

import numpy as np
import pytest

xgb = pytest.importorskip("xgboost")
lgb = pytest.importorskip("lightgbm")


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(400, 5))
    y = 2 * X[:, 0] + np.sin(3 * X[:, 1]) + 0.1 * rng.normal(size=400)
    w = rng.uniform(0.5, 2.0, size=400)
    return X, y, w


XGB = {"tree_method": "hist", "max_depth": 3, "eta": 0.3, "base_score": 0.0, "nthread": 1}


def test_xgboost_l2_matches_reg_squarederror(losses, data):
    X, y, w = data
    d = xgb.DMatrix(X, label=y, weight=w)
    builtin = xgb.train({**XGB, "objective": "reg:squarederror"}, d, 20)
    ours = xgb.train(XGB, d, 20, obj=losses.L2Loss(reduction="mean").xgboost_objective().obj)
    np.testing.assert_allclose(ours.predict(d, output_margin=True), builtin.predict(d, output_margin=True),
                               rtol=0, atol=1e-5)


def test_xgboost_sigmoid_bce_matches_binary_logistic(losses, data):
    X, y, _ = data
    d = xgb.DMatrix(X, label=(y > 0).astype(float))
    # base_score is a probability for binary:logistic (0.5: margin 0), the margin for ours
    builtin = xgb.train({**XGB, "objective": "binary:logistic", "base_score": 0.5}, d, 20)
    ours = xgb.train(XGB, d, 20, obj=losses.SigmoidBCELoss().xgboost_objective().obj)
    np.testing.assert_allclose(ours.predict(d, output_margin=True), builtin.predict(d, output_margin=True),
                               rtol=0, atol=1e-5)


def test_xgboost_sklearn_interface_with_weights(losses, data):
    X, y, w = data
    obj = losses.L2Loss().xgboost_objective()
    assert list(inspect.signature(obj).parameters) == ["y_true", "y_pred", "sample_weight"]
    kw = {"n_estimators": 20, "max_depth": 3, "learning_rate": 0.3, "base_score": 0.0, "tree_method": "hist",
          "n_jobs": 1}
    builtin = xgb.XGBRegressor(**kw).fit(X, y, sample_weight=w)
    ours = xgb.XGBRegressor(objective=obj, **kw).fit(X, y, sample_weight=w)
    np.testing.assert_allclose(ours.predict(X, output_margin=True), builtin.predict(X, output_margin=True),
                               rtol=0, atol=1e-5)


def test_xgboost_log_cosh_first_tree_is_newtons_step(losses, data):
    """A loss XGBoost lacks: after one round from margin 0, each leaf holds
    -eta * G / (H + lambda) over its samples (lambda = 1), G and H by numpy."""
    X, y, _ = data
    d = xgb.DMatrix(X, label=y)
    booster = xgb.train({**XGB, "max_depth": 2}, d, 1, obj=losses.LogCoshLoss().xgboost_objective().obj)
    leaf = booster.predict(d, pred_leaf=True).ravel()
    margin = booster.predict(d, output_margin=True)
    g = np.tanh(0.0 - y)
    h = 1 - g * g
    for k in np.unique(leaf):
        at = leaf == k
        want = -0.3 * g[at].sum() / (h[at].sum() + 1.0)
        np.testing.assert_allclose(margin[at], want, rtol=2e-6, atol=1e-7)
    many = xgb.train(XGB, d, 50, obj=losses.LogCoshLoss().xgboost_objective().obj)
    fit = np.mean(np.log(np.cosh(many.predict(d, output_margin=True) - y)))
    assert fit < 0.1 * np.mean(np.log(np.cosh(y)))  # it learns (0.10 against 1.14 measured)


def test_lightgbm_l2_matches_regression(losses, data):
    X, y, w = data
    params = {"num_leaves": 7, "learning_rate": 0.3, "verbose": -1, "boost_from_average": False,
              "num_threads": 1, "deterministic": True}

    def dataset():
        return lgb.Dataset(X, label=y, weight=w, params={"verbose": -1})

    builtin = lgb.train({**params, "objective": "regression"}, dataset(), 20)
    ours = lgb.train({**params, "objective": losses.L2Loss().lightgbm_objective().obj}, dataset(), 20)
    np.testing.assert_allclose(ours.predict(X, raw_score=True), builtin.predict(X), rtol=0, atol=1e-7)
    obj = losses.L2Loss().lightgbm_objective()
    assert list(inspect.signature(obj).parameters) == ["y_true", "y_pred", "weight"]  # its dispatch
    kw = {"n_estimators": 20, "num_leaves": 7, "learning_rate": 0.3, "verbose": -1, "boost_from_average": False,
          "n_jobs": 1}
    sk_builtin = lgb.LGBMRegressor(**kw).fit(X, y, sample_weight=w)
    sk_ours = lgb.LGBMRegressor(objective=obj, **kw).fit(X, y, sample_weight=w)
    np.testing.assert_allclose(sk_ours.predict(X, raw_score=True), sk_builtin.predict(X), rtol=0, atol=1e-7)


def test_objectives_are_per_sample_and_copyable(losses):
    """Whatever the loss's reduction, a booster gets each sample's own derivatives (times
    the loss's weight and the sample weights); a loss copies as its configuration."""
    pred = np.array([0.5, -1.0, 2.0])
    label = np.array([0.0, 1.0, 1.0])
    w = np.array([1.0, 2.0, 3.0])
    g, h = losses.HuberLoss(rho=1.0, weight=2.0, reduction="mean").xgboost_objective()(label, pred, sample_weight=w)
    # by hand: huber (rho 1) gradient clip(pred - label, -1, 1); second derivative 1 on the
    # quadratic side, which holds |e| = rho (Gluon's where(|e| > rho, linear, quadratic))
    np.testing.assert_array_equal(g, 2.0 * w * np.clip(pred - label, -1, 1))
    np.testing.assert_array_equal(h, 2.0 * w * (np.abs(pred - label) <= 1))
    loss = losses.SoftmaxCrossEntropyLoss(label_smoothing=0.1, reduction="mean")
    twin = copy.deepcopy(loss)
    assert repr(twin) == repr(loss) and twin is not loss
    with pytest.raises(TypeError, match="boosting objectives are for elementwise losses"):
        loss.xgboost_objective()


def test_readme_example(losses):
    """The README's gradient-boosting block, verbatim: both forms learn y."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"### Gradient boosting\n.*?```python\n(.*?)```", readme, re.S).group(1)
    ns = {"gloss": losses}
    exec(block, ns)
    X, y = ns["X"], ns["y"]
    by_train = ns["booster"].predict(ns["dtrain"], output_margin=True)
    by_sklearn = ns["model"].predict(X, output_margin=True)
    base = np.mean(np.log(np.cosh(y)))  # the loss at margin 0
    assert np.mean(np.log(np.cosh(by_train - y))) < 0.2 * base
    assert np.mean(np.log(np.cosh(by_sklearn - y))) < 0.2 * base
