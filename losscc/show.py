"""`losscc show NAME`: what a user reads to trust or debug a loss -- its spec, the value and
derivatives as derived (after the stability rewrites), the rewrites that fired (before ->
after), and the generated C of one kernel."""

from __future__ import annotations

import re
from pathlib import Path

import sympy

from .errors import SpecError
from .spec import load_spec, spec_files


def find_spec(name: str, paths):
    """The spec whose name or alias is `name` (case-insensitive), among the spec files."""
    wanted = name.lower()
    names = []
    for path in spec_files(paths):
        spec = load_spec(path)
        if wanted in (n.lower() for n in (spec.name, *spec.aliases)):
            return spec
        names.append(spec.name)
    raise SpecError(None, f"no loss named {name!r} in {', '.join(map(str, paths))} "
                          f"(losses: {', '.join(sorted(names))})")


def _options(spec, given: list[str]) -> dict:
    """The variant chosen by `name=value` texts, the defaults elsewhere."""
    options = {v.name: v.default for v in spec.variants}
    for text in given:
        name, eq, value = text.partition("=")
        variant = next((v for v in spec.variants if v.name == name), None)
        if not eq or variant is None:
            known = ", ".join(v.name for v in spec.variants) or "none"
            raise SpecError(spec.loc, f"--variant {text!r}: expected NAME=VALUE with NAME a variant of "
                                      f"{spec.name} (variants: {known})")
        values = {str(v).lower(): v for v in variant.values}
        if value.lower() not in values:
            raise SpecError(spec.loc, f"--variant {text!r}: {name} takes "
                                      f"{', '.join(str(v).lower() for v in variant.values)}")
        options[name] = values[value.lower()]
    return options


def _function(c_source: str, cname: str) -> str:
    """The definition of C function `cname` (through its closing brace)."""
    head = re.compile(rf"^[^\n;]*\b{re.escape(cname)}\(", re.M)
    m = head.search(c_source)
    while m and c_source.find("{", m.end()) > c_source.find(";", m.end()) >= 0:  # a prototype
        m = head.search(c_source, m.end())
    if not m:
        raise SpecError(None, f"generated C has no function {cname}")
    i = c_source.index("{", m.end())
    depth = 0
    for j in range(i, len(c_source)):
        depth += {"{": 1, "}": -1}.get(c_source[j], 0)
        if depth == 0:
            return c_source[m.start():j + 1]
    return c_source[m.start():]


def show(name: str, paths=("specs",), variant=(), mode: str = "vg", dtype: str = "float64",
         plain: bool = False) -> str:
    """The report `losscc show` prints (plain: the C of the plain kernel, which a row loss
    runs when the caller gives none of its optional inputs)."""
    from .codegen import DTYPES, generate, kernel_name
    from .derive import derive
    from .ir import variant_key

    spec = find_spec(name, paths)
    if mode == "vgh" and spec.is_row:
        raise SpecError(spec.loc, f"{spec.name} is a row loss: it has no vgh kernel (modes: v, vg)")
    options = _options(spec, list(variant))
    key = variant_key(options)
    sym = derive(spec)
    chosen = next(v for v in sym.variants if v.key == key)
    out = [f"== spec {spec.path} ==", Path(spec.path).read_text().rstrip()]
    shown = ", ".join(f"{k}={str(v).lower()}" for k, v in options.items()) or "(no variants)"
    out.append(f"\n== derived: {spec.name}, variant {shown} ==")
    diffs = [i.name for i in spec.differentiable]
    for v in [chosen] + ([chosen.plain] if chosen.plain is not None else []):
        if v is not chosen:
            absent = ", ".join(v.absent)
            fixed = ", ".join(f"{k}={g:g}" for k, g in v.fixed.items())
            out.append(f"\n-- plain kernels (called when {absent} {'is' if len(v.absent) == 1 else 'are'} "
                       f"not given{', ' + fixed if fixed else ''}) --")
        if v.program is not None:  # a row loss: its value and gradient read row scalars
            out.append("row scalars (j runs over the classes):")
            out += [f"  {_scalar(sc)}" for sc in v.program.scalars]
        out.append(f"loss = {sympy.sstr(v.value)}")
        out += [f"d loss/d {n} = {sympy.sstr(g)}" for n, g in zip(diffs, v.grads)]
        if v.hess is not None:
            out.append(f"d2 loss/d {diffs[0]}^2 = {sympy.sstr(v.hess)}")
        out += [f"note: {n}" for n in v.notes]
        if v.rewrites:
            out.append("rewrites that fired (rule: before -> after):")
            out += [f"  {rule}: {before} -> {after}" for rule, before, after in v.rewrites]
        else:
            out.append("rewrites that fired: none")
    if plain and chosen.plain is None:
        raise SpecError(spec.loc, f"{spec.name} has no plain kernels (only row losses with optional inputs do)")
    source = generate(sym).c_source
    ctype = next(c for c in DTYPES if c.numpy == dtype)
    fn = kernel_name(spec.name, chosen.plain.key if plain else key, mode, ctype)
    if chosen.plain is not None and not plain:
        out.append(f"\n(the plain kernel {kernel_name(spec.name, chosen.plain.key, mode, ctype)}: --plain)")
    part = "_range" if spec.is_row else "_chunk"
    out.append(f"\n== generated C: {fn}{part} (templates/{'rows' if spec.is_row else 'elementwise'}.c.j2) ==")
    out.append(_function(source, fn + part))
    return "\n".join(out) + "\n"


def _scalar(sc) -> str:
    """One row scalar as a line: what it reduces, or where it reads."""
    if sc.kind == "gather":
        return f"{sc.sym} = {sc.source}[{sc.index}]"
    if sc.kind == "lse":
        return f"{sc.shift} + {sc.sym} = logsumexp_j({sympy.sstr(sc.arg)})  ({sc.shift}: the max)"
    reduce = {"sum": "sum_j", "norm": "norm_j", "max": "max_j", "min": "min_j"}[sc.kind]
    return f"{sc.sym} = {reduce}({sympy.sstr(sc.arg)})"
