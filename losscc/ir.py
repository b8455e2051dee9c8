"""The plain data passed between stages, all on one page: LossSpec -> SymbolicLoss -> KernelSource.

Every dataclass is frozen; stages consume them and return new ones, never mutate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

# Version of the manifest.json a build writes for the runtime; bump it when its fields change.
MANIFEST_FORMAT = 2


def manifest_checksum(manifest: dict) -> str:
    """SHA-256 of a manifest's content without its own "checksum" field (load checks it)."""
    import hashlib
    import json

    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class Loc:
    """A position in a spec file, 1-based like compiler messages."""

    file: str
    line: int
    col: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


# --------------------------------------------------------------------------- spec stage


@dataclass(frozen=True)
class Domain:
    """Where an input's values live. Documented in docstrings, drawn from by `losscc check`,
    and not checked at run time: outside it a loss is its written formula (maybe NaN).

    Written as text in a spec: `real` (the default), an interval `[0, 1]`, `(0, inf)`,
    `[0, inf)`, a finite set `{-1, 1}`, or `simplex` (a row of non-negative values summing
    to 1: a probability distribution along the class axis).
    """

    text: str = "real"
    lo: float = -math.inf
    hi: float = math.inf
    lo_open: bool = True
    hi_open: bool = True
    values: tuple = ()  # a finite set, when not empty
    simplex: bool = False

    def contains(self, x: float) -> bool:
        if self.values:
            return x in self.values
        if self.simplex:
            return 0 <= x <= 1
        if math.isnan(x):
            return False
        above = x > self.lo if self.lo_open else x >= self.lo
        below = x < self.hi if self.hi_open else x <= self.hi
        return above and below and math.isfinite(x)


REAL = Domain()


@dataclass(frozen=True)
class InputSpec:
    """An array argument of the loss. The first input is the prediction."""

    name: str
    loc: Loc
    differentiable: bool = False
    # An optional call-time array (Gluon's pos_weight); absent means this constant.
    default: float | None = None
    doc: str = ""
    # Row losses: a vector along the class axis (like the prediction).
    row: bool = False
    # Row losses: holds integer classes into this row input where the formula indexes with
    # it (pred[label]); where it does not (a variant with dense labels) it is a row input.
    index_into: str | None = None
    ignore: str | None = None  # a param: rows whose class equals it give 0 loss, 0 gradient
    # Differentiable but computed only when asked for (value_and_grad(..., wrt=...)).
    optional_grad: bool = False
    domain: Domain = REAL
    # A domain that depends on a variant: (variant name, ((value, Domain), ...)).
    domain_by: tuple | None = None

    def domain_for(self, options: dict) -> Domain:
        """This input's domain in the variant combination `options`."""
        if self.domain_by is None:
            return self.domain
        variant, cases = self.domain_by
        return dict(cases)[options[variant]]

    def domain_text(self) -> str:
        """The domain as a docstring says it: '[0, 1]', or one per variant value."""
        if self.domain_by is None:
            return self.domain.text
        variant, cases = self.domain_by
        return "; ".join(f"{d.text} if {variant}={str(v).lower()}" for v, d in cases)


@dataclass(frozen=True)
class ParamSpec:
    """A numeric constructor argument, passed to the kernel at run time."""

    name: str
    loc: Loc
    default: float
    min: float | None = None  # inclusive bounds
    max: float | None = None
    gt: float | None = None  # exclusive bounds
    lt: float | None = None
    doc: str = ""


def bound_error(value: float, min=None, max=None, gt=None, lt=None) -> str | None:
    """Why `value` breaks a param's bounds, or None. Shared by the spec check and the runtime."""
    if min is not None and not value >= min:
        return f"must be >= {min:g}, got {value!r}"
    if max is not None and not value <= max:
        return f"must be <= {max:g}, got {value!r}"
    if gt is not None and not value > gt:
        return f"must be > {gt:g}, got {value!r}"
    if lt is not None and not value < lt:
        return f"must be < {lt:g}, got {value!r}"
    return None


def variant_key(options: dict) -> str:
    """A C-identifier suffix naming one variant combination: 'from_sigmoid_true', or 'base'."""
    if not options:
        return "base"
    return "__".join(f"{k}_{str(v).lower()}" for k, v in options.items())


@dataclass(frozen=True)
class VariantSpec:
    """A compile-time option (Gluon's from_sigmoid, label_format): one kernel per value."""

    name: str
    loc: Loc
    values: tuple  # of bool or str
    default: Any
    doc: str = ""


@dataclass(frozen=True)
class Formula:
    """A piece of spec math and where it is in the spec file."""

    text: str
    loc: Loc  # where its first character is
    # The file (line, col) of each character of `text`; None for whitespace.
    positions: tuple = ()

    def loc_of(self, index: int) -> Loc:
        """The location of text[index], or of the nearest character that has one."""
        pos = self.positions
        for i in [*range(index, len(pos)), *range(min(index, len(pos)) - 1, -1, -1)]:
            if pos[i] is not None:
                return Loc(self.loc.file, *pos[i])
        return self.loc


@dataclass(frozen=True)
class ExampleSpec:
    loc: Loc
    inputs: dict  # input name -> float
    options: dict  # param or variant name -> value
    loss: float
    grad: float | tuple | None = None  # d loss / d pred: a number, or a row for row losses


@dataclass(frozen=True)
class LossSpec:
    name: str
    path: str
    loc: Loc
    summary: str
    reference: str
    doc: str
    aliases: tuple
    inputs: tuple  # of InputSpec, prediction first
    params: tuple  # of ParamSpec
    variants: tuple  # of VariantSpec
    let: tuple  # of (name, Formula), in order
    loss: Formula
    examples: tuple  # of ExampleSpec
    source_hash: str  # sha256 of the spec file's bytes
    # Constructor arguments accepted by position, in order; the others are keyword-only.
    positional: tuple = ()
    alias_locs: tuple = ()  # of Loc, one per alias
    # Row losses: the default class axis (an int, or None: every non-batch axis is the row).
    axis: int | None = -1
    # The accuracy `losscc check` holds the kernels to, in ulps of the true result, and why
    # when it is looser than the default. Conditioned: in ulps of max(|f|, sum |x_i df/dx_i|)
    # instead, the error the formula's own conditioning allows (truth.condition).
    accuracy: float = 4.0
    accuracy_reason: str = ""
    accuracy_conditioned: bool = False
    # ... only where the variants take these values ((name, value), ...); empty: everywhere
    accuracy_conditioned_when: tuple = ()
    # `losscc plot`: ((input, value), ...), value a number, "x" (the element that varies) or a
    # tuple of them (a row); empty: the default (plot.default_inputs)
    plot: tuple = ()

    def plot_inputs(self) -> tuple:
        """`plot`, or the tutorial's default for an elementwise loss: the prediction varies,
        every other required input is 1 where its domain is bounded (a classification label)
        and 0 elsewhere (a regression target); () for a row loss without a plot section."""
        if self.plot or self.is_row:
            return self.plot
        defaults = {v.name: v.default for v in self.variants}
        out = [(self.pred.name, "x")]
        for i in self.inputs[1:]:
            if i.default is None:
                d = i.domain_for(defaults)
                bounded = bool(d.values) or d.simplex or (math.isfinite(d.lo) and math.isfinite(d.hi))
                out.append((i.name, 1.0 if bounded else 0.0))
        return tuple(out)

    def conditioned_for(self, options: dict) -> bool:
        """Is the accuracy bound conditioned in this variant combination?"""
        return self.accuracy_conditioned and all(options.get(k) == v for k, v in self.accuracy_conditioned_when)

    @property
    def is_row(self) -> bool:
        return any(i.row or i.index_into for i in self.inputs)

    @property
    def pred(self) -> InputSpec:
        return self.inputs[0]

    @property
    def differentiable(self) -> tuple:
        return tuple(i for i in self.inputs if i.differentiable)

    def variant_combos(self) -> list[dict]:
        """Every combination of variant values, in a stable order."""
        combos: list[dict] = [{}]
        for v in self.variants:
            combos = [dict(c, **{v.name: val}) for c in combos for val in v.values]
        return combos


# --------------------------------------------------------------------------- derive stage


@dataclass(frozen=True)
class SymbolicVariant:
    """One variant of a loss as sympy expressions (Any: sympy objects, to keep ir sympy-free)."""

    key: str  # a C-identifier suffix naming the variant combination
    options: dict  # variant name -> value
    value: Any  # the elementwise loss
    grads: tuple  # d value / d input, one per differentiable input
    hess: Any  # d^2 value / d pred^2 (None for row losses)
    notes: tuple = ()  # facts worth telling the user (a second derivative 0 almost everywhere)
    # What stabilize rewrote in the value and derivatives: (rule name, before, after) texts.
    rewrites: tuple = ()
    # Row losses: the lowered program (rows.RowProgram) and each input's kind in this
    # variant: 'row' (a vector along the class axis), 'index' (a class) or 'scalar' (per row).
    program: Any = None
    kinds: dict = field(default_factory=dict)
    # Row losses with optional inputs: this variant again with those inputs absent (their
    # default folded in) and the formula's params at their defaults, which the runtime calls
    # when the caller gives none of them: the class weights' sums and label smoothing's
    # pass drop out of softmax cross entropy, and no row of defaults is read per class.
    plain: Any = None
    absent: tuple = ()  # on a plain variant: the optional inputs it never reads
    fixed: dict = field(default_factory=dict)  # on a plain variant: param -> the value built in


@dataclass(frozen=True)
class SymbolicLoss:
    spec: LossSpec
    symbols: dict  # name -> sympy Symbol, inputs and params
    variants: tuple  # of SymbolicVariant


# --------------------------------------------------------------------------- codegen stage


@dataclass(frozen=True)
class KernelSource:
    """The C of one loss (every variant, mode and dtype) plus what the runtime must know."""

    name: str
    c_source: str
    cdef: str
    meta: dict = field(default_factory=dict)  # JSON-able description for the runtime
    # c_source cut per variant, one object file each (build.py compiles them in parallel)
    c_parts: tuple = ()
