"""Stable special functions as sympy nodes that know their own stable derivative.

Each node stays opaque to sympy's simplifier (none defines a rewrite to exp), prints as a C
helper from templates/prelude.h.j2, and has `naive()` — the textbook formula — for tests.
"""

from __future__ import annotations

import sympy
from sympy import S


class Sigmoid(sympy.Function):
    """sigmoid(x) = 1 / (1 + exp(-x)), evaluated on the side where exp cannot overflow.

    d/dx sigmoid(x) = sigmoid(x) * sigmoid(-x): never s * (1 - s), which cancels to 0
    long before the true value underflows.
    """

    nargs = 1

    @classmethod
    def eval(cls, x):
        if x.is_zero:
            return S.Half
        if x is S.Infinity:
            return S.One
        if x is S.NegativeInfinity:
            return S.Zero
        return None

    def fdiff(self, argindex=1):
        x = self.args[0]
        return Sigmoid(x) * Sigmoid(-x)

    def _eval_is_real(self):
        return self.args[0].is_real

    def _eval_is_positive(self):
        return self.args[0].is_real

    def naive(self):
        return 1 / (1 + sympy.exp(-self.args[0]))

    def _eval_evalf(self, prec):
        return self.naive()._eval_evalf(prec)


class Softplus(sympy.Function):
    """softplus(x) = log(1 + exp(x)), computed as max(x, 0) + log1p(exp(-|x|)).

    d/dx softplus(x) = sigmoid(x).
    """

    nargs = 1

    @classmethod
    def eval(cls, x):
        if x.is_zero:
            return sympy.log(2)
        if x is S.Infinity:
            return S.Infinity
        if x is S.NegativeInfinity:
            return S.Zero
        return None

    def fdiff(self, argindex=1):
        return Sigmoid(self.args[0])

    def _eval_is_real(self):
        return self.args[0].is_real

    def _eval_is_positive(self):
        return self.args[0].is_real

    def naive(self):
        return sympy.log(1 + sympy.exp(self.args[0]))

    def _eval_evalf(self, prec):
        return self.naive()._eval_evalf(prec)


class LogCosh(sympy.Function):
    """logcosh(x) = log(cosh(x)), computed as |x| + log1p(exp(-2|x|)) - log 2, and for
    |x| < 1, where that cancels, as log1p(expm1(|x|) * -expm1(-|x|) / 2) (cosh(x) - 1 =
    (e^x - 1)(1 - e^-x) / 2). Exact 0 at 0; never overflows; within 3 ulps.

    d/dx logcosh(x) = tanh(x).
    """

    nargs = 1

    @classmethod
    def eval(cls, x):
        if x.is_zero:
            return S.Zero
        if x in (S.Infinity, S.NegativeInfinity):
            return S.Infinity
        return None

    def fdiff(self, argindex=1):
        return sympy.tanh(self.args[0])

    def _eval_is_real(self):
        return self.args[0].is_real

    def _eval_is_nonnegative(self):
        return self.args[0].is_real

    def naive(self):
        return sympy.log(sympy.cosh(self.args[0]))

    def _eval_evalf(self, prec):
        return self.naive()._eval_evalf(prec)


STABLE_NODES = (Sigmoid, Softplus, LogCosh)


def naive(expr):
    """`expr` with every stable node replaced by its textbook formula (for tests and mpmath)."""
    return expr.replace(lambda e: isinstance(e, STABLE_NODES), lambda e: e.naive())
