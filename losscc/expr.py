"""Expression stage: parse a spec's math with a whitelisting parser into sympy.

The text is parsed by Python's `ast` module and only the node kinds and names below are
turned into sympy objects; nothing is ever evaluated (no eval, sympify or parse_expr), so a
spec cannot run code. Every error points at the offending character in the spec file.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass

import sympy
from sympy.codegen.cfunctions import expm1, log1p

from .errors import SpecError
from .functions import Sigmoid, Softplus
from .ir import Formula, Loc

MAX_NODES = 5000  # ast nodes in one formula
MAX_DEPTH = 100  # nesting depth
MAX_POWER = 64  # largest integer exponent


def _piecewise_placeholder(*args):  # Piecewise's (expr, cond) pairs are handled in _call
    raise AssertionError


def _relu(x):
    return sympy.Max(0, x)


def _clip(x, lo, hi):
    return sympy.Min(sympy.Max(x, lo), hi)


def _where(cond, a, b):
    if cond is sympy.true:
        return a
    if cond is sympy.false:
        return b
    return sympy.Piecewise((a, cond), (b, True))


# name -> (sympy builder, number of arguments: an int, or (min, None) for "at least min")
FUNCTIONS = {
    "exp": (sympy.exp, 1),
    "log": (sympy.log, 1),
    "log1p": (log1p, 1),
    "expm1": (expm1, 1),
    "sqrt": (sympy.sqrt, 1),
    "abs": (sympy.Abs, 1),
    "Abs": (sympy.Abs, 1),
    "sign": (sympy.sign, 1),
    "min": (sympy.Min, (2, None)),
    "Min": (sympy.Min, (2, None)),
    "max": (sympy.Max, (2, None)),
    "Max": (sympy.Max, (2, None)),
    "tanh": (sympy.tanh, 1),
    "cosh": (sympy.cosh, 1),
    "sigmoid": (Sigmoid, 1),
    "softplus": (Softplus, 1),
    "log_sigmoid": (lambda x: -Softplus(-x), 1),  # log sigmoid(x) = -softplus(-x)
    "relu": (_relu, 1),
    "square": (lambda x: x**2, 1),
    "clip": (_clip, 3),
    "where": (_where, 3),
    "Piecewise": (_piecewise_placeholder, (1, None)),
}
CONSTANTS = {"pi": sympy.pi, "E": sympy.E}

_BINOPS = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
    ast.Pow: lambda a, b: a**b,
}
_COMPARE = {
    ast.Lt: sympy.Lt, ast.LtE: sympy.Le, ast.Gt: sympy.Gt, ast.GtE: sympy.Ge,
    ast.Eq: sympy.Eq, ast.NotEq: sympy.Ne,
}
_DESCRIBE = {
    ast.Attribute: "attribute access", ast.Lambda: "a lambda", ast.ListComp: "a comprehension",
    ast.SetComp: "a comprehension", ast.DictComp: "a comprehension",
    ast.GeneratorExp: "a generator", ast.JoinedStr: "an f-string", ast.Subscript: "indexing",
    ast.Starred: "a starred argument", ast.NamedExpr: "an assignment expression",
    ast.Await: "await", ast.Yield: "yield", ast.List: "a list", ast.Dict: "a dict", ast.Set: "a set",
}


def _is_condition(x) -> bool:
    """True for conditions (sympy Symbols are Booleans too, so test the condition kinds)."""
    return isinstance(x, (bool, sympy.logic.boolalg.BooleanAtom, sympy.logic.boolalg.BooleanFunction,
                          sympy.core.relational.Relational))


@dataclass(frozen=True)
class Scope:
    """What names mean inside one formula."""

    symbols: dict  # input or param name -> sympy Symbol
    variants: dict  # variant name -> its value in the combination being compiled (bool or str)
    lets: dict  # let name -> sympy expression
    variant_values: tuple = ()  # every variant's list of values, to catch misspelled ones


class _Parser:
    def __init__(self, formula: Formula, scope: Scope, what: str):
        self.formula = formula
        self.scope = scope
        self.what = what

    def loc(self, node) -> Loc:
        """Map an ast position back into the spec file (line 1 has the added '(')."""
        line = getattr(node, "lineno", 1)
        col = getattr(node, "col_offset", 0) - (1 if line == 1 else 0)
        starts = self.formula.line_starts or ((self.formula.loc.line, self.formula.loc.col),)
        fline, fcol = starts[min(line, len(starts)) - 1]
        return Loc(self.formula.loc.file, fline, fcol + max(col, 0))

    def fail(self, node, message: str):
        raise SpecError(self.loc(node), f"{self.what}: {message}")

    def parse(self):
        text = self.formula.text
        try:
            tree = ast.parse("(" + text + "\n)", mode="eval")
        except SyntaxError as exc:
            fake = ast.Constant(0)
            fake.lineno, fake.col_offset = exc.lineno or 1, (exc.offset or 1) - 1
            self.fail(fake, f"syntax error: {exc.msg}")
        except (RecursionError, MemoryError, ValueError):
            raise SpecError(self.formula.loc, f"{self.what}: expression is too deeply nested") from None
        count = sum(1 for _ in ast.walk(tree))
        if count > MAX_NODES:
            raise SpecError(self.formula.loc, f"{self.what}: expression has {count} parts, "
                                              f"more than the {MAX_NODES} allowed")
        return self.visit(tree.body, 0)

    def visit(self, node, depth: int):
        if depth > MAX_DEPTH:
            self.fail(node, f"expression nests deeper than {MAX_DEPTH} levels")
        method = getattr(self, "visit_" + type(node).__name__, None)
        if method is None:
            kind = _DESCRIBE.get(type(node), type(node).__name__)
            self.fail(node, f"{kind} is not allowed in a loss expression")
        return method(node, depth + 1)

    def value(self, node, depth):
        """A sub-expression that must be a number-valued sympy expression."""
        result = self.visit(node, depth)
        if isinstance(result, str) or _is_condition(result):
            self.fail(node, "a condition or text is used where a number is expected")
        return result

    def condition(self, node, depth):
        result = self.visit(node, depth)
        if isinstance(result, bool):
            return sympy.true if result else sympy.false
        if not _is_condition(result):
            self.fail(node, "a number is used where a condition is expected (compare it, e.g. x > 0)")
        return result

    def visit_Constant(self, node, depth):
        v = node.value
        if isinstance(v, bool):
            return v
        if isinstance(v, int):
            return sympy.Integer(v)
        if isinstance(v, float):
            return sympy.Rational(repr(v))  # exact decimal: 0.5 -> 1/2, printed back as a literal
        if isinstance(v, str):
            return v
        self.fail(node, f"constant {v!r} is not allowed")

    def visit_Name(self, node, depth):
        name = node.id
        scope = self.scope
        if name in scope.symbols:
            return scope.symbols[name]
        if name in scope.lets:
            return scope.lets[name]
        if name in scope.variants:
            return scope.variants[name]
        if name in CONSTANTS:
            return CONSTANTS[name]
        if name in FUNCTIONS:
            self.fail(node, f"'{name}' is a function: call it, e.g. {name}(x)")
        known = sorted([*scope.symbols, *scope.lets, *scope.variants, *CONSTANTS])
        self.fail(node, f"unknown name '{name}' (known: {', '.join(known)})")

    def visit_UnaryOp(self, node, depth):
        if isinstance(node.op, ast.Not):
            return sympy.Not(self.condition(node.operand, depth))
        operand = self.value(node.operand, depth)
        if isinstance(node.op, ast.USub):
            return -operand
        if isinstance(node.op, ast.UAdd):
            return operand
        self.fail(node, f"operator {type(node.op).__name__} is not allowed")

    def visit_BinOp(self, node, depth):
        op = _BINOPS.get(type(node.op))
        if op is None:
            self.fail(node, f"operator {type(node.op).__name__} is not allowed (use + - * / **)")
        a = self.value(node.left, depth)
        b = self.value(node.right, depth)
        if isinstance(node.op, ast.Pow) and b.is_Number and b.is_integer and abs(int(b)) > MAX_POWER:
            self.fail(node.right, f"exponent {b} is larger than {MAX_POWER}")
        try:
            return op(a, b)
        except ZeroDivisionError:
            self.fail(node, "division by zero")

    def visit_BoolOp(self, node, depth):
        parts = [self.condition(v, depth) for v in node.values]
        return sympy.And(*parts) if isinstance(node.op, ast.And) else sympy.Or(*parts)

    def visit_Compare(self, node, depth):
        left_node, result = node.left, []
        left = self.visit(left_node, depth)
        for op, right_node in zip(node.ops, node.comparators):
            right = self.visit(right_node, depth)
            result.append(self.compare(node, op, left, right))
            left = right
        return result[0] if len(result) == 1 else sympy.And(*result)

    def compare(self, node, op, a, b):
        if isinstance(a, (str, bool)) or isinstance(b, (str, bool)):
            # Variant tests such as label_format == 'signed' are settled at compile time.
            if not isinstance(op, (ast.Eq, ast.NotEq)):
                self.fail(node, "variants and text can only be compared with == or !=")
            if type(a) is not type(b) and not (isinstance(a, bool) and isinstance(b, bool)):
                self.fail(node, f"cannot compare {a!r} with {b!r}")
            allowed = [v for values in self.scope.variant_values for v in values if isinstance(v, str)]
            for side in (a, b):
                if isinstance(side, str) and allowed and side not in allowed:
                    self.fail(node, f"'{side}' is not a value of any variant (values: {', '.join(map(str, allowed))})")
            return (a == b) if isinstance(op, ast.Eq) else (a != b)
        if isinstance(op, (ast.In, ast.NotIn, ast.Is, ast.IsNot)):
            self.fail(node, f"operator {type(op).__name__} is not allowed")
        return _COMPARE[type(op)](a, b)

    def visit_IfExp(self, node, depth):
        return _where(self.condition(node.test, depth), self.value(node.body, depth),
                      self.value(node.orelse, depth))

    def visit_Call(self, node, depth):
        if not isinstance(node.func, ast.Name):
            self.fail(node, "only named functions can be called, e.g. exp(x)")
        name = node.func.id
        if name not in FUNCTIONS:
            self.fail(node.func, f"unknown function '{name}' (known: {', '.join(sorted(FUNCTIONS))})")
        if node.keywords:
            self.fail(node, f"{name}() takes no keyword arguments")
        builder, arity = FUNCTIONS[name]
        n = len(node.args)
        lo, hi = (arity, arity) if isinstance(arity, int) else arity
        if n < lo or (hi is not None and n > hi):
            want = f"{lo}" if lo == hi else f"at least {lo}"
            self.fail(node, f"{name}() takes {want} argument{'s' if lo != 1 else ''}, got {n}")
        if name == "Piecewise":
            return self.piecewise(node, depth)
        if name == "where":
            return _where(self.condition(node.args[0], depth), self.value(node.args[1], depth),
                          self.value(node.args[2], depth))
        args = [self.value(a, depth) for a in node.args]
        return builder(*args)

    def piecewise(self, node, depth):
        pieces = []
        for arg in node.args:
            if not (isinstance(arg, ast.Tuple) and len(arg.elts) == 2):
                self.fail(arg, "Piecewise takes (value, condition) pairs")
            pieces.append((self.value(arg.elts[0], depth), self.condition(arg.elts[1], depth)))
        if pieces[-1][1] is not sympy.true:
            self.fail(node.args[-1], "the last Piecewise pair must have the condition True")
        return sympy.Piecewise(*pieces)


def parse_formula(formula: Formula, scope: Scope, what: str = "loss"):
    """The sympy expression of `formula`, or a SpecError pointing into the spec."""
    expr = _Parser(formula, scope, what).parse()
    if isinstance(expr, str) or _is_condition(expr):
        raise SpecError(formula.loc, f"{what}: must be a number-valued expression, not a condition")
    return expr


def symbols_for(spec) -> dict:
    """The sympy Symbol of every input and param, named as it is spelled in C (x_*, p_*)."""
    out = {}
    for inp in spec.inputs:
        out[inp.name] = sympy.Symbol("x_" + inp.name, real=True)
    for p in spec.params:
        positive = (p.gt is not None and p.gt >= 0) or (p.min is not None and p.min > 0)
        nonneg = p.min is not None and p.min >= 0
        out[p.name] = sympy.Symbol("p_" + p.name, real=True, positive=positive or None,
                                   nonnegative=(nonneg or positive) or None)
    return out


def parse_spec_math(spec, options: dict, symbols: dict):
    """The loss of `spec` for one variant combination, with its `let` definitions substituted."""
    lets: dict = {}
    variant_values = tuple(v.values for v in spec.variants)
    for name, formula in spec.let:
        lets[name] = parse_formula(formula, Scope(symbols, options, dict(lets), variant_values),
                                   f"let '{name}'")
    return parse_formula(spec.loss, Scope(symbols, options, lets, variant_values), "loss")
