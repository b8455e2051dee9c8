"""The derive and codegen stages on their own: tidy rules, stable nodes, the strict printer."""

from __future__ import annotations

import pytest
import sympy

from losscc.codegen import LossCPrinter, generate, kernel_body, shared_cse
from losscc.derive import derive, tidy
from losscc.errors import BuildError
from losscc.functions import Sigmoid, Softplus, naive
from losscc.ir import SymbolicLoss, SymbolicVariant
from losscc.spec import load_spec

from conftest import SPECS

x = sympy.Symbol("x_pred", real=True)
y = sympy.Symbol("x_label", real=True)
eps = sympy.Symbol("p_epsilon", positive=True)


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
    (sympy.exp(x), "exp(x_pred)"),
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
