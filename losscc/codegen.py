"""Codegen stage: sympy expressions -> C through a strict printer and jinja2 templates.

One template per kernel shape (templates/elementwise.c.j2); Python only prepares the
statements of each kernel body. Every loss gets, per variant and per dtype, three
kernels: value (v), value+gradient (vg) and value+gradient+second derivative (vgh).
Each kernel's outputs go through one `cse` call, so shared subexpressions are computed
once per element.
"""

from __future__ import annotations

from dataclasses import dataclass

import jinja2
import sympy
from sympy.codegen.ast import float32, float64, real
from sympy.printing.c import C99CodePrinter
from sympy.printing.precedence import precedence

from . import __version__
from .errors import BuildError
from .functions import Sigmoid, Softplus
from .ir import KernelSource, SymbolicLoss
from .resources import templates_dir


@dataclass(frozen=True)
class CType:
    name: str  # C type
    suffix: str  # of kernel names: f32 / f64
    func_suffix: str  # of libm and helper names: "f" / ""
    numpy: str  # numpy dtype name


DTYPES = (CType("float", "f32", "f", "float32"), CType("double", "f64", "", "float64"))
MODES = ("v", "vg", "vgh")


def reads_input(expr, input_temps) -> bool:
    """True if `expr` reads an input (x_*), directly or through a cse temporary that does."""
    return any(s.name.startswith("x_") or s.name in input_temps for s in expr.free_symbols)


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
    """

    HELPERS = {Sigmoid: "lcc_sigmoid", Softplus: "lcc_softplus"}

    def __init__(self, ctype: CType, input_temps=frozenset()):
        alias = float32 if ctype.name == "float" else float64
        super().__init__({"type_aliases": {real: alias}, "strict": True, "math_macros": {}})
        self.ctype = ctype
        self.input_temps = input_temps  # names of cse temporaries that depend on an input

    def _print(self, expr, **kwargs):
        # A constant subexpression (log(2), sqrt(2)/pi) is one correctly rounded literal.
        if isinstance(expr, sympy.Expr) and expr.is_number and not expr.is_Integer:
            value = expr.evalf(30)
            if not value.is_real:
                raise BuildError(f"constant {expr} is not a real number")
            return self._literal(float(value))
        return super()._print(expr, **kwargs)

    def helper(self, name: str, *args) -> str:
        return f"{name}{self.ctype.func_suffix}({', '.join(self._print(a) for a in args)})"

    def _print_Function(self, expr):
        helper = self.HELPERS.get(type(expr))
        if helper is not None:
            return self.helper(helper, *expr.args)
        return super()._print_Function(expr)

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
            out = f"{name}{self.ctype.func_suffix}({out}, {self._print(a)})"
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
        if self.ctype.name == "float" and value != 0:
            if abs(value) > 3.4028234663852886e38:
                raise BuildError(f"constant {value!r} overflows float32")
            if abs(value) < 1.401298464324817e-45:
                raise BuildError(f"constant {value!r} is 0 in float32")
        text = repr(value)
        if "e" not in text and "." not in text:
            text += ".0"
        return text + ("F" if self.ctype.name == "float" else "")

    def _print_Pow(self, expr):
        base, exp = expr.base, expr.exp
        prec = precedence(expr)
        if exp.is_Integer and 1 <= abs(int(exp)) <= 8:
            product = "*".join([self.parenthesize(base, prec)] * abs(int(exp)))
            return f"({product})" if int(exp) > 0 else f"{self._literal(1.0)}/({product})"
        if exp == sympy.S.Half:
            return f"sqrt{self.ctype.func_suffix}({self._print(base)})"
        if exp == -sympy.S.Half:
            return f"{self._literal(1.0)}/sqrt{self.ctype.func_suffix}({self._print(base)})"
        return f"pow{self.ctype.func_suffix}({self._print(base)}, {self._print(exp)})"

    def _print_Add(self, expr, order=None):
        terms = self._as_ordered_terms(expr, order=order)

        def rank(term):
            if term.is_Number:
                return 0
            return 1 if reads_input(term, self.input_temps) else 2

        terms = sorted(terms, key=rank)  # stable: sympy's order within each rank
        prec = precedence(expr)
        out = ""
        for term in terms:
            if term.could_extract_minus_sign() and out:
                text, sign = self.parenthesize(-term, prec), " - "
            else:
                text, sign = self.parenthesize(term, prec), " + "
            out = text if not out else out + sign + text
        return out

    def _print_Piecewise(self, expr):
        """Nested ternaries on one line; the last condition is True (the parser checks)."""
        *pieces, (last, _) = expr.args
        out = self._print(last)
        for value, cond in reversed(pieces):
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


def kernel_body(ctype: CType, cse_result, mode: str) -> tuple:
    """(name, C expression) statements of one kernel mode: the temporaries its outputs use,
    in order, then the outputs."""
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
    printer = LossCPrinter(ctype, frozenset(input_temps))
    lines = [(t.name, printer.doprint(e)) for t, e in temps if t in needed]
    lines += [(n, printer.doprint(outputs[n])) for n in wanted]
    return tuple(lines)


def template_env() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir())),
        undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
        trim_blocks=True, lstrip_blocks=True, autoescape=False,
    )


def generate(sym: SymbolicLoss) -> KernelSource:
    """The C source, cffi declarations and runtime description of one loss."""
    spec = sym.spec
    env = template_env()
    kernels = []
    for variant in sym.variants:
        shared = shared_cse(variant)
        for ctype in DTYPES:
            for mode in MODES:
                try:
                    body = kernel_body(ctype, shared, mode)
                except Exception as exc:  # the strict printer met a node it cannot print
                    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                    if isinstance(exc, NotImplementedError):  # sympy: "Unsupported by <printer>: f"
                        reason = f"no C translation for {reason.rsplit(': ', 1)[-1]}"
                    raise BuildError(f"{spec.loc}: {spec.name}: cannot generate C for variant "
                                     f"'{variant.key}': {reason}") from None
                kernels.append({
                    "cname": kernel_name(spec.name, variant.key, mode, ctype),
                    "mode": mode, "ctype": ctype, "variant": variant.key, "body": body,
                })
    ctx = {
        "spec": spec,
        "inputs": [i.name for i in spec.inputs],
        "diffs": [i.name for i in spec.differentiable],
        "params": [p.name for p in spec.params],
        "kernels": kernels,
    }
    c_source = env.get_template("elementwise.c.j2").render(**ctx)
    cdef = env.get_template("elementwise.cdef.j2").render(**ctx)
    return KernelSource(name=spec.name, c_source=c_source, cdef=cdef, meta=runtime_meta(sym))


def kernel_name(loss: str, variant: str, mode: str, ctype: CType) -> str:
    return f"lcc_{loss}__{variant}__{mode}_{ctype.suffix}"


def runtime_meta(sym: SymbolicLoss) -> dict:
    """What the runtime needs to know about a loss: JSON-able, no sympy."""
    spec = sym.spec
    return {
        "name": spec.name,
        "aliases": list(spec.aliases),
        "shape": "elementwise",
        "spec": spec.path,
        "summary": spec.summary,
        "reference": spec.reference,
        "doc": spec.doc,
        "formula": spec.loss.text.strip(),
        "positional": list(spec.positional),
        "inputs": [{"name": i.name, "differentiable": i.differentiable, "default": i.default,
                    "doc": i.doc} for i in spec.inputs],
        "params": [{"name": p.name, "default": p.default, "min": p.min, "max": p.max, "gt": p.gt,
                    "lt": p.lt, "doc": p.doc} for p in spec.params],
        "variants": [{"name": v.name, "values": list(v.values), "default": v.default, "doc": v.doc}
                     for v in spec.variants],
        "kernels": {v.key: {"options": v.options, "notes": list(v.notes),
                            "names": {f"{mode}_{c.numpy}": kernel_name(spec.name, v.key, mode, c)
                                      for mode in MODES for c in DTYPES},
                            "gradient": [str(g) for g in v.grads], "hessian": str(v.hess)}
                    for v in sym.variants},
        "examples": [{"inputs": e.inputs, "options": e.options, "loss": e.loss, "grad": e.grad,
                      "where": str(e.loc)} for e in spec.examples],
    }


def module_source(sources: list, name: str, cache_key: str) -> tuple[str, str]:
    """The whole extension module's C source and cdef, from every loss's KernelSource."""
    env = template_env()
    c = env.get_template("module.c.j2").render(
        sources=sources, name=name, version=__version__, cache_key=cache_key)
    cdef = "\n".join(s.cdef for s in sources)
    return c, cdef
