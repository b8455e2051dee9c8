"""PyTorch: a compiled loss as a `torch.nn.Module` (`loss.torch()`).

    mse = losses.L2Loss(reduction="mean").torch()
    out = mse(model(x), y)          # the fused kernel runs once: value and gradient
    out.backward()                  # scales the gradient kept in the forward pass

The module's forward calls the loss's `value_and_grad` once (or its value alone where no
input requires a gradient) on the tensors' own memory: CPU tensors of float32 or float64 (and
int64 class labels) are handed to the kernel as numpy views, without a copy, whatever their
strides. The gradient it returns is kept, and backward multiplies it by the incoming
gradient: a scalar for reduction 'mean' or 'sum', one factor per sample (along the batch
axis) for reduction 'none'. The one exception is an input broadcast against the prediction
(a pos_weight of shape (C,), say) under reduction 'none': its kept gradient is already
summed over the samples, so backward calls the kernel again with the incoming gradient as
sample weights. Gradients flow to the loss's differentiable inputs only; a tensor that
requires a gradient anywhere else is an error, not a silent zero. Second derivatives are
not supported (the backward is not itself differentiable).

Requires torch (`pip install "losscc[torch]"`); the rest of losscc never imports it.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["LossModule", "module"]


def module(loss) -> LossModule:
    """`loss` (a compiled losscc loss object) as a torch.nn.Module."""
    return LossModule(loss)


class LossModule(torch.nn.Module):
    """A losscc loss as a torch.nn.Module; call it with the loss's own arguments (tensors,
    or anything the loss accepts), positional or by name."""

    def __init__(self, loss):
        super().__init__()
        self.loss = loss

    def forward(self, *args, **kwargs):
        keys = (None,) * len(args) + tuple(kwargs)  # None: positional
        return _LossFunction.apply(self.loss, keys, *args, *kwargs.values())

    def extra_repr(self) -> str:
        return repr(self.loss)


def _array(loss, name, value):
    """A tensor's numpy view (no copy), or the value itself."""
    if not isinstance(value, torch.Tensor):
        return value
    if value.device.type != "cpu":
        raise TypeError(f"{loss._display}: {name} is a tensor on {value.device}; losscc's kernels "
                        f"run on the CPU: move it with .cpu()")
    return value.detach().resolve_conj().resolve_neg().numpy()


def _per_sample(gout: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
    """The incoming per-sample gradient, shaped to broadcast along the batch axis."""
    shape = [1] * ndim
    shape[axis] = -1
    return gout.reshape(shape)


class _LossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, loss, keys, *values):
        args = [v for k, v in zip(keys, values) if k is None]
        kwargs = {k: v for k, v in zip(keys, values) if k is not None}
        names = list(loss._bind(args, kwargs))  # the argument each value was given as, in order
        order = [names[i] if k is None else k for i, k in enumerate(keys)]
        wanted = []
        for name, v in zip(order, values):
            if isinstance(v, torch.Tensor) and v.requires_grad:
                if name not in loss._diff:
                    raise TypeError(f"{loss._display}: {name} requires a gradient, but the loss is not "
                                    f"differentiable in it (differentiable: {', '.join(loss._diff)}); "
                                    f"pass {name}.detach()")
                wanted.append(name)
        arrays = {name: _array(loss, name, v) for name, v in zip(order, values)}
        ctx.loss, ctx.order, ctx.wanted, ctx.arrays = loss, order, tuple(wanted), arrays
        pos = [arrays[name] for name, k in zip(order, keys) if k is None]  # (the fast call path)
        kw = {name: arrays[name] for name, k in zip(order, keys) if k is not None}
        if not wanted:
            return torch.from_numpy(np.asarray(loss(*pos, **kw)))
        if ctx.wanted == loss._wrt:
            value, grads = loss.value_and_grad(*pos, **kw)
        else:
            value, grads = loss.value_and_grad(*pos, **kw, wrt=ctx.wanted)
        grads = grads if isinstance(grads, tuple) else (grads,)
        # backward reads the inputs again where it calls the kernel again (reduction 'none', a
        # wanted input broadcast against pred): saved too, so torch refuses a backward after
        # one of them was changed in place rather than giving a silently wrong gradient
        size = np.prod(np.shape(arrays[loss._inputs[0]["name"]]), dtype=np.int64)  # pred's
        ctx.broadcast = tuple(n for n in ctx.wanted if np.size(arrays[n]) != size)
        again = loss.reduction == "none" and ctx.broadcast
        inputs = [v for v in values if isinstance(v, torch.Tensor)] if again else []
        ctx.save_for_backward(*(torch.from_numpy(g) for g in grads), *inputs)
        return torch.from_numpy(np.asarray(value))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gout):
        loss, arrays = ctx.loss, ctx.arrays
        kept = dict(zip(ctx.wanted, ctx.saved_tensors))  # (torch checks the saved inputs here)
        first = loss._inputs[0]["name"]
        pshape = np.shape(arrays[first])
        axis = loss.batch_axis % len(pshape)
        out = {}
        if loss.reduction != "none":
            out = {name: g * gout for name, g in kept.items()}
        else:
            # inputs of the prediction's size: each sample's part of the kept gradient is
            # its own loss's, scaled by that sample's incoming gradient
            for name in (n for n in ctx.wanted if n not in ctx.broadcast):
                g = kept[name]
                out[name] = (g.reshape(pshape) * _per_sample(gout, len(pshape), axis)).reshape(g.shape)
            if ctx.broadcast:  # summed over the samples already: the kernel again, gout as weights
                sw = arrays.get("sample_weight")
                w = _per_sample(gout.detach(), len(pshape), axis).numpy()
                redo = {**arrays, "sample_weight": w if sw is None else np.asarray(sw) * w}
                _, grads = loss.value_and_grad(**redo, wrt=ctx.broadcast)
                grads = grads if isinstance(grads, tuple) else (grads,)
                out.update({n: torch.from_numpy(g) for n, g in zip(ctx.broadcast, grads)})
        return (None, None, *(out.get(name) for name in ctx.order))
