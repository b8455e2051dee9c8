"""Row losses: reductions over the class axis as sympy nodes, and losscc's chain rule over them.

A row loss is a scalar expression of *row scalars*: reductions over the class axis
(`RowSum`, `RowMax`, `RowMin`, `LogSumExp`, `RowNorm`) of elementwise expressions, and gathers
`x[label]`. sympy takes every scalar derivative; the chain rule over the row scalars is
here (`derive_row`), and so is the plan of passes a kernel makes over each row.

Row rules, as `before -> after` (u, v, e, a, c elementwise expressions, k any factor):

  joining stabilize's "to-stable-nodes" phase (ROW_RULES), before lowering:
    log-of-product        log(exp(a) * b) -> a + log(b)   (every factor positive)
    log-sum-exp           log(sum(exp(e))) -> logsumexp(e)
    difference-of-squares k*sum(u**2) - k*sum(v**2) -> 2k*sum((u - v)*((u + v)/2))
                          (the product summed with a power-of-two scale: ScaledProduct)
    norm                  sqrt(sum(e**2)) -> norm(e)   (scaled: no overflow)
    normalized-sum        sum(a*c) / norm(a) -> sum((a / norm(a)) * c)
    cosine-distance       k - k*sum(ahat*bhat) -> k*sum((ahat - bhat)**2)/2
                          (ahat = a / norm(a), bhat = b / norm(b); also inside a where:
                          k - k*where(c, cos, e) -> where(c, k - k*cos, k - k*e))
    scaled-sum            k*sum(a*b) -> k*sum(ScaledProduct(a, b))   (k a row constant,
                          not +-1: the product k*sum is formed from the scaled sum, the
                          printer's scaled-factor lowering; also a*b*c..., and inside
                          where(c, 0, a*b): k*sum(where(c, 0, ScaledProduct(a, b))))
  joining the "precision" phase (ROW_PRECISION_RULES), on the lowered value and gradients:
    expm1-power-ratio     (-expm1(t))**a * t -> -(-expm1(t))**(a + 1) / exprel(t)

Vocabulary, as the symbols are named in C:
- element symbols `x_<input>`: inside a reduction, element j of a row input;
- gather symbols `xg<i>_<k>`: row input i read at class index input k (before any pass),
  or `xg<i>_r<n>`: read at the argmax of reduction n (after its pass);
- row scalars `r<n>`: the value of reduction n; a logsumexp is `m<n> + r<n>`, its max shift
  m<n> (a constant under differentiation, NUMERICS.md) plus log1p of the other terms;
- `ncls`: the number of classes (the row length); `j`: the class index of the current pass.

How a row becomes a gradient, for F(row scalars):
- the adjoint of each row scalar is accumulated in reverse creation order (inner reductions
  are created first, so that is a reverse topological order);
- a sum passes its adjoint on to the row scalars inside it through a new reduction
  sum_j d e_j / d s (another pass, or the same one when it depends on nothing new), or,
  when d e_j / d s = c * e_j with c the same for every class, as c times the sum itself;
- a logsumexp does the same with the softmax weights exp(e_j - m - r), a norm with the
  weights e_j / norm;
- a max or min is its argument at its argmax (first one on ties, like torch.max(dim)):
  its adjoint flows into the elements gathered there;
- the gradient pass writes, per element j, the sum over reductions of adjoint x weight x
  d e / d x_j, plus each gather's adjoint where j equals its index.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import sympy
from sympy.codegen.cfunctions import expm1

from .functions import Exprel
from .stabilize import complement_pairs, local_rule

NCLASS = sympy.Symbol("ncls", positive=True)
J = sympy.Symbol("j", integer=True)


class RowReduction(sympy.Function):
    """A reduction of an elementwise expression over the class axis; lowered to a symbol
    before any differentiation (sympy never differentiates through it)."""

    nargs = 1
    kind = ""

    def _eval_is_real(self):
        return self.args[0].is_real

    def fdiff(self, argindex=1):  # pragma: no cover - lowering runs first
        raise TypeError(f"internal: {type(self).__name__} reached sympy.diff; lower it first")


class RowSum(RowReduction):
    kind = "sum"

    def _eval_is_positive(self):
        return self.args[0].is_positive

    def _eval_is_nonnegative(self):
        return self.args[0].is_nonnegative


class RowMax(RowReduction):
    kind = "max"


class RowMin(RowReduction):
    kind = "min"


class LogSumExp(RowReduction):
    """log(sum_j exp(e_j)), computed as m + log1p(sum over j != argmax of exp(e_j - m)) with
    m the row max (m := 0 where it is +-inf): no overflow, and a confident row's tiny loss
    keeps its digits. d/de_j = softmax_j = exp(e_j - m - r)."""

    kind = "lse"

    def naive(self):
        return sympy.log(RowSum(sympy.exp(self.args[0])))


class RowNorm(RowReduction):
    """sqrt(sum_j e_j**2), accumulated in one pass with a power-of-two scale (BLAS nrm2's
    idea, with exact scaling): sum((e_j / s)**2) for s a power of two near the largest |e_j|,
    times s. Overflows only where the norm does (the plain sum of squares is inf from
    |e_j| = 1.3e154) and keeps every digit of a tiny vector. d/de_j = e_j / norm."""

    kind = "norm"

    def _eval_is_nonnegative(self):
        return self.args[0].is_real

    def naive(self):
        return sympy.sqrt(RowSum(self.args[0]**2))


class ScaledProduct(sympy.Function):
    """a * b (* c ...), the summand of a row sum that accumulates with a power-of-two scale
    (lcc_psum_add, lcc_psum_addn in prelude.h.j2): each product is held as its mantissa and
    exponent, so a term past the float range neither overflows on its own nor meets another
    infinity of the other sign (inf - inf = NaN) when the sum is a number or one infinity,
    and a product of three factors does not overflow in its first two (class_weight * -logp
    * label = 1.7e308 at 9e307 * 6.5 * 0.29). Outside a row sum's pass (a gradient, sympy's
    derivative of it) it is the plain product. Inside a row sum it may sit in one branch of
    a where whose other branch is 0 (masked_product): the term is added only where that
    branch is taken."""

    @classmethod
    def eval(cls, *args):
        if len(args) < 2:
            raise TypeError("ScaledProduct takes two or more factors")

    def fdiff(self, argindex=1):
        return sympy.Mul(*(a for n, a in enumerate(self.args) if n != argindex - 1))

    def _eval_is_real(self):
        return all(a.is_real for a in self.args) or None

    def naive(self):
        return sympy.Mul(*self.args)


def masked_product(e):
    """(factors, mask) if the row sum summand `e` is a ScaledProduct, maybe in a where with a
    0 branch: mask is None, or where(c, 0, 1) (or where(c, 1, 0)), the term's weight. The
    pass adds the product where the mask is not 0 (the factors are not multiplied by it: the
    0 branch of the spec's where(label == 0, 0, w * label * -logp) stays 0 where -logp is
    inf). None for any other summand."""
    if isinstance(e, ScaledProduct):
        return e.args, None
    if isinstance(e, sympy.Piecewise) and len(e.args) == 2:
        (a, c), (b, _) = e.args
        if a == 0 and isinstance(b, ScaledProduct):
            return b.args, sympy.Piecewise((0, c), (1, True))
        if b == 0 and isinstance(a, ScaledProduct):
            return a.args, sympy.Piecewise((1, c), (0, True))
    return None


class Quotient(sympy.Function):
    """a / b, divided as written. sympy merges a quotient's denominators into one product
    (x2 / r0 / r1 becomes x2 / (r0 * r1)), which overflows where r0 and r1 are two large
    norms although the quotient is an ordinary number; this node keeps a / b one division
    (e_j / |e| is at most 1 in magnitude: a unit vector's element)."""

    nargs = 2

    def fdiff(self, argindex=1):
        a, b = self.args
        return 1 / b if argindex == 1 else -Quotient(a, b) / b

    def _eval_is_real(self):
        return self.args[0].is_real and self.args[1].is_real

    def naive(self):
        return self.args[0] / self.args[1]


REDUCTIONS = (RowSum, RowMax, RowMin, LogSumExp, RowNorm)


# --------------------------------------------------------------------------- row rewrites


def _log_sum_exp(node):
    if isinstance(node, sympy.log) and isinstance(node.args[0], RowSum) \
            and isinstance(node.args[0].args[0], sympy.exp):
        return LogSumExp(node.args[0].args[0].args[0])
    return None


def _log_of_product(node):
    """log(a * b) -> log(a) + log(b) when every factor is positive and one is an exp or a row
    reduction (the quotient exp(x[k]) / sum(exp(x)) of a softmax written out)."""
    if not (isinstance(node, sympy.log) and node.args[0].is_Mul):
        return None
    factors = node.args[0].args
    bases = [f.base if f.is_Pow else f for f in factors]
    if not all(f.is_positive for f in factors) or \
            not any(isinstance(b, (sympy.exp, RowReduction)) for b in bases):
        return None
    return sympy.Add(*(f.exp * sympy.log(f.base) if f.is_Pow else sympy.log(f) for f in factors))


def _norm(node):
    """sum(e**2)**(k/2) -> norm(e)**k for odd k (sqrt(sum(e**2)) is norm(e))."""
    if node.is_Pow and isinstance(node.base, RowSum) and (2 * node.exp).is_odd:
        e = node.base.args[0]
        if e.is_Pow and e.exp == 2:
            return RowNorm(e.base)**(2 * node.exp)
    return None


def _normalized_sum(node):
    """sum(a*c) / norm(a) -> sum(Quotient(a, norm(a)) * c): the division moves inside, onto
    the factor whose norm it is (each a_j / |a| is at most 1). A dot product of two large
    vectors overflows where the cosine dot(a, b) / (|a| |b|) is an ordinary number; twice,
    this rule makes it dot(a / |a|, b / |b|), whose terms are all at most 1."""
    if not node.is_Mul:
        return None
    factors = list(node.args)
    for i, f in enumerate(factors):
        if not isinstance(f, RowSum):
            continue
        inside = sympy.Mul.make_args(f.args[0])
        for j, d in enumerate(factors):
            if d.is_Pow and d.exp == -1 and isinstance(d.base, RowNorm) and d.base.args[0] in inside:
                a = d.base.args[0]
                k = list(inside)
                k.remove(a)
                rest = [h for n, h in enumerate(factors) if n not in (i, j)]
                return sympy.Mul(*rest, RowSum(sympy.Mul(Quotient(a, d.base), *k)))
    return None


def _squared_sum(term):
    """(k, u) if `term` is k * sum(u**2) (k any factor that is not itself a row sum), else None."""
    factors = sympy.Mul.make_args(term)
    for n, f in enumerate(factors):
        if isinstance(f, RowSum) and f.args[0].is_Pow and f.args[0].exp == 2:
            k = sympy.Mul(*factors[:n], *factors[n + 1:])
            if not k.has(RowSum):
                return k, f.args[0].base
    return None


def _difference_of_squares(node):
    """k*sum(u**2) - k*sum(v**2) -> k*sum((u - v)*(u + v)): two squared distances (the
    triplet loss) overflow long before their difference does (u = 3e209 squares to inf, and
    inf - inf is NaN), and the subtraction of two large sums loses every digit of a small
    difference; per element, u - v and u + v are each one rounding. Both sums run over the
    same row (a row loss has one class axis), so this is an identity. The product is a
    ScaledProduct: the sum accumulates mantissas under one power-of-two exponent, because
    (u - v)*(u + v) still overflows per element (2.2e160 * 3.7e185) and two such terms of
    opposite signs made inf - inf = NaN where the true sum is +inf (a triplet from
    `losscc check`). The second factor is (u + v)/2, which sympy spreads over the terms
    (p - a/2 - n/2 for the triplet's u = p - a, v = p - n; halving is exact above the
    subnormals), with 2 outside the sum: u + v overflowed where p is the float maximum
    and the loss is 9.7e307 (`losscc check --seed 1`)."""
    if not node.is_Add:
        return None
    terms = list(node.args)
    squares = [(i, _squared_sum(t)) for i, t in enumerate(terms)]
    squares = [(i, ku) for i, ku in squares if ku is not None]
    squares.sort(key=lambda s: s[1][0].could_extract_minus_sign())  # k*sum(u**2) positive first
    for i, (k, u) in squares:
        for j, (k2, v) in squares:
            if j != i and k2 == -k and u != v:
                rest = [t for n, t in enumerate(terms) if n not in (i, j)]
                return sympy.Add(*rest, 2 * k * RowSum(ScaledProduct(u - v, (u + v) / 2)))
    return None


def _unit_dot(f):
    """(a / norm(a), b / norm(b)) if `f` is sum((a / norm(a)) * (b / norm(b))), else None."""
    if not isinstance(f, RowSum):
        return None
    factors = sympy.Mul.make_args(f.args[0])
    if len(factors) == 2 and all(isinstance(q, Quotient) and isinstance(q.args[1], RowNorm)
                                 and q.args[1].args[0] == q.args[0] for q in factors):
        return factors
    return None


def _cosine_distance(node):
    """k - k*sum(ahat*bhat) -> k*sum((ahat - bhat)**2)/2, ahat = a / norm(a), bhat = b / norm(b)
    (what normalized-sum makes of a cosine): 1 - cos cancels where the vectors are nearly
    parallel, and keeps only the roundings of cos, each an ulp of 1 (8.9 ulps of 1 - cos =
    0.053 at a point from `losscc check`; all of them at an angle of 1e-8). |ahat - bhat|**2
    = |ahat|**2 + |bhat|**2 - 2 cos = 2 (1 - cos) where both norms are nonzero; where one is
    0 both forms are NaN (0/0), and Gluon's cos takes its epsilon branch there, which this
    rule leaves as it is. A `where` around the cosine is entered:
    k - k*where(c, cos, e) -> where(c, k - k*cos, k - k*e), then the rule on its branch.
    Its gradient by the chain rule is ((ahat - bhat) - ahat*sum((ahat - bhat)*ahat))/|a|: an
    error of |ahat| or |bhat| from 1 (their roundings) moves the difference radially, which
    changes |ahat - bhat|**2 by the error times 1 - cos, not by the error."""
    for f, k, rest in complement_pairs(node):
        if k.has(RowSum):
            continue
        unit = _unit_dot(f)
        if unit is not None:
            qa, qb = unit
            return sympy.Add(*rest, k * RowSum((qa - qb)**2) / 2)
        if isinstance(f, sympy.Piecewise) and any(_unit_dot(e) is not None for e, _ in f.args):
            folded = sympy.Piecewise(*((_cosine_distance(k - k * e) or (k - k * e), c)
                                       for e, c in f.args))
            return sympy.Add(*rest, folded)
    return None


def _scaled_sum(node):
    """k*sum(a*b) -> k*sum(ScaledProduct(a, b)), k a factor free of row reductions (a row
    constant: numbers, parameters, ncls, per-row inputs) other than +-1: a mean, or a sum
    scaled by a parameter. The sum can overflow where k times it does not: label smoothing's
    label_smoothing * mean(class_weight * -logp) at class_weight [1.8e308, ...] has the term
    1.8e308 * 7.7 = inf and the row sum inf, while the smoothing term is 1.9e307 (0.083 / 6
    of it, a point from `losscc check`). As a ScaledProduct the sum accumulates mantissas
    under one power-of-two exponent (lcc_psum_add), and the printer multiplies k into that
    scaled form before it becomes a double (scaled-factor, codegen.py): lcc_psum_scale. A
    product of three is one ScaledProduct, formed without overflow of its first two: the
    dense labels' (1 - s) * sum(where(label == 0, 0, w * label * -logp)) is 1.7e308 at
    w = 9e307, label 0.29, -logp 6.5, where w * -logp is inf (`losscc check`); the where stays
    (masked_product), so a label 0 still adds nothing where -logp is inf. Where every term
    is in range the sum and the product round as before (lcc_psum_add keeps those in a plain
    sum). Runs after the other row rules, whose patterns (sum(a*c) / norm(a), a dot of unit
    vectors) it would hide; their k holds a reduction, so it does not match them."""
    if not node.is_Mul:
        return None
    factors = list(node.args)
    for n, f in enumerate(factors):
        if not isinstance(f, RowSum):
            continue
        k = sympy.Mul(*factors[:n], *factors[n + 1:])
        if k in (1, -1) or k.has(*REDUCTIONS):
            continue
        summand = _scaled_summand(f.args[0])
        if summand is not None:
            return k * RowSum(summand)
    return None


def _scaled_summand(e):
    """e = c*a*b*... (two or more factors that are not numbers) as ScaledProduct(c*a, b, ...),
    also in the nonzero branch of a where(cond, 0, e) (the other branch stays 0); else None."""
    if isinstance(e, sympy.Piecewise) and len(e.args) == 2:
        (a, c), (b, t) = e.args
        if a == 0 or b == 0:
            inner = _scaled_summand(b if a == 0 else a)
            if inner is not None:
                return sympy.Piecewise((0, c), (inner, t)) if a == 0 else sympy.Piecewise((inner, c), (0, t))
        return None
    if not e.is_Mul:
        return None
    c, parts = e.as_coeff_mul()
    if len(parts) < 2:
        return None
    return ScaledProduct(c * parts[0], *parts[1:])


def _expm1_power_ratio(node):
    """(-expm1(t))**a * t -> -(-expm1(t))**(a + 1) / exprel(t), a not an integer: the focal
    loss's derivative has (1 - p)**(gamma - 1) * log(p) with log(p) = t and 1 - p =
    -expm1(t), inf * 0 = NaN where p rounds to 1 (gamma < 1), though the true value is
    (1 - p)**gamma * log(p) / (p - 1) -> 0; t / expm1(t) = 1 / exprel(t) is near 1 there.
    (In a row loss t = log(p) = x[label] - logsumexp(x); the rule itself is elementwise.)"""
    if not node.is_Mul:
        return None
    factors = list(node.args)
    for i, f in enumerate(factors):
        # a non-integer power lowered by one (power-quotient's g - 1): the one that is
        # infinite at 0 when g < 1; (1 - p)**gamma in the value itself is left alone
        if not (f.is_Pow and not f.exp.is_Integer and f.exp.as_coeff_Add()[0] < 0):
            continue
        base = -f.base
        if not isinstance(base, expm1):
            continue
        t = base.args[0]
        for j, d in enumerate(factors):
            sign = -1 if d == t else 1 if d == -t else 0
            if j != i and sign:
                rest = [h for n, h in enumerate(factors) if n not in (i, j)]
                return sympy.Mul(sign, *rest, f.base**(f.exp + 1), 1 / Exprel(t))
    return None


# Rules for the "to-stable-nodes" phase of stabilize.py (run on a row loss before lowering).
ROW_RULES = (
    local_rule("log-of-product", "log(exp(a) * b)", "a + log(b)   (every factor positive)",
               _log_of_product),
    local_rule("log-sum-exp", "log(sum(exp(e)))", "logsumexp(e)", _log_sum_exp),
    local_rule("difference-of-squares", "k*sum(u**2) - k*sum(v**2)", "2k*sum((u - v)*((u + v)/2))",
               _difference_of_squares),
    local_rule("norm", "sqrt(sum(e**2))", "norm(e)   (scaled: no overflow)", _norm),
    local_rule("normalized-sum", "sum(a*c) / norm(a)", "sum((a / norm(a)) * c)", _normalized_sum),
    local_rule("cosine-distance", "k - k*sum(ahat*bhat)", "k*sum((ahat - bhat)**2)/2   "
               "(ahat = a / norm(a), bhat = b / norm(b))", _cosine_distance),
    local_rule("scaled-sum", "k*sum(a*b)", "k*sum(ScaledProduct(a, b))   (k a row constant)",
               _scaled_sum),
)
# Rules for the "precision" phase (run on the row loss's value and gradients after lowering).
ROW_PRECISION_RULES = (
    local_rule("expm1-power-ratio", "(-expm1(t))**a * t", "-(-expm1(t))**(a + 1) / exprel(t)",
               _expm1_power_ratio),
)


def outside_reductions(expr):
    """The free symbols of `expr` that are not inside a row reduction."""
    if isinstance(expr, RowReduction):
        return set()
    if isinstance(expr, sympy.Symbol):
        return {expr}
    out = set()
    for a in expr.args:
        out |= outside_reductions(a)
    return out


def replace_outside(expr, mapping: dict):
    """`expr` with the symbols in `mapping` replaced, except inside row reductions (where an
    element symbol means 'each element', not the gathered one)."""
    if isinstance(expr, RowReduction) or not expr.args:
        return mapping.get(expr, expr)
    args = [replace_outside(a, mapping) for a in expr.args]
    return expr.func(*args) if args != list(expr.args) else expr


# --------------------------------------------------------------------------- lowering


@dataclass
class Scalar:
    """One row scalar. kind: 'sum', 'norm', 'max', 'min', 'lse' (reductions over the row), or
    'gather' (a row input read at one class index)."""

    n: int
    kind: str
    sym: sympy.Symbol  # its value; for an lse, the log part (value = shift + sym)
    arg: object = None  # reductions: the elementwise expression
    shift: sympy.Symbol | None = None  # lse: the max shift m<n>
    argmax: sympy.Symbol | None = None  # max, min, lse: index symbol jm<n>
    source: str | None = None  # gathers: the row input read
    index: sympy.Symbol | None = None  # gathers: the index symbol (i_<input> or jm<n>)

    @property
    def value(self):
        return self.shift + self.sym if self.kind == "lse" else self.sym


@dataclass
class RowProgram:
    """A row loss lowered: its value as an expression of row scalars, every row scalar, and
    (when derived) the gradient of each differentiable row input per element j."""

    value: object
    scalars: list
    elements: dict  # element symbol -> row input name
    gathers: dict  # gather symbol -> Scalar
    adjoints: dict = field(default_factory=dict)  # Scalar.n -> adjoint expression
    grads: dict = field(default_factory=dict)  # input name -> expression per element j


class Lowering:
    def __init__(self, elements: dict, gathers: dict):
        self.elements = elements  # element symbol -> input name
        self.gathers = {}  # symbol -> Scalar
        self.scalars: list[Scalar] = []
        self.cache: dict = {}
        for sym, (source, index_sym) in gathers.items():
            self.new_gather(sym, source, index_sym)

    def new_gather(self, sym, source, index_sym) -> Scalar:
        s = Scalar(len(self.scalars), "gather", sym, source=source, index=index_sym)
        self.scalars.append(s)
        self.gathers[sym] = s
        return s

    def lower(self, expr):
        """`expr` with every reduction replaced by its row scalar (inner ones first)."""
        if isinstance(expr, RowReduction):
            arg = self.lower(expr.args[0])
            key = (type(expr), arg)
            if key not in self.cache:
                self.cache[key] = self.new_reduction(expr.kind, arg)
            return self.cache[key].value
        if not expr.args:
            return expr
        args = [self.lower(a) for a in expr.args]
        return expr.func(*args) if args != list(expr.args) else expr

    def new_reduction(self, kind, arg) -> Scalar:
        n = len(self.scalars)
        s = Scalar(n, kind, sympy.Symbol(f"r{n}", real=True), arg=arg)
        if kind == "lse":
            s.shift = sympy.Symbol(f"m{n}", real=True)
        if kind in ("max", "min", "lse"):
            s.argmax = sympy.Symbol(f"jm{n}", integer=True)
        self.scalars.append(s)
        return s

    def by_symbol(self):
        return {s.sym: s for s in self.scalars}


def lower_row(expr, elements: dict, gathers: dict) -> RowProgram:
    """Lower a parsed row loss. `gathers` maps each gather symbol made by the parser to
    (row input name, index symbol)."""
    low = Lowering(elements, gathers)
    value = low.lower(expr)
    return RowProgram(value=value, scalars=low.scalars, elements=elements, gathers=low.gathers), low


def derive_row(expr, elements: dict, gathers: dict, wrt: list) -> RowProgram:
    """The lowered program with adjoints and per-element gradients of the inputs in `wrt`."""
    prog, low = lower_row(expr, elements, gathers)
    by_sym = low.by_symbol()
    adj: dict = {}

    def add(sym, term):
        if term != 0:
            adj[sym] = adj.get(sym, sympy.S.Zero) + term

    def scalar_deps(e):
        return [by_sym[x] for x in e.free_symbols if x in by_sym]

    for sym in prog.value.free_symbols:
        if sym in by_sym:
            add(sym, sympy.diff(prog.value, sym))
    primaries = [s for s in prog.scalars if s.kind != "gather"]
    # each unit vector's sum of squares, 1 but summed (_unit_partial); the plan drops the
    # ones no output reads
    units = {}
    for s in primaries:
        if s.kind == "norm":
            q = Quotient(s.arg, s.sym)
            units[q] = low.lower(RowSum(q**2))
    for s in reversed(primaries):
        a = adj.get(s.sym)
        if a is None:
            continue
        if s.kind in ("max", "min"):
            # r = e at the argmax: read each element there, and pass the adjoint into them.
            at = {x: low.new_gather(sympy.Symbol(f"xg{_input_index(elements, x)}_r{s.n}", real=True),
                                    name, s.argmax).sym
                  for x, name in elements.items() if x in s.arg.free_symbols}
            definition = replace_outside(s.arg, at)
            by_sym.update({g: low.gathers[g] for g in at.values()})
            for d in scalar_deps(definition):
                add(d.sym, a * sympy.diff(definition, d.sym))
            continue
        weight = _weight(s)
        for d in scalar_deps(s.arg):
            if d is s:
                continue
            partial = sympy.diff(s.arg, d.sym)
            if partial == 0:
                continue
            ratio = partial / s.arg
            if s.kind == "sum" and not (ratio.free_symbols & set(elements)) \
                    and _divisors(ratio) <= _divisors(partial):
                # d e_j / d r = c * e_j with c the same for every j: sum_j c*e_j = c * s, no new
                # pass (and no sum of e_j / r0**2, whose r0**2 overflows where c*s does not).
                # Only if c divides by nothing partial did not: e_j = x_j * r gives c = 1/r,
                # and c * s is 0/0 at r = 0 where the sum of x_j is finite.
                add(d.sym, a * ratio * s.sym)
            else:
                total = _reused_sums(weight * partial, low, units)  # a sum only the gradient reads
                add(d.sym, a * total)
    prog.scalars = low.scalars
    prog.gathers = low.gathers
    prog.adjoints = {by_sym[sym].n: e for sym, e in adj.items()}
    for name in wrt:
        x = next(sym for sym, n in elements.items() if n == name)
        g = sympy.S.Zero
        projected = False
        for s in primaries:
            if s.kind in ("sum", "lse", "norm") and s.sym in adj and x in s.arg.free_symbols:
                partial, unit = _unit_partial(s.arg, x, units)
                projected |= unit
                term = adj[s.sym] * _weight(s) * partial
                if term.has(Quotient):
                    # Into the adjoint's branches: a branch whose adjoint is 0 must give 0,
                    # not 0 * (x_j / r) with the norm r = 0 (cosine's zero vector, in the
                    # branch not taken). Only there: folding every term would split
                    # softmax - onehot across branches, out of the expm1 rule's sight.
                    term = sympy.piecewise_fold(term)
                g += term
        picks = [(adj[gsym], sympy.Eq(J, gs.index)) for gsym, gs in low.gathers.items()
                 if gs.source == name and gsym in adj]
        if projected:
            # The direct and the norm's terms in one sum per branch, where the printer's
            # leave-one-out sees them cancel (_unit_partial).
            g = sympy.piecewise_fold(g)
        if len(picks) == 1:
            # The whole gradient in each branch, so that at the labelled class the precision
            # rules see softmax - 1 and make it -expm1 (no cancellation when p is near 1).
            (a, cond), = picks
            g = sympy.Piecewise((g + a, cond), (g, True))
        else:  # several gathers may hit the same class: their terms add up
            g += sum((sympy.Piecewise((a, c), (0, True)) for a, c in picks), sympy.S.Zero)
        prog.grads[name] = g
    return prog


def _unit_partial(arg, x, units: dict) -> tuple:
    """(d arg / d x, whether a unit vector's element was differentiated), the norm held fixed
    (its own adjoint adds the rest). An element ahat_j = Quotient(a_j, r) of a unit vector
    (r = norm(a)) differentiates to q / r instead of 1 / r, with q = sum(ahat**2), which is 1.
    The gradient through ahat is the projection (w_j - ahat_j sum(ahat*w)) / r, and at the
    class where ahat_j is near +-1 that difference rounds everything away (cosine's gradient
    of [6e-293, -4.5e114] was 9e-131 where the truth is 2e-366); written
    (w_j q - ahat_j sum(ahat*w)) / r, both sums lose their term at j in the printer's
    leave-one-out, leaving w_j sum_{i != j} ahat_i**2 - ahat_j sum_{i != j} ahat_i w_i:
    what the projection is with |ahat| = 1 exactly, and no cancellation."""
    hidden = {q: sympy.Dummy("ahat") for q in arg.atoms(Quotient) if q in units and q.args[0].has(x)}
    if not hidden:
        return sympy.diff(arg, x), False
    a = arg.xreplace(hidden)
    out = sympy.diff(a, x)
    for q, d in hidden.items():
        out += sympy.diff(a, d) * units[q] / q.args[1] * sympy.diff(q.args[0], x)
    return out.xreplace({d: q for q, d in hidden.items()}), True


def _reused_sums(arg, low: Lowering, units: dict):
    """sum(arg) as a combination of row sums already made, one of them a unit vector's q
    (_unit_partial), where arg is one: sum(ahat*(ahat - bhat))/r = (q - cos)/r. Else a new
    sum. The norm's adjoint then reads q, and in the gradient (w_j q - ahat_j (q - cos)) / r
    the q terms cancel symbolically, before the printer's leave-one-out: with the new sum,
    cosine's gradient kept a difference of two terms of order 1 (504 ulps where b is far
    from parallel to a whose element a_j dominates). Only there: q - cos itself is 1 - cos,
    which cancels where the vectors are nearly parallel, so it must never be evaluated."""
    pieces = {}
    for t in sympy.Add.make_args(sympy.expand(arg)):
        c, rest = t.as_independent(*low.elements, J, as_Add=False)
        pieces[rest] = pieces.get(rest, sympy.S.Zero) + c
    known = [low.cache.get((RowSum, rest)) for rest in pieces]
    if len(pieces) < 2 or None in known or not any(k.sym in set(units.values()) for k in known):
        return low.lower(RowSum(arg))
    return sympy.Add(*(c * k.value for c, k in zip(pieces.values(), known)))


def _divisors(expr) -> set:
    """What `expr` divides by: the bases of its negative powers and its Quotients' divisors."""
    out = {p.base for p in expr.atoms(sympy.Pow) if p.exp.is_negative}
    return out | {q.args[1] for q in expr.atoms(Quotient)}


def _weight(s: Scalar):
    """d r / d e_j of a sum, norm or logsumexp reduction."""
    if s.kind == "norm":
        return Quotient(s.arg, s.sym)
    return sympy.S.One if s.kind == "sum" else sympy.exp(s.arg - s.shift - s.sym)


def _input_index(elements: dict, x) -> int:
    return list(elements).index(x)


# --------------------------------------------------------------------------- passes


@dataclass(frozen=True)
class Step:
    """One accumulation in a pass: role 'sum', 'norm', 'max', 'min', 'lse_max' (the shift and its
    argmax) or 'lse_tail' (the sum of exp(e_j - m) over j != argmax)."""

    scalar: Scalar
    role: str


@dataclass
class Plan:
    """What a kernel computes per row, in order: gathers at class indices, then passes over
    the row, each followed by the gathers at argmaxes it found."""

    pre: list  # gather Scalars read before the first pass
    passes: list  # of lists of Step
    after: list  # per pass, the gather Scalars read once it is done


def plan(prog: RowProgram, outputs: list) -> Plan:
    """The passes needed to evaluate `outputs` (expressions of row scalars): each reduction
    runs in the first pass after everything it reads is known."""
    by_sym = {}
    for s in prog.scalars:
        by_sym[s.sym] = s
        if s.shift is not None:
            by_sym[s.shift] = s

    needed: dict = {}  # Scalar.n -> Scalar, in discovery order
    stack = [x for e in outputs for x in e.free_symbols if x in by_sym]
    while stack:
        s = by_sym[stack.pop()]
        if s.n in needed:
            continue
        needed[s.n] = s
        if s.arg is not None:
            stack += [x for x in s.arg.free_symbols if x in by_sym]
        if s.kind == "gather" and s.index.name.startswith("jm"):
            stack.append(next(t.sym for t in prog.scalars if t.argmax == s.index))

    ready: dict = {}  # symbol -> pass after which it is known

    def when(s: Scalar) -> int:
        if s.sym in ready:
            return ready[s.sym]
        if s.kind == "gather":
            owner = next((t for t in prog.scalars if t.argmax == s.index), None)
            ready[s.sym] = when(owner) if owner is not None and owner.kind != "lse" else 0
            return ready[s.sym]
        deps = [by_sym[x] for x in s.arg.free_symbols if x in by_sym and by_sym[x] is not s]
        p = 1 + max([_known(d, x, when) for d in deps for x in s.arg.free_symbols
                     if by_sym.get(x) is d], default=0)
        if s.kind == "lse":
            ready[s.shift] = p
            ready[s.sym] = p + 1
        else:
            ready[s.sym] = p
        return ready[s.sym]

    for s in needed.values():
        when(s)
    n_passes = max((ready[s.sym] for s in needed.values()), default=0)
    passes: list = [[] for _ in range(n_passes)]
    after: list = [[] for _ in range(n_passes)]
    pre = []
    for s in sorted(needed.values(), key=lambda s: s.n):
        if s.kind == "gather":
            (after[ready[s.sym] - 1] if ready[s.sym] else pre).append(s)
        elif s.kind == "lse":
            passes[ready[s.shift] - 1].append(Step(s, "lse_max"))
            passes[ready[s.sym] - 1].append(Step(s, "lse_tail"))
        else:
            passes[ready[s.sym] - 1].append(Step(s, s.kind))
    return Plan(pre=pre, passes=passes, after=after)


def _known(dep: Scalar, sym, when) -> int:
    """The pass after which `sym` (a row scalar, or an lse's shift) is known."""
    t = when(dep)
    return t - 1 if dep.kind == "lse" and sym == dep.shift else t
