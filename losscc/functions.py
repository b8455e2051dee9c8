"""Stable special functions as sympy nodes that know their own stable derivative.

Each node stays opaque to sympy's simplifier (none defines a rewrite to exp), prints as a C
helper from templates/prelude.h.j2, and has `naive()` — the textbook formula — for tests.
"""

from __future__ import annotations

import sympy
from sympy import S
from sympy.core.logic import fuzzy_and


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


class DominantSum(sympy.Function):
    """dominant_sum(a, c, b) = a + c*b, for a term a that outgrows c*b as the input grows
    (exp(u) + c*u, u + c*log(u + k): stabilize's "dominant-sum" rule). At an infinite input
    b, where IEEE gives NaN for a + c*b although no argument is NaN, it is the limit, a:
    inf - inf (a = inf, c*b = -inf, the faster term wins) or c = 0 (0*inf: the term c*b is 0
    for every finite b). Otherwise it is exactly a + c*b; where both terms overflowed from a
    finite input, a = exp(b) compares their logs (lcc_dominant_exp), any other a stays NaN.

    d/da = 1, d/dc = b, d/db = c: its derivatives are plain sums, which do not meet inf - inf
    (the Poisson gradient exp(u) - t is finite until exp overflows, and then +inf is right).
    """

    nargs = 3

    def fdiff(self, argindex=1):
        a, c, b = self.args
        return (S.One, b, c)[argindex - 1]

    def _eval_is_real(self):
        return fuzzy_and(x.is_real for x in self.args)

    def naive(self):
        a, c, b = self.args
        return a + c * b


class Exprel(sympy.Function):
    """exprel(t) = expm1(t) / t, 1 at t = 0 (where the quotient is 0/0); computed as that
    quotient elsewhere (expm1 keeps its digits near 0). t / expm1(t) = 1 / exprel(t) is
    log(p) / (p - 1) with log(p) = t: finite and near 1 as p -> 1.

    d/dt exprel(t) = (t exp(t) - expm1(t)) / t**2 (only a second derivative needs it).
    """

    nargs = 1

    @classmethod
    def eval(cls, x):
        if x.is_zero:
            return S.One
        return None

    def fdiff(self, argindex=1):
        t = self.args[0]
        return (t * sympy.exp(t) - (sympy.exp(t) - 1)) / t**2

    def _eval_is_real(self):
        return self.args[0].is_real

    def _eval_is_positive(self):
        return self.args[0].is_real

    def naive(self):
        return (sympy.exp(self.args[0]) - 1) / self.args[0]

    def _eval_evalf(self, prec):
        return self.naive()._eval_evalf(prec)


class Bd0(sympy.Function):
    """bd0(x, t) = x - t - t*log(x/t) = t*(r - 1 - log r) with r = x/t: the Poisson
    deviance (Loader's "bd0", the saddle-point term of dbinom/dpois), >= 0 for x, t >= 0 and
    0 at x = t. stabilize's "deviance" rule makes it of the Poisson NLL plus the Stirling term:
    p - t*log(p + eps) + t*log(t) - t = bd0(p + eps, t) - eps and exp(u) - t*u + t*log(t) - t
    = bd0(exp(u), t). Written out, those are sums of terms of size t*log(t) that cancel to
    t*(x - t)**2/(2*t**2) near x = t (and t*log(t) overflows at t = 1.8e308).

    Printed as lcc_bd0(x, t, x - t, lo) with x - t summed from x's own terms and lo that
    sum's roundings (codegen.py, deviance-difference): near x = t the value needs x - t to
    its last digit, which fl(p + eps) - t has lost, and elsewhere bd0's conditioning (up to
    2.6) makes every rounding 2-3 ulps. The helper sums a series in v = (x - t)/(x + t) for
    x/t in (1/2, 2), takes log(x/t) to 2^-60 elsewhere, and keeps each rounding: within
    0.75 ulps of the truth (tests/test_stabilize.py).

    d/dx = 1 - t/x (the written gradient 1 - t/(p + eps); for x = exp(u) it is (x - t)/x, so
    the chain rule's factor exp(u) cancels to exp(u) - t, the written one too), d/dt =
    -log(x/t). 0 at x = t; for t = 0 the written t*log(t) is NaN, so no value is assumed.
    """

    nargs = 2

    @classmethod
    def eval(cls, x, t):
        if x == t:
            return S.Zero
        return None

    def fdiff(self, argindex=1):
        x, t = self.args
        if argindex == 1:
            return (x - t) / x if isinstance(x, sympy.exp) else 1 - t / x
        return -sympy.log(x / t)

    def _eval_is_real(self):
        return fuzzy_and(a.is_nonnegative for a in self.args) or None

    def naive(self):
        x, t = self.args
        return x - t - t * sympy.log(x / t)

    def _eval_evalf(self, prec):
        return self.naive()._eval_evalf(prec)


STABLE_NODES = (Sigmoid, Softplus, LogCosh, DominantSum, Exprel, Bd0)


def naive(expr):
    """`expr` with every stable node replaced by its textbook formula (for tests and mpmath)."""
    return expr.replace(lambda e: isinstance(e, STABLE_NODES), lambda e: e.naive())
