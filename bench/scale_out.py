"""Softmax cross entropy over a 4e6 x 10 array: on Dask workers against one process.

    python bench/scale_out.py [--rows 4000000] [--classes 10] [--chunk 500000] [--repeats 3]

In one process, on numpy arrays held in memory:
- losscc:  `SoftmaxCrossEntropyLoss()(pred, label).mean()` (kernel threads: every core), and
           `value_and_grad(pred, label)`;
- numpy:   the same per-sample values in plain numpy (a stable log-sum-exp, one thread).

On a LocalCluster of 1 and of 2 worker processes (one Dask thread each, on 127.0.0.1), the
data generated on the workers with dask.array.random and persisted there first:
- `ce.dask(pred, label).mean().compute()`: per-sample values, their mean;
- `ce.dask_value_and_grad(pred, label)` computed on the workers and left there (a 320 MB
  gradient is not worth sending back), then released;
each with losscc's kernel threads left at every core, and at one (LOSSCC_NUM_THREADS=1 in
the workers). Times are the minimum over --repeats; the per-sample values of the first
block are checked against the numpy call's bits. Nothing here is collected by pytest.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def best(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def numpy_ce(x, c):
    m = x.max(axis=1, keepdims=True)
    lse = np.log(np.exp(x - m).sum(axis=1)) + m[:, 0]
    return lse - x[np.arange(len(c)), c]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=4_000_000)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--chunk", type=int, default=500_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", help="build folder (default: a temporary one)")
    args = ap.parse_args()

    sys.path.insert(0, str(ROOT))
    import losscc
    from losscc.build import build

    out = Path(args.out or tempfile.mkdtemp(prefix="losscc-bench-"))
    losses = losscc.load(build([ROOT / "specs"], out=out, name="losses", log=lambda *a: None).path)
    ce = losses.SoftmaxCrossEntropyLoss()
    n, k = args.rows, args.classes
    print(f"softmax CE, {n} x {k} float64, chunks of {args.chunk} rows; min of {args.repeats}")

    t_losscc, t_numpy, t_vg1 = one_process(ce, n, k, args.repeats)
    print(f"  one process, losscc (numpy arrays)        {t_losscc * 1e3:8.1f} ms   value_and_grad {t_vg1 * 1e3:8.1f} ms")
    print(f"  one process, plain numpy                  {t_numpy * 1e3:8.1f} ms")
    for workers in (1, 2):
        for threads in (None, 1):
            t_mean, t_vg = on_cluster(ce, n, k, args.chunk, workers, threads, args.repeats)
            what = "every core" if threads is None else f"{threads} thread"
            print(f"  {workers} worker(s), kernel threads {what:10s}  {t_mean * 1e3:8.1f} ms   "
                  f"value_and_grad {t_vg * 1e3:8.1f} ms   "
                  f"(x{t_mean / t_losscc:.2f} the one-process losscc time, numpy's / this: "
                  f"{t_numpy / t_mean:.2f})")


def one_process(ce, n, k, repeats):
    rng = np.random.default_rng(0)
    x, c = rng.standard_normal((n, k)), rng.integers(0, k, n)
    np.testing.assert_allclose(ce(x[:1000], c[:1000]), numpy_ce(x[:1000], c[:1000]), rtol=1e-13)
    return (best(lambda: ce(x, c).mean(), repeats), best(lambda: numpy_ce(x, c).mean(), repeats),
            best(lambda: ce.value_and_grad(x, c), repeats))


def on_cluster(ce, n, k, chunk, workers, threads, repeats):
    import dask.array as da
    from dask.distributed import Client, LocalCluster, wait

    env = {} if threads is None else {"LOSSCC_NUM_THREADS": str(threads)}
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None, worker_dashboard_address=None, env=env) as lc, \
            Client(lc) as client:
        state = da.random.RandomState(1)
        pred = state.standard_normal((n, k), chunks=(chunk, k))
        label = state.randint(0, k, n, chunks=chunk)
        pred, label = client.persist([pred, label])
        wait([pred, label])
        first = pred.blocks[0].compute(), label.blocks[0].compute()
        assert np.array_equal(ce.dask(pred, label).blocks[0].compute(), ce(*first))
        t_mean = best(lambda: ce.dask(pred, label).mean().compute(), repeats)

        def vg():  # computed and left on the workers, then released (the next repeat's keys are the same)
            futures = client.compute(list(ce.dask_value_and_grad(pred, label)))
            wait(futures)
            client.cancel(futures)

        return t_mean, best(vg, repeats)

if __name__ == "__main__":
    main()
