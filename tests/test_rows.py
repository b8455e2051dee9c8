"""Row losses (reducing over a class axis): SoftmaxCrossEntropyLoss, KLDivLoss,
CosineEmbeddingLoss, TripletLoss, SoftmaxFocalLoss, and the elementwise LogCoshLoss.

Expected values come from tests/row_reference.py (float64 numpy written from Gluon's and
PyTorch's documented math, derivatives by hand), mpmath at 50 digits, hand computation,
MXNet's unit tests (NUMERICS.md) and torch 2.13 (where importable); each test says which.

  1. the Gluon tutorial's example and MXNet's golden values; names and constructor order
  2. every loss and option against the reference, float64 and float32, all reductions
  3. central finite differences (float64) along seeded random directions
  4. extreme inputs: huge logits, shifts, -inf, NaN, empty, confident predictions
  5. errors: out-of-range labels (IndexError naming position and value), non-integral labels
  6. hypothesis-drawn shapes, axes, weights for softmax cross-entropy
  7. torch.nn.functional: cross_entropy, kl_div, cosine_embedding_loss, BCE with pos_weight
  8. log-cosh against mpmath

Tests parametrized with impl="reference" check tests/row_reference.py itself (they pass
without the row losses); impl="losscc" checks the compiled losses.
"""

from __future__ import annotations

import math
import re
import zlib
from dataclasses import dataclass, field

import numpy as np
import pytest
import row_reference as R
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

EPS = {np.float64: float(np.finfo(np.float64).eps),  # 2.220446049250313e-16
       np.float32: float(np.finfo(np.float32).eps)}  # 1.1920928955078125e-07
TINY = {np.float64: float(np.finfo(np.float64).tiny), np.float32: float(np.finfo(np.float32).tiny)}
DTYPES = [pytest.param(np.float64, id="f64"), pytest.param(np.float32, id="f32")]
REDUCTIONS = ("none", "sum", "mean")
IMPLS = ["reference", "losscc"]

# Tolerances against the reference (evaluated in float64 on the dtype-rounded inputs):
#  * float64: 1e-12 relative per element, plus 1e-12 of the array's largest |value| (a
#    gradient entry such as p_y - 1 cancels; its absolute error is what counts). A wrong
#    term or scale is off by O(1).
#  * float32: 16 eps32 relative plus 16 eps32 of the largest |value| (normwise). Measured:
#    torch 2.13's float32 cross_entropy (with class weights and label smoothing, logits
#    up to |x| ~ 30) is within 1.6 eps32 (values) and 2.3 eps32 (gradients) of the
#    float64 reference on that scale; 16 leaves a 7x margin.
RTOL = {np.float64: 1e-12, np.float32: 16 * EPS[np.float32]}


def assert_close(actual, expected, dtype, what, mask=None, floor=0.0):
    """rtol per element plus rtol x the largest |expected| (normwise); `floor` is a scale of
    the terms the result is made of, for arrays whose true value is (near) 0 throughout."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    if mask is not None:  # compare only where the quantity is defined
        actual, expected = actual[mask], expected[mask]
    rtol = RTOL[dtype]
    atol = rtol * max(float(np.max(np.abs(expected))) if expected.size else 0.0, floor)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, err_msg=what)


def grad_floor(case, shape, sw, extra, reduction):
    """The scale of a softmax-CE gradient's terms: p sum(a) - a with a <= max class weight,
    times Gluon's factor weight x sample_weight / n_rows (/ batch for 'mean'). With one class
    the gradient is exactly 0 = a - a: its float32 rounding is relative to this, not to 0."""
    axis = case.opts.get("axis", -1) % len(shape)
    cw = extra.get("class_weight")
    top = 1.0 if cw is None else max(1.0, float(np.max(np.abs(cw))))
    w = 1.0 if case.weight is None else abs(case.weight)
    g = R.row_grad_scale(np.full(shape, top), shape, (axis,), sw, w, case.batch_axis, reduction)
    return float(np.max(np.abs(g))) if g.size else 0.0


def rounded(x, dtype):
    """What a kernel of `dtype` sees: x cast to dtype, returned in float64 (None stays None;
    Python scalars stay scalars)."""
    if x is None:
        return None
    return np.asarray(x, dtype=dtype).astype(np.float64)


def rng_for(*parts) -> np.random.Generator:
    """A generator seeded from the test's ids (crc32: stable across runs and processes)."""
    return np.random.default_rng(zlib.crc32("/".join(map(str, parts)).encode()))


def as_tuple(g):
    return g if isinstance(g, tuple) else (g,)


# --------------------------------------------------------------------------- cases

CLASSES = {"ce": "SoftmaxCrossEntropyLoss", "kl": "KLDivLoss", "cos": "CosineEmbeddingLoss",
           "triplet": "TripletLoss", "focal": "SoftmaxFocalLoss"}
N_DIFF = {"ce": 1, "kl": 2, "cos": 2, "triplet": 3, "focal": 1}  # differentiable inputs, in order


@dataclass(frozen=True)
class RowCase:
    kind: str  # ce, kl, cos, triplet, focal
    id: str
    shape: tuple
    opts: dict = field(default_factory=dict)  # constructor options, also the reference's (axis, ...)
    batch_axis: int = 0
    weight: float | None = 1.0
    sw: object = None  # None, a float, or a shape: sample_weight
    gen: dict = field(default_factory=dict)  # how to draw the inputs (per kind, see make_inputs)

    @property
    def pid(self):
        return f"{self.kind}-{self.id}"


def _sans(shape, axis):
    return shape[:axis] + shape[axis + 1:]


def _gen_ce(case, rng):
    """pred ~ 2 N(0, 1) (log_softmax of it when from_logits: Gluon's pred then holds
    log-probabilities); sparse labels uniform in [0, C), a fraction set to ignore_index;
    dense labels Dirichlet rows (or uniform [0, 1) entries: unnormalized targets)."""
    shape = case.shape
    axis = case.opts.get("axis", -1) % len(shape)
    C = shape[axis]
    pred = rng.normal(size=shape) * 2
    if case.opts.get("from_logits"):
        pred = R.log_softmax(pred, axis)
    lshape = _sans(shape, axis)
    if case.opts.get("sparse_label", True):
        label = rng.integers(0, C, lshape)
        frac = case.gen.get("ignore_frac", 0.0)
        if frac:
            mask = rng.random(lshape) < frac
            mask.flat[0] = True  # at least one ignored row ...
            if frac < 1:
                mask.flat[-1] = False  # ... and one that counts
            else:
                mask[...] = True
            label = np.where(mask, case.opts.get("ignore_index", -100), label)
        form = case.gen.get("label_form", "int64")
        if form == "keepdims":
            label = np.expand_dims(label, axis)
        else:
            label = label.astype(form)
    elif case.gen.get("unnormalized"):
        label = rng.uniform(0.0, 1.0, shape)
    else:
        label = np.moveaxis(rng.dirichlet(np.ones(C), size=lshape), -1, axis)
    extra = {"class_weight": rng.uniform(0.3, 2.0, C)} if case.gen.get("class_weight") else {}
    return [pred, label], extra


def _gen_kl(case, rng):
    """Targets t: Dirichlet rows kept >= ~0.04 (so t log t and its derivative stay smooth for
    finite differences), some entries set to exactly 0 when gen['zeros']."""
    shape = case.shape
    axis = case.opts.get("axis", -1) % len(shape)
    C = shape[axis]
    raw = rng.normal(size=shape)
    pred = R.log_softmax(raw, axis) if case.opts.get("from_logits", True) else 2 * raw
    t = np.moveaxis(rng.dirichlet(np.ones(C), size=_sans(shape, axis)), -1, axis)
    t = (t + 0.05) / (1 + 0.05 * C)
    if case.gen.get("zeros"):
        t = np.where(rng.random(shape) < 0.25, 0.0, t)
    return [pred, t], {}


def _gen_cos(case, rng):
    """Pairs with a prescribed cosine c: b = r (c a/|a| + sqrt(1 - c^2) u), u a unit vector
    orthogonal to a, |a| ~ N, r in [0.5, 2]. Label 1: c in [-0.9, 0.9]; label -1: half with
    c - margin in [0.1, 0.9 - margin] (inside the clip), half with c - margin <= -0.1: every
    row at least 0.1 from a kink."""
    shape = case.shape
    axis = case.opts.get("axis", -1) % len(shape)
    margin = case.opts.get("margin", 0.0)
    lshape = _sans(shape, axis)
    D = shape[axis]
    a = rng.normal(size=lshape + (D,))
    ah = a / np.linalg.norm(a, axis=-1, keepdims=True)
    u = rng.normal(size=lshape + (D,))
    u -= np.sum(u * ah, axis=-1, keepdims=True) * ah
    u /= np.linalg.norm(u, axis=-1, keepdims=True)
    labels = rng.choice(case.gen.get("labels", [1, -1]), lshape)
    active = rng.random(lshape) < 0.5
    c = np.where(labels == 1, rng.uniform(-0.9, 0.9, lshape),
                 np.where(active, margin + rng.uniform(0.1, 0.9 - margin, lshape),
                          rng.uniform(-0.9, margin - 0.1, lshape)))
    r = rng.uniform(0.5, 2.0, lshape)[..., None]
    b = r * (c[..., None] * ah + np.sqrt(1 - c * c)[..., None] * u)
    return [np.moveaxis(a, -1, axis), np.moveaxis(b, -1, axis), labels.astype(float)], {}


def _gen_triplet(case, rng):
    """Normal triplets, redrawn until every row's s + margin is at least 0.2 from the kink."""
    shape = case.shape
    margin = case.opts.get("margin", 1.0)
    axes = R.row_axes_of(len(shape), case.opts.get("axis"), case.batch_axis)
    for _ in range(1000):
        p, q, r = (rng.normal(size=shape) for _ in range(3))
        s = np.sum((q - p) ** 2 - (r - p) ** 2, axis=axes) + margin
        if np.all(np.abs(s) >= 0.2) and np.any(s > 0) and np.any(s < 0):
            return [p, q, r], {}
    raise AssertionError("no triplet away from the kink")


def _gen_focal(case, rng):
    shape = case.shape
    axis = case.opts.get("axis", -1) % len(shape)
    return [rng.normal(size=shape) * 2, rng.integers(0, shape[axis], _sans(shape, axis))], {}


GENERATORS = {"ce": _gen_ce, "kl": _gen_kl, "cos": _gen_cos, "triplet": _gen_triplet,
              "focal": _gen_focal}


def make_inputs(case, rng):
    """(inputs in float64 / integer labels, extra call kwargs, sample_weight)."""
    inputs, extra = GENERATORS[case.kind](case, rng)
    sw = case.sw
    if isinstance(sw, tuple):
        sw = rng.uniform(0.2, 2.0, sw)
    return inputs, extra, sw


def ce(id, shape, **kw):
    return RowCase("ce", id, shape, **kw)


CASES = [
    # ---- softmax cross-entropy, sparse labels: axes, batch axes, sample_weight shapes
    ce("2d", (6, 5)),
    ce("2d_axis1_sw_B_w1.5", (6, 5), opts={"axis": 1}, sw=(6,), weight=1.5),
    ce("2d_sw_B1", (6, 5), sw=(6, 1), weight=0.5),
    ce("2d_sw_scalar", (6, 5), sw=2.5),
    ce("2d_weight_None", (6, 5), weight=None),
    ce("2d_axis0_batch1_sw_1B", (5, 6), opts={"axis": 0}, batch_axis=1, sw=(1, 6), weight=0.5),
    ce("2d_axis0_batch1_sw_B", (5, 6), opts={"axis": 0}, batch_axis=1, sw=(6,)),
    ce("3d_axis1_sw_rows", (4, 5, 3), opts={"axis": 1}, sw=(4, 3), weight=0.7),
    ce("3d_axis1_batch2_sw_keep", (3, 5, 4), opts={"axis": 1}, batch_axis=2, sw=(3, 1, 4)),
    ce("3d_axis-1_batch1_sw_1B1", (3, 4, 5), batch_axis=1, sw=(1, 4, 1), weight=1.3),
    ce("3d_axis-2_batch-1_sw_B", (3, 5, 4), opts={"axis": -2}, batch_axis=-1, sw=(4,)),
    ce("4d_axis1_sw_rows", (2, 4, 3, 2), opts={"axis": 1}, sw=(2, 3, 2), weight=0.9),
    ce("C1", (4, 1)),
    # ---- label forms
    ce("label_keepdims", (6, 5), gen={"label_form": "keepdims"}),
    ce("3d_axis1_label_keepdims", (3, 5, 4), opts={"axis": 1}, gen={"label_form": "keepdims"}),
    ce("label_int32", (6, 5), gen={"label_form": "int32"}),
    ce("label_int8", (6, 5), gen={"label_form": "int8"}),
    ce("label_uint8", (6, 5), gen={"label_form": "uint8"}),
    ce("label_float64", (6, 5), gen={"label_form": "float64"}),
    ce("label_float32", (6, 5), gen={"label_form": "float32"}),
    # ---- non-contiguous predictions
    ce("strided", (6, 5), gen={"layout": "strided"}),
    ce("fortran_3d_axis1", (3, 5, 4), opts={"axis": 1}, gen={"layout": "fortran"}),
    # ---- from_logits, label smoothing, ignore_index, class weights
    ce("from_logits", (6, 5), opts={"from_logits": True}),
    ce("from_logits_3d_axis1_sw", (3, 5, 4), opts={"axis": 1, "from_logits": True}, sw=(3, 4)),
    ce("smoothing0.1", (6, 5), opts={"label_smoothing": 0.1}),
    ce("smoothing0.2_cw_3d_axis1", (3, 5, 4), opts={"axis": 1, "label_smoothing": 0.2},
       gen={"class_weight": True}, sw=(3, 1, 4), weight=0.8),
    ce("smoothing_from_logits", (6, 5), opts={"label_smoothing": 0.1, "from_logits": True}),
    ce("class_weight", (6, 5), gen={"class_weight": True}),
    ce("class_weight_from_logits", (6, 5), opts={"from_logits": True}, gen={"class_weight": True}),
    ce("ignore_default_mixed", (8, 5), gen={"ignore_frac": 0.3}, sw=(8,)),
    ce("ignore-1_3d_axis1", (3, 5, 4), opts={"axis": 1, "ignore_index": -1},
       gen={"ignore_frac": 0.3}, sw=(3, 4), weight=1.2),
    ce("ignore_in_range_2", (8, 5), opts={"ignore_index": 2}, gen={"ignore_frac": 0.3}),
    ce("ignore_all", (4, 5), gen={"ignore_frac": 1.0}),
    ce("ignore_smoothing_cw", (8, 5), opts={"label_smoothing": 0.1},
       gen={"ignore_frac": 0.3, "class_weight": True}),
    ce("ignore_float_label", (8, 5), gen={"ignore_frac": 0.3, "label_form": "float64"}),
    # ---- dense (probability) labels
    ce("dense", (6, 5), opts={"sparse_label": False}),
    ce("dense_axis0_batch1_sw", (5, 6), opts={"axis": 0, "sparse_label": False}, batch_axis=1,
       sw=(6,), weight=2.0),
    ce("dense_3d_axis1_sw", (3, 5, 4), opts={"axis": 1, "sparse_label": False}, sw=(3, 4)),
    ce("dense_smoothing_cw", (6, 5), opts={"sparse_label": False, "label_smoothing": 0.15},
       gen={"class_weight": True}),
    ce("dense_from_logits", (6, 5), opts={"sparse_label": False, "from_logits": True}),
    ce("dense_unnormalized", (6, 5), opts={"sparse_label": False}, gen={"unnormalized": True}),
    # ---- KL divergence (label gradient compared where t > 0)
    RowCase("kl", "2d", (6, 5)),
    RowCase("kl", "2d_zeros", (6, 5), gen={"zeros": True}),
    RowCase("kl", "2d_not_from_logits", (6, 5), opts={"from_logits": False}, sw=(6,), weight=1.5),
    RowCase("kl", "2d_axis0_batch1", (5, 6), opts={"axis": 0}, batch_axis=1, sw=(1, 6)),
    RowCase("kl", "3d_axis1_batch2_sw", (3, 5, 4), opts={"axis": 1}, batch_axis=2, sw=(3, 1, 4),
            weight=0.5),
    RowCase("kl", "3d_axis-1_sw_rows_not_from_logits", (3, 4, 5), opts={"from_logits": False},
            sw=(3, 4), gen={"zeros": True}),
    # ---- cosine embedding (both gradients)
    RowCase("cos", "2d_margin0", (8, 5)),
    RowCase("cos", "2d_margin0.3_sw", (8, 5), opts={"margin": 0.3}, sw=(8,), weight=1.5),
    RowCase("cos", "2d_axis0_batch1", (5, 8), opts={"axis": 0, "margin": 0.2}, batch_axis=1,
            sw=(1, 8)),
    RowCase("cos", "3d_axis1_sw_rows", (3, 6, 4), opts={"axis": 1, "margin": 0.2}, sw=(3, 4)),
    RowCase("cos", "other_labels", (12, 4), opts={"margin": 0.1}, gen={"labels": [1, -1, 0, 2]}),
    # ---- triplet (three gradients)
    RowCase("triplet", "2d", (6, 4)),
    RowCase("triplet", "2d_margin0.5_sw_B1_w2", (6, 4), opts={"margin": 0.5}, sw=(6, 1), weight=2.0),
    RowCase("triplet", "2d_sw_B", (6, 4), sw=(6,)),
    RowCase("triplet", "3d_axisNone", (4, 3, 2), opts={"margin": 2.0}),
    RowCase("triplet", "3d_axisNone_batch1_sw_B", (3, 4, 2), batch_axis=1, sw=(4,), weight=0.5),
    RowCase("triplet", "3d_axis-1_sw_rows", (4, 3, 5), opts={"axis": -1}, sw=(4, 3)),
    # ---- softmax focal
    RowCase("focal", "2d_gamma2", (6, 5)),
    RowCase("focal", "2d_gamma0", (6, 5), opts={"gamma": 0.0}),
    RowCase("focal", "3d_axis1_gamma0.5_sw", (3, 5, 4), opts={"axis": 1, "gamma": 0.5}, sw=(3, 4)),
    RowCase("focal", "2d_axis0_batch1_gamma1.5", (5, 6), opts={"axis": 0, "gamma": 1.5},
            batch_axis=1, weight=0.7),
]
CASE_PARAMS = [pytest.param(c, id=c.pid) for c in CASES]
BY_ID = {c.pid: c for c in CASES}


def make_loss(losses, case, reduction="none"):
    return getattr(losses, CLASSES[case.kind])(**case.opts, weight=case.weight,
                                               batch_axis=case.batch_axis, reduction=reduction)


def _layout(x, how):
    if how == "strided":  # every other element of a longer last axis
        big = np.full(x.shape[:-1] + (2 * x.shape[-1],), np.nan, dtype=x.dtype)
        big[..., ::2] = x
        return big[..., ::2]
    if how == "fortran":
        return np.asfortranarray(x)
    return x


def losscc_args(case, inputs, dtype):
    """The arrays passed to losscc: the differentiable inputs in `dtype` (pred in its
    layout), labels as drawn (the runtime casts float labels to pred's dtype)."""
    n = N_DIFF[case.kind]
    args = [np.asarray(x, dtype=dtype) for x in inputs[:n]] + list(inputs[n:])
    args[0] = _layout(args[0], case.gen.get("layout"))
    return args


def reference_args(case, inputs, dtype):
    """The same inputs as the kernel sees them: every float array rounded to dtype."""
    return [rounded(x, dtype) if np.asarray(x).dtype.kind == "f" else x for x in inputs]


def run_losscc(losses, case, args, sw, extra, reduction):
    """(value, grads tuple) from losscc's value_and_grad; KL with its label gradient too."""
    kw = dict(extra)
    if case.kind == "kl":
        kw["wrt"] = ("pred", "label")
    value, grads = make_loss(losses, case, reduction).value_and_grad(*args, sample_weight=sw, **kw)
    return value, as_tuple(grads)


def run_reference(case, args, sw, extra, reduction):
    return R.expected(case.kind, args, options=case.opts, sample_weight=sw, weight=case.weight,
                      batch_axis=case.batch_axis, reduction=reduction, **extra)


def grad_masks(case, inputs):
    """Where each gradient is defined: KL's label gradient only where t > 0."""
    masks = [None] * N_DIFF[case.kind]
    if case.kind == "kl":
        masks[1] = np.asarray(inputs[1]) > 0
    return masks


def n_batch(case):
    return case.shape[case.batch_axis % len(case.shape)]


# --------------------------------------------------------------------------- 1. tutorial, golden values, names

# mpmath (50 digits), row_reference.mp_softmax_ce: -log softmax and softmax - onehot
TUTORIAL_VALUE = [9.000123402189724, 6.00247568513773]      # [1, 10] label 0; [8, 2] label 1
TUTORIAL_GRAD = [[-0.9998766054240138, 0.9998766054240138],
                 [0.9975273768433652, -0.9975273768433652]]
GOLDEN_TRUE = [2.1269280110429727, 0.04858735157374206]     # [0, 2] label 0; [1, 4] label 1
GOLDEN_GRAD = [[-0.8807970779778824, 0.8807970779778824],
               [0.04742587317756678, -0.04742587317756678]]


@pytest.mark.parametrize("dtype", DTYPES)
def test_tutorial_softmax_cross_entropy_example(losses, dtype):
    """The tutorial: loss = gloss.SoftmaxCrossEntropyLoss(); x = nd.array([[1, 10], [8, 2]]);
    y = nd.array([0, 1]) (float labels, as nd.array makes them); loss(x, y). Expected values
    by mpmath; value_and_grad's gradient is softmax - onehot (mpmath)."""
    loss = losses.SoftmaxCrossEntropyLoss()
    x = np.array([[1, 10], [8, 2]], dtype=dtype)
    y = np.array([0.0, 1.0], dtype=dtype)
    value, grad = loss.value_and_grad(x, y)
    assert value.dtype == grad.dtype == dtype and value.shape == (2,) and grad.shape == (2, 2)
    eps = EPS[dtype]
    np.testing.assert_allclose(loss(x, y), TUTORIAL_VALUE, rtol=4 * eps)
    np.testing.assert_allclose(value, TUTORIAL_VALUE, rtol=4 * eps)
    np.testing.assert_allclose(grad, TUTORIAL_GRAD, rtol=4 * eps, atol=4 * eps)
    np.testing.assert_allclose(loss.grad(x, y), TUTORIAL_GRAD, rtol=4 * eps, atol=4 * eps)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sw,golden", [
    (None, [2.12692809, 0.04858733]),
    ([[0.5], [1.0]], [1.06346405, 0.04858733]),
    ([0.5, 1.0], [1.06346405, 0.04858733]),  # a (batch,) weight: pred.ndim - 1 dims
], ids=["no_sw", "sw_B1", "sw_B"])
def test_mxnet_golden_values(losses, sw, golden, dtype):
    """MXNet's unit test (NUMERICS.md): SoftmaxCE on [[0, 2], [1, 4]], labels [0, 1]. MXNet's
    numbers are its float32 outputs to 8 digits (the mpmath values 2.1269280110429727 and
    0.04858735157374206 differ from them by 4e-8 and 4e-7 relative): compared at 1e-6, and
    against mpmath at a few eps. Sample weight passed positionally, as Gluon calls it."""
    loss = losses.SoftmaxCrossEntropyLoss()
    pred = np.array([[0, 2], [1, 4]], dtype=dtype)
    label = np.array([0, 1])
    value, grad = loss.value_and_grad(pred, label, None if sw is None else np.array(sw))
    np.testing.assert_allclose(value, golden, rtol=1e-6)
    scale = np.array([1.0, 1.0]) if sw is None else np.ravel(sw)
    eps = EPS[dtype]
    np.testing.assert_allclose(value, np.array(GOLDEN_TRUE) * scale, rtol=4 * eps)
    np.testing.assert_allclose(grad, np.array(GOLDEN_GRAD) * scale[:, None], rtol=4 * eps,
                               atol=4 * eps)


def test_gluon_names_are_aliases(losses):
    assert losses.SoftmaxCrossEntropyLoss is losses.SoftmaxCELoss is losses.softmax_cross_entropy
    assert losses.KLDivLoss is losses.kl_div
    assert losses.SoftmaxFocalLoss is losses.softmax_focal
    for name in ("CosineEmbeddingLoss", "TripletLoss", "LogCoshLoss"):
        assert hasattr(losses, name), name


@pytest.mark.parametrize("cls_name,positional,keywords,inputs", [
    # Gluon's constructor orders (mxnet/gluon/loss.py)
    ("SoftmaxCrossEntropyLoss", (0, True, False, 2.0, 1),
     {"axis": 0, "sparse_label": True, "from_logits": False, "weight": 2.0, "batch_axis": 1}, "ce_t"),
    ("KLDivLoss", (False, 0, 0.5, 1),
     {"from_logits": False, "axis": 0, "weight": 0.5, "batch_axis": 1}, "kl_t"),
    ("CosineEmbeddingLoss", (1.5, 0, 0.25), {"weight": 1.5, "batch_axis": 0, "margin": 0.25}, "cos"),
    ("TripletLoss", (0.5, 2.0, 0), {"margin": 0.5, "weight": 2.0, "batch_axis": 0}, "triplet"),
    ("SoftmaxFocalLoss", (0, 1.5, 2.0, 1),
     {"axis": 0, "gamma": 1.5, "weight": 2.0, "batch_axis": 1}, "ce_t"),
])
def test_gluon_positional_constructor_order(losses, cls_name, positional, keywords, inputs):
    rng = rng_for("positional", cls_name)
    if inputs == "ce_t":  # classes on axis 0, batch on axis 1
        args = [rng.normal(size=(4, 5)), rng.integers(0, 4, 5)]
    elif inputs == "kl_t":
        args = [rng.normal(size=(4, 5)), rng.dirichlet(np.ones(4), 5).T]
    elif inputs == "cos":
        args = [rng.normal(size=(5, 4)), rng.normal(size=(5, 4)), np.array([1, -1, 1, -1, -1.0])]
    else:
        args = [rng.normal(size=(5, 4)) for _ in range(3)]
    cls = getattr(losses, cls_name)
    np.testing.assert_array_equal(cls(*positional)(*args), cls(**keywords)(*args))


def test_batch_axis_equal_to_class_axis_is_an_error(losses):
    pred, label = np.zeros((3, 4)), np.zeros(3, dtype=np.int64)
    for kwargs in ({"axis": 0, "batch_axis": 0}, {"axis": -1, "batch_axis": 1},
                   {"axis": 1, "batch_axis": -1}):
        with pytest.raises(ValueError):
            losses.SoftmaxCrossEntropyLoss(**kwargs)(pred, label)


# --------------------------------------------------------------------------- 2. against the reference


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_matches_reference(losses, case, dtype):
    """Value (call and value_and_grad), gradients (value_and_grad and grad) of every case,
    every reduction, against row_reference.expected on the dtype-rounded inputs."""
    inputs, extra, sw = make_inputs(case, rng_for(case.pid))
    args = losscc_args(case, inputs, dtype)
    r_args = reference_args(case, inputs, dtype)
    r_extra = {k: rounded(v, dtype) for k, v in extra.items()}
    masks = grad_masks(case, inputs)
    nb = n_batch(case)
    for reduction in REDUCTIONS:
        what = f"{case.pid} {np.dtype(dtype).name} reduction={reduction}"
        loss = make_loss(losses, case, reduction)
        ev, egs = run_reference(case, r_args, rounded(sw, dtype), r_extra, reduction)
        value = loss(*args, sample_weight=sw, **extra)
        v2, grads = run_losscc(losses, case, args, sw, extra, reduction)
        g_only = as_tuple(loss.grad(*args, sample_weight=sw, **extra))
        v3, g_default = loss.value_and_grad(*args, sample_weight=sw, **extra)
        assert np.shape(value) == ((nb,) if reduction == "none" else ()), what
        for v in (value, v2, v3):
            assert np.asarray(v).dtype == dtype, what
            assert_close(v, ev, dtype, what + " value")
        assert len(grads) == N_DIFF[case.kind], what
        floor = grad_floor(case, case.shape, sw, extra, reduction) if case.kind == "ce" else 0.0
        for i, (g, eg, m) in enumerate(zip(grads, egs, masks)):
            assert g.shape == np.shape(inputs[i]) and g.dtype == dtype, what + f" grad {i}"
            assert_close(g, eg, dtype, what + f" grad {i}", mask=m, floor=floor)
        # without wrt, and grad(): the gradient w.r.t. pred alone (KL), or all of them
        n_default = 1 if case.kind == "kl" else N_DIFF[case.kind]
        for name, gs in (("value_and_grad default", as_tuple(g_default)), ("grad()", g_only)):
            assert len(gs) == n_default, what + " " + name
            for i, g in enumerate(gs):
                assert_close(g, egs[i], dtype, f"{what} {name} grad {i}", mask=masks[i], floor=floor)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ignored_rows_are_exactly_zero_and_mean_divides_by_batch(losses, dtype):
    """By hand: zero logits over 2 classes give log 2 per counted row, gradient
    softmax - onehot = +-1/2. Rows labelled ignore_index give exactly 0 and gradient 0, even
    with label smoothing and class weights; reduction='mean' is the sum over the batch size
    (4), not over the non-ignored rows (PyTorch's mean would give log 2 here)."""
    pred = np.zeros((4, 2), dtype=dtype)
    label = np.array([0, -100, 1, -100])
    value, grad = losses.SoftmaxCrossEntropyLoss().value_and_grad(pred, label)
    np.testing.assert_allclose(value, [math.log(2), 0, math.log(2), 0], rtol=2 * EPS[dtype])
    np.testing.assert_array_equal(grad, [[-0.5, 0.5], [0, 0], [0.5, -0.5], [0, 0]])
    mean, gmean = losses.SoftmaxCrossEntropyLoss(reduction="mean").value_and_grad(pred, label)
    np.testing.assert_allclose(mean, math.log(2) / 2, rtol=2 * EPS[dtype])
    np.testing.assert_array_equal(gmean, [[-0.125, 0.125], [0, 0], [0.125, -0.125], [0, 0]])
    rng = rng_for("ignored", np.dtype(dtype).name)
    x = rng.normal(size=(4, 3)).astype(dtype)
    loss = losses.SoftmaxCrossEntropyLoss(label_smoothing=0.2, ignore_index=-1)
    v, g = loss.value_and_grad(x, np.array([2, -1, 0, -1]), class_weight=np.array([0.5, 2.0, 1.5]))
    assert v[1] == 0 and v[3] == 0 and np.all(g[[1, 3]] == 0)
    assert np.all(v[[0, 2]] > 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_identities_between_losses(losses, dtype):
    """Identities of the math (by hand):
      * SoftmaxFocalLoss(gamma=0) = SoftmaxCrossEntropyLoss (value and gradient);
      * C * KL(pred, t) [from_logits=False] = dense CE(pred, t) + sum_c xlogy(t_c, t_c);
      * sparse CE = dense CE on the one-hot label."""
    rng = rng_for("identities", np.dtype(dtype).name)
    x = (rng.normal(size=(6, 5)) * 2).astype(dtype)
    y = rng.integers(0, 5, 6)
    vc, gc = losses.SoftmaxCrossEntropyLoss().value_and_grad(x, y)
    vf, gf = losses.SoftmaxFocalLoss(gamma=0.0).value_and_grad(x, y)
    assert_close(vf, vc, dtype, "focal(gamma=0) value")
    assert_close(gf, gc, dtype, "focal(gamma=0) grad")
    onehot = np.eye(5)[y]
    vd, gd = losses.SoftmaxCrossEntropyLoss(sparse_label=False).value_and_grad(x, onehot)
    assert_close(vd, vc, dtype, "dense one-hot value")
    assert_close(gd, gc, dtype, "dense one-hot grad")
    t = rng.dirichlet(np.ones(5), 6)
    vk, gk = losses.KLDivLoss(from_logits=False).value_and_grad(x, t)
    vdt, gdt = losses.SoftmaxCrossEntropyLoss(sparse_label=False).value_and_grad(x, t)
    tr = rounded(t, dtype)
    assert_close(5 * vk, vdt + np.sum(tr * np.log(tr), axis=1), dtype, "KL vs CE value")
    assert_close(5 * gk, gdt, dtype, "KL vs CE grad")


@pytest.mark.parametrize("dtype", DTYPES)
def test_sigmoid_bce_equals_two_class_softmax_ce_from_logits(losses, dtype):
    """NUMERICS.md: sigmoid BCE(from_sigmoid) equals softmax CE(from_logits) on log([1-p, p]).
    Gluon's BCE adds 1e-12 inside its logs, so they agree to ~1e-12/p relative (p >= 0.05)."""
    rng = rng_for("bce-ce", np.dtype(dtype).name)
    p = rng.uniform(0.05, 0.95, 8)
    z = (rng.random(8) < 0.5).astype(np.int64)
    vb = losses.SigmoidBCELoss(from_sigmoid=True)(p.astype(dtype), z.astype(float))
    lp = np.log(np.stack([1 - p, p], axis=1)).astype(dtype)
    vc = losses.SoftmaxCrossEntropyLoss(from_logits=True)(lp, z)
    tol = 1e-10 if dtype == np.float64 else 16 * EPS[dtype]
    np.testing.assert_allclose(vc, vb, rtol=tol)


# --------------------------------------------------------------------------- 3. finite differences

FD_STEP = 3e-6
# Central differences in float64 with h = 3e-6 along a normal direction: truncation
# h^2/6 |f'''| and rounding eps |f| / h are both below 1e-9 relative for these inputs (no
# kinks within 0.1, targets t >= 0.04); 1e-7 leaves a margin while a wrong derivative (a
# factor, a sign, a dropped term) is off by O(1). Same recipe as test_losses.py.
FD_RTOL = 1e-7


def _fd_close(analytic, numeric, scale):
    return abs(analytic - numeric) <= FD_RTOL * max(abs(analytic), abs(numeric)) + 1e-12 * scale


FD_CASES = [pytest.param(c, id=c.pid) for c in CASES
            if not c.gen.get("layout") and c.id not in ("C1", "ignore_all")
            and not c.id.startswith("label_")]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", FD_CASES)
def test_finite_differences(request, case, impl):
    """u . grad against (f(x + h u) - f(x - h u)) / 2h for each differentiable input, with
    reduction 'sum' and 'mean' (float64; KL's label directions are 0 where t == 0)."""
    rng = rng_for("fd", case.pid)
    inputs, extra, sw = make_inputs(case, rng)
    masks = grad_masks(case, inputs)
    if impl == "losscc":
        losses = request.getfixturevalue("losses")
        run = lambda xs, red: run_losscc(losses, case, xs, sw, extra, red)
    else:
        run = lambda xs, red: run_reference(case, xs, sw, extra, red)
    for reduction in ("sum", "mean"):
        value, grads = run(list(inputs), reduction)
        base = abs(float(value))
        for i, g in enumerate(grads):
            u = rng.normal(size=np.shape(inputs[i]))
            if masks[i] is not None:
                u = np.where(masks[i], u, 0.0)
            ug = np.where(u == 0, 0.0, u * np.asarray(g, dtype=np.float64))
            directional = float(np.sum(ug))

            def f(t, i=i, u=u, reduction=reduction):
                xs = list(inputs)
                xs[i] = np.asarray(inputs[i], dtype=np.float64) + t * u
                return float(run(xs, reduction)[0])

            numeric = (f(FD_STEP) - f(-FD_STEP)) / (2 * FD_STEP)
            scale = float(np.sum(np.abs(ug))) + base
            assert _fd_close(directional, numeric, scale), \
                (f"{case.pid} {reduction} input {i}", directional, numeric)


# --------------------------------------------------------------------------- 4. extremes (softmax CE)


def _mp_rows(x, labels):
    """mpmath values and gradients (as float64) of -log softmax(row)[label] for 2-D x."""
    vals, grads = [], []
    for row, y in zip(np.asarray(x, np.float64), labels):
        v, g = R.mp_softmax_ce(row, int(y))
        vals.append(float(v))
        grads.append([float(e) for e in g])
    return np.array(vals), np.array(grads)


@pytest.mark.parametrize("dtype", DTYPES)
def test_huge_logits_are_finite_and_within_a_few_ulps(losses, dtype):
    """Logits of magnitude up to 3e4: distinct multiples of 1e3 (so every gap is >= 1000 and
    the probabilities are exactly 0 and 1 after rounding: the far-apart case with gaps below
    745 has its own test), plus rows 1e4 + [0, 0.5, 1, 2] and -1e4 + [...] (exact in float32:
    ulp(1e4) = 2^-10) where the softmax is not degenerate. Truth: mpmath on the inputs.
    Values within 4 ulps (absolute floor: the smallest normal number, for true values like
    e^-1000); gradients within 4 eps absolute (entries are in [-1, 1]) and 4 eps relative."""
    rng = rng_for("huge", np.dtype(dtype).name)
    far = np.array([rng.choice(np.arange(-30, 31), 4, replace=False) for _ in range(6)]) * 1e3
    x = np.concatenate([far,
                        1e4 + np.array([[0, 0.5, 1, 2], [2, 1, 0.5, 0]]),
                        -1e4 + np.array([[0, 0.5, 1, 2], [2, 1, 0.5, 0]])]).astype(dtype)
    y = np.concatenate([rng.integers(0, 4, 6), [0, 1, 3, 2]])
    value, grad = losses.SoftmaxCrossEntropyLoss().value_and_grad(x, y)
    assert np.all(np.isfinite(value)) and np.all(np.isfinite(grad))
    mv, mg = _mp_rows(x, y)
    eps = EPS[dtype]
    np.testing.assert_allclose(value, mv, rtol=4 * eps, atol=TINY[dtype])
    np.testing.assert_allclose(grad, mg, rtol=4 * eps, atol=4 * eps)


@pytest.mark.parametrize("dtype", DTYPES)
def test_far_apart_logits_keep_relative_accuracy_of_small_probabilities(losses, dtype):
    """NUMERICS.md: exp(a - b) amplifies the rounding of a - b by |a - b|; where the bound
    counts (softmax CE of far-apart logits, both dtypes) the difference must be exact
    (two-sum). Rows with logits of both signs and differences of ~600 (float64) or ~80
    (float32): the probability e^(x_c - m) of a non-label class is a normal number and must
    be within 8 ulps of mpmath; values within 4 ulps."""
    if dtype == np.float64:
        x = np.array([[300.1, -300.2, 0.3], [-250.7, 349.9, 10.1], [0.1, 350.3, -350.6]])
    else:
        x = np.array([[40.1, -40.2, 0.3], [-35.7, 44.9, 1.1], [0.1, 42.3, -42.6]])
    x = x.astype(dtype)
    y = np.array([2, 2, 0])  # the tiny probabilities are at non-label classes
    value, grad = losses.SoftmaxCrossEntropyLoss().value_and_grad(x, y)
    mv, mg = _mp_rows(x, y)
    eps = EPS[dtype]
    np.testing.assert_allclose(value, mv, rtol=4 * eps)
    nonlabel = np.ones(x.shape, bool)
    nonlabel[np.arange(3), y] = False
    assert np.all(np.abs(mg[nonlabel]) >= TINY[dtype])  # the test is about normal numbers
    np.testing.assert_allclose(grad[nonlabel], mg[nonlabel], rtol=8 * eps, atol=0)
    np.testing.assert_allclose(grad[~nonlabel], mg[~nonlabel], rtol=4 * eps, atol=4 * eps)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("dtype", DTYPES)
def test_shift_invariance(losses, dtype, smoothing):
    """Adding 1e6 to every logit of a row changes nothing mathematically. Base logits are
    multiples of 1/16 in [-4, 4], so base + 1e6 is exact in float32 too (ulp(1e6) = 1/16 in
    float32): any difference is the kernel's rounding, allowed 4 eps (values relative,
    gradients absolute)."""
    rng = rng_for("shift", np.dtype(dtype).name, smoothing)
    base = (rng.integers(-64, 65, (5, 6)) / 16.0).astype(dtype)
    shifted = base + dtype(1e6)
    np.testing.assert_array_equal(shifted.astype(np.float64) - 1e6, base.astype(np.float64))
    y = rng.integers(0, 6, 5)
    loss = losses.SoftmaxCrossEntropyLoss(label_smoothing=smoothing)
    v0, g0 = loss.value_and_grad(base, y)
    v1, g1 = loss.value_and_grad(shifted, y)
    eps = EPS[dtype]
    assert np.all(np.isfinite(v1)) and np.all(np.isfinite(g1))
    np.testing.assert_allclose(v1, v0, rtol=4 * eps, atol=4 * eps)
    np.testing.assert_allclose(g1, g0, rtol=0, atol=4 * eps)
    ev, eg = R.softmax_cross_entropy(base.astype(np.float64), y, label_smoothing=smoothing)
    np.testing.assert_allclose(v1, ev[:, 0], rtol=8 * eps, atol=8 * eps)  # vs the reference
    np.testing.assert_allclose(g1, eg, rtol=0, atol=8 * eps)


@pytest.mark.parametrize("shift", [0.0, 1e6, -1e6, 1e8])
@pytest.mark.parametrize("C", [2, 3, 7, 1000])
@pytest.mark.parametrize("dtype", DTYPES)
def test_uniform_logits_give_log_C(losses, dtype, C, shift):
    """NUMERICS.md: uniform logits (+1e6, float32 too) give log C within 2 eps; by hand the
    gradient is 1/C - onehot. At 1e8 in float32, m + log(s) - x_y evaluates to exactly 0:
    the loss must still be log C (order of operations)."""
    x = np.full((3, C), shift, dtype=dtype)
    y = np.array([0, C - 1, C // 2])
    value, grad = losses.SoftmaxCrossEntropyLoss().value_and_grad(x, y)
    eps = EPS[dtype]
    np.testing.assert_allclose(value, np.full(3, math.log(C)), rtol=2 * eps)
    want = np.full((3, C), 1.0 / C)
    want[np.arange(3), y] -= 1.0
    np.testing.assert_allclose(grad, want, rtol=2 * eps, atol=2 * eps)


@pytest.mark.parametrize("opts", [{}, {"label_smoothing": 0.1}, {"sparse_label": False}],
                         ids=["sparse", "smoothing", "dense"])
@pytest.mark.parametrize("scale", [1.0, 30.0, 1e3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gradient_rows_sum_to_zero(losses, dtype, scale, opts):
    """d row / d x = p sum(a) - a sums to sum(a) (sum(p) - 1) = 0 over a row for any target
    (by hand). Allowed: 2 C eps (the rounding of sum(p), times sum(a) = 1)."""
    rng = rng_for("rowsum", np.dtype(dtype).name, scale, *opts)
    C = 7
    x = (rng.normal(size=(5, 4, C)) * scale).astype(dtype)
    y = rng.dirichlet(np.ones(C), (5, 4)) if opts.get("sparse_label") is False \
        else rng.integers(0, C, (5, 4))
    grad = losses.SoftmaxCrossEntropyLoss(**opts).grad(x, y)
    n_rows = 4  # the per-sample mean over 4 rows scales every row by 1/4
    sums = n_rows * grad.astype(np.float64).sum(axis=-1)
    assert np.all(np.abs(sums) <= 2 * C * EPS[dtype]), np.abs(sums).max()


@pytest.mark.parametrize("dtype", DTYPES)
def test_minus_inf_logits(losses, dtype):
    """A -inf logit is probability 0: by mpmath, [0, -inf, 1] label 0 gives
    log(1 + e) = 1.3132616875182228 and gradient [-1/(1+e), 0, e/(1+e)]; [2, 0, -inf]
    label 1 gives 2 + log1p(e^-2) = 2.1269280110429727. A labelled -inf logit gives +inf,
    and leaves the other rows alone."""
    x = np.array([[0, -np.inf, 1], [2, 0, -np.inf], [0, -np.inf, 1], [1, 2, 3]], dtype=dtype)
    y = np.array([0, 1, 1, 2])
    value, grad = losses.SoftmaxCrossEntropyLoss().value_and_grad(x, y)
    clean_v, clean_g = losses.SoftmaxCrossEntropyLoss().value_and_grad(x[[0, 1, 3]], y[[0, 1, 3]])
    mv, mg = _mp_rows(x[[0, 1, 3]], y[[0, 1, 3]])
    eps = EPS[dtype]
    np.testing.assert_allclose(value[[0, 1, 3]], mv, rtol=4 * eps)
    np.testing.assert_allclose(grad[[0, 1, 3]], mg, rtol=4 * eps, atol=4 * eps)
    assert grad[0, 1] == 0 and grad[1, 2] == 0
    assert value[2] == np.inf
    np.testing.assert_array_equal(value[[0, 1, 3]], clean_v)
    np.testing.assert_array_equal(grad[[0, 1, 3]], clean_g)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("where", ["label_class", "other_class"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_poisons_its_row_only(losses, dtype, where, reduction):
    """A NaN logit makes its row's value and every gradient entry of its row NaN; the other
    rows are bit-identical to a run without it ('sum'/'mean' are NaN)."""
    rng = rng_for("nan", np.dtype(dtype).name)
    x = rng.normal(size=(4, 5)).astype(dtype)
    y = np.array([1, 3, 0, 2])
    loss = losses.SoftmaxCrossEntropyLoss(reduction=reduction)
    clean_v, clean_g = loss.value_and_grad(x, y)
    x[2, 0 if where == "label_class" else 4] = np.nan
    value, grad = loss.value_and_grad(x, y)
    assert np.all(np.isnan(grad[2])), grad[2]
    np.testing.assert_array_equal(grad[[0, 1, 3]], clean_g[[0, 1, 3]])
    if reduction == "none":
        assert np.isnan(value[2])
        np.testing.assert_array_equal(value[[0, 1, 3]], clean_v[[0, 1, 3]])
    else:
        assert np.isnan(value)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cls_name,make", [
    ("SoftmaxCrossEntropyLoss", lambda s: [np.zeros(s[:-1], np.int64)]),
    ("SoftmaxFocalLoss", lambda s: [np.zeros(s[:-1], np.int64)]),
    ("KLDivLoss", lambda s: [np.full(s, 0.5)]),
    ("CosineEmbeddingLoss", lambda s: [np.ones(s), np.ones(s[:-1])]),
    ("TripletLoss", lambda s: [np.ones(s), np.zeros(s)]),
])
def test_empty_batch(losses, cls_name, make, dtype):
    """numpy's semantics (as the elementwise losses): an empty batch gives shape (0,),
    'sum' 0 and 'mean' NaN; samples without rows give NaN (the mean of nothing); gradients
    are empty arrays of the inputs' shapes."""
    for shape, nb in (((0, 5), 0), ((3, 0, 5), 3)):
        pred = np.zeros(shape, dtype)
        args = [pred, *make(shape)]
        if cls_name == "TripletLoss" and shape == (3, 0, 5):
            continue  # axis=None: a triplet row is every non-batch axis (0 elements, a sum: 0 + margin)
        for reduction in REDUCTIONS:
            loss = getattr(losses, cls_name)(reduction=reduction)
            value, grads = loss.value_and_grad(*args)
            grads = as_tuple(grads)
            assert np.asarray(value).dtype == dtype
            assert grads[0].shape == shape and grads[0].dtype == dtype
            if reduction == "none":
                assert value.shape == (nb,) and np.all(np.isnan(value))
            elif reduction == "sum" and nb == 0:
                assert value == 0.0
            else:
                assert np.isnan(value)


@pytest.mark.parametrize("C", [2, 10, 1000])
@pytest.mark.parametrize("dtype", DTYPES)
def test_confident_correct_prediction_is_tiny_not_zero(losses, dtype, C):
    """x_y = 50, others 0: loss = log1p((C - 1) e^-50) (mpmath: 1.9287498479639178e-22 for
    C = 2, 1.735874863167526e-21 for 10, 1.9268210981159538e-19 for 1000), a normal number in
    both dtypes: within 4 ulps, not 0, plus the rounding of the row sum of C - 1 equal terms
    in the double accumulator (recursive summation: up to (C - 1) eps64 relative; measured
    31 eps64 for C = 1000). The other classes' gradient e^-50 / (1 + (C-1) e^-50)
    = 1.9287498479639178e-22 (mpmath) within 4 ulps too."""
    want = {2: 1.9287498479639178e-22, 10: 1.735874863167526e-21, 1000: 1.9268210981159538e-19}[C]
    x = np.zeros((2, C), dtype=dtype)
    x[0, 0] = 50
    x[1, C - 1] = 50
    y = np.array([0, C - 1])
    value, grad = losses.SoftmaxCrossEntropyLoss().value_and_grad(x, y)
    eps = EPS[dtype]
    np.testing.assert_allclose(value, [want, want], rtol=4 * eps + (C - 1) * EPS[np.float64], atol=0)
    others = np.ones(x.shape, bool)
    others[np.arange(2), y] = False
    np.testing.assert_allclose(grad[others], 1.9287498479639178e-22, rtol=4 * eps, atol=0)
    np.testing.assert_allclose(grad[~others], -(C - 1) * 1.9287498479639178e-22, rtol=0, atol=4 * eps)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cosine_at_zero_vectors_is_finite(losses, dtype):
    """Gluon 2.0: cos = a.b / max(|a||b|, epsilon). By hand, with epsilon = 1e-12:
      a = 0, b = [1, 2, 2], y = 1:  cos = 0, loss 1, d/da = -b/eps = -[1, 2, 2] 1e12, d/db = -a/eps = 0
      a = 0, b = [1, 2, 2], y = -1: clip(0 - 0, 0, 1) = 0 at the kink: loss 0, gradients 0
      a = b = 0, y = 1:             loss 1, gradients 0
      a = [1e-13, 0, 0], b = [1, 0, 0], y = 1: |a||b| = 1e-13 <= eps: cos = 0.1, loss 0.9,
                                    d/da = -b/eps = [-1e12, 0, 0], d/db = -a/eps = [-0.1, 0, 0]
    Also against the reference on the dtype-rounded inputs (float32 rounds 1e-13 and 1e-12)."""
    a = np.array([[0, 0, 0], [0, 0, 0], [0, 0, 0], [1e-13, 0, 0]], dtype=dtype)
    b = np.array([[1, 2, 2], [1, 2, 2], [0, 0, 0], [1, 0, 0]], dtype=dtype)
    y = np.array([1.0, -1.0, 1.0, 1.0])
    value, (ga, gb) = losses.CosineEmbeddingLoss().value_and_grad(a, b, y)
    for arr in (value, ga, gb):
        assert np.all(np.isfinite(arr)) and arr.dtype == dtype
    by_hand_v = [1.0, 0.0, 1.0, 0.9]
    by_hand_ga = [[-1e12, -2e12, -2e12], [0, 0, 0], [0, 0, 0], [-1e12, 0, 0]]
    by_hand_gb = [[0, 0, 0], [0, 0, 0], [0, 0, 0], [-0.1, 0, 0]]
    tol = 1e-12 if dtype == np.float64 else 1e-6  # float32: 1e-13 and 1e-12 are rounded
    np.testing.assert_allclose(value, by_hand_v, rtol=tol, atol=tol)
    np.testing.assert_allclose(ga, by_hand_ga, rtol=tol)
    np.testing.assert_allclose(gb, by_hand_gb, rtol=tol)
    ev, (ega, egb) = R.expected("cos", [rounded(a, dtype), rounded(b, dtype), y])
    assert_close(value, ev, dtype, "value")
    assert_close(ga, ega, dtype, "grad a")
    assert_close(gb, egb, dtype, "grad b")


@pytest.mark.parametrize("dtype", DTYPES)
def test_triplet_kink_and_below(losses, dtype):
    """By hand, margin 1, pred 0, positive [1, 0]: s = |pos - pred|^2 - |neg - pred|^2 + 1
      neg = [1, 1]:   s = 1 - 2 + 1 = 0, the kink: loss 0, gradients 0 (relu'(0) = 0)
      neg = [2, 0]:   s = -2: loss 0, gradients 0
      neg = [0.5, 0]: s = 1.75: gradients 2(neg - pos) = [-1, 0], 2(pos - pred) = [2, 0],
                      2(pred - neg) = [-1, 0]. Every number is exact in both dtypes."""
    pred = np.zeros((3, 2), dtype=dtype)
    pos = np.array([[1, 0], [1, 0], [1, 0]], dtype=dtype)
    neg = np.array([[1, 1], [2, 0], [0.5, 0]], dtype=dtype)
    value, (gp, gpos, gneg) = losses.TripletLoss().value_and_grad(pred, pos, neg)
    np.testing.assert_array_equal(value, [0, 0, 1.75])
    np.testing.assert_array_equal(gp, [[0, 0], [0, 0], [-1, 0]])
    np.testing.assert_array_equal(gpos, [[0, 0], [0, 0], [2, 0]])
    np.testing.assert_array_equal(gneg, [[0, 0], [0, 0], [-1, 0]])


# --------------------------------------------------------------------------- 5. errors


def _has_number(msg, n):
    return re.search(rf"(?<![\w.]){re.escape(str(n))}(?![\w.])", msg) is not None


BAD_LABELS = [
    # (id, pred shape, axis, label shape, flat position, bad value, ignore_index)
    ("one_past_C", (8, 5), -1, (8,), 6, 5, -100),
    ("negative", (8, 5), -1, (8,), 3, -3, -100),
    ("huge", (8, 5), -1, (8,), 0, 10**9, -100),
    ("minus100_when_ignore_is_-1", (8, 5), -1, (8,), 7, -100, -1),
    ("3d_axis-1", (2, 3, 6), -1, (2, 3), 4, 11, -100),
    ("3d_axis1", (2, 6, 3), 1, (2, 3), 5, 8, -100),
    ("3d_axis1_keepdims_label", (2, 6, 3), 1, (2, 1, 3), 2, 9, -100),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cid,shape,axis,lshape,pos,bad,ignore", [
    pytest.param(*c, id=c[0]) for c in BAD_LABELS])
def test_out_of_range_label_is_an_index_error(losses, cid, shape, axis, lshape, pos, bad, ignore,
                                              dtype):
    """A label outside [0, C) (and not ignore_index) in a batch of valid ones raises
    IndexError naming its flat position in the label array and its value; the inputs are
    untouched and the loss object works afterwards."""
    rng = rng_for("badlabel", cid)
    C = shape[axis]
    pred = rng.normal(size=shape).astype(dtype)
    label = rng.integers(0, C, lshape)
    label.flat[pos] = bad
    pred_copy, label_copy = pred.copy(), label.copy()
    for reduction in REDUCTIONS:
        loss = losses.SoftmaxCrossEntropyLoss(axis=axis, ignore_index=ignore, reduction=reduction)
        for call in (loss, loss.value_and_grad, loss.grad):
            with pytest.raises(IndexError) as info:
                call(pred, label)
            msg = str(info.value)
            assert _has_number(msg, pos) and _has_number(msg, bad), msg
    np.testing.assert_array_equal(pred, pred_copy)
    np.testing.assert_array_equal(label, label_copy)
    good = label.copy()
    good.flat[pos] = 0
    value, grad = losses.SoftmaxCrossEntropyLoss(axis=axis).value_and_grad(pred, good)
    ev, (eg,) = R.expected("ce", [rounded(pred, dtype), good], {"axis": axis})
    assert_close(value, ev, dtype, "after the error")
    assert_close(grad, eg, dtype, "after the error (grad)")


@pytest.mark.parametrize("kind", ["float_label", "focal"])
def test_bad_label_writes_nothing_outside_the_outputs(losses, kind):
    """With out= / grad_out= buffers that are views into larger arrays, a bad label raises
    IndexError and nothing outside the views is written (no stray writes)."""
    pred = np.zeros((6, 4))
    label = np.array([0, 1, 2, 7, 1, 0], dtype=float if kind == "float_label" else np.int64)
    loss = losses.SoftmaxCrossEntropyLoss() if kind == "float_label" else losses.SoftmaxFocalLoss()
    vbase = np.full(10, -7.0)
    gbase = np.full((8, 4), -7.0)
    with pytest.raises(IndexError):
        loss.value_and_grad(pred, label, out=vbase[2:8], grad_out=gbase[1:7])
    assert np.all(vbase[:2] == -7) and np.all(vbase[8:] == -7)
    assert np.all(gbase[0] == -7) and np.all(gbase[7] == -7)


@pytest.mark.parametrize("label", [
    pytest.param(np.array([0, 1.5, 2]), id="f64_1.5"),
    pytest.param(np.array([0, 1, 2.25], dtype=np.float32), id="f32_2.25"),
    pytest.param(np.array([0.5, 1, 2]), id="f64_0.5"),
])
def test_non_integral_float_label_is_a_value_error(losses, label):
    loss = losses.SoftmaxCrossEntropyLoss()
    pred = np.zeros((3, 4))
    for call in (loss, loss.value_and_grad, loss.grad):
        with pytest.raises(ValueError):
            call(pred, label)
    with pytest.raises(ValueError):
        R.softmax_cross_entropy(pred, label)  # the reference agrees


# --------------------------------------------------------------------------- 6. hypothesis


@st.composite
def ce_draw(draw):
    """A pred shape (2-4 dims, sides 1-4), class and batch axes, a sample_weight shape
    (none, scalar, broadcastable to the row-loss shape, or shaped like pred without the class
    axis), weight, reduction, dtype and CE options."""
    ndim = draw(st.integers(2, 4))
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=ndim, max_size=ndim)))
    axis = draw(st.integers(-ndim, ndim - 1))
    batch_axis = draw(st.integers(-ndim, ndim - 1).filter(lambda b: b % ndim != axis % ndim))
    keep = tuple(1 if i == axis % ndim else n for i, n in enumerate(shape))
    sw_kind = draw(st.sampled_from(["none", "scalar", "keep", "rows"]))
    ones = draw(st.lists(st.booleans(), min_size=ndim, max_size=ndim))
    sw_shape = {"none": None, "scalar": (),
                "keep": tuple(1 if o else n for o, n in zip(ones, keep)),
                "rows": tuple(1 if o else n for o, n in zip(ones, _sans(shape, axis % ndim)))}[sw_kind]
    opts = {"axis": axis,
            "sparse_label": draw(st.booleans()),
            "from_logits": draw(st.booleans()),
            "label_smoothing": draw(st.sampled_from([0.0, 0.1]))}
    return {"shape": shape, "batch_axis": batch_axis, "sw_shape": sw_shape, "opts": opts,
            # |weight| >= 0.25: a weight near the float32 underflow threshold would make
            # every float32 result 0 (correctly) and the comparison meaningless
            "weight": draw(st.floats(0.25, 3)) * draw(st.sampled_from([1, -1])),
            "reduction": draw(st.sampled_from(REDUCTIONS)),
            "dtype": draw(st.sampled_from([np.float32, np.float64])),
            "class_weight": draw(st.booleans()),
            "seed": draw(st.integers(0, 2**32 - 1))}


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(d=ce_draw())
def test_softmax_ce_on_drawn_shapes_axes_and_weights(losses, d):
    rng = np.random.default_rng(d["seed"])
    case = RowCase("ce", "drawn", d["shape"], opts=d["opts"], batch_axis=d["batch_axis"],
                   weight=d["weight"], gen={"class_weight": d["class_weight"]})
    inputs, extra, _ = make_inputs(case, rng)
    sw = None if d["sw_shape"] is None else rng.uniform(0.2, 2.0, d["sw_shape"])
    dtype = d["dtype"]
    args = losscc_args(case, inputs, dtype)
    value, grads = run_losscc(losses, case, args, sw, extra, d["reduction"])
    ev, egs = run_reference(case, reference_args(case, inputs, dtype), rounded(sw, dtype),
                            {k: rounded(v, dtype) for k, v in extra.items()}, d["reduction"])
    assert np.asarray(value).dtype == dtype and grads[0].dtype == dtype
    assert_close(value, ev, dtype, f"{d} value")
    floor = grad_floor(case, d["shape"], sw, extra, d["reduction"])
    assert_close(grads[0], egs[0], dtype, f"{d} grad", floor=floor)


# --------------------------------------------------------------------------- 7. torch


def _torch():
    return pytest.importorskip("torch")


def _impl_run(impl, request, case, inputs, sw, extra, dtype, reduction="none"):
    """(value, grads) from losscc or the reference, on inputs cast to dtype."""
    if impl == "losscc":
        losses = request.getfixturevalue("losses")
        return run_losscc(losses, case, losscc_args(case, inputs, dtype), sw, extra, reduction)
    return run_reference(case, reference_args(case, inputs, dtype), rounded(sw, dtype),
                         {k: rounded(v, dtype) for k, v in extra.items()}, reduction)


TORCH_CE = [
    # (id, shape, CE options, ignore fraction, class weight, dense)
    (f"2d_ls{ls}_ig{ig}_{'w' if w else 'now'}", (7, 5), {"label_smoothing": ls, "ignore_index": ig},
     0.3 if ig == -100 else 0.0, w, False)
    for ls in (0.0, 0.15) for ig in (-100, 1) for w in (False, True)
] + [
    ("3d_axis1_ls_ig_w", (3, 5, 4), {"axis": 1, "label_smoothing": 0.1}, 0.3, True, False),
    ("dense_2d", (7, 5), {"sparse_label": False}, 0.0, False, True),
    ("dense_2d_ls_w", (7, 5), {"sparse_label": False, "label_smoothing": 0.2}, 0.0, True, True),
    ("dense_3d_axis1_ls_w", (3, 5, 4), {"axis": 1, "sparse_label": False, "label_smoothing": 0.1},
     0.0, True, True),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cid,shape,opts,ignore_frac,cw,dense", [
    pytest.param(*c, id=c[0]) for c in TORCH_CE])
def test_cross_entropy_agrees_with_torch(request, impl, dtype, cid, shape, opts, ignore_frac, cw,
                                         dense):
    """torch 2.13's F.cross_entropy(reduction='none') (class axis 1, as torch wants it), with
    label_smoothing, ignore_index (ignored rows give 0 in torch too), weight, probability
    targets. Per sample: torch's values averaged over the non-batch axes (Gluon); gradients by
    autograd of their sum. Also reduction='mean' (= sum / batch)."""
    torch = _torch()
    F = torch.nn.functional
    case = RowCase("ce", cid, shape, opts={**opts, "axis": 1, "sparse_label": not dense},
                   gen={"ignore_frac": ignore_frac, "class_weight": cw})
    inputs, extra, _ = make_inputs(case, rng_for("torch-ce", cid))
    pred = torch.tensor(inputs[0].astype(dtype), requires_grad=True)
    target = torch.tensor(inputs[1].astype(dtype)) if dense else torch.tensor(inputs[1])
    kw = {"label_smoothing": opts.get("label_smoothing", 0.0)}
    if "ignore_index" in opts:
        kw["ignore_index"] = opts["ignore_index"]
    if cw:
        kw["weight"] = torch.tensor(extra["class_weight"].astype(dtype))
    elem = F.cross_entropy(pred, target, reduction="none", **kw)
    per = elem.reshape(elem.shape[0], -1).mean(dim=1)
    per.sum().backward()
    t_value, t_grad = per.detach().numpy(), pred.grad.numpy()
    for reduction, scale in (("none", None), ("mean", shape[0])):
        value, (grad,) = _impl_run(impl, request, case, inputs, None, extra, dtype, reduction)
        want_v = t_value if scale is None else t_value.sum() / scale
        want_g = t_grad if scale is None else t_grad / scale
        assert_close(value, want_v, dtype, f"{cid} {reduction} value")
        assert_close(grad, want_g, dtype, f"{cid} {reduction} grad")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("shape,axis", [((6, 5), -1), ((3, 5, 4), 1)], ids=["2d", "3d_axis1"])
def test_kl_div_agrees_with_torch(request, impl, dtype, from_logits, shape, axis):
    """torch 2.13: F.kl_div(lp, t, reduction='none') with lp = pred (from_logits) or
    log_softmax(pred), its mean over every non-batch axis (Gluon's KL/C, then the mean over
    the rest); gradients w.r.t. pred and t (t > 0 here) by autograd."""
    torch = _torch()
    F = torch.nn.functional
    case = RowCase("kl", "torch", shape, opts={"axis": axis, "from_logits": from_logits})
    inputs, _, _ = make_inputs(case, rng_for("torch-kl", shape, from_logits))
    pred = torch.tensor(inputs[0].astype(dtype), requires_grad=True)
    t = torch.tensor(inputs[1].astype(dtype), requires_grad=True)
    lp = pred if from_logits else F.log_softmax(pred, dim=axis)
    per = F.kl_div(lp, t, reduction="none").reshape(shape[0], -1).mean(dim=1)
    per.sum().backward()
    value, (gp, gt) = _impl_run(impl, request, case, inputs, None, {}, dtype)
    assert_close(value, per.detach().numpy(), dtype, "value")
    assert_close(gp, pred.grad.numpy(), dtype, "grad pred")
    assert_close(gt, t.grad.numpy(), dtype, "grad label")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("margin", [0.0, 0.3])
def test_cosine_embedding_agrees_with_torch(request, impl, dtype, margin):
    """torch 2.13's F.cosine_embedding_loss(reduction='none'). torch divides by
    sqrt((|a|^2 + 1e-12)(|b|^2 + 1e-12)), Gluon by max(|a||b|, 1e-12): with norms >= 0.5
    they differ by <= 4e-12 relative, hence rtol 1e-9 in float64. torch's max(0, cos - margin)
    equals Gluon's clip(cos - margin, 0, 1 - margin) since cos <= 1. Rows are >= 0.1 from
    the kinks (the generator)."""
    torch = _torch()
    F = torch.nn.functional
    case = RowCase("cos", "torch", (10, 6), opts={"margin": margin})
    inputs, _, _ = make_inputs(case, rng_for("torch-cos", margin))
    a = torch.tensor(inputs[0].astype(dtype), requires_grad=True)
    b = torch.tensor(inputs[1].astype(dtype), requires_grad=True)
    out = F.cosine_embedding_loss(a, b, torch.tensor(inputs[2].astype(dtype)), margin=margin,
                                  reduction="none")
    out.sum().backward()
    value, (ga, gb) = _impl_run(impl, request, case, inputs, None, {}, dtype)
    rtol = 1e-9 if dtype == np.float64 else RTOL[dtype]
    for got, want, what in ((value, out.detach().numpy(), "value"), (ga, a.grad.numpy(), "grad a"),
                            (gb, b.grad.numpy(), "grad b")):
        want = np.asarray(want, np.float64)
        np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=rtol,
                                   atol=rtol * np.abs(want).max(), err_msg=what)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", [pytest.param(BY_ID[k], id=k) for k in (
    "focal-2d_gamma2", "focal-3d_axis1_gamma0.5_sw", "triplet-3d_axisNone",
    "triplet-3d_axis-1_sw_rows")])
def test_focal_and_triplet_agree_with_torch_autograd(request, impl, case):
    """The written formulas evaluated by torch 2.13 in float64 and differentiated by autograd:
    focal -(1 - p_y)^gamma log p_y, p = softmax(pred); triplet relu(sum (pos - pred)^2 -
    sum (neg - pred)^2 + margin). Then Gluon's weighting (row_reference) on torch's rows."""
    torch = _torch()
    F = torch.nn.functional
    inputs, extra, sw = make_inputs(case, rng_for(case.pid))
    ts = [torch.tensor(np.asarray(x, np.float64), requires_grad=True) for x in inputs[:N_DIFF[case.kind]]]
    shape = case.shape
    if case.kind == "focal":
        axis = case.opts.get("axis", -1) % len(shape)
        lp = F.log_softmax(ts[0], dim=axis)
        lpy = torch.gather(lp, axis, torch.tensor(np.expand_dims(inputs[1], axis)))
        rows = -(1 - lpy.exp()) ** case.opts.get("gamma", 2.0) * lpy
        row_axes = (axis,)
    else:
        row_axes = R.row_axes_of(len(shape), case.opts.get("axis"), case.batch_axis)
        p, q, r = ts
        s = ((q - p) ** 2 - (r - p) ** 2).sum(dim=row_axes, keepdim=True)
        rows = torch.relu(s + case.opts.get("margin", 1.0))
    w = case.weight if case.weight is not None else 1.0
    swk = torch.tensor(R.row_sample_weight(sw, shape, row_axes).copy())
    other = tuple(i for i in range(len(shape)) if i != case.batch_axis % len(shape))
    per = (rows * swk * w).mean(dim=other)
    per.sum().backward()
    value, grads = _impl_run(impl, request, case, inputs, sw, extra, np.float64)
    assert_close(value, per.detach().numpy(), np.float64, "value")
    for i, (g, t) in enumerate(zip(grads, ts)):
        assert_close(g, t.grad.numpy(), np.float64, f"grad {i}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_sigmoid_bce_with_pos_weight_agrees_with_torch(losses, dtype):
    """torch 2.13's F.binary_cross_entropy_with_logits(pred, label, weight=sample_weight,
    pos_weight=pw, reduction='none') vs SigmoidBinaryCrossEntropyLoss(from_sigmoid=False) with
    the same sample_weight and pos_weight (both broadcast along the last axis / the batch):
    per-sample means over the non-batch axes and autograd gradients; also reduction='mean'."""
    torch = _torch()
    F = torch.nn.functional
    rng = rng_for("torch-bce", np.dtype(dtype).name)
    pred = rng.uniform(-6, 6, (4, 3, 5)).astype(dtype)
    label = np.where(rng.random((4, 3, 5)) < 0.3, rng.uniform(0, 1, (4, 3, 5)),
                     (rng.random((4, 3, 5)) < 0.5).astype(float)).astype(dtype)  # hard and soft
    pw = rng.uniform(0.5, 3.0, 5).astype(dtype)
    sw = rng.uniform(0.2, 2.0, (4, 3, 1)).astype(dtype)
    p = torch.tensor(pred, requires_grad=True)
    elem = F.binary_cross_entropy_with_logits(p, torch.tensor(label), weight=torch.tensor(sw),
                                              pos_weight=torch.tensor(pw), reduction="none")
    per = elem.mean(dim=(1, 2))
    per.sum().backward()
    loss = losses.SigmoidBinaryCrossEntropyLoss(from_sigmoid=False, weight=1.5)
    value, grad = loss.value_and_grad(pred, label, sample_weight=sw, pos_weight=pw)
    assert_close(value, 1.5 * per.detach().numpy(), dtype, "value")
    assert_close(grad, 1.5 * p.grad.numpy(), dtype, "grad")
    mloss = losses.SigmoidBinaryCrossEntropyLoss(from_sigmoid=False, weight=1.5, reduction="mean")
    mvalue, mgrad = mloss.value_and_grad(pred, label, sample_weight=sw, pos_weight=pw)
    assert_close(mvalue, 1.5 * per.detach().numpy().mean(), dtype, "mean")
    assert_close(mgrad, 1.5 * p.grad.numpy() / 4, dtype, "grad of mean")


# --------------------------------------------------------------------------- 8. log-cosh

LOG_COSH_X = [-1e4, -750.0, -30.0, -3.0, -1.0, -0.3, 0.0, 0.7, 2.0, 5.5, 19.0, 300.0, 800.0, 1e4]
LOG_COSH_TINY = [-1e-3, -1e-8, -1e-20, 1e-30, 1e-8, 3e-5, 1e-3, 0.05]


def _mp_log_cosh(x, dtype):
    xr = np.asarray(x, dtype=dtype).astype(np.float64)
    return (np.array([float(R.mp_log_cosh(v)) for v in xr]),
            np.array([float(R.mp_tanh(v)) for v in xr]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_log_cosh_vs_mpmath(losses, dtype):
    """log(cosh(x)) and tanh(x) by mpmath (50 digits) on the dtype-rounded x (pred - label with
    label 0), |x| from 0.3 to 1e4 (cosh overflows beyond 710 in float64, 89 in float32):
    within 4 ulps."""
    x = np.array(LOG_COSH_X, dtype=dtype)
    value, grad = losses.LogCoshLoss().value_and_grad(x, np.zeros_like(x))
    want_v, want_g = _mp_log_cosh(x, dtype)
    eps = EPS[dtype]
    assert np.all(np.isfinite(value)) and value.dtype == grad.dtype == dtype
    np.testing.assert_allclose(value, want_v, rtol=4 * eps, atol=0)
    np.testing.assert_allclose(grad, want_g, rtol=4 * eps, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_log_cosh_tiny_arguments_keep_relative_accuracy(losses, dtype):
    """At tiny x, log(cosh(x)) = x^2/2 - x^4/12 + ... (5e-17 at x = 1e-8, 5e-41 at 1e-20 in
    float64): a normal number that |x| + log1p(e^-2|x|) - log 2 loses to cancellation
    (cosh x = 1 + 2 sinh^2(x/2) keeps it). Within 8 ulps of mpmath (absolute floor: the
    dtype's smallest normal number, for x^2/2 below it); tanh x within 4 ulps."""
    x = np.array(LOG_COSH_TINY, dtype=dtype)
    label = np.zeros_like(x)
    value, grad = losses.LogCoshLoss().value_and_grad(x, label)
    want_v, want_g = _mp_log_cosh(x, dtype)
    eps = EPS[dtype]
    np.testing.assert_allclose(value, want_v, rtol=8 * eps, atol=TINY[dtype])
    np.testing.assert_allclose(grad, want_g, rtol=4 * eps, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_log_cosh_weighting_and_reductions(losses, dtype):
    """Elementwise: Gluon's weighting (tests/reference.py) of the float64 reference
    row_reference.log_cosh (value, tanh); batch_axis 1, sample_weight, weight, reductions;
    with a non-zero label (the loss is of pred - label)."""
    import reference as ref

    rng = rng_for("logcosh", np.dtype(dtype).name)
    pred = (rng.normal(size=(3, 5, 4)) * 3).astype(dtype)
    label = rng.normal(size=(3, 5, 4))
    sw = rng.uniform(0.2, 2.0, (1, 5, 1))
    ev_elem, eg_elem, _ = R.log_cosh(rounded(pred, dtype), rounded(label, dtype))
    for reduction in REDUCTIONS:
        loss = losses.LogCoshLoss(weight=0.5, batch_axis=1, reduction=reduction)
        value, grad = loss.value_and_grad(pred, label, sw)
        ev = ref.reduce(ref.gluon_weighting(ev_elem, rounded(sw, dtype), 0.5, 1), reduction)
        eg = ref.derivative_scale(eg_elem, rounded(sw, dtype), 0.5, 1, reduction)
        assert_close(value, ev, dtype, f"{reduction} value")
        assert_close(grad, eg, dtype, f"{reduction} grad")


def test_log_cosh_finite_differences(losses):
    rng = rng_for("logcosh-fd")
    pred, label = rng.normal(size=(4, 6)) * 3, rng.normal(size=(4, 6))
    u = rng.normal(size=pred.shape)
    loss = losses.LogCoshLoss(reduction="sum")
    _, grad = loss.value_and_grad(pred, label)
    f = lambda x: float(loss(x, label))
    numeric = (f(pred + FD_STEP * u) - f(pred - FD_STEP * u)) / (2 * FD_STEP)
    directional = float(np.sum(u * grad))
    assert _fd_close(directional, numeric, float(np.sum(np.abs(u * grad))) + abs(f(pred)))


# --------------------------------------------------------------------------- the references themselves


def test_reference_mpmath_agreement():
    """row_reference's float64 CE and log-cosh against its own mpmath versions on rows where
    the naive forms fail (confident predictions, tiny log-cosh): a few ulps."""
    x = np.array([[50.0, 0, 0], [0, -np.inf, 1], [300.1, -300.2, 0.3], [1e4, 1e4 + 1, 1e4 - 3]])
    y = np.array([0, 0, 2, 1])
    rv, rg = R.softmax_cross_entropy(x, y)
    mv, mg = _mp_rows(x, y)
    np.testing.assert_allclose(rv[:, 0], mv, rtol=4 * EPS[np.float64])
    np.testing.assert_allclose(rg, mg, rtol=1e-12, atol=4 * EPS[np.float64])
    t = np.array(LOG_COSH_X + LOG_COSH_TINY)
    v, g, h = R.log_cosh(t, 0.0)
    want_v, want_g = _mp_log_cosh(t, np.float64)
    np.testing.assert_allclose(v, want_v, rtol=4 * EPS[np.float64], atol=TINY[np.float64])
    np.testing.assert_allclose(g, want_g, rtol=4 * EPS[np.float64])
    import mpmath

    with mpmath.workdps(R.MP_DPS):
        want_h = np.array([float(mpmath.sech(mpmath.mpf(float(v))) ** 2) for v in t])
    np.testing.assert_allclose(h, want_h, rtol=1e-12, atol=1e-300)


def test_reference_weighting_helpers():
    """By hand: rows [[1], [2]] of a (2, 3) pred (class axis 1) with sample_weight (2,) = [2, 3]
    and weight 0.5 give per-sample [1, 3]; a (2, 3, 4) pred with class axis 1 has 4 rows per
    sample, so the gradient scale is weight * sw / 4."""
    rows = np.array([[1.0], [2.0]])
    np.testing.assert_array_equal(R.row_weighting(rows, (2, 3), (1,), [2.0, 3.0], 0.5), [1.0, 3.0])
    np.testing.assert_array_equal(R.row_weighting(rows, (2, 3), (1,), [[2.0], [3.0]], 0.5), [1.0, 3.0])
    g = R.row_grad_scale(np.ones((2, 3, 4)), (2, 3, 4), (1,), np.array([[1, 2, 3, 4], [5, 6, 7, 8.0]]),
                         weight=0.5, reduction="mean")
    np.testing.assert_array_equal(g[1, 2], np.array([5, 6, 7, 8.0]) * 0.5 / 4 / 2)
    # triplet with axis=None: a (batch,) weight for a 3-D input is one weight per sample
    sw = R.row_sample_weight([1.0, 2.0], (2, 3, 4), (1, 2))
    assert sw.shape == (2, 1, 1) and sw[1, 0, 0] == 2.0
