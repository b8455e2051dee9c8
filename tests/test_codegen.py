"""The derive and codegen stages on their own: tidy rules, stable nodes, the strict printer."""

from __future__ import annotations

import mpmath
import numpy as np
import pytest
import sympy

from losscc.codegen import LossCPrinter, generate, kernel_body, shared_cse
from losscc.derive import derive, tidy
from losscc.errors import BuildError
from losscc.functions import Bd0, Sigmoid, Softplus, naive
from losscc.ir import SymbolicLoss, SymbolicVariant
from losscc.spec import load_spec

from conftest import SPECS

x = sympy.Symbol("x_pred", real=True)
y = sympy.Symbol("x_label", real=True)
eps = sympy.Symbol("p_epsilon", positive=True)
S = sympy.Symbol("p_s", real=True)
W = sympy.Symbol("x_class_weight", real=True)
R0 = sympy.Symbol("r0", real=True)


def c(expr):
    return LossCPrinter().doprint(expr)


# ---------------------------------------------------------------------------- stable nodes


@pytest.mark.parametrize("node, deriv", [
    (Sigmoid(x), Sigmoid(x) * Sigmoid(-x)),
    (Softplus(x), Sigmoid(x)),
])
def test_stable_nodes_differentiate_stably(node, deriv):
    assert sympy.diff(node, x) == deriv
    # and agree with the textbook formula (mpmath through evalf, 30 digits)
    for v in (-3, sympy.Rational(1, 2), 7):
        got = sympy.diff(node, x).subs(x, v).evalf(30)
        want = sympy.diff(naive(node), x).subs(x, v).evalf(30)
        assert abs(got - want) < 1e-25


def test_stable_nodes_evaluate_at_special_points():
    assert Sigmoid(0) == sympy.S.Half and Softplus(0) == sympy.log(2)
    assert Sigmoid(sympy.oo) == 1 and Softplus(-sympy.oo) == 0


# ---------------------------------------------------------------------------- derive


def test_tidy_kinks():
    # d/dx max(x, 0) is sympy's Heaviside(x) with H(0) = 1/2; we use H(0) = 0 like PyTorch.
    assert tidy(sympy.diff(sympy.Max(0, x), x)) == sympy.Heaviside(x, 0)
    assert tidy(sympy.diff(sympy.Abs(x), x, 2)) == 0           # 2*DiracDelta(x) -> 0
    assert tidy(sympy.Heaviside(x) ** 2) == sympy.Heaviside(x, 0)


def test_derive_does_not_fuse_fractions():
    # sympy.simplify turns this gradient into one fraction whose denominator
    # x**2 - x - eps**2 - eps cancels near x = 1; tidy must keep the two terms apart.
    sym = derive(load_spec(SPECS / "sigmoid_bce.yaml"))
    grad = next(v for v in sym.variants if v.key == "from_sigmoid_true").grads[0]
    assert not grad.has(x**2)
    assert len([a for a in sympy.preorder_traversal(grad) if a.is_Pow and a.exp == -1]) == 2


def test_second_derivative_notes():
    notes = derive(load_spec(SPECS / "l1.yaml")).variants[0].notes
    assert any("0 almost everywhere" in n for n in notes)
    assert derive(load_spec(SPECS / "l2.yaml")).variants[0].notes == ()


# ---------------------------------------------------------------------------- printer


def test_add_keeps_literal_with_the_input_before_parameters():
    # (1 - p) + eps: at p = 1, eps survives; 1 + eps - p would give 0 and log(0) whenever
    # eps < ulp(1) / 2.
    assert c(1 - x + eps) == "1 - x_pred + p_epsilon"
    assert c(x + eps) == "x_pred + p_epsilon"


@pytest.mark.parametrize("expr, want", [
    (x**2, "(x_pred*x_pred)"),
    (x**-2, "1.0/(x_pred*x_pred)"),
    (sympy.sqrt(x), "sqrt(x_pred)"),
    (x ** sympy.Rational(5, 2), "pow(x_pred, 2.5)"),
    (sympy.Rational(1, 3) * x, "(0.3333333333333333)*x_pred"),
    (sympy.pi * x, "3.141592653589793*x_pred"),
    (sympy.exp(x), "lcc_exp(x_pred)"),
    (Sigmoid(x), "lcc_sigmoid(x_pred)"),
    (Softplus(-x), "lcc_softplus(-x_pred)"),
    (sympy.Max(x, 0), "lcc_max(0, x_pred)"),
    (sympy.sign(x), "lcc_sign(x_pred)"),
    (sympy.Heaviside(x, 0), "lcc_step(x_pred)"),
    (sympy.Piecewise((x, x > 1), (y, True)), "((x_pred > 1) ? x_pred : x_label)"),
])
def test_printer_table(expr, want):
    # every kernel computes in double, whatever dtype it stores (codegen.CType)
    assert c(expr) == want


def test_printer_refuses_what_it_cannot_print():
    with pytest.raises(BuildError, match="Heaviside"):
        c(sympy.Heaviside(x))                     # H(0) unspecified: tidy must run first
    with pytest.raises(NotImplementedError, match="Unsupported by .*LossCPrinter.*: zeta"):
        c(sympy.zeta(x))                          # strict: no silent comment in the C


def test_unprintable_loss_is_a_build_error_naming_the_spec():
    spec = load_spec(SPECS / "l2.yaml")
    bad = SymbolicVariant(key="base", options={}, value=sympy.zeta(x), grads=(sympy.zeta(x, 2),),
                          hess=sympy.S.Zero)
    with pytest.raises(BuildError) as exc:
        generate(SymbolicLoss(spec=spec, symbols={}, variants=(bad,)))
    assert str(exc.value) == f"{spec.loc}: l2: cannot generate C for variant 'base': no C translation for zeta"


def test_cse_shares_work_between_value_gradient_and_hessian():
    sym = derive(load_spec(SPECS / "sigmoid_bce.yaml"))
    variant = next(v for v in sym.variants if v.key == "from_sigmoid_false")
    shared = shared_cse(variant)
    body = kernel_body(shared, "vgh")
    text = "\n".join(rhs for _, rhs in body)
    # value, gradient and second derivative need sigmoid(+-x) and softplus(+-x): each once.
    assert text.count("lcc_sigmoid(") == 2 and text.count("lcc_softplus(") == 2
    assert [lhs for lhs, _ in body][-3:] == ["val", "g0", "h0"]
    # every mode computes the value from the same statements: the same bits in every mode
    value_only = kernel_body(shared, "v")
    assert value_only[-1] == body[-3] and set(value_only) <= set(body)
    assert "lcc_sigmoid(" not in "\n".join(rhs for _, rhs in value_only)


def test_sum_order_survives_cse_temporaries():
    # -pred is shared with sigmoid(-pred), so cse names it t0; t0 reads an input, so
    # 1 - pred + eps still prints as (1 + t0) + eps and eps survives at pred = 1.
    from losscc.ir import SymbolicVariant

    value = -sympy.log(1 - x + eps) * y + Sigmoid(-x)
    grad = sympy.diff(value, x)
    variant = SymbolicVariant("base", {}, value, (grad,), sympy.diff(grad, x))
    body = dict(kernel_body(shared_cse(variant), "vg"))
    assert body["t0"] == "-x_pred"
    assert "1 + t0 + p_epsilon" in body.values()


@pytest.mark.parametrize("expr, want", [
    (sympy.log(2) * x, "x_pred*0.6931471805599453"),       # a literal, not the M_LN2 macro
    (sympy.Float("1e39") * x, "1e+39*x_pred"),            # fine: float32 kernels compute in double
    (sympy.Float("1e-50") * x, "1e-50*x_pred"),
])
def test_constants_are_correctly_rounded_double_literals(expr, want):
    assert c(expr) == want


def test_a_constant_that_is_not_finite_in_double_is_a_build_error():
    with pytest.raises(BuildError, match="constant inf is not finite"):
        c(sympy.Float("1e400") * x)


# ---------------------------------------------------------------------------- printer lowerings
# (LossCPrinter's docstring: log-near-1, sub-ratio, quotient-chain). Each: it fires, its
# value is right to an ulp where the plain form is not, and a near miss prints plainly.

LOWERED = [
    # log-near-1: S - 1 with the literal folded; S itself as written ((1 - p) + eps)
    (sympy.log(1 - x + eps), "lcc_log_near1(1 - x_pred + p_epsilon, (-x_pred) + p_epsilon)"),
    (sympy.log(x + eps), "lcc_log_near1(x_pred + p_epsilon, (-1) + x_pred + p_epsilon)"),
    (sympy.log(1 + x + y), "lcc_log_near1(1 + x_label + x_pred, x_label + x_pred)"),
    # sub-ratio: (p - t) + eps, the cancelling terms first
    (1 - y / (x + eps),
     "lcc_sub_ratio(1, x_label/(x_pred + p_epsilon), (-x_label) + x_pred + p_epsilon, x_pred + p_epsilon)"),
    (2 + y / x, "lcc_sub_ratio(2, -x_label/x_pred, x_label + 2*x_pred, x_pred)"),
    # log-scaled: log(k*u) for a number k (the Stirling term's log(2*pi*t))
    (sympy.log(2 * x), "lcc_log_scaled(2, x_pred)"),
    (sympy.log(2 * sympy.pi * y) / 2, "(0.5)*lcc_log_scaled(6.283185307179586, x_label)"),
    # deviance-difference: x - t from x's own terms, (p - t) + eps; log(x) = u for x = exp(u)
    # and the roundings of that sum (lcc_sum_lo of each addition), the helper's d + dl
    (Bd0(x + eps, y), "lcc_bd0(x_pred + p_epsilon, x_label, (-x_label) + x_pred + p_epsilon, "
                      "lcc_sum_lo((-x_label), x_pred) + lcc_sum_lo((-x_label) + x_pred, p_epsilon))"),
    (Bd0(sympy.exp(x), y), "lcc_bd0_exp(lcc_exp(x_pred), x_label, lcc_exp_sub(lcc_exp(x_pred), x_pred, 1, -x_label, lcc_exp(x_pred)), x_pred)"),
    # exp-sub: A*exp(u) + S with S reading an input
    (sympy.exp(x) - y, "lcc_exp_sub(lcc_exp(x_pred), x_pred, 1, -x_label, lcc_exp(x_pred))"),
    # ... with A*exp(u) printed as a product, through exp-scale (a class weight times a
    # softmax weight below the normal range)
    (y * sympy.exp(x) - W, "lcc_exp_sub(lcc_exp(x_pred), x_pred, x_label, -x_class_weight, "
                           "lcc_mul_exp(x_label*lcc_exp(x_pred), x_label, x_pred, 0.0))"),
    # exp-scale: a*f for f = exp(u), sigmoid(u), softplus(u), which may be subnormal; the
    # plain product, a and u; u's rounding where exp(u) is an lcc_exp_sum (an exact sum)
    (y * sympy.exp(x), "lcc_mul_exp(x_label*lcc_exp(x_pred), x_label, x_pred, 0.0)"),
    (3 * Softplus(-x), "lcc_mul_exp(3*lcc_softplus(-x_pred), 3, -x_pred, 0.0)"),
    (y * Sigmoid(x) * Sigmoid(-x), "lcc_mul_exp2(x_label*lcc_sigmoid(-x_pred)*lcc_sigmoid(x_pred), "
                                   "x_label*lcc_sigmoid(-x_pred), x_pred, 0.0, x_label*lcc_sigmoid(x_pred), "
                                   "-x_pred, 0.0)"),
    (y * sympy.exp(x - eps * y), "lcc_mul_exp(x_label*lcc_exp_sum2(-p_epsilon*x_label, x_pred), x_label, "
                                 "(-p_epsilon*x_label) + x_pred, lcc_sum_lo((-p_epsilon*x_label), x_pred))"),
    # zero-branch: the 0 of a where is not multiplied by what may be inf
    (R0 * sympy.Piecewise((0, sympy.Eq(S, 0)), (S / 3, True)),
     "((p_s == 0) ? 0 : (0.3333333333333333)*p_s*r0)"),
    # quotient-chain
    (y / (x + eps)**2, "x_label/(x_pred + p_epsilon)/(x_pred + p_epsilon)"),
    (-3 * y / (x**2 * eps), "(-3*x_label)/x_pred/x_pred/p_epsilon"),
    (1 / (eps**2 * sympy.cosh(x)**2), "1/p_epsilon/p_epsilon/cosh(x_pred)/cosh(x_pred)"),
]

PLAIN = [
    (sympy.log(x), "lcc_log(x_pred)"),
    (sympy.log(x + y), "lcc_log(x_label + x_pred)"),       # no literal 1, two terms that read inputs
    (sympy.log(x * y), "lcc_log(x_label*x_pred)"),        # no number factor (log-scaled)
    (1 - y / x + x, "1 - x_label/x_pred + x_pred"),     # more than k - a/b
    (y / x, "x_label/x_pred"),                          # one division: nothing to chain
    (sympy.exp(x) + sympy.exp(y) - y, "(-x_label) + lcc_exp(x_label) + lcc_exp(x_pred)"),  # two exps
    (sympy.exp(x) - 2, "(-2) + lcc_exp(x_pred)"),          # a number: stabilize's expm1 rule's job
    (x * sympy.Piecewise((1, sympy.Eq(S, 0)), (S, True)), "x_pred*((p_s == 0) ? 1 : p_s)"),  # no 0 branch
    (x**-2, "1.0/(x_pred*x_pred)"),                    # a plain power (the printer table)
    (-sympy.exp(x), "-lcc_exp(x_pred)"),                   # exp-scale: -f is exact
    (y * sympy.exp(x) * sympy.exp(y) * sympy.exp(eps), "x_label*lcc_exp(p_epsilon)*lcc_exp(x_label)*lcc_exp(x_pred)"),  # three
    (y / (x**2 * sympy.sqrt(eps)), "x_label/(sqrt(p_epsilon)*(x_pred*x_pred))"),  # a non-integer power
]


@pytest.mark.parametrize("expr, want", LOWERED)
def test_printer_lowering_fires(expr, want):
    assert c(expr) == want


def test_scaled_factor_reads_a_scaled_sum_before_it_is_a_double():
    """scaled-factor: k*r0/d for a row sum accumulated scaled (ps0) applies k and d to
    the mantissa; through a where's nonzero branch too; a sum not accumulated scaled (r1)
    prints as the product."""
    r1 = sympy.Symbol("r1", real=True)
    printer = LossCPrinter(scaled_sums={R0: 0})
    assert printer.doprint(S * R0 / 3 + x) == "x_pred + lcc_psum_scale((0.3333333333333333)*p_s, 1, &ps0)"
    assert printer.doprint(R0 * sympy.Piecewise((0, sympy.Eq(S, 0)), (S, True))) == \
        "((p_s == 0) ? 0 : lcc_psum_scale(p_s, 1, &ps0))"
    # a divisor stays a division: r0/eps is one rounding, as written (cosine's dot / epsilon)
    assert printer.doprint(S * R0 / eps) == "lcc_psum_scale(p_s, p_epsilon, &ps0)"
    assert printer.doprint(S * r1) == "p_s*r1"


@pytest.mark.parametrize("expr, want", PLAIN)
def test_printer_lowering_leaves_near_misses_alone(expr, want):
    assert c(expr) == want


def test_lowerings_see_through_cse_temporaries():
    # p + eps is shared by log(p + eps), t/(p + eps) and t/(p + eps)**2: cse names it, and the
    # printer still folds the literal, sums (p - t) + eps and passes the temporary on.
    value = x - y * sympy.log(x + eps)
    grad = sympy.diff(value, x)
    body = dict(kernel_body(shared_cse(SymbolicVariant("base", {}, value, (grad,), sympy.diff(grad, x))), "vgh"))
    assert body["t0"] == "x_pred + p_epsilon"
    assert body["val"] == "(-x_label*lcc_log_near1(t0, (-1) + x_pred + p_epsilon)) + x_pred"
    assert body["g0"] == "lcc_sub_ratio(1, x_label/t0, (-x_label) + x_pred + p_epsilon, t0)"
    assert body["h0"] == "x_label/t0/t0"


def _ulps(got, want, dtype):
    return abs(mpmath.mpf(float(got)) - want) / float(np.spacing(dtype(abs(float(want)))))


# (loss, kwargs, pred, label, dtype, output, truth): each truth by mpmath from the written
# formula (the comment), at the float inputs; each point from `losscc check`'s report, where
# the plain form was off by the ulps in the comment.
LOWERED_VALUES = [
    # log-near-1, f64: -log(1 - 0 + 1e-12) = -(1e-12 - 5e-25); plain log(1 + 1e-12): 4.4e11 ulps
    ("SigmoidBCELoss", {"from_sigmoid": True}, 0.0, 0.0, np.float64, "value",
     lambda p, z: -mpmath.log(1 - p + mpmath.mpf(1e-12))),
    # log-near-1, f32 (computed in double): -log(1 + 1e-12) at p = 1, z = 1; plain: 1251 ulps
    ("SigmoidBCELoss", {"from_sigmoid": True}, 1.0, 1.0, np.float32, "value",
     lambda p, z: -mpmath.log(p + mpmath.mpf(1e-12))),
    # sub-ratio, f64: 1 - t/(p + 1e-8); plain: 1.7e8 ulps
    ("PoissonNLLLoss", {"from_logits": False}, 3.4831797283674014e+171, 3.4831797340892283e+171,
     np.float64, "grad", lambda p, t: 1 - t / (p + mpmath.mpf(1e-8))),
    # sub-ratio, f32: p = t = 509.73285: 1e-8/(p + 1e-8); plain: 20 ulps
    ("PoissonNLLLoss", {"from_logits": False}, 509.73284912109375, 509.73284912109375,
     np.float32, "grad", lambda p, t: 1 - t / (p + mpmath.mpf(1e-8))),
    # exp-sub, f64: exp(p) - t at t = 1 is expm1(p) = 0.024094897251961836 (mpmath); plain:
    # exp(p) - 1 cancels, 18 ulps
    ("PoissonNLLLoss", {"compute_full": True}, 0.023809195421048795, 1.0, np.float64, "grad",
     lambda p, t: mpmath.exp(p) - t),
    # deviance-difference (bd0), f64: p - t log(p + 1e-8) + t log t - t + log(2 pi t)/2 =
    # 2.6167952707652363 (mpmath); plain (HEAD 18dad62): 29 ulps, the terms ~100 cancel
    ("PoissonNLLLoss", {"from_logits": False, "compute_full": True}, 30.0, 29.793427339525856,
     np.float64, "value", lambda p, t: p - t * mpmath.log(p + mpmath.mpf(1e-8)) + t * mpmath.log(t) - t
     + mpmath.log(2 * mpmath.pi * t) / 2),
    # bd0 with its intermediates' roundings kept (x - t = d + dl, v's, log's), f64: 3968.0854061145964
    # (mpmath) at x/t = 0.34, where bd0's conditioning is 2.6; before (an uncompensated series,
    # p - t + eps rounded twice): 5.2 ulps
    ("PoissonNLLLoss", {"from_logits": False, "compute_full": True}, 3177.3387539089313,
     9390.219302000625, np.float64, "value",
     lambda p, t: p - t * mpmath.log(p + mpmath.mpf(1e-8)) + t * mpmath.log(t) - t
     + mpmath.log(2 * mpmath.pi * t) / 2),
    # bd0, f32 at p = t = FLT_MAX, eps = 4.063361033887957e-06 (the check's point): 45.28035399587782
    # (mpmath); plain: 0.0, terms ~3e40 cancel
    ("PoissonNLLLoss", {"from_logits": False, "compute_full": True, "epsilon": 4.063361033887957e-06},
     3.4028234663852886e+38, 3.4028234663852886e+38, np.float32, "value",
     lambda p, t: p - t * mpmath.log(p + mpmath.mpf(4.063361033887957e-06)) + t * mpmath.log(t) - t
     + mpmath.log(2 * mpmath.pi * t) / 2),
    # bd0 and log-scaled, f64 at p = DBL_MAX, t = 1.7976931344082499e308: 5.7344545533243404e288
    # (mpmath); plain: NaN (t*log(t) and 2*pi*t overflow: inf - inf)
    ("PoissonNLLLoss", {"from_logits": False, "compute_full": True}, 1.7976931348623157e+308,
     1.7976931344082499e+308, np.float64, "value",
     lambda p, t: p - t * mpmath.log(p + mpmath.mpf(1e-8)) + t * mpmath.log(t) - t
     + mpmath.log(2 * mpmath.pi * t) / 2),
    # bd0_exp, f64: log-rates at u = -6.8e74 (exp(u) = 0), t = 7077.7: -t*u + t log t - t + ... =
    # 4.8124041944791674e78 (mpmath); bd0 of the rounded exp(u) = 0 would be inf
    ("PoissonNLLLoss", {"compute_full": True}, -6.799372843787834e+74, 7077.717761684393,
     np.float64, "value", lambda p, t: mpmath.exp(p) - t * p + t * mpmath.log(t) - t
     + mpmath.log(2 * mpmath.pi * t) / 2),
    # quotient-chain, f64: t/(p + 1e-8)**2 = 3.19e-245; plain: 0
    ("PoissonNLLLoss", {"from_logits": False}, 3.13496512017867e+244, 3.135266070944311e+244,
     np.float64, "hess", lambda p, t: t / (p + mpmath.mpf(1e-8))**2),
    # quotient-chain, f64: 1/(s**2 cosh((p - y)/s)**2) = 6.9e-318 (u = -375); plain: 0
    ("LogCoshLoss", {"scale": 0.00012744778304576735}, 0.006282722661412111, 0.05405075074166484,
     np.float64, "hess", lambda p, y: 1 / (mpmath.mpf(0.00012744778304576735)**2
                                          * mpmath.cosh((p - y) / mpmath.mpf(0.00012744778304576735))**2)),
]


@pytest.mark.parametrize("cls_name, kwargs, pred, label, dtype, output, truth", LOWERED_VALUES)
def test_printer_lowerings_are_exact_where_the_plain_form_is_not(losses, cls_name, kwargs, pred,
                                                                 label, dtype, output, truth):
    loss = getattr(losses, cls_name)(**kwargs)
    p, t = np.array([pred], dtype), np.array([label])
    got = {"value": lambda: loss(p, t), "grad": lambda: loss.grad(p, t),
           "hess": lambda: loss.grad_hess(p, t)[1]}[output]()[0]
    with mpmath.workdps(60):
        want = truth(mpmath.mpf(float(p[0])), mpmath.mpf(label))
        assert _ulps(got, want, dtype) <= 1, (got, want)


def test_sum_with_a_row_shift_adds_the_data_terms_first():
    # log_softmax is (x - m) - r: where m = x = 6e247, 1 + m - x + log(q) + r must not round 1
    # and log(q) away in 1 + m; without a shift the literal still comes first ((1 - p) + eps).
    m, r, q = (sympy.Symbol(n, real=True) for n in ("m0", "r0", "x_label"))
    assert c(1 + m - x + sympy.log(q) + r) == "m0 - x_pred + 1 + lcc_log(x_label) + r0"
    assert c(1 - x + eps) == "1 - x_pred + p_epsilon"


def test_quotient_prints_as_one_division():
    # x2 / r1 / r0 stays two divisions: sympy's x2/(r0*r1) overflows where r0, r1 are 1e200
    from losscc.rows import Quotient

    r0, r1 = sympy.Symbol("r0", real=True), sympy.Symbol("r1", real=True)
    assert c(Quotient(x, r1) / r0) == "(x_pred/r1)/r0"
    assert c(Quotient(x + 1, r0 * r1)) == "((1 + x_pred)/(r0*r1))"  # literal first, as in any sum


def test_exp_sub_keeps_a_one_hot_softmax_minus_1(losses):
    # KL from logits, label [1, 0]: d/dpred[0] = (softmax_0 - 1) / 2 = -sigmoid(x1 - x0) / 2,
    # -1.3668120172586644e-35 at the point `losscc check` reported (mpmath: the truth there);
    # sum(label) * p - label computed plainly is 0.
    pred = np.array([[79.60202663122308, 0.017176590470092082]])
    label = np.array([[1.0, 0.0]])
    _, g = losses.KLDivLoss(from_logits=False).value_and_grad(pred, label)
    with mpmath.workdps(60):
        want = -1 / (1 + mpmath.exp(mpmath.mpf(pred[0, 0]) - mpmath.mpf(pred[0, 1]))) / 2
    assert _ulps(g[0, 0], want, np.float64) <= 2, (g[0, 0], want)


def test_dominant_sum_of_an_exp_knows_its_log():
    from losscc.functions import DominantSum

    assert c(DominantSum(sympy.exp(x), -y, x)) == "lcc_dominant_exp(lcc_exp(x_pred), -x_label, x_pred)"
    assert c(DominantSum(x, -y, sympy.log(x))) == "lcc_dominant_sum(x_pred, -x_label, lcc_log(x_pred))"
