"""The truth for `losscc check`: a spec's *written* formula and its exact derivatives, evaluated
in interval arithmetic (mpmath.iv) at rising precision until the result is known to far more
digits than any float holds.

Nothing here comes from the compiled kernels or from the stabilize stage: the formula is the
parser's sympy expression before any rewrite, its derivatives are sympy's `diff` of it (with
the kinks made explicit as in derive.tidy), and row losses are written out as plain sums over
concrete classes before differentiating, so losscc's own chain rule (rows.py) is not used.

Why intervals: a fixed working precision silently returns 0 for log(1 + exp(-700)) (the 1 +
tiny rounds to 1 below 300 digits); an interval says [0, 2e-31] there, which is not narrow,
so the precision rises until it is. A Piecewise condition that an interval cannot decide (an
input on a branch boundary) also raises the precision; on an exact tie the point value at the
highest precision decides, as the kernel's comparison would.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import mpmath
import sympy
from mpmath import iv, mp
from sympy.codegen.cfunctions import expm1, log1p

from .derive import tidy
from .expr import parse_spec_math, symbols_for
from .functions import LogCosh, Sigmoid, Softplus
from .rows import NCLASS, LogSumExp, RowMax, RowMin, RowReduction, RowSum

# Working precisions tried in turn, in decimal digits. 1100 digits resolve any cancellation
# between float64-sized terms (2^-1074 .. 2^1024 spans about 630 digits).
PRECISIONS = (30, 60, 120, 250, 500, 1100)
NARROW_BITS = 64  # an interval narrower than 2^-64 of its midpoint is the truth
TINY = mpmath.mpf(2) ** -1100  # ... or narrower than this: far below any float's smallest ulp


class Undecided(Exception):
    """An interval comparison that cannot be decided at this precision."""


class Undefined(Exception):
    """The formula has no real value here (a log of a negative, 0/0)."""


@dataclass
class Truth:
    """One output's true value at one point: `value` (an mpf, or +-inf / nan for no finite
    value) and how it was reached."""

    value: object
    digits: int  # the working precision that settled it
    tie: bool = False  # settled at the highest precision, comparing midpoints
    fragile: bool = False  # an inequality was within the slack: see resolve()
    alt: object = None  # the value with every fragile decision taken the other way
    undefined: bool = False  # the formula has no real value here (value is nan)
    unresolved: bool = False  # no precision tried made the interval narrow (value is nan)


# --------------------------------------------------------------------------- the formulas


@dataclass(frozen=True)
class Outputs:
    """The written formula of one variant and its exact derivatives, as sympy expressions of
    `args` (Symbols, in the order values are passed)."""

    args: tuple
    exprs: dict  # output name -> sympy expression: 'value', 'd/dpred', 'd2/dpred2', ...


def elementwise_outputs(spec, options: dict, hessian: bool = True) -> Outputs:
    """Value, gradient of each differentiable input and (optionally) the second derivative
    w.r.t. the prediction of an elementwise loss, from its written formula."""
    symbols = symbols_for(spec)
    value = parse_spec_math(spec, options, symbols)
    exprs = {"value": value}
    for inp in spec.differentiable:
        exprs[f"d/d{inp.name}"] = tidy(sympy.diff(value, symbols[inp.name]))
    if hessian:
        pred = symbols[spec.pred.name]
        exprs[f"d2/d{spec.pred.name}2"] = tidy(sympy.diff(sympy.diff(value, pred), pred))
    args = tuple(symbols[i.name] for i in spec.inputs) + tuple(symbols[p.name] for p in spec.params)
    return Outputs(args, exprs)


def row_outputs(spec, options: dict, nclass: int, kinds: dict, wrt) -> Outputs:
    """A row loss written out for rows of `nclass` classes: each row input becomes nclass
    symbols, each reduction a plain sum (max, min) over them, NCLASS the number. A class-index
    input is taken to be 0: the written formula treats classes alike, so the caller permutes
    the classes of a row to put its label first. Gradients are per element: 'd/dpred[3]'."""
    symbols = symbols_for(spec)
    loss, scope = parse_spec_math(spec, options, symbols)
    elements = {name: [sympy.Symbol(f"{name}__{j}", real=True) for j in range(nclass)]
                for name in scope.rows}
    by_symbol = {symbols[name]: name for name in scope.rows}

    def at(expr, j):
        return expr.xreplace({symbols[n]: elements[n][j] for n in scope.rows})

    def expand(expr):
        if isinstance(expr, RowReduction):
            inner = expand(expr.args[0])
            terms = [at(inner, j) for j in range(nclass)]
            if isinstance(expr, RowSum):
                return sympy.Add(*terms)
            if isinstance(expr, LogSumExp):
                return sympy.log(sympy.Add(*(sympy.exp(t) for t in terms)))
            if isinstance(expr, RowMax):
                return sympy.Max(*terms)
            if isinstance(expr, RowMin):
                return sympy.Min(*terms)
            raise TypeError(f"internal: no expansion for {type(expr).__name__}")  # pragma: no cover
        if not expr.args:
            return expr
        return expr.func(*(expand(a) for a in expr.args))

    value = expand(loss).xreplace({NCLASS: sympy.Integer(nclass)})
    gathered = {g: elements[name][0] for g, (name, _) in scope.gathers.items()}
    value = value.xreplace(gathered)
    stray = value.free_symbols & set(by_symbol)
    if stray:  # pragma: no cover - the parser refuses loose vectors
        raise TypeError(f"internal: row symbols left after expansion: {stray}")
    exprs = {"value": value}
    for name in wrt:
        for j, x in enumerate(elements[name]):
            exprs[f"d/d{name}[{j}]"] = tidy(sympy.diff(value, x))
    args = []
    for inp in spec.inputs:
        if kinds[inp.name] == "row":
            args += elements[inp.name]
        elif kinds[inp.name] == "scalar":
            args.append(symbols[inp.name])
    args += [symbols[p.name] for p in spec.params]
    return Outputs(tuple(args), exprs)


# --------------------------------------------------------------------------- interval evaluation


def compile_interval(expr, args):
    """A function of mpf arguments (in `args` order) evaluating `expr` in the current mpmath
    interval precision (iv.dps); it raises Undecided or Undefined."""
    index = {a: i for i, a in enumerate(args)}
    fn = _compile(expr, index)
    return fn


def _const(value):
    if isinstance(value, sympy.Rational):
        p, q = int(value.p), int(value.q)
        return lambda env: iv.mpf(p) / q if q != 1 else iv.mpf(p)
    if value is sympy.pi:
        return lambda env: iv.pi
    if value is sympy.E:
        return lambda env: iv.e
    if isinstance(value, sympy.Float):
        text = str(value)
        return lambda env: iv.mpf(text)
    raise TypeError(f"no interval constant for {value!r}")


def _lo(x):
    return mp.make_mpf(x._mpi_[0])


def _hi(x):
    return mp.make_mpf(x._mpi_[1])


class _Mode(threading.local):
    point = False  # decide what intervals cannot on midpoints: _point() settles exact ties
    slack = 0.0  # compared values closer than this (relative) make a fragile decision
    flip = False  # take the other side of every fragile decision
    fragile = False  # set when a fragile decision was taken


_MODE = _Mode()


def _decide(kind, d, scale=None):
    """Is d > 0 (kind 'gt'), d >= 0 ('ge') or d == 0 ('eq')? Undecided if the interval d
    straddles the answer. An inequality between values closer than the slack (relative to
    `scale`, the size of what was compared) is fragile: a kernel that rounds those values
    may decide it either way, so with flip set the other side is taken."""
    lo, hi = _lo(d), _hi(d)
    if _MODE.point:
        lo = hi = (lo + hi) / 2
    if kind == "eq":
        if lo == 0 and hi == 0:
            return True
        if lo > 0 or hi < 0:
            return False
        raise Undecided
    if lo > 0 or (kind == "ge" and lo >= 0):
        answer = True
    elif hi < 0 or (kind == "gt" and hi <= 0):
        answer = False
    else:
        raise Undecided
    if _MODE.slack and scale is not None and max(abs(lo), abs(hi)) <= _MODE.slack * _hi(scale):
        _MODE.fragile = True
        if _MODE.flip:
            return not answer
    return answer


def _compare(kind, a, b):
    return _decide(kind, a - b, iv.fabs(a) + iv.fabs(b))


def _widened(fn):
    """fn with its interval result widened by 16 units of the working precision each way.
    mpmath's interval functions round toward the nearest at some precisions (iv.exp(4e-81)
    at 100 digits is a single point), so their results are not trusted to the last bit."""
    def wide(x):
        y = fn(x)
        lo, hi = _lo(y), _hi(y)
        if mpmath.isinf(lo) or mpmath.isinf(hi) or mpmath.isnan(lo) or mpmath.isnan(hi):
            return y
        with mp.workprec(iv.prec + 8):
            eps = mpmath.ldexp(1, 4 - iv.prec)
            return iv.mpf([lo - abs(lo) * eps, hi + abs(hi) * eps])
    return wide


_EXP, _EXPM1 = _widened(iv.exp), _widened(iv.expm1)


def _check(x):
    if _lo(x) != _lo(x) or _hi(x) != _hi(x):  # nan endpoints
        raise Undefined
    return x


def _from(lower, fn):
    """fn (widened) on [lower, inf): Undefined wholly below, Undecided across the bound."""
    wide = _widened(fn)

    def guarded(x):
        if _hi(x) < lower:
            raise Undefined
        if _lo(x) < lower:
            raise Undecided
        return wide(x)
    return guarded


_log, _log1p, _sqrt = _from(0, iv.log), _from(-1, iv.log1p), _from(0, iv.sqrt)


def _div(a, b):
    if _lo(b) == 0 and _hi(b) == 0:
        raise Undefined
    if _lo(b) <= 0 <= _hi(b):
        raise Undecided
    return a / b


def _sign(x):
    if _lo(x) > 0:
        return iv.mpf(1)
    if _hi(x) < 0:
        return iv.mpf(-1)
    if _lo(x) == 0 and _hi(x) == 0:
        return iv.mpf(0)
    raise Undecided


def _abs(x):
    return iv.fabs(x)


def _max(*xs):
    return iv.mpf([max(_lo(x) for x in xs), max(_hi(x) for x in xs)])


def _min(*xs):
    return iv.mpf([min(_lo(x) for x in xs), min(_hi(x) for x in xs)])


def _tanh(x):
    # tanh(x) = sign(x) (1 - 2 / (exp(2|x|) + 1)): every step monotone, no overflow trouble
    s = _sign(x)
    if s == 0:
        return iv.mpf(0)
    return s * (1 - 2 / (_EXP(2 * iv.fabs(x)) + 1))


def _cosh(x):
    return (_EXP(x) + _EXP(-x)) / 2


def _sinh(x):
    # (e^x - 1)(1 + e^-x) / 2: no cancellation near 0
    return _EXPM1(x) * (1 + _EXP(-x)) / 2


def _sigmoid(x):
    return 1 / (1 + _EXP(-x))


def _softplus(x):
    return _log1p(_EXP(x))


def _logcosh(x):
    return _log(_cosh(x))


def _power(base, exponent):
    if isinstance(exponent, sympy.Integer):
        n = int(exponent)
        b = base
        if n >= 0:
            return lambda env: b(env) ** n
        return lambda env: _div(iv.mpf(1), b(env) ** -n)
    if exponent == sympy.Rational(1, 2):
        return lambda env: _sqrt(base(env))
    if exponent == sympy.Rational(-1, 2):
        return lambda env: _div(iv.mpf(1), _sqrt(base(env)))
    e = _const(exponent) if isinstance(exponent, sympy.Basic) else exponent

    def general(env):
        x, y = base(env), e(env)
        if _hi(x) < 0:
            raise Undefined
        if _lo(x) == 0 and _hi(x) == 0:
            if _lo(y) > 0:
                return iv.mpf(0)
            raise Undefined
        if _lo(x) <= 0:
            raise Undecided
        return _EXP(y * _log(x))
    return general


_UNARY = {
    sympy.exp: _EXP, sympy.log: _log, log1p: _log1p, expm1: _EXPM1, sympy.Abs: _abs,
    sympy.sign: _sign, sympy.tanh: _tanh, sympy.cosh: _cosh, sympy.sinh: _sinh, Sigmoid: _sigmoid,
    Softplus: _softplus, LogCosh: _logcosh,
}
_RELATIONS = {
    sympy.Eq: lambda a, b: _compare("eq", a, b), sympy.Ne: lambda a, b: not _compare("eq", a, b),
    sympy.Gt: lambda a, b: _compare("gt", a, b), sympy.Ge: lambda a, b: _compare("ge", a, b),
    sympy.Lt: lambda a, b: _compare("gt", b, a), sympy.Le: lambda a, b: _compare("ge", b, a),
}


def _compile(expr, index):  # noqa: C901 - one dispatch table, one node kind per branch
    if expr in index:
        i = index[expr]
        return lambda env: env[i]
    if expr is sympy.true or expr is sympy.false:
        v = bool(expr)
        return lambda env: v
    if expr.is_Number or expr in (sympy.pi, sympy.E):
        return _const(expr)
    if isinstance(expr, sympy.Symbol):
        raise TypeError(f"internal: no value for symbol {expr}")
    f = type(expr)
    if f is sympy.Piecewise:
        pairs = [(_compile(e, index), _compile(c, index)) for e, c in expr.args]

        def piecewise(env):
            for value, cond in pairs:
                if cond(env):
                    return value(env)
            raise Undefined  # no branch: sympy's Piecewise is undefined there
        return piecewise
    sub = [_compile(a, index) for a in expr.args]
    if f is sympy.Add:
        def add(env):
            total = sub[0](env)
            for s in sub[1:]:
                total = total + s(env)
            return _check(total)
        return add
    if f is sympy.Mul:
        # a division is x * y**-1; its zero divisor is Undefined, not an infinite interval
        def mul(env):
            total = sub[0](env)
            for s in sub[1:]:
                total = total * s(env)
            return _check(total)
        return mul
    if f is sympy.Pow:
        return _power(sub[0], expr.exp if expr.exp.is_Number else sub[1])
    if f in _UNARY:
        fn, a = _UNARY[f], sub[0]
        return lambda env: _check(fn(a(env)))
    if f is sympy.Max:
        return lambda env: _max(*(s(env) for s in sub))
    if f is sympy.Min:
        return lambda env: _min(*(s(env) for s in sub))
    if f is sympy.Heaviside:
        h0 = expr.args[1] if len(expr.args) > 1 else sympy.S.Half
        if h0 != 0:
            raise TypeError(f"internal: Heaviside with H(0) = {h0}; tidy() first")
        a = sub[0]
        terms = [_compile(t, index) for t in sympy.Add.make_args(sympy.expand_mul(expr.args[0]))]

        def heaviside(env):
            scale = iv.mpf(0)
            for t in terms:
                scale = scale + iv.fabs(t(env))
            return iv.mpf(1) if _decide("gt", a(env), scale) else iv.mpf(0)
        return heaviside
    if f in _RELATIONS:
        rel, a, b = _RELATIONS[f], sub[0], sub[1]
        return lambda env: rel(a(env), b(env))
    if f is sympy.And:
        return lambda env: all(s(env) for s in sub)
    if f is sympy.Or:
        return lambda env: any(s(env) for s in sub)
    if f is sympy.Not:
        return lambda env: not sub[0](env)
    raise TypeError(f"no interval evaluation for {f.__name__} in {expr}")


def resolve(fn, args, limit: float, slack: float = 0.0) -> Truth:
    """The true value of `fn` at the exact point `args` (floats), to 2^-64 relative, raising
    the precision as needed. `limit` is the largest finite float of the dtype: an interval
    entirely beyond it needs no more digits (the float result must be infinite).

    An input on a branch boundary (Undecided at every precision) is settled by comparing
    midpoints at the highest precision. A formula undefined there gives nan. With a `slack`
    (the dtype's rounding, relative), an inequality between values that close is fragile:
    `alt` is then the value with every fragile decision taken the other way."""
    saved = iv.dps
    try:
        truth = _resolve(fn, args, limit, slack, flip=False)
        if truth.fragile:
            truth.alt = _resolve(fn, args, limit, slack, flip=True).value
    finally:
        iv.dps = saved
    return truth


# (digits, the two relative steps): the first that agrees; the second reaches inputs of
# 1e308 whose function changes on a scale of 1 (softmax of huge logits), still linear there.
CONDITION_LEVELS = ((60, mpmath.mpf(2) ** -100, mpmath.mpf(2) ** -80),
                    (420, mpmath.mpf(2) ** -1300, mpmath.mpf(2) ** -1280))
CONDITION_AGREE = mpmath.mpf(10) ** -6  # the two steps' estimates, relative to each other
MOVES = 15  # Walsh sign patterns tried by the measured movement


def condition(fn, args, vary, rounding=None) -> mpmath.mpf:
    """How far f moves when each input in `vary` moves by its own relative rounding, per unit
    of that rounding: sum over i of |x_i * df/dx_i| at the point `args`. An error this size
    times the working precision is inherent to the formula at this point (its componentwise
    condition times |f|), whatever the algorithm.

    With `rounding` (the dtype's unit roundoff u), also the movement itself, measured:
    max over sign patterns s of |f(x * (1 + u s)) - f(x)| / u. That is the same number where
    f is smooth at the scale of u, and more where the first-order sum is 0: at a minimum (1 -
    cos of parallel vectors is 0 with a zero gradient, but inputs rounded by u turn the
    vectors apart and move it by ~u**2). A pattern counts only if the movement at u/2 is
    between a quarter and a half of it (linear plus quadratic): a jump within u of the point
    scales otherwise and excuses nothing.

    The slopes are forward differences at two relative steps (2^-100 and 2^-80 at 60 digits,
    then 2^-1300 and 2^-1280 at 420 digits where those disagree), evaluated in intervals
    narrowed until their widths are far below the sum they make (not each below its own
    value: f = 0 exactly has a slope), branches decided on midpoints: where f is smooth the
    two agree far below 10^-6. Where they never do, a kink lies within a step (a jump
    divided by the step is no derivative), and the answer is nan, as where f cannot be
    evaluated at the point or its neighbours: no excuse there."""
    saved = iv.dps
    _MODE.point = True
    try:
        idx = [i for i in vary if args[i] != 0]
        moved = _movement(fn, args, idx, mpmath.mpf(rounding)) if rounding is not None else 0
        slopes = _slopes(fn, args, idx, moved)
        if slopes is None:
            return mpmath.mpf("nan")
        total = max(sum((abs(v) for v in slopes), mpmath.mpf(0)), moved)
        return total if mpmath.isfinite(total) else mpmath.mpf("nan")
    except (Undecided, Undefined, ZeroDivisionError):
        return mpmath.mpf("nan")
    finally:
        _MODE.point = False
        iv.dps = saved


def _moved(args, scales: dict) -> list:
    """args with args[i] multiplied by scales[i] (exactly: at the caller's digits)."""
    return [mpmath.mpf(a) * scales[i] if i in scales else a for i, a in enumerate(args)]


def _interval(fn, xs, digits):
    """(midpoint, width) of fn at xs in intervals of `digits` digits."""
    iv.dps = digits
    with mp.workdps(digits):
        y = fn([iv.mpf(a) for a in xs])
        lo, hi = _lo(y), _hi(y)
        return (lo + hi) / 2, hi - lo


def _slopes(fn, args, idx, floor=0) -> list | None:
    """[x_i df/dx_i for i in idx] by forward differences (see condition), or None. The
    estimates need to be narrow and to agree only to a part in 10^6 of their sum plus |f|
    plus `floor` (the measured movement): at a minimum the slopes are 0, and their
    estimates O(step) ones that agree with nothing."""
    for dps, *steps in CONDITION_LEVELS:
        for digits in (dps, 2 * dps, 4 * dps):
            with mp.workdps(digits):
                points = [[_moved(args, {i: 1 + step}) for i in idx] for step in steps]
            try:
                base, wb = _interval(fn, args, digits)
                est = [[((m - base) / step, (w + wb) / step) for m, w in (_interval(fn, p, digits) for p in pts)]
                       for step, pts in zip(steps, points)]  # per step: (slope, width) per input
            except (Undecided, Undefined, ZeroDivisionError):
                break  # a step too far for the formula (1 - p of a softmax of 1e189s): smaller ones
            if mpmath.isnan(base) or any(mpmath.isnan(v) for e in est for s in e for v in s):
                break  # undefined near the point at this level
            size = sum((abs(v) for v, _ in est[0]), abs(base) + floor)
            if max(sum((w for _, w in e), mpmath.mpf(0)) for e in est) > CONDITION_AGREE * size / 8:
                continue  # not narrow yet: more digits
            gap = sum((abs(a[0] - b[0]) for a, b in zip(*est)), mpmath.mpf(0))
            if gap <= CONDITION_AGREE * size:
                return [v for v, _ in est[0]]
            break  # the steps disagree: the next level's smaller steps
    return None


def _walsh(n: int, k: int) -> list:
    """The k-th Walsh sign pattern over n inputs: (-1)**popcount(i & k)."""
    return [-1 if bin(i & k).count("1") % 2 else 1 for i in range(n)]


def _movement(fn, args, idx, u) -> mpmath.mpf:
    """max over Walsh sign patterns s of |f(x (1 + u s)) - f(x)| / u (see condition): the
    patterns turn apart any two inputs whose indices differ in their last four bits, the
    first 16 for sure (a row of 6 classes, two inputs and the parameters)."""
    digits = 60
    try:
        base, wb = _interval(fn, args, digits)
    except (Undecided, Undefined, ZeroDivisionError):
        return mpmath.mpf(0)
    best = mpmath.mpf(0)
    for k in range(1, min(MOVES, 2 ** len(idx) - 1) + 1):
        s = _walsh(len(idx), k)
        with mp.workdps(digits):
            far = _moved(args, {i: 1 + u * si for i, si in zip(idx, s)})
            near = _moved(args, {i: 1 + u / 2 * si for i, si in zip(idx, s)})
        try:
            (m1, w1), (m2, w2) = _interval(fn, far, digits), _interval(fn, near, digits)
        except (Undecided, Undefined, ZeroDivisionError):
            continue  # not a movement the formula has a value for
        lo1, lo2, hi2 = abs(m1 - base) - w1 - wb, abs(m2 - base) - w2 - wb, abs(m2 - base) + w2 + wb
        if lo1 > 0 and lo1 / 4 * (1 - CONDITION_AGREE) <= lo2 and hi2 <= lo1 / 2 * (1 + CONDITION_AGREE):
            best = max(best, lo1)
    return best / u


def _resolve(fn, args, limit, slack, flip) -> Truth:
    nan = mpmath.mpf("nan")
    beyond = mpmath.mpf(limit) * 2
    _MODE.slack, _MODE.flip = slack, flip
    try:
        for n, dps in enumerate(PRECISIONS):
            last = n == len(PRECISIONS) - 1
            iv.dps = dps
            with mp.workdps(dps):
                _MODE.point, _MODE.fragile = last, False
                try:
                    x = fn([iv.mpf(a) for a in args])
                except Undecided:
                    continue
                except (Undefined, ZeroDivisionError):
                    return Truth(nan, dps, tie=last, undefined=True)
                lo, hi = _lo(x), _hi(x)
                if lo > beyond:
                    return Truth(mpmath.mpf("inf"), dps, fragile=_MODE.fragile)
                if hi < -beyond:
                    return Truth(mpmath.mpf("-inf"), dps, fragile=_MODE.fragile)
                if mpmath.isinf(lo) or mpmath.isinf(hi):
                    continue
                mid, width = (lo + hi) / 2, hi - lo
                if width <= abs(mid) * mpmath.mpf(2) ** -NARROW_BITS or width <= TINY or last:
                    narrow = width <= abs(mid) * mpmath.mpf(2) ** -NARROW_BITS or width <= TINY
                    return Truth(mid if narrow else nan, dps, tie=last, fragile=_MODE.fragile,
                                 unresolved=not narrow)
        return Truth(nan, PRECISIONS[-1], unresolved=True)  # never narrow
    finally:
        _MODE.slack, _MODE.flip, _MODE.point = 0.0, False, False
