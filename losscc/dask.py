"""Losses over dask arrays (the extra losscc[dask]): one fused kernel call per block.

    ce = losses.SoftmaxCrossEntropyLoss()
    ce.dask(pred, label)                            # per-sample values, a lazy dask array
    value, grad = ce.dask_value_and_grad(pred, label, sample_weight=w)
    grad, hess = losses.HuberLoss().dask_grad_hess(pred, label)

The prediction is split along its batch axis only: every other axis is brought into one
chunk (a row loss needs whole rows). Each other input is either batch-aligned -- it has the
prediction's batch size on the axis that lines up with the batch axis under the loss's own
broadcasting rules -- and then chunked exactly like the prediction, or it broadcasts along
the batch (a scalar, per-class weights, a size-1 batch axis) and every block reads it whole.

Each block is one call of the loss's compiled kernel, on a worker: the loss travels as plain
data (pickled by reference to its build, runtime.unpickle_loss), so workers need the build
at the same path, numpy, cffi and losscc's runtime, not sympy or a compiler; the scheduler
needs losscc importable, not the build. Per-sample
values, gradients and second derivatives are the bits the numpy call gives on the whole
array (the kernels compute each sample on its own); what crosses samples may differ in
rounding: the 'sum' and 'mean' values (Dask's tree reduction of the per-sample values, in
float64, rounded once) and the gradient of an input broadcast along the batch (each
block's sum, summed over the blocks in float64). A 'mean' gradient divides by the whole
array's batch size, as one call on the whole array would.

The graph is built by hand (as dask.array.apply_gufunc does): one task per block returns
the kernel's outputs together, and each output is an array of getitem tasks on it, so a
value and its gradient come from one pass over the data. An error in a block (a class index
out of range) is raised by compute(), its message naming the block's samples.
"""

from __future__ import annotations

import math
import operator

import numpy as np

import dask.array as da
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph

from .runtime import _RowLayout, unpickle_loss

__all__ = ["apply"]


class _Job:
    """What every block's task needs besides its arrays. It pickles as plain data: the loss
    by reference (runtime.unpickle_loss's arguments), made again on first use. Dask's
    scheduler unpickles the task graph, and it need not load the build: only workers do."""

    def __init__(self, loss, mode, names, want_value, wanted, mean_over):
        self._loss, self._ref = loss, None
        self.mode, self.names = mode, names
        self.want_value, self.wanted, self.mean_over = want_value, wanted, mean_over

    @property
    def loss(self):
        if self._loss is None:
            self._loss = unpickle_loss(*self._ref)
        return self._loss

    def __getstate__(self):
        ref = self._ref if self._loss is None else self._loss.__reduce__()[1]
        return {**self.__dict__, "_loss": None, "_ref": ref}

    def __dask_tokenize__(self):
        return (self._loss if self._loss is not None else self._ref, self.mode, self.names,
                self.want_value, self.wanted, self.mean_over)


def _run_block(job, start, stop, *blocks):
    """One kernel call on one block: the tuple (value?, *gradients, second derivative?)."""
    kwargs = {n: b for n, b in zip(job.names, blocks)}
    try:
        value, grads, hess = job.loss._run(job.mode, (), kwargs, want_value=job.want_value,
                                           wrt=job.wanted or None, mean_over=job.mean_over)
    except IndexError as exc:  # the kernel's position is within this block
        raise IndexError(f"{exc} (in the dask block of samples {start}:{stop} along the batch "
                         f"axis; the position is counted from sample {start})") from None
    outs = [value] if job.want_value else []
    if job.wanted:
        outs += list(grads) if isinstance(grads, tuple) else [grads]
    if hess is not None:
        outs.append(hess)
    return tuple(outs)


def apply(loss, mode, args, kwargs, wrt=None):
    """The dask arrays of loss(*args, **kwargs) for `mode`: 'v' (the value), 'g' (the
    gradients), 'vg' (both) or 'gh' (gradient and second derivative); see Loss.dask."""
    who = loss._display
    a = loss._bind(args, kwargs)
    want_value = "v" in mode
    wanted = loss._wanted(wrt) if "g" in mode else ()
    kernel_mode = {"v": "v", "g": "vg", "vg": "vg", "gh": "vgh"}[mode]

    first = loss._inputs[0]["name"]
    pred = _dask_array(a[first], first, who)
    bax = loss._pred_axis(first, pred.dtype, pred.shape)
    rows = None
    if loss._rows:
        rows = _RowLayout(who, first, pred.shape, loss.batch_axis, loss.axis)  # checks axis
    nb = pred.shape[bax]
    pred = pred.rechunk({i: -1 for i in range(pred.ndim) if i != bax})
    chunks = pred.chunks[bax]

    # (name, operand, its batch axis or None when read whole, the caller's shape)
    operands = [(first, pred, bax, pred.shape)]
    extra = [dict(i, row=(loss._kinds[i["name"]] == "row") if rows else True) for i in loss._inputs[1:]]
    extra.append({"name": "sample_weight", "default": 1.0, "row": rows is None})
    for k, inp in enumerate(extra):
        name, value = inp["name"], a.get(inp["name"])
        if value is None:
            continue
        if np.ndim(value) == 0 and not isinstance(value, da.Array):
            operands.append((name, value, None, ()))
            continue
        x = _dask_array(value, name, who)
        given = x.shape
        like_pred = inp["default"] is None if rows else k == 0  # Gluon reshapes the label like pred
        if like_pred and inp["row"] and x.size == pred.size and x.shape != pred.shape:
            x = x.reshape(pred.shape)
        axis = _batch_axis_of(who, name, x, pred, bax, nb, rows, inp["row"])
        spec = {i: (chunks if i == axis else -1) for i in range(x.ndim)}
        operands.append((name, x.rechunk(spec), axis, given))

    job = _Job(loss._replace(reduction="none"), kernel_mode, tuple(o[0] for o in operands), want_value,
               wanted, nb if loss.reduction == "mean" else None)
    token = tokenize(job, *(o[1] for o in operands))
    tmp = f"losscc-{loss._meta['name']}-{mode}-{token}"
    dsk, start = {}, 0
    for b, n in enumerate(chunks):
        keys = [_block_key(x, axis, b) for _, x, axis, _ in operands]
        dsk[(tmp, b)] = (_run_block, job, start, start + n, *keys)
        start += n
    deps = [x for _, x, _, _ in operands if isinstance(x, da.Array)]
    blocks = da.Array(HighLevelGraph.from_collections(tmp, dsk, dependencies=deps), tmp,
                      chunks=(chunks,), meta=np.empty((0,), object))

    dtype = pred.dtype
    results, k = [], 0
    if want_value:
        values = _leaf(blocks, k, (nb,), (chunks,), 0, dtype)
        results.append(_reduce(values, loss.reduction, nb, dtype))
        k += 1
    grads = []
    for name in wanted:
        _, x, axis, given = next(o for o in operands if o[0] == name)
        if axis is None:  # broadcast along the batch: each block's sum, summed over the blocks
            shape = np.shape(x)  # (a scalar's: ())
            g = _leaf(blocks, k, (len(chunks), *shape), ((1,) * len(chunks), *((s,) for s in shape)),
                      0, dtype, stacked=True)
            g = g.sum(axis=0, dtype=np.float64).astype(dtype)
        else:
            g = _leaf(blocks, k, x.shape, x.chunks, axis, dtype)
        grads.append(g.reshape(given) if g.shape != given else g)
        k += 1
    if grads:
        results.append(grads[0] if len(grads) == 1 else tuple(grads))
    if mode == "gh":
        results.append(_leaf(blocks, k, pred.shape, pred.chunks, bax, dtype))
    return results[0] if len(results) == 1 else tuple(results)


def _dask_array(value, name, who):
    try:
        x = value if isinstance(value, da.Array) else da.asarray(np.asarray(value))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{who}: {name} must be an array, got {type(value).__name__}: {exc}") from None
    if any(math.isnan(n) for n in x.shape):
        raise ValueError(f"{who}: {name} has unknown chunk sizes; call .compute_chunk_sizes() first")
    return x


def _batch_axis_of(who, name, x, pred, bax, nb, rows, row_kind):
    """The axis of input `x` that lines up with the prediction's batch axis under the
    runtime's broadcasting (right-aligned against the prediction, or for a row loss's
    per-row input against the prediction without its class axis), or None when `x` is
    read whole: no such axis, or one of size 1 (or a batch of 1), or a row loss's vector of
    per-class weights."""
    if rows is not None and row_kind and x.ndim == 1 and rows.axis is not None and pred.ndim > 1 \
            and x.shape[0] == rows.nc:
        return None  # per-class weights lie along the class axis, whatever its position
    if rows is not None and not row_kind and x.ndim != pred.ndim:
        ndim, tax = len(rows.rows_shape), rows.rows_bax  # one value per row
    else:
        ndim, tax = pred.ndim, bax
    axis = tax - (ndim - x.ndim)
    if axis < 0 or x.shape[axis] == 1 or nb == 1:
        return None
    if x.shape[axis] != nb:
        raise ValueError(f"{who}: {name} of shape {x.shape} does not line up with the prediction "
                         f"of shape {pred.shape}: its axis {axis}, under the prediction's batch axis "
                         f"{bax}, has {x.shape[axis]} entries, not {nb} (or 1)")
    return axis


def _block_key(x, axis, b):
    """The key of block b of operand x (its only block when read whole); a plain value
    (a scalar) is passed as it is."""
    if not isinstance(x, da.Array):
        return x
    return (x.name, *(b if i == axis else 0 for i in range(x.ndim)))


def _leaf(blocks, k, shape, chunks, axis, dtype, stacked=False):
    """Output k of every block's task as an array of `shape` split along `axis`."""
    name = f"{blocks.name}-{k}"
    ndim = len(shape)
    dsk = {}
    for b in range(len(chunks[axis])):
        task = (operator.getitem, (blocks.name, b), k)
        if stacked:
            task = (np.expand_dims, task, 0)
        dsk[(name, *(b if i == axis else 0 for i in range(ndim)))] = task
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=[blocks])
    return da.Array(graph, name, chunks=chunks, meta=np.empty((0,) * ndim, dtype))


def _reduce(values, reduction, nb, dtype):
    """Per-sample values, or their sum or mean through Dask's tree reduction (in float64,
    rounded once to the prediction's dtype, as the numpy call rounds its total)."""
    if reduction == "none":
        return values
    if reduction == "mean" and nb == 0:
        return da.full((), np.nan, dtype=dtype)
    total = values.sum(dtype=np.float64)
    return (total / nb if reduction == "mean" else total).astype(dtype)
