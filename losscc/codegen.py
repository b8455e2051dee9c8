"""Codegen stage: sympy expressions -> C through a strict printer and jinja2 templates.

One template per kernel shape (templates/elementwise.c.j2); Python only prepares the
statements of each kernel body. Every loss gets, per variant and per dtype, three
kernels: value (v), value+gradient (vg) and value+gradient+second derivative (vgh).
Each kernel's outputs go through one `cse` call, so shared subexpressions are computed
once per element.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import jinja2
import sympy
from sympy.codegen.ast import float64, real
from sympy.codegen.cfunctions import expm1
from sympy.printing.c import C99CodePrinter
from sympy.printing.precedence import PRECEDENCE, precedence

from . import __version__
from .errors import BuildError
from .functions import Exprel, LogCosh, Sigmoid, Softplus
from . import rows
from .ir import KernelSource, SymbolicLoss
from .resources import templates_dir


@dataclass(frozen=True)
class CType:
    """A dtype the kernels take and return. Every kernel computes in double whatever it
    stores: a float32 kernel widens its inputs, computes in double and rounds each output
    once, so its results are within about half an ulp of float32 wherever the double
    computation is accurate to 2^-29 (overflow at 3.4e38 in an intermediate, a cancellation
    of up to 2^29 and float32's 7 digits in exp's argument all disappear)."""

    name: str  # C storage type
    suffix: str  # of kernel names: f32 / f64
    numpy: str  # numpy dtype name


DTYPES = (CType("float", "f32", "float32"), CType("double", "f64", "float64"))
COMPUTE = "double"  # the C type every kernel computes in
MODES = ("v", "vg", "vgh")
# The C of one variant's kernels (one compile unit, the prelude apart). The specs here make
# at most 64 KiB; gcc -O2 takes some 45 s on 200 KiB of row kernels (and 700 MiB).
MAX_UNIT_CHARS = 192 * 1024


# Factors equal to e^u (to within 2^-1022 of it) wherever they are below the normal range
# (exp-scale in LossCPrinter): sigmoid(u) = e^u/(1 + e^u), softplus(u) = log1p(e^u).
EXP_LIKE = (sympy.exp, Sigmoid, Softplus)

_LARGE = re.compile(r"x_|xg\d|m\d")  # inputs, gathered elements, logsumexp max shifts


def reads_input(expr, input_temps) -> bool:
    """True if `expr` reads an input (x_*, or in a row kernel an element gathered at a class,
    xg*, or a row max shift, m*), directly or through a cse temporary that does. These are
    the terms of the size of the data; the printer sums them first."""
    return any(_LARGE.match(s.name) or s.name in input_temps for s in expr.free_symbols)


def is_data_term(expr, data_temps=frozenset()) -> bool:
    """True if `expr` is k * s for a number k and s an input element, a gathered element or a
    row max shift (or a cse temporary that is one of those times a number): the terms of a
    log-softmax x_j - m that must meet before anything smaller is added to either."""
    if not isinstance(expr, sympy.Expr):
        return False
    _, s = expr.as_coeff_Mul()
    return isinstance(s, sympy.Symbol) and (_LARGE.match(s.name) is not None or s.name in data_temps)


def _shift_temps(temps) -> frozenset:
    """The names of cse temporaries that are data terms (-x_pred, say)."""
    out: set = set()
    for t, e in temps:
        if is_data_term(e, out):
            out.add(t.name)
    return frozenset(out)


class LossCPrinter(C99CodePrinter):
    """sympy's C99 printer, strict, with losscc's function table and numeric choices.

    - Stable nodes and kinks print as helpers from templates/prelude.h.j2 (NaN propagates
      through every one of them; fmax/fmin would drop it).
    - Small integer powers print as products, never pow().
    - Constants print as one correctly rounded literal (1/3 -> 0.3333333333333333), never
      as a division or a M_PI macro that strict C99 lacks.
    - Sums print literals first, then the terms that read inputs, then parameters: sympy's
      Add forgets the written association, and `1 - p + eps` must stay `(1 - p) + eps` so
      that eps survives at p = 1 in float32.
    - A sum that holds a row max shift m adds its data terms (k * x, k * m) first, before
      even the literals: log_softmax is (x_j - m) - r, and 1 + m - x + log(q) + r must
      not round 1 and log(q) away in m + 1 where m = x = 6e247 (KL's d/dlabel).

    Lowerings: math-identical forms chosen by how a sum is evaluated in floating point. They
    live here, not in stabilize.py, because the order of a sum's additions exists only once
    cse has named the shared parts (a stabilize node holding `(p - t) + eps` would be split
    by cse into the temporary p + eps, shared with log(p + eps), and `t0 - t`); the printer
    sees a temporary's definition (temp_defs) and re-associates its terms. Each prints a C
    helper whose fallback is the plain form, so none can fire on its own output.

      log-near-1   log(S) -> lcc_log_near1(S, S - 1)       (S a sum with the literal 1, or
                                                          with one term that reads an input)
          |S - 1| < 1/2: log1p(S - 1), where S - 1 has the literal folded in (1 - p + eps ->
          -p + eps; p + eps -> (p - 1) + eps, exact for p in [1/2, 2] by Sterbenz). Else
          log(S), S summed as written ((1 - p) + eps, so eps survives at p = 1). log(1 + 1e-12)
          is 1e-12 - 5e-25; log of the rounded sum is off by 9e-17, 1e-4 relative.
      log-scaled   log(k*u) -> lcc_log_scaled(k, u)       (k a positive number, not 1)
          k*u past the float range (or below the normal range): log(k) + log(u), which has
          no cancellation there (|log(k*u)| > 708); else log(k*u). The Stirling term's
          log(2*pi*t) was inf from t = 2.9e307 (then NaN: t*log(t) - inf... ), the truth
          is 354.8.
      exp-sub      A*exp(u) + S -> lcc_exp_sub(exp(u), u, A, S, A*exp(u))  (S reads an input)
          -S/A within a factor 2 of 1: (A + S)*exp(u) - S*expm1(u), where A + S is exact (by
          Sterbenz) and 0 for a one-hot label (softmax - label at the label: sum(label)*p - 1
          = expm1(log p)); else A*exp(u) + S, A*exp(u) printed as a product (exp-scale:
          a class weight 1.8e308 times a softmax weight exp(-751.4), 0 in double, is 8.3e-19).
          The Poisson gradient exp(p) - t at t = 1 too.
      leave-one-out  inside exp-sub: A + S with k*r - k*e_j (r = sum(e), e_j its term at
          class j) -> k*lo, lo = (j == jb ? ex : r - e_j), where the sum's pass also keeps
          ex, the sum without its largest term, at jb (lcc_exp_sub_loo). sum(w) - w_j at the
          dominant w_j rounds the others away: w = [7e-233, 8.8e-41] gave 0, truth 9.1e-234.
          Of several sums at once in any gradient sum, where their terms at j cancel only
          together (_leave_many_out): the projection through a unit vector (rows._unit_partial).
      sub-ratio    k - a/b -> lcc_sub_ratio(k, a/b, k*b - a, b)
          a/b within a factor 2 of k: (k*b - a)/b, with k*b's terms spread and summed with
          a's before the rest (1 - t/(p + eps) -> ((p - t) + eps)/(p + eps): p - t is exact
          there, by Sterbenz). Else, or where k*b - a overflows, k - a/b. k - a/b rounds a/b
          to half an ulp of k, which is all the digits of a result near 0.
      quotient-chain  a/b**2 -> a/b/b                      (b**-n, n <= 8, two or more
                                                          in all; 1/(b**2*c**2) -> 1/b/b/c/c)
          b*b overflows (b = 3e244) or underflows where a/b/b is a normal number: the
          Poisson t/(p + eps)**2 = 3e-245 came out 0, log_cosh's 1/(s**2*cosh(u)**2) too
          (cosh(375)**2 overflows; the true value is 7e-318). The same number of roundings.
          A plain power 1/b**2 keeps 1.0/(b*b): there b*b overflows only where the result
          underflows.
      deviance-difference  bd0(x, t) -> lcc_bd0(x, t, x - t, lo)   (x - t with x's terms
                                                          spread, lo their roundings)
          bd0 near x = t is t*d**2/2 for d = (x - t)/t, so it needs x - t to its last digit:
          x = p + eps gives (p - t) + eps, where fl(p + eps) - t keeps the rounding of
          p + eps, 2/d ulps of the result. Nor is that sum exact: away from x = t (p - t is
          exact only by Sterbenz, x/t in [1/2, 2]) bd0's conditioning reaches 2.6 (x/t = 1/3),
          so its two roundings cost up to 4 ulps; lo = lcc_sum_lo(S_k, a_k+1) summed over
          the additions (two-sum: x - t = d + lo to 2^-106), and lcc_bd0 keeps every
          rounding of its own (the Poisson loss at p = 3177.34, t = 9390.22 was 5.2 ulps off,
          now 0.2). A sum that printed through a lowering passes lo = 0.0. x = exp(u) gives
          exp(u) - t (exp's own rounding: its error is d*t ulps of 1, inside the
          conditioning u*(exp(u) - t) of the written formula), and prints as
          lcc_bd0_exp(x, t, d, u): where exp(u) underflows or overflows, log(x) is u.
      pow-1mexp    (-expm1(t))**g -> lcc_pow_1mexp(-expm1(t), t, g)   (g not a small integer)
          Where 1 - e^t is above 1 - 1/e, exp(g*log1p(-exp(t))): pow of the rounded base
          multiplies its half-ulp rounding by g, which is every digit the inputs carry there
          (the focal loss's (1 - p)**95 at p = 3.8e-7 was 27.5 ulps off; log(1 - p) keeps
          p's digits). Below, pow: the base is accurate to its last bit and |log(1 - p)| > 1/2
          would make exp(g*L) amplify L's rounding by more than pow does.
      exp-scale    a*f -> lcc_mul_exp(a*f, a, u, lo)     (f = exp(u), sigmoid(u) or
                                                          softplus(u), maybe a cse temporary
                                                          or inside one; a not 1 or -1)
          Where f is below the normal range (u < -708) it is e^u, rounded to a subnormal with
          few significant bits or none, and a*f multiplies that rounding by a: sigmoid_bce's
          d2/dpred2 = ((1 - z) + w*z)*sigmoid(x)*sigmoid(-x) at x = 742.38, w = 272.6 was
          1.0776e-320 for 1.0550e-320, 45.6 units of 2^-1074. There (a*e^(u/2))*e^(u/2),
          rounded once to the subnormal range (lo: u's rounding where exp(u) is an exact
          lcc_exp_sum). Two such factors (sigmoid(x)*sigmoid(-x)): lcc_mul_exp2, the one
          below the normal range scaled, after a times the other. A product of the
          temporary (-t8) or three such factors prints plainly.
      zero-branch  x*where(c, 0, k) -> where(c, 0, x*k)    (the where a factor, or a cse
                                                          temporary holding one)
          The 0 branch stays a select: x is not multiplied where it is taken. sympy keeps a
          where as a factor of what it scales (the adjoint where(s == 0, 0, s/C) of label
          smoothing's mean times the gradient's sum of class weights), and IEEE makes that
          0*inf = NaN where the sum overflowed: class_weight [1.8e308, 9e307, 14] at
          label_smoothing = 0 gave a NaN gradient, the truth -9.559 (`losscc check`). In the
          branch taken the same product is formed.
      scaled-factor  k*r<n>/d -> lcc_psum_scale(k, d, &ps<n>)   (r<n> a row sum of
                                                          ScaledProducts, rows.py scaled-sum)
          The terms out of range are held as mantissas and a power-of-two exponent
          (lcc_psum_add; the others as a plain sum); k joins the mantissa before it
          becomes a double, so k*sum is finite where the sum is not:
          label_smoothing/C * sum(class_weight * -logp) = 1.9e307, the sum 1.8e308 * 7.7 +
          ... = inf. The roundings of k*r/d: one for k*r or r/d (cosine's dot / epsilon).
    """

    HELPERS = {Sigmoid: "lcc_sigmoid", Softplus: "lcc_softplus", LogCosh: "lcc_logcosh",
               Exprel: "lcc_exprel"}  # DominantSum: _print_DominantSum

    def __init__(self, input_temps=frozenset(), temp_defs=None, data_temps=frozenset(),
                 row_sums=None, local_temps=frozenset(), scaled_sums=None):
        super().__init__({"type_aliases": {real: float64}, "strict": True, "math_macros": {}})
        self.input_temps = input_temps  # names of cse temporaries that depend on an input
        self.temp_defs = dict(temp_defs or {})  # cse temporary (Symbol) -> its expression
        self.data_temps = data_temps  # names of cse temporaries that are data terms (is_data_term)
        # leave-one-out: row sum symbol r<n> -> (n, its summand); the sums whose
        # leave-one-out form was printed are added to loo_used (their pass tracks it)
        self.row_sums = dict(row_sums or {})
        self.local_temps = local_temps  # temporaries of this block (per class), not row ones
        # scaled-factor: row sum symbol r<n> -> n, for the sums accumulated scaled (ps<n>:
        # lcc_psum_add), which a product reads before they become a double
        self.scaled_sums = dict(scaled_sums or {})
        self.loo_used = set()
        self._plain_mul = False  # printing exp-scale's fallback
        self.eager = False  # Piecewise as lcc_select (_print_Piecewise)
        self._loo = {}  # lo<n> symbol -> (n, r<n>, summand)

    def _seen(self, expr):
        """`expr` with the cse temporaries it uses replaced by their definitions (one level):
        what a lowering matches on. Printing still uses `expr`, the temporaries' values."""
        subs = {s: self.temp_defs[s] for s in expr.free_symbols if s in self.temp_defs}
        return expr.xreplace(subs) if subs else expr

    def _reads(self, expr) -> bool:
        return not expr.is_Number and reads_input(expr, self.input_temps)

    def _print(self, expr, **kwargs):
        # A constant subexpression (log(2), sqrt(2)/pi) is one correctly rounded literal.
        if isinstance(expr, sympy.Expr) and expr.is_number and not expr.is_Integer:
            value = expr.evalf(30)
            if not value.is_real:
                raise BuildError(f"constant {expr} is not a real number")
            return self._literal(float(value))
        return super()._print(expr, **kwargs)

    # helpers with a branch around lcc_exp or lcc_log, which have a branch-free twin
    # (name_eager in prelude.h.j2) for eager printing (a vector loop's body: _print_Piecewise)
    EAGER = frozenset({"lcc_log_near1", "lcc_log_scaled", "lcc_mul_exp", "lcc_mul_exp2", "lcc_exp_sub",
                       "lcc_exp_sub_loo"})

    def _name(self, helper: str) -> str:
        return f"{helper}_eager" if self.eager and helper in self.EAGER else helper

    def helper(self, name: str, *args) -> str:
        return f"{self._name(name)}({', '.join(self._print(a) for a in args)})"

    def _print_Function(self, expr):
        helper = self.HELPERS.get(type(expr))
        if helper is not None:
            return self.helper(helper, *expr.args)
        return super()._print_Function(expr)

    def _print_Quotient(self, expr):
        """a / b as one division, whatever sympy would make of the product around it."""
        a, b = expr.args
        return f"({self.parenthesize(a, PRECEDENCE['Mul'] - 1)}/{self.parenthesize(b, PRECEDENCE['Mul'])})"

    def _print_ScaledProduct(self, expr):
        """a * b outside a row sum's pass (there the pass forms it scaled, lcc_psum_add)."""
        a, b = expr.args
        return f"({self.parenthesize(a, PRECEDENCE['Mul'])}*{self.parenthesize(b, PRECEDENCE['Mul'])})"

    def _print_sign(self, expr):
        return self.helper("lcc_sign", *expr.args)

    def _print_Heaviside(self, expr):
        if len(expr.args) != 2 or expr.args[1] != 0:
            raise BuildError(f"internal: Heaviside {expr} reached codegen without H(0) = 0")
        return self.helper("lcc_step", expr.args[0])

    def _print_Max(self, expr):
        return self._fold("lcc_max", expr.args)

    def _print_Min(self, expr):
        return self._fold("lcc_min", expr.args)

    def _fold(self, name, args):
        out = self._print(args[0])
        for a in args[1:]:
            out = f"{name}({out}, {self._print(a)})"
        return out

    def _print_Rational(self, expr):
        return self._literal(float(expr))

    def _print_Float(self, expr):
        return self._literal(float(expr))

    def _print_NumberSymbol(self, expr):
        return self._literal(float(expr.evalf(20)))

    _print_Pi = _print_Exp1 = _print_NumberSymbol

    def _print_Integer(self, expr):
        return self._literal(float(expr)) if abs(int(expr)) > 2**24 else str(int(expr))

    def _literal(self, value: float) -> str:
        if value != value or value in (float("inf"), float("-inf")):
            raise BuildError(f"constant {value} is not finite")
        text = repr(value)
        if "e" not in text and "." not in text:
            text += ".0"
        return text

    def _print_Pow(self, expr):
        base, exp = expr.base, expr.exp
        prec = precedence(expr)
        if exp.is_Integer and 1 <= abs(int(exp)) <= 8:
            product = "*".join([self.parenthesize(base, prec)] * abs(int(exp)))
            return f"({product})" if int(exp) > 0 else f"{self._literal(1.0)}/({product})"
        if exp == sympy.S.Half:
            return f"sqrt({self._print(base)})"
        if exp == -sympy.S.Half:
            return f"{self._literal(1.0)}/sqrt({self._print(base)})"
        b = self.temp_defs.get(base, base) if base.is_Symbol else base
        if isinstance(-b, expm1):
            return self.helper("lcc_pow_1mexp", base, (-b).args[0], exp)
        return f"pow({self._print(base)}, {self._print(exp)})"

    def _terms(self, expr, order=None) -> list:
        """The terms of a sum in the order they are added: literals, then the terms that
        read inputs, then the rest (sympy's order within each group)."""
        terms = self._as_ordered_terms(expr, order=order)
        shifted = any(is_data_term(t) and t.as_coeff_Mul()[1].name[0] == "m" for t in terms)

        def rank(term):
            if shifted and is_data_term(term, self.data_temps):
                return -1
            if term.is_Number:
                return 0
            return 1 if reads_input(term, self.input_temps) else 2

        return sorted(terms, key=rank)

    def _print_exp(self, expr):
        """exp(a + b [+ c]) of two or more terms that read inputs (x_j - max in a softmax)
        sums its argument exactly first (lcc_exp_sum2/3 in prelude.h.j2): exp amplifies the
        rounding of a - b by |a - b|, some 600 ulps at a difference of 600."""
        arg = expr.args[0]
        if arg.is_Add:
            terms = self._terms(arg)
            if sum(1 for t in terms if not t.is_Number and reads_input(t, self.input_temps)) >= 2:
                parts = terms[:2] + ([sympy.Add(*terms[2:])] if len(terms) > 2 else [])
                return self.helper(f"lcc_exp_sum{len(parts)}", *parts)
        return f"lcc_exp({self._print(arg)})"  # prelude.h.j2: libm's accuracy, vectorizable

    def _print_log(self, expr):
        """log-near-1 and log-scaled (the class docstring)."""
        arg = expr.args[0]
        s = self._seen(arg) if arg.is_Symbol else arg
        if s.is_Add:
            c, rest = s.as_coeff_add()
            if c == 1 or sum(1 for t in rest if self._reads(t)) == 1:
                return self.helper("lcc_log_near1", arg, sympy.Add(c - 1, *rest))
        if arg.is_Mul:
            k = sympy.Mul(*(f for f in arg.args if f.is_number))
            if k.is_positive and k != 1:
                return self.helper("lcc_log_scaled", k, arg / k)
        return f"lcc_log({self._print(arg)})"  # prelude.h.j2: libm's accuracy, vectorizable

    def _print_log1p(self, expr):
        return f"lcc_log1p({self._print(expr.args[0])})"

    def _print_expm1(self, expr):
        return f"lcc_expm1({self._print(expr.args[0])})"  # prelude.h.j2: vectorizable

    def _print_tanh(self, expr):
        return f"lcc_tanh({self._print(expr.args[0])})"  # prelude.h.j2: vectorizable

    def _sub_ratio(self, expr):
        """sub-ratio (the class docstring): the helper call for k - a/b, or None."""
        k, rest = expr.as_coeff_add()
        if k == 0 or len(rest) != 1:
            return None
        term = rest[0]  # -a/b, maybe through a cse temporary
        for f in sympy.Mul.make_args(self._seen(term)):
            if not (f.is_Pow and f.exp == -1):
                continue
            b = f.base
            a = -self._seen(term) * b
            numerator = sympy.Add(*(k * t for t in sympy.Add.make_args(self._seen(b))), -a)
            named = next((t for t, e in self.temp_defs.items() if e == b), b)  # b's temporary
            return self.helper("lcc_sub_ratio", k, -term, numerator, named)
        return None

    def _exp_factors(self, expr, depth=0) -> tuple:
        """exp-scale (the class docstring): (others, [(f, u), ...]) for the factors of the
        product `expr`, f a factor that is exp(u), sigmoid(u) or softplus(u) (maybe a cse
        temporary), others the rest; a temporary that is a product holding such a factor is
        opened (t5*t8 with t8 = t2*t7, t7 = sigmoid(-x): t5, t2 and t7)."""
        others, found = [], []
        for f in sympy.Mul.make_args(expr):
            e = self.temp_defs.get(f, f) if f.is_Symbol else f
            if isinstance(e, EXP_LIKE):
                found.append((f, e.args[0]))
                continue
            if e is not f and e.is_Mul and depth < 4:
                inner_others, inner = self._exp_factors(e, depth + 1)
                if inner:
                    others += inner_others
                    found += inner
                    continue
            others.append(f)
        return others, found

    def _exp_scale(self, expr):
        """exp-scale (the class docstring): the helper call for a*f (a*f1*f2), or None."""
        k, rest = expr.as_coeff_Mul()
        if k in (1, -1) and rest.is_Symbol:  # -t8: exact, and t8 is printed scaled itself
            return None
        others, found = self._exp_factors(expr)
        a = sympy.Mul(*others)
        if not found or len(found) > 2 or (len(found) == 1 and a in (1, -1)):
            return None
        self._plain_mul = True  # the fallback, as printed without this lowering
        try:
            args = [self._print_Mul(expr)]
        finally:
            self._plain_mul = False
        prec = PRECEDENCE["Mul"]
        for n, (_, u) in enumerate(found):
            if len(found) == 1:
                args.append(self._print(a))
            else:  # a times the other factor
                args.append(f"{self.parenthesize(a, prec)}*{self._print(found[1 - n][0])}")
            args += [self._print(u), self._exp_arg_lo(u)]
        return f"{self._name('lcc_mul_exp' if len(found) == 1 else 'lcc_mul_exp2')}({', '.join(args)})"

    def _exp_arg_lo(self, u) -> str:
        """The rounding of the sum u where exp(u) prints as lcc_exp_sum (_print_exp), which
        sums it exactly; else "0.0"."""
        if u.is_Add:
            terms = self._terms(u)
            if sum(1 for t in terms if not t.is_Number and reads_input(t, self.input_temps)) >= 2:
                return self._sum_lo(terms)
        return "0.0"

    def _zero_branch(self, expr):
        """zero-branch (the class docstring): x*where(c, 0, k) printed as where(c, 0, x*k),
        the where a cse temporary or the factor itself; None if no factor has a 0 branch."""
        factors = sympy.Mul.make_args(expr)
        for n, f in enumerate(factors):
            pw = self.temp_defs.get(f, f)
            if isinstance(pw, sympy.Piecewise) and any(v == 0 for v, _ in pw.args):
                x = sympy.Mul(*factors[:n], *factors[n + 1:])
                return self._print(sympy.Piecewise(*((v if v == 0 else x * v, c) for v, c in pw.args),
                                                   evaluate=False))
        return None

    def _scaled_factor(self, expr):
        """scaled-factor (the class docstring): k*r<n>/d for a scaled row sum r<n> as
        lcc_psum_scale(k, d, &ps<n>) (d the factors with a negative integer power), or None."""
        factors = sympy.Mul.make_args(expr)
        for n, f in enumerate(factors):
            if f in self.scaled_sums:
                rest = factors[:n] + factors[n + 1:]
                den = [g.base**-g.exp for g in rest if g.is_Pow and g.exp.is_Integer and g.exp < 0]
                num = [g for g in rest if not (g.is_Pow and g.exp.is_Integer and g.exp < 0)]
                m = self.scaled_sums[f]
                return f"lcc_psum_scale({self._print(sympy.Mul(*num))}, {self._print(sympy.Mul(*den))}, &ps{m})"
        return None

    def _print_Mul(self, expr):
        """zero-branch, scaled-factor, exp-scale, then quotient-chain (the class docstring)."""
        lowered = self._zero_branch(expr)
        if lowered is None:
            lowered = self._scaled_factor(expr)
        if lowered is None and not self._plain_mul:
            lowered = self._exp_scale(expr)
        if lowered is not None:
            return lowered
        num, den = [], []
        for f in sympy.Mul.make_args(expr):
            if f.is_Pow and f.exp.is_Integer and -8 <= f.exp < 0:
                den += [f.base] * -int(f.exp)
            else:
                num.append(f)
        numerator = sympy.Mul(*num)
        plain_power = abs(numerator) == 1 and len(set(den)) == 1
        if len(den) < 2 or plain_power or any(f.is_Pow and f.exp.is_negative for f in num):
            return super()._print_Mul(expr)
        prec = precedence(expr)
        return "/".join([self.parenthesize(numerator, prec)] + [self.parenthesize(b, prec) for b in den])

    def _print_DominantSum(self, expr):
        """dominant_sum(exp(u), c, u) knows its first term's log: lcc_dominant_exp."""
        a, c, b = expr.args
        first = self.temp_defs.get(a, a)  # (not a == exp(b): sympy makes exp(log(x)) x)
        name = "lcc_dominant_exp" if isinstance(first, sympy.exp) and first.args[0] == b else "lcc_dominant_sum"
        return self.helper(name, a, c, b)

    def _print_Bd0(self, expr):
        """deviance-difference (the class docstring)."""
        x, t = expr.args
        seen = self._seen(x)
        d = sympy.Add(*(seen.args if seen.is_Add else (x,)), -t)
        if isinstance(seen, sympy.exp):
            return self.helper("lcc_bd0_exp", x, t, d, seen.args[0])
        text = self._print(d)
        terms = self._terms(d) if d.is_Add else [d]
        if text != self._plain_sum(terms, precedence(d)):  # a lowering printed d: no low part
            return f"lcc_bd0({self._print(x)}, {self._print(t)}, {text}, 0.0)"
        return f"lcc_bd0({self._print(x)}, {self._print(t)}, {text}, {self._sum_lo(terms)})"

    def _sum_lo(self, terms) -> str:
        """The rounding errors of the left-to-right sum of `terms`, as _print_Add prints it:
        lcc_sum_lo(S_k, a_k+1) summed over its additions, S_k the sum of the first k terms
        (the compiler computes each S_k once); "0.0" for a single term."""
        prec = PRECEDENCE["Add"]
        parts = [f"lcc_sum_lo({self._plain_sum(terms[:k], prec)}, {self._print(terms[k])})"
                 for k in range(1, len(terms))]
        return " + ".join(parts) if parts else "0.0"

    def _exp_sub(self, expr):
        """exp-sub (the class docstring): the helper call for A*exp(u) + S, or None. exp(u)
        may be a cse temporary: it is printed as that, and u read from its definition."""
        found = []
        for n, term in enumerate(expr.args):
            for f in sympy.Mul.make_args(term):
                e = self.temp_defs.get(f, f)
                if isinstance(e, sympy.exp):
                    found.append((n, f, e.args[0]))
        if len(found) != 1:
            return None
        n, e, u = found[0]
        coeff = sympy.Mul(*(f for f in sympy.Mul.make_args(expr.args[n]) if f != e))
        rest = sympy.Add(*expr.args[:n], *expr.args[n + 1:])
        if self._seen(coeff).has(sympy.exp) or not self._reads(rest):
            return None
        product = self._print(coeff * e)  # A*exp(u), through exp-scale
        exact = self._leave_one_out(coeff + rest)
        if exact is not None:
            return f"{self._name('lcc_exp_sub_loo')}({self._print(e)}, {self._print(u)}, {self._print(coeff)}, " \
                   f"{self._print(rest)}, {self._print(exact)}, {product})"
        return f"{self._name('lcc_exp_sub')}({self._print(e)}, {self._print(u)}, {self._print(coeff)}, " \
               f"{self._print(rest)}, {product})"

    def _leave_one_out(self, expr):
        """leave-one-out (the class docstring): `expr` (A + S of exp-sub) with each row sum
        r<n> whose summand at class j cancels against it written as lo<n>, the sum of the
        other classes' terms; None where no summand cancels."""
        if not self.row_sums:
            return None
        seen = _through(expr, {t: d for t, d in self.temp_defs.items() if t.name in self.local_temps})
        found = False
        for r, (n, arg) in self.row_sums.items():
            if not seen.has(r):
                continue
            lo = sympy.Symbol(f"lo{n}", real=True)
            before = _expand_signed(seen)
            after = _expand_signed(seen.xreplace({r: lo + arg}))
            if len(sympy.Add.make_args(after)) < len(sympy.Add.make_args(before)) and not after.has(r):
                self._loo[lo] = (n, r, arg)
                seen, found = after, True
        return seen if found else self._leave_many_out(expr)

    def _leave_many_out(self, expr):
        """leave-one-out of several sums at once, where none cancels alone: the projection
        w_j q - ahat_j p of rows._unit_partial, q = sum(ahat**2) and p = sum(ahat*w), whose
        terms at j cancel each other (w_j ahat_j**2 in both). `expr` is seen through every
        temporary (the sums sit in row-level ones too); the result is collected by the
        leave-one-out symbols. None unless terms cancel."""
        seen = _through(expr, self.temp_defs)
        present = [(r, n, arg) for r, (n, arg) in self.row_sums.items() if seen.has(r)]
        if len(present) < 2:
            return None
        los = {r: sympy.Symbol(f"lo{n}", real=True) for r, n, _ in present}
        subs = {r: los[r] + arg for r, _, arg in present}
        after = _expand_signed(seen.xreplace(subs))
        apart = sum(len(sympy.Add.make_args(_expand_signed(t.xreplace(subs))))
                    for t in sympy.Add.make_args(_expand_signed(seen)))
        if len(sympy.Add.make_args(after)) >= apart or any(after.has(r) for r in subs):
            return None
        for r, n, arg in present:
            self._loo[los[r]] = (n, r, arg)
        return sympy.collect(after, list(los.values()))

    def _print_Symbol(self, expr):
        hit = self._loo.get(expr)
        if hit is None:
            return super()._print_Symbol(expr)
        n, r, arg = hit
        self.loo_used.add(n)
        return f"(j == jb{n} ? ex{n} : {self.parenthesize(r - arg, PRECEDENCE['Add'])})"

    def _print_Add(self, expr, order=None):
        lowered = self._sub_ratio(expr)
        if lowered is None:
            lowered = self._exp_sub(expr)
        if lowered is not None:
            return lowered
        if self.row_sums:
            exact = self._leave_many_out(expr)
            if exact is not None:
                return self._print(exact)
        return self._plain_sum(self._terms(expr, order), precedence(expr))

    def _plain_sum(self, terms, prec) -> str:
        """`terms` added left to right as written (C's association), negatives subtracted."""
        out = ""
        for term in terms:
            if term.could_extract_minus_sign() and out:
                text, sign = self.parenthesize(-term, prec), " - "
            else:
                text, sign = self.parenthesize(term, prec), " + "
            out = text if not out else out + sign + text
        return out

    def _print_Piecewise(self, expr):
        """Nested ternaries on one line; the last condition is True (the parser checks).
        eager (a vector loop's body): lcc_select calls, which evaluate every branch, as a
        vector loop does anyway: a branch that C evaluates only where its condition holds
        makes lcc_exp's table loads conditional, and GCC cannot vectorize a masked gather."""
        *pieces, (last, _) = expr.args
        out = self._print(last)
        for value, cond in reversed(pieces):
            if self.eager:
                out = f"lcc_select({self._print(cond)}, {self._print(value)}, {out})"
            else:
                out = f"({self._print(cond)} ? {self._print(value)} : {out})"
        return out

    def _print_Relational(self, expr):
        return f"({self._print(expr.lhs)} {expr.rel_op} {self._print(expr.rhs)})"

    def _print_BooleanTrue(self, expr):
        return "1"

    def _print_BooleanFalse(self, expr):
        return "0"


def shared_cse(variant):
    """One `cse` over value, gradients and second derivative: the temporaries, and the
    outputs ("val", "g0".., "h0") in terms of them. Every kernel mode prints from this one
    result, so the value is the same expression (and the same bits) in every mode."""
    names = ["val", *(f"g{i}" for i in range(len(variant.grads))), "h0"]
    exprs = [variant.value, *variant.grads, variant.hess]
    temps, reduced = sympy.cse(exprs, symbols=sympy.numbered_symbols("t"), optimizations="basic")
    return temps, dict(zip(names, reduced))


def kernel_body(cse_result, mode: str, eager=False) -> tuple:
    """(name, C expression) statements of one kernel mode: the temporaries its outputs use,
    in order, then the outputs (eager: every branch evaluated, for a vector loop)."""
    temps, outputs = cse_result
    wanted = [n for n in outputs if n == "val" or (n[0] == "g" and "g" in mode) or (n == "h0" and "h" in mode)]
    needed = set().union(*(outputs[n].free_symbols for n in wanted))
    for t, e in reversed(temps):  # a temporary is needed if a needed one or an output uses it
        if t in needed:
            needed |= e.free_symbols
    input_temps = set()
    for t, e in temps:
        if reads_input(e, input_temps):
            input_temps.add(t.name)
    printer = LossCPrinter(frozenset(input_temps), {t: e for t, e in temps})
    printer.eager = eager
    lines = [(t.name, printer.doprint(e)) for t, e in temps if t in needed]
    lines += [(n, printer.doprint(outputs[n])) for n in wanted]
    return tuple(lines)


# libm functions GCC has no vector form of without -ffast-math: a loop that calls one (or a
# prelude helper that does) runs one element at a time whatever the target.
_SCALAR_LIBM = frozenset({"log", "log1p", "expm1", "exp", "pow", "tanh", "cosh", "sinh", "atanh",
                          "frexp", "ldexp", "lgamma", "atan", "log2", "exp2", "cbrt"})
_CALL = re.compile(r"\b([A-Za-z_]\w*)\(")


@functools.lru_cache(maxsize=None)
def scalar_calls() -> frozenset:
    """The calls that keep a loop from vectorizing: _SCALAR_LIBM and every prelude helper
    that calls one of them, directly or through another helper."""
    text = re.sub(r"/\*.*?\*/", "", (templates_dir() / "prelude.h.j2").read_text(), flags=re.S)  # comments
    calls = {}
    for m in re.finditer(r"^(?:LCC_INLINE|static inline|static)\b[^(;=]*?\b(lcc_\w+)\([^)]*\)\s*\{", text, re.M):
        depth, i = 1, m.end()
        while depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        calls[m.group(1)] = set(_CALL.findall(text[m.end():i]))
    scalar = set(_SCALAR_LIBM)
    while True:
        more = {name for name, called in calls.items() if called & scalar} - scalar
        if not more:
            return frozenset(scalar)
        scalar |= more


def vectorizable(lines) -> bool:
    """Whether (name, C expression) lines call nothing that keeps a loop scalar: where none
    of a kernel's `omp simd` loops is, cloning it for x86-64-v3 (LCC_TARGETS) only doubles
    its compile time."""
    scalar = scalar_calls()
    return not any(c in scalar for _, rhs in lines for c in _CALL.findall(rhs))


def template_env() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir())),
        undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
        trim_blocks=True, lstrip_blocks=True, autoescape=False,
    )
    env.globals["exp_table"] = exp_table()
    env.globals["log_table"] = log_table()
    env.filters["c_comment"] = c_comment
    env.filters["py_docstring"] = py_docstring
    return env


def c_comment(text: str) -> str:
    """`text` (a spec's path or summary) as one line that cannot end the /* */ comment it is
    written into: line breaks and other control characters become spaces (so no backslash
    or ??/ can splice a '*' to the next line's '/'), and '*/' becomes '* /'."""
    line = "".join(ch if ch.isprintable() else " " for ch in str(text))
    return line.replace("*/", "* /")


def py_docstring(text: str) -> str:
    """`text` as one line inside a generated triple-quoted docstring: whitespace runs become one
    space, backslashes and double quotes are escaped (no quote can end the string, however
    many follow each other) and any other unprintable character becomes its escape."""
    line = " ".join(str(text).split())
    return "".join(ch.encode("unicode_escape").decode("ascii") if not ch.isprintable()
                   else "\\" + ch if ch in '\\"' else ch for ch in line)


@functools.lru_cache(maxsize=None)
def log_table() -> tuple:
    """prelude.h.j2's table for lcc_log_core: per interval i < 128 of z in [0.6875, 1.375)
    (z's bits minus those of 0.6875, shifted right by 45), (invc, logc, logcl): invc a
    multiple of 2^-9 near 1/z at the interval's centre (10 significant bits, so that z*invc
    - 1 is exact for the top 43 bits of z) and 1 for the two intervals around 1 (there r =
    z - 1 exactly, and log z = log1p(r) does not cancel), and -log(invc) = logc + logcl to
    2^-106 of it, from mpmath at 200 bits; as C literals."""
    import struct

    import mpmath

    def from_bits(b):
        return struct.unpack("<d", struct.pack("<Q", b))[0]

    rows = []
    with mpmath.workprec(200):
        for i in range(128):
            lo, hi = (from_bits(0x3fe6000000000000 + (j << 45)) for j in (i, i + 1))
            invc = 1.0 if lo <= 1.0 <= hi else round(1024 / (lo + hi)) / 512
            logc = -mpmath.log(mpmath.mpf(invc))
            rows.append(tuple(v.hex() for v in (invc, float(logc), float(logc - float(logc)))))
    return tuple(rows)


@functools.lru_cache(maxsize=None)
def exp_table() -> tuple:
    """prelude.h.j2's table for lcc_exp, which is written for N = 128 entries (its constants
    N/ln2, ln2/N, the shift 52 - 7 = 45 and the exponent offsets): per k < N, (tail, sbits)
    with H the double nearest 2^(k/N), sbits = H's bits - (k << 45) (so adding ki << 45 for
    any ki = k mod N gives the bits of H * 2^((ki - k)/N)), and tail the double nearest
    (2^(k/N) - H) / H; as C literals, from mpmath at 200 bits (the construction of ARM's
    optimized-routines exp)."""
    import struct

    import mpmath

    n = 128
    rows = []
    with mpmath.workprec(200):
        for k in range(n):
            exact = mpmath.power(2, mpmath.mpf(k) / n)
            h = float(exact)
            tail = float((exact - h) / h)
            bits = struct.unpack("<Q", struct.pack("<d", h))[0] - (k << 45)
            rows.append((tail.hex(), f"UINT64_C(0x{bits:016x})"))
    return tuple(rows)


def generate(sym: SymbolicLoss) -> KernelSource:
    """The C source, cffi declarations and runtime description of one loss."""
    spec = sym.spec
    env = template_env()
    if spec.is_row:
        return _generate_rows(sym, env)
    kernels = []
    for variant in sym.variants:
        shared = shared_cse(variant)
        for mode in MODES:
            try:
                eager = kernel_body(shared, mode, eager=True)  # every branch evaluated
                clone = vectorizable(eager)  # then its loop vectorizes, printed so
                body = eager if clone else kernel_body(shared, mode)
            except Exception as exc:  # the strict printer met a node it cannot print
                raise _cannot_generate(spec, variant, exc) from None
            for ctype in DTYPES:
                kernels.append({
                    "cname": kernel_name(spec.name, variant.key, mode, ctype),
                    "mode": mode, "ctype": ctype, "variant": variant.key, "body": body,
                    "clone": clone,
                })
    ctx = {
        "spec": spec,
        "inputs": [i.name for i in spec.inputs],
        "diffs": [i.name for i in spec.differentiable],
        "params": [p.name for p in spec.params],
        "kernels": kernels,
    }
    return _source(sym, env, "elementwise", ctx)


def _source(sym: SymbolicLoss, env, shape: str, ctx: dict) -> KernelSource:
    """The loss's C (the module's text), its cdef, and the C again per variant: the units
    build.py compiles, so that a loss with many variants keeps every core busy."""
    template = env.get_template(f"{shape}.c.j2")
    variants = dict.fromkeys(k["variant"] for k in ctx["kernels"])
    parts = tuple(template.render(**dict(ctx, kernels=[k for k in ctx["kernels"] if k["variant"] == v]))
                  for v in variants)
    for key, part in zip(variants, parts):
        if len(part) > MAX_UNIT_CHARS:
            spec = sym.spec
            raise BuildError(f"{spec.loc}: {spec.name}: the C of variant '{key}' is {len(part) // 1024} "
                             f"KiB, more than the {MAX_UNIT_CHARS // 1024} KiB allowed (a C compiler "
                             "would take minutes): simplify the formula")
    return KernelSource(name=sym.spec.name, c_source=template.render(**ctx),
                        cdef=env.get_template(f"{shape}.cdef.j2").render(**ctx), meta=runtime_meta(sym),
                        c_parts=parts)


def _cannot_generate(spec, variant, exc) -> BuildError:
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if isinstance(exc, NotImplementedError):  # sympy: "Unsupported by <printer>: f"
        reason = f"no C translation for {reason.rsplit(': ', 1)[-1]}"
    return BuildError(f"{spec.loc}: {spec.name}: cannot generate C for variant "
                      f"'{variant.key}': {reason}")


# --------------------------------------------------------------------------- row kernels

ROW_MODES = ("v", "vg")


def _generate_rows(sym: SymbolicLoss, env) -> KernelSource:
    spec = sym.spec
    kernels = []
    for variant in [v for general in sym.variants for v in (general, general.plain) if v is not None]:
        # float kernels print apart only where they may keep a logsumexp's terms (reuse)
        lse = any(s.kind == "lse" for s in variant.program.scalars)
        for mode in ROW_MODES:
            try:
                k = row_kernel(spec, variant, mode)
                k32 = row_kernel(spec, variant, mode, reuse=True) if lse and mode == "vg" else k
            except Exception as exc:
                raise _cannot_generate(spec, variant, exc) from None
            for ctype in DTYPES:
                kernels.append(dict(k32 if ctype.numpy == "float32" else k, ctype=ctype, variant=variant.key,
                                    cname=kernel_name(spec.name, variant.key, mode, ctype)))
    ctx = {"spec": spec, "diffs": [i.name for i in spec.differentiable],
           "params": [p.name for p in spec.params], "kernels": kernels}
    return _source(sym, env, "rows", ctx)


def row_kernel(spec, variant, mode: str, reuse=False) -> dict:
    """The template's view of one row kernel: the reads, passes and statements per row
    (they compute in COMPUTE). reuse (float kernels): a softmax term exp(e_j - m - r) of the
    gradient is z_j * exp(-r), z_j = exp(e_j - m) kept from the logsumexp's pass: one exp
    per element instead of two, and three roundings in double where one is felt in float."""
    prog = variant.program
    grad = mode == "vg"
    diffs = [i.name for i in spec.differentiable]
    outputs = [variant.value] + ([prog.grads[n] for n in diffs] if grad else [])
    steps = rows.plan(prog, outputs)
    elements = prog.elements
    T = COMPUTE
    kept = {}  # lse n -> the symbol its kept z_j prints as
    for s in prog.scalars if reuse and grad else ():
        if s.kind == "lse":
            z = sympy.Symbol(f"zs{s.n}[jz]")  # jz: j's place in the buffer (rows.c.j2)
            swap = _whole_term(sympy.exp(s.arg - s.shift - s.sym), z * sympy.Symbol(f"er{s.n}"))
            new = [swap(o) for o in outputs[1:]]
            if new != outputs[1:]:
                outputs[1:] = new
                kept[s.n] = z

    def gathers(scalars):
        return [{"name": g.sym.name, "source": g.source, "index": g.index.name} for g in scalars]

    # The max shifts stay out of every temporary: the printer must see m - x[label] + r
    # whole to subtract the two large terms first (a temporary m + r would round r away).
    shifts = [s.shift for s in prog.scalars if s.shift is not None]
    temps, reduced = sympy.cse(outputs, symbols=sympy.numbered_symbols("u"), optimizations="basic",
                               ignore=shifts)
    per_class = set(elements) | {rows.J} | set(kept.values())
    row_temps, class_temps = [], []
    for t, e in temps:  # a temporary that reads an element (or j) is computed per class
        if e.free_symbols & per_class:
            per_class.add(t)
            class_temps.append((t, e))
        else:
            row_temps.append((t, e))
    # leave-one-out: the plain sums (printed first: their passes track the sums the
    # gradient's lines read without their largest term)
    row_sums = {st.scalar.sym: (st.scalar.n, st.scalar.arg) for pass_steps in steps.passes
                for st in pass_steps if st.role == "sum" and not rows.masked_product(st.scalar.arg)}
    # scaled-factor: the sums accumulated scaled, which a product k*r<n> reads scaled
    scaled_sums = {st.scalar.sym: st.scalar.n for pass_steps in steps.passes
                   for st in pass_steps if st.role == "sum" and rows.masked_product(st.scalar.arg)}
    loo_used = set()
    if grad:
        grad_lines = _print_block(class_temps, list(zip(diffs, reduced[1:])), known=row_temps,
                                  row_sums=row_sums, loo_used=loo_used, scaled_sums=scaled_sums)
        simd_grad = _class_hits([e for _, e in class_temps] + reduced[1:])
        if simd_grad is not None:  # the lines at every class that no index picks
            hits, miss = simd_grad
            miss_temps = [(t, e.xreplace(miss)) for t, e in class_temps]
            miss_lines = _print_block(miss_temps, [(n, e.xreplace(miss)) for n, e in zip(diffs, reduced[1:])],
                                      known=row_temps, row_sums=row_sums, loo_used=loo_used,
                                      scaled_sums=scaled_sums, vector=True)
    passes = []
    for p, pass_steps in enumerate(steps.passes, 1):
        exprs, inits, updates, finals = [], [], [], []
        accs, defs = [], []  # (C type, name): what inits declare and finals define (lanes)
        names = []
        simd = []  # the pass's `omp simd` reduction clauses; None: it runs in order
        for st in pass_steps:
            s = st.scalar
            n = s.n
            scaled = rows.masked_product(s.arg) if st.role == "sum" else None
            if st.role == "lse_tail":
                exprs += [s.arg, sympy.exp(s.arg - s.shift)]
                names += [f"e{n}", f"z{n}"]
            elif scaled:  # the factors; their product is formed scaled (lcc_psum_add)
                factors, mask = scaled
                fnames = [f"e{n}{chr(ord('a') + i)}" for i in range(len(factors))]
                exprs += list(factors)
                names += fnames
                if mask is not None:  # where(c, 0, product): added where the mask is not 0
                    exprs.append(mask)
                    names.append(f"e{n}m")
            else:
                exprs.append(s.arg)
                names.append(f"e{n}")
            e = f"e{n}" if st.role != "lse_tail" else f"z{n}"
            if scaled:
                inits.append(f"lcc_psum_t ps{n} = {{0.0, 0.0, 0, 0.0}};")
                if len(fnames) == 2:
                    add = f"lcc_psum_add({fnames[0]}, {fnames[1]}, &ps{n});"
                else:
                    add = f"lcc_psum_addn({len(fnames)}, (const double[]){{{', '.join(fnames)}}}, &ps{n});"
                updates.append(add if mask is None else f"if (e{n}m != 0) {add}")
                finals.append(f"const {T} r{n} = lcc_psum(&ps{n});")
                simd = None
                continue
            if st.role == "sum" or st.role == "lse_tail":
                inits.append(f"double acc{n} = 0.0;")
                accs.append(("double", f"acc{n}"))
                simd = simd if simd is None else simd + [f"+:acc{n}"]
            if st.role == "sum":
                updates.append(f"acc{n} += (double){e};")
                finals.append(f"const {T} r{n} = ({T})acc{n};")
                defs.append((T, f"r{n}"))
                if n in loo_used:  # the sum without its largest term, and where that is
                    inits.append(f"double ex{n} = 0.0, big{n} = 0.0;")
                    inits.append(f"int64_t jb{n} = -1;")
                    updates.append(f"if (fabs({e}) > fabs(big{n})) {{ ex{n} += big{n}; big{n} = {e}; jb{n} = j; }} "
                                   f"else {{ ex{n} += {e}; }}")
                    simd = None
            elif st.role == "norm":  # a scaled sum of squares (lcc_ssq_add in prelude.h.j2)
                inits.append(f"double sc{n} = 0.0, ssq{n} = 0.0, cmp{n} = 0.0, nf{n} = 0.0;")
                updates.append(f"lcc_ssq_add({e}, &sc{n}, &ssq{n}, &cmp{n}, &nf{n});")
                finals.append(f"const {T} r{n} = lcc_ssq_norm(sc{n}, ssq{n}, cmp{n}, nf{n});")
                simd = None
            elif st.role in ("max", "min"):  # the first argmax, in order
                inits.append(f"{T} r{n} = {'' if st.role == 'min' else '-'}INFINITY;")
                inits.append(f"int64_t jm{n} = 0;")
                cmp = ">=" if st.role == "min" else "<="
                updates.append(f"if (r{n} == r{n} && !({e} {cmp} r{n})) {{ r{n} = {e}; jm{n} = j; }}")
                simd = None
            elif st.role == "lse_max":  # the shift only: the tail counts its ties
                inits.append(f"{T} mx{n} = -INFINITY;")
                inits.append(f"{T} nan{n} = 0.0;")
                accs += [(T, f"mx{n}"), (T, f"nan{n}")]
                updates.append(f"mx{n} = {e} > mx{n} ? {e} : mx{n};")
                updates.append(f"nan{n} += {e} != {e} ? 1.0 : 0.0;")
                finals.append(f"if (nan{n} != 0) mx{n} = NAN;")
                finals.append(f"const {T} m{n} = isinf(mx{n}) ? ({T})0 : mx{n};")
                finals.append(f"const int fin{n} = isfinite(mx{n});")
                finals.append(f"const {T} mt{n} = fin{n} ? mx{n} : NAN; /* no class ties a max that is not finite */")
                defs += [(T, f"m{n}"), ("int", f"fin{n}"), (T, f"mt{n}")]
                simd = simd if simd is None else simd + [f"max:mx{n}", f"+:nan{n}"]
            else:  # lse_tail: every class but one that equals the max, unless it is not finite
                inits.append(f"double ties{n} = 0.0;")
                accs.append(("double", f"ties{n}"))
                # a product, not a select: GCC would move exp's table loads under the
                # condition, and a masked gather does not vectorize (z is finite where it ties)
                updates.append(f"acc{n} += (double){e} * (e{n} == mt{n} ? 0.0 : 1.0);")
                updates.append(f"ties{n} += e{n} == mt{n} ? 1.0 : 0.0;")
                finals.append(f"if (ties{n} > 1) acc{n} += ties{n} - 1; /* each tie's term is exp(0) = 1 */")
                # both evaluated: a branch would make the log tables' loads conditional (lanes)
                finals.append(f"const {T} r{n} = ({T})lcc_select(fin{n}, lcc_log1p(acc{n}), lcc_log(acc{n}));")
                defs.append((T, f"r{n}"))
                simd = simd if simd is None else simd + [f"+:ties{n}"]
                if n in kept:  # the gradient's softmax term is zs[j] * er (reuse)
                    updates.append(f"zs{n}[jz] = {e};")
                    finals.append(f"const {T} er{n} = lcc_exp(-r{n});")
                    defs.append((T, f"er{n}"))
        ptemps, preduced = sympy.cse(exprs, symbols=sympy.numbered_symbols(f"t{p}_"), optimizations="basic")
        body = _print_block(ptemps, list(zip(names, preduced)), scaled_sums=scaled_sums, vector=simd is not None)
        passes.append({
            "inits": inits, "updates": updates, "finals": finals,
            "reads": _reads(exprs, elements), "temps": body,
            "gathers": gathers(steps.after[p - 1]),
            "simd": None if simd is None else " ".join(f"reduction({c})" for c in simd),
            "accs": accs, "defs": defs,
        })
    row_lines = _print_block(row_temps, [("val", reduced[0])], scaled_sums=scaled_sums)
    read = {name for p in passes for name in p["reads"]}
    k = {
        "grad": grad,
        "inputs": [{"name": i.name, "kind": variant.kinds[i.name], "ignore": i.ignore}
                   for i in spec.inputs],
        "pre": gathers(steps.pre), "passes": passes,
        "row_temps": row_lines[:-1], "val": row_lines[-1][1],
    }
    if grad:
        lines = grad_lines
        k["grad_temps"] = lines[:len(lines) - len(diffs)]
        k["grads"] = lines[len(lines) - len(diffs):]
        k["grad_reads"] = _reads([e for _, e in class_temps] + reduced[1:]
                                 + [row_sums[r][1] for r in row_sums if row_sums[r][0] in loo_used], elements)
        read.update(k["grad_reads"])
        if simd_grad is not None:
            k["simd_grad"] = {"temps": miss_lines[:len(miss_lines) - len(diffs)],
                              "grads": miss_lines[len(miss_lines) - len(diffs):],
                              "hits": [h.name for h in hits]}
            # lanes: each index's class computed for every lane at once (j = the index, so
            # its own condition j == index is true), printed eagerly where that vectorizes
            k["lane_hits"] = []
            for h in hits:
                at = {rows.J: h}
                hit_lines = _print_block([(t, e.xreplace(at)) for t, e in class_temps],
                                         [(n, e.xreplace(at)) for n, e in zip(diffs, reduced[1:])],
                                         known=row_temps, row_sums=row_sums, loo_used=loo_used,
                                         scaled_sums=scaled_sums, vector=True)
                k["lane_hits"].append({"index": h.name, "temps": hit_lines[:len(hit_lines) - len(diffs)],
                                       "grads": hit_lines[len(hit_lines) - len(diffs):]})
    k["row_reads"] = [i.name for i in spec.inputs if i.name in read]  # read along whole rows
    k["kept"] = sorted(kept)  # lse n whose z_j a buffer zs<n> keeps (reuse)
    # cloned where every `omp simd` loop vectorizes (one that stays scalar, such as the
    # gradient of class-weighted cross entropy, would dominate the clone's time anyway)
    loops = [[*p["temps"], *(("", u) for u in p["updates"])] for p in passes if p["simd"]]
    if grad:
        loops.append([*k["simd_grad"]["temps"], *k["simd_grad"]["grads"]] if "simd_grad" in k else [("", "log(0)")])
    k["clone"] = bool(loops) and all(map(vectorizable, loops))
    # rows in lanes (rows.c.j2): short rows run LCC_LANES at a time, one per vector lane,
    # where every pass is a simd loop (each lane then runs the pass's updates in order)
    # (an index that a hit names is in range in every lane: checked, or 0 in a skipped row)
    indices = {f"i_{i.name}" for i in spec.inputs if variant.kinds[i.name] == "index"}
    k["lanes"] = bool(passes) and all(p["simd"] for p in passes) and \
        (not grad or ("simd_grad" in k and set(k["simd_grad"]["hits"]) <= indices))
    return k


def _whole_term(term, by):
    """A function that replaces `term` where it is a whole output or a whole branch of one
    (softmax - onehot's softmax), not where it is a factor: there the exp-scale lowering must
    see the exp (class weight 3.4e38 times a softmax below 2^-1074, in float32 0 for 9.6)."""
    def swap(e):
        if e == term:
            return by
        if isinstance(e, sympy.Piecewise):
            return sympy.Piecewise(*((swap(v), c) for v, c in e.args))
        return e
    return swap


def _class_hits(exprs):
    """(the index symbols that conditions j == index name, {condition: false}) for the
    gradient's lines, or None where a condition on j is not one of those. The gradient at a
    class no index names is then the lines with each such condition false (a vector loop,
    whose body holds no expm1 of the labelled class), and the classes the indices name are
    computed again afterwards, whole."""
    hits, miss = set(), {}
    for e in exprs:
        for rel in e.atoms(sympy.Eq, sympy.Ne):
            if rows.J not in rel.free_symbols:
                continue
            other = rel.rhs if rel.lhs == rows.J else rel.lhs if rel.rhs == rows.J else None
            if not isinstance(other, sympy.Symbol):
                return None
            hits.add(other)
            miss[rel] = sympy.false if isinstance(rel, sympy.Eq) else sympy.true
    return sorted(hits, key=lambda h: h.name), miss


def _reads(exprs, elements) -> list:
    """The row inputs whose element is read by `exprs`, in a stable order."""
    used = set().union(*(e.free_symbols for e in exprs)) if exprs else set()
    return [name for x, name in elements.items() if x in used]


def _through(expr, defs: dict):
    """`expr` with the cse temporaries in `defs` replaced by their definitions, through every
    level (a temporary's definition may name another)."""
    for _ in range(len(defs) + 1):
        nxt = expr.xreplace(defs)
        if nxt == expr:
            break
        expr = nxt
    return expr


def _expand_signed(expr):
    """expand(expr) with where(c, a, b) and where(c, -a, -b) seen as one value and its
    negative, so that k*where(c, 0, w*y) - k*where(c, 0, -w*y)... cancel."""
    names, back = {}, {}
    for pw in sorted(expr.atoms(sympy.Piecewise), key=sympy.default_sort_key):
        neg = sympy.Piecewise(*((-e, c) for e, c in pw.args))
        if pw in names or neg in names:
            continue
        s = sympy.Dummy("pw")
        names[pw], names[neg] = s, -s
        back[s] = pw
    out = sympy.expand(expr.xreplace(names)) if names else sympy.expand(expr)
    return out.xreplace(back) if back else out


def _print_block(temps, outputs, known=(), row_sums=None, loo_used=None, scaled_sums=None,
                 vector=False) -> list:
    """(name, C expression) lines for cse temporaries and named outputs. With row_sums (the
    gradient pass), the sums whose leave-one-out form was printed are added to loo_used;
    scaled_sums (r<n> -> n) are the row sums accumulated scaled (scaled-factor). vector: the
    lines of an `omp simd` loop, printed eagerly (every branch evaluated) where they can
    vectorize at all."""
    if vector:  # (loo_used is filled the same either way)
        eager = _print_lines(temps, outputs, known, row_sums, loo_used, scaled_sums, eager=True)
        if vectorizable(eager):
            return eager
    return _print_lines(temps, outputs, known, row_sums, loo_used, scaled_sums, eager=False)


def _print_lines(temps, outputs, known, row_sums, loo_used, scaled_sums, eager: bool) -> list:
    input_temps = set()
    for t, e in [*known, *temps]:
        if reads_input(e, input_temps):
            input_temps.add(t.name)
    printer = LossCPrinter(frozenset(input_temps), dict([*known, *temps]),
                           data_temps=_shift_temps([*known, *temps]), row_sums=row_sums,
                           local_temps=frozenset(t.name for t, _ in temps), scaled_sums=scaled_sums)
    if loo_used is not None:
        printer.loo_used = loo_used  # filled as the lines print
    printer.eager = eager
    return [(t.name, printer.doprint(e)) for t, e in temps] + \
        [(n, printer.doprint(e)) for n, e in outputs]


def kernel_name(loss: str, variant: str, mode: str, ctype: CType) -> str:
    return f"lcc_{loss}__{variant}__{mode}_{ctype.suffix}"


def _kernel_names(loss: str, key: str, modes) -> dict:
    return {f"{mode}_{c.numpy}": kernel_name(loss, key, mode, c) for mode in modes for c in DTYPES}


def runtime_meta(sym: SymbolicLoss) -> dict:
    """What the runtime needs to know about a loss: JSON-able, no sympy."""
    spec = sym.spec
    modes = ROW_MODES if spec.is_row else MODES
    return {
        "name": spec.name,
        "aliases": list(spec.aliases),
        "shape": "rows" if spec.is_row else "elementwise",
        "axis": spec.axis if spec.is_row else None,
        "spec": spec.path,
        "summary": spec.summary,
        "reference": spec.reference,
        "doc": spec.doc,
        "formula": spec.loss.text.strip(),
        "positional": list(spec.positional),
        "inputs": [{"name": i.name, "differentiable": i.differentiable, "default": i.default,
                    "optional_grad": i.optional_grad, "row": i.row, "index_into": i.index_into,
                    "ignore": i.ignore, "doc": i.doc, "domain": i.domain_text()} for i in spec.inputs],
        "params": [{"name": p.name, "default": p.default, "min": p.min, "max": p.max, "gt": p.gt,
                    "lt": p.lt, "doc": p.doc} for p in spec.params],
        "variants": [{"name": v.name, "values": list(v.values), "default": v.default, "doc": v.doc}
                     for v in spec.variants],
        "kernels": {v.key: {"options": v.options, "notes": list(v.notes), "kinds": v.kinds,
                            "names": _kernel_names(spec.name, v.key, modes),
                            "gradient": [str(g) for g in v.grads],
                            "hessian": None if v.hess is None else str(v.hess),
                            "plain": None if v.plain is None else {
                                "names": _kernel_names(spec.name, v.plain.key, modes),
                                "absent": list(v.plain.absent), "fixed": v.plain.fixed}}
                    for v in sym.variants},
        "examples": [{"inputs": e.inputs, "options": e.options, "loss": e.loss, "grad": e.grad,
                      "where": str(e.loc)} for e in spec.examples],
        "plot": [[n, list(v) if isinstance(v, tuple) else v] for n, v in spec.plot_inputs()],
    }


def module_source(sources: list, name: str, cache_key: str) -> tuple[str, str]:
    """The whole extension module's C source (every loss's kernels after one prelude, the
    file a reader opens) and its cdef."""
    env = template_env()
    c = env.get_template("module.c.j2").render(
        sources=sources, name=name, version=__version__, cache_key=cache_key)
    cdef = "\n".join(s.cdef for s in sources)
    return c, cdef


def object_source(source) -> str:
    """One loss's translation unit: the prelude and its kernels (build.py compiles one object
    per loss). It names no module and no cache key, so an unchanged loss keeps its cached
    object, and modules built into one folder from the same spec share it."""
    return template_env().get_template("module.c.j2").render(
        sources=[source], name=None, version=__version__, cache_key=None)
