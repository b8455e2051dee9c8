"""`losscc export`: the kernels as a self-contained C library, NAME.h and NAME.c (no Python:
libm and pthreads only). NAME.c is the module's C source as `build` compiles it; NAME.h
declares every kernel with its parameter names, after a comment that documents the calling
convention (templates/export.h.j2)."""

from __future__ import annotations

import re
from pathlib import Path

from . import __version__
from .errors import BuildError
from .spec import load_spec, spec_files

_DEFINITION = re.compile(r"^double (lcc_\w+)\(\n(.*?)\)\n\{", re.M | re.S)


def export(paths, out="export", name="losses", log=print) -> tuple[Path, Path]:
    """Write out/name.h and out/name.c for every spec under `paths`; returns their paths."""
    from .build import CFLAGS, _check_unique, cache_key
    from .codegen import generate, module_source, template_env
    from .derive import derive

    if not (name.isascii() and name.isidentifier()):
        raise BuildError(f"--name '{name}' must be an ASCII C identifier")
    specs = [load_spec(f) for f in spec_files(paths)]
    _check_unique(specs)
    sources = []
    for spec in specs:
        sources.append(generate(derive(spec)))
        log(f"  {spec.name}: derived")
    c_source, _ = module_source(sources, name, cache_key(specs))
    params = {cname: " ".join(text.split()) for cname, text in _DEFINITION.findall(c_source)}
    losses = []
    for spec, source in zip(specs, sources):
        meta = source.meta
        names = [n for k in meta["kernels"].values()
                 for group in (k["names"], (k["plain"] or {}).get("names", {})) for n in group.values()]
        losses.append({
            "name": spec.name, "aliases": list(spec.aliases), "summary": spec.summary,
            "inputs": [i.name for i in spec.inputs], "differentiable": [i.name for i in spec.differentiable],
            "params": [f"{p.name} (default {p.default:g})" for p in spec.params],
            "variants": [f"{v.name}: {', '.join(str(x).lower() for x in v.values)} (default "
                         f"{str(v.default).lower()})" for v in spec.variants],
            "kernels": [(n, params[n]) for n in names],
        })
    header = template_env().get_template("export.h.j2").render(
        name=name, version=__version__, guard=f"LOSSCC_{name.upper()}_H", losses=losses, cflags=" ".join(CFLAGS))
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        h, c = out / f"{name}.h", out / f"{name}.c"
        h.write_text(header)
        # the definitions are checked against the header's declarations where they are compiled
        c.write_text(c_source.replace("#include <math.h>", f'#include "{name}.h"\n#include <math.h>', 1))
    except OSError as exc:
        raise BuildError(f"cannot write under {out}: {exc.strerror or exc}") from None
    log(f"{h}, {c}: {len(specs)} losses, {sum(len(x['kernels']) for x in losses)} kernels")
    return h, c
