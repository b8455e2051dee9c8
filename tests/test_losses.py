"""Every compiled loss and every variant: values, gradients and second derivatives.

(a) against tests/reference.py (float64 numpy written from Gluon's math), float64 and
    float32, with sample weights, weight != 1, batch_axis != 0 and all three reductions;
(b) central finite differences in float64 along a seeded random direction;
(c) every spec's `examples`, in both dtypes;
(d) MXNet's golden values (NUMERICS.md) and identities between losses;
(e) PyTorch's torch.nn.functional, where torch is importable.

Inputs come from seeded generators that keep every element at least 0.1 (relative to the
loss's scale) away from a kink, so one-sided derivatives never enter the comparison.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pytest

import reference as ref
from losscc.check import EXAMPLE_TOL

EPS = {np.float64: float(np.finfo(np.float64).eps),  # 2.220446049250313e-16
       np.float32: float(np.finfo(np.float32).eps)}  # 1.1920928955078125e-07
DTYPES = [pytest.param(np.float64, id="f64"), pytest.param(np.float32, id="f32")]
REDUCTIONS = ("none", "sum", "mean")

# Tolerances against the reference (which is evaluated in float64 on exactly the
# dtype-rounded inputs that the kernel sees, so input rounding is not part of the error):
#  * float64: rtol 1e-12 per element, i.e. ~4500 ulp; the kernels do a handful of roundings
#    per element (measured worst case 8e-14: the Poisson rate gradient 1 - t/(p + eps)
#    cancels near p = t), so this fails on any wrong term or scaling but not on the order of
#    floating-point operations.
#  * float32: the kernels compute in double and round each output once (codegen.CType), so
#    an element is within half an ulp of float32 plus the double computation's error, which
#    the float64 bound above keeps far below eps32. Hence rtol = eps32 (2 half-ulps: the
#    reference's own float64 rounding can fall on the other side of a float32 tie).
RTOL64 = 1e-12
RTOL32 = EPS[np.float32]  # 1.2e-7
# PyTorch computes float32 losses in float32: a few roundings of the largest *term* of an
# element (softplus(x) - x*z, exp(p) - t*p subtract terms up to ~20 times the result). So
# against torch, float32 is compared normwise: 32 eps32 times the largest |expected|.
TORCH_RTOL32 = 32 * EPS[np.float32]


def assert_close(actual, expected, dtype, what, torch=False):
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    if dtype == np.float64:
        rtol, atol = RTOL64, 0.0
    elif torch:
        rtol = TORCH_RTOL32
        atol = rtol * float(np.max(np.abs(expected))) if expected.size else 0.0
    else:
        rtol, atol = RTOL32, 0.0
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, err_msg=what)


def rounded(x, dtype):
    """The values a kernel of `dtype` sees: x cast to dtype, returned in float64."""
    return None if x is None else np.asarray(x, dtype=dtype).astype(np.float64)


def rng_for(*parts) -> np.random.Generator:
    """A generator seeded from the test's ids (crc32: stable across runs and processes)."""
    return np.random.default_rng(zlib.crc32("/".join(map(str, parts)).encode()))


# --------------------------------------------------------------------------- input generators
# Each returns dict(pred=..., label=..., [pos_weight=...]) in float64, away from kinks.


def _signs(rng, shape):
    return np.where(rng.random(shape) < 0.5, -1.0, 1.0)


def _away(rng, shape, lo, hi):
    """Random signs times magnitudes in [lo, hi]."""
    return _signs(rng, shape) * rng.uniform(lo, hi, shape)


def gen_residual(lo=0.1, hi=3.0):
    def gen(rng, shape):
        y = rng.normal(size=shape)
        return {"pred": y + _away(rng, shape, lo, hi), "label": y}
    return gen


def gen_huber(rho):
    def gen(rng, shape):
        y = rng.normal(size=shape)
        inner = rng.random(shape) < 0.5  # half quadratic zone, half linear zone
        mag = np.where(inner, rng.uniform(0.05, 0.9, shape), rng.uniform(1.1, 3.0, shape)) * rho
        return {"pred": y + _signs(rng, shape) * mag, "label": y}
    return gen


def gen_margin(margin):
    def gen(rng, shape):
        y = _signs(rng, shape)  # labels -1 / 1
        s = _away(rng, shape, 0.1, 2.0)  # margin - pred * label = -s: both sides of the kink
        return {"pred": y * (margin + s), "label": y}
    return gen


def gen_logits(labels, pos_weight=False):
    def gen(rng, shape):
        if labels == "signed":
            y = _signs(rng, shape)
        elif labels == "binary":
            y = (rng.random(shape) < 0.5).astype(float)
        else:  # soft labels (probabilities)
            y = rng.uniform(0.0, 1.0, shape)
        out = {"pred": rng.uniform(-4.0, 4.0, shape), "label": y}
        if pos_weight:
            out["pos_weight"] = rng.uniform(0.5, 3.0, shape[-1:])  # broadcast along the last axis
        return out
    return gen


def gen_probs(pos_weight=False):
    def gen(rng, shape):
        out = {"pred": rng.uniform(0.05, 0.95, shape),
               "label": (rng.random(shape) < 0.5).astype(float)}
        if pos_weight:
            out["pos_weight"] = rng.uniform(0.5, 3.0, shape[-1:])
        return out
    return gen


def gen_poisson(from_logits):
    def gen(rng, shape):
        pred = rng.uniform(-2.0, 2.0, shape) if from_logits else rng.uniform(0.1, 5.0, shape)
        return {"pred": pred, "label": rng.integers(0, 7, shape).astype(float)}  # counts 0..6
    return gen


@dataclass(frozen=True)
class Case:
    id: str
    name: str  # spec name, also the key in reference.REFERENCES
    options: dict = field(default_factory=dict)  # constructor params and variants
    gen: Callable = None


CASES = [
    Case("l2", "l2", {}, gen_residual()),
    Case("l1", "l1", {}, gen_residual()),
    Case("huber", "huber", {}, gen_huber(1.0)),
    Case("huber_rho0.5", "huber", {"rho": 0.5}, gen_huber(0.5)),
    Case("hinge", "hinge", {}, gen_margin(1.0)),
    Case("hinge_margin0.5", "hinge", {"margin": 0.5}, gen_margin(0.5)),
    Case("squared_hinge", "squared_hinge", {}, gen_margin(1.0)),
    Case("squared_hinge_margin2", "squared_hinge", {"margin": 2.0}, gen_margin(2.0)),
    Case("logistic_signed", "logistic", {"label_format": "signed"}, gen_logits("signed")),
    Case("logistic_binary", "logistic", {"label_format": "binary"}, gen_logits("binary")),
    Case("bce_logits", "sigmoid_bce", {}, gen_logits("binary")),
    Case("bce_logits_soft", "sigmoid_bce", {"from_sigmoid": False}, gen_logits("soft")),
    Case("bce_logits_pos_weight", "sigmoid_bce", {}, gen_logits("binary", pos_weight=True)),
    Case("bce_probs", "sigmoid_bce", {"from_sigmoid": True}, gen_probs()),
    Case("bce_probs_pos_weight", "sigmoid_bce", {"from_sigmoid": True}, gen_probs(pos_weight=True)),
    Case("bce_probs_eps0.01", "sigmoid_bce", {"from_sigmoid": True, "epsilon": 0.01}, gen_probs()),
    Case("poisson_logits", "poisson_nll", {"from_logits": True, "compute_full": False},
         gen_poisson(True)),
    Case("poisson_logits_full", "poisson_nll", {"from_logits": True, "compute_full": True},
         gen_poisson(True)),
    Case("poisson_rate", "poisson_nll", {"from_logits": False, "compute_full": False},
         gen_poisson(False)),
    Case("poisson_rate_full", "poisson_nll", {"from_logits": False, "compute_full": True},
         gen_poisson(False)),
    Case("poisson_rate_eps0.1", "poisson_nll", {"from_logits": False, "epsilon": 0.1},
         gen_poisson(False)),
    Case("log_cosh", "log_cosh", {}, gen_residual()),
    Case("log_cosh_scale2", "log_cosh", {"scale": 2.0}, gen_residual()),
]
CASE_PARAMS = [pytest.param(c, id=c.id) for c in CASES]


@dataclass(frozen=True)
class Layout:
    id: str
    shape: tuple
    batch_axis: int = 0
    sample_weight: object = None  # None, a float (scalar), or a shape
    weight: float = 1.0
    label_shape: tuple = None  # pass the label with this (same-size) shape: Gluon reshapes it
    strided: bool = False  # pass pred and label as non-contiguous views (every other element)


LAYOUTS = [
    Layout("1d", (6,)),
    Layout("2d_sw_B1", (5, 7), sample_weight=(5, 1), weight=1.7),
    Layout("2d_sw_BF", (5, 7), sample_weight=(5, 7), weight=0.6),
    Layout("2d_sw_scalar", (5, 7), sample_weight=2.5),
    Layout("3d_axis1_sw_1B1", (3, 4, 5), batch_axis=1, sample_weight=(1, 4, 1), weight=1.3),
    Layout("3d_axis1_sw_full", (3, 4, 5), batch_axis=1, sample_weight=(3, 4, 5), weight=0.8),
    Layout("3d_axis-1_sw_B", (3, 5, 4), batch_axis=-1, sample_weight=(4,), weight=2.0),
    Layout("label_reshaped", (6, 1), label_shape=(6,), weight=0.5),
    # strided pred/label and a (B, F1, 1) weight mixing zero and non-zero feature strides:
    # the runtime has to make contiguous copies for the kernel
    Layout("3d_strided_sw_BF1", (4, 3, 5), sample_weight=(4, 3, 1), weight=0.9, strided=True),
]
LAYOUT_PARAMS = [pytest.param(lay, id=lay.id) for lay in LAYOUTS]


def _strided_view(x, dtype=np.float64):
    """x (cast to dtype) as a non-contiguous view: every other element of a longer last axis."""
    big = np.full(x.shape[:-1] + (2 * x.shape[-1],), np.nan, dtype=dtype)
    big[..., ::2] = x
    view = big[..., ::2]
    assert not view.flags.c_contiguous and not view.flags.f_contiguous
    return view


def make_inputs(case: Case, layout: Layout, rng):
    """float64 inputs for a case and layout: (pred, label, sample_weight, extra kwargs)."""
    data = case.gen(rng, layout.shape)
    if layout.strided:
        data = {**data, "pred": _strided_view(data["pred"]), "label": _strided_view(data["label"])}
    label = data["label"]
    if layout.label_shape is not None:
        label = label.reshape(layout.label_shape)
    sw = layout.sample_weight
    if isinstance(sw, tuple):
        sw = rng.uniform(0.2, 2.0, sw)
    extra = {"pos_weight": data["pos_weight"]} if "pos_weight" in data else {}
    return data["pred"], label, sw, extra


def n_batch(layout: Layout) -> int:
    return layout.shape[layout.batch_axis % len(layout.shape)]


# --------------------------------------------------------------------------- (a) the reference


def test_catalogue_is_covered(losses):
    """Every compiled elementwise loss has a reference and a case here: a new spec must fail
    this test. (Row losses are covered by test_rows.py.)"""
    elementwise = {n for n, cls in losses.LOSSES.items() if cls._meta["shape"] == "elementwise"}
    assert elementwise == set(ref.REFERENCES) == {c.name for c in CASES}


@pytest.mark.parametrize("alias,name", [
    ("L2Loss", "l2"), ("L1Loss", "l1"), ("HuberLoss", "huber"), ("HingeLoss", "hinge"),
    ("SquaredHingeLoss", "squared_hinge"), ("LogisticLoss", "logistic"),
    ("SigmoidBCELoss", "sigmoid_bce"), ("SigmoidBinaryCrossEntropyLoss", "sigmoid_bce"),
    ("PoissonNLLLoss", "poisson_nll"),
])
def test_gluon_names_are_aliases(losses, alias, name):
    assert getattr(losses, alias) is getattr(losses, name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUT_PARAMS)
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_matches_reference(losses, case, layout, dtype):
    pred64, label, sw, extra = make_inputs(case, layout, rng_for(case.id, layout.id))
    pred = _strided_view(pred64, dtype) if layout.strided else pred64.astype(dtype)
    # label, sample_weight and pos_weight go in as float64: the runtime casts them to pred's
    # dtype, so the reference gets the same rounded values.
    r_extra = {k: rounded(v, dtype) for k, v in extra.items()}
    nb = n_batch(layout)
    cls = getattr(losses, case.name)
    for reduction in REDUCTIONS:
        loss = cls(**case.options, weight=layout.weight, batch_axis=layout.batch_axis,
                   reduction=reduction)
        value = loss(pred, label, sw, **extra)
        value_vg, grad = loss.value_and_grad(pred, label, sw, **extra)
        grad_gh, hess = loss.grad_hess(pred, label, sw, **extra)
        grad_only = loss.grad(pred, label, sw, **extra)
        ev, eg, eh = ref.expected(case.name, rounded(pred, dtype), rounded(label, dtype),
                                  rounded(sw, dtype), layout.weight, layout.batch_axis,
                                  reduction, **case.options, **r_extra)
        what = f"{case.id} {layout.id} {np.dtype(dtype).name} reduction={reduction}"
        # shapes and dtypes: per sample for "none", a scalar otherwise; pred's dtype throughout
        assert np.shape(value) == ((nb,) if reduction == "none" else ()), what
        for arr in (value, value_vg):
            assert np.asarray(arr).dtype == dtype, what
        for arr in (grad, grad_gh, grad_only, hess):
            assert arr.shape == pred.shape and arr.dtype == dtype, what
        assert_close(value, ev, dtype, what + " value")
        assert_close(value_vg, ev, dtype, what + " value (value_and_grad)")
        assert_close(grad, eg, dtype, what + " grad")
        assert_close(grad_gh, eg, dtype, what + " grad (grad_hess)")
        assert_close(grad_only, eg, dtype, what + " grad (grad)")
        assert_close(hess, eh, dtype, what + " hess")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cls_name,kwargs,pred,label,value,grad,hess", [
    # by hand; the catalogue's convention: the derivative at a kink is 0 (sign(0) = 0,
    # relu'(0) = 0) and second derivatives are their value away from the kink
    ("L1Loss", {}, 2.0, 2.0, 0.0, 0.0, 0.0),                    # |0|, sign(0)
    ("HingeLoss", {}, 1.0, 1.0, 0.0, 0.0, 0.0),                 # relu(1 - 1)
    ("HingeLoss", {"margin": 0.5}, -0.5, -1.0, 0.0, 0.0, 0.0),   # relu(0.5 - 0.5)
    ("SquaredHingeLoss", {}, -1.0, -1.0, 0.0, 0.0, 0.0),        # relu(0)^2; 2 y^2 H(0) = 0
    # Gluon's where(|e| > rho, ...) puts |e| == rho in the quadratic branch: 0.5/rho e^2,
    # e/rho = 1 (the two branches agree there), 1/rho
    ("HuberLoss", {"rho": 0.5}, 1.5, 1.0, 0.25, 1.0, 2.0),
])
def test_kink_convention(losses, cls_name, kwargs, pred, label, value, grad, hess, dtype):
    loss = getattr(losses, cls_name)(**kwargs)
    v, g = loss.value_and_grad(np.array([pred], dtype), np.array([label]))
    _, h = loss.grad_hess(np.array([pred], dtype), np.array([label]))
    np.testing.assert_array_equal(v, [value])
    np.testing.assert_array_equal(g, [grad])
    np.testing.assert_array_equal(h, [hess])


@pytest.mark.parametrize("dtype", DTYPES)
def test_reductions_are_sum_and_mean_of_per_sample(losses, dtype):
    """reduction='sum'/'mean' equal the sum/mean of the per-sample values, and the gradient of
    the mean is the gradient of the sum divided by the batch size (by definition)."""
    rng = rng_for("reductions", np.dtype(dtype).name)
    pred = rng.normal(size=(8, 3)).astype(dtype)
    label = rng.normal(size=(8, 3))
    sw = rng.uniform(0.2, 2.0, (8, 1))
    per, g_none = losses.HuberLoss(rho=0.5, weight=1.5).value_and_grad(pred, label, sw)
    total, g_sum = losses.HuberLoss(rho=0.5, weight=1.5, reduction="sum").value_and_grad(pred, label, sw)
    mean, g_mean = losses.HuberLoss(rho=0.5, weight=1.5, reduction="mean").value_and_grad(pred, label, sw)
    eps = EPS[dtype]
    np.testing.assert_allclose(total, per.astype(np.float64).sum(), rtol=8 * eps)
    np.testing.assert_allclose(mean, per.astype(np.float64).mean(), rtol=8 * eps)
    np.testing.assert_array_equal(g_sum, g_none)  # d sum(per-sample)/dpred is the "none" grad
    np.testing.assert_allclose(g_mean, g_sum / 8, rtol=4 * eps)


# --------------------------------------------------------------------------- (b) finite differences

FD_LAYOUTS = [pytest.param(lay, id=lay.id) for lay in LAYOUTS
              if lay.id in ("2d_sw_BF", "3d_axis1_sw_1B1")]
FD_STEP = 3e-6
# Central differences: truncation h^2/6 sum|u^3 f'''| (f''' reaches 2/p^3 ~ 1.6e4 for log p
# at p = 0.05) and rounding ~eps64 |f| / h (|f| ~ 30) balance near h = 3e-6: measured worst
# 9e-9 relative over all cases (h = 1e-5 gives 9e-8, 3e-7 gives 9e-8). rtol 1e-7 leaves a
# 10x margin while a wrong derivative (a missing factor, a sign, a dropped term) is off by O(1).
FD_RTOL = 1e-7


def _fd_close(analytic, numeric, scale):
    return abs(analytic - numeric) <= FD_RTOL * max(abs(analytic), abs(numeric)) + 1e-12 * scale


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("layout", FD_LAYOUTS)
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_finite_differences(losses, case, layout, reduction):
    rng = rng_for("fd", case.id, layout.id)
    pred, label, sw, extra = make_inputs(case, layout, rng)
    u = rng.normal(size=pred.shape)  # the seeded random direction; h*|u| << the 0.1 kink gap
    loss = getattr(losses, case.name)(**case.options, weight=layout.weight,
                                      batch_axis=layout.batch_axis, reduction=reduction)
    f = lambda x: float(loss(x, label, sw, **extra))  # noqa: E731
    g = lambda x: loss.grad(x, label, sw, **extra)  # noqa: E731
    h = FD_STEP
    grad, hess = loss.grad_hess(pred, label, sw, **extra)
    directional = float(np.sum(u * grad))
    numeric = (f(pred + h * u) - f(pred - h * u)) / (2 * h)
    scale = float(np.sum(np.abs(u * grad))) + abs(f(pred))
    assert _fd_close(directional, numeric, scale), (directional, numeric)
    # the Hessian is diagonal: d/dt u.grad(x + t u) = sum(u * hess * u)
    curvature = float(np.sum(u * hess * u))
    numeric2 = float(np.sum(u * (g(pred + h * u) - g(pred - h * u)))) / (2 * h)
    scale2 = float(np.sum(np.abs(u * hess * u))) + float(np.sum(np.abs(u * grad)))
    assert _fd_close(curvature, numeric2, scale2), (curvature, numeric2)


# --------------------------------------------------------------------------- (c) spec examples

# The examples' tolerances are losscc check's own (losscc/check.py says why).
EX_TOL = EXAMPLE_TOL


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(ref.REFERENCES))
def test_spec_examples(losses, name, dtype):
    cls = getattr(losses, name)
    examples = cls._meta["examples"]
    assert examples, f"spec {name} has no examples"
    for ex in examples:
        where = f"{name} example at {ex.get('where')} ({np.dtype(dtype).name})"
        loss = cls(**ex["options"])
        inputs = {k: np.array([v], dtype=dtype) for k, v in ex["inputs"].items()}
        value, grad = loss.value_and_grad(**inputs)
        # the spec's numbers are the expected ones (their comments say by hand / by mpmath);
        # the independent reference must agree with them too, so a wrong example also fails.
        rtol, atol = EX_TOL[dtype]
        assert value.dtype == grad.dtype == dtype, where
        np.testing.assert_allclose(value, [ex["loss"]], rtol=rtol, atol=atol, err_msg=where)
        np.testing.assert_allclose(grad, [ex["grad"]], rtol=rtol, atol=atol, err_msg=where)
        first, second = [i["name"] for i in cls._meta["inputs"]][:2]
        args = dict(ex["inputs"])
        rv, rg, _ = ref.expected(name, [args.pop(first)], [args.pop(second)], **ex["options"],
                                 **args)
        np.testing.assert_allclose(rv, [ex["loss"]], rtol=1e-12, err_msg=where + " (reference)")
        np.testing.assert_allclose(rg, [ex["grad"]], rtol=1e-12, atol=1e-300, err_msg=where + " (reference)")


# --------------------------------------------------------------------------- (d) golden values

# MXNet's unit tests (NUMERICS.md): pred [1,2,3,4], label [1,3,5,7], sample_weight [.5,1,.5,1],
# a batch of 4 scalars. Checked by hand: |e| = [0,1,2,3], e^2/2 = [0,.5,2,4.5].
GOLD_PRED = [1.0, 2.0, 3.0, 4.0]
GOLD_LABEL = [1.0, 3.0, 5.0, 7.0]
GOLD_SW = [0.5, 1.0, 0.5, 1.0]


@pytest.mark.parametrize("shape", [(4,), (4, 1)], ids=["4", "4x1"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cls_name,kwargs,use_sw,expected", [
    ("L1Loss", {}, False, 6.0),                # 0 + 1 + 2 + 3
    ("L1Loss", {"weight": 0.5}, False, 3.0),    # 6 * 0.5
    ("L1Loss", {}, True, 5.0),                 # 0*.5 + 1 + 2*.5 + 3
    ("L2Loss", {}, False, 7.0),                # (0 + 1 + 4 + 9) / 2
    ("L2Loss", {"weight": 0.25}, False, 1.75),  # Gluon: weight/2 * 14
    ("L2Loss", {}, True, 6.0),                 # (0*.5 + 1 + 4*.5 + 9) / 2
])
def test_mxnet_golden_values(losses, cls_name, kwargs, use_sw, expected, dtype, shape):
    pred = np.array(GOLD_PRED, dtype=dtype).reshape(shape)
    label = np.array(GOLD_LABEL).reshape(shape)
    sw = np.array(GOLD_SW).reshape(shape) if use_sw else None
    cls = getattr(losses, cls_name)
    # every intermediate is a small dyadic rational: exact in both dtypes
    assert float(np.sum(cls(**kwargs)(pred, label, sw), dtype=np.float64)) == expected
    assert float(cls(**kwargs, reduction="sum")(pred, label, sw)) == expected
    assert float(cls(**kwargs, reduction="mean")(pred, label, sw)) == expected / 4


def _binary_labels_and_logits(dtype, soft):
    rng = rng_for("identity", soft, np.dtype(dtype).name)
    x = np.concatenate([rng.uniform(-8, 8, 40), [-30.0, -1e-3, 0.0, 1e-3, 30.0]]).astype(dtype)
    z = rng.uniform(0, 1, x.shape) if soft else (rng.random(x.shape) < 0.5).astype(float)
    return x, z


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_logistic_equals_sigmoid_bce(losses, dtype, soft):
    """Gluon: LogisticLoss(binary)(x, z) = LogisticLoss(signed)(x, 2z - 1) = SigmoidBCE(x, z)."""
    x, z = _binary_labels_and_logits(dtype, soft)
    bce = losses.SigmoidBCELoss()
    vb, gb = bce.value_and_grad(x, z)
    _, hb = bce.grad_hess(x, z)
    for loss, label in ((losses.LogisticLoss(label_format="binary"), z),
                        (losses.LogisticLoss(label_format="signed"), 2 * z - 1)):
        v, g = loss.value_and_grad(x, label)
        _, h = loss.grad_hess(x, label)
        # same math, possibly different operation order: a few ulps of the largest term (|x|)
        tol = 8 * EPS[dtype] * 30
        np.testing.assert_allclose(v, vb, rtol=8 * EPS[dtype], atol=tol)
        np.testing.assert_allclose(g, gb, rtol=8 * EPS[dtype], atol=8 * EPS[dtype])
        np.testing.assert_allclose(h, hb, rtol=8 * EPS[dtype], atol=0)


def test_logistic_rejects_other_label_formats(losses):
    """Gluon raises ValueError for any label_format but 'signed'/'binary'."""
    with pytest.raises(ValueError):
        losses.LogisticLoss(label_format="multiclass")
    with pytest.raises(ValueError):
        ref.logistic(np.zeros(1), np.zeros(1), label_format="multiclass")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("delta", [0.3, 1.0, 2.5])
def test_pytorch_huber_is_delta_times_gluon_huber(losses, delta, dtype):
    """PyTorch HuberLoss(delta) = delta * SmoothL1Loss(beta=delta) = delta * Gluon HuberLoss(rho=delta),
    against NUMERICS.md's branch-free PyTorch Huber: q = min(|e|, d): 0.5 q^2 + d (|e| - q),
    derivative clip(e, -d, d)."""
    rng = rng_for("torch-huber", delta, np.dtype(dtype).name)
    y = rng.normal(size=50)
    pred = (y + _away(rng, 50, 0.05, 3 * delta)).astype(dtype)
    e = rounded(pred, dtype) - rounded(y, dtype)
    q = np.minimum(np.abs(e), delta)
    torch_huber = 0.5 * q * q + delta * (np.abs(e) - q)
    value, grad = losses.HuberLoss(rho=delta).value_and_grad(pred, y)
    tol = RTOL64 if dtype == np.float64 else RTOL32
    np.testing.assert_allclose(delta * value, torch_huber, rtol=tol, atol=tol * 3 * delta)
    np.testing.assert_allclose(delta * grad, np.clip(e, -delta, delta), rtol=tol, atol=tol)


# --------------------------------------------------------------------------- (e) PyTorch

def _torch_per_sample(torch, fn, pred, label, **kw):
    """torch's elementwise loss (reduction='none'), its per-sample mean over dim 1 (Gluon's
    weighting), and d sum(per-sample)/dpred via autograd."""
    p = torch.tensor(pred, requires_grad=True)
    elem = fn(p, torch.tensor(label, dtype=p.dtype), reduction="none", **kw)
    per = elem.mean(dim=1)
    per.sum().backward()
    return per.detach().numpy(), p.grad.numpy()


def _torch_mean(torch, fn, pred, label, **kw):
    p = torch.tensor(pred, requires_grad=True)
    out = fn(p, torch.tensor(label, dtype=p.dtype), reduction="mean", **kw)
    out.backward()
    return out.detach().numpy(), p.grad.numpy()


def _torch_cases():
    # (id, losscc class, losscc kwargs, torch function name, torch kwargs, losscc scale, inputs)
    return [
        ("mse_half", "L2Loss", {}, "mse_loss", {}, 2.0, gen_residual()),
        ("l1", "L1Loss", {}, "l1_loss", {}, 1.0, gen_residual()),
        ("smooth_l1_beta1", "HuberLoss", {"rho": 1.0}, "smooth_l1_loss", {"beta": 1.0}, 1.0, gen_huber(1.0)),
        ("smooth_l1_beta0.4", "HuberLoss", {"rho": 0.4}, "smooth_l1_loss", {"beta": 0.4}, 1.0, gen_huber(0.4)),
        ("huber_delta0.4", "HuberLoss", {"rho": 0.4}, "huber_loss", {"delta": 0.4}, 0.4, gen_huber(0.4)),
        ("bce_logits", "SigmoidBCELoss", {}, "binary_cross_entropy_with_logits", {}, 1.0,
         gen_logits("binary")),
        ("bce_logits_soft", "SigmoidBCELoss", {}, "binary_cross_entropy_with_logits", {}, 1.0,
         gen_logits("soft")),
        ("bce_logits_pos_weight", "SigmoidBCELoss", {}, "binary_cross_entropy_with_logits",
         {"pos_weight": True}, 1.0, gen_logits("binary", pos_weight=True)),
        ("poisson_log", "PoissonNLLLoss", {"from_logits": True}, "poisson_nll_loss",
         {"log_input": True, "full": False}, 1.0, gen_poisson(True)),
        ("poisson_log_full", "PoissonNLLLoss", {"from_logits": True, "compute_full": True},
         "poisson_nll_loss", {"log_input": True, "full": True}, 1.0, gen_poisson(True)),
        ("poisson_rate", "PoissonNLLLoss", {"from_logits": False}, "poisson_nll_loss",
         {"log_input": False, "full": False, "eps": 1e-8}, 1.0, gen_poisson(False)),
        ("poisson_rate_full", "PoissonNLLLoss", {"from_logits": False, "compute_full": True},
         "poisson_nll_loss", {"log_input": False, "full": True, "eps": 1e-8}, 1.0, gen_poisson(False)),
    ]


TORCH_CASES = [pytest.param(*c, id=c[0]) for c in _torch_cases()]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cid,cls_name,kwargs,fn_name,tkw,scale,gen", TORCH_CASES)
def test_agrees_with_torch(losses, cid, cls_name, kwargs, fn_name, tkw, scale, gen, dtype):
    """torch 2.13's torch.nn.functional (value and autograd gradient) vs losscc. `scale` is
    torch / losscc: mse_loss = 2 * L2Loss; huber_loss(delta) = delta * HuberLoss(rho=delta)."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    fn = getattr(F, fn_name)
    data = gen(rng_for("torch", cid), (6, 5))
    pred = data["pred"].astype(dtype)
    label = data["label"].astype(dtype)
    tkw = dict(tkw)
    extra = {}
    if tkw.pop("pos_weight", False):
        pw = data["pos_weight"].astype(dtype)
        tkw["pos_weight"] = torch.tensor(pw)  # torch broadcasts it along the last axis too
        extra["pos_weight"] = pw
    t_per, t_grad = _torch_per_sample(torch, fn, pred, label, **tkw)
    t_mean, t_mgrad = _torch_mean(torch, fn, pred, label, **tkw)
    cls = getattr(losses, cls_name)
    per, grad = cls(**kwargs).value_and_grad(pred, label, **extra)
    mean, mgrad = cls(**kwargs, reduction="mean").value_and_grad(pred, label, **extra)
    for got, want, what in ((per * scale, t_per, "per-sample value"), (grad * scale, t_grad, "grad"),
                            (mean * scale, t_mean, "mean"), (mgrad * scale, t_mgrad, "grad of mean")):
        assert_close(got, want, dtype, f"{cid} {what}", torch=True)
