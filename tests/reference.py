"""Plain float64 numpy reference implementations of the catalogue's losses.

Written from MXNet Gluon's documented math (``mxnet/gluon/loss.py``, 1.x and 2.0) and
/work/shared/NUMERICS.md, independently of specs/*.yaml and of the compiler: nothing here
imports losscc. Each loss function returns three float64 arrays, all *elementwise*:

    value = l(pred, label),   grad = dl/dpred,   hess = d2l/dpred2

with the first and second derivatives derived by hand (closed forms in each docstring).
Kink convention (the catalogue's, and PyTorch's): the derivative at a kink is 0, i.e.
sign(0) = 0 and relu'(0) = 0; second derivatives are their values away from kinks (the
Dirac masses at kinks are dropped).

`gluon_weighting` applies Gluon's weighting (elementwise loss x sample_weight x weight, then
the mean over every axis but batch_axis), `reduce` applies PyTorch-style reductions to the
per-sample losses, and `expected` puts it together, including the matching scaling of the
elementwise derivatives: d(sum of per-sample losses)/dpred, or d(mean)/dpred.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "l2", "l1", "huber", "hinge", "squared_hinge", "logistic", "sigmoid_bce", "poisson_nll", "log_cosh",
    "softplus", "sigmoid", "REFERENCES", "gluon_weighting", "reduce", "derivative_scale",
    "expected",
]


def _f64(*arrays):
    return [np.asarray(a, dtype=np.float64) for a in arrays]


# --------------------------------------------------------------------------- stable pieces


def softplus(x):
    """log(1 + e^x), stable for every x (np.logaddexp(0, x)); +inf at +inf, 0 at -inf."""
    return np.logaddexp(0.0, np.asarray(x, dtype=np.float64))


def sigmoid(x):
    """1 / (1 + e^-x), evaluated so that exp never overflows (NUMERICS.md's stable form):
    x >= 0: 1 / (1 + e^-x);  x < 0: e^x / (1 + e^x). Relative accuracy a few ulps."""
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        e = np.exp(-np.abs(x))  # in (0, 1]: no overflow
        return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


# --------------------------------------------------------------------------- the losses


def l2(pred, label):
    """Gluon L2Loss: (label - pred)^2 with weight/2, i.e. l = (p - y)^2 / 2.
    dl/dp = p - y;  d2l/dp2 = 1."""
    p, y = _f64(pred, label)
    e = p - y
    return 0.5 * e * e, e, np.ones_like(e)


def l1(pred, label):
    """Gluon L1Loss: l = |p - y|.  dl/dp = sign(p - y) (0 at the kink);  d2l/dp2 = 0."""
    p, y = _f64(pred, label)
    e = p - y
    return np.abs(e), np.sign(e), np.zeros_like(e)


def huber(pred, label, rho=1.0):
    """Gluon HuberLoss(rho): with a = |y - p|,
        l = a - rho/2            if a > rho
            (0.5/rho) (y - p)^2  otherwise.
    dl/dp = sign(p - y) if a > rho else (p - y)/rho;  d2l/dp2 = 0 if a > rho else 1/rho."""
    p, y = _f64(pred, label)
    e = p - y
    a = np.abs(e)
    outer = a > rho
    value = np.where(outer, a - 0.5 * rho, (0.5 / rho) * e * e)
    grad = np.where(outer, np.sign(e), e / rho)
    hess = np.where(outer, 0.0, 1.0 / rho) + np.zeros_like(e)
    return value, grad, hess


def hinge(pred, label, margin=1.0):
    """Gluon HingeLoss(margin): l = relu(margin - p y).
    dl/dp = -y where margin - p y > 0, else 0 (0 at the kink);  d2l/dp2 = 0."""
    p, y = _f64(pred, label)
    m = margin - p * y
    active = m > 0
    return np.where(active, m, 0.0), np.where(active, -y, 0.0), np.zeros_like(m)


def squared_hinge(pred, label, margin=1.0):
    """Gluon SquaredHingeLoss(margin): l = relu(margin - p y)^2.
    dl/dp = -2 relu(margin - p y) y;  d2l/dp2 = 2 y^2 where margin - p y > 0, else 0."""
    p, y = _f64(pred, label)
    m = margin - p * y
    r = np.maximum(m, 0.0)
    return r * r, -2.0 * r * y, np.where(m > 0, 2.0 * y * y, 0.0)


def _bce_logits(x, z, pos_weight):
    """BCE on logits, Gluon's formula with pos_weight w,
        l = (1 - z) x + (1 + (w - 1) z) softplus(-x),
    rewritten (softplus(x) = x + softplus(-x)) as a sum of two non-negative terms so that
    nothing cancels for z in {0, 1} at any x:
        l = (1 - z) softplus(x) + w z softplus(-x).
    dl/dx = (1 - z) sigmoid(x) - w z sigmoid(-x);
    d2l/dx2 = ((1 - z) + w z) sigmoid(x) sigmoid(-x)."""
    value = (1.0 - z) * softplus(x) + pos_weight * z * softplus(-x)
    grad = (1.0 - z) * sigmoid(x) - pos_weight * z * sigmoid(-x)
    hess = ((1.0 - z) + pos_weight * z) * sigmoid(x) * sigmoid(-x)
    return value, grad, hess


def _bce_probs(p, z, pos_weight, epsilon):
    """Gluon's BCE on probabilities (from_sigmoid=True), eps inside the logs:
        l = -(w z log(p + eps) + (1 - z) log(1 - p + eps)).
    dl/dp = -w z / (p + eps) + (1 - z) / (1 - p + eps);
    d2l/dp2 = w z / (p + eps)^2 + (1 - z) / (1 - p + eps)^2."""
    a, b = p + epsilon, 1.0 - p + epsilon
    value = -(pos_weight * z * np.log(a) + (1.0 - z) * np.log(b))
    grad = -pos_weight * z / a + (1.0 - z) / b
    hess = pos_weight * z / (a * a) + (1.0 - z) / (b * b)
    return value, grad, hess


def sigmoid_bce(pred, label, pos_weight=1.0, from_sigmoid=False, epsilon=1e-12):
    """Gluon SigmoidBinaryCrossEntropyLoss(from_sigmoid) with call-time pos_weight
    (broadcast); epsilon is Gluon's 1e-12 of the from_sigmoid branch."""
    p, z, w = _f64(pred, label, pos_weight)
    if from_sigmoid:
        return _bce_probs(p, z, w, epsilon)
    return _bce_logits(p, z, w)


def logistic(pred, label, label_format="signed"):
    """Gluon LogisticLoss(label_format): 'signed' maps z = (label + 1)/2, 'binary' uses the
    label as z; then the BCE-on-logits formula (derivatives as in `_bce_logits`, w = 1).
    Any other label_format is a ValueError, as in Gluon."""
    if label_format not in ("signed", "binary"):
        raise ValueError(f"label_format can only be signed or binary, got {label_format!r}")
    p, y = _f64(pred, label)
    z = (y + 1.0) / 2.0 if label_format == "signed" else y
    return _bce_logits(p, z, 1.0)


def poisson_nll(pred, target, from_logits=True, compute_full=False, epsilon=1e-8):
    """Gluon PoissonNLLLoss (2.0):
        from_logits:      l = e^p - t p;            dl/dp = e^p - t;          d2l/dp2 = e^p
        not from_logits:  l = p - t log(p + eps);   dl/dp = 1 - t/(p + eps) = (p - t + eps)/(p + eps);
                          d2l/dp2 = t/(p + eps)^2
    compute_full adds Stirling's log(t!) ~ t log t - t + log(2 pi t)/2 where t > 1 (0 else),
    which does not depend on p."""
    p, t = _f64(pred, target)
    if from_logits:
        ep = np.exp(p)
        value, grad, hess = ep - t * p, ep - t, ep
    else:
        a = p + epsilon
        # 1 - t/a written as ((p - t) + eps)/a: p - t is exact when p is near t (Sterbenz),
        # so the gradient keeps its relative accuracy where it is small (1 - t/a cancels).
        value, grad, hess = p - t * np.log(a), ((p - t) + epsilon) / a, t / (a * a)
    if compute_full:
        big = t > 1
        ts = np.where(big, t, 2.0)  # keep log() away from 0 where the term is masked anyway
        stirling = ts * np.log(ts) - ts + 0.5 * np.log(2.0 * math.pi * ts)
        value = value + np.where(big, stirling, 0.0)
    shape = np.broadcast_shapes(value.shape, grad.shape, hess.shape)
    return tuple(np.broadcast_to(a, shape).copy() for a in (value, grad, hess))


def log_cosh(pred, label, scale=1.0):
    """log(cosh(e)), e = (p - y) / scale, as log1p(2 sinh(e/2)^2) (cosh(e) - 1 without
    cancellation), and |e| - log 2 + log1p(e^(-2|e|)) beyond |e| = 20 where sinh overflows.
    dl/dp = tanh(e) / scale;  d2l/dp2 = 1 / (scale cosh(e))^2."""
    p, y = _f64(pred, label)
    e = (p - y) / scale
    a = np.abs(e)
    with np.errstate(over="ignore"):
        near = np.log1p(2.0 * np.sinh(np.minimum(a, 20.0) / 2.0) ** 2)
        far = a - math.log(2.0) + np.log1p(np.exp(-2.0 * a))
        return np.where(a <= 20.0, near, far), np.tanh(e) / scale, 1.0 / (scale * np.cosh(e)) ** 2


REFERENCES = {
    "l2": l2, "l1": l1, "huber": huber, "hinge": hinge, "squared_hinge": squared_hinge,
    "logistic": logistic, "sigmoid_bce": sigmoid_bce, "poisson_nll": poisson_nll,
    "log_cosh": log_cosh,
}


# --------------------------------------------------------------------------- Gluon weighting


def _like_pred(x, shape):
    """Gluon's reshape_like for the label when the sizes match, else broadcasting."""
    x = np.asarray(x, dtype=np.float64)
    if x.size == math.prod(shape) and x.shape != tuple(shape):
        x = x.reshape(shape)
    return np.broadcast_to(x, shape)


def _sample_weight(sample_weight, shape):
    if sample_weight is None:
        return np.ones(shape)
    return np.broadcast_to(np.asarray(sample_weight, dtype=np.float64), shape)


def _feature_axes(ndim, batch_axis):
    batch_axis %= ndim
    return tuple(i for i in range(ndim) if i != batch_axis)


def gluon_weighting(elem, sample_weight=None, weight=1.0, batch_axis=0):
    """Per-sample loss, Gluon's order: elementwise loss x sample_weight (broadcast) x weight,
    then the mean over every axis but batch_axis. Returns shape (batch,)."""
    elem = np.asarray(elem, dtype=np.float64)
    weighted = elem * _sample_weight(sample_weight, elem.shape) * weight
    return weighted.mean(axis=_feature_axes(elem.ndim, batch_axis))


def reduce(per_sample, reduction="none"):
    """PyTorch-style reduction of the per-sample losses."""
    if reduction == "none":
        return per_sample
    if reduction == "sum":
        return per_sample.sum()
    if reduction == "mean":  # sum / batch size; NaN for an empty batch (no warning)
        return per_sample.sum() / per_sample.size if per_sample.size else np.nan
    raise ValueError(reduction)


def derivative_scale(elem_d, sample_weight=None, weight=1.0, batch_axis=0, reduction="none"):
    """Elementwise derivative of the reduced loss w.r.t. pred, from the elementwise d/dpred
    (or d2/dpred2) of the loss: the per-sample mean over n_features contributes
    weight * sample_weight / n_features per element; reduction="mean" divides by the batch."""
    elem_d = np.asarray(elem_d, dtype=np.float64)
    shape = elem_d.shape
    nb = shape[batch_axis % elem_d.ndim]
    nf = math.prod(shape) // nb
    out = elem_d * _sample_weight(sample_weight, shape) * (weight / nf)
    return out / nb if reduction == "mean" else out


def expected(name, pred, label, sample_weight=None, weight=1.0, batch_axis=0,
             reduction="none", **options):
    """(value, grad, hess) that a Gluon-style loss object `name` must return, from the
    elementwise references above. Inputs after pred are broadcast like Gluon does."""
    pred = np.asarray(pred, dtype=np.float64)
    label = _like_pred(label, pred.shape)
    if "pos_weight" in options:
        options = dict(options)
        options["pos_weight"] = np.broadcast_to(np.asarray(options["pos_weight"], np.float64),
                                                pred.shape)
    elem_v, elem_g, elem_h = REFERENCES[name](pred, label, **options)
    value = reduce(gluon_weighting(elem_v, sample_weight, weight, batch_axis), reduction)
    grad = derivative_scale(elem_g, sample_weight, weight, batch_axis, reduction)
    hess = derivative_scale(elem_h, sample_weight, weight, batch_axis, reduction)
    return value, grad, hess
