"""Extreme inputs, both dtypes: huge logits (+-1e4, +-1e30), +-inf, NaN, empty arrays, and
the probability / rate losses at the edges of their domains (p = 0 and 1, rate 0).

Expected values are the mathematical limits, rounded to the dtype; each says where it comes
from. A case where losscc returns something else is a finding: it is marked
xfail(strict=True) with the reason, so the suite stays green while the bug exists and turns
red (XPASS) the day it is fixed, and the test itself is not weakened.
"""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest

from test_losses import CASE_PARAMS, DTYPES, EPS, REDUCTIONS, rng_for

TINY = {np.float64: float(np.finfo(np.float64).tiny), np.float32: float(np.finfo(np.float32).tiny)}
INF, NAN = np.inf, np.nan


def build(losses, cls_name, kwargs, **extra):
    return getattr(losses, cls_name)(**kwargs, **extra)


def assert_limit(actual, expected, dtype, what):
    """Exact for inf, 0 and signs; relative 4 eps of the dtype otherwise (the inputs are
    exactly representable or rounded once). An expected 0 means a true value below the
    dtype's smallest normal number (e.g. e^-1e4 ~ 1e-4343), so |actual| <= tiny."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, what
    assert not np.any(np.isnan(actual)), f"{what}: NaN in {actual} (expected {expected})"
    inf = np.isinf(expected)
    np.testing.assert_array_equal(actual[inf], expected[inf], err_msg=what)
    np.testing.assert_allclose(actual[~inf], expected[~inf], rtol=4 * EPS[dtype],
                               atol=TINY[dtype], err_msg=what)


# --------------------------------------------------------------------------- logits at +-1e4, +-1e30

# (id, class, constructor kwargs, label for z = 1, label for z = 0, pos_weight w or None)
LOGIT_LOSSES = [
    pytest.param("SigmoidBCELoss", {}, 1.0, 0.0, None, id="bce"),
    pytest.param("SigmoidBCELoss", {}, 1.0, 0.0, 3.0, id="bce_pos_weight3"),
    pytest.param("LogisticLoss", {"label_format": "binary"}, 1.0, 0.0, None, id="logistic_binary"),
    pytest.param("LogisticLoss", {"label_format": "signed"}, 1.0, -1.0, None, id="logistic_signed"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("magnitude", [1e4, 1e30])
@pytest.mark.parametrize("cls_name,kwargs,pos,neg,pos_weight", LOGIT_LOSSES)
def test_huge_logits_are_finite_and_exact(losses, cls_name, kwargs, pos, neg, pos_weight,
                                          magnitude, dtype):
    """BCE on logits x with label z, pos_weight w (by hand, from the limits of
    l = (1 - z) softplus(x) + w z softplus(-x)):
      x = +m, z = 1: softplus(-m) = e^-m -> 0,   grad -w sigmoid(-m) -> 0
      x = +m, z = 0: softplus(m) = m + e^-m -> m, grad sigmoid(m) -> 1
      x = -m, z = 1: w softplus(m) -> w m,        grad -w sigmoid(m) -> -w
      x = -m, z = 0: softplus(-m) -> 0,           grad sigmoid(-m) -> 0
    and the second derivative (1 - z + w z) sigmoid(m) sigmoid(-m) ~ e^-m -> 0; e^-1e4 is
    ~1e-4343, below every representable positive number, so the rounded values are exact."""
    m = float(np.asarray(magnitude, dtype=dtype))  # 1e30 rounds in float32
    w = 1.0 if pos_weight is None else pos_weight
    pred = np.array([m, m, -m, -m], dtype=dtype)
    label = np.array([pos, neg, pos, neg])
    extra = {} if pos_weight is None else {"pos_weight": pos_weight}
    loss = build(losses, cls_name, kwargs)
    value, grad = loss.value_and_grad(pred, label, **extra)
    _, hess = loss.grad_hess(pred, label, **extra)
    what = f"{cls_name}{kwargs} +-{magnitude:g} {np.dtype(dtype).name}"
    assert_limit(value, [0.0, m, w * m, 0.0], dtype, what + " value")
    assert_limit(grad, [0.0, 1.0, -w, 0.0], dtype, what + " grad")
    assert_limit(hess, [0.0, 0.0, 0.0, 0.0], dtype, what + " hess")
    if magnitude == 1e4:  # the brief's example: label 1, pred -1e4 -> loss 1e4 (w 1e4), grad -1 (-w)
        assert value[2] == w * 1e4 and grad[2] == -w


# The logit losses are written (1 - z) softplus(x) + z softplus(-x): a confident correct
# prediction (x > 0, z = 1) subtracts nothing, exactly like its mirror image (x < 0, z = 0).

# log1p(e^-x) and sigmoid(-x) at x = 30 and 12, by mpmath (50 digits):
CONFIDENT = {
    np.float64: (30.0, 9.357622968839737e-14, 9.357622968839299e-14),
    np.float32: (12.0, 6.144193477732806e-06, 6.144174602214718e-06),
}
# the tolerances of test_losses.py: 1e-12 in float64, 32 eps32 in float32
CONFIDENT_RTOL = {np.float64: 1e-12, np.float32: 32 * EPS[np.float32]}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quantity", ["value", "grad"])
@pytest.mark.parametrize("side", [
    pytest.param("correct_positive", id="x>0,z=1"),
    pytest.param("correct_negative", id="x<0,z=0"),  # the mirror image: the same true numbers
])
@pytest.mark.parametrize("cls_name,kwargs,pos,neg,pos_weight", LOGIT_LOSSES[:1] + LOGIT_LOSSES[2:])
def test_confident_correct_logits_keep_relative_accuracy(losses, cls_name, kwargs, pos, neg,
                                                         pos_weight, side, quantity, dtype):
    """A confident, correct prediction has a tiny loss softplus(-|x|) = log1p(e^-|x|) and a
    tiny gradient sigmoid(-|x|) (magnitude): both must keep their relative accuracy, as
    they do in the mirror image x < 0, z = 0 (where no subtraction happens)."""
    x, want_value, want_grad_mag = CONFIDENT[dtype]
    if side == "correct_positive":
        pred, label, sign = x, pos, -1.0  # grad = -sigmoid(-x)
    else:
        pred, label, sign = -x, neg, 1.0  # grad = +sigmoid(-x)
    value, grad = build(losses, cls_name, kwargs).value_and_grad(np.array([pred], dtype),
                                                                 np.array([label]))
    got, want = (value, want_value) if quantity == "value" else (grad, sign * want_grad_mag)
    np.testing.assert_allclose(got, [want], rtol=CONFIDENT_RTOL[dtype], atol=0)


# --------------------------------------------------------------------------- +-inf

def _inf_bug(reason):
    return pytest.mark.xfail(strict=True, reason=reason)


# At x = +-inf the kernels evaluate their finite-x formulas in IEEE arithmetic.
#  * BCE / logistic on logits drop a term whose weight is exactly 0 (where(z == 1, 0, ...)),
#    so 0 * inf never happens and the values are the limits (NUMERICS.md: "Logits of +-inf
#    giving NaN in BCE with logits (0*inf): define the limits and test them").
#  * PoissonNLL: exp(x) - t*x at +inf is inf - inf, and 0 - 0*(-inf) at -inf, t = 0; the
#    rate form x - t log(x + eps) at +inf is inf - inf (t > 0) or inf - 0*inf (t = 0). The
#    stabilize rule "dominant-sum" makes both a node whose helper returns the limit there
#    (the faster-growing term; 0 where the slow term's factor t is 0). Gradients are sums
#    that meet no inf - inf.

# (id, class, kwargs, pred, label, limit of the value, limit of the gradient, value bug)
# limits by hand from each loss's formula (tests/reference.py docstrings).
INF_CASES = [
    ("l2+inf", "L2Loss", {}, INF, 1.0, INF, INF, None),            # (x-1)^2/2, x - 1
    ("l2-inf", "L2Loss", {}, -INF, 1.0, INF, -INF, None),
    ("l1+inf", "L1Loss", {}, INF, 1.0, INF, 1.0, None),            # |x-1|, sign
    ("l1-inf", "L1Loss", {}, -INF, 1.0, INF, -1.0, None),
    ("huber+inf", "HuberLoss", {}, INF, 1.0, INF, 1.0, None),      # |e| - rho/2, sign
    ("huber-inf", "HuberLoss", {"rho": 0.5}, -INF, 1.0, INF, -1.0, None),
    ("hinge+inf,y=1", "HingeLoss", {}, INF, 1.0, 0.0, 0.0, None),  # relu(1 - x)
    ("hinge-inf,y=1", "HingeLoss", {}, -INF, 1.0, INF, -1.0, None),
    ("hinge+inf,y=-1", "HingeLoss", {}, INF, -1.0, INF, 1.0, None),
    ("hinge-inf,y=-1", "HingeLoss", {}, -INF, -1.0, 0.0, 0.0, None),
    ("sqhinge+inf,y=1", "SquaredHingeLoss", {}, INF, 1.0, 0.0, 0.0, None),  # relu(1-x)^2
    ("sqhinge-inf,y=1", "SquaredHingeLoss", {}, -INF, 1.0, INF, -INF, None),  # -2 relu(1-x)
    ("bce+inf,z=1", "SigmoidBCELoss", {}, INF, 1.0, 0.0, 0.0, None),   # softplus(-x) -> 0
    ("bce+inf,z=0", "SigmoidBCELoss", {}, INF, 0.0, INF, 1.0, None),   # softplus(x) -> inf
    ("bce-inf,z=1", "SigmoidBCELoss", {}, -INF, 1.0, INF, -1.0, None),
    ("bce-inf,z=0", "SigmoidBCELoss", {}, -INF, 0.0, 0.0, 0.0, None),
    ("logistic_binary+inf,z=1", "LogisticLoss", {"label_format": "binary"}, INF, 1.0, 0.0, 0.0, None),
    ("logistic_binary+inf,z=0", "LogisticLoss", {"label_format": "binary"}, INF, 0.0, INF, 1.0, None),
    ("logistic_binary-inf,z=1", "LogisticLoss", {"label_format": "binary"}, -INF, 1.0, INF, -1.0, None),
    ("logistic_binary-inf,z=0", "LogisticLoss", {"label_format": "binary"}, -INF, 0.0, 0.0, 0.0, None),
    ("logistic_signed+inf,y=1", "LogisticLoss", {"label_format": "signed"}, INF, 1.0, 0.0, 0.0, None),
    ("logistic_signed+inf,y=-1", "LogisticLoss", {"label_format": "signed"}, INF, -1.0, INF, 1.0, None),
    ("logistic_signed-inf,y=1", "LogisticLoss", {"label_format": "signed"}, -INF, 1.0, INF, -1.0, None),
    ("logistic_signed-inf,y=-1", "LogisticLoss", {"label_format": "signed"}, -INF, -1.0, 0.0, 0.0, None),
    ("poisson+inf,t=2", "PoissonNLLLoss", {}, INF, 2.0, INF, INF, None),   # e^x - t x
    ("poisson+inf,t=0", "PoissonNLLLoss", {}, INF, 0.0, INF, INF, None),
    ("poisson-inf,t=2", "PoissonNLLLoss", {}, -INF, 2.0, INF, -2.0, None),        # grad e^x - t
    ("poisson-inf,t=0", "PoissonNLLLoss", {}, -INF, 0.0, 0.0, 0.0, None),
    ("poisson_rate+inf,t=2", "PoissonNLLLoss", {"from_logits": False}, INF, 2.0, INF, 1.0, None),
    ("poisson_rate+inf,t=0", "PoissonNLLLoss", {"from_logits": False}, INF, 0.0, INF, 1.0, None),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cls_name,kwargs,pred,label,limit", [
    pytest.param(c[1], c[2], c[3], c[4], c[5], id=c[0], marks=[_inf_bug(c[7])] if c[7] else [])
    for c in INF_CASES])
def test_infinite_pred_value_is_the_limit(losses, cls_name, kwargs, pred, label, limit, dtype):
    value = build(losses, cls_name, kwargs)(np.array([pred], dtype), np.array([label]))
    assert_limit(value, [limit], dtype, f"{cls_name}{kwargs}({pred}, {label})")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cls_name,kwargs,pred,label,limit", [
    pytest.param(c[1], c[2], c[3], c[4], c[6], id=c[0]) for c in INF_CASES])
def test_infinite_pred_gradient_is_the_limit(losses, cls_name, kwargs, pred, label, limit, dtype):
    grad = build(losses, cls_name, kwargs).grad(np.array([pred], dtype), np.array([label]))
    assert_limit(grad, [limit], dtype, f"{cls_name}{kwargs}({pred}, {label}) grad")


# --------------------------------------------------------------------------- large finite inputs

# (id, class, kwargs, pred, label, value f64, value f32, grad) -- by hand; f32 differs only
# where the true value exceeds FLT_MAX = 3.4028235e38 and IEEE overflow to +inf is correct.
LARGE_CASES = [
    ("l1_1e30", "L1Loss", {}, 1e30, 1.0, 1e30, 1e30, 1.0),                   # |1e30 - 1|
    ("l1_-1e30", "L1Loss", {}, -1e30, 1.0, 1e30, 1e30, -1.0),
    ("l2_1e4", "L2Loss", {}, 1e4, 0.0, 5e7, 5e7, 1e4),                       # 1e8 / 2
    ("l2_1e30", "L2Loss", {}, 1e30, 0.0, 5e59, INF, 1e30),                   # 1e60/2 > FLT_MAX
    ("huber_1e30", "HuberLoss", {}, 1e30, 1.0, 1e30, 1e30, 1.0),             # |e| - 0.5
    ("huber_-1e4", "HuberLoss", {"rho": 2.0}, -1e4, 1.0, 10000.0, 10000.0, -1.0),  # 10001 - 1
    ("hinge_-1e30", "HingeLoss", {}, -1e30, 1.0, 1e30, 1e30, -1.0),          # 1 + 1e30
    ("hinge_1e30", "HingeLoss", {}, 1e30, 1.0, 0.0, 0.0, 0.0),
    ("sqhinge_-1e4", "SquaredHingeLoss", {}, -1e4, 1.0, 100020001.0, 100020001.0, -20002.0),  # 10001^2
    ("sqhinge_-1e30", "SquaredHingeLoss", {}, -1e30, 1.0, 1e60, INF, -2e30),
    ("poisson_-1e4", "PoissonNLLLoss", {}, -1e4, 2.0, 2e4, 2e4, -2.0),       # e^-1e4 -> 0
    ("poisson_1e4", "PoissonNLLLoss", {}, 1e4, 2.0, INF, INF, INF),          # e^1e4 > DBL_MAX
    ("poisson_-1e30", "PoissonNLLLoss", {}, -1e30, 2.0, 2e30, 2e30, -2.0),
    # 1e4 - 2 log(1e4) = 1e4 - 18.420680743952367 (log 1e4 by mpmath); 1 - 2/1e4
    ("poisson_rate_1e4", "PoissonNLLLoss", {"from_logits": False}, 1e4, 2.0, 9981.579319256048,
     9981.579319256048, 0.9998),
    ("poisson_rate_1e30", "PoissonNLLLoss", {"from_logits": False}, 1e30, 2.0, 1e30, 1e30, 1.0),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cls_name,kwargs,pred,label,v64,v32,g", [
    pytest.param(*c[1:], id=c[0]) for c in LARGE_CASES])
def test_large_finite_inputs(losses, cls_name, kwargs, pred, label, v64, v32, g, dtype):
    # 1e30 rounds to 1.0000000150474662e30 in float32 (1.5e-8 relative): inside 4 eps32
    value, grad = build(losses, cls_name, kwargs).value_and_grad(np.array([pred], dtype),
                                                                 np.array([label]))
    what = f"{cls_name}{kwargs}({pred:g}, {label})"
    assert_limit(value, [v64 if dtype == np.float64 else v32], dtype, what)
    assert_limit(grad, [g], dtype, what + " grad")


# --------------------------------------------------------------------------- NaN

@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("where", ["pred", "label", "sample_weight"])
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_nan_propagates_to_its_sample_only(losses, case, where, dtype, reduction):
    """A NaN in one element of pred (or the label, or sample_weight) makes that sample's value
    and that element's gradient NaN, and leaves every other sample and element as without it
    (runtime contract: 'NaN in any input gives NaN in the values and gradients it reaches')."""
    rng = rng_for("nan", case.id)
    data = case.gen(rng, (3, 2))
    pred = data["pred"].astype(dtype)
    label = data["label"].copy()
    sw = rng.uniform(0.5, 2.0, (3, 2))
    extra = {"pos_weight": data["pos_weight"]} if "pos_weight" in data else {}
    loss = getattr(losses, case.name)(**case.options, reduction=reduction)
    clean_value, clean_grad = loss.value_and_grad(pred, label, sw, **extra)
    target = {"pred": pred, "label": label, "sample_weight": sw}[where]
    target[1, 0] = np.nan
    value, grad = loss.value_and_grad(pred, label, sw, **extra)
    assert np.isnan(grad[1, 0]), grad
    mask = np.ones(grad.shape, bool)
    mask[1, 0] = False
    np.testing.assert_array_equal(grad[mask], clean_grad[mask])
    if reduction == "none":
        assert np.isnan(value[1]) and not np.any(np.isnan(value[[0, 2]])), value
        np.testing.assert_array_equal(value[[0, 2]], clean_value[[0, 2]])
    else:
        assert np.isnan(value), value


# --------------------------------------------------------------------------- empty arrays

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,batch_axis", [((0,), 0), ((0, 3), 0), ((3, 0), 0), ((3, 0), 1)],
                         ids=["0", "0x3", "3x0", "3x0_axis1"])
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_empty_arrays(losses, case, shape, batch_axis, dtype):
    """numpy's semantics, by hand: no samples -> 'none' gives shape (0,), 'sum' 0 (the empty
    sum), 'mean' NaN (like np.mean([])); samples without features -> each per-sample mean is
    over nothing, NaN (like np.mean(np.empty((3, 0)), axis=1)), so 'sum' and 'mean' are NaN.
    Gradients and second derivatives are empty arrays of pred's shape and dtype."""
    rng = rng_for("empty", case.id)
    data = case.gen(rng, shape)
    extra = {"pos_weight": data["pos_weight"]} if "pos_weight" in data else {}
    pred = data["pred"].astype(dtype)
    nb = shape[batch_axis]
    for reduction in REDUCTIONS:
        loss = getattr(losses, case.name)(**case.options, batch_axis=batch_axis, reduction=reduction)
        value, grad = loss.value_and_grad(pred, data["label"], **extra)
        g2, hess = loss.grad_hess(pred, data["label"], **extra)
        value = np.asarray(value)
        assert value.dtype == dtype
        for arr in (grad, g2, hess):
            assert arr.shape == shape and arr.dtype == dtype
        if reduction == "none":
            assert value.shape == (nb,)
            assert np.all(np.isnan(value))  # vacuous for nb = 0
        elif reduction == "sum" and nb == 0:
            assert value == 0.0
        else:
            assert np.isnan(value)


# --------------------------------------------------------------------------- domain edges

# Gluon's eps = 1e-12 inside the logs (float32: 1e-12 rounds to 9.99999996e-13, inside 4 eps32).
# By mpmath: -log(1e-12) = 27.631021115928547; -log(1 + 1e-12) = -9.999999999995e-13 (Gluon's
# formula goes slightly below 0 here; in float32 1 + 1e-12 rounds to 1, so 0 within eps32);
# 1/(1 + 1e-12) = 0.999999999999.
# (p, z) -> value, grad d/dp = -w z/(p+eps) + (1-z)/(1-p+eps), 2nd = w z/(p+eps)^2 + (1-z)/(1-p+eps)^2
BCE_EDGES = [
    (0.0, 1.0, 27.631021115928547, -1e12, 1e24),
    (1.0, 0.0, 27.631021115928547, 1e12, 1e24),
    (0.0, 0.0, -9.999999999995e-13, 0.999999999999, 0.999999999998),
    (1.0, 1.0, -9.999999999995e-13, -0.999999999999, 0.999999999998),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pos_weight", [None, 2.0])
def test_bce_from_sigmoid_at_probability_0_and_1(losses, pos_weight, dtype):
    w = 1.0 if pos_weight is None else pos_weight
    pred = np.array([e[0] for e in BCE_EDGES], dtype=dtype)
    label = np.array([e[1] for e in BCE_EDGES])
    zs = label
    value_w = np.array([e[2] for e in BCE_EDGES]) * np.where(zs == 1, w, 1.0)
    grad_w = np.array([e[3] for e in BCE_EDGES]) * np.where(zs == 1, w, 1.0)
    hess_w = np.array([e[4] for e in BCE_EDGES]) * np.where(zs == 1, w, 1.0)
    extra = {} if pos_weight is None else {"pos_weight": pos_weight}
    loss = losses.SigmoidBCELoss(from_sigmoid=True)
    value, grad = loss.value_and_grad(pred, label, **extra)
    _, hess = loss.grad_hess(pred, label, **extra)
    for arr in (value, grad, hess):
        assert np.all(np.isfinite(arr)) and arr.dtype == dtype
    # absolute eps of the dtype for the ~1e-12 values (1 + 1e-12 is 1 in float32)
    np.testing.assert_allclose(value, value_w, rtol=4 * EPS[dtype], atol=4 * EPS[dtype])
    np.testing.assert_allclose(grad, grad_w, rtol=4 * EPS[dtype])
    np.testing.assert_allclose(hess, hess_w, rtol=8 * EPS[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("compute_full", [False, True])
def test_poisson_rate_at_zero(losses, compute_full, dtype):
    """from_logits=False at pred = 0: l = -t log(1e-8) (+ Stirling for t > 1), finite; by hand
    with log(1e-8) = -18.420680743952367 (mpmath): t = 0, 1, 2 -> 0, 18.42..., 36.84...;
    grad 1 - t/1e-8 -> 1, -99999999, -199999999; 2nd t/1e-16 -> 0, 1e16, 2e16.
    Stirling(2) = 2 log 2 - 2 + log(4 pi)/2 = 0.651806484604536 (spec example, mpmath)."""
    t = np.array([0.0, 1.0, 2.0])
    pred = np.zeros(3, dtype=dtype)
    loss = losses.PoissonNLLLoss(from_logits=False, compute_full=compute_full)
    value, grad = loss.value_and_grad(pred, t)
    _, hess = loss.grad_hess(pred, t)
    for arr in (value, grad, hess):
        assert np.all(np.isfinite(arr)) and arr.dtype == dtype
    want = t * 18.420680743952367 + (np.array([0, 0, 0.651806484604536]) if compute_full else 0)
    # float32: 1e-8 rounds to 9.99999994e-9 (6e-9 relative): inside 4 eps32
    np.testing.assert_allclose(value, want, rtol=4 * EPS[dtype])
    np.testing.assert_allclose(grad, [1.0, -99999999.0, -199999999.0], rtol=4 * EPS[dtype])
    np.testing.assert_allclose(hess, [0.0, 1e16, 2e16], rtol=4 * EPS[dtype])


def test_poisson_where_both_terms_overflow_from_a_finite_input_takes_the_larger(losses):
    # exp(p) - t*p with both terms past the float range (lcc_dominant_exp compares their logs):
    # p = 710, t = 1e308: e^710 = 2.2e308 < t*p = 7.1e310, the true value -6.9e310 -> -inf;
    # p = 800: e^800 = 2.7e347 wins -> +inf; p = 1e226 = t: +inf (by hand, mpmath agrees).
    value = losses.PoissonNLLLoss()(np.array([710.0, 800.0, 1e226]), np.array([1e308, 1e308, 1e226]))
    assert value.tolist() == [-np.inf, np.inf, np.inf]


# --------------------------------------------------------------------------- subnormal factors


@pytest.mark.parametrize("pred,label,pos_weight,output,want", [
    # d2/dpred2 = ((1 - z) + w z) sigmoid(x) sigmoid(-x) = 1.0550128668199325e-320 (mpmath),
    # where sigmoid(-742.38) = 3.9e-323 is 8 units of 2^-1074: times w = 272.6 it came out
    # 1.0776e-320, 45.6 units off (`losscc check`'s point)
    (742.3818568185699, 0.9999999999443433, 272.6475739847653, "hess", 1.0550128668199325e-320),
    # w softplus(-746), -w sigmoid(-746), w sigmoid(746) sigmoid(-746) at w = 1e30, z = 1: all
    # +-1e30 e^-746 = 1.0382848095158283e-294 (mpmath); e^-746 rounds to 0, and so did they
    (746.0, 1.0, 1e30, "value", 1.0382848095158283e-294),
    (746.0, 1.0, 1e30, "grad", -1.0382848095158283e-294),
    (746.0, 1.0, 1e30, "hess", 1.0382848095158283e-294),
])
def test_a_weight_times_a_subnormal_sigmoid_rounds_once(losses, pred, label, pos_weight, output, want):
    # exp-scale (codegen.py): a*f with f = exp(u), sigmoid(u) or softplus(u) below the normal
    # range is (a*e^(u/2))*e^(u/2), so only the product rounds to the subnormal range
    loss = losses.SigmoidBCELoss()
    p, z, w = np.array([pred]), np.array([label]), np.array([pos_weight])
    value, grad = loss.value_and_grad(p, z, pos_weight=w)
    got = {"value": value, "grad": grad, "hess": loss.grad_hess(p, z, pos_weight=w)[1]}[output][0]
    # within 2 units of the last place (e^(u/2) and a*e^(u/2) round too; a subnormal's unit
    # is 2^-1074)
    assert abs(got - want) <= 2 * np.spacing(abs(want)), (got, want)


# --------------------------------------------------------------------------- huge class weights

def _ce_truth(pred, label, weight, smoothing, sparse, from_logits):
    """Softmax cross entropy with class weights and label smoothing (PyTorch's definition,
    the spec's formula) and its gradient, by mpmath at 60 digits from the inputs as given:
    with logp = log_softmax(pred) (pred itself with from_logits) and the target weights
    c_i = (1 - s) * w_i * y_i + s/C * w_i (y one-hot at the label, or the label row),
    loss = sum_i c_i * -logp_i and d loss / d pred_j = sum_i c_i * p_j - c_j (by hand: the
    derivative of -logp_i is p_j - [i == j]); with from_logits it is -c_j."""
    with mpmath.workdps(60):
        x = [mpmath.mpf(v) for v in pred]
        w = [mpmath.mpf(v) for v in weight]
        s, n = mpmath.mpf(smoothing), len(x)
        y = [mpmath.mpf(int(i == label)) for i in range(n)] if sparse else [mpmath.mpf(v) for v in label]
        c = [(1 - s) * w[i] * y[i] + s / n * w[i] for i in range(n)]
        if from_logits:
            return sum(-c[i] * x[i] for i in range(n)), [-ci for ci in c]
        top = max(x)
        tail = mpmath.log(sum(mpmath.exp(v - top) for v in x))
        logp = [(v - top) - tail for v in x]  # (not top + tail - v: 60 digits of a 5e184)
        p = [mpmath.exp(v) for v in logp]
        return sum(-c[i] * logp[i] for i in range(n)), [sum(c) * p[j] - c[j] for j in range(n)]


# (sparse_label, from_logits, label_smoothing, pred, label, class_weight), each from `losscc
# check --samples 400` (float64), where the kernel gave inf or NaN (or 0) for a finite truth.
HUGE_WEIGHT_ROWS = [
    # value: the smoothing sum sum(w * -logp) = 1.8e308 * 7.7 + ... is inf; times 0.083/6
    # it is 1.9055392778206353e+307 (rows.py scaled-sum, codegen.py scaled-factor)
    pytest.param(True, False, 0.08307007715591408,
                 [1.5463042143739754, -4.197144616057669, 9.200262129554176, -2.4904686977769823,
                  2.7313249901017205, 0.28192708719752274], 3,
                 [1.7976931348623157e+308, 0.0005709709574367994, 274.0591316755281,
                  1.4602860783013572e+145, 1.382620718573921, 7.067443315185735e+180], id="smoothing-sum"),
    # gradient: sum(w) = inf times the smoothing adjoint where(s == 0, 0, s/C) = 0 was NaN;
    # the truth is [4.7795677102475261, 4.7795677102475261, -9.5591354204950522]
    # (codegen.py zero-branch)
    pytest.param(True, False, 0.0, [5.568386952317635e+184] * 3, 2,
                 [1.7976931348623157e+308, 8.988465674311579e+307, 14.338703130742578], id="zero-branch"),
    # value: the dense term w * label * -logp = 9e307 * 0.29 * 6.5 overflowed in w * -logp;
    # the truth is 1.707906802192583e+308 (a three-factor ScaledProduct)
    pytest.param(False, False, 0.0, [2.913510926953808, -1.5737646228719129, -3.6256377134212365],
                 [0.3736595823076996, 0.3363255605082215, 0.2900148571840789],
                 [0.005742840024107339, 0.21000969776364106, 8.988465674311579e+307], id="three-factors"),
    # value with log-probabilities: -w * pred = 2.3 * 9e307 is inf, times 0.70/6: 2.4630382189430225e+307
    pytest.param(True, True, 0.7024633036035981,
                 [-1.0705880507055664e+234, -0.003726257565567648, -8.988465674311579e+307,
                  -543.5339141531442, -25.752617988101914, -2.758252152316499e+210], 0,
                 [0.015853340462010698, 0.007608105378206127, 2.340524519370574,
                  3.1593322376100118e-114, 3.2762597019969596e-297, 3761.7660158705585], id="logits-sum"),
    # gradient at class 2: w[label] = 1.8e308 times the softmax weight exp(-751.4) = 4.6e-327,
    # which rounds to 0; the truth is 8.3359481650574242e-19 (codegen.py exp-scale, inside exp-sub)
    pytest.param(True, False, 0.0,
                 [-200.12072871645057, 469.3257201231566, -282.08553227032587, -411.7258278405209,
                  86.63022862655177, 43.93609131921857], 3,
                 [73.76961587830156, 3.7755091971757975e-186, 3.380401532250579e-308,
                  1.7976931348623157e+308, 3.9876906963821255, 2.4940567492716483], id="underflowed-weight"),
]


@pytest.mark.parametrize("sparse,from_logits,smoothing,pred,label,weight", HUGE_WEIGHT_ROWS)
def test_cross_entropy_with_class_weights_near_the_float_max(losses, sparse, from_logits, smoothing,
                                                              pred, label, weight):
    """Finite where the truth is, and within 4 ulps of it (the check's bound), in float64 (a
    truth past the float range is inf: the last row's value, 1.8e308 * 881)."""
    loss = losses.SoftmaxCrossEntropyLoss(sparse_label=sparse, from_logits=from_logits,
                                          label_smoothing=smoothing)
    value, grad = loss.value_and_grad(np.array([pred]), np.array([label]),
                                      class_weight=np.array(weight))
    want_value, want_grad = _ce_truth(pred, label, weight, smoothing, sparse, from_logits)
    for got, want in [(value[0], want_value), *zip(grad[0], want_grad)]:
        if abs(want) > np.finfo(np.float64).max:
            assert got == np.sign(float(want)) * np.inf, (got, want)
            continue
        assert np.isfinite(got), (got, want)
        ulp = math.ulp(float(want))
        assert abs(mpmath.mpf(float(got)) - want) <= 4 * ulp, (got, want)
