"""Threads: kernels split big batches over threads (prelude's lcc_run) with results that do not
depend on the thread count; the GIL is released during kernel calls; one loss object serves
many Python threads at once; the fast path of the common call gives the general path's bits.

Sizes here are above LCC_PAR_WORK (2^17 elements), where lcc_run uses more than one thread.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import losscc

N = 300_001  # > 2^17 elements and not a multiple of the block size


@pytest.fixture
def threads():
    """Restores the thread count a test changes."""
    before = losscc.get_num_threads()
    yield
    losscc.set_num_threads(before)


def _inputs(dtype, shape, seed=0):
    rng = np.random.default_rng(seed)
    pred = (rng.standard_normal(shape) * 3).astype(dtype)
    label = (rng.random(shape) < 0.5).astype(dtype)
    weight = rng.random(shape[:1] + (1,) * (len(shape) - 1)).astype(dtype)
    return pred, label, weight


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(N,), (N // 3, 3)])
@pytest.mark.parametrize("name", ["L2Loss", "HuberLoss", "SigmoidBCELoss"])
def test_elementwise_results_do_not_depend_on_the_thread_count(losses, threads, name, shape, dtype):
    pred, label, weight = _inputs(dtype, shape)
    runs = []
    for n in (1, 2, 3, 7):
        losscc.set_num_threads(n)
        per_sample = getattr(losses, name)()
        total = getattr(losses, name)(reduction="sum")
        v, g = per_sample.value_and_grad(pred, label, weight)
        g2, h = per_sample.grad_hess(pred, label, weight)
        runs.append((v, g, g2, h, total(pred, label, weight)))
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            np.testing.assert_array_equal(a, b)  # the same bits, not merely close
    # the sum is the per-sample values' sum, whichever blocks added them (float64 reference)
    ref = np.sum(runs[0][0].astype(np.float64))
    assert abs(float(runs[0][4]) - ref) <= 1e-6 * np.sum(np.abs(runs[0][0].astype(np.float64)))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_row_results_do_not_depend_on_the_thread_count(losses, threads, dtype):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((N // 10, 10)) * 4).astype(dtype)
    y = rng.integers(0, 10, N // 10)
    runs = []
    for n in (1, 2, 5):
        losscc.set_num_threads(n)
        ce = losses.SoftmaxCrossEntropyLoss()
        runs.append((*ce.value_and_grad(x, y), losses.SoftmaxCrossEntropyLoss(reduction="mean")(x, y)))
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            np.testing.assert_array_equal(a, b)


def test_a_bad_class_index_is_reported_where_a_serial_run_finds_it(losses, threads):
    # bad labels in several blocks: every thread count names the first one
    x = np.zeros((N // 10, 10))
    y = np.zeros(N // 10, np.int64)
    y[[20_000, 9_000, 29_000]] = [10, -1, 11]
    messages = set()
    for n in (1, 2, 4):
        losscc.set_num_threads(n)
        with pytest.raises(IndexError) as exc:
            losses.SoftmaxCrossEntropyLoss()(x, y)
        messages.add(str(exc.value))
    assert messages == {"SoftmaxCrossEntropyLoss: label[9000] (flat position 9000) = -1 is outside "
                        "[0, 10) (and not -100, the ignore_index)"}


def test_set_num_threads_checks_its_argument(threads):
    for bad in (0, -1, 1.5, "2", True):
        with pytest.raises(ValueError, match="set_num_threads: n must be a positive integer"):
            losscc.set_num_threads(bad)
    losscc.set_num_threads(3)
    assert losscc.get_num_threads() == 3


def test_the_thread_count_comes_from_the_environment():
    code = "import losscc; print(losscc.get_num_threads())"
    env = dict(os.environ, LOSSCC_NUM_THREADS="5")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert run.stdout.strip() == "5", run.stderr
    env["LOSSCC_NUM_THREADS"] = "many"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert "LOSSCC_NUM_THREADS must be a positive integer, got 'many'" in run.stderr


def test_the_gil_is_released_during_a_kernel_call(losses, threads):
    """A Python thread keeps running while another is inside a long kernel call: with the
    GIL held it could run for at most one switch interval (5 ms) of the call."""
    losscc.set_num_threads(1)
    pred, label, _ = _inputs(np.float64, (4_000_000,))
    loss = losses.SigmoidBCELoss()
    loss.value_and_grad(pred[:1000], label[:1000])
    stamps, stop = [], threading.Event()

    def spin():
        while not stop.is_set():
            stamps.append(time.perf_counter())

    worker = threading.Thread(target=spin)
    worker.start()
    time.sleep(0.01)
    t0 = time.perf_counter()
    loss.value_and_grad(pred, label)
    t1 = time.perf_counter()
    stop.set()
    worker.join()
    inside = [t for t in stamps if t0 < t < t1]
    assert t1 - t0 > 0.02  # long enough to tell (sigmoid_bce costs > 5 ns an element)
    assert inside and max(inside) - min(inside) > 0.5 * (t1 - t0)


def test_one_loss_object_serves_eight_threads(losses):
    loss = losses.HuberLoss(rho=0.5)
    ce = losses.SoftmaxCrossEntropyLoss()
    rng = np.random.default_rng(3)
    jobs = []
    for _ in range(32):
        n = int(rng.integers(1, 200_000))
        jobs.append((rng.standard_normal(n), rng.standard_normal(n),
                     rng.standard_normal((n // 50 + 1, 7)), rng.integers(0, 7, n // 50 + 1)))
    serial = [(loss.value_and_grad(p, y), ce.value_and_grad(x, c)) for p, y, x, c in jobs]
    results = [None] * len(jobs)

    def work(k):
        for i in range(k, len(jobs), 8):
            p, y, x, c = jobs[i]
            results[i] = (loss.value_and_grad(p, y), ce.value_and_grad(x, c))

    pool = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    for (a, b), (c, d) in zip(serial, results):
        for x, y in zip((*a, *b), (*c, *d)):
            np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_the_fast_path_gives_the_general_paths_bits(losses, dtype, reduction):
    # keyword arguments always take the general path (_run); positional arrays the fast one
    pred, label, _ = _inputs(dtype, (1000, 3), seed=4)
    for name in ("L2Loss", "SigmoidBCELoss", "PoissonNLLLoss", "LogisticLoss"):
        loss = getattr(losses, name)(reduction=reduction)
        fast = loss.value_and_grad(pred, label)
        general = loss.value_and_grad(pred, label, sample_weight=None)
        for a, b in zip(fast, general):
            np.testing.assert_array_equal(a, b)
        assert type(fast[0]) is type(general[0])
        np.testing.assert_array_equal(loss(pred, label), loss(pred, label, sample_weight=None))
        np.testing.assert_array_equal(loss.grad(pred, label), loss.grad(pred, label, sample_weight=None))
        # the caller's buffers: written in place, the same bits
        g = np.full_like(pred, np.nan)
        v = np.full(pred.shape[0], np.nan, dtype) if reduction == "none" else None
        value, grad = loss.value_and_grad(pred, label, out=v, grad_out=g)
        assert grad is g and (v is None or value is v)
        np.testing.assert_array_equal(g, general[1])
        np.testing.assert_array_equal(value, general[0])


def test_the_fast_path_leaves_bad_buffers_to_the_general_paths_errors(losses):
    pred, label, _ = _inputs(np.float64, (100,))
    loss = losses.L2Loss()
    with pytest.raises(ValueError, match="grad_out overlaps the input 'pred'"):
        loss.value_and_grad(pred, label, grad_out=pred)
    with pytest.raises(ValueError, match="grad_out must have shape"):
        loss.value_and_grad(pred, label, grad_out=np.empty(100, np.float32))
    frozen = np.empty(100)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="out is read-only"):
        loss(pred, label, out=frozen)
    g = np.empty(100)
    with pytest.raises(ValueError, match="out and grad_out share memory"):
        loss.value_and_grad(pred, label, out=g, grad_out=g)
    with pytest.raises(ValueError, match="out= holds per-sample values and needs reduction='none'"):
        losses.L2Loss(reduction="mean")(pred, label, out=np.empty(100))
    # a row loss: int32 labels and a non-contiguous prediction take the general path, same bits
    ce = losses.SoftmaxCrossEntropyLoss()
    x = np.asfortranarray(np.random.default_rng(5).standard_normal((50, 4)))
    y = np.arange(50) % 4
    fast = ce.value_and_grad(np.ascontiguousarray(x), y)
    for a, b in zip(fast, ce.value_and_grad(x, y.astype(np.int32))):
        np.testing.assert_array_equal(a, b)


def test_changing_a_loss_after_a_call_is_honoured_or_refused(losses):
    # the fast path's plans remember reduction and weight; setting them forgets the plans
    pred, label, _ = _inputs(np.float64, (64,), seed=6)
    loss = losses.HuberLoss(rho=0.5)
    per_sample = loss(pred, label)
    loss.reduction = "sum"
    assert loss(pred, label) == pytest.approx(per_sample.sum(), rel=1e-14)  # (summed in vector lanes)
    loss.weight = 2.0
    assert loss(pred, label) == losses.HuberLoss(rho=0.5, weight=2.0, reduction="sum")(pred, label)
    with pytest.raises(TypeError):
        loss.params["rho"] = 1.0  # parameters are fixed: make a new loss


def _child_call(conn, built, pred, label):
    loss = losscc.load(built).SigmoidBCELoss(reduction="sum")
    conn.send(loss.value_and_grad(pred, label))
    conn.close()


def test_a_forked_child_runs_threaded_kernels(losses, built, threads):
    # threads are made per call (no pool): a child forked after the parent ran threaded
    # kernels runs them too (a fork after OpenMP's pool would hang here)
    import multiprocessing

    losscc.set_num_threads(2)
    pred, label, _ = _inputs(np.float64, (N,), seed=8)
    parent = losses.SigmoidBCELoss(reduction="sum").value_and_grad(pred, label)
    ctx = multiprocessing.get_context("fork")
    here, there = ctx.Pipe()
    child = ctx.Process(target=_child_call, args=(there, built, pred, label))
    child.start()
    assert here.poll(60), "the forked child did not answer"
    value, grad = here.recv()
    child.join(10)
    assert child.exitcode == 0
    assert value == parent[0]
    np.testing.assert_array_equal(grad, parent[1])


# ---------------------------------------------------------------------------- every loss, 8 threads


def _row_jobs(losses, rng, n):
    """(loss, method, args, kwargs) for each row loss, rows of 7 classes; n rows."""
    x = rng.standard_normal((n, 7)) * 3
    c = rng.integers(0, 7, n)
    t = rng.dirichlet(np.ones(7), n)
    bad = c.copy()
    bad[n // 2] = 7  # out of range: an IndexError naming row n // 2, in whichever thread runs it
    sign = np.where(rng.random(n) < 0.5, -1.0, 1.0)
    return [
        (losses.SoftmaxCrossEntropyLoss(), (x, c), {}),
        (losses.SoftmaxCrossEntropyLoss(label_smoothing=0.1), (x, c), {"class_weight": rng.random(7) + 0.5}),
        (losses.SoftmaxCrossEntropyLoss(sparse_label=False), (x, t), {}),
        (losses.SoftmaxCrossEntropyLoss(), (x, bad), {}),
        (losses.KLDivLoss(from_logits=False), (x, t), {}),
        (losses.softmax_focal(), (x, c), {}),
        (losses.TripletLoss(), (x, x[::-1] + 0.5, x * 0.9), {}),
        (losses.CosineEmbeddingLoss(), (x, x[::-1], sign), {}),
    ]


def _every_loss_jobs(losses):
    """Calls of every built loss: elementwise ones through test_losses' cases (valid inputs
    for each), row ones by hand; small and big batches (big ones split over kernel threads)."""
    from test_losses import CASES

    rng = np.random.default_rng(7)
    jobs = []
    for n in (5, 40_000, 200_003):
        for case in CASES:
            data = case.gen(rng, (n,))
            extra = {"pos_weight": data["pos_weight"]} if "pos_weight" in data else {}
            loss = getattr(losses, case.name)(**case.options)
            jobs.append((loss, (data["pred"], data["label"]), extra))
        jobs += _row_jobs(losses, rng, n // 7 + 1)
    assert {type(j[0]).__name__ for j in jobs} >= {c.__name__ for c in losses.LOSSES.values()}
    calls = []
    for loss, args, kw in jobs:
        methods = ["__call__", "grad", "value_and_grad"] + (["grad_hess"] if hasattr(loss, "grad_hess") else [])
        calls += [(getattr(loss, m), args, kw) for m in methods]
    return calls


def _outcome(call):
    f, args, kw = call
    try:
        result = f(*args, **kw)
    except Exception as exc:  # noqa: BLE001 -- the same exception must come from every thread
        return (type(exc), str(exc))
    return result


def _same(a, b):
    if isinstance(a, tuple) and a and isinstance(a[0], type):
        return a == b
    if isinstance(a, (tuple, list)):
        return isinstance(b, (tuple, list)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return np.array_equal(a, b, equal_nan=True) and np.asarray(a).dtype == np.asarray(b).dtype


def test_every_loss_called_from_eight_threads_gives_the_serial_bits(losses, threads):
    calls = _every_loss_jobs(losses)
    losscc.set_num_threads(2)  # big calls split inside the kernel too
    serial = [_outcome(c) for c in calls]
    assert any(isinstance(s, tuple) and s and s[0] is IndexError for s in serial)  # the bad label
    order = np.random.default_rng(1).permutation(len(calls))  # mixed sizes and losses per thread
    results = [None] * len(calls)
    start = threading.Barrier(8)

    def work(k):
        start.wait()
        for _ in range(2):
            for i in order[k::8]:
                results[i] = _outcome(calls[i])

    pool = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    bad = [i for i, (s, r) in enumerate(zip(serial, results)) if not _same(s, r)]
    assert not bad, [(calls[i][0], serial[i] if isinstance(serial[i], tuple) else "") for i in bad[:3]]


# ---------------------------------------------------------------------------- memory

# A million small calls in a fresh interpreter: resident memory after a warm-up, then after
# the million. Every path is in the mix: the fast path (most of the calls: the general path's
# keywords cost 10-20x more), out= buffers, a row loss, keywords and a broadcast sample
# weight, and a call refused with an exception.
_MILLION = r"""
import sys, numpy as np, losscc
losses = losscc.load(sys.argv[1])
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
l2, ce, bce = losses.L2Loss(), losses.SoftmaxCrossEntropyLoss(), losses.SigmoidBCELoss(reduction="mean")
p, y, sw = np.linspace(-1, 1, 4), np.zeros(4), np.ones(1)
x, c = np.ones((2, 3)), np.array([0, 2])
v, g = np.empty(4), np.empty(4)
bad = np.array([0, 3])
def mix(n):  # n * 100 calls
    for i in range(n):
        for _ in range(80):
            l2(p, y)
        for _ in range(9):
            l2.value_and_grad(p, y, out=v, grad_out=g)
            ce.value_and_grad(x, c)
        bce.value_and_grad(p, y, sample_weight=sw)
        try:
            ce(x, bad)
        except IndexError:
            pass
mix(1_000)
before = rss()
mix(10_000)
print(before, rss())
"""


def test_a_million_small_calls_do_not_grow_memory(built):
    run = subprocess.run([sys.executable, "-c", _MILLION, str(built)], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr
    before, after = map(int, run.stdout.split())
    # A leak of 8 bytes a call would be 8 MB; pages the allocator keeps are well under 2 MB.
    assert after - before < 2 * 2**20, f"grew {after - before} bytes over a million calls"
