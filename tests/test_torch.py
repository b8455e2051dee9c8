"""The PyTorch adapter (losscc/torch.py): loss.torch() as a torch.nn.Module.

References: torch's own autograd (gradcheck's finite differences in float64, and the
matching torch.nn losses written out in torch ops), never losscc itself.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def tl(built):
    import losscc

    return losscc.load(built)


def _gradcheck(fn, *inputs):
    return torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


def test_tutorial_dense_layer_gradient(tl):
    """The Gluon tutorial's example: L2Loss of a dense layer's output, per sample, then
    backward (MXNet sums a non-scalar head; torch needs the sum said)."""
    torch.manual_seed(0)
    X = torch.rand(2, 4, dtype=torch.float64)
    y = torch.ones(2, dtype=torch.float64) * 2
    net = torch.nn.Linear(4, 1).double()
    ref = torch.nn.Linear(4, 1).double()
    ref.load_state_dict(net.state_dict())
    loss = tl.L2Loss().torch()
    lv = loss(net(X), y)
    assert lv.shape == (2,)
    lv.backward(torch.ones(2, dtype=torch.float64))
    rv = 0.5 * (ref(X)[:, 0] - y) ** 2  # the tutorial's 0.5 ||x - y||^2, by torch
    rv.sum().backward()
    torch.testing.assert_close(lv, rv, rtol=1e-15, atol=0)
    torch.testing.assert_close(net.weight.grad, ref.weight.grad, rtol=1e-14, atol=0)
    torch.testing.assert_close(net.bias.grad, ref.bias.grad, rtol=1e-14, atol=0)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("name", ["L2Loss", "L1Loss", "HuberLoss", "SigmoidBCELoss", "LogisticLoss",
                                  "LogCoshLoss", "PoissonNLLLoss"])
def test_gradcheck_elementwise(tl, name, reduction):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    label = (torch.rand(5, 3, dtype=torch.float64, generator=gen) > 0.5).double()
    if name == "LogisticLoss":
        label = label * 2 - 1
    sw = torch.rand(5, 1, dtype=torch.float64, generator=gen) + 0.5
    loss = getattr(tl, name)(reduction=reduction).torch()
    assert _gradcheck(lambda a: loss(a, label, sw), x)


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_gradcheck_rows(tl, reduction):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(6, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    y = torch.randint(0, 4, (6,), generator=gen)
    cw = torch.rand(4, dtype=torch.float64, generator=gen) + 0.5
    ce = tl.SoftmaxCrossEntropyLoss(reduction=reduction).torch()
    assert _gradcheck(lambda a: ce(a, y), x)
    assert _gradcheck(lambda a: ce(a, y, class_weight=cw), x)
    # the class axis first and the batch axis second
    ce_t = tl.SoftmaxCrossEntropyLoss(axis=0, batch_axis=1, reduction=reduction).torch()
    xt = x.detach().T.clone().requires_grad_()
    assert _gradcheck(lambda a: ce_t(a, y), xt)
    # two differentiable inputs, and a label broadcast along the batch (reduction 'none':
    # its gradient is summed over the samples, so backward calls the kernel again)
    p = torch.softmax(torch.randn(1, 4, dtype=torch.float64, generator=gen), 1).requires_grad_()
    kl = tl.KLDivLoss(from_logits=False, reduction=reduction).torch()
    assert _gradcheck(lambda a, b: kl(a, b), x, p)
    a, b, c = (torch.randn(6, 3, dtype=torch.float64, generator=gen, requires_grad=True) for _ in range(3))
    triplet = tl.TripletLoss(reduction=reduction).torch()
    assert _gradcheck(lambda a, b, c: triplet(a, b, c), a, b, c)


def _train(model, loss_fn, x, y, steps=40):
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    return model


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_training_matches_torch_nn(tl, dtype):
    """A linear classifier trained with losscc's softmax CE reaches torch.nn.CrossEntropyLoss's
    weights, and a linear regression with L2Loss reaches 0.5 * MSELoss's (Gluon's L2 is half
    the squared error)."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(64, 5, dtype=dtype, generator=gen)
    y = torch.randint(0, 3, (64,), generator=gen)
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 2e-5, "atol": 2e-6}
    ours, ref = torch.nn.Linear(5, 3).to(dtype), torch.nn.Linear(5, 3).to(dtype)
    ref.load_state_dict(ours.state_dict())
    _train(ours, tl.SoftmaxCrossEntropyLoss(reduction="mean").torch(), x, y)
    _train(ref, torch.nn.CrossEntropyLoss(), x, y)
    torch.testing.assert_close(ours.weight, ref.weight, **tol)
    torch.testing.assert_close(ours.bias, ref.bias, **tol)
    t = torch.randn(64, 2, dtype=dtype, generator=gen)
    ours, ref = torch.nn.Linear(5, 2).to(dtype), torch.nn.Linear(5, 2).to(dtype)
    ref.load_state_dict(ours.state_dict())
    mse = torch.nn.MSELoss()
    # Gluon's L2Loss averages over the features too: 0.5 * mean over all = 0.5 * MSELoss
    _train(ours, tl.L2Loss(reduction="mean").torch(), x, t, steps=20)
    _train(ref, lambda p, q: 0.5 * mse(p, q), x, t, steps=20)
    torch.testing.assert_close(ours.weight, ref.weight, **tol)


def test_tensors_are_used_in_place_and_any_layout_works(tl):
    loss = tl.L2Loss(reduction="none")
    x = torch.randn(3, 4, dtype=torch.float32)
    y = torch.randn(3, 4, dtype=torch.float32)
    xt = torch.randn(4, 3, dtype=torch.float32).T.requires_grad_()  # a transposed view
    want_v, want_g = loss.value_and_grad(xt.detach().numpy(), y.numpy())
    v = loss.torch()(xt, y)
    v.backward(torch.ones(3))
    assert v.dtype == torch.float32 and xt.grad.dtype == torch.float32
    np.testing.assert_array_equal(v.detach().numpy(), want_v)
    np.testing.assert_array_equal(xt.grad.numpy(), want_g)
    with torch.no_grad():  # no gradient wanted: the value alone
        np.testing.assert_array_equal(loss.torch()(x, y).numpy(), loss(x.numpy(), y.numpy()))


def test_errors_name_the_argument(tl):
    x = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    y = torch.randn(3, 2, dtype=torch.float64)
    sw = torch.ones(3, 1, dtype=torch.float64, requires_grad=True)
    with pytest.raises(TypeError, match="sample_weight requires a gradient, but the loss is not differentiable"):
        tl.L2Loss().torch()(x, y, sw)
    with pytest.raises(TypeError, match="L2Loss: .*call signature"):
        tl.L2Loss().torch()(x)
    with pytest.raises(TypeError, match="float32 or float64"):
        tl.L2Loss().torch()(x.detach().half(), y.half())
    assert "L2Loss" in repr(tl.L2Loss().torch())


def test_readme_example(tl):
    """The README's PyTorch block, verbatim, then its gradient against torch.nn's."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"### PyTorch\n.*?```python\n(.*?)```", readme, re.S).group(1)
    ns = {"gloss": tl}
    torch.manual_seed(4)
    exec(block, ns)
    model, x, y = ns["model"], ns["x"], ns["y"]
    ref = torch.nn.Linear(20, 5)
    ref.load_state_dict(model.state_dict())
    torch.nn.CrossEntropyLoss()(ref(x), y).backward()
    torch.testing.assert_close(model.weight.grad, ref.weight.grad, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(ns["loss"], torch.nn.CrossEntropyLoss()(ref(x), y), rtol=2e-6, atol=0)


def test_an_input_changed_in_place_before_a_backward_that_reads_it_is_refused(tl):
    """reduction 'none' with a wanted input broadcast against pred (KL's (1, C) label) runs the
    kernel again in backward, on the inputs: changed in place after forward, torch's own
    "modified by an inplace operation" error, not a silently different gradient (it was,
    before the inputs were saved for backward). Where backward only scales the gradient kept
    in forward, an input changed afterwards changes nothing, as in torch's own losses."""
    x = torch.randn(6, 4, dtype=torch.float64)
    p = torch.softmax(torch.randn(1, 4, dtype=torch.float64), 1).requires_grad_()
    v = tl.KLDivLoss(from_logits=False, reduction="none").torch()(x, p)
    v.backward(torch.ones(6), retain_graph=True)
    first, p.grad = p.grad.clone(), None
    v.backward(torch.ones(6), retain_graph=True)
    assert torch.equal(p.grad, first)
    p.grad = None
    again = tl.KLDivLoss(from_logits=False, reduction="none").torch()(label=p, pred=x)  # pred not first
    again.backward(torch.ones(6), retain_graph=True)
    assert torch.equal(p.grad, first)
    p.grad = None
    x.mul_(0.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        v.backward(torch.ones(6))
    pred, y = torch.randn(5, dtype=torch.float64, requires_grad=True), torch.randn(5, dtype=torch.float64)
    out = tl.L2Loss().torch()(pred, y)
    want = (pred - y).detach()
    y.mul_(2.0)
    out.sum().backward()
    assert torch.equal(pred.grad, want)
