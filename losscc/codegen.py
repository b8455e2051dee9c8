"""Codegen stage: sympy expressions -> C through a strict printer and jinja2 templates.

One template per kernel shape (templates/elementwise.c.j2); Python only prepares the
statements of each kernel body. Every loss gets, per variant and per dtype, three
kernels: value (v), value+gradient (vg) and value+gradient+second derivative (vgh).
Each kernel's outputs go through one `cse` call, so shared subexpressions are computed
once per element.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import jinja2
import sympy
from sympy.codegen.ast import float64, real
from sympy.printing.c import C99CodePrinter
from sympy.printing.precedence import precedence

from . import __version__
from .errors import BuildError
from .functions import LogCosh, Sigmoid, Softplus
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


_LARGE = re.compile(r"x_|xg\d|m\d")  # inputs, gathered elements, logsumexp max shifts


def reads_input(expr, input_temps) -> bool:
    """True if `expr` reads an input (x_*, or in a row kernel an element gathered at a class,
    xg*, or a row max shift, m*), directly or through a cse temporary that does. These are
    the terms of the size of the data; the printer sums them first."""
    return any(_LARGE.match(s.name) or s.name in input_temps for s in expr.free_symbols)


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

    HELPERS = {Sigmoid: "lcc_sigmoid", Softplus: "lcc_softplus", LogCosh: "lcc_logcosh"}

    def __init__(self, input_temps=frozenset()):
        super().__init__({"type_aliases": {real: float64}, "strict": True, "math_macros": {}})
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
        return f"{name}({', '.join(self._print(a) for a in args)})"

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
        return f"pow({self._print(base)}, {self._print(exp)})"

    def _terms(self, expr, order=None) -> list:
        """The terms of a sum in the order they are added: literals, then the terms that
        read inputs, then the rest (sympy's order within each group)."""
        def rank(term):
            if term.is_Number:
                return 0
            return 1 if reads_input(term, self.input_temps) else 2

        return sorted(self._as_ordered_terms(expr, order=order), key=rank)

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
        return f"exp({self._print(arg)})"

    def _print_Add(self, expr, order=None):
        terms = self._terms(expr, order)
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


def kernel_body(cse_result, mode: str) -> tuple:
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
    printer = LossCPrinter(frozenset(input_temps))
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
    if spec.is_row:
        return _generate_rows(sym, env)
    kernels = []
    for variant in sym.variants:
        shared = shared_cse(variant)
        for mode in MODES:
            try:
                body = kernel_body(shared, mode)
            except Exception as exc:  # the strict printer met a node it cannot print
                raise _cannot_generate(spec, variant, exc) from None
            for ctype in DTYPES:
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
    for variant in sym.variants:
        for mode in ROW_MODES:
            try:
                k = row_kernel(spec, variant, mode)
            except Exception as exc:
                raise _cannot_generate(spec, variant, exc) from None
            for ctype in DTYPES:
                kernels.append(dict(k, ctype=ctype, cname=kernel_name(spec.name, variant.key, mode, ctype)))
    ctx = {"spec": spec, "diffs": [i.name for i in spec.differentiable],
           "params": [p.name for p in spec.params], "kernels": kernels}
    return KernelSource(name=spec.name, c_source=env.get_template("rows.c.j2").render(**ctx),
                        cdef=env.get_template("rows.cdef.j2").render(**ctx), meta=runtime_meta(sym))


def row_kernel(spec, variant, mode: str) -> dict:
    """The template's view of one row kernel: the reads, passes and statements per row
    (the same for every dtype: they compute in COMPUTE)."""
    prog = variant.program
    grad = mode == "vg"
    diffs = [i.name for i in spec.differentiable]
    outputs = [variant.value] + ([prog.grads[n] for n in diffs] if grad else [])
    steps = rows.plan(prog, outputs)
    elements = prog.elements
    T = COMPUTE

    def gathers(scalars):
        return [{"name": g.sym.name, "source": g.source, "index": g.index.name} for g in scalars]

    passes = []
    for p, pass_steps in enumerate(steps.passes, 1):
        exprs, inits, updates, finals = [], [], [], []
        for st in pass_steps:
            s = st.scalar
            n = s.n
            if st.role == "lse_tail":
                exprs.append(sympy.exp(s.arg - s.shift))
            else:
                exprs.append(s.arg)
            e = f"e{n}" if st.role != "lse_tail" else f"z{n}"
            if st.role == "sum" or st.role == "lse_tail":
                inits.append(f"double acc{n} = 0.0;")
            if st.role == "sum":
                updates.append(f"acc{n} += (double){e};")
                finals.append(f"const {T} r{n} = ({T})acc{n};")
            elif st.role in ("max", "min", "lse_max"):
                var = f"mx{n}" if st.role == "lse_max" else f"r{n}"
                inits.append(f"{T} {var} = {'' if st.role == 'min' else '-'}INFINITY;")
                inits.append(f"int64_t jm{n} = 0;")
                cmp = ">=" if st.role == "min" else "<="
                updates.append(f"if ({var} == {var} && !({e} {cmp} {var})) {{ {var} = {e}; jm{n} = j; }}")
                if st.role == "lse_max":
                    finals.append(f"const {T} m{n} = isinf({var}) ? ({T})0 : {var};")
                    finals.append(f"const int fin{n} = isfinite({var});")
            else:  # lse_tail: every class but the argmax, unless the max was not finite
                updates.append(f"if (!fin{n} || j != jm{n}) acc{n} += (double){e};")
                finals.append(f"const {T} r{n} = ({T})(fin{n} ? log1p(acc{n}) : log(acc{n}));")
        names = [f"e{st.scalar.n}" if st.role != "lse_tail" else f"z{st.scalar.n}" for st in pass_steps]
        temps, reduced = sympy.cse(exprs, symbols=sympy.numbered_symbols(f"t{p}_"), optimizations="basic")
        body = _print_block(temps, list(zip(names, reduced)))
        passes.append({
            "inits": inits, "updates": updates, "finals": finals,
            "reads": _reads(exprs, elements), "temps": body,
            "gathers": gathers(steps.after[p - 1]),
        })
    # The max shifts stay out of every temporary: the printer must see m - x[label] + r
    # whole to subtract the two large terms first (a temporary m + r would round r away).
    shifts = [s.shift for s in prog.scalars if s.shift is not None]
    temps, reduced = sympy.cse(outputs, symbols=sympy.numbered_symbols("u"), optimizations="basic",
                               ignore=shifts)
    per_class = set(elements) | {rows.J}
    row_temps, class_temps = [], []
    for t, e in temps:  # a temporary that reads an element (or j) is computed per class
        if e.free_symbols & per_class:
            per_class.add(t)
            class_temps.append((t, e))
        else:
            row_temps.append((t, e))
    row_lines = _print_block(row_temps, [("val", reduced[0])])
    k = {
        "grad": grad,
        "inputs": [{"name": i.name, "kind": variant.kinds[i.name], "ignore": i.ignore}
                   for i in spec.inputs],
        "pre": gathers(steps.pre), "passes": passes,
        "row_temps": row_lines[:-1], "val": row_lines[-1][1],
    }
    if grad:
        lines = _print_block(class_temps, list(zip(diffs, reduced[1:])), known=row_temps)
        k["grad_temps"] = lines[:len(lines) - len(diffs)]
        k["grads"] = lines[len(lines) - len(diffs):]
        k["grad_reads"] = _reads([e for _, e in class_temps] + reduced[1:], elements)
    return k


def _reads(exprs, elements) -> list:
    """The row inputs whose element is read by `exprs`, in a stable order."""
    used = set().union(*(e.free_symbols for e in exprs)) if exprs else set()
    return [name for x, name in elements.items() if x in used]


def _print_block(temps, outputs, known=()) -> list:
    """(name, C expression) lines for cse temporaries and named outputs."""
    input_temps = set()
    for t, e in [*known, *temps]:
        if reads_input(e, input_temps):
            input_temps.add(t.name)
    printer = LossCPrinter(frozenset(input_temps))
    return [(t.name, printer.doprint(e)) for t, e in temps] + \
        [(n, printer.doprint(e)) for n, e in outputs]


def kernel_name(loss: str, variant: str, mode: str, ctype: CType) -> str:
    return f"lcc_{loss}__{variant}__{mode}_{ctype.suffix}"


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
                            "names": {f"{mode}_{c.numpy}": kernel_name(spec.name, v.key, mode, c)
                                      for mode in modes for c in DTYPES},
                            "gradient": [str(g) for g in v.grads],
                            "hessian": None if v.hess is None else str(v.hess)}
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
