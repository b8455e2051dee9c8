"""Derive stage: sympy takes the gradient of every differentiable input and the second
derivative w.r.t. the prediction, then tidies the results for code generation.

Tidying is deliberately conservative. sympy's full `simplify` was tried and rejected: it
fuses -z/(e + x) + (1 - z)/(1 - x + e) into (2ez - e - x + z)/(x**2 - x - e**2 - e), whose
denominator cancels catastrophically near x = 1. We only pull out common factors
(`factor_terms`, which never combines fractions) and fix the kinks (below); `cse` in the
codegen stage then shares every repeated subexpression between value, gradient and
second derivative.
"""

from __future__ import annotations

import sympy

from .errors import SpecError
from .expr import parse_spec_math, symbols_for
from .ir import LossSpec, SymbolicLoss, SymbolicVariant, variant_key
from .rows import NCLASS, ROW_PRECISION_RULES, ROW_RULES, derive_row
from .stabilize import stabilize


def derive(spec: LossSpec) -> SymbolicLoss:
    symbols = symbols_for(spec)
    pred = symbols[spec.pred.name]
    variants = []
    for options in spec.variant_combos():
        if spec.is_row:
            variants.append(_derive_row(spec, options, symbols))
            continue
        value = parse_spec_math(spec, options, symbols)
        _check_free_symbols(spec, value, symbols)
        # Stable nodes before differentiating, so the derivatives are stable nodes too
        # (softplus' is sigmoid); the precision rules again on what tidy made of them.
        value, fired = stabilize(value)
        fired = list(fired)
        grads = tuple(_tidied(sympy.diff(value, symbols[i.name]), fired) for i in spec.differentiable)
        raw_hess = sympy.diff(grads[0], pred)
        notes = []
        if raw_hess.has(sympy.DiracDelta):
            notes.append("the second derivative has a point mass at a kink; it is emitted as its "
                         "value away from the kink")
        hess = _tidied(raw_hess, fired)
        if hess == 0:
            notes.append("the second derivative is 0 almost everywhere: gradient boosting cannot "
                         "split on this loss")
        variants.append(SymbolicVariant(
            key=variant_key(options), options=dict(options), value=_tidied(value, fired), grads=grads,
            hess=hess, notes=tuple(notes), rewrites=tuple(dict.fromkeys(fired)),
        ))
    return SymbolicLoss(spec=spec, symbols=symbols, variants=tuple(variants))


def _derive_row(spec, options, symbols, plain=False) -> SymbolicVariant:
    """A row loss: lowered to row scalars, with losscc's chain rule over them (rows.py).
    plain: the variant with the optional inputs absent and the params at their defaults."""
    loss, row = parse_spec_math(spec, options, symbols)
    _check_free_symbols(spec, loss, {*symbols.values(), NCLASS, *row.gathers,
                                     *(i for i, _ in row.indices.values())})
    absent = tuple(i.name for i in spec.inputs if i.default is not None and not i.differentiable)
    key = variant_key(options)
    if plain:
        fixed = {p.name: p.default for p in spec.params if symbols[p.name] in loss.free_symbols}
        subs = {symbols[n]: _constant(v) for n, v in fixed.items()}
        defaults = {i.name: i.default for i in spec.inputs if i.name in absent}
        subs.update({symbols[n]: _constant(v) for n, v in defaults.items()})
        subs.update({g: _constant(defaults[src]) for g, (src, _) in row.gathers.items() if src in defaults})
        loss = loss.xreplace(subs)
        for g in [g for g in row.gathers if g not in loss.free_symbols]:
            del row.gathers[g]
        key += "__plain"
    kinds = {i.name: "row" if i.name in row.rows else "index" if i.name in row.used_as_index
             else "scalar" for i in spec.inputs}
    wrt = [i.name for i in spec.differentiable]
    for name in wrt:
        if kinds[name] != "row":
            raise SpecError(spec.loc, f"input '{name}' is differentiable but holds class indices in "
                                      f"variant {variant_key(options)}")
    elements = {symbols[n]: n for n in row.rows}
    # The row rules (log(sum(exp(e))) -> logsumexp(e), ...) join the stable-node phase.
    loss, fired = stabilize(loss, extra={"to-stable-nodes": ROW_RULES})
    fired = list(fired)
    prog = derive_row(loss, elements, row.gathers, wrt)
    extra = {"precision": ROW_PRECISION_RULES}
    prog.value = _tidied(prog.value, fired, extra)
    prog.grads = {n: _tidied(g, fired, extra) for n, g in prog.grads.items()}
    if plain:
        which = {"absent": absent, "fixed": fixed}
    else:
        which = {"plain": _derive_row(spec, options, symbols, plain=True) if absent else None}
    return SymbolicVariant(key=key, options=dict(options), value=prog.value,
                           grads=tuple(prog.grads[n] for n in wrt), hess=None, program=prog,
                           kinds=kinds, rewrites=tuple(dict.fromkeys(fired)), **which)


def _constant(v):
    """A default as sympy folds it: 1.0 as 1, so that 1*x is x and 0*x is 0."""
    return sympy.Integer(int(v)) if float(v).is_integer() else sympy.Float(v)


def _tidied(expr, fired: list, extra=None):
    """The precision rewrites (and `extra` rules by phase) on a raw derivative (x**g/x is
    still one product there), tidy, then the precision rewrites again (sigmoid(x) - 1 turns
    up once kinks are tidied); what fires is appended to `fired`."""
    expr, more = stabilize(expr, phases=("precision",), extra=extra)
    fired.extend(more)
    expr, more = stabilize(tidy(expr), phases=("precision",), extra=extra)
    fired.extend(more)
    return expr


def tidy(expr):
    """Kinks made explicit and common factors pulled out.

    - Heaviside(x) -> Heaviside(x, 0): the derivative of max(x, 0) at 0 is 0, PyTorch's
      choice for ReLU-style kinks (sympy's default H(0) = 1/2 matches no library).
    - Heaviside(x)**n -> Heaviside(x), for n > 0.
    - DiracDelta(x) -> 0: a point mass has no value at a float input other than the kink.
    """
    expr = expr.replace(lambda e: isinstance(e, sympy.DiracDelta), lambda e: sympy.S.Zero)
    expr = expr.replace(lambda e: isinstance(e, sympy.Heaviside),
                        lambda e: sympy.Heaviside(e.args[0], 0))
    expr = expr.replace(
        lambda e: e.is_Pow and isinstance(e.base, sympy.Heaviside) and e.exp.is_positive,
        lambda e: e.base)
    return sympy.factor_terms(expr)


def _check_free_symbols(spec, value, symbols):
    known = set(symbols.values()) if isinstance(symbols, dict) else set(symbols)
    stray = value.free_symbols - known
    if stray:  # cannot happen through the parser; a guard for future stages
        raise SpecError(spec.loss.loc, f"loss uses unknown symbols {sorted(map(str, stray))}")
