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
