"""losscc's speed, measured against the memory bound, plain numpy and PyTorch in one run.

    python bench/run.py [--quick] [--no-compile] [--only NAME] [--json FILE] [--out DIR]

Every timed call is one training step's worth of work: the loss (mean over the batch) and
its gradient with respect to the prediction, from float32 or float64 numpy arrays. Each
competitor does exactly that:

- losscc:        `Loss(reduction="mean").value_and_grad(pred, label)` (a new gradient array
                 per call, as PyTorch allocates one), and the same with `grad_out=` buffers;
- numpy:         the closed-form value and gradient written in numpy (one thread);
- torch eager:   the torch.nn.functional loss on `torch.from_numpy` views, `loss.backward()`;
- torch closed:  the closed-form gradient written in torch ops, no autograd;
- torch.compile: `torch.compile` of the closed form (compile time reported separately).

The memory bound of a workload is the bytes it must move (its inputs read once, its
gradient written once) divided by the machine's bandwidth, measured in the same run as the
best of several large numpy copies (2 bytes moved per byte copied). A ratio "x bound" of
1.3 means 30 % slower than moving the data once.

Times are the minimum over repeats (each repeat at least --min-time seconds of calls), so
they are what the code costs, not what the machine was busy with. Nothing here is collected
by pytest: bench/README.md explains the columns, and the README quotes the headline.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


# --------------------------------------------------------------------------- timing


def best_time(fn, min_time: float, repeats: int) -> float:
    """Minimum seconds per call of `fn` over `repeats` rounds of at least `min_time` each."""
    fn()  # warm up: first-touch page faults, lazy bindings, caches
    n, t = 1, 0.0
    while True:  # calls per round, so that a round lasts about min_time
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        t = time.perf_counter() - t0
        if t >= min_time / 4 or n >= 1 << 24:
            break
        n *= 4 if t < min_time / 40 else 2
    n = max(1, int(n * min_time / max(t, 1e-9)))
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n)
    return best


def bandwidth(min_time: float, repeats: int) -> float:
    """Bytes per second of a large numpy copy (read + write), the best of several."""
    src = np.ones(32 << 20)  # 256 MB: far beyond any cache
    dst = np.empty_like(src)
    t = best_time(lambda: np.copyto(dst, src), min_time, repeats)
    return 2 * src.nbytes / t


# --------------------------------------------------------------------------- the workloads


@dataclass
class Workload:
    loss: str             # the spec's name
    shape: tuple          # the prediction's
    dtype: str
    group: str            # "elementwise", "softmax", "latency"
    results: dict = field(default_factory=dict)   # competitor -> seconds per call
    notes: list = field(default_factory=list)

    @property
    def name(self):
        return f"{self.loss} {'x'.join(map(str, self.shape))} {self.dtype}"

    def inputs(self, rng):
        dt = np.dtype(self.dtype)
        pred = rng.standard_normal(self.shape).astype(dt)
        if self.loss == "softmax_cross_entropy":
            label = rng.integers(0, self.shape[-1], self.shape[0])
        elif self.loss == "sigmoid_bce":
            label = (rng.random(self.shape) < 0.5).astype(dt)
        else:
            label = rng.standard_normal(self.shape).astype(dt)
        return pred, label

    def bytes(self, pred, label):
        """What must move: the inputs read once, the gradient written once."""
        return pred.nbytes + label.nbytes + pred.nbytes


def workloads(quick: bool) -> list[Workload]:
    sizes = (10**6,) if quick else (10**6, 10**7)
    rows = ((65536, 10), (8192, 1000)) if quick else ((65536, 10), (8192, 1000), (1024, 32000))
    out = []
    for dtype in ("float32", "float64"):
        for loss in ("l2", "l1", "huber", "sigmoid_bce"):
            out += [Workload(loss, (n,), dtype, "elementwise") for n in sizes]
        out += [Workload("softmax_cross_entropy", r, dtype, "softmax") for r in rows]
    out += [Workload("l2", (32,), "float32", "latency"), Workload("l2", (32,), "float64", "latency"),
            Workload("softmax_cross_entropy", (32, 10), "float32", "latency")]
    return out


# --------------------------------------------------------------------------- competitors


LOSSCC_CLASS = {"l2": "L2Loss", "l1": "L1Loss", "huber": "HuberLoss", "sigmoid_bce": "SigmoidBCELoss",
                "softmax_cross_entropy": "SoftmaxCrossEntropyLoss"}


def losscc_fns(module, w: Workload, pred, label):
    loss = getattr(module, LOSSCC_CLASS[w.loss])(reduction="mean")
    grad = np.empty_like(pred)
    return {
        "losscc": lambda: loss.value_and_grad(pred, label),
        "losscc out=": lambda: loss.value_and_grad(pred, label, grad_out=grad),
    }


def numpy_fn(w: Workload, pred, label):
    n = pred.shape[0]
    if w.loss == "l2":
        def fn():
            d = pred - label
            return 0.5 * np.mean(d * d), d / n
    elif w.loss == "l1":
        def fn():
            d = pred - label
            return np.mean(np.abs(d)), np.sign(d) / n
    elif w.loss == "huber":
        def fn():
            d = pred - label
            a = np.abs(d)
            v = np.where(a > 1, a - 0.5, 0.5 * d * d)
            return np.mean(v), np.clip(d, -1, 1) / n
    elif w.loss == "sigmoid_bce":
        def fn():
            v = np.maximum(pred, 0) - pred * label + np.log1p(np.exp(-np.abs(pred)))
            e = np.exp(-np.abs(pred))
            s = np.where(pred >= 0, 1 / (1 + e), e / (1 + e))
            return np.mean(v), (s - label) / n
    else:  # softmax cross entropy, integer labels
        rows = np.arange(n)

        def fn():
            m = pred.max(axis=1, keepdims=True)
            e = np.exp(pred - m)
            s = e.sum(axis=1, keepdims=True)
            lse = m[:, 0] + np.log(s[:, 0])
            v = np.mean(lse - pred[rows, label])
            g = e / s
            g[rows, label] -= 1
            g /= n
            return v, g
    return fn


def torch_fns(torch, w: Workload, pred, label, compile_: bool):
    F = torch.nn.functional
    p = torch.from_numpy(pred)
    y = torch.from_numpy(label)
    n = pred.shape[0]
    if w.loss == "l2":
        eager = lambda x: 0.5 * F.mse_loss(x, y)  # noqa: E731
        def closed(x):
            d = x - y
            return 0.5 * (d * d).mean(), d / n
    elif w.loss == "l1":
        eager = lambda x: F.l1_loss(x, y)  # noqa: E731
        def closed(x):
            d = x - y
            return d.abs().mean(), d.sign() / n
    elif w.loss == "huber":
        eager = lambda x: F.smooth_l1_loss(x, y, beta=1.0)  # noqa: E731
        def closed(x):
            d = x - y
            a = d.abs()
            return torch.where(a > 1, a - 0.5, 0.5 * d * d).mean(), d.clamp(-1, 1) / n
    elif w.loss == "sigmoid_bce":
        eager = lambda x: F.binary_cross_entropy_with_logits(x, y)  # noqa: E731
        def closed(x):
            v = F.binary_cross_entropy_with_logits(x, y)
            return v, (torch.sigmoid(x) - y) / n
    else:
        eager = lambda x: F.cross_entropy(x, y)  # noqa: E731
        def closed(x):
            ls = torch.log_softmax(x, dim=1)
            v = -ls.gather(1, y[:, None]).mean()
            g = ls.exp()
            g[torch.arange(n), y] -= 1
            return v, g / n

    def eager_step():
        x = p.detach().requires_grad_()
        v = eager(x)
        v.backward()
        return v, x.grad

    def closed_step():
        with torch.no_grad():
            return closed(p)

    fns = {"torch eager": eager_step, "torch closed": closed_step}
    compile_time = None
    if compile_:
        try:
            compiled = torch.compile(closed, dynamic=False)
            t0 = time.perf_counter()
            with torch.no_grad():
                compiled(p)
            compile_time = time.perf_counter() - t0

            def compiled_step():
                with torch.no_grad():
                    return compiled(p)
            fns["torch.compile"] = compiled_step
        except Exception as exc:  # no C++ compiler, an unsupported op: say so, go on
            w.notes.append(f"torch.compile failed: {type(exc).__name__}: {str(exc)[:120]}")
    return fns, compile_time


def check_agreement(w: Workload, results: dict):
    """Every competitor must compute the same numbers, or its time means nothing."""
    ref_v, ref_g = results["numpy"]
    tol = 1e-4 if w.dtype == "float32" else 1e-10
    for name, (v, g) in results.items():
        v = float(v.detach() if hasattr(v, "detach") else v)
        g = g.detach().numpy() if hasattr(g, "detach") else np.asarray(g)
        scale = max(np.abs(ref_g).max(), 1e-300)
        if not (math.isclose(v, float(ref_v), rel_tol=tol, abs_tol=tol)
                and np.abs(g - ref_g).max() <= tol * scale):
            raise SystemExit(f"bench: {name} disagrees with numpy on {w.name}: value {v} vs "
                             f"{float(ref_v)}, max gradient difference {np.abs(g - ref_g).max():g}")


# --------------------------------------------------------------------------- memory and build


def peak_memory(module, n: int) -> dict:
    """Peak bytes numpy allocates during value_and_grad at size n (tracemalloc sees numpy's
    allocations), against the outputs' own size."""
    rng = np.random.default_rng(1)
    pred, label = rng.standard_normal(n), rng.standard_normal(n)
    loss = module.L2Loss(reduction="none")
    gc.collect()
    tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    v, g = loss.value_and_grad(pred, label)
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    return {"n": n, "peak_bytes": peak, "outputs_bytes": v.nbytes + g.nbytes}


def build_times(specs: Path) -> dict:
    """A cold `losscc build` of the catalogue (no cache), then a no-op rebuild, as a user
    runs them (a new process each: interpreter start and imports included)."""
    tmp = Path(tempfile.mkdtemp(prefix="losscc-bench-"))
    cmd = [sys.executable, "-m", "losscc.cli", "build", str(specs), "--out", str(tmp)]
    try:
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        cold = time.perf_counter() - t0
        noop = math.inf
        for _ in range(3):
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True)
            noop = min(noop, time.perf_counter() - t0)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"cold_s": cold, "noop_s": noop}


# --------------------------------------------------------------------------- report


def fmt_time(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def report(ws: list[Workload], bw: float, threads: int, torch_version):
    print(f"\nmemory bandwidth (numpy copy): {bw / 1e9:.1f} GB/s; losscc threads: {threads}; "
          f"torch: {torch_version or 'not installed'}\n")
    head = ("workload", "losscc", "x bound", "out=", "x bound", "numpy/", "eager/", "best torch/")
    print(f"{head[0]:<34}{head[1]:>10}{head[2]:>8}{head[3]:>10}{head[4]:>8}{head[5]:>8}{head[6]:>8}{head[7]:>12}")
    for w in ws:
        r = w.results
        t, to = r["losscc"], r["losscc out="]
        bound = r.get("bound")
        torches = [r[k] for k in ("torch eager", "torch closed", "torch.compile") if k in r]
        cells = [fmt_time(t), f"{t / bound:.2f}" if bound else "", fmt_time(to),
                 f"{to / bound:.2f}" if bound else "", f"{r['numpy'] / t:.2f}",
                 f"{r['torch eager'] / t:.1f}" if "torch eager" in r else "-",
                 f"{min(torches) / t:.2f}" if torches else "-"]
        print(f"{w.name:<34}{cells[0]:>10}{cells[1]:>8}{cells[2]:>10}{cells[3]:>8}{cells[4]:>8}"
              f"{cells[5]:>8}{cells[6]:>12}")
        for note in w.notes:
            print(f"    note: {note}")
    print("\nratios: 'x bound' = time / memory bound; 'numpy/', 'eager/', 'best torch/' = their "
          "time / losscc's (above 1: losscc is faster); best torch = fastest of eager, "
          "closed form and torch.compile.")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes, shorter rounds, no torch.compile")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    ap.add_argument("--only", help="run workloads whose name contains this text")
    ap.add_argument("--min-time", type=float, default=None, help="seconds per timing round")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--no-build-time", action="store_true", help="skip the cold-build measurement")
    ap.add_argument("--out", default=None, help="build folder (default: a temporary one)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    min_time = args.min_time or (0.05 if args.quick else 0.2)
    repeats = args.repeats or (3 if args.quick else 5)

    import losscc
    from losscc.build import build

    out = Path(args.out or tempfile.mkdtemp(prefix="losscc-bench-build-"))
    build([ROOT / "specs"], out=out, log=lambda *a: None)
    module = losscc.load(out / "losses")
    try:
        import torch
    except ImportError:
        torch = None

    print(f"losscc {losscc.__version__} on {platform.machine()}, {os.cpu_count()} cores, "
          f"{platform.processor() or platform.platform()}, numpy {np.__version__}")
    bw = bandwidth(min_time, repeats)
    ws = [w for w in workloads(args.quick) if not args.only or args.only in w.name]
    compile_times = []
    for w in ws:
        rng = np.random.default_rng(0)
        pred, label = w.inputs(rng)
        fns = {**losscc_fns(module, w, pred, label), "numpy": numpy_fn(w, pred, label)}
        if torch is not None:
            tf, ct = torch_fns(torch, w, pred, label, compile_=not (args.quick or args.no_compile))
            fns.update(tf)
            if ct is not None:
                compile_times.append(ct)
        check_agreement(w, {k: f() for k, f in fns.items()})
        for k, f in fns.items():
            w.results[k] = best_time(f, min_time, repeats)
        if w.group != "latency":
            w.results["bound"] = w.bytes(pred, label) / bw
        print(f"  timed {w.name}", file=sys.stderr)

    threads = losscc.get_num_threads()
    report(ws, bw, threads, torch.__version__ if torch else None)
    if compile_times:
        print(f"torch.compile: {min(compile_times):.1f}-{max(compile_times):.1f} s to compile each graph")
    mem = peak_memory(module, 10**6 if args.quick else 10**7)
    print(f"peak memory of L2Loss().value_and_grad at N = {mem['n']:.0e} float64: "
          f"{mem['peak_bytes'] / 1e6:.1f} MB allocated, of which outputs {mem['outputs_bytes'] / 1e6:.1f} MB")
    builds = None
    if not args.no_build_time:
        builds = build_times(ROOT / "specs")
        print(f"build: cold (whole catalogue, no cache) {builds['cold_s']:.1f} s; "
              f"no-op rebuild {builds['noop_s']:.2f} s (each a new `losscc build` process)")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "bandwidth": bw, "threads": threads, "memory": mem, "build": builds,
            "compile_s": compile_times,
            "workloads": [{"name": w.name, "results": w.results, "notes": w.notes} for w in ws],
        }, indent=1))
    if not args.out:
        shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
