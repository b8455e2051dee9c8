"""The runtime's contract: Gluon semantics, shapes, strides, dtypes, out= buffers, errors.

Expected values come from plain numpy written out in each test (the elementwise l2 loss
0.5 * (p - y)**2 and its gradient p - y are exact enough to compare at 1e-15).
"""

from __future__ import annotations

import numpy as np
import pytest

RNG = np.random.default_rng(20261125)


def l2_ref(p, y, sw=1.0, weight=1.0, axis=0):
    """Gluon: elementwise * sample_weight * weight, then the mean over non-batch axes."""
    e = 0.5 * (p - y) ** 2 * sw * weight
    other = tuple(i for i in range(p.ndim) if i != axis % p.ndim)
    return e.mean(axis=other) if other else e


def l2_grad_ref(p, y, sw=1.0, weight=1.0, axis=0):
    n_features = p.size // p.shape[axis]
    return (p - y) * sw * weight / n_features


@pytest.mark.parametrize("axis", [0, 1, 2, -1])
def test_batch_axis_any_position(losses, axis):
    p, y = RNG.normal(size=(3, 4, 5)), RNG.normal(size=(3, 4, 5))
    v, g = losses.L2Loss(batch_axis=axis).value_and_grad(p, y)
    np.testing.assert_allclose(v, l2_ref(p, y, axis=axis), rtol=1e-14)
    np.testing.assert_allclose(g, l2_grad_ref(p, y, axis=axis), rtol=1e-14)
    assert v.shape == (p.shape[axis],) and g.shape == p.shape


@pytest.mark.parametrize("view", [
    lambda a: a[:, ::2, ::-1],         # reversed and strided
    lambda a: np.asfortranarray(a),    # column-major
    lambda a: a.transpose(0, 2, 1),    # features out of order
    lambda a: a[::-1],                 # reversed batch
])
def test_non_contiguous_inputs(losses, view):
    p, y = view(RNG.normal(size=(4, 6, 5))), view(RNG.normal(size=(4, 6, 5)))
    v, g = losses.L2Loss().value_and_grad(p, y)
    np.testing.assert_allclose(v, l2_ref(p, y), rtol=1e-14)
    np.testing.assert_allclose(g, l2_grad_ref(p, y), rtol=1e-14)


def test_label_reshaped_like_pred_as_gluon_does(losses):
    # pred (4, 1) against label (4,): Gluon reshapes the label; numpy broadcasting would
    # silently give a (4, 4) loss matrix.
    p, y = RNG.normal(size=(4, 1)), RNG.normal(size=4)
    np.testing.assert_allclose(losses.L2Loss()(p, y), 0.5 * (p.ravel() - y) ** 2, rtol=1e-15)


@pytest.mark.parametrize("sw_shape", [(), (4, 1), (4, 3), (3,), (1, 3)])
def test_sample_weight_broadcasts(losses, sw_shape):
    p, y = RNG.normal(size=(4, 3)), RNG.normal(size=(4, 3))
    sw = RNG.uniform(size=sw_shape)
    v, g = losses.L2Loss(weight=0.25).value_and_grad(p, y, sw)
    np.testing.assert_allclose(v, l2_ref(p, y, sw, 0.25), rtol=1e-14)
    np.testing.assert_allclose(g, l2_grad_ref(p, y, sw, 0.25), rtol=1e-14)


def test_scalar_label_broadcasts(losses):
    x = np.arange(-5, 5, 0.1)  # the tutorial's plot: label fixed at 0
    np.testing.assert_allclose(losses.L1Loss()(x, 0), np.abs(x), rtol=0)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_reductions_and_their_gradients(losses, reduction):
    p, y = RNG.normal(size=(5, 2)), RNG.normal(size=(5, 2))
    v, g = losses.L2Loss(reduction=reduction).value_and_grad(p, y)
    per = l2_ref(p, y)
    want = {"none": per, "sum": per.sum(), "mean": per.mean()}[reduction]
    np.testing.assert_allclose(v, want, rtol=1e-14)
    scale = 1 / 5 if reduction == "mean" else 1.0
    np.testing.assert_allclose(g, l2_grad_ref(p, y) * scale, rtol=1e-14)
    assert np.asarray(v).dtype == np.float64


def test_float32_in_float32_out(losses):
    p, y = RNG.normal(size=(8, 3)).astype(np.float32), RNG.normal(size=(8, 3))
    v, g = losses.L2Loss().value_and_grad(p, y)
    assert v.dtype == np.float32 and g.dtype == np.float32
    np.testing.assert_allclose(v, l2_ref(p.astype(np.float64), y.astype(np.float32)), rtol=3e-7)
    assert losses.L2Loss(reduction="sum")(p, y).dtype == np.float32


def test_grad_and_grad_hess(losses):
    p, y = RNG.normal(size=(6,)), RNG.normal(size=(6,))
    g = losses.L2Loss().grad(p, y)
    g2, h = losses.L2Loss().grad_hess(p, y)
    np.testing.assert_array_equal(g, g2)
    np.testing.assert_array_equal(h, np.ones(6))  # d2/dp2 of 0.5 (p - y)^2 is 1


def test_out_buffers_are_written_in_place(losses):
    p, y = RNG.normal(size=(3, 4, 5)), RNG.normal(size=(3, 4, 5))
    out, grad_out = np.empty(3), np.empty((3, 4, 5))
    v, g = losses.L2Loss().value_and_grad(p, y, out=out, grad_out=grad_out)
    assert v is out and g is grad_out
    np.testing.assert_allclose(out, l2_ref(p, y), rtol=1e-14)
    # An out= buffer whose features no single stride walks still gets the right numbers.
    odd = np.empty((4, 3, 5)).transpose(1, 0, 2)
    g = losses.L2Loss(batch_axis=1).grad(p, y, grad_out=odd)
    assert g is odd
    np.testing.assert_allclose(odd, l2_grad_ref(p, y, axis=1), rtol=1e-14)
    hess_out = np.empty((3, 4, 5))
    _, h = losses.L2Loss().grad_hess(p, y, hess_out=hess_out)
    assert h is hess_out and np.all(h == 1 / 20)


@pytest.mark.parametrize("kwargs, message", [
    ({"out": np.empty(4)}, "out must have shape (3,) and dtype float64, got shape (4,)"),
    ({"out": np.empty(3, np.float32)}, "out must have shape (3,) and dtype float64, got shape (3,) and dtype float32"),
    ({"grad_out": np.empty((3, 2))}, "grad_out must have shape (3, 4)"),
    ({"grad_out": [1, 2]}, "grad_out must be a numpy array, got list"),
])
def test_bad_out_buffers(losses, kwargs, message):
    p, y = np.ones((3, 4)), np.zeros((3, 4))
    with pytest.raises((ValueError, TypeError)) as exc:
        losses.L2Loss().value_and_grad(p, y, **kwargs)
    assert message in str(exc.value)


def test_read_only_and_overlapping_out(losses):
    p, y = np.ones((3, 4)), np.zeros((3, 4))
    ro = np.empty((3, 4))
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="grad_out is read-only"):
        losses.L2Loss().grad(p, y, grad_out=ro)
    with pytest.raises(ValueError, match="grad_out overlaps the input 'pred'"):
        losses.L2Loss().grad(p, y, grad_out=p)
    buf = np.empty((3, 4))
    with pytest.raises(ValueError, match="grad_out and hess_out share memory|hess_out and grad_out share memory"):
        losses.L2Loss().grad_hess(p, y, grad_out=buf, hess_out=buf)
    with pytest.raises(ValueError, match="needs reduction='none'"):
        losses.L2Loss(reduction="sum")(p, y, out=np.empty(3))


@pytest.mark.parametrize("shape", [(0,), (0, 3), (3, 0), (2, 0, 4)])
def test_empty_arrays(losses, shape):
    p = np.empty(shape)
    v, g = losses.L2Loss().value_and_grad(p, p.copy())
    assert v.shape == (shape[0],) and g.shape == shape
    if shape[0]:
        assert np.all(np.isnan(v))  # the mean over zero features, as numpy's mean gives
    assert losses.L2Loss(reduction="sum")(p, p.copy()) == (0.0 if shape[0] == 0 else np.nan) or shape[0]
    assert np.isnan(losses.L2Loss(reduction="mean")(np.empty((0,)), np.empty((0,))))


@pytest.mark.parametrize("args, exc, message", [
    ((np.ones(2, dtype=np.int64), np.ones(2)), TypeError, "pred must be float32 or float64, got int64"),
    ((np.ones(2, dtype=np.float16), np.ones(2)), TypeError, "pred must be float32 or float64, got float16"),
    ((np.ones(2), np.array(["a", "b"])), TypeError, "label must hold real numbers, got dtype <U1"),
    ((np.ones(2), np.ones(2) * 1j), TypeError, "label must hold real numbers, got dtype complex128"),
    ((np.ones(2), np.array([None, 1]), None), TypeError, "label must hold real numbers, got dtype object"),
    ((np.ones(3), np.ones(2)), ValueError, "label of shape (2,) does not broadcast to the prediction's shape (3,)"),
    ((np.ones(3), np.ones(3), np.ones(2)), ValueError, "sample_weight of shape (2,) does not broadcast"),
    ((np.float64(1.0), 1.0), ValueError, "pred must have a batch axis, got a 0-d array"),
    ((np.ones(2),), TypeError, "missing a required argument: 'label'"),
    ((np.ones(2), 1, None, 5), TypeError, "too many positional arguments"),
])
def test_bad_arrays_name_the_argument(losses, args, exc, message):
    with pytest.raises(exc) as err:
        losses.L2Loss()(*args)
    assert message in str(err.value)
    assert str(err.value).startswith("L2Loss")


def test_batch_axis_out_of_range(losses):
    with pytest.raises(ValueError, match=r"batch_axis=3 is out of range for pred of shape \(2,\)"):
        losses.L2Loss(batch_axis=3)(np.ones(2), 1.0)


@pytest.mark.parametrize("make, exc, message", [
    (lambda L: L.L2Loss(rho=1), TypeError, "L2Loss(): got an unexpected keyword argument 'rho'"),
    (lambda L: L.HuberLoss(rho=-1), ValueError, "HuberLoss: rho must be > 0, got -1.0"),
    (lambda L: L.HuberLoss(rho=float("nan")), ValueError, "HuberLoss: rho must be > 0, got nan"),
    (lambda L: L.HuberLoss(rho="1"), TypeError, "HuberLoss: rho must be a number, got '1'"),
    (lambda L: L.HuberLoss(rho=True), TypeError, "HuberLoss: rho must be a number, got True"),
    (lambda L: L.LogisticLoss(label_format="x"), ValueError,
     "LogisticLoss: label_format must be one of 'signed', 'binary', got 'x'"),
    (lambda L: L.SigmoidBCELoss(from_sigmoid=1), ValueError,
     "SigmoidBinaryCrossEntropyLoss: from_sigmoid must be one of False, True, got 1"),
    (lambda L: L.L2Loss(reduction="avg"), ValueError, "reduction must be one of 'none', 'mean', 'sum', got 'avg'"),
    (lambda L: L.L2Loss(weight=float("inf")), ValueError, "weight must be a finite number"),
    (lambda L: L.L2Loss(batch_axis=0.0), TypeError, "batch_axis must be an int"),
])
def test_bad_constructor_arguments(losses, make, exc, message):
    with pytest.raises(exc) as err:
        make(losses)
    assert message in str(err.value)


def test_gluon_positional_constructor_arguments(losses):
    assert losses.HuberLoss(0.5).params == {"rho": 0.5}           # HuberLoss(rho, weight, batch_axis)
    assert losses.L2Loss(0.25).weight == 0.25                       # L2Loss(weight, batch_axis)
    assert losses.SigmoidBCELoss(True).options == {"from_sigmoid": True}
    assert losses.L2Loss(weight=None).weight == 1.0                 # Gluon's weight=None is 1
    assert repr(losses.HuberLoss(0.5, reduction="mean")) == "HuberLoss(rho=0.5, reduction='mean')"


def test_aliases_are_the_same_class(losses):
    assert losses.L2Loss is losses.l2
    assert losses.SigmoidBCELoss is losses.SigmoidBinaryCrossEntropyLoss is losses.sigmoid_bce
    assert losses.SoftmaxCELoss is losses.SoftmaxCrossEntropyLoss is losses.softmax_cross_entropy
    assert set(losses.LOSSES) == {"l1", "l2", "huber", "hinge", "squared_hinge", "logistic",
                                  "sigmoid_bce", "poisson_nll", "log_cosh", "softmax_cross_entropy",
                                  "kl_div", "cosine_embedding", "triplet", "softmax_focal"}


def test_docstring_comes_from_the_spec(losses):
    doc = losses.HuberLoss.__doc__
    assert doc.startswith("Quadratic within rho of the label")
    assert "abs(label - pred) > rho" in doc                     # the formula
    assert "rho = 1 (gt 0): width of the quadratic zone" in doc  # the param and its bounds
    assert "Reference: MXNet Gluon gluon.loss.HuberLoss" in doc
    assert "second derivative is 0 almost everywhere" in losses.L1Loss.__doc__


def test_optional_input_by_keyword_and_position(losses):
    p, y = np.array([0.0, 0.0]), np.array([1.0, 1.0])
    bce = losses.SigmoidBCELoss()
    by_kw = bce(p, y, pos_weight=np.array([3.0]))
    by_pos = bce(p, y, None, np.array([3.0]))   # Gluon: (pred, label, sample_weight, pos_weight)
    np.testing.assert_allclose(by_kw, 3 * np.log(2), rtol=1e-15)  # by hand: 3 log 2
    np.testing.assert_array_equal(by_kw, by_pos)


def test_64_bit_offsets(losses, tmp_path):
    # Two elements 2**31 + 1 floats apart in a sparse file: an int32 index would wrap.
    n = 2**31 + 2
    mm = np.memmap(tmp_path / "sparse.f32", dtype=np.float32, mode="w+", shape=(n,))
    mm[0], mm[n - 1] = 3.0, 5.0
    far = np.lib.stride_tricks.as_strided(mm, shape=(2,), strides=((n - 1) * 4,))
    v, g = losses.L2Loss().value_and_grad(far, np.float32(1.0))
    np.testing.assert_array_equal(v, [2.0, 8.0])   # 0.5 * (3 - 1)^2, 0.5 * (5 - 1)^2
    np.testing.assert_array_equal(g, [2.0, 4.0])
    del far, mm


# ---------------------------------------------------------------------------- properties

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402


@st.composite
def gluon_case(draw):
    """A pred shape with a batch axis, a broadcastable sample-weight shape, and options."""
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=4))
    axis = draw(st.integers(-len(shape), len(shape) - 1))
    sw_shape = draw(hnp.broadcastable_shapes(shape, min_dims=0, max_dims=len(shape), min_side=0)
                    .filter(lambda s: np.broadcast_shapes(shape, s) == shape))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    weight = draw(st.floats(-3, 3, allow_nan=False))
    reduction = draw(st.sampled_from(["none", "sum", "mean"]))
    rho = draw(st.floats(0.1, 3))
    seed = draw(st.integers(0, 2**32 - 1))
    return shape, axis, sw_shape, dtype, weight, reduction, rho, seed


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=gluon_case())
def test_huber_matches_numpy_on_drawn_shapes_and_weights(losses, case):
    shape, axis, sw_shape, dtype, weight, reduction, rho, seed = case
    rng = np.random.default_rng(seed)
    p = (rng.normal(size=shape) * 2).astype(dtype)
    y = (rng.normal(size=shape) * 2).astype(dtype)
    sw = rng.uniform(size=sw_shape).astype(dtype)
    loss = losses.HuberLoss(rho=rho, weight=weight, batch_axis=axis, reduction=reduction)
    v, g = loss.value_and_grad(p, y, sw)
    # numpy reference in float64 from Gluon's definition
    p64, y64, sw64 = p.astype(np.float64), y.astype(np.float64), sw.astype(np.float64)
    rho32 = float(dtype(rho))  # the kernel sees rho in its own dtype
    e = y64 - p64
    ell = np.where(np.abs(e) > rho32, np.abs(e) - 0.5 * rho32, 0.5 / rho32 * e**2) * sw64 * weight
    dl = np.where(np.abs(e) > rho32, -np.sign(e), -e / rho32) * sw64 * weight
    ax = axis % len(shape)
    n_b, n_f = shape[ax], int(np.prod([s for i, s in enumerate(shape) if i != ax]))
    other = tuple(i for i in range(len(shape)) if i != ax)
    with np.errstate(invalid="ignore", divide="ignore"):
        per = ell.mean(axis=other) if other else ell
        if n_f == 0:
            per = np.full(n_b, np.nan)
        want = {"none": per, "sum": per.sum(), "mean": per.mean() if n_b else np.nan}[reduction]
        gwant = dl / max(n_f, 1) / (n_b if reduction == "mean" and n_b else 1)
    tol = 1e-12 if dtype == np.float64 else 2e-5
    np.testing.assert_allclose(np.asarray(v, np.float64), want, rtol=tol, atol=tol)
    np.testing.assert_allclose(g.astype(np.float64), gwant, rtol=tol, atol=tol)
    assert g.shape == shape and g.dtype == dtype and np.asarray(v).dtype == dtype


@pytest.mark.parametrize("make_out", [
    lambda base: base[4:8][::-1],   # reversed view
    lambda base: base[::3][:4],     # strided view
])
def test_strided_out_is_written_in_place_and_nowhere_else(losses, make_out):
    base = np.full(12, -7.0)
    out = make_out(base)
    p = np.arange(4.0)
    v = losses.L2Loss()(p, np.zeros(4), out=out)
    assert v is out
    np.testing.assert_array_equal(out, 0.5 * p**2)   # by hand: [0, 0.5, 2, 4.5]
    assert np.count_nonzero(base == -7.0) == 12 - 4


def test_zero_stride_out_is_refused(losses):
    out = np.lib.stride_tricks.as_strided(np.zeros(1), shape=(4,), strides=(0,), writeable=True)
    with pytest.raises(ValueError, match="out has a zero stride"):
        losses.L2Loss()(np.ones(4), np.zeros(4), out=out)


def test_unaligned_and_big_endian_inputs(losses):
    raw = np.zeros(8 * 5 + 1, np.uint8)
    unaligned = raw[1:].view(np.float64)  # float64 data starting at an odd address
    unaligned[:] = [1, 2, 3, 4, 5]
    assert not unaligned.flags.aligned
    np.testing.assert_array_equal(losses.L2Loss()(unaligned, np.zeros(5)), 0.5 * unaligned**2)
    big = np.array([1.0, 2.0], dtype=">f8")
    np.testing.assert_array_equal(losses.L2Loss()(big, np.zeros(2)), [0.5, 2.0])


def test_huge_python_ints_are_value_errors(losses):
    with pytest.raises(ValueError, match="rho is beyond the range of double"):
        losses.HuberLoss(rho=10**400)
    with pytest.raises(ValueError, match="weight must be a finite number"):
        losses.L2Loss(weight=10**400)
