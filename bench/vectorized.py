"""Which `omp simd` loops of a built module GCC vectorizes (a developer's tool, not a test).

    python bench/vectorized.py build/losses/kernels.c            # every kernel
    python bench/vectorized.py build/losses/kernels.c softmax    # names containing 'softmax'

It compiles the file with losscc's flags for x86-64-v3 (the AVX2 clone) and prints, per
kernel function that holds an `omp simd` loop, one mark per loop (V: vectorized, .: not)
and whether the kernel is cloned for x86-64-v3 (codegen.vectorizable decides that). A loop
marked '.' in a cloned kernel doubles its compile time for nothing: `gcc -fopt-info-vec-all`
on the same command says why (a call without a vector form, or a masked gather: see the
comments on -fno-tree-pre in build.py and on eager printing in codegen.py).
"""

from __future__ import annotations

import re
import subprocess
import sys

from losscc.build import CFLAGS


def _loop_end(lines: list[str], pragma: int) -> int:
    """The line (1-based) that closes the loop after the pragma at line `pragma` (GCC reports
    a vectorized loop at a line of its body, not always at its `for`)."""
    depth = 0
    for i in range(pragma, len(lines)):
        depth += lines[i].count("{") - lines[i].count("}")
        if depth <= 0 and "}" in lines[i]:
            return i + 1
    return len(lines)


def report(path: str, only: str = "") -> list[str]:
    cmd = ["gcc", *CFLAGS, "-march=x86-64-v3", "-c", path, "-o", "/dev/null", "-fopt-info-vec-optimized"]
    out = subprocess.run(cmd, capture_output=True, text=True).stderr
    vectorized = {int(m.group(1)) for m in re.finditer(r":(\d+):\d+: optimized: loop vectorized", out)}
    rows, fn, cloned = {}, None, False
    lines = open(path).read().splitlines()
    for i, line in enumerate(lines, 1):
        m = re.search(r"\bstatic double (lcc_\w+?)_(chunk|range)\(", line)
        if m:
            fn, cloned = f"{m.group(1)}_{m.group(2)}", line.startswith("LCC_TARGETS")
        elif line.lstrip().startswith("#pragma omp simd") and fn and only in fn:
            marks = rows.setdefault(fn, [cloned, ""])
            marks[1] += "V" if set(range(i + 1, _loop_end(lines, i) + 1)) & vectorized else "."
    return [f"{'cloned ' if c else '       '} {marks:6s} {name}" for name, (c, marks) in rows.items()]


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    print("\n".join(report(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "")))
