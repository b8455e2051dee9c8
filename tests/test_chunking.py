"""Kernels safe anywhere (issue 9, part 2): what lets a caller split a batch over processes,
threads or time and glue the pieces back together.

1. No mutable global state in the generated C. Every kernel object of the build (one per
   loss variant, cached under `<build folder>/.cache/obj/<module>/`, build.py `_Objects`)
   has empty writable sections (.data, .bss and every other SHF_WRITE section, TLS ones
   included), no data symbol (nm types b B d D C g G s S u v V: only code, read-only data
   and ifuncs), and undefined symbols from an allowlist only: libm, the allocator,
   memmove/memcpy/memset, pthread_create/join, the target_clones resolvers' libgcc CPU
   probe (__cpu_indicator_init, __cpu_features2, __cpu_model) and _GLOBAL_OFFSET_TABLE_.
   In particular no errno (__errno_location) and no stdio. GCC's target_clones adds no
   writable section to a -fPIC object (the ifunc's GOT slot is made by the linker, in the
   shared library), so no section is exempt. The checker is shown to catch planted state.

2. Chunking invariance. For every loss of the catalogue (every variant, and a row loss's
   plain kernels as well as its general ones), float32 and float64: per-sample values
   (reduction='none'), gradients (of reduction='none', and of 'sum', which is the same
   per-element derivative) and second derivatives (grad_hess) of a batch are the same bits
   as those of any split of the batch axis, concatenated -- splits at every point of a
   small batch, random chunk sizes (1, 2, 3, 7, 64, 255, 256, 257, ...) over medium ones, and
   big batches that lcc_run (templates/prelude.h.j2) cuts into several blocks of
   LCC_BLOCK_WORK elements and a remainder, run with 1 and 2 kernel threads. Inputs hold
   +-1e4, +-3e4, +-inf, NaN, +-0 and subnormals, so the stable paths run; row losses get
   class weights, label smoothing, ignored rows, sample weights, zero vectors.
   NaNs compare as NaNs, whatever their sign: a kernel's vector loop and its scalar
   remainder can make NaNs of opposite signs from the same inputs (float32 sigmoid_bce with
   a NaN prediction and label 0.9: on AVX2, grad_hess gives -NaN in the 8-wide vector body,
   +NaN in the remainder), so a NaN's sign depends on where its sample falls in the chunk;
   IEEE 754 leaves it unspecified. Every other bit, the sign of zero and of inf included, must match.
   Reductions: 'mean' of a split batch, recombined in float64 from the pieces' means,
   agrees with the whole batch's mean within MEAN_ULPS ulps of the mean absolute per-sample
   value (the blocks' sums differ in rounding, so not bit for bit). Gradients of
   reduction='mean' are scaled by 1/batch, so a piece's gradient is not the whole's: they
   are left out.
"""

from __future__ import annotations

import functools
import math
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

import losscc
from losscc.build import compiler_command

# ============================================================================ 1. global state

# nm's types of symbols that are code, read-only data or an ifunc (the target_clones
# dispatchers); anything else defined (b B d D C g G s S u v V ...) is mutable data
CODE_AND_CONSTANTS = set("TtRri")
LIBM = {f + s for f in (
    "acos", "acosh", "asin", "asinh", "atan", "atan2", "atanh", "cbrt", "ceil", "copysign", "cos", "cosh",
    "erf", "erfc", "exp", "exp2", "expm1", "fabs", "fdim", "floor", "fma", "fmax", "fmin", "fmod", "frexp",
    "hypot", "ilogb", "ldexp", "lgamma", "llrint", "llround", "log", "log10", "log1p", "log2", "logb",
    "lrint", "lround", "modf", "nan", "nearbyint", "nextafter", "nexttoward", "pow", "remainder", "remquo",
    "rint", "round", "scalbln", "scalbn", "sin", "sinh", "sqrt", "tan", "tanh", "tgamma", "trunc")
    for s in ("", "f")}
ALLOWED_UNDEFINED = LIBM | {
    "malloc", "calloc", "free",               # lcc_run's block totals, the row kernels' buffers
    "memmove", "memcpy", "memset",            # (and what GCC emits for struct copies and zeroing)
    "pthread_create", "pthread_join",         # lcc_run's per-call threads
    "__cpu_indicator_init", "__cpu_features2", "__cpu_model",  # target_clones' resolvers (libgcc)
    "_GLOBAL_OFFSET_TABLE_",
    # where the system compiler hardens by default (Ubuntu's GCC): stateless checks
    "__stack_chk_fail", "__stack_chk_fail_local", "__memcpy_chk", "__memmove_chk", "__memset_chk",
}


def _binutils():
    missing = [t for t in ("nm", "readelf") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"binutils' {' and '.join(missing)} not on PATH: cannot read the kernel objects")


def _run(cmd):
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


_SECTION = re.compile(r"^\s*\[\s*\d+\]\s+(\S*)\s+(\S+)\s+[0-9a-f]+\s+[0-9a-f]+\s+([0-9a-f]+)\s+[0-9a-f]+\s+"
                      r"([A-Za-z]*)\s+\d+\s+\d+\s+\d+\s*$")  # [Nr] Name Type Address Off Size ES Flg Lk Inf Al


def read_objects(objects: list[Path]) -> dict:
    """{object: ([(section, size, flags)], [(symbol, nm type)])}, from one `readelf -SW` and
    one `nm -A -P` (POSIX format: file: name type [value size]) over all the objects."""
    if not objects:
        return {}
    names = [str(o) for o in objects]
    out = {o: ([], []) for o in names}
    current = names[0] if len(names) == 1 else None
    for line in _run(["readelf", "-SW", *names]).splitlines():
        if line.startswith("File: "):
            current = line[len("File: "):].strip()
        elif (m := _SECTION.match(line)) and current:
            out[current][0].append((m.group(1), int(m.group(3), 16), m.group(4)))
    for line in _run(["nm", "-A", "-P", *names]).splitlines():
        path, _, rest = line.rpartition(": ")
        f = rest.split()
        if path in out and len(f) >= 2:
            out[path][1].append((f[0], f[1]))
    for o, (sections, _) in out.items():
        assert sections, f"could not read the section table of {o}"
    return {Path(o): v for o, v in out.items()}


def global_state(sections, symbols) -> list[str]:
    """What an object file with these sections and symbols (read_objects) holds of mutable
    global state, or reaches for ([] if nothing)."""
    problems = []
    for name, size, flags in sections:
        if "W" in flags and size:
            problems.append(f"writable section {name} holds {size} bytes")
    for name, kind in symbols:
        if kind == "U":
            if name not in ALLOWED_UNDEFINED:
                problems.append(f"undefined symbol {name} is not in the allowlist")
        elif kind in "wvWV":  # weak: a definition another object may replace, or a reference
            problems.append(f"weak symbol {name} (nm type {kind})")
        elif kind not in CODE_AND_CONSTANTS:
            problems.append(f"data symbol {name} (nm type {kind})")
    return problems


def _kernel_objects(built: Path) -> list[Path]:
    """The build's kernel objects: build.py's _Objects caches them under
    <out>/.cache/obj/<module>/<loss>-<part>-<hash>.o, and drops the ones the build did not use."""
    import json

    module = json.loads((built / "manifest.json").read_text())["module"]
    return sorted((built.parent / ".cache" / "obj" / module).glob("*.o"))


def test_kernel_objects_hold_no_mutable_global_state(built, losses):
    """Expectation: README "Standalone C" (libm and pthreads only) and prelude.h.j2's lcc_run
    note ("there is no pool, no global state"); a kernel that kept a counter, a cache or
    errno between calls would make concurrent or chunked calls interfere."""
    _binutils()
    objects = read_objects(_kernel_objects(built))
    # every kernel the module calls is defined in one of the objects checked here
    defined = {name for _, symbols in objects.values() for name, kind in symbols if kind == "T"}
    wanted = set()
    for meta in losses._manifest["losses"]:
        for k in meta["kernels"].values():
            wanted |= set(k["names"].values()) | set((k.get("plain") or {}).get("names", {}).values())
    assert objects and wanted and not wanted - defined, sorted(wanted - defined)[:5]
    found = {obj.name: p for obj, (sections, symbols) in objects.items() if (p := global_state(sections, symbols))}
    assert not found, found
    used = {name for _, symbols in objects.values() for name, kind in symbols if kind == "U"}
    assert {"pthread_create", "pthread_join", "malloc", "free"} <= used  # (what lcc_run needs)
    assert not {"errno", "__errno_location", "stderr", "stdout"} & used


PLANTED = {
    "static_counter": ("static int counter;\nint bump(void) { return ++counter; }\n",
                       ["writable section .bss holds 4 bytes", "data symbol counter (nm type b)"]),
    "global_counter": ("int total;\nint add(int x) { return total += x; }\n",
                       ["data symbol total"]),
    "initialised_table": ("double table[4] = {1, 2, 3, 4};\ndouble get(int i) { return table[i]; }\n",
                          ["writable section .data holds 32 bytes", "data symbol table (nm type D)"]),
    "local_static": ("double memo(double x) { static double last; double r = last; last = x; return r; }\n",
                     ["writable section .bss holds 8 bytes", "(nm type b)"]),
    "thread_local": ("static __thread int depth;\nint enter(void) { return ++depth; }\n",
                     ["writable section .tbss holds 4 bytes"]),
    "errno": ("#include <errno.h>\nint failed(void) { return errno; }\n",
              ["undefined symbol __errno_location is not in the allowlist"]),
    "stdio": ("#include <stdio.h>\nvoid say(double x) { fprintf(stderr, \"%g\", x); }\n",
              ["undefined symbol stderr is not in the allowlist"]),
}
CLEAN = """#include <math.h>
#include <stdlib.h>
static const double halves[3] = {0.5, 1.5, 2.5};
__attribute__((target_clones("arch=x86-64-v3", "default")))
static double clean_range(const double *x, long n) {
    double *t = malloc(n * sizeof *t), s = 0;
    for (long i = 0; i < n; ++i) { t[i] = log1p(exp(x[i])) * halves[i % 3]; s += t[i]; }
    free(t);
    return s;
}
double clean(const double *x, long n) { return clean_range(x, n); }
"""


CLONES = '__attribute__((target_clones("arch=x86-64-v3", "default")))\n'


def _compile(tmp_path, name, source):
    """The object file of `source`, compiled with the kernels' command; None if it fails."""
    src, obj = tmp_path / f"{name}.c", tmp_path / f"{name}.o"
    src.write_text(source)
    run = subprocess.run([*compiler_command(), "-c", str(src), "-o", str(obj)], capture_output=True, text=True)
    return None if run.returncode else obj


@pytest.mark.parametrize("name", sorted(PLANTED))
def test_the_check_finds_planted_global_state(tmp_path, name):
    """Expectation: a test that cannot fail proves nothing. Each planted object, compiled with
    the kernels' own command (build.compiler_command), has one kind of mutable global state
    or reaches for one; the checker must name it."""
    _binutils()
    source, expected = PLANTED[name]
    obj = _compile(tmp_path, name, source)
    assert obj is not None, f"the C compiler cannot build {name}"
    problems = global_state(*read_objects([obj])[obj])
    for e in expected:
        assert any(e in p for p in problems), (e, problems)


def test_the_check_passes_a_clean_object(tmp_path):
    """Expectation: the checker flags state, not code: constants, libm, malloc/free and a
    target_clones function (where the compiler has x86-64-v3 clones; else without) pass,
    as in the kernels."""
    _binutils()
    obj = _compile(tmp_path, "clean", CLEAN) or _compile(tmp_path, "plain", CLEAN.replace(CLONES, ""))
    assert obj is not None
    assert global_state(*read_objects([obj])[obj]) == []


# ============================================================================ 2. chunking

# the kernels' block and chunk sizes (templates/prelude.h.j2): sizes below cross them
LCC_CHUNK = 256            # elements per `omp simd` chunk call (elementwise.c.j2)
LCC_BLOCK_WORK = 16384     # elements per block of lcc_run
LCC_PAR_WORK = 1 << 17     # lcc_run uses threads from here on
LCC_LANES = 8              # short rows run 8 at a time (rows.c.j2)
LCC_LANE_NC = 16           # ... rows of at most this many classes

EXTREMES = np.array([1e4, -1e4, 3e4, -3e4, np.inf, -np.inf, np.nan, 0.0, -0.0, 1e-310, -2.5e-320])
FINITE_EXTREMES = np.array([1e4, -1e4, 3e4, -3e4, 0.0, -0.0])
CHUNK_SIZES = [1, 2, 3, 7, 64, 255, LCC_CHUNK, 257, 1000]
# |mean of the whole - mean of the pieces| <= MEAN_ULPS * eps(dtype) * mean(|per-sample value|),
# and the same against the exact mean of the per-sample values (math.fsum).
# float32: a mean is a double sum rounded once to float32, within half an ulp, 0.5 eps |mean|
# <= 0.5 eps mean|v|: the whole's, and the pieces' together (weighted by their sizes); each
# per-sample value is rounded so too, against the exact mean. 1 ulp, plus the double sums'
# own rounding (at most n 2^-30 ulps: < 1e-4 here). Largest seen: 0.66 (huber).
# float64: the double sums' rounding itself, in other blocks and another order: n terms can
# err by n ulps of their mean |value| at worst, about sqrt(n) typically. Largest seen: 8.7
# (softmax_cross_entropy, 8003 rows; 10 for 700 samples of log_cosh at 3 features each); 32
# leaves room for other data and the baseline (non-AVX2) code's other lanes.
MEAN_ULPS = {np.float32: 1.0001, np.float64: 32.0}


@pytest.fixture
def threads():
    """Restores the thread count a test changes."""
    before = losscc.get_num_threads()
    yield
    losscc.set_num_threads(before)


def _spike(rng, x, frac, values):
    """x with about `frac` of its elements replaced by `values` (float64 copy)."""
    x = np.array(x, dtype=np.float64)
    if x.size:
        idx = rng.integers(0, x.size, max(1, int(frac * x.size)))
        x.flat[idx] = rng.choice(values, idx.size)
    return x


@dataclass
class Data:
    """One loss's inputs for a batch: positional arrays (batched on axis 0) and keywords,
    each (value, batched)."""

    args: list
    kwargs: dict = field(default_factory=dict)


@dataclass
class Job:
    id: str
    name: str                       # the loss's spec name, an attribute of the module
    options: dict                   # constructor arguments (variants, params, axis)
    make: Callable                  # (rng, nb, layout, extremes) -> Data
    layouts: tuple                  # names in LAYOUTS
    hess: bool = False              # grad_hess (elementwise losses)
    big: tuple = ("flat", "c7")     # its layouts in the big-batch test (of those it has)


# a layout: the non-batch shape of the prediction
LAYOUTS = {"flat": (), "feat3": (3,), "feat300": (300,), "c7": (7,), "c40": (40,), "rows3": (3, 5)}


def _elementwise_job(case) -> Job:
    def make(rng, nb, layout, extremes):
        shape = (nb, *LAYOUTS[layout])
        d = case.gen(rng, shape)
        pred = _spike(rng, d["pred"], 0.03, extremes)
        label = _spike(rng, d["label"], 0.005, extremes)
        sw = rng.uniform(0.25, 2.0, shape[:1] + (1,) * (len(shape) - 1))  # broadcast along the features
        sw.flat[rng.integers(0, nb, max(1, nb // 50))] = 0.0
        data = Data([(pred, True), (label, True)], {"sample_weight": (sw, True)})
        if "pos_weight" in d:  # shape (last axis,): per sample for a 1-D prediction, else broadcast
            data.kwargs["pos_weight"] = (d["pos_weight"], len(shape) == 1)
        return data

    return Job(case.id, case.name, dict(case.options), make, ("flat", "feat3", "feat300"), hess=True)


def _row_shape(nb, layout):
    return (nb, *LAYOUTS[layout])


def _logits(rng, nb, layout, extremes, scale=3.0):
    """Logits with whole rows scaled to 1e4 (the stable logsumexp) and spiked elements."""
    x = rng.standard_normal(_row_shape(nb, layout)) * scale
    big = rng.random(x.shape[:-1]) < 0.03
    x[big] *= 1e4 / scale
    return _spike(rng, x, 0.01, extremes)


def _classes(rng, x, ignore=None):
    c = rng.integers(0, x.shape[-1], x.shape[:-1])
    if ignore is not None:
        c[rng.random(c.shape) < 0.05] = ignore
    return c


def _simplex(rng, shape, zeros=0.0):
    t = rng.dirichlet(np.ones(shape[-1]), shape[:-1])
    if zeros:
        t[rng.random(shape) < zeros] = 0.0
    return t


def _sw_rows(rng, x):
    sw = rng.uniform(0.25, 2.0, x.shape[:-1])
    sw[rng.random(sw.shape) < 0.02] = 0.0
    return sw


def _sce(sparse, logp, general):
    def make(rng, nb, layout, extremes):
        x = _logits(rng, nb, layout, extremes)
        if logp:  # log-probabilities: <= 0, some -inf (probability 0) where extremes are wanted
            x = -np.abs(x)
            if np.isinf(extremes).any():
                x[rng.random(x.shape) < 0.01] = -np.inf
        y = _classes(rng, x, ignore=-100) if sparse else _simplex(rng, x.shape, zeros=0.2)
        kw = {"sample_weight": (_sw_rows(rng, x), True)}
        if general:
            kw["class_weight"] = (rng.uniform(0.5, 2.0, x.shape[-1]), False)
        return Data([(x, True), (y, True)], kw)

    opts = {"sparse_label": sparse, "from_logits": logp, **({"label_smoothing": 0.1} if general else {})}
    return Job(f"sce_sparse{int(sparse)}_logp{int(logp)}_{'general' if general else 'plain'}",
               "softmax_cross_entropy", opts, make, ("c7", "c40", "rows3"))


def _kl(logp):
    def make(rng, nb, layout, extremes):
        x = _logits(rng, nb, layout, extremes)
        if logp:
            x = -np.abs(x)
        t = _simplex(rng, x.shape, zeros=0.2)
        return Data([(x, True), (t, True)], {"wrt": (("pred", "label"), False),
                                             "sample_weight": (_sw_rows(rng, x), True)})

    return Job(f"kl_logp{int(logp)}", "kl_div", {"from_logits": logp}, make, ("c7", "c40", "rows3"))


def _focal(rng, nb, layout, extremes):
    x = _logits(rng, nb, layout, extremes)
    return Data([(x, True), (_classes(rng, x), True)], {"sample_weight": (_sw_rows(rng, x), True)})


def _triplet(rng, nb, layout, extremes):
    a = _logits(rng, nb, layout, extremes, scale=1.0)
    p = a + rng.standard_normal(a.shape) * 0.5
    n = _spike(rng, a + rng.standard_normal(a.shape), 0.01, extremes)
    return Data([(a, True), (p, True), (n, True)], {"sample_weight": (rng.uniform(0.5, 2.0, nb), True)})


def _triplet_rows(rng, nb, layout, extremes):
    d = _triplet(rng, nb, layout, extremes)
    d.kwargs["sample_weight"] = (_sw_rows(rng, d.args[0][0]), True)
    return d


def _cosine(rng, nb, layout, extremes):
    x1 = _logits(rng, nb, layout, extremes, scale=1.0)
    x2 = x1 * rng.uniform(-1, 1, x1.shape[:-1] + (1,)) + rng.standard_normal(x1.shape) * 0.3
    x1[rng.random(x1.shape[:-1]) < 0.03] = 0.0  # zero vectors: the epsilon floor
    label = rng.choice([-1.0, 1.0, 1.0, 0.0], x1.shape[:-1])
    return Data([(x1, True), (x2, True), (label, True)], {"sample_weight": (_sw_rows(rng, x1), True)})


def _row_jobs() -> list[Job]:
    rows = ("c7", "c40", "rows3")
    jobs = [_sce(s, lp, g) for s in (True, False) for lp in (False, True) for g in (False, True)]
    jobs += [_kl(False), _kl(True),
             Job("focal", "softmax_focal", {"gamma": 2.0}, _focal, rows),
             Job("focal_gamma0.5", "softmax_focal", {"gamma": 0.5}, _focal, ("c7",), big=()),
             Job("triplet", "triplet", {"margin": 0.5}, _triplet, rows),  # axis None: one row a sample
             Job("triplet_axis-1", "triplet", {"axis": -1}, _triplet_rows, ("c7", "rows3")),
             Job("cosine", "cosine_embedding", {"margin": 0.2}, _cosine, rows)]
    return jobs


def _jobs() -> list[Job]:
    from test_losses import CASES  # valid inputs for every elementwise loss and variant

    jobs = [_elementwise_job(c) for c in CASES] + _row_jobs()
    for j in jobs:  # the other loops of the kernels on threads, with a cheap loss each:
        if j.id == "l2":  # several features a sample (elementwise.c.j2)
            j.big = ("flat", "feat300")
        if j.id == "sce_sparse1_logp0_plain":  # rows longer than LCC_LANE_NC (rows.c.j2)
            j.big = ("c7", "c40")
    return jobs


JOBS = {j.id: j for j in _jobs()}
JOB_IDS = sorted(JOBS)


# -- calling and comparing


def _cast(value, dtype):
    if isinstance(value, np.ndarray) and value.dtype.kind == "f":
        return value.astype(dtype)
    return value


def _typed(data: Data, dtype) -> Data:
    return Data([(_cast(v, dtype), b) for v, b in data.args],
                {k: (_cast(v, dtype), b) for k, (v, b) in data.kwargs.items()})


def _piece(data: Data, a: int, b: int):
    """The positional arguments and keywords of samples [a, b)."""
    args = [v[a:b] if batched else v for v, batched in data.args]
    kwargs = {k: (v[a:b] if batched else v) for k, (v, batched) in data.kwargs.items()}
    return args, kwargs


def _methods(job: Job, with_sum=False) -> list[tuple[str, str]]:
    """(reduction, method) whose outputs are per sample or per element: each kernel (v, vg,
    vgh), and with_sum the gradient of reduction='sum' (the vg kernel without its values).
    Not reduction='mean': its gradients are scaled by 1/batch size (runtime _scales), so a
    piece's are not the whole's, and its value is one number (test_the_mean_...)."""
    out = [("none", "__call__"), ("none", "value_and_grad")] + ([("sum", "grad")] if with_sum else [])
    return out + ([("none", "grad_hess")] if job.hess else [])


def _flat(result) -> list[np.ndarray]:
    if isinstance(result, (tuple, list)):
        return [a for r in result for a in _flat(r)]
    return [result]


@functools.lru_cache(maxsize=None)
def _loss(losses, job_id, reduction):
    job = JOBS[job_id]
    return getattr(losses, job.name)(reduction=reduction, **job.options)


def _call(losses, job, reduction, method, args, kwargs):
    loss = _loss(losses, job.id, reduction)
    if method in ("__call__", "grad_hess") and "wrt" in kwargs:
        kwargs = {k: v for k, v in kwargs.items() if k != "wrt"}
    return _flat(getattr(loss, method)(*args, **kwargs))


_NAN = {np.dtype(np.float32): np.uint32(0x7FC00000), np.dtype(np.float64): np.uint64(0x7FF8000000000000)}


def _bits(a: np.ndarray) -> np.ndarray:
    """The bit patterns of a float array, every NaN as the one positive quiet NaN (the
    module's docstring says why)."""
    a = np.ascontiguousarray(a)
    u = a.view(np.uint64 if a.dtype == np.float64 else np.uint32)
    nan = np.isnan(a)
    if nan.any():
        u = u.copy()
        u[nan] = _NAN[a.dtype]
    return u


def _compare(whole, pieces, cuts, what):
    """The pieces' outputs, concatenated along the batch axis, are the whole batch's bits."""
    assert len(pieces[0]) == len(whole), what
    for k, w in enumerate(whole):
        got = np.concatenate([p[k] for p in pieces])
        assert got.dtype == w.dtype and got.shape == w.shape, (what, k, got.dtype, w.dtype, got.shape, w.shape)
        bad = np.nonzero((_bits(got) != _bits(w)).reshape(len(w), -1).any(axis=1))[0]
        if len(bad):
            i = int(bad[0])
            j = int(np.searchsorted(cuts, i, side="right")) - 1
            pytest.fail(f"{what}, output {k}: {len(bad)} samples differ, first sample {i} (in the piece "
                        f"[{cuts[j]}, {cuts[j + 1]})): whole {w[i]!r}, pieces {got[i]!r}")


def _check_splits(losses, job, data, splits, what, with_sum=False):
    """For every method: the whole batch against each split (a list of cut points)."""
    for reduction, method in _methods(job, with_sum):
        args, kwargs = _piece(data, 0, None)
        whole = _call(losses, job, reduction, method, args, kwargs)
        for cuts in splits:
            pieces = [_call(losses, job, reduction, method, *_piece(data, a, b)) for a, b in zip(cuts[:-1], cuts[1:])]
            _compare(whole, pieces, cuts, f"{what} {reduction} {method}")


def _random_cuts(rng, nb, sizes):
    cuts = [0]
    while cuts[-1] < nb:
        cuts.append(min(nb, cuts[-1] + int(rng.choice(sizes))))
    return cuts


def _rng(*parts):
    import zlib

    return np.random.default_rng(zlib.crc32("/".join(map(str, parts)).encode()))


# the batch sizes per layout: small (split at every point), medium (random pieces) and big
# (several of lcc_run's blocks and a remainder, above LCC_PAR_WORK elements: threads)
SMALL = {"flat": 29, "feat3": 13, "feat300": 5, "c7": 29, "c40": 11, "rows3": 9}
MEDIUM = {"flat": 1000, "feat3": 700, "feat300": 40, "c7": 1000, "c40": 300, "rows3": 300}
BIG = {"flat": 140_001, "feat300": 450, "c7": 20_003, "c40": 3_301}
# test_the_mean_...: three blocks and a remainder (below LCC_PAR_WORK: the sums do not depend
# on the thread count anyway, lcc_run adds the blocks' totals in block order)
MEAN = {"flat": 50_001, "c7": 8_003}


def test_the_sizes_cross_the_kernels_blocks():
    """Expectation: prelude.h.j2's sizes -- the big batches are split by lcc_run into several
    blocks and a remainder and run on threads; the others cross LCC_CHUNK and LCC_LANES."""
    from losscc.resources import templates_dir

    prelude = (templates_dir() / "prelude.h.j2").read_text()
    defined = dict(re.findall(r"^#define (LCC_\w+) (.+?)\s*$", prelude, re.M))
    for name in ("LCC_CHUNK", "LCC_BLOCK_WORK", "LCC_PAR_WORK", "LCC_LANES", "LCC_LANE_NC"):
        shift = re.fullmatch(r"\(1 << (\d+)\)", defined[name])
        assert (1 << int(shift[1]) if shift else int(defined[name])) == globals()[name], (name, defined[name])
    assert LAYOUTS["c7"][0] <= LCC_LANE_NC < LAYOUTS["c40"][0]
    for layout, nb in BIG.items():
        per_sample = math.prod(LAYOUTS[layout]) or 1
        block = max(1, LCC_BLOCK_WORK // per_sample)
        assert nb * per_sample >= LCC_PAR_WORK and nb // block >= 8 and nb % block, layout
    for layout, nb in MEAN.items():
        block = max(1, LCC_BLOCK_WORK // (math.prod(LAYOUTS[layout]) or 1))
        assert nb // block >= 3 and nb % block, layout
    assert MEDIUM["flat"] > 3 * LCC_CHUNK and MEDIUM["flat"] % LCC_CHUNK
    assert SMALL["c7"] > 3 * LCC_LANES and SMALL["c7"] % LCC_LANES
    assert LAYOUTS["feat300"][0] > LCC_CHUNK  # a sample's features in two chunks


def test_every_loss_and_kernel_is_covered(losses):
    """Expectation: the catalogue is losses.LOSSES; every variant of every loss (and a row
    loss's plain kernels, codegen's fast kernels without optional inputs) is in JOBS."""
    seen = set()
    for job in JOBS.values():
        loss = _loss(losses, job.id, "none")
        data = job.make(_rng("cover", job.id), 2, job.layouts[0], EXTREMES)
        given = {k for k in data.kwargs if k != "wrt"}
        plain = loss._plain is not None and loss._kernel("v_float64", given) is not loss._kernels["v_float64"]
        seen.add((loss._meta["name"], loss.variant, plain))
    expected = set()
    for meta in losses._manifest["losses"]:
        for variant, k in meta["kernels"].items():
            expected.add((meta["name"], variant, False))
            if k.get("plain"):
                expected.add((meta["name"], variant, True))
    assert {n for n, _, _ in expected} == set(losses.LOSSES)
    assert expected <= seen, sorted(expected - seen)


@pytest.mark.parametrize("job_id", JOB_IDS)
def test_splits_at_every_point_and_into_single_samples(losses, job_id):
    """Expectation: README "Using a loss" -- a loss is per sample (Gluon's semantics) and
    elementwise.c.j2/rows.c.j2 say a sample's results are the same bits in any batch; here
    a small batch cut at each point, and into single samples, gives the whole batch's bits.
    (Without sample weights: these many small calls take the fast path, _Plan; the other
    tests weigh the samples.)"""
    job = JOBS[job_id]
    for dtype in (np.float32, np.float64):
        for layout in job.layouts:
            nb = SMALL[layout]
            data = _typed(job.make(_rng(job_id, layout, "small"), nb, layout, EXTREMES), dtype)
            data.kwargs.pop("sample_weight", None)
            splits = [[0, k, nb] for k in range(1, nb)] + [list(range(nb + 1))]
            _check_splits(losses, job, data, splits, f"{job_id} {dtype.__name__} {layout} nb={nb}")


@pytest.mark.parametrize("job_id", JOB_IDS)
def test_random_pieces_of_medium_batches(losses, job_id):
    """Expectation: as above; pieces of 1 to 1000 samples cross the kernels' chunks
    (LCC_CHUNK elements) and vector widths at every alignment."""
    job = JOBS[job_id]
    for dtype in (np.float32, np.float64):
        for layout in job.layouts:
            nb = MEDIUM[layout]
            rng = _rng(job_id, layout, "medium")
            data = _typed(job.make(rng, nb, layout, EXTREMES), dtype)
            splits = [_random_cuts(rng, nb, CHUNK_SIZES) for _ in range(2)]
            _check_splits(losses, job, data, splits, f"{job_id} {dtype.__name__} {layout} nb={nb}", with_sum=True)


BIG_CASES = [(j, lay) for j in JOB_IDS for lay in JOBS[j].layouts if lay in JOBS[j].big]


@pytest.mark.parametrize("job_id,layout", BIG_CASES)
def test_big_batches_on_one_and_two_threads(losses, threads, job_id, layout):
    """Expectation: prelude.h.j2's lcc_run cuts a batch into fixed blocks (LCC_BLOCK_WORK
    elements) and runs them on up to n threads, "every output ... the same bits whatever the
    thread count". So a big batch (several blocks and a remainder) gives the same bits on 1
    and on 2 threads, and the same bits as its pieces on 2 threads: pieces of 1 sample to 3
    blocks (each on one thread, in blocks of its own), and a piece big enough for threads
    whose blocks start at sample 5 rather than 0."""
    job = JOBS[job_id]
    nb = BIG[layout]
    per_sample = math.prod(LAYOUTS[layout]) or 1
    rng = _rng(job_id, layout, "big")
    data64 = job.make(rng, nb, layout, EXTREMES)
    block = max(1, LCC_BLOCK_WORK // per_sample)  # samples per block of lcc_run
    small = _random_cuts(rng, nb, [c for c in CHUNK_SIZES if c < block] + [block - 1, block, block + 1, 3 * block + 7])
    threaded = [0, 5, 5 + LCC_PAR_WORK // per_sample + 3, nb]  # [5, ...) runs on 2 threads
    assert threaded[2] < nb and (threaded[2] - 5) * per_sample > LCC_PAR_WORK and len(small) > 4
    for dtype in (np.float32, np.float64):
        data = _typed(data64, dtype)
        for reduction, method in _methods(job)[1:]:  # vg and vgh (v is their loop without outputs)
            what = f"{job_id} {dtype.__name__} {layout} nb={nb} {reduction} {method}"
            losscc.set_num_threads(1)
            serial = _call(losses, job, reduction, method, *_piece(data, 0, None))
            losscc.set_num_threads(2)
            whole = _call(losses, job, reduction, method, *_piece(data, 0, None))
            _compare(serial, [whole], [0, nb], f"{what}: the whole batch on 2 threads against 1")
            for cuts in (small, threaded):
                pieces = [_call(losses, job, reduction, method, *_piece(data, a, b))
                          for a, b in zip(cuts[:-1], cuts[1:])]
                _compare(whole, pieces, cuts, f"{what}, 2 threads")


def _finite_data(losses, job, rng, nb, layout):
    """Inputs with finite extremes (+-1e4, +-3e4, +-0) where they keep the loss finite: a
    sample whose loss is not finite gets its plain inputs back (a NaN mean compares nothing)."""
    spiked = job.make(rng, nb, layout, FINITE_EXTREMES)
    plain = job.make(_rng(job.id, layout, "plain"), nb, layout, np.array([1.0]))
    v = _call(losses, job, "none", "__call__", *_piece(spiked, 0, None))[0]
    bad = ~np.isfinite(v)
    args = []
    for (s, b), (p, _) in zip(spiked.args, plain.args):
        if b and s.dtype.kind == "f":
            s = s.copy()
            s[bad] = p[bad]
        args.append((s, b))
    data = Data(args, spiked.kwargs)
    v = _call(losses, job, "none", "__call__", *_piece(data, 0, None))[0]
    assert np.isfinite(v).all(), job.id
    return data


@pytest.mark.parametrize("job_id", JOB_IDS)
def test_the_mean_of_pieces_is_the_mean_within_rounding(losses, job_id):
    """Expectation: reduction='mean' is the sum of the per-sample values over the batch size
    (README "Reductions"), summed in double per block (lcc_run); pieces sum in other blocks,
    so their means, recombined in float64 (sum of mean * size, over the batch size), agree
    with the whole batch's mean within rounding: MEAN_ULPS ulps of the mean |per-sample value|
    (also measured against the exact mean of the per-sample values, math.fsum)."""
    job = JOBS[job_id]
    layout = job.layouts[0]
    nb = MEAN[layout]
    rng = _rng(job_id, layout, "mean")
    data64 = _finite_data(losses, job, rng, nb, layout)
    block = max(1, LCC_BLOCK_WORK // (math.prod(LAYOUTS[layout]) or 1))
    cuts = _random_cuts(rng, nb, [c for c in CHUNK_SIZES if c < block] + [block - 1, block + 1, 2 * block + 7])
    for dtype in (np.float32, np.float64):
        data = _typed(data64, dtype)
        whole = float(_call(losses, job, "mean", "__call__", *_piece(data, 0, None))[0])
        means = [float(_call(losses, job, "mean", "__call__", *_piece(data, a, b))[0]) for a, b in
                 zip(cuts[:-1], cuts[1:])]
        recombined = math.fsum(m * (b - a) for m, a, b in zip(means, cuts[:-1], cuts[1:])) / nb
        v = _call(losses, job, "none", "__call__", *_piece(data, 0, None))[0].astype(np.float64)
        exact = math.fsum(v) / nb
        unit = np.finfo(dtype).eps * float(np.mean(np.abs(v)))
        for name, other in (("pieces", recombined), ("exact", exact)):
            err = abs(whole - other) / unit if unit else abs(whole - other)
            assert err <= MEAN_ULPS[dtype], (f"{job_id} {dtype.__name__} {layout}: mean of the whole "
                                             f"{whole!r}, of the {name} {other!r}: {err:.3g} ulps")
