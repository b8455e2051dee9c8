"""`losscc plot` and `loss.plot()`: the Gluon tutorial's "Visualize Loss Functions" -- each
loss against the prediction over [-5, 5), the other inputs fixed (the spec's `plot:`
section, else the label at 0 for a regression loss and 1 for a classification one), with its
gradient as a second curve. Needs matplotlib (`pip install "losscc[plot]"`).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .errors import LossccError

X = np.arange(-5.0, 5.0, 0.01)  # where the curves are drawn (the tutorial's arange(-5, 5, .1), finer)


def plot_data(loss, x=None) -> tuple:
    """(x, loss, gradient, what varies): the curves `loss.plot()` draws. The gradient is with
    respect to the element that varies; the loss's options, params and weight are its own
    (its reduction is not: one value per point)."""
    inputs = loss._meta.get("plot") or []
    if not inputs:
        raise LossccError(f"{loss._display}: its spec has no plot section (a row loss needs one: "
                          f"plot: {{pred: [x, 0], label: 0}}, x marking the element that varies)")
    x = X if x is None else np.asarray(x, dtype=np.float64)
    n = x.size
    args, varied = {}, None
    for name, value in inputs:
        if isinstance(value, list):  # a row; "x" marks the element that varies
            arr = np.tile(np.array([0.0 if v == "x" else v for v in value]), (n, 1))
            if "x" in value:
                varied = (name, value.index("x"))
                arr[:, varied[1]] = x
        elif value == "x":
            arr, varied = x.copy(), (name, None)
        else:
            arr = np.full(n, float(value))
        args[name] = arr
    per_point = loss._replace(reduction="none")
    value, grad = per_point.value_and_grad(**args, wrt=(varied[0],))
    if varied[1] is not None:
        grad = grad[:, varied[1]]
    fixed = ", ".join(f"{k}={_text(v)}" for k, v in inputs if not (k == varied[0] and v == "x"))
    what = varied[0] if varied[1] is None else f"{varied[0]}[{varied[1]}]"
    return x, value, grad, f"{what} ({fixed})" if fixed else what


def _text(value) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_text(v) for v in value) + "]"
    return value if isinstance(value, str) else f"{value:g}"


def draw(loss, ax=None, x=None):
    """Draw `loss` and its gradient on matplotlib axes `ax` (new pyplot ones if None)."""
    if ax is None:
        import matplotlib.pyplot as plt

        _, ax = plt.subplots(figsize=(4.5, 3.2))
    x, value, grad, what = plot_data(loss, x)
    ax.axhline(0.0, color="0.8", lw=0.8)
    ax.plot(x, value, color="C0", label="loss")
    ax.plot(x, grad, color="C1", ls="--", label="gradient")
    ax.set_title(loss._display, fontsize=9)
    ax.set_xlabel(what, fontsize=8)
    ax.legend(fontsize=7, loc="best")
    ax.tick_params(labelsize=7)
    return ax


def plot_specs(paths, out="plots", build_dir="build", fmt="svg", log=print) -> list[Path]:
    """Build the specs (incrementally, as `losscc build` does), then draw every loss at its
    defaults: one file per loss and an overview sheet of all of them. Returns the files."""
    from matplotlib.figure import Figure  # no pyplot: nothing global, no display needed

    from .build import build
    from .runtime import load_module

    report = build(paths, out=build_dir, log=lambda text: None)
    module = load_module(report.path)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    losses = [cls() for cls in module.LOSSES.values()]
    written = []
    for loss in losses:
        fig = Figure(figsize=(4.5, 3.2), layout="constrained")
        draw(loss, fig.add_subplot(), None)
        path = out / f"{loss._meta['name']}.{fmt}"
        fig.savefig(path)
        written.append(path)
        log(f"  {path}")
    cols = 4
    rows = math.ceil(len(losses) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.0 * rows), layout="constrained")
    for k, loss in enumerate(losses):
        draw(loss, fig.add_subplot(rows, cols, k + 1), None)
    path = out / f"overview.{fmt}"
    fig.savefig(path)
    written.append(path)
    log(f"{path}: {len(losses)} losses")
    return written
