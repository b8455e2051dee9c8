"""Row losses, the compiler's side: lowering and passes, naive specs compiling to the stable
kernel, the spec examples, class-index checks, layouts and output buffers.

The numbers against independent references (numpy, mpmath, torch) are in test_rows.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import sympy

import losscc
from losscc.build import build
from losscc.derive import derive
from losscc.errors import SpecError
from losscc.rows import J, plan
from losscc.spec import parse_spec

ROW_LOSSES = ["softmax_cross_entropy", "kl_div", "cosine_embedding", "triplet", "softmax_focal"]
DTYPES = [np.float64, np.float32]
EPS = {np.float64: np.finfo(np.float64).eps, np.float32: np.finfo(np.float32).eps}

CE_HEAD = """\
name: ce
summary: s
reference: r
inputs:
  pred: {row: true}
  label: {index_into: pred}
"""


def _ce_spec(loss: str) -> str:
    return CE_HEAD + f"loss: {loss}\n"


# --------------------------------------------------------------------------- the spec examples


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ROW_LOSSES)
def test_row_spec_examples(losses, name, dtype):
    """Every row spec's examples (numbers by hand or mpmath, said in the spec) in both dtypes."""
    cls = getattr(losses, name)
    assert cls._meta["examples"], f"spec {name} has no examples"
    for ex in cls._meta["examples"]:
        where = f"{name} example at {ex['where']} ({np.dtype(dtype).name})"
        loss = cls(**ex["options"])
        inputs = {k: np.array([v], dtype=np.int64 if loss._kinds[k] == "index" else dtype)
                  for k, v in ex["inputs"].items()}
        value, grad = loss.value_and_grad(**inputs)
        grad = grad[0] if isinstance(grad, tuple) else grad
        tol = 1e-14 if dtype == np.float64 else 8 * EPS[np.float32]
        np.testing.assert_allclose(value, [ex["loss"]], rtol=tol, atol=tol, err_msg=where)
        if ex["grad"] is not None:
            np.testing.assert_allclose(grad, [ex["grad"]], rtol=tol, atol=tol, err_msg=where)


# --------------------------------------------------------------------------- lowering and passes


def test_cross_entropy_lowers_to_logsumexp_and_a_gather():
    """-log(softmax(pred)[label]) becomes m + r - pred[label]: one logsumexp (a max pass and
    a sum pass) and one gather, and the gradient softmax - onehot."""
    sym = derive(parse_spec(_ce_spec("-log(softmax(pred)[label])")))
    (v,) = sym.variants
    prog = v.program
    kinds = sorted(s.kind for s in prog.scalars)
    assert kinds == ["gather", "lse"]
    lse = next(s for s in prog.scalars if s.kind == "lse")
    gather = next(s for s in prog.scalars if s.kind == "gather")
    assert sympy.simplify(v.value - (lse.shift + lse.sym - gather.sym)) == 0
    x = sympy.Symbol("x_pred", real=True)
    softmax = sympy.exp(x - lse.shift - lse.sym)
    onehot = sympy.Piecewise((1, sympy.Eq(J, gather.index)), (0, True))
    from sympy.codegen.cfunctions import expm1

    grad = v.grads[0].replace(lambda e: isinstance(e, expm1), lambda e: sympy.exp(e.args[0]) - 1)
    assert sympy.simplify(grad - (softmax - onehot)) == 0
    assert v.grads[0].has(expm1)  # softmax - 1 at the label: no cancellation when p is near 1
    steps = plan(prog, [v.value, v.grads[0]])
    assert [[st.role for st in p] for p in steps.passes] == [["lse_max"], ["lse_tail"]]
    assert [g.sym for g in steps.pre] == [gather.sym]


def test_row_max_gradient_goes_to_the_first_argmax():
    spec = parse_spec(CE_HEAD.replace("  label: {index_into: pred}\n", "") + "loss: max(pred * pred)\n")
    (v,) = derive(spec).variants
    steps = plan(v.program, [v.value, v.grads[0]])
    assert [[st.role for st in p] for p in steps.passes] == [["max"]]
    assert len(steps.after[0]) == 1  # pred read at the argmax, after the pass


# --------------------------------------------------------------------------- naive specs


NAIVE_CE = [
    "-log(softmax(pred)[label])",
    "log(sum(exp(pred))) - pred[label]",
    "-log(exp(pred[label]) / sum(exp(pred)))",
    "logsumexp(pred) - pred[label]",
    "-log_softmax(pred)[label]",
]


@pytest.fixture(scope="module")
def naive_ce(tmp_path_factory):
    """Each naive way of writing softmax cross entropy, built into one module."""
    folder = tmp_path_factory.mktemp("naive")
    for i, text in enumerate(NAIVE_CE):
        (folder / f"ce{i}.yaml").write_text(_ce_spec(text).replace("name: ce", f"name: ce{i}"))
    report = build([folder], out=folder / "out", name="naive_ce", log=lambda *a: None)
    return losscc.load(report.path), report.path


@pytest.mark.parametrize("i", range(len(NAIVE_CE)), ids=NAIVE_CE)
def test_naive_cross_entropy_compiles_to_the_stable_kernel(naive_ce, losses, i):
    """However softmax CE is written, the kernel takes a max pass and sums exp(x - max): at
    logits of 1e4 it gives the built-in loss's values and gradients, finite and exact."""
    mod, path = naive_ce
    c = (path / "_kernels.c").read_text() if (path / "_kernels.c").exists() else None
    loss = getattr(mod, f"ce{i}")()
    builtin = losses.SoftmaxCrossEntropyLoss()
    for dtype in DTYPES:
        x = (np.array([[1.0, 10.0, -3.0], [8.0, 2.0, 8.0]]) * 1e4).astype(dtype)
        y = np.array([0, 2])
        v, g = loss.value_and_grad(x, y)
        bv, bg = builtin.value_and_grad(x, y)
        assert np.all(np.isfinite(v)) and np.all(np.isfinite(g))
        np.testing.assert_array_equal(v, bv)
        np.testing.assert_allclose(g, bg, rtol=0, atol=4 * EPS[dtype])
        np.testing.assert_allclose(v, [90000.0, np.log(2.0)], rtol=EPS[dtype])  # two tied maxima
    if c is not None:
        assert "jm" in c and "log1p" in c


# --------------------------------------------------------------------------- class indices


def test_out_of_range_label_names_position_and_value(losses):
    ce = losses.SoftmaxCrossEntropyLoss()
    x = np.zeros((4, 3))
    with pytest.raises(IndexError, match=r"label\[2\] \(flat position 2\) = 3 is outside \[0, 3\)"):
        ce(x, np.array([0, 1, 3, 2]))
    with pytest.raises(IndexError, match=r"= -1 is outside"):
        ce.value_and_grad(x, np.array([0, -1, 1, 2]))
    # a label with the class axis kept, and a 3-D prediction: the position is in label's shape
    x3 = np.zeros((2, 3, 5))  # batch 2, class axis 1, 5 rows per sample
    y3 = np.zeros((2, 5), np.int64)
    y3[1, 4] = 9
    with pytest.raises(IndexError, match=r"label\[1, 4\] \(flat position 9\) = 9"):
        losses.SoftmaxCrossEntropyLoss(axis=1)(x3, y3)


def test_labels_must_be_integers(losses):
    ce = losses.SoftmaxCrossEntropyLoss()
    x = np.zeros((3, 4))
    np.testing.assert_array_equal(ce(x, np.array([0.0, 1.0, 3.0])), ce(x, np.array([0, 1, 3])))
    with pytest.raises(ValueError, match=r"label.flat\[1\] = 1.5 is not an integer"):
        ce(x, np.array([0.0, 1.5, 2.0]))
    with pytest.raises(ValueError, match="is not an integer"):
        ce(x, np.array([0.0, np.nan, 2.0]))
    with pytest.raises(TypeError, match="booleans"):
        ce(x, np.array([True, False, True]))


def test_ignore_index_rows_give_zero_loss_and_zero_gradient(losses):
    x = np.array([[1.0, 2.0, 3.0], [3.0, 1.0, 0.0], [0.0, 0.0, 5.0]])
    full = losses.SoftmaxCrossEntropyLoss()
    v, g = full.value_and_grad(x, np.array([0, -100, 2]))
    ref_v, ref_g = full.value_and_grad(x, np.array([0, 1, 2]))
    np.testing.assert_array_equal(v[[0, 2]], ref_v[[0, 2]])
    assert v[1] == 0.0 and np.all(g[1] == 0.0)
    np.testing.assert_array_equal(g[[0, 2]], ref_g[[0, 2]])
    v7 = losses.SoftmaxCrossEntropyLoss(ignore_index=7)(x, np.array([7, 7, 2]))
    assert v7[0] == v7[1] == 0.0 and v7[2] == ref_v[2]


def test_smoothed_weighted_ce_gradient_keeps_the_sum_of_the_other_weights(losses):
    # label smoothing k = ls/C times sum(w) - w_j: where w_j is nearly all of sum(w) the
    # plain sum rounds the other weights away (leave-one-out in codegen.py). Truths: mpmath
    # (2000 bits) of the spec's written formula's derivative,
    # (1 - ls)*w[label]*(softmax_j - [j == label]) + ls/C*(sum(w)*softmax_j - w_j).
    ce = losses.SoftmaxCrossEntropyLoss(label_smoothing=0.25890468907538955)
    _, g = ce.value_and_grad(np.array([[-1274.869953962021, 2283.990418431206]]), np.array([1]),
                             class_weight=np.array([[6.996440505457303e-233, 8.833379311541832e-41]]))
    assert g[0, 1] == pytest.approx(9.0570562684994222e-234, rel=1e-15)  # was 0.0
    assert g[0, 0] == pytest.approx(-9.0570562684994222e-234, rel=1e-15)
    ce = losses.SoftmaxCrossEntropyLoss(label_smoothing=0.4340887123375401)
    pred = np.array([[-158.6045379638672, 1.9307528734207153, 75.13743591308594, 0, 0, 0]], np.float32)
    w = np.array([[0, 2502.712646484375, 3.4028234663852886e38, 596.793212890625,
                   0.01615622267127037, 0.045433130115270615]], np.float32)
    _, g = ce.value_and_grad(pred, np.array([4]), class_weight=w)
    assert g[0, 2] == np.float32(-568491.75137059208)  # was -568716
    # dense labels: sum(w*label) - w_j*label_j at the class that dominates both
    ce = losses.SoftmaxCrossEntropyLoss(sparse_label=False)
    _, g = ce.value_and_grad(np.array([[709.78271484375, 5775.42333984375, -398.3600769042969]], np.float32),
                             np.array([[0.3798788785934448, 0.4596163034439087, 0.16050483286380768]], np.float32),
                             class_weight=np.array([[4276.01611328125, 3.4028234663852886e38, 59.64292907714844]],
                                                   np.float32))
    assert g[0, 1] == np.float32(1633.9411843238174)  # was 0.0


# --------------------------------------------------------------------------- plain kernels


@pytest.mark.parametrize("dtype", DTYPES)
def test_plain_kernel_runs_without_optional_inputs_and_agrees(losses, dtype):
    """Without class_weight and with label_smoothing at 0, softmax cross entropy runs the
    plain kernel (codegen: the optional inputs folded in, no class-weight passes); it must
    agree with the general kernel given the defaults explicitly, to a few ulps."""
    rng = np.random.default_rng(3)
    x = (rng.normal(size=(64, 37)) * rng.choice([1, 30, 1e3], size=(64, 1))).astype(dtype)
    y = rng.integers(0, 37, 64)
    ce = losses.SoftmaxCrossEntropyLoss()
    plain = ce._plain[0]
    assert ce._kernel("vg_" + np.dtype(dtype).name) is plain["vg_" + np.dtype(dtype).name]
    v, g = ce.value_and_grad(x, y)
    v1, g1 = ce.value_and_grad(x, y, class_weight=np.ones(37, dtype))  # the general kernel
    np.testing.assert_allclose(v, v1, rtol=4 * EPS[dtype], atol=0)
    np.testing.assert_allclose(g, g1, rtol=4 * EPS[dtype], atol=4 * np.finfo(dtype).tiny)
    # given class weights, or smoothing, take the general kernel; ignore_index does not
    assert losses.SoftmaxCrossEntropyLoss(label_smoothing=0.1)._kernel("v_float64") \
        is not plain["v_float64"]
    assert losses.SoftmaxCrossEntropyLoss(ignore_index=3)._kernel("v_float64") is plain["v_float64"]
    assert ce._kernel("v_float64", given=["class_weight"]) is not plain["v_float64"]


@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_at_the_row_max_are_each_counted_once(losses, dtype):
    """The logsumexp's tail leaves out one class equal to the max and adds exp(0) = 1 for
    each other tie: log(4) exactly where all four logits are equal (log1p(3), correctly
    rounded), and log(2 + e^-4) - 0 for [5, 5, 1] at label 0. Truths: math.log, mpmath."""
    ce = losses.SoftmaxCrossEntropyLoss()
    x = np.array([[3.0, 3.0, 3.0, 3.0], [5.0, 5.0, 1.0, -np.inf]], dtype)
    v, g = ce.value_and_grad(x, np.array([0, 0]))
    assert v[0] == dtype(np.log(4.0))
    assert v[1] == pytest.approx(0.70226332143909497, rel=2 * float(EPS[dtype]))  # log(2 + e^-4), mpmath
    np.testing.assert_allclose(g[0], [-0.75, 0.25, 0.25, 0.25], rtol=2 * EPS[dtype])
    assert g[1, 3] == 0.0
    # a NaN anywhere in the row, before or after the max, gives NaN
    for row in ([np.nan, 1.0, 2.0], [1.0, 2.0, np.nan]):
        v, g = ce.value_and_grad(np.array([row], dtype), np.array([1]))
        assert np.isnan(v[0]) and np.isnan(g).all()


# --------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("dtype", DTYPES)
def test_class_axis_anywhere_and_non_contiguous(losses, dtype):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 6)).astype(dtype)
    y = np.array([0, 5, 2, 3])
    ce = losses.SoftmaxCrossEntropyLoss()
    v, g = ce.value_and_grad(x, y)
    # class axis first, batch second
    vt, gt = losses.SoftmaxCrossEntropyLoss(axis=0, batch_axis=1).value_and_grad(
        np.ascontiguousarray(x.T), y)
    np.testing.assert_array_equal(vt, v)
    np.testing.assert_array_equal(gt, g.T)
    # a strided view
    big = np.zeros((8, 12), dtype)
    big[::2, ::2] = x
    vs, gs = ce.value_and_grad(big[::2, ::2], y)
    np.testing.assert_array_equal(vs, v)
    np.testing.assert_array_equal(gs, g)
    # 3-D: class axis in the middle, 2 rows per sample, averaged (Gluon)
    x3 = np.stack([x, x[::-1]], axis=2)  # (4, 6, 2)
    y3 = np.stack([y, y[::-1]], axis=1)  # (4, 2)
    v3, g3 = losses.SoftmaxCrossEntropyLoss(axis=1).value_and_grad(x3, y3)
    np.testing.assert_allclose(v3, (v + v[::-1]) / 2, rtol=4 * EPS[dtype])
    np.testing.assert_allclose(g3[:, :, 0], g / 2, rtol=4 * EPS[dtype])


def _lane_cases(rng, n, nc, dtype):
    """(name, loss class name, options, label) for row kernels that run short rows in lanes."""
    y = rng.integers(0, nc, size=n)
    y_ignored = y.copy()
    y_ignored[[3, n - 1]] = -100  # ignore_index's default: 0 loss, 0 gradient
    p = rng.dirichlet(np.ones(nc), size=n).astype(dtype)
    return [("ce", "SoftmaxCrossEntropyLoss", {}, y), ("ce ignored", "SoftmaxCrossEntropyLoss", {}, y_ignored),
            ("ce dense", "SoftmaxCrossEntropyLoss", {"sparse_label": False}, p),
            ("ce logp", "SoftmaxCrossEntropyLoss", {"from_logits": True}, y),
            ("focal", "SoftmaxFocalLoss", {}, y)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nc", [1, 2, 7, 16, 17])
def test_short_rows_in_lanes_give_each_row_its_own_bits(losses, dtype, nc):
    """Rows of at most LCC_LANE_NC = 16 classes run LCC_LANES = 8 at a time, one per vector
    lane (rows.c.j2); 17 run row by row. Either way a row's value and gradient are the same
    bits in any batch as alone (a lane past the batch's end repeats a row and stores nothing),
    and a batch of 19 rows (two groups and a part) matches the row-by-row loop (the same rows
    twice per sample: class axis 1 of (n, nc, 2)) to rounding."""
    rng = np.random.default_rng(nc)
    n = 19
    x = (rng.normal(size=(n, nc)) * 4).astype(dtype)
    if nc > 1:
        x[0, 0] = x[0, 1] = x[0].max()  # a tie at the max
    logp = (x - np.log(np.exp(x).sum(1, keepdims=True))).astype(dtype)
    for name, cls, options, label in _lane_cases(rng, n, nc, dtype):
        xin = logp if options.get("from_logits") else x
        loss = getattr(losses, cls)(**options)
        v, g = loss.value_and_grad(xin, label)
        assert np.all(np.isfinite(v)) and np.all(np.isfinite(g)), name
        for i in range(n):
            vi, gi = loss.value_and_grad(xin[i:i + 1], label[i:i + 1])
            np.testing.assert_array_equal(vi, v[i:i + 1], err_msg=f"{name}: row {i}")
            np.testing.assert_array_equal(gi, g[i:i + 1], err_msg=f"{name}: row {i}")
        v2, g2 = getattr(losses, cls)(axis=1, **options).value_and_grad(
            np.stack([xin, xin], axis=2), np.stack([label, label], axis=-1))
        tol = 8 * float(EPS[dtype])
        np.testing.assert_allclose(v2, v, rtol=tol, atol=tol, err_msg=name)
        np.testing.assert_allclose(g2[:, :, 0] * 2, g, rtol=tol, atol=tol, err_msg=name)
        if name == "ce ignored":
            assert v[3] == 0 and v[n - 1] == 0 and not g[3].any() and not g[n - 1].any()


def test_a_bad_label_in_lanes_names_its_row(losses):
    x = np.zeros((19, 5))
    y = np.zeros(19, np.int64)
    y[13] = 5
    with pytest.raises(IndexError, match=r"label\[13\] \(flat position 13\) = 5 is outside \[0, 5\)"):
        losses.SoftmaxCrossEntropyLoss().value_and_grad(x, y)


def test_row_output_buffers(losses):
    x = np.random.default_rng(1).normal(size=(5, 3))
    y = np.array([0, 1, 2, 1, 0])
    ce = losses.SoftmaxCrossEntropyLoss()
    v, g = ce.value_and_grad(x, y)
    out = np.empty(5)
    gbuf = np.empty((3, 5)).T  # a transposed (non-contiguous) gradient buffer
    v2, g2 = ce.value_and_grad(x, y, out=out, grad_out=gbuf)
    assert v2 is out and g2 is gbuf
    np.testing.assert_array_equal(out, v)
    np.testing.assert_array_equal(gbuf, g)
    with pytest.raises(ValueError, match="overlaps the input 'pred'"):
        ce.value_and_grad(x, y, grad_out=x)
    with pytest.raises(TypeError, match="grad_hess is for elementwise losses"):
        ce.grad_hess(x, y)


def test_sample_weight_shapes_and_mxnet_golden(losses):
    """MXNet's unit test: [[0, 2], [1, 4]], labels [0, 1] -> [2.12692809, 0.04858733]
    (float32 values there; exactly log(1 + e^2) and log(1 + e^-3))."""
    x = np.array([[0.0, 2.0], [1.0, 4.0]])
    y = np.array([0, 1])
    ce = losses.SoftmaxCrossEntropyLoss()
    exact = np.array([np.log1p(np.exp(2.0)), np.log1p(np.exp(-3.0))])
    np.testing.assert_allclose(ce(x, y), exact, rtol=1e-15)
    for sw in (np.array([[0.5], [1.0]]), np.array([0.5, 1.0])):
        np.testing.assert_allclose(ce(x, y, sw), exact * [0.5, 1.0], rtol=1e-15)
    with pytest.raises(ValueError, match="size 1 along the class axis"):
        ce(x, y, np.ones((2, 2)))


def test_wrt_selects_opt_in_gradients(losses):
    rng = np.random.default_rng(2)
    p = rng.normal(size=(3, 4))
    t = rng.dirichlet(np.ones(4), size=3)
    kl = losses.KLDivLoss(from_logits=False)
    v, gp = kl.value_and_grad(p, t)
    v2, (gp2, gt) = kl.value_and_grad(p, t, wrt=("pred", "label"))
    np.testing.assert_array_equal(v, v2)
    np.testing.assert_array_equal(gp, gp2)
    lp = p - np.log(np.exp(p).sum(1, keepdims=True))
    np.testing.assert_allclose(gt, (np.log(t) + 1 - lp) / 4, rtol=1e-12)
    with pytest.raises(ValueError, match="not a differentiable input"):
        kl.grad(p, t, wrt="nope")


# --------------------------------------------------------------------------- bad row specs


@pytest.mark.parametrize("text,message", [
    (_ce_spec("pred"), "'pred' is a vector along the class axis here: reduce it"),
    (_ce_spec("sum(pred)[label]"), "only a row (an expression of row inputs) can be indexed"),
    (_ce_spec("logsumexp(pred) - pred[pred]"), "the index must be a class-index input"),
    (_ce_spec("logsumexp(pred) - pred[label] + label"),
     "'label' holds class indices here (it indexes a row); it cannot also be used as a number"),
    ("name: e\nsummary: s\nreference: r\ninputs:\n  pred: {}\nloss: sum(pred)\n",
     "sum() reduces over the class axis: it is for row losses"),
    ("name: e\nsummary: s\nreference: r\ninputs:\n  pred: {}\n  label: {}\nloss: pred[label]\n",
     "indexing (x[label]) is for row losses"),
    (CE_HEAD.replace("pred: {row: true}", "pred: {}") + "loss: pred[label]\n",
     "the prediction 'pred' of a row loss must have row: true"),
    (CE_HEAD + "  w: {differentiable: true}\nloss: logsumexp(pred) * w\n",
     "only row inputs of a row loss can be differentiable"),
])
def test_bad_row_specs(text, message):
    with pytest.raises(SpecError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        derive(parse_spec(text, "bad.yaml"))


# --------------------------------------------------------------------------- the row rules
# Each rule three ways (it fires, it is exact where the naive form is fine, it is right
# where the naive form overflows) and a near miss left alone. The overflow half is
# test_naive_cross_entropy_compiles_to_the_stable_kernel (logits of 1e4).

X = sympy.Symbol("x_pred", real=True)
G = sympy.Symbol("xg0_1", real=True)


def _stabilized(expr):
    from losscc.rows import ROW_RULES
    from losscc.stabilize import stabilize

    return stabilize(expr, extra={"to-stable-nodes": ROW_RULES})


def test_rule_log_sum_exp_fires():
    from losscc.rows import LogSumExp, RowSum

    out, fired = _stabilized(sympy.log(RowSum(sympy.exp(2 * X))) - G)
    assert out == LogSumExp(2 * X) - G
    assert [f[0] for f in fired] == ["log-sum-exp"]


def test_rule_log_of_product_fires():
    from losscc.rows import LogSumExp, RowSum

    out, fired = _stabilized(-sympy.log(sympy.exp(G) / RowSum(sympy.exp(X))))
    assert out == LogSumExp(X) - G
    assert [f[0] for f in fired] == ["log-of-product", "log-sum-exp"]


@pytest.mark.parametrize("text", [
    "log(sum(exp(pred)) + 1)",       # not a bare sum of exps
    "log(sum(2 * exp(pred)))",       # a sum of scaled exps (exact, but not this rule's shape)
    "log(sum(exp(pred) + pred))",
    "log(sum(pred * pred))",
])
def test_row_rules_near_misses_are_left_alone(text):
    from losscc.expr import parse_spec_math, symbols_for

    spec = parse_spec(CE_HEAD.replace("  label: {index_into: pred}\n", "") + f"loss: {text}\n")
    parsed, _ = parse_spec_math(spec, {}, symbols_for(spec))
    from losscc.rows import LogSumExp

    out, fired = _stabilized(parsed)
    assert not [f for f in fired if f[0] in ("log-sum-exp", "log-of-product")]
    assert not out.has(LogSumExp)  # (log(s + 1) may still become log1p(s): another rule)


def test_row_rules_are_exact_where_the_naive_form_is_fine(naive_ce):
    """At moderate logits the rewritten kernels agree with mpmath (50 digits) evaluating the
    naive formula as written."""
    import mpmath

    mod, _ = naive_ce
    x = np.array([[0.5, -1.25, 2.0, 0.0], [3.0, 3.0, -2.0, 1.5]])
    y = np.array([1, 3])
    with mpmath.workdps(50):
        truth = [float(mpmath.log(sum(mpmath.exp(mpmath.mpf(v)) for v in row)) - mpmath.mpf(row[k]))
                 for row, k in zip(x, y)]
    for i in (1, 2):  # the forms that need the rules
        np.testing.assert_allclose(getattr(mod, f"ce{i}")()(x, y), truth, rtol=2 * EPS[np.float64])


# --------------------------------------------------------------------------- found in review


def test_per_class_row_input_gradient_with_the_class_axis_inside(losses):
    """A (C,) target lies along the class axis wherever it is; its gradient is summed back
    to (C,) over every other axis. Reference by hand: d/dq of mean_c q (log q - x), summed
    over the 2 x 3 rows, over the 3 classes of each row: (log q + 1 - x) / 3 / (rows per
    sample = 3), summed over samples and rows."""
    rng = np.random.default_rng(1)
    x = np.log(rng.dirichlet(np.ones(3), (2, 4)).transpose(0, 2, 1))  # (N, C, d) = (2, 3, 4)
    q = rng.dirichlet(np.ones(3))
    _, (gp, gq) = losses.KLDivLoss(axis=1).value_and_grad(x, q, wrt=("pred", "label"))
    assert gq.shape == (3,)
    ref = ((np.log(q[None, :, None]) + 1 - x) / 3 / 4).sum(axis=(0, 2))
    np.testing.assert_allclose(gq, ref, rtol=1e-13)


def test_focal_gradient_is_zero_where_p_rounds_to_one(losses):
    """(1 - p)**gamma * log p: sympy's derivative of x**g is g*x**g/x, 0/0 at p = 1; the
    power-quotient rule makes it g*x**(g - 1). The loss and the gradient are 0 there."""
    focal = losses.SoftmaxFocalLoss()
    for x, dtype in [([[0.0, -np.inf]], np.float64), ([[110.0, 0.0]], np.float32),
                     ([[800.0, 0.0]], np.float64), ([[3.0]], np.float64)]:
        v, g = focal.value_and_grad(np.array(x, dtype), np.array([0]))
        assert v[0] == 0.0 and np.all(g == 0.0), (x, v, g)


def test_ignore_index_must_be_an_integer(losses):
    with pytest.raises(ValueError, match="ignore_index must be an integer"):
        losses.SoftmaxCrossEntropyLoss(ignore_index=1.5)
    with pytest.raises(ValueError, match="ignore_index must be an integer"):
        losses.SoftmaxCrossEntropyLoss(ignore_index=2.0**60)


def test_index_error_position_for_a_label_with_the_class_axis_kept(losses):
    y = np.zeros((2, 1, 3), np.int64)
    y[1, 0, 2] = 5
    with pytest.raises(IndexError, match=r"label\[1, 0, 2\] \(flat position 5\) = 5"):
        losses.SoftmaxCrossEntropyLoss(axis=1)(np.zeros((2, 4, 3)), y)


def test_index_error_position_for_a_broadcast_label(losses):
    ce = losses.SoftmaxCrossEntropyLoss()
    with pytest.raises(IndexError, match=r"label \(0-d\) \(flat position 0\) = 7 is outside"):
        ce(np.zeros((3, 4)), np.array(7))
    with pytest.raises(IndexError, match=r"label\[0\] \(flat position 0\) = 9 is outside"):
        ce(np.zeros((3, 4)), np.array([9]))


def test_triplet_reshapes_every_input_like_pred(losses):
    """Gluon reshapes positive and negative like pred when their sizes match."""
    rng = np.random.default_rng(3)
    a, p, n = (rng.normal(size=(3, 4, 2)) for _ in range(3))
    tri = losses.TripletLoss()
    v, grads = tri.value_and_grad(a, p.reshape(3, 8), n.reshape(3, 8))
    v0, grads0 = tri.value_and_grad(a, p, n)
    np.testing.assert_array_equal(v, v0)
    assert grads[1].shape == grads[2].shape == (3, 8)
    np.testing.assert_array_equal(grads[2], grads0[2].reshape(3, 8))


# --------------------------------------------------------------------------- overflow-free rows
# Each rule: it fires, it is an identity, near misses are left alone, and the kernel it makes
# is finite and right where the written form overflows (points from `losscc check`).

U = sympy.Symbol("x_positive", real=True)
V = sympy.Symbol("x_negative", real=True)
A = sympy.Symbol("x_pred", real=True)


def _one_class(expr):
    """`expr` on a row of one class (every reduction is its own argument). Every row rule
    rewrites per element, so an identity on one class is an identity on any row (sums are
    linear; a norm of one element is |e|)."""
    from losscc.rows import RowNorm, RowSum

    return expr.replace(lambda e: isinstance(e, RowSum), lambda e: e.args[0]) \
               .replace(lambda e: isinstance(e, RowNorm), lambda e: sympy.Abs(e.args[0]))


def test_rule_difference_of_squares_fires_and_is_exact():
    from losscc.rows import RowSum, ScaledProduct

    before = RowSum((U - A)**2) - RowSum((V - A)**2) + sympy.Symbol("p_margin")
    out, fired = _stabilized(before)
    assert [f[0] for f in fired] == ["difference-of-squares"]
    assert out == 2 * RowSum(ScaledProduct(U - V, (U + V) / 2 - A)) + sympy.Symbol("p_margin")
    back = _one_class(out).replace(lambda e: isinstance(e, ScaledProduct), lambda e: e.naive())
    assert sympy.expand(back - _one_class(before)) == 0
    # a common factor k comes along: 3*sum(u**2) - 3*sum(v**2)
    out, _ = _stabilized(3 * RowSum(U**2) - 3 * RowSum(V**2))
    assert out == 6 * RowSum(ScaledProduct(U - V, (U + V) / 2))


@pytest.mark.parametrize("expr", [
    "RowSum(U**2) + RowSum(V**2)",            # a sum, not a difference
    "RowSum(U**2) - 2*RowSum(V**2)",          # different factors
    "RowSum(U**3) - RowSum(V**3)",            # not squares
    "RowSum(U**2) - RowSum(V)**2",            # the square of a sum
    "RowSum(U**2) - RowSum(V**2 + 1)",        # a sum of something else
])
def test_rule_difference_of_squares_near_misses(expr):
    from losscc.rows import RowSum

    before = eval(expr, {"RowSum": RowSum, "U": U, "V": V})  # noqa: S307 - test literals
    _, fired = _stabilized(before)
    assert "difference-of-squares" not in [f[0] for f in fired]


def test_rule_scaled_sum_fires_and_is_exact():
    """k*sum(a*b) -> k*sum(ScaledProduct(a, b)) for a row constant k (label smoothing's
    s * mean(w * -logp)), also in the nonzero branch of where(c, 0, a*b*c) (the dense label
    term); the summand is the same product."""
    from losscc.rows import NCLASS, RowSum, ScaledProduct, masked_product

    s = sympy.Symbol("p_label_smoothing", real=True)
    before = s * RowSum(U * (A - V)) / NCLASS
    out, fired = _stabilized(before)
    assert [f[0] for f in fired] == ["scaled-sum"]
    assert out == s * RowSum(ScaledProduct(U, A - V)) / NCLASS
    back = out.replace(lambda e: isinstance(e, ScaledProduct), lambda e: e.naive())
    assert sympy.expand(back - before) == 0
    masked = sympy.Piecewise((0, sympy.Eq(V, 0)), (-U * V * A, True))
    out, _ = _stabilized((1 - s) * RowSum(masked))
    summand = sympy.Piecewise((0, sympy.Eq(V, 0)), (ScaledProduct(-V, U, A), True))  # sympy's order
    assert out == (1 - s) * RowSum(summand)
    assert masked_product(summand) == ((-V, U, A), sympy.Piecewise((0, sympy.Eq(V, 0)), (1, True)))
    # its derivative is the plain product's
    assert sympy.diff(ScaledProduct(-U, V, A), A) == -U * V


@pytest.mark.parametrize("expr", [
    "RowSum(U*V)",                            # no factor k
    "-RowSum(U*V)",                           # k = -1
    "2*RowSum(3*U)",                          # one factor that is not a number
    "RowSum(U*V)/RowSum(U)",                  # k holds a reduction
    "2*RowSum(Piecewise((1, Eq(V, 0)), (U*V, True)))",  # no 0 branch
])
def test_rule_scaled_sum_near_misses(expr):
    from losscc.rows import RowSum

    names = {"RowSum": RowSum, "U": U, "V": V, "Piecewise": sympy.Piecewise, "Eq": sympy.Eq}
    _, fired = _stabilized(eval(expr, names))  # noqa: S307 - test literals
    assert "scaled-sum" not in [f[0] for f in fired]


def test_triplet_at_huge_anchors_is_finite(losses):
    """pred = -3e209 squares to inf in both distances (inf - inf = NaN before the rule).
    Row 1 (from `losscc check`): d+ - d- is -7.4e270, relu 0, gradients 0. Row 2, by hand:
    u = pos - pred = [1e100 + 3e200, 0], v = neg - pred = [3e200, 0]: u^2 - v^2 = (u - v)(u + v)
    = 1e100 * (6e200 + 1e100) = 6e300 (+ 1e200, below its ulp) + margin 1; gradients
    2(neg - pos) = [-2e100, 0], 2(pos - pred) = [2(3e200 + 1e100), 0] = [6e200, 0] (1e100 is
    below the ulp), -2(neg - pred) = [-6e200, 0]."""
    pred = np.array([[-3.125611581049725e209] * 2, [-3e200, 0.0]])
    pos = np.array([[0.0023795751097501656, 0.014556778150152173], [1e100, 0.0]])
    neg = np.array([[1.180117513819535e61, -341.08968383190586], [0.0, 0.0]])
    v, (gp, gpos, gneg) = losses.TripletLoss().value_and_grad(pred, pos, neg)
    np.testing.assert_allclose(v, [0.0, 6e300], rtol=4 * EPS[np.float64])
    np.testing.assert_allclose(gp, [[0, 0], [-2e100, 0]], rtol=4 * EPS[np.float64])
    np.testing.assert_allclose(gpos, [[0, 0], [6e200, 0]], rtol=4 * EPS[np.float64])
    np.testing.assert_allclose(gneg, [[0, 0], [-6e200, 0]], rtol=4 * EPS[np.float64])


def test_triplet_products_past_the_float_range_sum_to_their_infinity(losses):
    """Row 1, from `losscc check`: per element (pos - neg)*(pos + neg - 2 pred) is
    2.2e160 * 3.7e185 = +inf at class 0 and 2.2e160 * -2.2e160 = -inf at class 1, so the plain
    sum was inf - inf = NaN, and relu'(NaN) made every gradient NaN. The true value is +inf
    (the +8.2e345 term dominates); gradients by hand, relu' = 1: d/dpred = 2(neg - pos),
    d/dpos = 2(pos - pred), d/dneg = -2(neg - pred), each one rounding. Row 2, by hand:
    pos**2 - neg**2 per class is +1e400, -1e400 and 9 - 4 (pred = 0), so the loss is
    exactly 5 + margin 1 = 6 (the two overflowing products cancel exactly in the scaled sum;
    the plain one is NaN)."""
    pred = np.array([[-1.8403264748388964e+185, -3.569433752173249e-278, -0.3387684153428755],
                     [0.0, 0.0, 0.0]])
    pos = np.array([[-0.03847952508252361] * 3, [1e200, 0.0, 3.0]])
    neg = np.array([[-2.2337815874403995e+160] * 3, [0.0, 1e200, 2.0]])
    v, (gp, gpos, gneg) = losses.TripletLoss(margin=1.0).value_and_grad(pred, pos, neg)
    assert v[0] == np.inf and v[1] == 6.0
    np.testing.assert_array_equal(gp, 2 * (neg - pos))
    np.testing.assert_array_equal(gpos, 2 * (pos - pred))
    np.testing.assert_array_equal(gneg, -2 * (neg - pred))
    assert gp[0, 0] == -4.467563174880799e+160  # the check's true d/dpred[0] (mpmath)


X1 = sympy.Symbol("x_input1", real=True)
X2 = sympy.Symbol("x_input2", real=True)


def test_rules_norm_and_normalized_sum_make_the_cosine_a_dot_of_unit_vectors():
    from losscc.functions import naive
    from losscc.rows import Quotient, RowNorm, RowSum

    cos = RowSum(X1 * X2) / (sympy.sqrt(RowSum(X1**2)) * sympy.sqrt(RowSum(X2**2)))
    out, fired = _stabilized(cos)
    n1, n2 = RowNorm(X1), RowNorm(X2)
    assert out == RowSum(Quotient(X1, n1) * Quotient(X2, n2))
    assert sorted({f[0] for f in fired}) == ["norm", "normalized-sum"]
    # an identity: back to textbook math, on one class, both are sign(x1 * x2)
    back = _one_class(out).replace(lambda e: isinstance(e, Quotient), lambda e: e.naive())
    assert sympy.simplify(back - _one_class(naive(cos))) == 0


@pytest.mark.parametrize("text", [
    "sqrt(RowSum(X1**3))",                        # not a sum of squares
    "sqrt(RowSum(X1**2) + 1)",                    # not a bare sum
    "RowSum(X1**2)**2",                           # an even power: no square root
    "RowSum(X1 * X2) / sqrt(RowSum(X1**2 + 1))",  # the norm of something else
    "RowSum(X1 + X2) / sqrt(RowSum(X1**2))",      # x1 is not a factor of the summand
])
def test_rules_norm_and_normalized_sum_near_misses(text):
    from losscc.rows import Quotient, RowNorm, RowSum

    before = eval(text, {"RowSum": RowSum, "X1": X1, "X2": X2, "sqrt": sympy.sqrt})  # noqa: S307
    out, _ = _stabilized(before)
    assert not out.has(Quotient)
    if "+ 1" in text or "**3" in text or "**2)**2" in text:
        assert not out.has(RowNorm)


def test_cosine_of_huge_vectors_is_finite_and_right(losses):
    """From `losscc check`: |a| |b| and a.b overflow (2.8e232 * 1.5e86), so the written form is
    inf/inf = NaN; the true values, by mpmath at 50 digits from the written formula below,
    are ordinary numbers. Also vectors of 1e-160s, whose squares are subnormal."""
    import mpmath

    a = np.array([[-0.004091017746731648, 2.7626311193315645e232], [3e-160, 4e-160]])
    b = np.array([[1.0934529315417186e86, 1.0934529315417186e86], [4e-160, 3e-160]])
    y = np.array([1.0, -1.0])
    loss = losses.CosineEmbeddingLoss(epsilon=1e-320)  # row 2: |a||b| = 2.5e-319 > epsilon
    v, (ga, gb) = loss.value_and_grad(a, b, y)
    with mpmath.workdps(50):
        for i in range(2):
            va, vb = [mpmath.mpf(t) for t in a[i]], [mpmath.mpf(t) for t in b[i]]
            na, nb = mpmath.sqrt(sum(t * t for t in va)), mpmath.sqrt(sum(t * t for t in vb))
            cos = sum(s * t for s, t in zip(va, vb)) / (na * nb)
            sign = -1 if y[i] == 1 else 1  # label 1: 1 - cos; label -1: cos (above the margin 0)
            want_v = 1 - cos if y[i] == 1 else cos
            want_ga = [sign * (t / (na * nb) - cos * s / na**2) for s, t in zip(va, vb)]
            want_gb = [sign * (s / (na * nb) - cos * t / nb**2) for s, t in zip(va, vb)]
            np.testing.assert_allclose(v[i], float(want_v), rtol=4 * EPS[np.float64])
            np.testing.assert_allclose(ga[i], [float(t) for t in want_ga], rtol=8 * EPS[np.float64])
            np.testing.assert_allclose(gb[i], [float(t) for t in want_gb], rtol=8 * EPS[np.float64])


def test_norm_kernel_scales_and_keeps_inf_and_nan(tmp_path):
    """norm(pred), by hand: |[3, 4]| * 2^k = 5 * 2^k for k = +-600 (the squares overflow and
    underflow), d/dpred = pred / |pred| = [0.6, 0.8]; a row with inf is inf, with NaN NaN."""
    (tmp_path / "n.yaml").write_text("name: n\nsummary: s\nreference: r\ninputs:\n  pred: {row: true}\n"
                                     "loss: norm(pred)\n")
    mod = losscc.load(build([tmp_path], out=tmp_path / "out", name="norms", log=lambda *a: None).path)
    k = 2.0**600
    x = np.array([[3 * k, 4 * k], [3 / k, 4 / k], [np.inf, 1.0], [np.nan, np.inf], [0.0, 0.0]])
    v, g = mod.n().value_and_grad(x)
    np.testing.assert_array_equal(v[:2], [5 * k, 5 / k])
    np.testing.assert_allclose(g[:2], [[0.6, 0.8], [0.6, 0.8]], rtol=EPS[np.float64])
    assert v[2] == np.inf and np.isnan(v[3]) and v[4] == 0.0


def test_rule_expm1_power_ratio_fires_is_exact_and_leaves_near_misses():
    """(1 - p)**(g - 1) * log(p) with 1 - p = -expm1(t), t = log(p): the ratio form, equal
    to the original at 50 digits (mpmath) away from t = 0."""
    import mpmath
    from sympy.codegen.cfunctions import expm1

    from losscc.functions import Exprel, naive
    from losscc.rows import ROW_PRECISION_RULES
    from losscc.stabilize import stabilize

    t, g = sympy.Symbol("t", real=True), sympy.Symbol("p_gamma", real=True)
    before = g * (-expm1(t))**(g - 1) * t
    out, fired = stabilize(before, phases=("precision",), extra={"precision": ROW_PRECISION_RULES})
    assert [f[0] for f in fired] == ["expm1-power-ratio"]
    assert out == -g * (-expm1(t))**g / Exprel(t)
    f_before = sympy.lambdify((t, g), before.replace(lambda e: isinstance(e, expm1),
                                                     lambda e: sympy.exp(e.args[0]) - 1), "mpmath")
    f_after = sympy.lambdify((t, g), naive(out).replace(lambda e: isinstance(e, expm1),
                                                        lambda e: sympy.exp(e.args[0]) - 1), "mpmath")
    with mpmath.workdps(50):
        for at, gamma in [(-0.5, 0.47), (-3.0, 2.5), (-1e-9, 0.25)]:
            want = f_before(mpmath.mpf(at), mpmath.mpf(gamma))
            assert abs(f_after(mpmath.mpf(at), mpmath.mpf(gamma)) - want) <= 1e-45 * abs(want)
    for miss in [(-expm1(t))**g * t,            # the value's own power: left alone
                 (-expm1(t))**(g - 1) * (t + 1),  # not the same t
                 (-expm1(t))**-2 * t,             # an integer power
                 (-expm1(2 * t))**(g - 1) * t]:   # expm1 of something else
        _, fired = stabilize(miss, phases=("precision",), extra={"precision": ROW_PRECISION_RULES})
        assert "expm1-power-ratio" not in [f[0] for f in fired], miss


def test_focal_gradient_where_p_rounds_to_one_or_a_logit_is_the_float_max(losses):
    """From `losscc check`: logit 1203 at the label with gamma 0.47 gave 0 * inf = NaN; the
    true gradient, -2.7e-751 (by mpmath), rounds to 0. gamma = 0 there is cross entropy,
    whose gradient is [e^-1203 (= 0 in double), -expm1(-log1p(e^-1203))] = [0, 0]. Logits
    [-1.8e308, 0], label 0, gamma 2, by hand: p = 0 and 1 - p = 1 exactly, so the loss is
    1.8e308 and the gradient (1 - p)^2 (1 + 2 p log(p) / (p - 1)) (p - 1, p_1) = [-1, 1]
    (2 * -log(p) overflowed to inf before p = 0 multiplied it)."""
    x = np.array([[0.0, 1203.0]])
    for gamma in (0.47, 0.0):
        v, g = losses.SoftmaxFocalLoss(gamma=gamma).value_and_grad(x, np.array([1]))
        assert v[0] == 0.0 and np.all(g == 0.0), (gamma, v, g)
    _, gce = losses.SoftmaxCrossEntropyLoss().value_and_grad(x, np.array([1]))
    np.testing.assert_array_equal(g, gce)
    big = np.finfo(np.float64).max
    v, g = losses.SoftmaxFocalLoss(gamma=2.0).value_and_grad(np.array([[-big, 0.0]]), np.array([0]))
    assert v[0] == big
    np.testing.assert_array_equal(g, [[-1.0, 1.0]])


def test_kl_label_gradient_at_huge_equal_logits(losses):
    """From `losscc check`: pred = [6.2e247] * 2 (logp = -log 2), label [0.687.., 0.312..]:
    d/dlabel = (log(label) + 1 - logp) / 2, by hand with logp = -log 2 (the row max is
    subtracted from the logit before 1 and log(label) are added)."""
    import math

    pred = np.array([[6.233767084511154e247] * 2])
    label = np.array([[0.6874396168862185, 0.3125603831137815]])
    _, (_, gl) = losses.KLDivLoss(from_logits=False).value_and_grad(pred, label, wrt=("pred", "label"))
    want = [(math.log(q) + 1 + math.log(2)) / 2 for q in label[0]]
    np.testing.assert_allclose(gl[0], want, rtol=4 * EPS[np.float64])


def test_a_sum_scaled_by_a_row_scalar_that_is_zero_has_a_finite_gradient(tmp_path):
    # sum(pred * r) with r = max(pred) or mean(pred): d/dr passes c*sum with c = 1/r only if
    # that divides by nothing the partial did not; at r = 0 it would be 0/0. By hand:
    # sum(p * max p) at [0, -1]: grad_j = max + [j = argmax] * sum p = [-1, 0];
    # sum(p * mean p) = (sum p)^2 / C at [1, -1]: grad_j = 2 sum p / C = [0, 0].
    for name, loss in (("prodmax", "sum(pred * max(pred))"), ("prodmean", "sum(pred * mean(pred))")):
        (tmp_path / f"{name}.yaml").write_text(
            f"name: {name}\nsummary: t\nreference: t\ninputs:\n  pred: {{row: true}}\nloss: {loss}\n")
    mod = losscc.load(build([tmp_path], out=tmp_path / "b", name="scaled", log=lambda *a: None).path)
    _, g = mod.LOSSES["prodmax"]().value_and_grad(np.array([[0.0, -1.0]]))
    assert g.tolist() == [[-1.0, 0.0]]
    _, g = mod.LOSSES["prodmean"]().value_and_grad(np.array([[1.0, -1.0]]))
    assert g.tolist() == [[0.0, 0.0]]


def test_rule_cosine_distance_fires_and_is_exact():
    """1 - sum(ahat*bhat) -> sum((ahat - bhat)**2)/2, also through a where (Gluon's epsilon
    branch is left as written); an identity where both norms are nonzero: on one class
    (ahat, bhat = +-1) (s - t)**2/2 = 1 - s*t for every pair of signs."""
    from losscc.rows import Quotient, RowNorm, RowSum, ScaledProduct

    qa, qb = Quotient(X1, RowNorm(X1)), Quotient(X2, RowNorm(X2))
    cos = RowSum(qa * qb)
    out, fired = _stabilized(1 - cos)
    assert out == RowSum((qa - qb)**2) / 2 and [f[0] for f in fired] == ["cosine-distance"]
    for s in (-1, 1):
        for t in (-1, 1):
            assert sympy.Rational((s - t)**2, 2) == 1 - s * t
    eps, k = sympy.Symbol("p_epsilon", positive=True), sympy.Symbol("p_k", real=True)
    c = eps < RowNorm(X1) * RowNorm(X2)
    other = RowSum(X1 * X2) / eps
    out, _ = _stabilized(k - k * sympy.Piecewise((cos, c), (other, True)))
    # (the epsilon branch's dot, scaled by k/eps, is a scaled sum: the scaled-sum rule)
    scaled = RowSum(ScaledProduct(X1, X2)) / eps
    assert out == sympy.Piecewise((k * RowSum((qa - qb)**2) / 2, c), (k - k * scaled, True))


@pytest.mark.parametrize("text", [
    "1 - 2*RowSum(QA*QB)",            # k - 2k*cos
    "2 - RowSum(QA*QB)",              # k - cos, k != 1
    "1 + RowSum(QA*QB)",              # 1 + cos
    "1 - RowSum(QA*X2)",              # not a unit vector
    "1 - RowSum(QA*QA*QB)",           # three factors
    "1 - RowSum(Quotient(X1, RowNorm(X2))*QB)",  # divided by another vector's norm
])
def test_rule_cosine_distance_near_misses(text):
    from losscc.rows import Quotient, RowNorm, RowSum

    names = {"RowSum": RowSum, "RowNorm": RowNorm, "Quotient": Quotient, "X1": X1, "X2": X2,
             "QA": Quotient(X1, RowNorm(X1)), "QB": Quotient(X2, RowNorm(X2))}
    _, fired = _stabilized(eval(text, names))  # noqa: S307 - test literals
    assert "cosine-distance" not in [f[0] for f in fired]


def test_cosine_distance_keeps_the_digits_of_nearly_parallel_vectors(losses):
    """Row 1, from `losscc check`: 1 - cos = 0.053478306844072571 (mpmath, below) came out
    8.9 ulps off as 1 - cos; now within 4. Rows 2-3: b = a + 1e-6 d and a + 1e-9 d (fixed
    draws): 1 - cos is 1e-13 and 1e-19, which the plain 1 - cos rounds to noise of an ulp
    of 1 (1e-16); |ahat - bhat|**2/2 errs only by the angle t times an ulp (the formula's
    conditioning, the spec's declared bound): relative error within 4 ulps of t / (1 - cos)."""
    import mpmath

    a = [[-0.739562542041901, -0.16666500175572072, 1876.1963458218324],
         [0.3, -1.2, 0.7], [0.3, -1.2, 0.7]]
    b = [[57.23506331780583, -128.27673257849048, 412.1900993547799],
         [0.3 + 1e-6, -1.2 - 2e-6, 0.7 + 0.5e-6], [0.3 + 1e-9, -1.2 - 2e-9, 0.7 + 0.5e-9]]
    v, _ = losses.CosineEmbeddingLoss().value_and_grad(np.array(a), np.array(b), np.ones(3))
    with mpmath.workdps(60):
        for i in range(3):
            va, vb = [mpmath.mpf(t) for t in a[i]], [mpmath.mpf(t) for t in b[i]]
            na, nb = mpmath.sqrt(sum(t * t for t in va)), mpmath.sqrt(sum(t * t for t in vb))
            want = 1 - sum(s * t for s, t in zip(va, vb)) / (na * nb)
            angle = mpmath.sqrt(2 * want)
            tol = 4 * EPS[np.float64] * (1 if i == 0 else float(angle / want))
            assert abs(v[i] / want - 1) <= tol, (i, v[i], want)
        assert abs(v[0] - mpmath.mpf("0.053478306844072571")) <= 4 * np.spacing(0.0534)  # the check's truth


def test_cosine_gradient_at_the_element_that_dominates_a_unit_vector(losses):
    """Points from `losscc check` (--samples 400), truths by the check's interval evaluation
    of the written formula's derivative (losscc.truth, 60+ digits). The gradient through
    ahat = a/|a| is the projection (w_j - ahat_j sum(ahat*w))/|a|; where ahat_j ~ 1 the
    difference rounds to noise of its O(1) terms (9e-131 where the truth is 2e-366, which
    underflows to 0). rows._unit_partial and the printer's leave-one-out make it
    w_j sum_{i != j} ahat_i**2 - ahat_j sum_{i != j} ahat_i w_i."""
    cos = losses.CosineEmbeddingLoss(margin=0.0020038134531302153, epsilon=4.8420163309522515e-05)
    _, (g1, g2) = cos.value_and_grad(np.array([[5.957092670393404e-293, -4.5021630826157235e+114]]),
                                     np.array([[-0.01089985530028879, 0.06440182254084331]]),
                                     np.array([1.0]), wrt=("input1", "input2"))
    assert g1[0, 1] == 0.0  # truth 1.8552888935617791e-366: below the subnormals
    # b far from parallel to a, whose element 2 dominates: was 504 ulps off
    cos = losses.CosineEmbeddingLoss(margin=-0.0027867603722642274, epsilon=1.6491993678037658e-05)
    a = [7.158087876705961e+36, -0.004310426394287302, 7.93291322545021e+189, 709.782712893384,
         0.00027287036840308737, 19.492359801027657]
    b = [-0.1194431998763873, 0.0691948900620372, -0.0195359437060794, 23.337160206008107,
         0.060622048630772724, -0.0005276778341933829]
    _, (g1, g2) = cos.value_and_grad(np.array([a]), np.array([b]), np.array([1.0]), wrt=("input1", "input2"))
    want = -9.3173698943589523e-8
    assert abs(g2[0, 4] - want) <= 4 * np.spacing(abs(want)), g2[0, 4]


def test_focal_power_of_a_base_near_1_keeps_its_digits(losses):
    """(1 - p)**95 at p = 3.8e-7: pow of the rounded base multiplies its half-ulp rounding
    by 95 (27.5 ulps); exp(95*log1p(-p)) keeps p's digits (pow-1mexp in codegen.py). Point
    from `losscc check --seed 1`; truths by the check's interval evaluation (losscc.truth)."""
    focal = losses.SoftmaxFocalLoss(gamma=95.21488892272912)
    pred = np.array([[0.24069372009173318, -3.8076750220400384, -9.133233839809629,
                      -2.960306723488362, 5.650959158423376, -1.9398232057608074]])
    v, g = focal.value_and_grad(pred, np.array([2]))
    assert abs(v[0] - 14.788883588796691) <= 4 * np.spacing(14.79), v[0]
    assert abs(g[0, 4] - 0.99528447723685571) <= 4 * np.spacing(0.995), g[0, 4]


def test_triplet_at_the_float_maximum_is_finite(losses):
    """d+ - d- = sum((n - a)*(2p - a - n)) with p at the float maximum: 2p - a - n overflowed
    (inf where the loss is 9.7179458986485405e307, the check's interval truth, --seed 1);
    the rule's second factor is p - a/2 - n/2 and the 2 goes outside the sum."""
    pred = [1068.7405907445573, -67.54369435976975, 1.7976931348623157e+308, 8.673525880195646e-218,
            1.2012583492165696, 129.59048850117605]
    positive = [1068.2118859879401, -67.54369411596277, -0.024404745213213713, 8.673525880088599e-218,
                1.2012583473606775, 129.59048848472918]
    negative = [1068.7405907946886, -67.54376710260185, 0.24588459700516307, 8.673525467149105e-218,
                1.2012583471780913, 129.59584071499233]
    v, _ = losses.TripletLoss(margin=1.0).value_and_grad(np.array([pred]), np.array([positive]),
                                                         np.array([negative]))
    want = 9.7179458986485405e307
    assert abs(v[0] - want) <= 4 * np.spacing(want), v[0]
