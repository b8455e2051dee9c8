"""The expression stage on its own: losscc.expr.parse_formula with a hand-made Formula and Scope.

Every expected sympy expression is written out by hand with sympy's own constructors.
"""

from __future__ import annotations

import builtins

import pytest
import sympy
from sympy import Abs, And, Eq, Ge, Gt, Integer, Le, Lt, Max, Min, Ne, Not, Or, Piecewise, Rational
from sympy.codegen.cfunctions import expm1, log1p

from losscc.errors import SpecError
from losscc.expr import Variant, FUNCTIONS, MAX_POWER, Scope, parse_formula, parse_spec_math, symbols_for
from losscc.functions import LogCosh, Sigmoid, Softplus
from losscc.ir import Formula, Loc
from losscc.rows import NCLASS
from losscc.spec import load_spec, parse_spec

from conftest import SPECS

X = sympy.Symbol("x_pred", real=True)
Y = sympy.Symbol("x_label", real=True)
RHO = sympy.Symbol("p_rho", real=True, positive=True)
SYMBOLS = {"pred": X, "label": Y, "rho": RHO}
LOC = Loc("f.yaml", 3, 7)  # as if the formula followed 'loss: ' on line 3
KNOWN_FUNCTIONS = ("Abs, Max, Min, Piecewise, abs, clip, cosh, exp, expm1, log, log1p, log_cosh, log_sigmoid, "
                   "max, min, relu, sigmoid, sign, softplus, sqrt, square, tanh, where")


def positions(text, line_starts=()):
    """Per-character file positions for `text` whose line i starts at line_starts[i]
    (by default: line 1 at LOC, later lines at column 7 of the following file lines)."""
    out = []
    for i, line in enumerate(text.split("\n")):
        fl, fc = line_starts[i] if i < len(line_starts) else (LOC.line + i, LOC.col)
        out += [None if ch.isspace() else (fl, fc + j) for j, ch in enumerate(line)] + [None]
    return tuple(out[:len(text)])


def parse(text, variants=None, lets=None, variant_values=(), line_starts=(), what="loss"):
    """Parse with the given variant values; each variant's allowed values are the entry of
    `variant_values` that holds its value."""
    scope_variants = {
        name: Variant(name, value, next((tuple(v) for v in variant_values if value in v
                                         and type(value) is type(v[0])),
                                        (False, True) if isinstance(value, bool) else (value,)))
        for name, value in (variants or {}).items()
    }
    scope = Scope(symbols=SYMBOLS, variants=scope_variants, lets=lets or {})
    return parse_formula(Formula(text, LOC, positions(text, line_starts)), scope, what)


def error(text, **kw) -> str:
    with pytest.raises(SpecError) as exc:
        parse(text, **kw)
    return str(exc.value)


# ---------------------------------------------------------------------------- functions

FUNCTION_CASES = {
    "exp": ("exp(pred)", sympy.exp(X)),
    "log": ("log(pred)", sympy.log(X)),
    "log1p": ("log1p(pred)", log1p(X)),  # the C log1p, not log(1 + x)
    "expm1": ("expm1(pred)", expm1(X)),
    "log_cosh": ("log_cosh(pred)", LogCosh(X)),
    "sqrt": ("sqrt(pred)", sympy.Pow(X, Rational(1, 2))),
    "abs": ("abs(pred - label)", Abs(X - Y)),
    "Abs": ("Abs(pred)", Abs(X)),
    "sign": ("sign(pred)", sympy.sign(X)),
    "min": ("min(pred, label)", Min(X, Y)),
    "Min": ("Min(pred, label, 0)", Min(X, Y, 0)),
    "max": ("max(pred, label)", Max(X, Y)),
    "Max": ("Max(pred, label, 0)", Max(X, Y, 0)),
    "tanh": ("tanh(pred)", sympy.tanh(X)),
    "cosh": ("cosh(pred)", sympy.cosh(X)),
    "sigmoid": ("sigmoid(pred)", Sigmoid(X)),
    "softplus": ("softplus(pred)", Softplus(X)),
    "log_sigmoid": ("log_sigmoid(pred)", -Softplus(-X)),  # log sigmoid(x) = -softplus(-x)
    "relu": ("relu(rho - pred)", Max(0, RHO - X)),
    "square": ("square(pred - label)", (X - Y) ** 2),
    "clip": ("clip(pred, 0, 1)", Min(Max(X, 0), 1)),
    "where": ("where(pred > 0, pred, label)", Piecewise((X, Gt(X, 0)), (Y, True))),
    "Piecewise": ("Piecewise((pred, pred > 0), (2 * label, pred < -1), (0, True))",
                  Piecewise((X, Gt(X, 0)), (2 * Y, Lt(X, -1)), (0, True))),
}


def test_every_function_is_tested():
    assert set(FUNCTION_CASES) == set(FUNCTIONS)


@pytest.mark.parametrize("name", sorted(FUNCTION_CASES))
def test_function_builds_the_sympy_expression(name):
    text, expected = FUNCTION_CASES[name]
    result = parse(text)
    assert result == expected
    assert type(result) is type(expected)


def test_stable_nodes_are_kept_as_nodes():
    # sigmoid/softplus must stay opaque (their C is the stable form), and log1p/expm1 must not
    # become log(1 + x) / exp(x) - 1.
    assert parse("softplus(pred) + sigmoid(pred)").atoms(Softplus, Sigmoid) == {Softplus(X), Sigmoid(X)}
    assert not parse("log1p(pred)").has(sympy.log)
    assert not parse("expm1(pred)").has(sympy.exp)


@pytest.mark.parametrize("text, message", [
    ("exp()", "exp() takes 1 argument, got 0"),
    ("exp(pred, label)", "exp() takes 1 argument, got 2"),
    ("clip(pred, 0)", "clip() takes 3 arguments, got 2"),
    ("where(pred > 0, pred)", "where() takes 3 arguments, got 2"),
    ("min(pred)", "min() takes at least 2 arguments, got 1"),
    ("Piecewise()", "Piecewise() takes at least 1 argument, got 0"),
])
def test_arity(text, message):
    assert error(text) == f"f.yaml:3:7: loss: {message}"


def test_piecewise_needs_pairs_and_a_final_true():
    assert error("Piecewise(pred)") == "f.yaml:3:17: loss: Piecewise takes (value, condition) pairs"
    assert error("Piecewise((pred, pred > 0, 1), (0, True))") == \
        "f.yaml:3:17: loss: Piecewise takes (value, condition) pairs"
    # 'Piecewise(' is 10 characters and '(pred, pred > 0), ' 18: the last pair is column 7 + 28
    assert error("Piecewise((pred, pred > 0), (0, pred <= 0))") == \
        "f.yaml:3:35: loss: the last Piecewise pair must have the condition True"


# ---------------------------------------------------------------------------- operators


@pytest.mark.parametrize("text, expected", [
    ("pred + label", X + Y),
    ("pred - label", X - Y),
    ("pred * label", X * Y),
    ("pred / label", X / Y),
    ("pred ** 2", X**2),
    ("-pred", -X),
    ("+pred", X),
    ("pred ** -64", X**-64),
    (f"pred ** {MAX_POWER}", X**64),
    ("pred ** 0.5", sympy.sqrt(X)),
    ("pred ** 64.0", X**64),  # 64.0 is the integer 64 exactly
    ("2 ** 10", Integer(1024)),
    ("(pred - label) ** 2 / 2", (X - Y) ** 2 / 2),
])
def test_arithmetic(text, expected):
    assert parse(text) == expected


@pytest.mark.parametrize("text, col, shown", [
    ("pred ** 65", 15, "65"),
    ("pred ** -65", 15, "-65"),
    ("pred ** 65.0", 15, "65"),
    ("pred ** (8 * 9)", 16, "72"),  # the folded product, located at its first factor, the 8
])
def test_exponent_limit(text, col, shown):
    assert error(text) == f"f.yaml:3:{col}: loss: exponent {shown} is beyond +-64"


@pytest.mark.parametrize("text, cond", [
    ("pred < label", Lt(X, Y)),
    ("pred <= label", Le(X, Y)),
    ("pred > label", Gt(X, Y)),
    ("pred >= label", Ge(X, Y)),
    ("pred == label", Eq(X, Y)),
    ("pred != label", Ne(X, Y)),
    ("0 < pred < 1", And(Lt(0, X), Lt(X, 1))),
    ("pred > 0 and label > 0", And(Gt(X, 0), Gt(Y, 0))),
    ("pred > 0 or label > 0", Or(Gt(X, 0), Gt(Y, 0))),
    ("not pred > 0", Not(Gt(X, 0))),
])
def test_conditions(text, cond):
    assert parse(f"where({text}, pred, label)") == Piecewise((X, cond), (Y, True))


def test_conditional_expression():
    assert parse("pred if pred > label else label") == Piecewise((X, Gt(X, Y)), (Y, True))


@pytest.mark.parametrize("text, message", [
    ("pred % 2", "f.yaml:3:7: loss: operator Mod is not allowed (use + - * / **)"),
    ("pred // 2", "f.yaml:3:7: loss: operator FloorDiv is not allowed (use + - * / **)"),
    ("~pred", "f.yaml:3:7: loss: operator Invert is not allowed"),
    ("where(pred is label, pred, label)", "f.yaml:3:13: loss: operator Is is not allowed"),
    ("pred + 1j", "f.yaml:3:14: loss: constant 1j is not allowed"),
    ("pred + None", "f.yaml:3:14: loss: constant None is not allowed"),
    ("(pred, label)", "f.yaml:3:7: loss: Tuple is not allowed in a loss expression"),
    ("[pred]", "f.yaml:3:7: loss: a list is not allowed in a loss expression"),
    ("{pred: 1}", "f.yaml:3:7: loss: a dict is not allowed in a loss expression"),
    ("(p := pred)", "f.yaml:3:8: loss: an assignment expression is not allowed in a loss expression"),
    ("exp(*pred)", "f.yaml:3:11: loss: a starred argument is not allowed in a loss expression"),
    ("(lambda: pred)()", "f.yaml:3:8: loss: a lambda is not allowed in a loss expression"),
    ("exp + pred", "f.yaml:3:7: loss: 'exp' is a function: call it, e.g. exp(x)"),
    ("pred + True", "f.yaml:3:14: loss: a condition or text is used where a number is expected"),
    ("pred + 'a'", "f.yaml:3:14: loss: a condition or text is used where a number is expected"),
    ("pred > 0", "f.yaml:3:7: loss: must be a number-valued expression, not text, a variant or a condition"),
    ("where(pred, 1, 0)", "f.yaml:3:13: loss: a number is used where a condition is expected "
                          "(compare it, e.g. x > 0)"),
    ("not pred", "f.yaml:3:11: loss: a number is used where a condition is expected "
                 "(compare it, e.g. x > 0)"),
    ("expp(pred)", f"f.yaml:3:7: loss: unknown function 'expp' (known: {KNOWN_FUNCTIONS})"),
    ("log(x=pred)", "f.yaml:3:7: loss: log() takes no keyword arguments"),
])
def test_refused(text, message):
    assert error(text) == message


# ---------------------------------------------------------------------------- constants


@pytest.mark.parametrize("text, expected", [
    ("0.1", Rational(1, 10)),
    ("0.5", Rational(1, 2)),
    ("2", Integer(2)),
    ("2.0", Integer(2)),
    ("1e-12", Rational(1, 10**12)),
    ("1.5e3", Integer(1500)),
    ("0.1 + 0.2", Rational(3, 10)),  # exact, not 0.30000000000000004
    ("1 / 3", Rational(1, 3)),  # exact division of integers
    ("pi", sympy.pi),
    ("E", sympy.E),
])
def test_constants_are_exact(text, expected):
    result = parse(f"pred * ({text})")
    assert result == X * expected
    assert not result.atoms(sympy.Float)


# ---------------------------------------------------------------------------- variants


LABEL_FORMAT = (("signed", "binary"),)


@pytest.mark.parametrize("value, expected", [("signed", (Y + 1) / 2), ("binary", Y)])
def test_text_variant_folds_at_compile_time(value, expected):
    opts = {"label_format": value}
    text = "where(label_format == 'signed', (label + 1) / 2, label)"
    assert parse(text, variants=opts, variant_values=LABEL_FORMAT) == expected
    # the comparison either way round, and !=
    text = "where('signed' != label_format, label, (label + 1) / 2)"
    assert parse(text, variants=opts, variant_values=LABEL_FORMAT) == expected


@pytest.mark.parametrize("flag", [True, False])
def test_bool_variant_folds_at_compile_time(flag):
    opts = {"from_sigmoid": flag}
    assert parse("where(from_sigmoid, pred, label)", variants=opts) == (X if flag else Y)
    assert parse("where(not from_sigmoid, pred, label)", variants=opts) == (Y if flag else X)
    assert parse("pred if from_sigmoid else label", variants=opts) == (X if flag else Y)
    assert parse("where(from_sigmoid == True, pred, label)", variants=opts) == (X if flag else Y)
    # folded inside a condition: true and c is c, false and c is false
    folded = parse("where(from_sigmoid and pred > 0, pred, label)", variants=opts)
    assert folded == (Piecewise((X, Gt(X, 0)), (Y, True)) if flag else Y)
    assert not folded.has(sympy.Symbol("from_sigmoid"))


def test_variant_errors():
    opts = {"label_format": "signed", "from_sigmoid": False}
    vals = (("signed", "binary"), (False, True))
    assert error("where(label_format < 'signed', pred, label)", variants=opts, variant_values=vals) == \
        "f.yaml:3:13: loss: a variant can only be compared with == or !="
    assert error("where(label_format == from_sigmoid, pred, label)", variants=opts,
                 variant_values=vals) == \
        "f.yaml:3:13: loss: variants 'label_format' and 'from_sigmoid' have different values"
    assert error("where(label_format == 'sigend', pred, label)", variants=opts, variant_values=vals) == \
        "f.yaml:3:29: loss: 'sigend' is not a value of variant 'label_format' (values: 'signed', 'binary')"
    assert error("pred * from_sigmoid", variants=opts, variant_values=vals) == \
        ("f.yaml:3:14: loss: variant 'from_sigmoid' is a compile-time choice, not a number: "
         "test it, e.g. where(from_sigmoid == False, a, b)")


# ---------------------------------------------------------------------------- let


def test_let_names_are_substituted():
    assert parse("e**2 / 2", lets={"e": X - Y}) == (X - Y) ** 2 / 2


def test_parse_spec_math_substitutes_lets_in_order():
    spec = load_spec(SPECS / "logistic.yaml")  # let z = where(label_format == 'signed', ...)
    symbols = symbols_for(spec)
    x, y = symbols["pred"], symbols["label"]
    assert (x, y) == (X, Y)
    def bce(z):  # the spec's loss with z substituted, written out by hand
        return (Piecewise((0, sympy.Eq(z, 1)), ((1 - z) * Softplus(X), True))
                + Piecewise((0, sympy.Eq(z, 0)), (z * Softplus(-X), True)))

    assert parse_spec_math(spec, {"label_format": "signed"}, symbols) == bce((Y + 1) / 2)
    assert parse_spec_math(spec, {"label_format": "binary"}, symbols) == bce(Y)


def _spec_with_lets(lets: str):
    text = ("name: demo\nsummary: s\nreference: r\ninputs:\n  pred: {}\n  label: {}\n"
            f"let:\n{lets}loss: b\n")
    return parse_spec(text, "lets.yaml")


def test_a_let_sees_earlier_lets_only():
    spec = _spec_with_lets("  a: pred - label\n  b: 2 * a\n")
    symbols = symbols_for(spec)
    assert parse_spec_math(spec, {}, symbols) == 2 * (X - Y)
    spec = _spec_with_lets("  b: 2 * a\n  a: pred - label\n")
    with pytest.raises(SpecError) as exc:
        parse_spec_math(spec, {}, symbols_for(spec))
    # '  b: 2 * a': the formula starts at column 6, so 'a' is column 10 of line 8
    assert str(exc.value) == "lets.yaml:8:10: let 'b': unknown name 'a' (known: E, label, pi, pred)"


def test_symbols_carry_assumptions_from_bounds():
    spec = load_spec(SPECS / "huber.yaml")  # rho: {gt: 0}
    symbols = symbols_for(spec)
    assert symbols["pred"] == sympy.Symbol("x_pred", real=True)
    assert symbols["rho"] == sympy.Symbol("p_rho", real=True, positive=True, nonnegative=True)
    assert symbols["rho"].is_positive


# ---------------------------------------------------------------------------- locations


def test_location_on_the_first_line_is_offset_by_the_formula_column():
    # 'pred + expp(label)': 'expp' is 7 characters in, so column 7 + 7
    assert error("pred + expp(label)") == \
        f"f.yaml:3:14: loss: unknown function 'expp' (known: {KNOWN_FUNCTIONS})"
    assert error("pred + lable") == "f.yaml:3:14: loss: unknown name 'lable' (known: E, label, pi, pred, rho)"


def test_unknown_name_lists_lets_and_variants_too():
    assert error("pred + zz", lets={"e": X}, variants={"fmt": "a"}) == \
        "f.yaml:3:14: loss: unknown name 'zz' (known: E, e, fmt, label, pi, pred, rho)"


def test_location_on_later_lines_uses_line_starts():
    starts = ((4, 3), (5, 3), (6, 5))
    assert error("pred +\n  expp(label)", line_starts=starts) == \
        f"f.yaml:5:5: loss: unknown function 'expp' (known: {KNOWN_FUNCTIONS})"
    assert error("pred +\nlabel +\nlable", line_starts=starts) == \
        "f.yaml:6:5: loss: unknown name 'lable' (known: E, label, pi, pred, rho)"
    assert error("pred +\n* label", line_starts=starts) == "f.yaml:5:3: loss: syntax error: invalid syntax"


def test_what_names_the_formula():
    assert error("lable", what="let 'z'") == \
        "f.yaml:3:7: let 'z': unknown name 'lable' (known: E, label, pi, pred, rho)"


def test_syntax_error_location():
    # 'pred - * label': the '*' is column 7 + 7
    assert error("pred - * label") == "f.yaml:3:14: loss: syntax error: invalid syntax"


@pytest.mark.parametrize("text, message", [
    ("pred + exp(pred", "f.yaml:3:17: loss: syntax error: '(' was never closed"),
    ("pred + [pred", "f.yaml:3:14: loss: syntax error: '[' was never closed"),
    ("exp(pred))", "f.yaml:3:16: loss: syntax error: unmatched ')'"),
])
def test_unbalanced_brackets_are_located(text, message):
    assert error(text) == message


# ---------------------------------------------------------------------------- never eval


def test_parsing_never_calls_eval_or_exec(monkeypatch):
    # Every catalogue formula and a malicious one parse with eval and exec unavailable.
    def refuse(*args, **kwargs):
        raise AssertionError("eval/exec called")

    specs = [load_spec(p) for p in sorted(SPECS.glob("*.yaml"))]
    monkeypatch.setattr(builtins, "eval", refuse)
    monkeypatch.setattr(builtins, "exec", refuse)
    for spec in specs:
        symbols = symbols_for(spec)
        for options in spec.variant_combos():
            parsed = parse_spec_math(spec, options, symbols)
            if spec.is_row:  # the loss, and the class-index gathers it made
                parsed, row = parsed
                known = {*symbols.values(), *row.gathers, *(i for i, _ in row.indices.values())}
                assert parsed.free_symbols <= known | {NCLASS}
            else:
                assert parsed.free_symbols <= set(symbols.values())
    with pytest.raises(SpecError, match="attribute access is not allowed"):
        parse("__import__('os').system('true')")


@pytest.mark.parametrize("text, message", [
    ("pred * exp(800)", "f.yaml:3:14: loss: constant exp(800) is beyond the range of double"),
    ("pred * sqrt(-1)", "f.yaml:3:14: loss: constant I is not a real number"),
    ("log(-2) + pred", "f.yaml:3:7: loss: constant log(2) + I*pi is not a real number"),
    # Python only knows that the text ends too early: point at its last character
    ("exp(pred) + label +", "f.yaml:3:25: loss: syntax error: invalid syntax"),
    ("pred\x00 + 1", "f.yaml:3:11: loss: contains a NUL character"),
])
def test_constants_and_truncated_formulas(text, message):
    assert error(text) == message
