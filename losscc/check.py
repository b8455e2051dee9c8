"""`losscc check`: prove a built loss's numbers.

For every loss and dtype it reports
- the spec's examples (pass/fail),
- finite differences of the float64 kernel's value against its gradient (and of its gradient
  against its second derivative) at in-domain points away from kinks,
- accuracy: the error in ulps of the true result of the value and every gradient (and second
  derivative) against the written formula in interval arithmetic (truth.py), over inputs
  swept across the whole float range of the dtype: log-uniform magnitudes of both signs from
  the smallest normal to the largest float, typical magnitudes, inputs close to each other
  (where differences cancel), near the parameters (kinks), special values, and the spec's
  examples. Each input is drawn from its domain (the spec's `domain:`).

A loss passes when every example holds, every finite difference agrees, and no output is off
by more than its bound (4 ulps unless the spec declares a looser one with a reason). A
non-finite result where the true one is finite counts as an infinite error.

The float32 truth is the formula at the float32 inputs (what the kernel is given) and at the
parameters as given (float64: kernels compute in double), so errors are the kernel's own, not
the rounding of its inputs.
"""

from __future__ import annotations

import functools
import json
import math
import time
from dataclasses import dataclass, field

import mpmath
import numpy as np

from .build import build
from .ir import Domain
from .runtime import load_module
from .spec import load_spec, spec_files
from .truth import compile_interval, condition, elementwise_outputs, resolve, row_outputs

DTYPES = (np.float64, np.float32)
PRECISION = {np.float64: (53, -1074), np.float32: (24, -149)}  # (mantissa bits, log2 of the smallest ulp)
# The examples' tolerance (relative, absolute). Every example's terms are O(1), and some
# cancel: the Poisson rate gradient 1 - 2/(2 + 1e-8) = 5e-9 is 4.99999997e-9 in float64 (the
# division rounds at the 1e-16 level of its O(1) result) and exactly 0 in float32. So the
# comparison is relative (1e-12 in float64; 8 eps32 in float32, where inputs such as 0.3 are
# rounded too) plus an absolute 8 eps of the dtype, i.e. a few ulps of the O(1) terms.
EXAMPLE_TOL = {np.float64: (1e-12, 8 * 2.0**-52), np.float32: (8 * 2.0**-23, 8 * 2.0**-23)}
ROW_CLASSES = (2, 3, 6)  # class counts the row-loss sweep uses
FD_POINTS = 64
FD_TOL = 1e-6  # relative agreement of central differences (step 1e-6) beyond their rounding noise


# --------------------------------------------------------------------------- report types


@dataclass
class Accuracy:
    """Errors of one output (value, d/dpred, ...) of one loss in one dtype, in ulps."""

    output: str
    dtype: str
    errors: list = field(default_factory=list)
    worst: dict | None = None
    unresolved: int = 0  # points whose truth could not be settled (not counted)
    kinks: int = 0  # points within rounding of a branch boundary where the kernel took the other side
    conditioned: int = 0  # points within the bound only in ulps of the formula's conditioning

    @property
    def max(self) -> float:
        return max(self.errors) if self.errors else 0.0

    @property
    def median(self) -> float:
        return float(np.median(self.errors)) if self.errors else 0.0

    def is_worst(self, err: float) -> bool:
        return not self.errors or err > self.max

    def add(self, err: float, worst: dict | None):
        """Record an error; `worst` describes the point (given when is_worst(err))."""
        if worst is not None:
            self.worst = dict(worst, ulps=err)
        self.errors.append(err)


@dataclass
class LossCheck:
    name: str
    path: str
    bound: float
    reason: str
    conditioned: bool = False  # the bound is in ulps of max(|f|, sum |x_i df/dx_i|) ...
    conditioned_when: tuple = ()  # ... where the variants take these values (empty: everywhere)
    examples: list = field(default_factory=list)  # (where, dtype, ok, message)
    fd: list = field(default_factory=list)  # (output, max error, points, skipped, ok)
    accuracy: dict = field(default_factory=dict)  # (dtype, output) -> Accuracy
    seconds: float = 0.0

    @property
    def failures(self) -> list:
        out = [f"example at {w} ({d}): {m}" for w, d, ok, m in self.examples if not ok]
        out += [f"finite differences of {o}: error {e:.3g} at {n} points" for o, e, n, _, ok in self.fd if not ok]
        for (dtype, output), acc in self.accuracy.items():
            if acc.max > self.bound:
                out.append(f"{output} ({dtype}): {_fmt(acc.max)} ulps > {self.bound:g} at {_where(acc.worst)}")
        return out

    @property
    def ok(self) -> bool:
        return not self.failures

    def to_json(self) -> dict:
        return {
            "name": self.name, "spec": self.path, "bound_ulps": self.bound,
            "bound_conditioned": self.conditioned,
            "bound_conditioned_when": {k: v for k, v in self.conditioned_when},
            "bound_reason": self.reason,
            "ok": self.ok, "failures": self.failures, "seconds": round(self.seconds, 2),
            "examples": [{"where": w, "dtype": d, "ok": ok, "message": m} for w, d, ok, m in self.examples],
            "finite_differences": [{"output": o, "max_error": e, "points": n, "skipped": s, "ok": ok}
                                   for o, e, n, s, ok in self.fd],
            "accuracy": [{"dtype": a.dtype, "output": a.output, "max_ulps": _json_num(a.max),
                          "median_ulps": _json_num(a.median), "points": len(a.errors),
                          "unresolved": a.unresolved, "kinks": a.kinks, "conditioned": a.conditioned,
                          "worst": {k: _json_num(v) if isinstance(v, float) else v
                                    for k, v in (a.worst or {}).items()}}
                         for a in self.accuracy.values()],
        }


def _json_num(x: float):
    return x if math.isfinite(x) else str(x)


def _fmt(x: float) -> str:
    if not math.isfinite(x):
        return "inf"
    return f"{x:.3g}" if x < 100 else f"{x:.3e}"


def _where(w) -> str:
    if not w:
        return "?"
    parts = [f"{k}={v}" for k, v in w.items() if k not in ("ulps",)]
    return "{" + ", ".join(parts) + "}"


# --------------------------------------------------------------------------- entry point


def check(paths, samples: int = 400, seed: int = 0, out="build", log=print) -> list[LossCheck]:
    """Build (incrementally, into out/losscc_check) and check every spec under `paths`."""
    specs = [load_spec(f) for f in spec_files(paths)]
    report = build(paths, out=out, name="losscc_check", log=lambda *a: None)
    module = load_module(report.path)
    results = []
    for spec in specs:
        t0 = time.perf_counter()
        cls = module.LOSSES[spec.name]
        result = LossCheck(spec.name, spec.path, spec.accuracy, spec.accuracy_reason,
                           spec.accuracy_conditioned, spec.accuracy_conditioned_when)
        fd_rng, sweep_rng, plain_rng = streams(spec, seed)
        _examples(cls, result)
        _finite_differences(spec, cls, result, fd_rng)
        _accuracy(spec, cls, result, sweep(spec, cls, samples, sweep_rng, plain_rng))
        result.seconds = time.perf_counter() - t0
        log(format_loss(result))
        results.append(result)
    return results


# --------------------------------------------------------------------------- examples


def _examples(cls, result: LossCheck):
    for ex in cls._meta["examples"]:
        for dtype in DTYPES:
            loss = cls(**ex["options"])
            kinds = cls._meta["kernels"][_variant_key(cls, ex["options"])]["kinds"]
            inputs = {k: _example_array(v, dtype, kinds.get(k)) for k, v in ex["inputs"].items()}
            value, grad = loss.value_and_grad(**inputs)
            grad = grad[0] if isinstance(grad, tuple) else grad
            rtol, atol = EXAMPLE_TOL[dtype]
            msgs = []
            if not _close(value.ravel()[0], ex["loss"], rtol, atol):
                msgs.append(f"loss {value.ravel()[0]!r}, expected {ex['loss']!r}")
            if ex["grad"] is not None:
                want = np.atleast_1d(np.asarray(ex["grad"], dtype=float))
                got = grad.ravel()
                if got.shape != want.shape or not all(_close(a, b, rtol, atol) for a, b in zip(got, want)):
                    msgs.append(f"gradient {got.tolist()}, expected {want.tolist()}")
            result.examples.append((ex["where"], np.dtype(dtype).name, not msgs, "; ".join(msgs)))


def _example_array(v, dtype, kind):
    if kind == "index":
        return np.array([int(v)])
    return np.array([v], dtype=dtype)


def _close(a, b, rtol, atol) -> bool:
    return bool(abs(float(a) - b) <= rtol * abs(b) + atol)


def _variant_key(cls, options: dict) -> str:
    full = {v["name"]: options.get(v["name"], v["default"]) for v in cls._meta["variants"]}
    for key, k in cls._meta["kernels"].items():
        if k["options"] == full:
            return key
    raise KeyError(options)  # pragma: no cover


# --------------------------------------------------------------------------- sampling


def _magnitudes(n, dtype, rng, spread="mixed"):
    """Non-negative magnitudes: log-uniform over the whole normal range, typical ones
    (1e-4 .. 1e4), special values, and exact zeros."""
    info = np.finfo(dtype)
    lo, hi = math.log10(info.smallest_normal), math.log10(info.max)
    full = 10.0 ** rng.uniform(lo, hi, n)
    typical = 10.0 ** rng.uniform(-4, 4, n)
    exp_limit = math.log(info.max)
    special = np.array([0.0, 0.5, 1.0, 2.0, 3.0, 30.0, 1e4, exp_limit, exp_limit + 1, 2 * exp_limit,
                        float(info.smallest_normal), float(info.max), float(info.max) / 2])
    pick = rng.uniform(size=n)
    out = np.where(pick < 0.35, full, typical)
    out = np.where(pick > 0.92, rng.choice(special, n), out)
    with np.errstate(over="ignore"):
        return out.astype(dtype)


def _draw(domain: Domain, n, dtype, rng):
    """n values of `domain` in `dtype`."""
    if domain.values:
        return rng.choice(np.array(domain.values), n).astype(dtype)
    lo, hi = domain.lo, domain.hi
    info = np.finfo(dtype)
    if math.isfinite(lo) and math.isfinite(hi):
        width = hi - lo
        near = width * 10.0 ** rng.uniform(-12, 0, n)
        pick = rng.uniform(size=n)
        out = np.where(pick < 0.4, rng.uniform(lo, hi, n), np.where(pick < 0.7, lo + near, hi - near))
        ends = [x for x, open_ in ((lo, domain.lo_open), (hi, domain.hi_open)) if not open_]
        if ends:
            out = np.where(rng.uniform(size=n) < 0.1, rng.choice(ends, n), out)
        out = np.clip(out, lo, hi).astype(dtype)
    elif math.isfinite(lo):
        out = np.clip(lo + _magnitudes(n, np.float64, rng), -info.max, info.max).astype(dtype)
    elif math.isfinite(hi):
        out = np.clip(hi - _magnitudes(n, np.float64, rng), -info.max, info.max).astype(dtype)
    else:
        out = _magnitudes(n, dtype, rng) * rng.choice(np.array([-1, 1], dtype=dtype), n)
    with np.errstate(over="ignore"):
        out = np.clip(out, -info.max, info.max).astype(dtype)
    bad = ~np.array([domain.contains(float(x)) for x in out], dtype=bool)
    if bad.any():  # rounding to the dtype left the domain (an open end): nudge inward
        out[bad] = np.array([_inside(domain, float(x), dtype) for x in out[bad]], dtype=dtype)
    return out


def _inside(domain, x, dtype):
    t = np.dtype(dtype).type
    if domain.lo_open and x <= domain.lo:
        return np.nextafter(t(domain.lo), t(np.inf))
    if domain.hi_open and x >= domain.hi:
        return np.nextafter(t(domain.hi), t(-np.inf))
    return t(min(max(x, domain.lo), domain.hi))


def _near(base, domain, dtype, rng, fallback):
    """Values close to `base` (relative distance 1e-12 .. 1e-1, either side): where a
    difference of the two cancels. Where that leaves `domain` (or overflows), `fallback`."""
    n = base.shape
    delta = 10.0 ** rng.uniform(-12, -1, n) * rng.choice([-1.0, 1.0], n)
    with np.errstate(over="ignore", invalid="ignore"):
        out = (base.astype(np.float64) * (1 + delta)).astype(dtype)
    ok = np.isfinite(out) & np.array([domain.contains(float(x)) for x in np.ravel(out)]).reshape(n)
    return np.where(ok, out, fallback)


def _params(spec, rng, settings=3) -> list[dict]:
    """The default parameters, then random in-bounds settings (ignore params stay default)."""
    ignored = {i.ignore for i in spec.inputs if i.ignore}
    out = [{p.name: p.default for p in spec.params}]
    for _ in range(settings - 1):
        s = {}
        for p in spec.params:
            if p.name in ignored:
                s[p.name] = p.default
                continue
            lo = p.min if p.min is not None else p.gt
            hi = p.max if p.max is not None else p.lt
            if lo is not None and hi is not None:
                v = rng.uniform(lo, hi)
            elif lo is not None:
                v = lo + 10.0 ** rng.uniform(-6, 2)
            elif hi is not None:
                v = hi - 10.0 ** rng.uniform(-6, 2)
            else:
                v = float(rng.choice([-1, 1])) * 10.0 ** rng.uniform(-3, 2)
            s[p.name] = v
        out.append(s)
    return out


def _elementwise_points(spec, options, dtype, n, rng, params):
    """{input: array (n,)} drawn from the domains, some inputs close to the prediction, and the
    prediction close to +-each parameter for a few points (kinks sit there)."""
    arrays = {}
    first = None
    for inp in spec.inputs:
        domain = inp.domain_for(options)
        x = _draw(domain, n, dtype, rng)
        if first is None:
            first = (x, domain)
        elif not domain.values:
            x = np.where(rng.uniform(size=n) < 0.3, _near(first[0], domain, dtype, rng, x), x)
        arrays[inp.name] = x
    pred, pred_domain = first
    for v in params.values():
        with np.errstate(over="ignore"):
            target = (np.full(n, v) * rng.choice([-1.0, 1.0], n)).astype(dtype)
        pred = np.where(rng.uniform(size=n) < 0.05, _near(target, pred_domain, dtype, rng, pred), pred)
    arrays[spec.pred.name] = pred
    return arrays


def _row_points(spec, options, kinds, dtype, n, C, rng):
    """{input: array} for n rows of C classes: typical, shifted, confident, full-range and
    near-another-row rows; class indices uniform."""
    arrays = {}
    labels = rng.integers(0, C, n)
    first = None
    for inp in spec.inputs:
        kind = kinds[inp.name]
        domain = inp.domain_for(options)
        if kind == "index":
            arrays[inp.name] = labels.copy()
            continue
        if kind == "scalar":
            arrays[inp.name] = _draw(domain, n, dtype, rng)
            continue
        if domain.simplex:
            rows = _simplex(n, C, rng)
        elif domain.values or (math.isfinite(domain.lo) and math.isfinite(domain.hi)) \
                or not (math.isinf(domain.lo) and math.isinf(domain.hi)):
            rows = _draw(domain, n * C, dtype, rng).reshape(n, C)  # in dtype: stays inside
        else:
            rows = _real_rows(n, C, labels, rng, dtype)
            if first is not None:
                near = _near(first, domain, np.float64, rng, rows)
                rows = np.where(rng.uniform(size=(n, 1)) < 0.3, near, rows)
        with np.errstate(over="ignore"):
            rows = np.clip(rows, -np.finfo(dtype).max, np.finfo(dtype).max).astype(dtype)
        if first is None:
            first = rows.astype(np.float64)
        arrays[inp.name] = rows
    return arrays


def _real_rows(n, C, labels, rng, dtype):
    info = np.finfo(dtype)
    scale = 10.0 ** rng.uniform(-3, 3, (n, 1))
    rows = scale * rng.normal(size=(n, C))
    pick = rng.uniform(size=(n, 1))
    shift = rng.choice([-1.0, 1.0], (n, 1)) * 10.0 ** rng.uniform(0, math.log10(info.max) - 1, (n, 1))
    rows = np.where((pick >= 0.4) & (pick < 0.55), rows + shift, rows)
    confident = rows.copy()
    confident[np.arange(n), labels] += 10.0 ** rng.uniform(0, 4, n)
    rows = np.where((pick >= 0.55) & (pick < 0.7), confident, rows)
    full = _magnitudes(n * C, np.float64, rng).reshape(n, C) * rng.choice([-1.0, 1.0], (n, C))
    rows = np.where((pick >= 0.7) & (pick < 0.85), full, rows)
    equal = np.repeat(rows[:, :1], C, axis=1)
    return np.where(pick >= 0.95, equal, rows)


def _simplex(n, C, rng):
    alpha = 10.0 ** rng.uniform(-1, 1, (n, 1))
    rows = rng.gamma(np.broadcast_to(alpha, (n, C)))
    rows[rng.uniform(size=(n, C)) < 0.2] = 0.0
    onehot = np.zeros((n, C))
    onehot[np.arange(n), rng.integers(0, C, n)] = 1.0
    rows = np.where(rows.sum(axis=1, keepdims=True) == 0, onehot, rows)
    rows = np.where(rng.uniform(size=(n, 1)) < 0.15, onehot, rows)
    return rows / rows.sum(axis=1, keepdims=True)


# --------------------------------------------------------------------------- accuracy


def ulps(computed: float, true, dtype, scale=0) -> float:
    """|computed - true| in units of the last place of `true` in `dtype` (true is an mpf, maybe
    +-inf), or of `scale` where that is larger. A true value beyond the largest float rounds
    to +-inf: that result is exact. A non-finite result for a finite truth is an infinite
    error."""
    p, emin = PRECISION[dtype]
    info = np.finfo(dtype)
    with mpmath.workprec(80):  # max + half an ulp, exactly: where rounding goes to inf
        overflow = mpmath.mpf(float(info.max)) + mpmath.ldexp(1, int(info.maxexp) - p - 1)
        beyond = true >= overflow or true <= -overflow
    if mpmath.isinf(true) or beyond:
        return 0.0 if computed == (math.inf if true > 0 else -math.inf) else math.inf
    if not math.isfinite(computed):
        return math.inf
    size = max(abs(true), scale)
    if size == 0:
        e = emin
    else:
        _, exponent = mpmath.frexp(size)
        e = max(int(exponent) - p, emin)
    return float(abs(mpmath.mpf(computed) - true) / mpmath.ldexp(1, e))


def _error(got: float, truth, dtype, stat, cond=None) -> float:
    """The error in ulps; at a fragile branch decision (truth.alt) the better of the two sides,
    counted in stat.kinks when the other side was the closer one. With `cond` (a conditioned
    bound, _Conditioning) an error beyond the bound is measured again in ulps of the formula's
    conditioning at the point, counted in stat.conditioned when that is what passes it."""
    err = ulps(got, truth.value, dtype)
    sides = [truth.value]
    if truth.alt is not None and not mpmath.isnan(truth.alt):
        sides.append(truth.alt)
        other = ulps(got, truth.alt, dtype)
        if other < err:
            stat.kinks += 1
            err = other
    if cond is not None and err > cond.bound:
        scale = cond()
        if mpmath.isfinite(scale):
            relative = min(ulps(got, t, dtype, scale) for t in sides)
            if relative < err:
                stat.conditioned += relative <= cond.bound
                err = relative
    return err


class _Conditioning:
    """The conditioning of one output at one point (truth.condition over the real-valued
    arguments), computed once and only if asked."""

    def __init__(self, fn, point, vary, bound, dtype):
        self.fn, self.point, self.vary, self.bound = fn, point, vary, bound
        self.rounding = 2.0 ** -PRECISION[dtype][0]  # the unit roundoff of the inputs
        self.scale = None

    def __call__(self):
        if self.scale is None:
            self.scale = condition(self.fn, self.point, self.vary, self.rounding)
        return self.scale


def _varying(spec, options, args) -> tuple:
    """Indices of the arguments that carry rounding: every parameter, and every input but
    those whose domain is a finite set (labels in {-1, 1}); row elements are `name__j`."""
    discrete = {i.name for i in spec.inputs if i.domain_for(options).values}
    # a row element is `name__j`; a scalar input's symbol is spelled x_name (expr.symbols_for)
    names = [a.name.split("__")[0] if "__" in a.name else a.name.removeprefix("x_") for a in args]
    return tuple(n for n, name in enumerate(names) if name not in discrete)


def _slack(dtype) -> float:
    """How close two compared values must be for a kernel's rounding to decide it either way."""
    return 2.0 ** (3 - PRECISION[dtype][0])


def streams(spec, seed: int) -> tuple:
    """One spec's independent random streams: (finite differences, accuracy sweep, the
    sweep's points without optional inputs). Each its own, so that adding to one part of the
    check leaves the points of the others as they were."""
    seq = np.random.SeedSequence([seed, *spec.name.encode()])
    return tuple(np.random.default_rng(child) for child in seq.spawn(3))


@dataclass
class Batch:
    """n points the accuracy check measures a loss on, of one variant, dtype and parameter
    setting: rows of C classes, or elements (C is None). `arrays` holds every input, absent
    optional ones at their default; the loss is called without the `absent` ones (a row
    loss then runs its plain kernel: codegen, SymbolicVariant.plain)."""

    options: dict
    kinds: dict
    dtype: type
    params: dict
    arrays: dict
    n: int
    C: int | None = None
    absent: tuple = ()

    @property
    def given(self) -> dict:
        return {k: v for k, v in self.arrays.items() if k not in self.absent}


def sweep(spec, cls, samples: int, rng, plain_rng=None):
    """Every Batch of the accuracy sweep, in order: each variant, dtype and parameter setting
    (samples points per variant and dtype; rows split over ROW_CLASSES; a row loss with
    plain kernels as many again at the default params without its optional inputs, drawn
    from plain_rng), then the spec's examples in each dtype."""
    for options in spec.variant_combos():
        kinds = cls._meta["kernels"][_variant_key(cls, options)]["kinds"]
        for dtype in DTYPES:
            settings = _params(spec, rng)
            for s_index, params in enumerate(settings):
                n = samples // 2 if s_index == 0 else samples // (2 * (len(settings) - 1))
                if spec.is_row:
                    for C in ROW_CLASSES:
                        m = max(n // len(ROW_CLASSES), 1)
                        arrays = _row_points(spec, options, kinds, dtype, m, C, rng)
                        yield _batch(spec, options, kinds, dtype, params, arrays, m, C)
                    # at the default params, as many points again without the optional inputs
                    absent = plain_inputs(cls, options) if s_index == 0 and plain_rng else ()
                    for C in ROW_CLASSES if absent else ():
                        m = max(n // len(ROW_CLASSES), 1)
                        arrays = _row_points(spec, options, kinds, dtype, m, C, plain_rng)
                        arrays = {k: v for k, v in arrays.items() if k not in absent}
                        yield _batch(spec, options, kinds, dtype, params, arrays, m, C, absent)
                else:
                    arrays = _elementwise_points(spec, options, dtype, n, rng, params)
                    yield _batch(spec, options, kinds, dtype, params, arrays, n, None)
    for dtype in DTYPES:
        for ex in cls._meta["examples"]:
            options = {v.name: ex["options"].get(v.name, v.default) for v in spec.variants}
            params = {p.name: ex["options"].get(p.name, p.default) for p in spec.params}
            kinds = cls._meta["kernels"][_variant_key(cls, options)]["kinds"]
            arrays = {k: _example_array(v, dtype, kinds.get(k)) for k, v in ex["inputs"].items()}
            C = None
            if spec.is_row:
                C = max(len(v) for v in ex["inputs"].values() if isinstance(v, (list, tuple)))
            absent = tuple(i.name for i in spec.inputs if i.default is not None and i.name not in arrays)
            yield _batch(spec, options, kinds, dtype, params, arrays, 1, C, absent)


def plain_inputs(cls, options: dict) -> tuple:
    """The optional inputs a row loss's plain kernel leaves out, for this variant (() if it
    has none)."""
    plain = cls._meta["kernels"][_variant_key(cls, options)].get("plain")
    return tuple(plain["absent"]) if plain else ()


def _batch(spec, options, kinds, dtype, params, arrays, n, C, absent=()) -> Batch:
    full = {}
    for i in spec.inputs:
        if i.name in arrays:
            full[i.name] = arrays[i.name]
        elif C is not None and kinds[i.name] == "row":
            full[i.name] = np.full((n, C), i.default, dtype=dtype)
        else:
            full[i.name] = np.full(n, i.default, dtype=dtype)
    return Batch(options, kinds, dtype, params, full, n, C, absent)


def truth_point(spec, batch: Batch, k: int, params: dict) -> tuple:
    """(arguments of the compiled truth at point k of batch, class permutation). A row's truth
    is written with its label at class 0: its j-th class is the row's class perm[j]. The
    parameters are exact (float64) in every dtype: kernels compute in double."""
    a = batch.arrays
    if batch.C is None:
        point = [float(a[i.name][k]) for i in spec.inputs]
        perm = None
    else:
        index = next((i.name for i in spec.inputs if batch.kinds[i.name] == "index"), None)
        label = int(a[index][k]) if index else 0
        perm = [label] + [j for j in range(batch.C) if j != label]
        point = []
        for i in spec.inputs:
            if batch.kinds[i.name] == "row":
                point += [float(a[i.name][k][j]) for j in perm]
            elif batch.kinds[i.name] == "scalar":
                point.append(float(a[i.name][k]))
    return point + [float(params[p.name]) for p in spec.params], perm


def wrt_measured(spec, kinds) -> list:
    """The inputs whose gradients are measured: the differentiable ones (rows: row inputs)."""
    return [i.name for i in spec.differentiable if kinds.get(i.name, "row") == "row"]


def _accuracy(spec, cls, result: LossCheck, batches):
    for batch in batches:
        if batch.C is None:
            _measure_elementwise(spec, cls, result, batch)
        else:
            _measure_rows(spec, cls, result, batch)


_TRUTH_CACHE: dict = {}


def _compiled(spec, options, C=None, kinds=None, wrt=()):
    key = (spec.source_hash, spec.path, tuple(sorted(options.items())), C, tuple(wrt))
    if key not in _TRUTH_CACHE:
        if C is None:
            outs = elementwise_outputs(spec, options)
        else:
            outs = row_outputs(spec, options, C, kinds, wrt)
        _TRUTH_CACHE[key] = (outs.args, {k: compile_interval(e, outs.args) for k, e in outs.exprs.items()})
    return _TRUTH_CACHE[key]


def _stat(result, dtype, output) -> Accuracy:
    name = np.dtype(dtype).name
    return result.accuracy.setdefault((name, output), Accuracy(output, name))


def _measure_elementwise(spec, cls, result, batch: Batch):
    options, dtype, params, inputs = batch.options, batch.dtype, batch.params, batch.arrays
    loss = cls(**options, **params)
    wrt = tuple(i.name for i in spec.differentiable)
    with np.errstate(all="ignore"):
        value, grads = loss.value_and_grad(**batch.given, wrt=wrt)
        value_only = loss(**batch.given)
        grad_h, hess = loss.grad_hess(**batch.given)
    grads = grads if isinstance(grads, tuple) else (grads,)
    # each output from every kernel that computes it: v, vg and vgh
    computed = {"value": [value, value_only]}
    for name, g in zip(wrt, grads):
        computed[f"d/d{name}"] = [g]
    computed[f"d/d{spec.pred.name}"].append(grad_h)
    computed[f"d2/d{spec.pred.name}2"] = [hess]
    args, fns = _compiled(spec, options)
    vary = _varying(spec, options, args)
    limit = float(np.finfo(dtype).max)
    for k in range(batch.n):
        point, _ = truth_point(spec, batch, k, params)
        for output, fn in fns.items():
            truth = resolve(fn, point, limit, _slack(dtype))
            stat = _stat(result, dtype, output)
            if mpmath.isnan(truth.value):
                stat.unresolved += truth.unresolved
                continue
            cond = _Conditioning(fn, point, vary, result.bound, dtype) if spec.conditioned_for(options) else None
            for array in computed[output]:  # every kernel that computes this output
                got = float(array[k])
                err = _error(got, truth, dtype, stat, cond)
                stat.add(err, {"variant": options, "params": params,
                               "inputs": {i.name: float(inputs[i.name][k]) for i in spec.inputs},
                               "computed": got, "true": mpmath.nstr(truth.value, 17)}
                         if stat.is_worst(err) else None)


def _measure_rows(spec, cls, result, batch: Batch):
    options, dtype, params, inputs = batch.options, batch.dtype, batch.params, batch.arrays
    wrt = wrt_measured(spec, batch.kinds)
    loss = cls(**options, **params)
    with np.errstate(all="ignore"):
        value, grads = loss.value_and_grad(**batch.given, wrt=tuple(wrt))
        value_only = loss(**batch.given)
    grads = grads if isinstance(grads, tuple) else (grads,)
    args, fns = _compiled(spec, options, batch.C, batch.kinds, wrt)
    vary = _varying(spec, options, args)
    limit = float(np.finfo(dtype).max)
    for k in range(batch.n):
        point, perm = truth_point(spec, batch, k, params)
        where = {"variant": options, "params": params,
                 "inputs": {i.name: inputs[i.name][k].tolist() for i in spec.inputs}}
        for output, fn in fns.items():
            truth = resolve(fn, point, limit, _slack(dtype))
            group = output.split("[")[0]
            stat = _stat(result, dtype, group)
            if mpmath.isnan(truth.value):
                stat.unresolved += truth.unresolved
                continue
            cond = _Conditioning(fn, point, vary, result.bound, dtype) if spec.conditioned_for(options) else None
            if output == "value":
                got = float(value[k])
                err = _error(float(value_only[k]), truth, dtype, stat, cond)
                stat.add(err, dict(where, output="value (v kernel)", computed=float(value_only[k]),
                                   true=mpmath.nstr(truth.value, 17)) if stat.is_worst(err) else None)
            else:
                name, j = output[3:].split("[")
                got = float(grads[wrt.index(name)][k][perm[int(j[:-1])]])
            err = _error(got, truth, dtype, stat, cond)
            stat.add(err, dict(where, output=output, computed=got, true=mpmath.nstr(truth.value, 17))
                     if stat.is_worst(err) else None)


# --------------------------------------------------------------------------- finite differences


def _finite_differences(spec, cls, result: LossCheck, rng):
    """Central differences of the float64 kernel at typical in-domain points: the value
    against each gradient, and (elementwise) the gradient against the second derivative.
    Points where the one-sided slopes disagree (a kink within the step) are skipped."""
    for options in spec.variant_combos():
        key = _variant_key(cls, options)
        kinds = cls._meta["kernels"][key]["kinds"]
        params = {p.name: p.default for p in spec.params}
        loss = cls(**options, **params)
        if spec.is_row:
            C = 4
            arrays = _fd_rows(spec, options, kinds, C, rng)
            wrt = tuple(i.name for i in spec.differentiable if kinds[i.name] == "row")
            for name in wrt:
                f = functools.partial(_call_with, loss, arrays, name)
                g = loss.value_and_grad(**arrays, wrt=(name,))[1]
                _fd_compare(result, f"d/d{name}", f, arrays[name], g, next(i for i in spec.inputs if i.name == name).domain_for(options))
        else:
            arrays = _fd_points(spec, options, rng)
            grads = loss.value_and_grad(**arrays, wrt=tuple(i.name for i in spec.differentiable))[1]
            grads = grads if isinstance(grads, tuple) else (grads,)
            for inp, g in zip(spec.differentiable, grads):
                f = functools.partial(_call_with, loss, arrays, inp.name)
                _fd_compare(result, f"d/d{inp.name}", f, arrays[inp.name], g, inp.domain_for(options))
            pred = spec.pred.name
            _, hess = loss.grad_hess(**arrays)

            gfun = functools.partial(_call_with, loss.grad_hess, arrays, pred, first=True)
            _fd_compare(result, f"d2/d{pred}2", gfun, arrays[pred], hess, spec.pred.domain_for(options))


def _call_with(fn, arrays, name, x, first=False):
    """fn(**arrays) with arrays[name] replaced by x (its first result if `first`)."""
    out = fn(**{**arrays, name: x})
    return out[0] if first else out


def _fd_points(spec, options, rng):
    out = {}
    for inp in spec.inputs:
        d = inp.domain_for(options)
        out[inp.name] = _typical(d, FD_POINTS, rng)
    return out


def _typical(d: Domain, n, rng, shape=None):
    shape = shape or (n,)
    if d.values:
        return rng.choice(np.array(d.values), shape)
    if d.simplex:
        return _simplex(shape[0], shape[1], rng)
    if math.isfinite(d.lo) and math.isfinite(d.hi):
        lo, hi = d.lo, d.hi
    elif math.isfinite(d.lo):
        lo, hi = d.lo, d.lo + 6.0
    elif math.isfinite(d.hi):
        lo, hi = d.hi - 6.0, d.hi
    else:
        lo, hi = -3.0, 3.0
    return rng.uniform(lo + 0.01 * (hi - lo), hi - 0.01 * (hi - lo), shape)


def _fd_rows(spec, options, kinds, C, rng):
    out = {}
    for inp in spec.inputs:
        d = inp.domain_for(options)
        if kinds[inp.name] == "index":
            out[inp.name] = rng.integers(0, C, FD_POINTS)
        elif kinds[inp.name] == "row":
            out[inp.name] = _typical(d, FD_POINTS, rng, (FD_POINTS, C))
        else:
            out[inp.name] = _typical(d, FD_POINTS, rng)
    return out


def _fd_compare(result, output, f, x, g, domain):
    """Compare g with central differences of f, one element of x at a time (elementwise
    losses: every point at once, as each element only moves its own loss)."""
    x = np.asarray(x, dtype=np.float64)
    flat = x.reshape(len(x), -1)
    worst, checked, skipped = 0.0, 0, 0
    bad = np.zeros(len(x), dtype=bool)
    g = np.asarray(g, dtype=np.float64).reshape(flat.shape)
    for j in range(flat.shape[1]):
        h = 1e-6 * np.maximum(1.0, np.abs(flat[:, j]))
        plus, minus = flat.copy(), flat.copy()
        plus[:, j] += h
        minus[:, j] -= h
        f0 = np.asarray(f(x), dtype=np.float64).reshape(len(x), -1)
        fp = np.asarray(f(plus.reshape(x.shape)), dtype=np.float64).reshape(len(x), -1)
        fm = np.asarray(f(minus.reshape(x.shape)), dtype=np.float64).reshape(len(x), -1)
        col = j if fp.shape[1] > 1 else 0
        fp, fm, f0 = fp[:, col], fm[:, col], f0[:, col]
        central = (fp - fm) / (2 * h)
        forward, backward = (fp - f0) / h, (f0 - fm) / h
        # the rounding of f, amplified by 1/h: what central differences cannot resolve
        noise = 16 * 2.0**-52 * (np.abs(fp) + np.abs(fm) + np.abs(f0)) / h
        scale = np.maximum(np.abs(central), np.abs(g[:, j]))
        kink = np.abs(forward - backward) > 1e-3 * scale + noise
        inside = np.array([domain.contains(a) and domain.contains(b)
                           for a, b in zip(plus[:, j], minus[:, j])])
        use = ~kink & inside
        diff = np.abs(central - g[:, j])
        err = np.maximum(diff - noise, 0.0) / np.maximum(scale, 1e-300)
        bad |= use & ~(diff <= FD_TOL * scale + noise)  # NaN anywhere is bad too
        if use.any():
            worst = max(worst, float(err[use].max()))
        checked += int(use.sum())
        skipped += int((~use).sum())
    result.fd.append((output, worst, checked, skipped, not bad.any()))


# --------------------------------------------------------------------------- text report


def format_loss(r: LossCheck) -> str:
    status = "ok" if r.ok else "FAILED"
    ex_ok = sum(1 for *_, ok, _ in r.examples if ok)
    lines = [f"{r.name}  ({r.path})  {status}  [{r.seconds:.1f} s]",
             f"  examples: {ex_ok}/{len(r.examples)} pass"]
    fd = ", ".join(f"{o} {e:.1e} ({n} pts)" for o, e, n, _, _ in r.fd)
    lines.append(f"  finite differences (float64, max relative error beyond rounding): {fd}")
    bound = f"bound {r.bound:g} ulps" + (f" ({r.reason})" if r.reason else "")
    of = "the true result"
    if r.conditioned:
        where = " where " + ", ".join(f"{k}={v}" for k, v in r.conditioned_when) if r.conditioned_when else ""
        of = f"max(|true result|, its conditioning sum |x df/dx|){where}"
    lines.append(f"  accuracy, ulps of {of}, max / median ({bound}):")
    outputs = list(dict.fromkeys(a.output for a in r.accuracy.values()))
    for output in outputs:
        cells = []
        for dtype in ("float64", "float32"):
            a = r.accuracy.get((dtype, output))
            cells.append(f"{dtype} {_fmt(a.max)} / {_fmt(a.median)} ({len(a.errors)})" if a else f"{dtype} -")
        lines.append(f"    {output:<16} " + "   ".join(cells))
    kinks = sum(a.kinks for a in r.accuracy.values())
    unresolved = sum(a.unresolved for a in r.accuracy.values())
    if kinks or unresolved:
        lines.append(f"  {kinks} results within rounding of a kink matched its other side; "
                     f"{unresolved} truths never resolved (not counted)")
    conditioned = sum(a.conditioned for a in r.accuracy.values())
    if conditioned:
        lines.append(f"  {conditioned} results were within the bound only in ulps of the conditioning")
    for failure in r.failures:
        lines.append(f"  FAIL {failure}")
    return "\n".join(lines)


def summary_table(results) -> str:
    """One line per loss: max ulps of the value and of the worst gradient, both dtypes."""
    head = f"{'loss':<24}{'f64 value':>11}{'f64 grad':>11}{'f32 value':>11}{'f32 grad':>11}{'bound':>7}  status"
    lines = [head]
    for r in results:
        cells = []
        for dtype in ("float64", "float32"):
            v = max((a.max for (d, o), a in r.accuracy.items() if d == dtype and o == "value"), default=0.0)
            g = max((a.max for (d, o), a in r.accuracy.items() if d == dtype and o != "value"), default=0.0)
            cells += [_fmt(v), _fmt(g)]
        bound = f"{r.bound:g}" + ("c" if r.conditioned else "")
        lines.append(f"{r.name:<24}" + "".join(f"{c:>11}" for c in cells) + f"{bound:>7}  "
                     + ("ok" if r.ok else "FAILED"))
    if any(r.conditioned for r in results):
        lines.append("c: in ulps of max(|true result|, sum over inputs x of |x df/dx|), the "
                     "error the formula's own conditioning allows (the spec says why)")
    return "\n".join(lines)


def to_json(results) -> str:
    return json.dumps({"ok": all(r.ok for r in results), "losses": [r.to_json() for r in results]},
                      indent=1, default=str)
