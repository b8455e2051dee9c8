"""Losses over dask arrays (issue 9, part 3; losscc/dask.py): per-sample values, gradients and
second derivatives are the bits of one numpy call on the whole array, however the arrays are
chunked; one kernel call per block computes every output asked for; sums over samples agree
to rounding; misaligned inputs and bad labels are clear errors. The expected numbers are the
numpy call's own (tests/test_losses.py holds those against independent references).

Most tests run on Dask's synchronous scheduler (in this process: quick); the `cluster` ones
ship the losses to two worker processes, pickled by reference to their build."""

from __future__ import annotations

import numpy as np
import pytest

da = pytest.importorskip("dask.array")
dask = pytest.importorskip("dask")

import losscc.dask as ldask  # noqa: E402
from losscc.errors import LoadError  # noqa: E402

SYNC = {"scheduler": "sync"}


def _bits_equal(a, b):
    """Equal bits, but for the sign of a NaN: it depends on whether the kernel's vector loop
    or its scalar tail made it, so on where a block starts (tests/test_chunking.py)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype.kind != "f":
        return np.array_equal(a, b)
    nan = np.isnan(a)
    return np.array_equal(nan, np.isnan(b)) and a[~nan].tobytes() == b[~nan].tobytes()


def _same(lazy, eager):
    """A dask result (array or tuple of them) against the numpy call's, bit for bit."""
    if isinstance(eager, tuple):
        return len(lazy) == len(eager) and all(_same(x, y) for x, y in zip(lazy, eager))
    return _bits_equal(lazy, eager)


def _sum_agrees(value, want, n):
    """A sum (or mean) of n non-negative per-sample values taken in another order, from
    values rounded to the dtype first: within (2 + log2 n) units of roundoff of the dtype,
    relative (each value rounded once, pairwise or sequential float64 sums of same-sign
    terms err by at most log2 n roundoffs of the double, far less)."""
    eps = np.finfo(want.dtype).eps
    return value.dtype == want.dtype and abs(float(value) - float(want)) <= (2 + np.log2(n)) * eps * abs(float(want))


def _compute(lazy):
    """A dask array, or a tuple of them, computed in this process."""
    return dask.compute(*lazy, **SYNC) if isinstance(lazy, tuple) else lazy.compute(**SYNC)


def _chunked(x, rng, axis=0):
    """x as a dask array cut at random places along `axis` (and the other axes cut too, which
    the loss must undo), blocks of 1 sample included."""
    n = x.shape[axis]
    cuts = np.unique(np.r_[0, 1, rng.integers(0, n + 1, 4), n]) if n > 1 else np.array([0, n])
    chunks = [tuple(np.diff(cuts)) if i == axis else max(1, s // 2) for i, s in enumerate(x.shape)]
    return da.from_array(x, chunks=tuple(chunks))


def _every_loss_calls(losses):
    """(loss, args, kwargs) for every built loss: elementwise ones through test_losses' cases
    (valid inputs for each, extremes included), row ones as test_threads makes them."""
    from test_losses import CASES
    from test_threads import _row_jobs

    rng = np.random.default_rng(3)
    calls = []
    for case in CASES:
        data = case.gen(rng, (301,))
        extra = {"pos_weight": data["pos_weight"]} if "pos_weight" in data else {}
        calls.append((getattr(losses, case.name)(**case.options), (data["pred"], data["label"]), extra))
    calls += [c for c in _row_jobs(losses, rng, 257) if c[1][1].dtype.kind == "f" or c[1][1].max() < 7]
    assert {type(c[0]).__name__ for c in calls} >= {c.__name__ for c in losses.LOSSES.values()}
    return calls


def test_every_loss_gives_the_numpy_bits_per_sample_however_chunked(losses):
    rng = np.random.default_rng(0)
    for loss, args, kw in _every_loss_calls(losses):
        for dtype in (np.float64, np.float32):
            args_d = tuple(a.astype(dtype) if a.dtype.kind == "f" else a for a in args)
            lazy_args = tuple(_chunked(a, rng) for a in args_d)
            want = loss.value_and_grad(*args_d, **kw)
            value, grad = loss.dask_value_and_grad(*lazy_args, **kw)
            assert _same((value.compute(**SYNC), _compute(grad)), want), (loss, dtype)
            assert _same(loss.dask(*lazy_args, **kw).compute(**SYNC), loss(*args_d, **kw)), (loss, dtype)
            assert _same(_compute(loss.dask_grad(*lazy_args, **kw)), loss.grad(*args_d, **kw)), (loss, dtype)
            if not loss._rows:
                got = _compute(loss.dask_grad_hess(*lazy_args, **kw))
                assert _same(got, loss.grad_hess(*args_d, **kw)), (loss, dtype)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_reduced_values_agree_to_rounding_and_mean_gradients_divide_by_the_whole_batch(losses, reduction, dtype):
    """The gradients are the numpy call's bits: a block's kernel divides by the whole array's
    batch, not its own. The value is a sum over samples in another order (_sum_agrees)."""
    rng = np.random.default_rng(1)
    x, c, w = rng.standard_normal((10_007, 10)).astype(dtype), rng.integers(0, 10, 10_007), rng.random(10_007)
    ce = losses.SoftmaxCrossEntropyLoss(reduction=reduction, weight=1.5)
    value, grad = ce.dask_value_and_grad(_chunked(x, rng), _chunked(c, rng), sample_weight=w)
    value, grad = dask.compute(value, grad, **SYNC)
    want_value, want_grad = ce.value_and_grad(x, c, sample_weight=w)
    assert _bits_equal(grad, want_grad)
    assert value.shape == () and _sum_agrees(value, want_value, 10_007)


def test_inputs_broadcast_along_the_batch_are_read_whole_and_their_gradients_summed(losses):
    """A (N, 1) sample weight and per-class weights stay batch-aligned or whole as the numpy
    call broadcasts them; a gradient with respect to an input broadcast along the batch is
    the sum over blocks of each block's sum (1e-12 relative: float64 sums in another order,
    of terms of both signs: 2e-13 measured)."""
    rng = np.random.default_rng(2)
    p, y, sw = rng.standard_normal((1001, 3)), rng.standard_normal((1001, 3)), rng.random((1001, 1))
    l2 = losses.L2Loss(reduction="mean")
    value, grad = dask.compute(*l2.dask_value_and_grad(_chunked(p, rng), y, sample_weight=sw), **SYNC)
    want_value, want_grad = l2.value_and_grad(p, y, sample_weight=sw)
    assert _bits_equal(grad, want_grad)
    assert _sum_agrees(value, want_value, 1001), (value, want_value)

    x = rng.standard_normal((1001, 6))
    t = rng.dirichlet(np.ones(6), 1)  # one target distribution for every sample
    kl = losses.KLDivLoss(from_logits=False)
    gp, gt = dask.compute(*kl.dask_grad(_chunked(x, rng), t, wrt=("pred", "label")), **SYNC)
    want_p, want_t = kl.grad(x, t, wrt=("pred", "label"))
    assert _bits_equal(gp, want_p) and gt.shape == want_t.shape == (1, 6)
    np.testing.assert_allclose(gt, want_t, rtol=1e-12, atol=0)
    gp, gt = dask.compute(*kl.dask_grad(_chunked(x, rng), 0.2, wrt=("pred", "label")), **SYNC)  # a scalar label
    want_p, want_t = kl.grad(x, 0.2, wrt=("pred", "label"))
    assert _bits_equal(gp, want_p) and gt.shape == () and np.isclose(gt, want_t, rtol=1e-12, atol=0)

    ce = losses.SoftmaxCrossEntropyLoss()
    c, cw = rng.integers(0, 6, 1001), rng.random(6) + 0.5
    assert _bits_equal(ce.dask(_chunked(x, rng), c, class_weight=cw).compute(**SYNC), ce(x, c, class_weight=cw))


def test_labels_shaped_otherwise_and_other_batch_axes_follow_the_numpy_rules(losses):
    rng = np.random.default_rng(4)
    p, y = rng.standard_normal((999, 1)), rng.standard_normal(999)  # Gluon: label reshaped like pred
    l1 = losses.L1Loss()
    assert _bits_equal(l1.dask_grad(_chunked(p, rng), _chunked(y, rng)).compute(**SYNC), l1.grad(p, y))
    x, c = rng.standard_normal((6, 500)), rng.integers(0, 6, 500)  # classes first, batch second
    ce = losses.SoftmaxCrossEntropyLoss(batch_axis=1, axis=0)
    got = dask.compute(*ce.dask_value_and_grad(_chunked(x, rng, axis=1), _chunked(c, rng)), **SYNC)
    assert _same(tuple(got), ce.value_and_grad(x, c))


def test_extremes_and_empty_arrays(losses):
    """±1e4, ±inf and nan in the prediction: the same bits (nan included) as numpy's call;
    an empty batch gives empty outputs and a nan mean, as the numpy call does."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((64, 5)) * 1e4
    x[3, 1], x[9, 0], x[20, 2] = np.inf, -np.inf, np.nan
    c = rng.integers(0, 5, 64)
    for dtype in (np.float64, np.float32):
        ce = losses.SoftmaxCrossEntropyLoss()
        xd = x.astype(dtype)
        got = dask.compute(*ce.dask_value_and_grad(_chunked(xd, rng), c), **SYNC)
        assert _same(tuple(got), ce.value_and_grad(xd, c))
    empty = da.zeros((0, 5), chunks=(10, 5))
    assert ce.dask(empty, np.zeros(0, np.int64)).compute(**SYNC).shape == (0,)
    mean = losses.SoftmaxCrossEntropyLoss(reduction="mean")
    assert np.isnan(mean.dask(empty, np.zeros(0, np.int64)).compute(**SYNC))
    assert np.isnan(mean(np.zeros((0, 5)), np.zeros(0, np.int64)))


def test_one_kernel_call_per_block_gives_every_output(losses, monkeypatch):
    """Dask is never left to probe the loss with made-up inputs (every output has its meta),
    and a value with its gradient costs one kernel call per block, not two."""
    calls = []
    run = ldask._run_block
    monkeypatch.setattr(ldask, "_run_block", lambda *a: calls.append(a[1]) or run(*a))
    rng = np.random.default_rng(6)
    x, c = rng.standard_normal((1000, 10)), rng.integers(0, 10, 1000)
    ce = losses.SoftmaxCrossEntropyLoss()
    value, grad = ce.dask_value_and_grad(da.from_array(x, chunks=(300, 10)), c)
    mean = value.mean()
    assert calls == [] and value.chunks == ((300, 300, 300, 100),) and grad.chunks == ((300, 300, 300, 100), (10,))
    dask.compute(mean, grad, **SYNC)
    assert sorted(calls) == [0, 300, 600, 900]


def test_bad_inputs_are_clear_errors(losses):
    rng = np.random.default_rng(7)
    x, c = da.from_array(rng.standard_normal((100, 4)), chunks=(30, 4)), rng.integers(0, 4, 100)
    ce = losses.SoftmaxCrossEntropyLoss()
    with pytest.raises(ValueError, match=r"label of shape \(50,\) does not line up with the prediction of "
                                         r"shape \(100, 4\): its axis 0.* has 50 entries, not 100"):
        ce.dask(x, c[:50])
    with pytest.raises(TypeError, match="pred must be float32 or float64, got int64"):
        ce.dask(x.astype(np.int64), c)
    with pytest.raises(TypeError, match="label is required, got None"):
        ce.dask(x, None)
    with pytest.raises(TypeError, match="unexpected keyword argument 'out'"):
        ce.dask(x, c, out=np.empty(100))
    with pytest.raises(TypeError, match="grad_hess is for elementwise losses"):
        ce.dask_grad_hess(x, c)
    with pytest.raises(ValueError, match="batch_axis=2 is out of range"):
        losses.SoftmaxCrossEntropyLoss(batch_axis=2).dask(x, c)
    with pytest.raises(ValueError, match="label has unknown chunk sizes"):
        ce.dask(x, da.from_array(c, chunks=25)[da.from_array(c, chunks=25) >= 0])
    with pytest.raises(ValueError, match="pred has unknown chunk sizes"):
        ce.dask(x[x[:, 0] > 0], c)
    bad = c.copy()
    bad[77] = 4  # block 2 holds samples 60:90; sample 77 is its 17th
    with pytest.raises(IndexError, match=r"label\[17\] .* = 4 is outside \[0, 4\).*"
                                         r"in the dask block of samples 60:90"):
        ce.dask(x, bad).compute(**SYNC)


# ---------------------------------------------------------------------------- on two workers


def test_two_worker_processes_give_the_numpy_bits(losses, cluster):
    """Softmax CE with sample weights and an elementwise loss's gradient and second
    derivative, computed by two worker processes (the losses pickled to them by reference)."""
    rng = np.random.default_rng(8)
    x, c, w = rng.standard_normal((20_000, 10)), rng.integers(0, 10, 20_000), rng.random(20_000)
    ce = losses.SoftmaxCrossEntropyLoss(label_smoothing=0.1)
    X, C, W = da.from_array(x, chunks=(2_500, 10)), da.from_array(c, chunks=5_000), da.from_array(w, chunks=4_000)
    value, grad = ce.dask_value_and_grad(X, C, sample_weight=W)
    futures = cluster.compute([value, grad])
    assert _same(tuple(f.result() for f in futures), ce.value_and_grad(x, c, sample_weight=w))
    who = cluster.who_has(futures[1])
    assert who and all(len(v) for v in who.values())
    # the blocks ran in both workers
    blocks = [k for k in cluster.run(lambda dask_worker: list(dask_worker.data)).values()]
    assert len(blocks) == 2

    huber = losses.HuberLoss(rho=0.5)
    p, y = rng.standard_normal(30_001).astype(np.float32), rng.standard_normal(30_001).astype(np.float32)
    g, h = huber.dask_grad_hess(da.from_array(p, chunks=7_000), y)
    got = cluster.compute([g, h], sync=True)
    assert _same(tuple(got), huber.grad_hess(p, y))
    mean = losses.SoftmaxCrossEntropyLoss(reduction="mean")
    assert _sum_agrees(cluster.compute(mean.dask(X, C)).result(), mean(x, c), 20_000)


def test_a_build_missing_on_the_workers_is_a_clear_error(losses, cluster, tmp_path, monkeypatch):
    """Workers load the build at the path the client loaded it from; not there, it is a
    LoadError naming the host and the path, raised by compute() (the scheduler, which
    unpickles the task graph, does not load the build: the error would be its "Error during
    deserialization of the task graph", naming nothing). The loss here says its build is at
    a path that holds none, as a build on the client's disk only would be for a worker on
    another machine (a copy loaded in this process would not do: a process loads one build's
    content once, and its losses name the first path it was loaded from)."""
    cls = losses.SoftmaxCrossEntropyLoss
    moved = str(tmp_path / "elsewhere" / "losses")
    monkeypatch.setattr(cls, "_build", {**cls._build, "path": moved})
    ce = cls()
    # inputs no other test uses: a task key seen before may be served from the cluster's
    # memory (keys name the build's content, not its path: equal keys, equal results)
    value = ce.dask(da.full((13, 3), 0.25, chunks=5), np.zeros(13, np.int64))
    with pytest.raises(LoadError, match=f"on host .* the build {moved} .* is not usable here"):
        cluster.compute(value).result()


def test_a_build_uploaded_with_dask_is_found_on_the_workers_path(losses, built, cluster, monkeypatch):
    """A build shipped by Dask's UploadDirectory(update_path=True, restart_workers=True)
    lies in each worker's scratch folder, which the restarted workers have on sys.path:
    unpickling finds it there by its name and cache key when the client's path holds
    nothing on the workers. The losses here say their build is at a path that does not
    exist, with the build's own name."""
    from distributed.diagnostics.plugin import UploadDirectory

    import loopback

    cluster.register_plugin(UploadDirectory(str(built), update_path=True, restart_workers=True))
    cluster.wait_for_workers(2)
    assert len(set(cluster.run(loopback.install).values())) == 2  # the guard, in the new workers
    where = cluster.run(lambda: [p for p in __import__("sys").path if p.endswith(built.name)])
    assert all(len(paths) == 1 for paths in where.values()), where
    cls = losses.HuberLoss
    monkeypatch.setattr(cls, "_build", {**cls._build, "path": f"/nonexistent/{built.name}"})
    huber = cls(rho=0.25)
    p, y = np.linspace(-3, 3, 1001), np.linspace(1, -1, 1001)
    got = cluster.compute(list(huber.dask_grad_hess(da.from_array(p, chunks=250), y)), sync=True)
    assert _same(tuple(got), huber.grad_hess(p, y))
