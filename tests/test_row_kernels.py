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
    assert sympy.simplify(v.grads[0] - (softmax - onehot)) == 0
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
