"""Stabilize stage: rewrite naive elementwise math into stable nodes and precise libm calls.

Rules, in the order they run (u is any expression, k any number; sympy's argument order
does not matter, and a match anywhere inside the expression is rewritten):

  phase "to-stable-nodes", repeated until nothing changes:
    sigmoid-ratio    exp(u)/(1 + exp(u)) -> sigmoid(u)        (and exp(u)*sigmoid(-u))
    sigmoid          1/(1 + exp(-u)) -> sigmoid(u)
    softplus         log(1 + exp(u)) -> softplus(u)            (and log1p(exp(u)))
    log-sigmoid      log(sigmoid(u)) -> -softplus(-u)
    log-1m-sigmoid   log(1 - sigmoid(u)) -> -softplus(u)
    logcosh          log(cosh(u)) -> logcosh(u)
    deviance         x - b*log(x + k) + b*log(b) - b -> bd0(x + k, b) - k
                                                               (and exp(u) - b*u + b*log(b) - b
                                                                -> bd0(exp(u), b); k free of
                                                                x's symbols, 0 too: Poisson NLL
                                                                plus Stirling's t*log(t) - t)
    into-branch      x + where(c, y, z) -> where(c, x + y, x + z)
                                                               (only where a branch then
                                                                matches deviance, rewritten at
                                                                once: where(t > 1, Stirling, 0))
    dominant-sum     exp(u) + c*u -> dominant_sum(exp(u), c, u)
                                                               (and u + c*log(u + k) ->
                                                                dominant_sum(u, c, log(u + k));
                                                                c, k free of u's symbols)
  phase "precision", repeated until nothing changes:
    sigmoid-minus-1  k*sigmoid(u) - k -> -k*sigmoid(-u)        (sigmoid(u) - 1 -> -sigmoid(-u))
    expm1            k*exp(u) - k -> k*expm1(u)                (exp(u) - 1 -> expm1(u);
                                                                softmax - onehot at the label)
    log1p            log(1 + u) -> log1p(u)                    (u one non-constant term, not exp)
    power-quotient   x**g / x -> x**(g - 1)                    (g not an integer: no 0/0 at x = 0)
    sech2            1 - tanh(u)**2 -> 1/cosh(u)**2            (k - k*tanh(u)**2 too; log_cosh'')

Every rule is an identity, so a rewrite never changes the value, only how it is computed.
The phases are ordered because the precision rules would otherwise eat the patterns of the
stability rules: log(1 + exp(u)) -> log1p(exp(u)) is more precise near 0 but still
overflows above u = 710, and sympy's own log1p_opt even turns log(1 + exp(-u)) into
-u + log1p(exp(u)) (NUMERICS.md). Here the overflow-prone shapes become stable nodes
(functions.py) first, and only what is left gets log1p/expm1. The first phase runs to a
fixed point because one rewrite exposes another: log(1/(1 + exp(-u))) becomes
log(sigmoid(u)), then -softplus(-u).

log1p takes a single term only: 1 - p + eps is computed as (1 - p) + eps on purpose (the
printer keeps that order), and log1p(eps - p) would lose eps in float32 at p = 1.

Other stages add their own rules to a phase without editing this file:
`stabilize(expr, extra={"to-stable-nodes": [Rule(...)]})`; build rules with `local_rule`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import sympy
from sympy.codegen.cfunctions import expm1, log1p

from .functions import Bd0, DominantSum, LogCosh, Sigmoid, Softplus

MAX_ROUNDS = 20  # a phase that still changes the expression after this many rounds is a bug


@dataclass(frozen=True)
class Rule:
    """A named rewrite, documented as `before -> after`.

    apply(expr, report=None) -> expr rewrites every match; it calls report(matched,
    replacement) for each subexpression it rewrote.
    """

    name: str
    before: str
    after: str
    apply: Callable


@dataclass(frozen=True)
class Phase:
    name: str
    rules: tuple  # of Rule, applied in order, the whole list repeated to a fixed point


def rewrite_bottom_up(expr, rewrite: Callable, report: Callable | None = None):
    """`expr` with rewrite(node) -> replacement-or-None tried on every Expr node, children
    first (so a replacement is matched with its arguments already rewritten). Each distinct
    subexpression is visited once."""
    memo: dict = {}

    def walk(node):
        if node in memo:
            return memo[node]
        out = node
        if node.args:
            args = tuple(walk(a) for a in node.args)
            if args != node.args:
                out = node.func(*args)
        if isinstance(out, sympy.Expr):
            new = rewrite(out)
            if new is not None and new != out:
                if report is not None:
                    report(out, new)
                out = new
        memo[node] = out
        return out

    return walk(sympy.sympify(expr))


def local_rule(name: str, before: str, after: str, rewrite: Callable) -> Rule:
    """A Rule from a one-node rewrite: rewrite(node) -> replacement, or None for no match."""

    def apply(expr, report=None):
        return rewrite_bottom_up(expr, rewrite, report)

    return Rule(name, before, after, apply)


# --------------------------------------------------------------------------- matching helpers


def _one_plus(expr):
    """u if `expr` is 1 + u for a single term u, else None."""
    c, terms = expr.as_coeff_add()
    return terms[0] if c == 1 and len(terms) == 1 else None


def _sigmoid_arg(factor):
    """w if `factor` is sigmoid(w) or 1/(1 + exp(-w)), else None."""
    if isinstance(factor, Sigmoid):
        return factor.args[0]
    if factor.is_Pow and factor.exp == -1:
        e = _one_plus(factor.base)
        if isinstance(e, sympy.exp):
            return -e.args[0]
    return None


def _spread(term):
    """`term` with its first sum factor multiplied out ((a + b)*exp(u) -> [a*exp(u),
    b*exp(u)]), one level only: nothing inside a or b is multiplied out."""
    factors = sympy.Mul.make_args(term)
    for n, f in enumerate(factors):
        if f.is_Add:
            rest = sympy.Mul(*factors[:n], *factors[n + 1:])
            return [rest * a for a in f.args]
    return [term]


def _complement(kind: type, replace: Callable):
    """A rewrite of an Add holding k*f(u) and -k, for any factor k (a number, or an
    expression such as a class weight): both terms become replace(k, u), the other terms
    stay. A term (a + b)*f(u) is also tried as a*f(u) + b*f(u) (softmax - onehot at the
    label comes as (w + ...)*exp(u) - w); the other terms are never multiplied out."""

    def pair(piece, terms):
        factors = sympy.Mul.make_args(piece)
        for n, f in enumerate(factors):
            if isinstance(f, kind):
                k = sympy.Mul(*factors[:n], *factors[n + 1:])
                if -k in terms:
                    return k, f.args[0]
        return None

    def rewrite(node):
        if not node.is_Add:
            return None
        terms = list(node.args)
        for i, term in enumerate(terms):
            for pieces in ([term], _spread(term)):
                for p, piece in enumerate(pieces):
                    found = pair(piece, terms[:i] + terms[i + 1:])
                    if found:
                        k, u = found
                        others = terms[:i] + terms[i + 1:]
                        others.remove(-k)
                        return sympy.Add(*others, *pieces[:p], *pieces[p + 1:], replace(k, u))
        return None

    return rewrite


# --------------------------------------------------------------------------- the rules


def _sigmoid_ratio(node):
    # exp(-w) * sigmoid(w) = 1/(e^w + 1) = sigmoid(-w); with w = -u: exp(u)/(1 + exp(u)).
    if not node.is_Mul:
        return None
    factors = list(node.args)
    for i, f in enumerate(factors):
        w = _sigmoid_arg(f)
        if w is None:
            continue
        for j, g in enumerate(factors):
            if isinstance(g, sympy.exp) and g.args[0] == -w:
                rest = [h for n, h in enumerate(factors) if n not in (i, j)]
                return sympy.Mul(*rest, Sigmoid(-w))
    return None


def _sigmoid(node):
    w = _sigmoid_arg(node) if node.is_Pow else None
    return None if w is None else Sigmoid(w)


def _softplus(node):
    if isinstance(node, sympy.log):
        e = _one_plus(node.args[0])
    elif isinstance(node, log1p):
        e = node.args[0]
    else:
        return None
    return Softplus(e.args[0]) if isinstance(e, sympy.exp) else None


def _log_sigmoid(node):
    if isinstance(node, sympy.log) and isinstance(node.args[0], Sigmoid):
        return -Softplus(-node.args[0].args[0])
    return None


def _log_one_minus_sigmoid(node):
    if isinstance(node, sympy.log):
        t = _one_plus(node.args[0])
        if t is not None and isinstance(-t, Sigmoid):
            return -Softplus((-t).args[0])
    return None


def _logcosh(node):
    if isinstance(node, sympy.log) and isinstance(node.args[0], sympy.cosh):
        return LogCosh(node.args[0].args[0])
    return None


def _dominant_sum(node):
    """exp(u) + c*u -> dominant_sum(exp(u), c, u), and u + c*log(u + k) -> dominant_sum(u, c,
    log(u + k)), for c and k free of u's symbols: the Poisson NLL on log-rates and on rates.
    At u = +inf (or where exp(u) and c*u both overflow) the plain sum is inf - inf, and at
    c = 0 it is inf + 0*inf, both NaN; the first term grows faster, so the limit is it (the
    node's C helper returns it there and the plain sum everywhere else). The node is not an
    Add, so the rule cannot fire on its own output."""
    if not node.is_Add:
        return None
    terms = list(node.args)
    for i, a in enumerate(terms):
        if isinstance(a, sympy.exp):
            u, slow = a.args[0], lambda f, u: f == u
        elif a.is_Symbol:
            u, slow = a, lambda f, u: isinstance(f, sympy.log) and f.args[0].has(u) \
                and not (f.args[0] - u).free_symbols & u.free_symbols
        else:
            continue
        if not u.free_symbols:
            continue
        for j, term in enumerate(terms):
            if j == i:
                continue
            factors = sympy.Mul.make_args(term)
            for n, f in enumerate(factors):
                c = sympy.Mul(*factors[:n], *factors[n + 1:])
                if slow(f, u) and not c.free_symbols & u.free_symbols:
                    others = [t for m, t in enumerate(terms) if m not in (i, j)]
                    return sympy.Add(*others, DominantSum(a, c, f))
    return None


def _b_log_b(term):
    """b if `term` is b*log(b) for a non-constant b, else None."""
    for f in sympy.Mul.make_args(term):
        if isinstance(f, sympy.log) and not f.args[0].is_number and term == f.args[0] * f:
            return f.args[0]
    return None


def _deviance(node):
    """x - b*log(x + k) + b*log(b) - b -> bd0(x + k, b) - k (k free of x's symbols, 0 too),
    and exp(u) - b*u + b*log(b) - b -> bd0(exp(u), b): the Poisson NLL plus the t*log(t) - t
    of the Stirling term, on rates and on log-rates. Written out it is a sum of terms of
    size b*log(b) that cancel to b*d**2/2 near x + k = b (d the relative difference), and
    b*log(b) overflows at b = 1.8e308 (inf - inf); bd0 (functions.py) is a series there and
    never forms b*log(b). The node is not an Add, so the rule cannot fire on its output."""
    if not node.is_Add:
        return None
    terms = list(node.args)
    for i, blb in enumerate(terms):
        b = _b_log_b(blb)
        if b is None or -b not in terms:
            continue
        j = terms.index(-b)
        for n, lt in enumerate(terms):
            if n in (i, j):
                continue
            q = -lt / b  # log(x + k), or u for x = exp(u)
            for m, a in enumerate(terms):
                if m in (i, j, n) or not a.free_symbols:
                    continue
                if isinstance(q, sympy.log) and not (q.args[0] - a).free_symbols & a.free_symbols:
                    x, k = q.args[0], q.args[0] - a
                elif isinstance(a, sympy.exp) and a.args[0] == q:
                    x, k = a, sympy.S.Zero
                else:
                    continue
                others = [t for r, t in enumerate(terms) if r not in (i, j, n, m)]
                return sympy.Add(*others, Bd0(x, b), -k)
    return None


def _into_branch(node):
    """x + where(c, y, z) -> where(c, x + y, x + z), only where a branch then matches the
    deviance rule (which it is rewritten by at once): the Stirling term t*log(t) - t sits in
    where(t > 1, ..., 0), apart from the Poisson terms it cancels against."""
    if not node.is_Add:
        return None
    terms = list(node.args)
    for i, pw in enumerate(terms):
        if not isinstance(pw, sympy.Piecewise):
            continue
        rest = sympy.Add(*terms[:i], *terms[i + 1:])
        pieces, hit = [], False
        for value, cond in pw.args:
            whole = rest + value
            new = _deviance(whole)
            hit = hit or new is not None
            pieces.append((whole if new is None else new, cond))
        if hit:
            return sympy.Piecewise(*pieces)
    return None


def _power_quotient(node):
    """x**g / x -> x**(g - 1) (and x**g / (-x) -> -x**(g - 1)) for a non-integer power g:
    sympy's derivative of x**g is g*x**g/x, which is 0/0 = NaN at x = 0 where the true
    value (g > 1) is 0."""
    if not node.is_Mul:
        return None
    factors = list(node.args)
    for i, f in enumerate(factors):
        if not (f.is_Pow and not f.exp.is_Integer):
            continue
        for j, d in enumerate(factors):
            if j == i or not (d.is_Pow and d.exp == -1):
                continue
            sign = 1 if d.base == f.base else -1 if d.base == -f.base else 0
            if sign:
                rest = [h for n, h in enumerate(factors) if n not in (i, j)]
                return sympy.Mul(sign, *rest, sympy.Pow(f.base, f.exp - 1))
    return None


def complement_pairs(node):
    """(f, k, others) for each way the sum `node` holds k - k*f: a term -k*f (f one of its
    factors) and the term k, `others` the rest of the terms. Nothing for a non-sum. Rules of
    the shape k - k*f -> g(k, f) match on f and rebuild Add(*others, g(k, f))."""
    if not node.is_Add:
        return
    terms = list(node.args)
    for i, term in enumerate(terms):
        factors = sympy.Mul.make_args(term)
        for n, f in enumerate(factors):
            k = -sympy.Mul(*factors[:n], *factors[n + 1:])
            if k in terms[:i] + terms[i + 1:]:
                others = terms[:i] + terms[i + 1:]
                others.remove(k)
                yield f, k, others


def _sech2(node):
    """k - k*tanh(u)**2 -> k/cosh(u)**2: 1 - tanh**2 cancels where tanh is near 1 (the true
    value 4e^(-2|u|) comes out 0 from |u| = 19); cosh**2 overflows only where the true value
    underflows."""
    for f, k, others in complement_pairs(node):
        if f.is_Pow and f.exp == 2 and isinstance(f.base, sympy.tanh):
            return sympy.Add(*others, k * sympy.cosh(f.base.args[0])**-2)
    return None


def _log1p(node):
    if isinstance(node, sympy.log):
        u = _one_plus(node.args[0])
        if u is not None and not u.is_number and not isinstance(u, sympy.exp):
            return log1p(u)
    return None


PHASES = (
    Phase("to-stable-nodes", (
        local_rule("sigmoid-ratio", "exp(u)/(1 + exp(u))", "sigmoid(u)", _sigmoid_ratio),
        local_rule("sigmoid", "1/(1 + exp(-u))", "sigmoid(u)", _sigmoid),
        local_rule("softplus", "log(1 + exp(u))", "softplus(u)", _softplus),
        local_rule("log-sigmoid", "log(sigmoid(u))", "-softplus(-u)", _log_sigmoid),
        local_rule("log-1m-sigmoid", "log(1 - sigmoid(u))", "-softplus(u)", _log_one_minus_sigmoid),
        local_rule("logcosh", "log(cosh(u))", "logcosh(u)", _logcosh),
        local_rule("deviance", "x - b*log(x + k) + b*log(b) - b", "bd0(x + k, b) - k", _deviance),
        local_rule("into-branch", "x + where(c, y, z)", "where(c, x + y, x + z)", _into_branch),
        local_rule("dominant-sum", "exp(u) + c*u", "dominant_sum(exp(u), c, u)", _dominant_sum),
    )),
    Phase("precision", (
        local_rule("sigmoid-minus-1", "k*sigmoid(u) - k", "-k*sigmoid(-u)",
                   _complement(Sigmoid, lambda k, u: -k * Sigmoid(-u))),
        local_rule("expm1", "k*exp(u) - k", "k*expm1(u)",
                   _complement(sympy.exp, lambda k, u: k * expm1(u))),
        local_rule("log1p", "log(1 + u)", "log1p(u)", _log1p),
        local_rule("power-quotient", "x**g / x", "x**(g - 1)", _power_quotient),
        local_rule("sech2", "1 - tanh(u)**2", "1/cosh(u)**2", _sech2),
    )),
)
PHASE_NAMES = tuple(p.name for p in PHASES)
RULES = {r.name: r for p in PHASES for r in p.rules}


def stabilize(expr, phases: Sequence[str] = PHASE_NAMES,
              extra: Mapping[str, Iterable[Rule]] | None = None):
    """Run the named phases, in PHASES order, each to a fixed point.

    extra maps a phase name to more rules, run after that phase's own. Returns
    (expr, fired): fired holds (rule name, matched text, replacement text) per rewrite, in
    the order they happened.
    """
    phases = (phases,) if isinstance(phases, str) else tuple(phases)
    extra = dict(extra or {})
    unknown = (set(phases) | set(extra)) - set(PHASE_NAMES)
    if unknown:
        raise ValueError(f"unknown stabilize phase(s) {sorted(unknown)} "
                         f"(known: {', '.join(PHASE_NAMES)})")
    fired: list = []
    for phase in PHASES:
        if phase.name not in phases:
            continue
        rules = (*phase.rules, *extra.get(phase.name, ()))
        for _ in range(MAX_ROUNDS):
            before = expr
            for rule in rules:
                def report(old, new, name=rule.name):
                    fired.append((name, str(old), str(new)))

                expr = rule.apply(expr, report)
            if expr == before:
                break
        else:
            raise RuntimeError(f"internal: stabilize phase '{phase.name}' did not settle "
                               f"after {MAX_ROUNDS} rounds on {expr}")
    return expr, tuple(fired)
