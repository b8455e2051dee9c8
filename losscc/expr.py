"""Expression stage: parse a spec's math with a whitelisting parser into sympy.

The text is parsed by Python's `ast` module and only the node kinds and names below are
turned into sympy objects; nothing is ever evaluated (no eval, sympify or parse_expr), so a
spec cannot run code. Every error points at the offending character in the spec file.
"""

from __future__ import annotations

import ast
import math
import re
from dataclasses import dataclass
from typing import NamedTuple

import sympy
from sympy.codegen.cfunctions import expm1, log1p

from .errors import SpecError
from .functions import LogCosh, Sigmoid, Softplus
from .ir import Formula, Loc
from .rows import NCLASS, LogSumExp, RowMax, RowMin, RowSum, outside_reductions, replace_outside

MAX_NODES = 5000  # ast nodes in one formula
MAX_DEPTH = 100  # nesting depth
MAX_POWER = 64  # largest integer exponent
MAX_DIGITS = 400  # digits of one number (a double needs 17; 1e-320 written out, 320)
# Estimates of what a formula costs to differentiate and compile (formula_cost), checked
# before sympy takes any derivative. The size (sympy tree nodes) of the second derivative of
# an elementwise loss and of the gradient of a row loss: sympy's time grows faster than the
# size (some 3 s at the limit: a product of 15 tanh, 30 nested exp, a let chain
# a_k = a_(k-1)**2 + a_(k-1) six deep); the specs here stay under 600. A row loss's kernels
# grow with the nesting of its reductions (the specs here nest 2), and a C compiler's time
# with the number of Piecewise pieces (200 take it 25 s; the specs here have 3).
MAX_DERIVATIVE_PARTS = 10000
MAX_ROW_GRADIENT_PARTS = 2500
MAX_REDUCTION_DEPTH = 3
MAX_PIECES = 100
_NUMBER = re.compile(r"(?<![\w.])(?:\d[\d_]*\.?[\d_]*|\.\d[\d_]*)(?:[eE][+-]?\d[\d_]*)?")


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
    "log_cosh": (LogCosh, 1),
    "relu": (_relu, 1),
    "square": (lambda x: x**2, 1),
    "clip": (_clip, 3),
    "where": (_where, 3),
    "Piecewise": (_piecewise_placeholder, (1, None)),
}
# Row losses only: reductions over the class axis, and what is built from them.
ROW_FUNCTIONS = {
    "sum": (RowSum, 1),
    "mean": (lambda e: RowSum(e) / NCLASS, 1),
    "max": (RowMax, 1),  # max(e) reduces the row; max(a, b) is elementwise
    "min": (RowMin, 1),
    "logsumexp": (LogSumExp, 1),
    "softmax": (lambda e: sympy.exp(e - LogSumExp(e)), 1),
    "log_softmax": (lambda e: e - LogSumExp(e), 1),
    "dot": (lambda a, b: RowSum(a * b), 2),
    "norm": (lambda e: sympy.sqrt(RowSum(e**2)), 1),
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
    ast.GeneratorExp: "a generator", ast.JoinedStr: "an f-string",
    ast.Starred: "a starred argument", ast.NamedExpr: "an assignment expression",
    ast.Await: "await", ast.Yield: "yield", ast.List: "a list", ast.Dict: "a dict", ast.Set: "a set",
}


def _is_condition(x) -> bool:
    """True for conditions (sympy Symbols are Booleans too, so test the condition kinds)."""
    return isinstance(x, (bool, sympy.logic.boolalg.BooleanAtom, sympy.logic.boolalg.BooleanFunction,
                          sympy.core.relational.Relational))


@dataclass(frozen=True)
class Variant:
    """A variant's value inside a formula: compared at compile time, never computed with."""

    name: str
    value: object  # bool or str
    values: tuple


@dataclass(frozen=True)
class RowScope:
    """Row losses: which inputs are rows and class indices, and the gathers made so far."""

    rows: dict  # row input name -> its element symbol
    indices: dict  # class-index input name -> (its index symbol, its spec position)
    positions: dict  # row input name -> its spec position (names gather symbols)
    gathers: dict  # gather symbol -> (row input name, index symbol); filled while parsing
    used_as_index: set  # index inputs the formula indexes with


@dataclass(frozen=True)
class Scope:
    """What names mean inside one formula."""

    symbols: dict  # input or param name -> sympy Symbol
    variants: dict  # variant name -> Variant
    lets: dict  # let name -> sympy expression
    row: RowScope | None = None


class _Parser:
    def __init__(self, formula: Formula, scope: Scope, what: str):
        self.formula = formula
        self.scope = scope
        self.what = what
        self.prefix = 0  # characters added in front of line 1 to parse a multi-line formula
        self.line_starts = [0]
        for line in formula.text.split("\n")[:-1]:
            self.line_starts.append(self.line_starts[-1] + len(line) + 1)

    def loc_at(self, lineno: int, col_bytes: int) -> Loc:
        """Map a parser position (1-based line, UTF-8 byte column) into the spec file."""
        lines = self.formula.text.split("\n")
        i = min(max(lineno, 1), len(lines)) - 1
        col = col_bytes - (self.prefix if i == 0 else 0)
        col = len(lines[i].encode()[:max(col, 0)].decode("utf-8", "ignore"))
        return self.formula.loc_of(self.line_starts[i] + col)

    def fail(self, node, message: str):
        where = self.loc_at(getattr(node, "lineno", 1), getattr(node, "col_offset", 0))
        raise SpecError(where, f"{self.what}: {message}")

    def parse(self):
        tree = self._syntax_tree()
        count = sum(1 for _ in ast.walk(tree))
        if count > MAX_NODES:
            raise SpecError(self.formula.loc, f"{self.what}: expression has {count} parts, "
                                              f"more than the {MAX_NODES} allowed")
        return self.visit(tree.body, 0)

    def _syntax_tree(self):
        """Parse the text as written; a formula spread over several lines is parsed inside
        parentheses, as long as the text's own brackets balance."""
        text = self.formula.text
        if "\x00" in text:
            raise SpecError(self.formula.loc_of(text.index("\x00")), f"{self.what}: contains a NUL character")
        if not text.isascii():
            # Python reads identifiers in NFKC form: a fullwidth or other look-alike letter
            # would silently name an ASCII input or function.
            i, ch = next((i, ch) for i, ch in enumerate(text) if not ch.isascii())
            raise SpecError(self.formula.loc_of(i), f"{self.what}: character {ch!r} (U+{ord(ch):04X}) "
                                                    "is not ASCII: formulas are written in ASCII")
        for m in _NUMBER.finditer(text):
            digits = sum(c.isdigit() for c in m.group())
            if digits > MAX_DIGITS:
                raise SpecError(self.formula.loc_of(m.start()), f"{self.what}: number has {digits} "
                                                                f"digits, more than the {MAX_DIGITS} allowed")
        try:
            return ast.parse(text, mode="eval")
        except SyntaxError as exc:
            first = exc
        except (RecursionError, MemoryError, ValueError):
            raise SpecError(self.formula.loc, f"{self.what}: expression is too long or too deeply "
                                              "nested for the parser") from None
        try:
            tree = ast.parse("(" + text + "\n)", mode="eval")
            if _closes_early("(" + text + "\n)"):
                raise SyntaxError("unmatched ')'")
            self.prefix = 1
            return tree
        except SyntaxError as exc:
            second = exc
        except (RecursionError, MemoryError, ValueError):
            second = first
        # Both failed. A formula spread over lines fails as written at its first line break,
        # so there the parenthesized attempt points at the real mistake -- unless its error
        # is on the ')' we added (an unclosed bracket of the user's: Python's first message
        # says so). A one-line formula gets Python's message about the text as written.
        n_lines = text.rstrip("\n").count("\n") + 1
        inside = second.lineno is not None and second.lineno <= n_lines and (second.offset or 0) > 1
        if n_lines > 1 and inside:
            self.prefix = 1
            where, message = self.loc_at(second.lineno, second.offset - 1), second.msg
        elif not first.offset:  # Python knows only that the text ends too early: its last character
            where, message = self.formula.loc_of(len(text.rstrip()) - 1), first.msg
        else:
            where, message = self.loc_at(first.lineno or 1, first.offset - 1), first.msg
        raise SpecError(where, f"{self.what}: syntax error: {message}")

    def visit(self, node, depth: int):
        if depth > MAX_DEPTH:
            self.fail(node, f"expression nests deeper than {MAX_DEPTH} levels (a chain of n "
                            "operators counts as n levels: split it with let)")
        method = getattr(self, "visit_" + type(node).__name__, None)
        if method is None:
            kind = _DESCRIBE.get(type(node), type(node).__name__)
            self.fail(node, f"{kind} is not allowed in a loss expression")
        return method(node, depth + 1)

    def value(self, node, depth):
        """A sub-expression that must be a number-valued sympy expression."""
        result = self.visit(node, depth)
        if isinstance(result, Variant):
            self.fail(node, f"variant '{result.name}' is a compile-time choice, not a number: "
                            f"test it, e.g. where({result.name} == {result.values[0]!r}, a, b)")
        if isinstance(result, str) or _is_condition(result):
            self.fail(node, "a condition or text is used where a number is expected")
        return result

    def condition(self, node, depth):
        result = self.visit(node, depth)
        if isinstance(result, Variant) and isinstance(result.value, bool):
            result = result.value
        if isinstance(result, bool):
            return sympy.true if result else sympy.false
        if not _is_condition(result):
            self.fail(node, "a number is used where a condition is expected (compare it, e.g. x > 0)")
        return result

    def checked(self, node, result):
        """Refuse constants that are undefined, complex or beyond double (x / 0, log(0),
        sqrt(-1), exp(800), 1e400): they would only surface as inf, nan or a C error."""
        if result.has(sympy.zoo, sympy.nan):
            self.fail(node, "undefined value (a division by zero or a log of 0)")
        if result.has(sympy.oo, -sympy.oo):
            self.fail(node, "infinite value")
        if result.is_number:
            value = result.evalf(30)
            shown = str(result) if len(str(result)) <= 40 else f"{sympy.N(result, 6)}"
            if not value.is_real:
                self.fail(node, f"constant {shown} is not a real number")
            if not math.isfinite(float(value)):
                self.fail(node, f"constant {shown} is beyond the range of double")
        return result

    def visit_Constant(self, node, depth):
        v = node.value
        if isinstance(v, bool):
            return v
        if isinstance(v, int):
            return self.checked(node, sympy.Integer(v))
        if isinstance(v, float):
            if not math.isfinite(v):
                self.fail(node, "number is beyond the range of double")
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
        self.fail(node, f"unknown name {_show(name)} (known: {', '.join(known)})")

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
        if isinstance(node.op, ast.Pow) and b.is_Number:
            if b.is_integer and abs(int(b)) > MAX_POWER:
                self.fail(node.right, f"exponent {b} is beyond +-{MAX_POWER}")
            if a.is_Number and a != 0 and abs(float(b)) * math.log10(abs(float(a)) or 1e-300) > 308:
                self.fail(node, f"constant {float(a):.6g}**{b} is beyond the range of double")
        return self.checked(node, op(a, b))

    def visit_BoolOp(self, node, depth):
        parts = [self.condition(v, depth) for v in node.values]
        return sympy.And(*parts) if isinstance(node.op, ast.And) else sympy.Or(*parts)

    def visit_Compare(self, node, depth):
        result = []
        left_node, left = node.left, self.visit(node.left, depth)
        for op, right_node in zip(node.ops, node.comparators):
            right = self.visit(right_node, depth)
            result.append(self.compare(node, op, (left_node, left), (right_node, right)))
            left_node, left = right_node, right
        return result[0] if len(result) == 1 else sympy.And(*result)

    def compare(self, node, op, left, right):
        (a_node, a), (b_node, b) = left, right
        if isinstance(op, (ast.In, ast.NotIn, ast.Is, ast.IsNot)):
            self.fail(node, f"operator {type(op).__name__} is not allowed")
        if not any(isinstance(x, (Variant, str, bool)) for x in (a, b)):
            return _COMPARE[type(op)](a, b)
        # A variant test such as label_format == 'signed' is settled at compile time.
        if not isinstance(op, (ast.Eq, ast.NotEq)):
            self.fail(node, "a variant can only be compared with == or !=")
        if isinstance(b, Variant) and not isinstance(a, Variant):
            (a_node, a), (b_node, b) = (b_node, b), (a_node, a)
        if not isinstance(a, Variant):
            self.fail(node, f"cannot compare {_show(a)} with {_show(b)}: one side must be a variant")
        other = b.value if isinstance(b, Variant) else b
        if isinstance(b, Variant) and b.values != a.values:
            self.fail(node, f"variants '{a.name}' and '{b.name}' have different values")
        if other not in a.values or type(other) is not type(a.values[0]):
            self.fail(b_node, f"{_show(other)} is not a value of variant '{a.name}' "
                              f"(values: {', '.join(map(repr, a.values))})")
        return (a.value == other) if isinstance(op, ast.Eq) else (a.value != other)

    def visit_IfExp(self, node, depth):
        return _where(self.condition(node.test, depth), self.value(node.body, depth),
                      self.value(node.orelse, depth))

    def visit_Subscript(self, node, depth):
        """x[label]: a row expression read at the class in `label` (a gather)."""
        row = self.scope.row
        if row is None:
            self.fail(node, "indexing (x[label]) is for row losses (an input with row: true)")
        index = node.slice
        if not (isinstance(index, ast.Name) and index.id in row.indices):
            known = ", ".join(sorted(row.indices)) or "none: declare one with index_into"
            self.fail(index, f"the index must be a class-index input (known: {known})")
        target = self.value(node.value, depth)
        isym, _ = row.indices[index.id]
        mapping = {}
        present = outside_reductions(target)
        for name, x in row.rows.items():
            if x not in present:
                continue
            g = sympy.Symbol(f"xg{row.positions[name]}_{row.indices[index.id][1]}", real=True)
            row.gathers[g] = (name, isym)
            mapping[x] = g
        if not mapping:
            self.fail(node, "only a row (an expression of row inputs) can be indexed by class")
        return replace_outside(target, mapping)

    def visit_Call(self, node, depth):
        if not isinstance(node.func, ast.Name):
            self.visit(node.func, depth)  # says what it is: a lambda, an attribute, ...
            self.fail(node, "only named functions can be called, e.g. exp(x)")
        name = node.func.id
        row_call = name in ROW_FUNCTIONS and (name not in FUNCTIONS or len(node.args) == 1)
        if row_call and self.scope.row is None:
            if name not in FUNCTIONS:
                self.fail(node.func, f"{name}() reduces over the class axis: it is for row losses "
                                     "(an input with row: true)")
            row_call = False
        if name not in FUNCTIONS and not row_call:
            known = sorted({*FUNCTIONS, *(ROW_FUNCTIONS if self.scope.row else ())})
            self.fail(node.func, f"unknown function {_show(name)} (known: {', '.join(known)})")
        if node.keywords:
            self.fail(node, f"{name}() takes no keyword arguments")
        builder, arity = (ROW_FUNCTIONS if row_call else FUNCTIONS)[name]
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
        return self.checked(node, builder(*args))

    def piecewise(self, node, depth):
        pieces = []
        for arg in node.args:
            if not (isinstance(arg, ast.Tuple) and len(arg.elts) == 2):
                self.fail(arg, "Piecewise takes (value, condition) pairs")
            pieces.append((self.value(arg.elts[0], depth), self.condition(arg.elts[1], depth)))
        if pieces[-1][1] is not sympy.true:
            self.fail(node.args[-1], "the last Piecewise pair must have the condition True")
        return sympy.Piecewise(*pieces)


def _show(value, limit: int = 60) -> str:
    """repr(value) for a message, cut to `limit` characters."""
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _closes_early(wrapped: str) -> bool:
    """True if the '(' we put in front is closed before the ')' we put at the end, i.e. the
    text's own brackets do not balance (\"a) + (b\" must stay an error)."""
    import io
    import tokenize

    depth = 0
    tokens = [t for t in tokenize.generate_tokens(io.StringIO(wrapped).readline) if t.type == tokenize.OP]
    for i, tok in enumerate(tokens):
        depth += tok.string in "([{"
        depth -= tok.string in ")]}"
        if depth == 0 and i != len(tokens) - 1:
            return True
    return False


def parse_formula(formula: Formula, scope: Scope, what: str = "loss"):
    """The sympy expression of `formula`, or a SpecError pointing into the spec."""
    expr = _Parser(formula, scope, what).parse()
    if isinstance(expr, (str, Variant)) or _is_condition(expr):
        raise SpecError(formula.loc_of(0), f"{what}: must be a number-valued expression, "
                                           "not text, a variant or a condition")
    _check_cost(formula, expr, scope.row is not None, what)
    return expr


class Cost(NamedTuple):
    size: int  # tree nodes, every use of a shared subexpression (a let) counted
    grad: int  # estimated tree nodes of the first derivative (w.r.t. any one input)
    hess: int  # ... of the second derivative
    pieces: int  # Piecewise pieces (where, if-else, Piecewise), every use counted
    reductions: int  # row losses: reductions nested in each other (sum(exp(x - max(x))): 2)


def formula_cost(expr, memo=None) -> Cost:
    """What differentiating and compiling `expr` will take, estimated by the rules of
    differentiation without taking a derivative: linear in the number of distinct
    subexpressions, so a let chain whose tree doubles at every step costs nothing to
    measure. A sum's derivative is the sum of its terms'; a product of n factors has n
    terms in its derivative and n*(n-1)/2 more in the second; f(g) becomes f'(g)*g', with
    f' an expression of g's size; a Piecewise differentiates piece by piece."""
    memo = {} if memo is None else memo
    reductions = (RowSum, RowMax, RowMin, LogSumExp)

    def cost(e):
        found = memo.get(e)
        if found is not None:
            return found
        parts = [cost(a) for a in e.args]
        s, d, h, pieces = (sum(p[k] for p in parts) for k in range(4))
        depth = max((p[4] for p in parts), default=0) + isinstance(e, reductions)
        n = len(parts)
        if not parts:
            out = (1, 1, 1, 0, 0)
        elif not isinstance(e, sympy.Expr):  # a condition, or a Piecewise pair: copied as is
            out = (1 + s, 0, 0, pieces, depth)
        elif isinstance(e, sympy.Piecewise):  # each piece's derivative, on the same condition
            conds = sum(cost(c)[0] for _, c in e.args)
            vals = [cost(v) for v, _ in e.args]
            out = (1 + s, 1 + conds + sum(v[1] for v in vals), 1 + conds + sum(v[2] for v in vals),
                   pieces + n, depth)
        elif isinstance(e, sympy.Add):
            out = (1 + s, 1 + d, 1 + h, pieces, depth)
        elif isinstance(e, sympy.Mul):
            out = (1 + s, n + d + (n - 1) * s, n * n + h + (n - 1) * d + n * (n - 1) // 2 * s, pieces, depth)
        else:  # f(a, ...): each partial derivative is an expression of the arguments
            k = 1 if isinstance(e, sympy.Pow) and e.exp.is_Number else n
            partial = s + 2
            out = (1 + s, k * partial + d, (k * k + k) * partial + (k + 1) * d + h, pieces, depth)
        memo[e] = out
        return out

    return Cost(*cost(expr))


def _check_cost(formula: Formula, expr, row: bool, what: str):
    where = formula.loc_of(0)
    try:
        cost = formula_cost(expr)
    except RecursionError:  # cannot happen within the other limits; a guard
        raise SpecError(where, f"{what}: nests too deeply, through its lets, to be measured") from None
    hint = "(a let counts once per use; nested functions and long products grow fastest)"
    if row and cost.reductions > MAX_REDUCTION_DEPTH:
        raise SpecError(where, f"{what}: reductions nest {cost.reductions} deep, more than the "
                               f"{MAX_REDUCTION_DEPTH} allowed (softmax and log_softmax hold one each)")
    size, which, limit = ((cost.grad, "gradient", MAX_ROW_GRADIENT_PARTS) if row else
                          (cost.hess, "second derivative", MAX_DERIVATIVE_PARTS))
    if size > limit:
        shown = f"{size}" if size < 10**7 else f"{size:.1e}"
        raise SpecError(where, f"{what}: too complex to differentiate: its {which} would have about "
                               f"{shown} parts, more than the {limit} allowed {hint}")
    if cost.pieces > MAX_PIECES:
        raise SpecError(where, f"{what}: has {cost.pieces} Piecewise pieces (where, if-else, "
                               f"Piecewise; a let counts once per use), more than the {MAX_PIECES} allowed")


def symbols_for(spec) -> dict:
    """The sympy Symbol of every input and param, named as it is spelled in C (x_*, p_*)."""
    for item in (*spec.inputs, *spec.params, *spec.variants):
        if item.name in FUNCTIONS or item.name in ROW_FUNCTIONS or item.name in CONSTANTS:
            kind = "constant" if item.name in CONSTANTS else "function"
            raise SpecError(item.loc, f"'{item.name}' is the name of a built-in {kind}; rename it")
    for lname, formula in spec.let:
        if lname in FUNCTIONS or lname in ROW_FUNCTIONS or lname in CONSTANTS:
            raise SpecError(formula.loc, f"let '{lname}' is the name of a built-in; rename it")
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
    """The loss of `spec` for one variant combination, with its `let` definitions substituted.
    Row losses return (loss, RowScope): the scope says which inputs ended up rows, class
    indices, and which gathers the formula made."""
    variants = {v.name: Variant(v.name, options[v.name], v.values) for v in spec.variants}
    row = None
    if spec.is_row:
        pos = {i.name: n for n, i in enumerate(spec.inputs)}
        row = RowScope(
            rows={i.name: symbols[i.name] for i in spec.inputs if i.row or i.index_into},
            indices={i.name: (index_symbol(i.name), pos[i.name]) for i in spec.inputs if i.index_into},
            positions=pos, gathers={}, used_as_index=set())
    lets: dict = {}
    for name, formula in spec.let:
        lets[name] = parse_formula(formula, Scope(symbols, variants, dict(lets), row), f"let '{name}'")
    loss = parse_formula(spec.loss, Scope(symbols, variants, lets, row), "loss")
    if row is None:
        return loss
    _check_row_loss(spec, loss, symbols, row)
    return loss, row


def index_symbol(name: str):
    """The C variable holding a class index (int64)."""
    return sympy.Symbol("i_" + name, integer=True)


def _check_row_loss(spec, loss, symbols, row: RowScope):
    """The loss must be one number per row: row inputs only inside reductions or gathers, and
    a class-index input used as an index only. (Only gathers that survive count: a branch
    that a variant test removed may index with an input that is a row in this variant.)"""
    used = {g: v for g, v in row.gathers.items() if g in loss.free_symbols}
    row.gathers.clear()
    row.gathers.update(used)
    row.used_as_index.update(n for n, (isym, _) in row.indices.items()
                             if any(i == isym for _, i in used.values()))
    for inp in spec.inputs:
        x = symbols[inp.name]
        if inp.name in row.used_as_index:
            del row.rows[inp.name]  # a class index in this variant, not a row
            if x in loss.free_symbols:
                raise SpecError(spec.loss.loc, f"loss: '{inp.name}' holds class indices here (it "
                                               f"indexes a row); it cannot also be used as a number")
    loose = outside_reductions(loss) & set(row.rows.values())
    if loose:
        name = next(n for n, x in row.rows.items() if x in loose)
        raise SpecError(spec.loss.loc, f"loss: '{name}' is a vector along the class axis here: reduce "
                                       f"it (sum, mean, max, logsumexp) or pick a class ({name}[label])")
