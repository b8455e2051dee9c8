"""Plain float64 numpy references for the ROW losses (losses that reduce over a class axis).

Written from the math of MXNet Gluon's ``gluon/loss.py`` (1.x and 2.0), PyTorch's
``torch.nn.functional`` documentation and /work/shared/NUMERICS.md, independently of
specs/*.yaml and of the compiler: nothing here imports losscc.

Each loss function works on whole arrays and returns float64 arrays:

    rows    the row losses, shape S with the row axes kept at size 1 (keepdims)
    grads   d row_loss / d input, one array of the input's shape S per differentiable input

with the derivatives derived by hand (closed forms in each docstring). A *row* is the vector
along the class axis `axis` (TripletLoss with axis=None: every axis but the batch axis).
Kink convention (the catalogue's, and PyTorch's ReLU): the derivative at a kink is 0.

Gluon's weighting of row losses (`row_weighting`, `row_grad_scale`, `expected`):
  * the row losses form an array of shape S with the row axes of size 1;
  * sample_weight broadcasts against that shape, or, if its ndim is pred.ndim minus the
    number of row axes, against S without the row axes (it gets the row axes inserted);
  * times `weight`, then the mean over every axis but batch_axis: the per-sample loss;
  * reduction "sum" / "mean" reduce the per-sample losses (mean = sum / batch size).
The gradient of the reduced loss is d row_loss/d input x weight x sample_weight / n_rows
(n_rows = rows per sample), divided by the batch size for "mean".

mpmath versions (50 digits) of softmax cross-entropy, log-cosh and tanh give the truth for
accuracy tests.
"""

from __future__ import annotations

import math

import numpy as np

from reference import reduce  # PyTorch-style reduction of per-sample losses, shared

__all__ = [
    "MP_DPS",
    "cosine_embedding",
    "expected",
    "keep_shape",
    "kl_div",
    "log_cosh",
    "log_softmax",
    "mp_log_cosh",
    "mp_softmax_ce",
    "mp_tanh",
    "reduce",
    "row_axes_of",
    "row_grad_scale",
    "row_sample_weight",
    "row_weighting",
    "softmax",
    "softmax_cross_entropy",
    "softmax_focal",
    "triplet",
]


def _f64(x):
    return np.asarray(x, dtype=np.float64)


# --------------------------------------------------------------------------- softmax pieces


def _shifted(x, axis):
    """(z, lse) for the rows of x along axis: m is the row max (m := 0 for a row whose max is
    not finite, NUMERICS.md), z = x - m, lse = log sum_c e^(z_c). With k the position of the
    max, sum e^z = 1 + s1 where s1 = sum over c != k of e^(z_c) (a sum of non-negative terms),
    so lse = log1p(s1) keeps its relative accuracy when the row is dominated by its max
    (confident predictions: the loss of the max class is tiny, not 0)."""
    x = _f64(x)
    with np.errstate(invalid="ignore", over="ignore"):
        m = np.max(x, axis=axis, keepdims=True)
        m = np.where(np.isfinite(m), m, 0.0)
        z = x - m
        e = np.exp(z)
        if x.shape[axis] == 0:
            return z, np.full(m.shape, -np.inf)
        k = np.expand_dims(np.argmax(np.where(np.isnan(z), -np.inf, z), axis=axis), axis)
        zk = np.take_along_axis(z, k, axis=axis)
        others = e.copy()
        np.put_along_axis(others, k, 0.0, axis=axis)
        s1 = np.sum(others, axis=axis, keepdims=True)
        with np.errstate(divide="ignore"):
            lse = np.where(zk == 0.0, np.log1p(s1), np.log(np.exp(zk) + s1))
    return z, lse


def log_softmax(x, axis=-1):
    """log softmax(x) = (x - m) - lse: -log_softmax(x)_c = (m - x_c) + log1p(s1) is a sum of
    two non-negative numbers, computed without cancellation. A -inf entry gives -inf; a NaN
    makes the row NaN."""
    z, lse = _shifted(x, axis)
    with np.errstate(invalid="ignore"):
        return z - lse


def softmax(x, axis=-1):
    """softmax(x)_c = e^(x_c - m) / sum e^(x - m)."""
    x = _f64(x)
    if x.shape[axis] == 0:
        return x.copy()
    with np.errstate(invalid="ignore", over="ignore"):
        m = np.max(x, axis=axis, keepdims=True)
        m = np.where(np.isfinite(m), m, 0.0)
        e = np.exp(x - m)
        return e / np.sum(e, axis=axis, keepdims=True)


def _wsum(a, v, axis):
    """sum_c a_c v_c with terms whose weight a_c is exactly 0 dropped (0 * inf := 0, as in
    xlogy): a -inf log-probability of a class with zero target weight contributes nothing."""
    with np.errstate(invalid="ignore"):
        return np.sum(np.where(a == 0, 0.0, a * v), axis=axis, keepdims=True)


# --------------------------------------------------------------------------- softmax cross-entropy


def _check_sparse(label, shape, axis, ignore_index):
    """The sparse label as int64 of shape S with the class axis at size 1, plus the mask of
    ignored rows. Raises ValueError for a non-integral label and IndexError naming the flat
    position (in the label array as given) and the value for a label outside [0, C)."""
    lab = np.asarray(label)
    C = shape[axis]
    keep = tuple(1 if i == axis else n for i, n in enumerate(shape))
    if lab.ndim == len(shape):
        lab_keep = lab
    else:
        lab_keep = np.expand_dims(lab, axis)
    if lab_keep.shape != keep:
        raise ValueError(f"label shape {lab.shape} does not match pred {shape} without axis {axis}")
    if lab.dtype.kind == "f":
        if not np.all(np.isfinite(lab)) or np.any(lab != np.round(lab)):
            raise ValueError("labels must be integers")
    elif lab.dtype.kind not in "iu":
        raise TypeError(f"label dtype {lab.dtype}")
    flat = lab.reshape(-1)
    for pos, v in enumerate(flat):
        v = int(v)
        if v != ignore_index and not 0 <= v < C:
            raise IndexError(f"label {v} at position {pos} is outside [0, {C})")
    ignored = np.zeros(keep, bool) if ignore_index is None else np.asarray(lab_keep == ignore_index)
    idx = np.where(ignored, 0, lab_keep).astype(np.int64)
    return idx, ignored


def softmax_cross_entropy(pred, label, axis=-1, sparse_label=True, from_logits=False,
                          class_weight=None, label_smoothing=0.0, ignore_index=-100):
    """Softmax cross-entropy per row, PyTorch's cross_entropy (reduction='none') with Gluon's
    from_logits (pred already holds log-probabilities). With lp = log_softmax(pred) (or pred),
    w = class_weight (default ones), eps = label_smoothing, C = the number of classes, the
    loss is -sum_c a_c lp_c for the *effective target* a:

        sparse label y:  a_c = (1 - eps) w_y [c == y] + (eps / C) w_c
        dense label q:   a_c = w_c ((1 - eps) q_c + eps / C)

    Derivative (d lp_c / d x_j = [c == j] - p_j, p = softmax(pred)):

        not from_logits:  d row / d x = p * sum_c a_c - a        (= softmax - onehot for w = 1, eps = 0)
        from_logits:      d row / d x = -a

    A sparse label equal to ignore_index gives row loss 0 and gradient 0 (PyTorch).
    Returns (rows of shape S with the class axis of size 1, gradient of shape S)."""
    x = _f64(pred)
    axis %= x.ndim
    C = x.shape[axis]
    w = np.ones(C) if class_weight is None else _f64(class_weight)
    wb = w.reshape([C if i == axis else 1 for i in range(x.ndim)])  # broadcast along the row
    eps = float(label_smoothing)
    if sparse_label:
        idx, ignored = _check_sparse(label, x.shape, axis, ignore_index)
        onehot = np.zeros(x.shape)
        np.put_along_axis(onehot, idx, 1.0, axis=axis)
        a = (1.0 - eps) * np.take_along_axis(np.broadcast_to(wb, x.shape), idx, axis=axis) * onehot
        if eps:
            a = a + (eps / C) * wb
        a = np.where(ignored, 0.0, a)
    else:
        q = np.broadcast_to(_f64(label), x.shape)
        a = wb * ((1.0 - eps) * q + eps / C)
        ignored = np.zeros_like(x[(slice(None),) * axis + (slice(0, 1),)], dtype=bool)
    lp = x if from_logits else log_softmax(x, axis)
    rows = -_wsum(a, lp, axis)
    if from_logits:
        grad = -a
    else:
        with np.errstate(invalid="ignore"):
            grad = softmax(x, axis) * np.sum(a, axis=axis, keepdims=True) - a
    rows = np.where(ignored, 0.0, rows)
    grad = np.where(ignored, 0.0, grad)
    return rows, grad


# --------------------------------------------------------------------------- KL divergence


def kl_div(pred, label, axis=-1, from_logits=True):
    """Gluon KLDivLoss per row: the MEAN over the class axis of

        xlogy(t, t) - t lp,      lp = pred (from_logits, Gluon's default) or log_softmax(pred)

    (terms with t == 0 are 0). This is torch's F.kl_div(lp, t, reduction='none').mean(axis).
    Derivatives, C = the number of classes:

        d row / d pred  = -t / C                          (from_logits)
                        = (softmax(pred) sum(t) - t) / C  (not from_logits)
        d row / d t     = (log t + 1 - lp) / C            where t > 0; NaN here where t == 0
                                                          (d/dt t log t is -inf at 0: undefined)

    Returns (rows, grad wrt pred, grad wrt label)."""
    x, t = _f64(pred), np.broadcast_to(_f64(label), np.shape(pred))
    axis %= x.ndim
    C = x.shape[axis]
    lp = x if from_logits else log_softmax(x, axis)
    with np.errstate(divide="ignore", invalid="ignore"):
        tlogt = np.where(t > 0, t * np.log(np.where(t > 0, t, 1.0)), 0.0)
        elem = tlogt - np.where(t == 0, 0.0, t * lp)
        rows = np.sum(elem, axis=axis, keepdims=True) / C
        if from_logits:
            gp = -t / C
        else:
            gp = (softmax(x, axis) * np.sum(t, axis=axis, keepdims=True) - t) / C
        gl = np.where(t > 0, (np.log(np.where(t > 0, t, 1.0)) + 1.0 - lp) / C, np.nan)
    return rows, gp, gl


# --------------------------------------------------------------------------- cosine embedding


def cosine_embedding(input1, input2, label, axis=-1, margin=0.0, epsilon=1e-12):
    """Gluon 2.0 CosineEmbeddingLoss per row (a, b the two rows, y the label):

        n = |a| |b|,   cos = (a . b) / max(n, epsilon)
        y == 1:   1 - cos
        y == -1:  clip(cos - margin, 0, 1 - margin)
        else:     0

    Derivatives of cos: n > epsilon:  d cos/da = b / n - cos a / |a|^2,  d cos/db = a / n - cos b / |b|^2
                        n <= epsilon: d cos/da = b / epsilon,           d cos/db = a / epsilon
    d row / d cos = -1 (y == 1); 1 where 0 < cos - margin < 1 - margin (y == -1), 0 at and
    beyond the clip's kinks; 0 for other labels. Returns (rows, grad a, grad b)."""
    a, b = _f64(input1), _f64(input2)
    axis %= a.ndim
    y = np.expand_dims(_f64(label), axis) if np.ndim(label) == a.ndim - 1 else _f64(label)
    na = np.sqrt(np.sum(a * a, axis=axis, keepdims=True))
    nb = np.sqrt(np.sum(b * b, axis=axis, keepdims=True))
    dot = np.sum(a * b, axis=axis, keepdims=True)
    n = na * nb
    big = n > epsilon
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = dot / np.where(big, n, epsilon)
        dcos_da = np.where(big, b / n - cos * a / (na * na), b / epsilon)
        dcos_db = np.where(big, a / n - cos * b / (nb * nb), a / epsilon)
    d = cos - margin
    rows = np.where(y == 1, 1.0 - cos, np.where(y == -1, np.clip(d, 0.0, 1.0 - margin), 0.0))
    slope = np.where(y == 1, -1.0, np.where((y == -1) & (d > 0) & (d < 1.0 - margin), 1.0, 0.0))
    return rows, slope * dcos_da, slope * dcos_db


# --------------------------------------------------------------------------- triplet


def row_axes_of(ndim, axis, batch_axis):
    """The row axes: (axis,) for a class axis, every axis but batch_axis for axis=None."""
    if axis is None:
        return tuple(i for i in range(ndim) if i != batch_axis % ndim)
    return (axis % ndim,)


def triplet(pred, positive, negative, margin=1.0, axis=None, batch_axis=0):
    """Gluon TripletLoss per row (the row: every non-batch axis when axis=None):

        s = sum (positive - pred)^2 - sum (negative - pred)^2,    row = relu(s + margin)

    Derivatives where s + margin > 0 (0 elsewhere, and 0 at the kink, relu'(0) = 0):
        d/d pred = 2 (negative - positive),  d/d positive = 2 (positive - pred),
        d/d negative = 2 (pred - negative).
    Returns (rows, grad pred, grad positive, grad negative)."""
    p, q, r = _f64(pred), _f64(positive), _f64(negative)
    axes = row_axes_of(p.ndim, axis, batch_axis)
    s = np.sum((q - p) ** 2 - (r - p) ** 2, axis=axes, keepdims=True) + margin
    active = (s > 0).astype(float)
    return np.maximum(s, 0.0), active * 2 * (r - q), active * 2 * (q - p), active * 2 * (p - r)


# --------------------------------------------------------------------------- softmax focal


def softmax_focal(pred, label, axis=-1, gamma=2.0):
    """Softmax focal loss (Lin et al. 2017, no alpha) per row, p = softmax(pred), y the label:

        row = -(1 - p_y)^gamma log p_y

    With u = 1 - p_y (summed as sum_{c != y} p_c, so it keeps its relative accuracy) and
    d p_y / d x_j = p_y ([j == y] - p_j):

        d row / d x_j = K ([j == y] - p_j),   K = gamma u^(gamma-1) p_y log p_y - u^gamma

    (K = -1 at gamma = 0, giving softmax - onehot; the first term is 0 where u == 0).
    Returns (rows, gradient)."""
    x = _f64(pred)
    axis %= x.ndim
    idx, _ = _check_sparse(label, x.shape, axis, ignore_index=None)
    lp = log_softmax(x, axis)
    p = softmax(x, axis)
    onehot = np.zeros(x.shape)
    np.put_along_axis(onehot, idx, 1.0, axis=axis)
    lpy = np.take_along_axis(lp, idx, axis=axis)
    py = np.take_along_axis(p, idx, axis=axis)
    u = np.sum(np.where(onehot == 1, 0.0, p), axis=axis, keepdims=True)
    g = float(gamma)
    rows = -(u ** g) * lpy
    if g == 0:
        K = -np.ones_like(u)
    else:
        with np.errstate(divide="ignore", invalid="ignore"):
            first = np.where(u > 0, g * u ** (g - 1.0) * py * lpy, 0.0)
        K = first - u ** g
    return rows, K * (onehot - p)


# --------------------------------------------------------------------------- log-cosh (elementwise)


def log_cosh(pred, label):
    """log(cosh(e)), e = pred - label, elementwise; (value, d/dpred, d2/dpred2):

        |e| < 2:   log1p(2 sinh(e/2)^2)                  (cosh e = 1 + 2 sinh^2(e/2): no cancellation at tiny e)
        |e| >= 2:  |e| + log1p(e^(-2|e|)) - log 2        (never overflows)
        d/dpred = tanh(e),   d2/dpred2 = 1 - tanh(e)^2 = sech(e)^2."""
    e = _f64(pred) - _f64(label)
    a = np.abs(e)
    small = a < 2.0
    es = np.where(small, e, 0.0)
    value = np.where(small, np.log1p(2.0 * np.sinh(es / 2.0) ** 2),
                     a + np.log1p(np.exp(-2.0 * a)) - math.log(2.0))
    with np.errstate(over="ignore"):
        sech2 = 1.0 / np.cosh(e) ** 2
    return value, np.tanh(e), sech2


# --------------------------------------------------------------------------- Gluon weighting


def keep_shape(shape, row_axes):
    """S with the row axes at size 1: the shape of the row losses."""
    return tuple(1 if i in row_axes else n for i, n in enumerate(shape))


def row_sample_weight(sample_weight, shape, row_axes):
    """sample_weight as an array of the row losses' shape (keepdims). Its ndim equal to
    len(shape) - len(row_axes) means "shaped like S without the row axes": they are inserted."""
    keep = keep_shape(shape, row_axes)
    if sample_weight is None:
        return np.ones(keep)
    sw = _f64(sample_weight)
    if sw.ndim == len(shape) - len(row_axes):
        sw = np.expand_dims(sw, row_axes)
    return np.broadcast_to(sw, keep)


def _other_axes(ndim, batch_axis):
    b = batch_axis % ndim
    return tuple(i for i in range(ndim) if i != b)


def row_weighting(rows, shape, row_axes, sample_weight=None, weight=1.0, batch_axis=0):
    """Per-sample losses: rows x sample_weight x weight, mean over every axis but batch_axis."""
    w = row_sample_weight(sample_weight, shape, row_axes)
    with np.errstate(invalid="ignore"):
        return (rows * w * weight).mean(axis=_other_axes(len(shape), batch_axis))


def row_grad_scale(grad, shape, row_axes, sample_weight=None, weight=1.0, batch_axis=0,
                   reduction="none"):
    """d(reduced loss)/d input from d row/d input: x weight x sample_weight / n_rows (rows per
    sample), / batch size for reduction='mean'."""
    nb = shape[batch_axis % len(shape)]
    keep = keep_shape(shape, row_axes)
    n_rows = math.prod(keep) // nb if nb else 1
    out = _f64(grad) * row_sample_weight(sample_weight, shape, row_axes) * (weight / max(n_rows, 1))
    return out / nb if (reduction == "mean" and nb) else out




def expected(kind, inputs, options=None, sample_weight=None, weight=1.0, batch_axis=0,
             reduction="none", class_weight=None):
    """(value, grads) a row-loss object must return, from the references above.

    kind: 'ce' (inputs pred, label), 'kl' (pred, label; grads pred and label), 'cos'
    (input1, input2, label; grads both inputs), 'triplet' (pred, positive, negative; three
    grads), 'focal' (pred, label). options: the loss's constructor options (axis, margin,
    ...). Grads is a tuple in input order; value per sample or reduced."""
    options = dict(options or {})
    w = 1.0 if weight is None else weight
    first = _f64(inputs[0])
    shape = first.shape
    if kind == "ce":
        axis = options.pop("axis", -1)
        rows, *grads = softmax_cross_entropy(*inputs, axis=axis, class_weight=class_weight, **options)
    elif kind == "kl":
        axis = options.pop("axis", -1)
        rows, *grads = kl_div(*inputs, axis=axis, **options)
    elif kind == "cos":
        axis = options.pop("axis", -1)
        rows, *grads = cosine_embedding(*inputs, axis=axis, **options)
    elif kind == "triplet":
        axis = options.pop("axis", None)
        rows, *grads = triplet(*inputs, axis=axis, batch_axis=batch_axis, **options)
    elif kind == "focal":
        axis = options.pop("axis", -1)
        rows, *grads = softmax_focal(*inputs, axis=axis, **options)
    else:
        raise ValueError(kind)
    row_axes = row_axes_of(len(shape), axis, batch_axis)
    value = reduce(row_weighting(rows, shape, row_axes, sample_weight, w, batch_axis), reduction)
    grads = tuple(row_grad_scale(g, shape, row_axes, sample_weight, w, batch_axis, reduction)
                  for g in grads)
    return value, grads


# --------------------------------------------------------------------------- mpmath (50 digits)

MP_DPS = 50


def _mp():
    import mpmath

    return mpmath


def mp_softmax_ce(row, label):
    """-log softmax(row)[label] and its gradient softmax(row) - onehot, at 50 digits, from the
    row's float values taken exactly. Returns (value, [grad_c]) as mpmath numbers; -inf
    entries get probability 0, a -inf labelled entry gives value +inf."""
    mpmath = _mp()
    with mpmath.workdps(MP_DPS):
        xs = [mpmath.mpf(float(v)) for v in row]
        finite = [v for v in xs if mpmath.isfinite(v)]
        m = max(finite)
        es = [mpmath.exp(v - m) if mpmath.isfinite(v) else mpmath.mpf(0) for v in xs]
        s = mpmath.fsum(es)
        if not mpmath.isfinite(xs[label]):
            value = mpmath.inf
        else:
            value = (m - xs[label]) + mpmath.log(s)
        grad = [e / s - (1 if c == label else 0) for c, e in enumerate(es)]
        return value, grad


def mp_log_cosh(x):
    """log(cosh(x)) at 50 digits (x taken exactly), as an mpmath number. Written
    log1p(2 sinh(x/2)^2) (cosh x = 1 + 2 sinh^2(x/2)): log(cosh(1e-30)) at 50 digits would
    round cosh to 1 and give 0, not 5e-61."""
    mpmath = _mp()
    with mpmath.workdps(MP_DPS):
        return mpmath.log1p(2 * mpmath.sinh(mpmath.mpf(float(x)) / 2) ** 2)


def mp_tanh(x):
    mpmath = _mp()
    with mpmath.workdps(MP_DPS):
        return mpmath.tanh(mpmath.mpf(float(x)))
