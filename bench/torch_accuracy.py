"""PyTorch's losses measured the way `losscc check` measures losscc's kernels.

    python bench/torch_accuracy.py [--samples 40] [--seed 0] [--json FILE] [--out DIR]

For every built-in spec with a torch.nn.functional counterpart of the same semantics, this
script draws the very inputs `losscc check --samples N --seed S` draws for that spec (check's
own `sweep`, on its own random stream), evaluates the torch function
per element or per row (reduction='none') and its gradient by autograd of the sum of those
values (so each gradient entry is d value_i / d input_i), in float64 and float32, and
measures both in ulps of the true result: the spec's written formula in interval
arithmetic (losscc.truth, through check.py's own `_compiled`, `resolve`, `_error`).

Differences from `losscc check`:
- "grad" is every first derivative the spec declares (d/dpred, and d/dlabel, d/dinput2 ...
  where the spec makes them differentiable); no second derivatives.
- A mapping may fix parameters or inputs to the values the torch function implements
  (e.g. binary_cross_entropy has no pos_weight and no epsilon: the truth is taken at
  pos_weight = 1, epsilon = 0); each such choice is listed under the table.
- Where torch's own definition differs from the spec's in a way no parameter can absorb
  (the epsilon of cosine_embedding_loss, the -100 clamp of binary_cross_entropy), a second
  row measures the same torch results against torch's definition, written as a spec and
  evaluated by the same truth machinery.

Each mapping is first checked at ordinary points (check.py's `_fd_points` / `_fd_rows`):
torch's float64 value must equal losscc's unreduced float64 value to 1e-12 relative (looser,
and said why, for the naive log_cosh and for cosine_embedding_loss's epsilon); the result is
printed under the table.

The module is built (incrementally) as DIR/losscc_check, the same package `losscc check`
builds, so after a `losscc check` run it costs nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import mpmath
import numpy as np

from losscc.build import build
from losscc.check import (Accuracy, _compiled, _error, _fd_points, _fd_rows, _fmt, _params, _slack,
                          _variant_key, streams, sweep, truth_point, wrt_measured)
from losscc.runtime import load_module
from losscc.spec import load_spec, parse_spec, spec_files
from losscc.truth import resolve

CHECKOUT = Path(__file__).resolve().parents[1]  # the spec folder's default
VERIFY_C = 4  # classes of the ordinary rows

# --------------------------------------------------------------------------- torch's own definitions

# PyTorch's cosine_embedding_loss (ATen Loss.cpp): cos = dot(a, b) / sqrt((|a|^2 + EPS) (|b|^2 + EPS)),
# EPS = 1e-12 as a float constant, i.e. float32(1e-12) = 2305843 / 2**61 even in float64
# (measured: torch's float64 results match this EPS to the last bit and not the double 1e-12).
# Gluon's (the spec's) is dot(a, b) / max(|a| |b|, 1e-12): 1e-12 relative apart at unit norms.
TORCH_COSINE = """
name: torch_cosine_embedding
summary: PyTorch's cosine_embedding_loss as ATen defines it.
reference: torch 2.13 aten/src/ATen/native/Loss.cpp cosine_embedding_loss.
inputs:
  input1: {row: true}
  input2: {row: true, differentiable: true}
  label: {domain: "{-1, 1}"}
params:
  margin: {default: 0.0}
let:
  eps: 2305843 / 2**61
  cos: dot(input1, input2) / sqrt((sum(input1**2) + eps) * (sum(input2**2) + eps))
loss: where(label == 1, 1 - cos, where(label == -1, max(cos - margin, 0), 0))
"""

# PyTorch's binary_cross_entropy: -(y log p + (1 - y) log(1 - p)) with each log clamped at -100
# (no epsilon); the spec's from_sigmoid form at epsilon = 0 is the same but for the clamp,
# which decides only for p or 1 - p below e^-100 (in the sweep: p exactly 0 or 1).
TORCH_BCE = """
name: torch_binary_cross_entropy
summary: PyTorch's binary_cross_entropy as ATen defines it (each log clamped at -100).
reference: torch 2.13 aten/src/ATen/native/Loss.cpp binary_cross_entropy_out_cpu.
inputs:
  pred: {domain: "[0, 1]"}
  label: {domain: "[0, 1]"}
# a term whose weight is exactly 0 is dropped (torch's value there is 0 * -100 = 0 too), so
# that the derivative at p = 0 or 1 is the one-sided derivative of the other term, not 0 * (1/0)
loss: |
  -(where(label == 0, 0, label * max(log(pred), -100))
    + where(label == 1, 0, (1 - label) * max(log(1 - pred), -100)))
"""


# --------------------------------------------------------------------------- the mappings


def _same(x):
    return x


@dataclass
class Mapping:
    """One row of the table: a torch function standing for some variants of a spec."""

    spec: str  # the built-in spec whose sweep supplies the inputs
    row: str  # the table's loss column
    torch: str  # the table's torch function column
    covers: Callable[[dict], bool]  # which variant combinations of the spec it stands for
    fn: Callable  # (F, torch, tensors, params, options) -> values per element or per row
    params: Callable[[dict], dict | None] = _same  # the parameters torch implements; None: skip
    inputs: Callable[[dict], dict] = _same  # the inputs torch and the truth see
    truth: str | None = None  # torch's own definition (spec text); None: the spec's formula
    note: str = ""
    verify_rtol: float = 1e-12  # torch vs losscc, float64, ordinary points (values)


def _ce_rows(F, torch, t, p, o, fn):
    """cross_entropy / nll_loss one row at a time: class weights are drawn per row, torch
    takes one weight vector per call."""
    pred = t["pred"]
    out = []
    for k in range(pred.shape[0]):
        kw = {"weight": t["class_weight"][k], "reduction": "none"}
        if fn is F.cross_entropy:
            kw["label_smoothing"] = p["label_smoothing"]
        if o["sparse_label"]:
            kw["ignore_index"] = int(p["ignore_index"])
        out.append(fn(pred[k:k + 1], t["label"][k:k + 1], **kw))
    return torch.cat(out)


def _squared_l2(a, b):
    return ((a - b) ** 2).sum(dim=-1)


def mappings() -> list[Mapping]:
    return [
        Mapping("l2", "l2", "0.5 * F.mse_loss", lambda o: True,
                lambda F, T, t, p, o: 0.5 * F.mse_loss(t["pred"], t["label"], reduction="none"),
                note="mse_loss's (p - l)^2 and its gradient 2 (p - l) overflow before the halving, "
                     "for |p - l| near the largest float"),
        Mapping("l1", "l1", "F.l1_loss", lambda o: True,
                lambda F, T, t, p, o: F.l1_loss(t["pred"], t["label"], reduction="none")),
        Mapping("huber", "huber", "F.smooth_l1_loss(beta=rho)", lambda o: True,
                lambda F, T, t, p, o: F.smooth_l1_loss(t["pred"], t["label"], beta=p["rho"],
                                                       reduction="none"),
                note="Gluon's HuberLoss(rho) is smooth_l1_loss(beta=rho); huber_loss(delta) is "
                     "delta times it (not used: the division back would add a rounding)"),
        Mapping("logistic", "logistic (signed labels)", "F.soft_margin_loss",
                lambda o: o["label_format"] == "signed",
                lambda F, T, t, p, o: F.soft_margin_loss(t["pred"], t["label"], reduction="none")),
        Mapping("logistic", "logistic (binary labels)", "F.binary_cross_entropy_with_logits",
                lambda o: o["label_format"] == "binary",
                lambda F, T, t, p, o: F.binary_cross_entropy_with_logits(t["pred"], t["label"],
                                                                         reduction="none")),
        Mapping("sigmoid_bce", "sigmoid_bce (logits)", "F.binary_cross_entropy_with_logits(pos_weight)",
                lambda o: not o["from_sigmoid"],
                lambda F, T, t, p, o: F.binary_cross_entropy_with_logits(
                    t["pred"], t["label"], pos_weight=t["pos_weight"], reduction="none")),
        Mapping("sigmoid_bce", "sigmoid_bce (from_sigmoid)", "F.binary_cross_entropy",
                lambda o: o["from_sigmoid"],
                lambda F, T, t, p, o: F.binary_cross_entropy(t["pred"], t["label"], reduction="none"),
                params=lambda p: dict(p, epsilon=0.0),
                inputs=lambda a: dict(a, pos_weight=np.ones_like(a["pos_weight"])),
                note="truth at epsilon = 0 and pos_weight = 1 (binary_cross_entropy has neither); "
                     "torch clamps each log at -100 instead"),
        Mapping("sigmoid_bce", "sigmoid_bce (from_sigmoid), vs torch's definition",
                "F.binary_cross_entropy", lambda o: o["from_sigmoid"],
                lambda F, T, t, p, o: F.binary_cross_entropy(t["pred"], t["label"], reduction="none"),
                truth=TORCH_BCE,
                note="truth: -(y max(log p, -100) + (1 - y) max(log(1 - p), -100)), torch's definition"),
        Mapping("poisson_nll", "poisson_nll (from_logits)", "F.poisson_nll_loss(log_input=True, full, eps)",
                lambda o: o["from_logits"],
                lambda F, T, t, p, o: F.poisson_nll_loss(t["pred"], t["target"], log_input=True,
                                                         full=o["compute_full"], eps=p["epsilon"],
                                                         reduction="none"),
                note="both compute_full values (full=)"),
        Mapping("poisson_nll", "poisson_nll (rates)", "F.poisson_nll_loss(log_input=False, full, eps)",
                lambda o: not o["from_logits"],
                lambda F, T, t, p, o: F.poisson_nll_loss(t["pred"], t["target"], log_input=False,
                                                         full=o["compute_full"], eps=p["epsilon"],
                                                         reduction="none"),
                note="both compute_full values (full=); eps = the spec's epsilon"),
        Mapping("log_cosh", "log_cosh", "naive torch: torch.log(torch.cosh(e / scale))", lambda o: True,
                lambda F, T, t, p, o: T.log(T.cosh((t["pred"] - t["label"]) / p["scale"])),
                note="no torch.nn.functional loss: the formula written in torch ops, as a user would "
                     "(checked against losscc to 1e-7 relative: 1 - cosh(e) cancels near e = 0)",
                verify_rtol=1e-7),
        Mapping("softmax_cross_entropy", "softmax_cross_entropy (class labels)",
                "F.cross_entropy(weight, label_smoothing)",
                lambda o: o["sparse_label"] and not o["from_logits"],
                lambda F, T, t, p, o: _ce_rows(F, T, t, p, o, F.cross_entropy),
                note="one call per row (class weights are drawn per row; torch takes one vector)"),
        Mapping("softmax_cross_entropy", "softmax_cross_entropy (probability labels)",
                "F.cross_entropy(prob. target, weight, label_smoothing)",
                lambda o: not o["sparse_label"] and not o["from_logits"],
                lambda F, T, t, p, o: _ce_rows(F, T, t, p, o, F.cross_entropy),
                note="one call per row"),
        Mapping("softmax_cross_entropy", "softmax_cross_entropy (from_logits, class labels)",
                "F.nll_loss(weight)",
                lambda o: o["sparse_label"] and o["from_logits"],
                lambda F, T, t, p, o: _ce_rows(F, T, t, p, o, F.nll_loss),
                params=lambda p: dict(p, label_smoothing=0.0),
                note="truth at label_smoothing = 0 (nll_loss has none); one call per row"),
        Mapping("kl_div", "kl_div (from_logits: log-probabilities)", "F.kl_div(...).mean(-1)",
                lambda o: o["from_logits"],
                lambda F, T, t, p, o: F.kl_div(t["pred"], t["label"], reduction="none").mean(dim=-1),
                note="Gluon's mean over classes; gradients w.r.t. pred and label. At label == 0 the "
                     "spec defines d/dlabel = 0 (the true derivative is -inf), torch gives NaN: "
                     "those are the non-finite results"),
        Mapping("kl_div", "kl_div (logits)", "F.kl_div(F.log_softmax(pred), ...).mean(-1)",
                lambda o: not o["from_logits"],
                lambda F, T, t, p, o: F.kl_div(F.log_softmax(t["pred"], dim=-1), t["label"],
                                               reduction="none").mean(dim=-1),
                note="gradients w.r.t. pred and label (d/dlabel at label == 0: as above)"),
        Mapping("cosine_embedding", "cosine_embedding", "F.cosine_embedding_loss(margin)", lambda o: True,
                lambda F, T, t, p, o: F.cosine_embedding_loss(t["input1"], t["input2"], t["label"],
                                                              margin=p["margin"], reduction="none"),
                params=lambda p: dict(p, epsilon=1e-12) if p["margin"] <= 1 else None,
                note="truth: the spec (Gluon: max(|a||b|, 1e-12)) at epsilon = 1e-12; torch's epsilon "
                     "sits inside the squared norms, ~1e-12 relative apart at unit norms (a "
                     "definition gap, not rounding). Settings with margin > 1 skipped: there "
                     "Gluon's clip(cos - margin, 0, 1 - margin) is 1 - margin < 0, torch's 0",
                verify_rtol=1e-9),
        Mapping("cosine_embedding", "cosine_embedding, vs torch's definition",
                "F.cosine_embedding_loss(margin)", lambda o: True,
                lambda F, T, t, p, o: F.cosine_embedding_loss(t["input1"], t["input2"], t["label"],
                                                              margin=p["margin"], reduction="none"),
                params=lambda p: p if p["margin"] <= 1 else None, truth=TORCH_COSINE,
                note="truth: dot(a, b) / sqrt((|a|^2 + eps)(|b|^2 + eps)), eps = float32(1e-12); "
                     "the same points as the row above"),
        Mapping("triplet", "triplet", "F.triplet_margin_with_distance_loss(squared L2)", lambda o: True,
                lambda F, T, t, p, o: F.triplet_margin_with_distance_loss(
                    t["pred"], t["positive"], t["negative"], distance_function=_squared_l2,
                    margin=p["margin"], reduction="none"),
                params=lambda p: p if p["margin"] > 0 else None,
                note="distance_function=lambda a, b: ((a - b)**2).sum(-1); settings with margin <= 0 "
                     "skipped (torch refuses them); F.triplet_margin_loss is a different loss"),
    ]


SKIPPED = {
    "hinge": "no torch.nn.functional loss: F.hinge_embedding_loss is pred itself for label 1 "
             "(not relu(margin - pred)); F.multi_margin_loss is multi-class",
    "squared_hinge": "no torch.nn.functional loss (as hinge)",
    "softmax_focal": "no torch.nn.functional loss (torchvision's sigmoid_focal_loss is sigmoid-based)",
    "triplet (F.triplet_margin_loss)": "torch's uses p-norm distances |a - p + eps| (eps = 1e-6), "
                                       "not squared ones: a different loss (the triplet row uses "
                                       "triplet_margin_with_distance_loss instead)",
    "softmax_cross_entropy (from_logits, probability labels)": "no torch.nn.functional function: "
             "cross_entropy applies log_softmax again and nll_loss takes class indices only",
}


# --------------------------------------------------------------------------- torch


def run_torch(mapping, spec, kinds, arrays, params, options, dtype, wrt):
    """torch's values (per element or row) and d sum(values) / d input for each of wrt, as
    float64 numpy arrays."""
    import torch
    import torch.nn.functional as F

    tdtype = torch.float64 if dtype == np.float64 else torch.float32
    tensors = {}
    for name, a in arrays.items():
        if spec.is_row and kinds[name] == "index":
            tensors[name] = torch.from_numpy(np.asarray(a).astype(np.int64))
        else:
            tensors[name] = torch.tensor(np.asarray(a, dtype=dtype), dtype=tdtype,
                                         requires_grad=name in wrt)
    values = mapping.fn(F, torch, tensors, params, options)
    values.sum().backward()
    grads = {}
    for name in wrt:
        g = tensors[name].grad
        grads[name] = np.zeros(arrays[name].shape) if g is None else g.detach().numpy().astype(np.float64)
    return values.detach().numpy().astype(np.float64), grads


# --------------------------------------------------------------------------- measuring


@dataclass
class Stat:
    acc: Accuracy
    nonfinite: int = 0  # inf or nan where the truth is finite
    other_inf: int = 0  # other infinite errors (e.g. finite where the truth is +-inf)


@dataclass
class RowResult:
    mapping: Mapping
    stats: dict = field(default_factory=dict)  # (dtype name, output) -> Stat
    skipped_settings: int = 0
    seconds: float = 0.0

    def stat(self, dtype, output) -> Stat:
        key = (np.dtype(dtype).name, output)
        if key not in self.stats:
            self.stats[key] = Stat(Accuracy(output, key[0]))
        return self.stats[key]

    def cell(self, dtype: str, grad: bool) -> float:
        vals = [s.acc.max for (d, o), s in self.stats.items() if d == dtype and (o != "value") == grad]
        return max(vals, default=math.nan)

    def nonfinite(self, dtype: str, grad: bool) -> int:
        return sum(s.nonfinite for (d, o), s in self.stats.items() if d == dtype and (o != "value") == grad)


def measure(result, truth_spec, spec, batch):
    m = result.mapping
    kinds, options, dtype, n, C = batch.kinds, batch.options, batch.dtype, batch.n, batch.C
    tparams = m.params(batch.params)
    if tparams is None:
        result.skipped_settings += 1
        return
    batch = replace(batch, arrays=m.inputs(batch.arrays))
    arrays = batch.arrays
    wrt = wrt_measured(spec, kinds)
    values, grads = run_torch(m, spec, kinds, arrays, tparams, options, dtype, wrt)
    topts = {v.name: options[v.name] for v in truth_spec.variants}
    if C is None:
        _, fns = _compiled(truth_spec, topts)
    else:
        _, fns = _compiled(truth_spec, topts, C, kinds, wrt)
    limit = float(np.finfo(dtype).max)
    for k in range(n):
        point, perm = truth_point(truth_spec, batch, k, tparams)  # parameters exact, even for float32
        for output, fn in fns.items():
            if output.startswith("d2/"):
                continue
            if output == "value":
                group, got = "value", float(values[k])
            elif C is None:
                group, got = output, float(grads[output[3:]][k])
            else:
                group, j = output.split("[")
                got = float(grads[group[3:]][k][perm[int(j[:-1])]])
            stat = result.stat(dtype, group)
            truth = resolve(fn, point, limit, _slack(dtype))
            if mpmath.isnan(truth.value):
                stat.acc.unresolved += truth.unresolved
                continue
            err = _error(got, truth, dtype, stat.acc)
            if math.isinf(err):
                if not math.isfinite(got) and not mpmath.isinf(truth.value):
                    stat.nonfinite += 1
                else:
                    stat.other_inf += 1
            stat.acc.add(err, {"variant": options, "params": {p.name: tparams[p.name] for p in truth_spec.params},
                               "inputs": {i.name: np.asarray(arrays[i.name][k]).tolist() for i in truth_spec.inputs},
                               "output": output, "computed": got, "true": mpmath.nstr(truth.value, 17)}
                         if stat.acc.is_worst(err) else None)


# --------------------------------------------------------------------------- verification


def verify(mapping, spec, cls, seed: int) -> dict:
    """torch float64 vs losscc float64 (unreduced) at ordinary in-domain points of every covered
    variant, default and one random parameter setting: max relative difference per output."""
    rng = np.random.default_rng([seed, 7, *mapping.row.encode()])
    worst: dict = {"value abs": 0.0}
    for options in spec.variant_combos():
        if not mapping.covers(options):
            continue
        kinds = cls._meta["kernels"][_variant_key(cls, options)]["kinds"]
        wrt = wrt_measured(spec, kinds)
        for params in _params(spec, rng, settings=2):
            tparams = mapping.params(params)
            if tparams is None:
                continue
            if spec.is_row:
                arrays = _fd_rows(spec, options, kinds, VERIFY_C, rng)
            else:
                arrays = _fd_points(spec, options, rng)
            arrays = mapping.inputs({k: np.asarray(v, dtype=np.float64) if k not in kinds or kinds[k] != "index"
                                     else v for k, v in arrays.items()})
            values, grads = run_torch(mapping, spec, kinds, arrays, tparams, options, np.float64, wrt)
            loss = cls(**options, **tparams)
            with np.errstate(all="ignore"):
                v, g = loss.value_and_grad(**arrays, wrt=tuple(wrt))
            g = g if isinstance(g, tuple) else (g,)
            pairs = [("value", values, v)] + [(f"d/d{w}", grads[w], gw) for w, gw in zip(wrt, g, strict=True)]
            for name, a, b in pairs:
                a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
                with np.errstate(all="ignore"):
                    rel = np.abs(a - b) / np.maximum(np.maximum(np.abs(a), np.abs(b)), 1e-300)
                rel = np.where(a == b, 0.0, rel)  # equal infinities, both zero
                if name == "value":
                    worst["value abs"] = max(worst["value abs"], float(np.nanmax(np.abs(a - b))))
                worst[name] = max(worst.get(name, 0.0), float(np.max(np.where(np.isnan(rel), np.inf, rel))))
    return worst


# --------------------------------------------------------------------------- report


def _num(x):
    return x if isinstance(x, (int, float)) and math.isfinite(x) else str(x)


def _clean(x):
    """JSON-safe: non-finite floats as strings ('inf', 'nan'), numpy scalars as Python ones."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float):
        return _num(x)
    return x


def _cell(x: float) -> str:
    return "-" if math.isnan(x) else _fmt(x)


def table(results) -> str:
    lines = [("| loss | torch function | f64 value | f64 grad | f32 value | f32 grad "
             "| non-finite f64 (value+grad) | non-finite f32 (value+grad) |"),
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        cells = [_cell(r.cell(d, g)) for d in ("float64", "float32") for g in (False, True)]
        lines.append(f"| {r.mapping.row} | `{r.mapping.torch}` | " + " | ".join(cells)
                     + "".join(f" | {r.nonfinite(d, False)}+{r.nonfinite(d, True)}" for d in ("float64", "float32"))
                     + " |")
    return "\n".join(lines)


def details(results) -> str:
    lines = [("| loss | dtype | output | points | max | max of finite results | median | non-finite "
             "(truth finite) | other inf errors | kinks | unresolved |"),
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        for (dtype, output), s in r.stats.items():
            finite = [e for e in s.acc.errors if math.isfinite(e)]
            lines.append(f"| {r.mapping.row} | {dtype} | {output} | {len(s.acc.errors)} | {_fmt(s.acc.max)} | "
                         f"{_fmt(max(finite)) if finite else '-'} | {_fmt(s.acc.median)} | {s.nonfinite} | "
                         f"{s.other_inf} | {s.acc.kinks} | {s.acc.unresolved} |")
    return "\n".join(lines)


def to_json(results, verification, args, seconds) -> dict:
    import torch

    out = {"samples": args.samples, "seed": args.seed, "torch": torch.__version__, "seconds": round(seconds, 1),
           "rows": [], "skipped": SKIPPED}
    for r in results:
        row = {"loss": r.mapping.row, "spec": r.mapping.spec, "torch_function": r.mapping.torch,
               "note": r.mapping.note, "truth": "torch's definition" if r.mapping.truth else "spec",
               "verification_vs_losscc": {k: _num(v) for k, v in verification.get(r.mapping.row, {}).items()},
               "skipped_parameter_settings": r.skipped_settings, "seconds": round(r.seconds, 2),
               "table": {f"{d} {'grad' if g else 'value'}": _num(r.cell(d, g))
                         for d in ("float64", "float32") for g in (False, True)},
               "outputs": []}
        for (dtype, output), s in r.stats.items():
            finite = [e for e in s.acc.errors if math.isfinite(e)]
            row["outputs"].append({
                "dtype": dtype, "output": output, "points": len(s.acc.errors), "max_ulps": _num(s.acc.max),
                "max_finite_ulps": _num(max(finite)) if finite else None, "median_ulps": _num(s.acc.median),
                "nonfinite_where_truth_finite": s.nonfinite, "other_infinite_errors": s.other_inf,
                "kinks": s.acc.kinks, "unresolved": s.acc.unresolved,
                "worst": _clean(s.acc.worst)})
        out["rows"].append(row)
    return _clean(out)


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=40, help="as losscc check --samples (default 40)")
    ap.add_argument("--seed", type=int, default=0, help="as losscc check --seed (default 0)")
    ap.add_argument("--json", metavar="FILE", help="also write the full report as JSON ('-': stdout only)")
    ap.add_argument("--specs", default=None, help="the spec folder (default: the checkout's specs/)")
    ap.add_argument("--out", default="build", help="where losscc check builds (default build/: "
                                                    "shares its build/losscc_check)")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    # relative to the working directory, as `losscc check specs/` names it: the build cache is
    # keyed by the spec paths, so the same form reuses check's build instead of redoing it
    specs_dir = args.specs or os.path.relpath(CHECKOUT / "specs")
    t0 = time.perf_counter()
    specs = {s.name: s for s in (load_spec(f) for f in spec_files([specs_dir]))}
    report = build([specs_dir], out=args.out, name="losscc_check", log=lambda *a: None)
    module = load_module(report.path)
    maps = mappings()
    truths = {m.row: parse_spec(m.truth, f"<torch definition for {m.row}>") for m in maps if m.truth}
    results = [RowResult(m) for m in maps]
    verification = {m.row: {} if m.truth else verify(m, specs[m.spec], module.LOSSES[m.spec], args.seed)
                    for m in maps}
    for name in dict.fromkeys(m.spec for m in maps):
        spec, cls = specs[name], module.LOSSES[name]
        mine = [r for r in results if r.mapping.spec == name]
        _, sweep_rng = streams(spec, args.seed)
        for batch in sweep(spec, cls, args.samples, sweep_rng):
            for r in mine:
                if r.mapping.covers(batch.options):
                    t1 = time.perf_counter()
                    with np.errstate(all="ignore"):
                        measure(r, truths.get(r.mapping.row, spec), spec, batch)
                    r.seconds += time.perf_counter() - t1
    seconds = time.perf_counter() - t0

    text = [(f"PyTorch {torch.__version__} vs the true result, max ulps over `losscc check --samples "
            f"{args.samples} --seed {args.seed}`'s inputs (inf: a result that is inf or NaN where the "
            f"truth is finite, or not the truth's infinity where it is infinite). grad: every "
            f"first derivative the spec declares. non-finite: how many values / gradient entries are "
            f"inf or NaN where the truth is finite.\n"), table(results), "",
            "Notes:"]
    text += [f"- {m.row}: {m.note}" for m in maps if m.note]
    text += ["", "Skipped:"] + [f"- {k}: {v}" for k, v in SKIPPED.items()]
    text += ["", ("Mappings checked against losscc (float64, ordinary points: max relative difference "
                 "of each output, and the value's max absolute difference; the value's bound in brackets):")]
    for m in maps:
        if m.truth:
            continue
        v = verification[m.row]
        flag = "ok" if v.get("value", math.inf) <= m.verify_rtol else "MISMATCH"
        text.append(f"- {m.row}: {flag} [{m.verify_rtol:g}]; " + ", ".join(f"{k} {x:.1e}" for k, x in v.items()))
    text += ["", "Details:", "", details(results), "", f"[{seconds:.1f} s]"]
    if args.json != "-":
        print("\n".join(text))
    if args.json:
        doc = json.dumps(to_json(results, verification, args, seconds), indent=1, default=str)
        if args.json == "-":
            print(doc)
        else:
            Path(args.json).write_text(doc + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
