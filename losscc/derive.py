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


def derive(spec: LossSpec) -> SymbolicLoss:
    symbols = symbols_for(spec)
    pred = symbols[spec.pred.name]
    variants = []
    for options in spec.variant_combos():
        value = parse_spec_math(spec, options, symbols)
        _check_free_symbols(spec, value, symbols)
        grads = tuple(tidy(sympy.diff(value, symbols[i.name])) for i in spec.differentiable)
        raw_hess = sympy.diff(grads[0], pred)
        notes = []
        if raw_hess.has(sympy.DiracDelta):
            notes.append("the second derivative has a point mass at a kink; it is emitted as its "
                         "value away from the kink")
        hess = tidy(raw_hess)
        if hess == 0:
            notes.append("the second derivative is 0 almost everywhere: gradient boosting cannot "
                         "split on this loss")
        variants.append(SymbolicVariant(
            key=variant_key(options), options=dict(options), value=tidy(value), grads=grads,
            hess=hess, notes=tuple(notes),
        ))
    return SymbolicLoss(spec=spec, symbols=symbols, variants=tuple(variants))


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
    known = set(symbols.values())
    stray = value.free_symbols - known
    if stray:  # cannot happen through the parser; a guard for future stages
        raise SpecError(spec.loss.loc, f"loss uses unknown symbols {sorted(map(str, stray))}")
