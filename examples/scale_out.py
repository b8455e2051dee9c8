"""The README's "Scaling out" example, which the tests run: softmax cross entropy over a
4e6 x 10 dask array on two local worker processes."""

import dask.array as da
from dask.distributed import Client, LocalCluster

import losscc


def main():
    losses = losscc.load("build/losses")
    with LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1", dashboard_address=None) as cluster, \
            Client(cluster):
        pred = da.random.normal(size=(4_000_000, 10), chunks=(500_000, 10))
        label = da.random.randint(0, 10, size=4_000_000, chunks=500_000)
        ce = losses.SoftmaxCrossEntropyLoss()
        print(ce.dask(pred, label).mean().compute())        # per-sample losses, on the workers
        value, grad = ce.dask_value_and_grad(pred, label)   # lazy: one fused kernel call per block
        print(value.shape, grad.shape, abs(grad.sum(axis=1)).max().compute())  # softmax - one-hot: rows sum to 0


if __name__ == "__main__":  # worker processes are spawned, and import this file
    main()
