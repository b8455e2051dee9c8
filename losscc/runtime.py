"""Runtime: the Loss class. Arrays in, checks, dtype dispatch, Gluon weighting, reductions.

Imports numpy and the compiled module only (never sympy, jinja2 or a compiler stage), so
loading a built module and calling a loss costs milliseconds.

Semantics (MXNet Gluon's, plus PyTorch's `reduction`):
  elementwise loss l = f(pred, label, ...), times sample_weight (broadcast to pred's shape),
  times `weight`; the per-sample loss is the mean over every axis but `batch_axis`.
  reduction="none" returns the per-sample losses, shape (batch,); "sum" and "mean" reduce
  them to a scalar. Gradients are d(sum of the per-sample losses)/d input, or d(mean)/d
  input for reduction="mean". NaN in any input gives NaN in the values and gradients it
  reaches; inf follows IEEE arithmetic.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import json
import math
import numbers
import os
import sys
import sysconfig
import threading
from pathlib import Path
from types import MappingProxyType

import numpy as np

from .errors import LoadError
from .ir import MANIFEST_FORMAT, bound_error, manifest_checksum, variant_key
from .resources import file_sha256, usable_cores

REDUCTIONS = ("none", "mean", "sum")
_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))  # the dtypes that have kernels


# --------------------------------------------------------------------------- threads


def _default_threads() -> int:
    env = os.environ.get("LOSSCC_NUM_THREADS")
    if env is not None:
        try:
            n = int(env)
        except ValueError:
            n = 0
        if n < 1:
            raise ValueError(f"LOSSCC_NUM_THREADS must be a positive integer, got {env!r}")
        return n
    return usable_cores()


_threads: int | None = None


def get_num_threads() -> int:
    """Threads a kernel call may use: set_num_threads(n), else $LOSSCC_NUM_THREADS, else
    the cores this process may run on."""
    global _threads
    if _threads is None:
        _threads = _default_threads()
    return _threads


def set_num_threads(n: int) -> None:
    """Use at most `n` threads per kernel call (1: only the caller's thread). Kernels split
    a batch across threads above about 10^5 elements; results are the same bits for any n."""
    global _threads
    if not isinstance(n, numbers.Integral) or isinstance(n, bool) or n < 1:
        raise ValueError(f"set_num_threads: n must be a positive integer, got {n!r}")
    _threads = int(n)


# --------------------------------------------------------------------------- loading


def load_module(path):
    """Import the package at `path` (written by `losscc build`) and return it.

    The path is resolved through the published symlink to the build's own folder, so a
    rebuilt module is a new folder with a new compiled library: loading it after a rebuild
    in the same process gives the new kernels, never the old library under a new manifest.
    """
    origin = os.path.abspath(path)  # what a pickled loss names (a published symlink stays one)
    path = Path(path).resolve()
    manifest = _manifest(path)
    name = manifest["module"]
    existing = sys.modules.get(name)
    if existing is not None and getattr(existing, "_manifest", {}).get("cache_key") != manifest["cache_key"]:
        name = f"{name}_{manifest['cache_key'][:12]}"  # another build of that name is loaded
        existing = sys.modules.get(name)
    if existing is not None:
        return existing
    spec = importlib.util.spec_from_file_location(name, path / "__init__.py",
                                                  submodule_search_locations=[str(path)])
    module = importlib.util.module_from_spec(spec)
    module._manifest = manifest  # verified: bind_package need not hash the files again
    module._origin = origin
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _manifest(path: Path) -> dict:
    """The build's manifest, or LoadError saying what is wrong and to rebuild: checked against
    its checksum, and every file the build runs against the SHA-256 it lists."""
    hint = "run `losscc build SPECS --out DIR --name NAME` to (re)build it"
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except FileNotFoundError:
        raise LoadError(f"{path}: not a losscc build (no manifest.json); {hint}") from None
    except (OSError, ValueError) as exc:
        raise LoadError(f"{path}: unreadable manifest.json ({exc}); {hint}") from None
    if not isinstance(manifest, dict):
        raise LoadError(f"{path}: unreadable manifest.json (not a JSON object); {hint}")
    if manifest.get("format") != MANIFEST_FORMAT:
        raise LoadError(f"{path}: built by another losscc version (manifest format "
                        f"{manifest.get('format')!r}, this losscc reads {MANIFEST_FORMAT}); {hint}")
    if manifest.get("checksum") != manifest_checksum(manifest):
        raise LoadError(f"{path}: the build is corrupted (manifest.json was changed after the build); {hint}")
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    if manifest.get("python") != suffix:
        raise LoadError(f"{path}: built for another Python ({manifest.get('python')!r}; this is "
                        f"{suffix!r}); {hint}")
    # Every file the build executes must be the one it wrote (a truncated copy, a stray edit,
    # another build's kernels): checked before any of it runs.
    files = manifest.get("files") or {}
    for name in ("__init__.py", manifest.get("extension")):
        if not isinstance(name, str) or name not in files or not (path / name).is_file():
            raise LoadError(f"{path}: the build is incomplete ({name} is missing); {hint}")
        if file_sha256(path / name) != files[name]:
            raise LoadError(f"{path}: the build is corrupted ({name} is not the file it built); {hint}")
    return manifest


def bind_package(ns: dict):
    """Fill a generated package's namespace with one Loss class per spec (and its aliases)."""
    here = Path(ns["__file__"]).parent
    manifest = ns.get("_manifest") or _manifest(here)  # `import NAME` from the build's parent
    try:
        kernels = importlib.import_module(ns["__name__"] + "._kernels")
    except ImportError as exc:
        raise LoadError(f"{here}: cannot import the compiled kernels ({exc}); rebuild with "
                        "`losscc build`") from None
    build = {"path": ns.get("_origin") or str(here), "cache_key": manifest["cache_key"]}
    classes = {}
    for meta in manifest["losses"]:
        cls = make_loss_class(meta, kernels.lib, kernels.ffi, build)
        classes[meta["name"]] = cls
        ns[meta["name"]] = cls
        for alias in meta["aliases"]:
            ns[alias] = cls
    ns["LOSSES"] = classes
    ns["_manifest"] = manifest
    ns["__all__"] = sorted(n for m in manifest["losses"] for n in (m["name"], *m["aliases"]))


def make_loss_class(meta: dict, lib, ffi, build: dict | None = None) -> type:
    """A Loss subclass for one spec, with its signature and docstring; `build` ({path,
    cache_key}) is where its objects say, when pickled, to load it from."""
    cname = meta["aliases"][0] if meta["aliases"] else meta["name"]
    defaults = {p["name"]: p["default"] for p in meta["params"]}
    defaults.update({v["name"]: v["default"] for v in meta["variants"]})
    defaults.update(weight=1.0, batch_axis=0)
    if meta["shape"] == "rows":
        defaults["axis"] = meta["axis"]
    # Positional order is the spec's (Gluon's order differs per loss); the rest keyword-only.
    positional = meta["positional"]
    ctor = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=defaults[n])
            for n in positional]
    ctor += [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=d)
             for n, d in defaults.items() if n not in positional]
    ctor.append(inspect.Parameter("reduction", inspect.Parameter.KEYWORD_ONLY, default="none"))
    required = [i for i in meta["inputs"] if i["default"] is None]
    optional = [i for i in meta["inputs"] if i["default"] is not None]
    call = [inspect.Parameter(i["name"], inspect.Parameter.POSITIONAL_OR_KEYWORD) for i in required]
    call.append(inspect.Parameter("sample_weight", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None))
    call += [inspect.Parameter(i["name"], inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None)
             for i in optional]
    attrs = {
        "__doc__": _docstring(meta),
        "__module__": "losscc.runtime",
        "__signature__": inspect.Signature(ctor),
        "_meta": meta, "_lib": lib, "_ffi": ffi, "_display": cname, "_build": build,
        "_ctor_sig": inspect.Signature(ctor), "_call_sig": inspect.Signature(call),
    }
    cls = type(cname, (Loss,), attrs)
    cls.__qualname__ = cname
    return cls


def _docstring(meta: dict) -> str:
    lines = [meta["summary"], ""]
    if meta["doc"]:
        lines += [meta["doc"], ""]
    if meta["shape"] == "rows":
        axis = "every non-batch axis" if meta["axis"] is None else f"axis={meta['axis']}"
        lines += [f"Row loss over the class axis ({axis} by default; spec {meta['spec']}):", ""]
    else:
        lines += ["Elementwise loss (spec " + meta["spec"] + "):", ""]
    lines += ["    " + ln for ln in meta["formula"].splitlines()] + [""]
    lines.append("Call: loss(" + ", ".join(
        [i["name"] for i in meta["inputs"] if i["default"] is None] + ["sample_weight=None"]
        + [f"{i['name']}=None" for i in meta["inputs"] if i["default"] is not None]) + ")")
    lines.append("Inputs:")
    for i in meta["inputs"]:
        extra = " (differentiable)" if i["differentiable"] else ""
        extra = " (differentiable, opt-in: wrt=...)" if i.get("optional_grad") else extra
        extra += " (a row along the class axis)" if i.get("row") else ""
        domain = f" in {i['domain']}" if i.get("domain", "real") != "real" else ""
        if i.get("index_into"):  # the domain is the row form's
            extra += f" (class indices, or a row{domain} where the variant uses it whole)"
            domain = ""
        extra += f" (optional, default {i['default']:g})" if i["default"] is not None else ""
        extra += domain
        lines.append(f"    {i['name']}{extra}" + (f": {i['doc']}" if i["doc"] else ""))
    lines.append("    (Domains are not checked: outside one, the loss is its written formula, "
                 "which may be NaN.)")
    if meta["params"]:
        lines.append("Parameters:")
        for p in meta["params"]:
            bounds = ", ".join(f"{k} {p[k]:g}" for k in ("min", "max", "gt", "lt") if p[k] is not None)
            lines.append(f"    {p['name']} = {p['default']:g}" + (f" ({bounds})" if bounds else "")
                         + (f": {p['doc']}" if p["doc"] else ""))
    if meta["variants"]:
        lines.append("Variants (each its own kernel):")
        for v in meta["variants"]:
            lines.append(f"    {v['name']} in {v['values']}, default {v['default']!r}"
                         + (f": {v['doc']}" if v["doc"] else ""))
    common = "axis, weight=1.0" if meta["shape"] == "rows" else "weight=1.0"
    lines.append(f"Common: {common}, batch_axis=0, reduction='none' | 'mean' | 'sum'.")
    notes = sorted({n for k in meta["kernels"].values() for n in k["notes"]})
    if notes:
        lines.append("Notes: " + "; ".join(notes) + ".")
    lines += ["", "Reference: " + meta["reference"]]
    if meta["examples"]:
        ex = meta["examples"][0]
        args = ", ".join(f"{k}={v!r}" for k, v in {**ex["options"], **ex["inputs"]}.items())
        lines.append(f"Example: {args} -> loss {ex['loss']!r}")
    return "\n".join(lines)


_BUILDS: dict = {}  # (path, cache key) -> module: unpickling loads each build once per process
_BUILDS_LOCK = threading.Lock()


def unpickle_loss(path: str, cache_key: str, name: str, arguments: dict):
    """A pickled loss, made again in this process from the build at `path` (loaded once), which
    must be the build it was pickled from."""
    with _BUILDS_LOCK:
        module = _BUILDS.get((path, cache_key))
        if module is None:
            module = _BUILDS[path, cache_key] = _load_pickled_build(path, cache_key)
    return module.LOSSES[name](**arguments)


def _load_pickled_build(path: str, cache_key: str):
    """The build a loss was pickled from: at its path, or else a folder of the same name on
    sys.path (where Dask's UploadDirectory(..., update_path=True, restart_workers=True)
    puts an uploaded build in each worker), with the same cache key."""
    import socket

    where = f"on host {socket.gethostname()!r}, pid {os.getpid()}"
    ways = ("make the build folder available at that path (a shared file system, or `losscc "
            "build` on the worker with the same specs and losscc version) or on the worker's "
            "sys.path under its name (Dask: client.register_plugin(UploadDirectory(build folder, "
            "update_path=True, restart_workers=True)))")
    try:
        found = _manifest(Path(path).resolve()).get("cache_key")
        error = None if found == cache_key else (
            f"the build at {path} has cache key {str(found)[:16]}..., the loss was pickled from "
            f"{cache_key[:16]}... (rebuilt since, or another build)")
    except LoadError as exc:
        error = f"the build {path} (cache key {cache_key[:16]}...) is not usable here ({exc})"
    if error is None:
        return load_module(path)
    name = Path(path).name
    for d in sys.path:
        with contextlib.suppress(LoadError, OSError):
            if d and Path(d).name == name and _manifest(Path(d).resolve()).get("cache_key") == cache_key:
                return load_module(d)
    raise LoadError(f"cannot unpickle a losscc loss {where}: {error}; {ways}")


# --------------------------------------------------------------------------- the Loss class


class Loss:
    """Base class of every compiled loss; see the subclass's docstring for its math."""

    _meta: dict
    _lib = None
    _ffi = None
    _display = "Loss"
    _ctor_sig: inspect.Signature
    _call_sig: inspect.Signature

    def __init__(self, *args, **kwargs):
        try:
            bound = self._ctor_sig.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"{self._display}(): {exc} (accepted: {self._ctor_sig})") from None
        bound.apply_defaults()
        a = bound.arguments
        # read-only: a new value is a new loss object (the fast path's plans depend on them)
        self.params = MappingProxyType({p["name"]: self._check_param(p, a[p["name"]])
                                        for p in self._meta["params"]})
        for inp in self._meta["inputs"]:  # a class to ignore is compared with int64 labels
            value = self.params.get(inp.get("ignore"))
            if value is not None and not (value.is_integer() and abs(value) < 2.0**53):
                raise ValueError(f"{self._display}: {inp['ignore']} must be an integer "
                                 f"(|value| < 2**53), got {value!r}")
        self.options = {v["name"]: self._check_variant(v, a[v["name"]]) for v in self._meta["variants"]}
        weight = 1.0 if a["weight"] is None else a["weight"]
        try:
            finite = _is_real(weight) and math.isfinite(weight)
        except OverflowError:
            finite = False
        if not finite:
            raise ValueError(f"{self._display}: weight must be a finite number, got {weight!r}")
        self.weight = float(weight)
        if not isinstance(a["batch_axis"], (numbers.Integral,)) or isinstance(a["batch_axis"], bool):
            raise TypeError(f"{self._display}: batch_axis must be an int, got {a['batch_axis']!r}")
        self.batch_axis = int(a["batch_axis"])
        if a["reduction"] not in REDUCTIONS:
            raise ValueError(f"{self._display}: reduction must be one of {', '.join(map(repr, REDUCTIONS))}, "
                             f"got {a['reduction']!r}")
        self.reduction = a["reduction"]
        self.variant = variant_key(self.options)
        kernels = self._meta["kernels"][self.variant]
        self._kernels = {key: getattr(self._lib, cname) for key, cname in kernels["names"].items()}
        plain = kernels.get("plain")  # row losses: the kernels for absent optional inputs
        self._plain = None if plain is None else (
            {key: getattr(self._lib, cname) for key, cname in plain["names"].items()},
            frozenset(plain["absent"]), dict(plain["fixed"]))
        self._inputs = self._meta["inputs"]
        self._diff = [i["name"] for i in self._inputs if i["differentiable"]]
        self._wrt = tuple(i["name"] for i in self._inputs if i["differentiable"] and not i.get("optional_grad"))
        self._rows = self._meta["shape"] == "rows"
        self._required = [i["name"] for i in self._inputs if i["default"] is None]
        self._plans: dict = {}  # (mode, shape, dtype) -> _Plan or None, for _fast
        if self._rows:
            self._kinds = kernels["kinds"]
            axis = a["axis"]
            if axis is not None and (not isinstance(axis, numbers.Integral) or isinstance(axis, bool)):
                raise TypeError(f"{self._display}: axis must be an int or None (every non-batch axis), "
                                f"got {axis!r}")
            self.axis = None if axis is None else int(axis)

    _CONFIG = frozenset({"weight", "batch_axis", "reduction", "axis", "params"})

    def _arguments(self) -> dict:
        """The constructor arguments that make this loss again (plain data)."""
        config = {**self.params, **self.options, "weight": self.weight, "batch_axis": self.batch_axis,
                  "reduction": self.reduction}
        if self._rows:
            config["axis"] = self.axis
        return config

    def _replace(self, **changes):
        """This loss made again from its constructor arguments, with `changes` (reduction='none',
        ...); the compiled kernels are shared."""
        return type(self)(**{**self._arguments(), **changes})

    def __copy__(self):
        return self._replace()

    def __deepcopy__(self, memo):  # (LightGBM deep-copies an objective)
        return self._replace()

    def __reduce__(self):
        """Pickled by reference, as plain data: the build's path and cache key, the loss's name
        and its constructor arguments (cffi's objects cannot be pickled). Unpickling loads
        the build once per process (unpickle_loss); it needs numpy, cffi and this runtime."""
        if self._build is None:
            raise TypeError(f"{self._display}: only a loss of a package built by losscc can be pickled")
        return unpickle_loss, (self._build["path"], self._build["cache_key"], self._meta["name"],
                               self._arguments())

    def __dask_tokenize__(self):
        """Dask's task key: the same for equal losses of one build, in any process."""
        return ("losscc", self._build and self._build["cache_key"], self._meta["name"],
                sorted(self._arguments().items()))

    def _kernel(self, key: str, given=()):
        """The kernel for `key` ('vg_float32', ...): the plain one (codegen: no optional
        input read, the params built in) where none of its absent inputs is in `given` and the
        params are the ones it was built for."""
        if self._plain is not None:
            fns, absent, fixed = self._plain
            if absent.isdisjoint(given) and all(self.params[n] == v for n, v in fixed.items()):
                return fns[key]
        return self._kernels[key]

    def __setattr__(self, name, value):
        if name in self._CONFIG:  # a plan made with the old value must not be used again
            self.__dict__["_plans"] = {}
        object.__setattr__(self, name, value)

    def _check_param(self, p, value):
        if not _is_real(value):
            raise TypeError(f"{self._display}: {p['name']} must be a number, got {value!r}")
        try:
            value = float(value)
        except OverflowError:
            raise ValueError(f"{self._display}: {p['name']} is beyond the range of double") from None
        why = bound_error(value, p["min"], p["max"], p["gt"], p["lt"])
        if why or not math.isfinite(value):
            raise ValueError(f"{self._display}: {p['name']} {why or f'must be finite, got {value!r}'}")
        return value

    def _check_variant(self, v, value):
        values = v["values"]
        if isinstance(values[0], bool):
            ok = isinstance(value, (bool, np.bool_))
            value = bool(value) if ok else value
        else:
            ok = isinstance(value, str)
        if not ok or value not in values:
            raise ValueError(f"{self._display}: {v['name']} must be one of "
                             f"{', '.join(map(repr, values))}, got {value!r}")
        return value

    def __repr__(self):
        opts = {**self.params, **self.options}
        if self.weight != 1.0:
            opts["weight"] = self.weight
        if self.batch_axis != 0:
            opts["batch_axis"] = self.batch_axis
        if self.reduction != "none":
            opts["reduction"] = self.reduction
        if self._rows and self.axis != self._meta["axis"]:
            opts["axis"] = self.axis
        return f"{self._display}({', '.join(f'{k}={v!r}' for k, v in opts.items())})"

    # -- public API ------------------------------------------------------------

    def __call__(self, *args, out=None, **kwargs):
        """The loss: per sample (reduction='none'), or its sum or mean."""
        if not kwargs:
            fast = self._fast("v", args, True, out)
            if fast is not None:
                return fast[0]
        value, _, _ = self._run("v", args, kwargs, out=out)
        return value

    def grad(self, *args, grad_out=None, wrt=None, **kwargs):
        """d loss / d pred (a tuple over the differentiable inputs if there are several;
        `wrt` names the inputs wanted, including opt-in ones)."""
        if wrt is None and not kwargs:
            fast = self._fast("vg", args, False, None, grad_out)
            if fast is not None:
                return fast[1]
        _, grads, _ = self._run("vg", args, kwargs, grad_out=grad_out, want_value=False, wrt=wrt)
        return grads

    def value_and_grad(self, *args, out=None, grad_out=None, wrt=None, **kwargs):
        """(loss, gradient) from one fused pass over the data."""
        if wrt is None and not kwargs:
            fast = self._fast("vg", args, True, out, grad_out)
            if fast is not None:
                return fast
        value, grads, _ = self._run("vg", args, kwargs, out=out, grad_out=grad_out, wrt=wrt)
        return value, grads

    def torch(self):
        """This loss as a torch.nn.Module whose forward runs the fused kernel once and whose
        backward scales the gradient it kept (losscc/torch.py; needs torch installed)."""
        from .torch import LossModule

        return LossModule(self)

    def plot(self, ax=None, x=None):
        """Draw this loss against the prediction over [-5, 5) (or `x`), the other inputs fixed
        as its spec says, with its gradient as a second curve, on matplotlib axes `ax` (new
        ones if None); returns the axes (losscc/plot.py; needs matplotlib)."""
        from .plot import draw

        return draw(self, ax, x)

    def xgboost_objective(self):
        """This loss as an XGBoost custom objective (losscc/boosting.py): gradient and second
        derivative per sample from one fused pass."""
        from .boosting import XGBoostObjective

        return XGBoostObjective(self)

    def lightgbm_objective(self):
        """This loss as a LightGBM custom objective (losscc/boosting.py)."""
        from .boosting import LightGBMObjective

        return LightGBMObjective(self)

    def dask(self, *args, **kwargs):
        """The loss over dask arrays, lazily (losscc/dask.py; needs losscc[dask]): per-sample
        values from one kernel call per block of the batch axis, or their sum or mean
        through Dask's tree reduction; the same arguments as calling the loss."""
        from .dask import apply

        return apply(self, "v", args, kwargs)

    def dask_grad(self, *args, wrt=None, **kwargs):
        """`grad` over dask arrays, lazily (losscc/dask.py)."""
        from .dask import apply

        return apply(self, "g", args, kwargs, wrt)

    def dask_value_and_grad(self, *args, wrt=None, **kwargs):
        """`value_and_grad` over dask arrays, lazily: both from one kernel call per block."""
        from .dask import apply

        return apply(self, "vg", args, kwargs, wrt)

    def dask_grad_hess(self, *args, **kwargs):
        """`grad_hess` over dask arrays, lazily: both from one kernel call per block."""
        if self._rows:
            raise TypeError(f"{self._display}: grad_hess is for elementwise losses (a row loss's "
                            "second derivative is not diagonal)")
        from .dask import apply

        return apply(self, "gh", args, kwargs)

    def grad_hess(self, *args, grad_out=None, hess_out=None, **kwargs):
        """(gradient, diagonal second derivative) w.r.t. pred, from one fused pass."""
        if self._rows:
            raise TypeError(f"{self._display}: grad_hess is for elementwise losses (a row loss's "
                            "second derivative is not diagonal)")
        _, grads, hess = self._run("vgh", args, kwargs, grad_out=grad_out, hess_out=hess_out,
                                   want_value=False)
        return (grads[0] if isinstance(grads, tuple) else grads), hess

    def _wanted(self, wrt) -> tuple:
        if wrt is None:
            return self._wrt
        try:
            names = (wrt,) if isinstance(wrt, str) else tuple(wrt)
        except TypeError:  # not iterable: wrt=5
            raise TypeError(f"{self._display}: wrt must name a differentiable input or a sequence "
                            f"of them (differentiable: {', '.join(self._diff)}), got {wrt!r}") from None
        for n in names:
            if n not in self._diff:
                raise ValueError(f"{self._display}: wrt={n!r} is not a differentiable input "
                                 f"(differentiable: {', '.join(self._diff)})")
        if len(set(names)) != len(names) or not names:
            raise ValueError(f"{self._display}: wrt must name distinct inputs, got {wrt!r}")
        return tuple(n for n in self._diff if n in names)

    # -- the common call, fast ---------------------------------------------------

    def _fast(self, mode, args, want_value, out=None, grad_out=None):
        """(value, gradients) for the common call -- the required inputs only, positional,
        C-contiguous arrays of the prediction's dtype and shape (class labels: int64, the
        shape without the class axis), batch axis 0 and a row loss's class axis last, and
        `out=`/`grad_out=` buffers that are C-contiguous, writable and apart from the rest --
        with what `_run` would work out per call looked up in a plan made once per (mode,
        shape, dtype); None for any other call, which `_run` then handles (errors
        included). The same kernel and arguments as `_run`: the same results, bit for bit."""
        if len(args) != len(self._required) or not args:
            return None
        pred = args[0]
        if pred.__class__ is not np.ndarray:
            return None
        key = (mode, pred.shape, pred.dtype)
        plan = self._plans.get(key, False)
        if plan is False:
            if len(self._plans) > 64:  # many shapes: plans are cheap to make again
                self._plans.clear()
            plan = self._plans[key] = _Plan.make(self, mode, pred.shape, pred.dtype)
        if plan is None:
            return None
        for a, (shape, dtype) in zip(args, plan.expect):
            if a.__class__ is not np.ndarray or a.dtype is not dtype or a.shape != shape \
                    or not a.flags.c_contiguous:
                return None
        return plan.run(self, args, want_value, out, grad_out)

    # -- the one code path -----------------------------------------------------

    def _bind(self, args, kwargs) -> dict:
        """The call's arguments by name (in the signature's order), or the TypeError saying
        what is wrong with them; None for a required input is one."""
        try:
            a = self._call_sig.bind(*args, **kwargs).arguments
        except TypeError as exc:
            raise TypeError(f"{self._display}: {exc} (call signature: {self._call_sig})") from None
        for name in self._required:  # None means "absent", which only optional inputs may be
            if a[name] is None:
                raise TypeError(f"{self._display}: {name} is required, got None")
        return a

    def _pred_axis(self, name, dtype, shape) -> int:
        """The prediction's batch axis, counted from 0, or the error for a prediction of
        this dtype and shape."""
        if dtype not in _DTYPES:
            raise TypeError(f"{self._display}: {name} must be float32 or float64, got {dtype}; "
                            f"convert it with .astype(np.float32) or .astype(np.float64)")
        if not shape:
            raise ValueError(f"{self._display}: {name} must have a batch axis, got a 0-d array")
        if not -len(shape) <= self.batch_axis < len(shape):
            raise ValueError(f"{self._display}: batch_axis={self.batch_axis} is out of range for {name} "
                             f"of shape {shape}")
        return self.batch_axis % len(shape)

    def _run(self, mode, args, kwargs, out=None, grad_out=None, hess_out=None, want_value=True,
             wrt=None, mean_over=None):
        """(value, gradients, second derivative) for any call. `mean_over` is the batch the
        gradients are averaged over (losscc/dask.py: the whole array's, when this call is
        one block of it); None: this call's batch under reduction='mean', else none."""
        a = self._bind(args, kwargs)
        wanted = self._wanted(wrt) if "g" in mode else ()
        if self._rows:
            return self._run_rows(mode, a, out, grad_out, want_value, wanted, mean_over)
        first = self._inputs[0]["name"]
        pred = _native(_as_array(a[first], first, self._display))
        axis = self._pred_axis(first, pred.dtype, pred.shape)
        dtype, shape = pred.dtype, pred.shape
        nb = shape[axis]
        nf = math.prod(shape) // nb if nb else math.prod(s for i, s in enumerate(shape) if i != axis)

        arrays = [(first, pred, shape)]
        for i, inp in enumerate(self._inputs[1:]):
            arrays.append(self._input(inp["name"], a.get(inp["name"]), inp["default"], dtype, shape,
                                      reshape_like_pred=(i == 0)))
        arrays.append(self._input("sample_weight", a.get("sample_weight"), 1.0, dtype, shape))

        vscale, gscale = self._scales(nb, nf, mean_over)
        sources = arrays + _caller_arrays(a)
        vout = self._value_out(out, want_value, nb, dtype, sources)
        gouts = []
        if "g" in mode:
            given = _as_tuple(grad_out, len(wanted), "grad_out", self._display)
            for name in self._diff:  # the kernel writes every gradient; the unwanted are dropped
                g = given[wanted.index(name)] if name in wanted else None
                gouts.append(_output(g, "grad_out", shape, dtype, sources, self._display, axis))
        hout = _output(hess_out, "hess_out", shape, dtype, sources, self._display, axis) \
            if "h" in mode else None
        _check_disjoint(self._display, [("out", vout), ("hess_out", hout),
                                        *(("grad_out", g) for g in gouts)])

        total = math.nan if (nb and not nf) else 0.0
        if nb and nf:
            total = self._launch(mode, dtype, axis, nb, nf, arrays, vscale, gscale, vout, gouts, hout)
        elif vout is not None and nb:
            vout.arr.fill(np.nan)  # the mean over zero features

        value = self._value(want_value, vout, total, nb, dtype)
        grads = None
        if gouts:
            shapes = [orig for name, _, orig in arrays if name in self._diff]
            grads = tuple(_unbroadcast(g.arr, orig) for g, orig, name in zip(gouts, shapes, self._diff)
                          if name in wanted)
            grads = grads[0] if len(grads) == 1 else grads
        return value, grads, (hout.arr if hout is not None else None)

    # -- shared by the elementwise and the row paths ---------------------------

    def _scales(self, nb, nf, mean_over=None):
        """(vscale, gscale): the per-sample mean over nf elements or rows times weight, and
        the gradients' scale (divided by the batch for reduction='mean', or by `mean_over`)."""
        vscale = self.weight / nf if nf else math.nan
        if mean_over is None:
            mean_over = nb if self.reduction == "mean" else 0
        return vscale, (vscale / mean_over if mean_over else vscale)

    def _value_out(self, out, want_value, nb, dtype, arrays):
        """The per-sample output buffer (reduction='none'), or None."""
        per_sample = want_value and self.reduction == "none"
        if out is not None and not per_sample:
            raise ValueError(f"{self._display}: out= holds per-sample values and needs reduction='none'")
        return _output(out, "out", (nb,), dtype, arrays, self._display, 0) if per_sample else None

    def _value(self, want_value, vout, total, nb, dtype):
        if not want_value:
            return None
        if self.reduction == "none":
            return vout.arr
        if self.reduction == "mean":
            return dtype.type(total / nb if nb else math.nan)
        return dtype.type(total)

    def _run_rows(self, mode, a, out, grad_out, want_value, wanted, mean_over=None):
        """The row-loss path: rows along `axis`, Gluon's weighting over the rows of a sample."""
        who = self._display
        first = self._inputs[0]["name"]
        pred = _native(_as_array(a[first], first, who))
        self._pred_axis(first, pred.dtype, pred.shape)
        layout = _RowLayout(who, first, pred.shape, self.batch_axis, self.axis)
        dtype, shape = pred.dtype, pred.shape
        nb, nf, nc = layout.nb, layout.nf, layout.nc
        ffi = self._ffi
        keep: list = []
        # (name, array as the kernel reads it, (shape given, shape broadcast from))
        arrays = [(first, pred, (shape, shape))]
        args = [get_num_threads(), nb, nf, nc, *layout.operand3(ffi, pred, keep)]
        for inp in self._inputs[1:]:
            name, kind = inp["name"], self._kinds[inp["name"]]
            value = a.get(name)
            if kind == "row":
                arr, orig = self._row_input(name, value, inp["default"], dtype, layout,
                                            like_pred=inp["default"] is None)
                args += layout.operand3(ffi, arr, keep)
            else:
                arr, given = self._per_row(name, value, inp["default"], dtype, layout, index=(kind == "index"))
                args += layout.operand2(ffi, arr, keep)
                orig = (given, given)
            arrays.append((name, arr, orig))
        sw, _ = self._per_row("sample_weight", a.get("sample_weight"), 1.0, dtype, layout, index=False)
        arrays.append(("sample_weight", sw, ((), ())))
        args += layout.operand2(ffi, sw, keep)
        args += list(self.params.values())

        vscale, gscale = self._scales(nb, nf, mean_over)
        sources = arrays + _caller_arrays(a)
        vout = self._value_out(out, want_value, nb, dtype, sources)
        gouts = {}
        if "g" in mode:
            given = _as_tuple(grad_out, len(wanted), "grad_out", who)
            for name, g in zip(wanted, given):
                gouts[name] = _output(g, "grad_out", shape, dtype, sources, who, None)
        _check_disjoint(who, [("out", vout), *(("grad_out", g) for g in gouts.values())])
        status = ffi.new("int64_t[4]")  # {code, sample, row, class index}
        args += [vscale, gscale]
        args += vout.operand(ffi, 0)[:2] if vout is not None else [ffi.NULL, 0]
        args.append(status)
        if "g" in mode:
            for name in self._diff:
                args += layout.output3(ffi, gouts[name]) if name in gouts else [ffi.NULL, 0, 0, 0]
        result = math.nan if (nb and not nf) else 0.0
        if nb and nf:
            given = [i["name"] for i in self._inputs if a.get(i["name"]) is not None]
            result = self._kernel(f"{mode}_{dtype.name}", given)(*args)
            if status[0] == 1:
                raise IndexError(layout.bad_index(self._inputs, self._kinds, arrays, status[1:4], self.params))
            if status[0] == 2:  # rows.c.j2: no memory for its per-block row buffers
                raise MemoryError(f"{who}: no memory for the kernel's row buffers ({nc} classes)")
            if status[0] != 0:
                raise RuntimeError(f"{who}: kernel returned status {status[0]}")
            for o in (vout, *gouts.values()):
                if o is not None:
                    o.finish()
        elif vout is not None and nb:
            vout.arr.fill(np.nan)  # the mean over zero rows
        value = self._value(want_value, vout, result, nb, dtype)
        grads = None
        if gouts:  # summed over the axes each input was broadcast along, in the caller's shape
            grads = tuple(_unbroadcast(_unbroadcast(gouts[n].arr, placed), given)
                          for n, _, (given, placed) in arrays if n in gouts)
            grads = grads[0] if len(grads) == 1 else grads
        return value, grads, None

    def _row_input(self, name, value, default, dtype, layout, like_pred):
        """A vector along the class axis, broadcast to the prediction's shape; returns it and
        (the shape given, the shape it was broadcast from). A required input with as many
        elements as pred is reshaped like pred (Gluon); a 1-D array of the class count lies
        along the class axis (per-class weights), whatever its position."""
        if value is None:
            return np.full((), default, dtype), ((), ())
        arr = _as_numeric(value, name, dtype, self._display)
        given = arr.shape
        if like_pred and arr.size == math.prod(layout.shape) and arr.shape != layout.shape:
            arr = arr.reshape(layout.shape)
        elif arr.ndim == 1 and layout.axis is not None and len(layout.shape) > 1 and arr.shape[0] == layout.nc:
            arr = arr.reshape([layout.nc if i == layout.axis else 1 for i in range(len(layout.shape))])
        return _broadcast(self._display, name, arr, layout.shape), (given, arr.shape)

    def _per_row(self, name, value, default, dtype, layout, index):
        """One number per row, broadcast to the rows' shape (the prediction's without its class
        axis; an array with the class axis kept at size 1 is accepted too). Class indices must
        hold integers and become int64."""
        who = self._display
        if value is None:
            return np.full((), default, np.int64 if index else dtype), ()
        arr = _as_array(value, name, who)
        orig = arr.shape
        if arr.dtype.kind not in "biuf":
            raise TypeError(f"{who}: {name} must hold real numbers, got dtype {arr.dtype}")
        if index:
            arr = _as_classes(who, name, arr)
        else:
            arr = arr.astype(dtype, copy=False)
        arr = layout.to_rows(name, arr)
        return arr, orig

    def _input(self, name, value, default, dtype, shape, reshape_like_pred=False):
        """(name, array broadcast to pred's shape, the shape the caller gave) for one input;
        an absent optional input is its default as a 0-d array (stride 0 in the kernel)."""
        if value is None:
            return name, np.full((), default, dtype), ()
        arr = _as_numeric(value, name, dtype, self._display)
        orig = arr.shape
        if reshape_like_pred and arr.size == math.prod(shape) and arr.shape != shape:
            arr = arr.reshape(shape)  # Gluon reshapes the label like pred when the sizes match
        return name, _broadcast(self._display, name, arr, shape), orig

    def _launch(self, mode, dtype, axis, nb, nf, arrays, vscale, gscale, vout, gouts, hout):
        ffi = self._ffi
        args = [get_num_threads(), nb, nf]
        keep = []  # contiguous copies must outlive the call: the kernel gets raw addresses
        for _, arr, _ in arrays:
            args += _operand(ffi, arr, axis, keep)
        args += list(self.params.values())
        args += [vscale, gscale]
        args += vout.operand(ffi, 0)[:2] if vout is not None else [ffi.NULL, 0]
        for g in gouts:
            args += g.operand(ffi, axis)
        if hout is not None:
            args += hout.operand(ffi, axis)
        total = self._kernels[f"{mode}_{dtype.name}"](*args)  # elementwise kernels cannot fail
        for o in (vout, hout, *gouts):
            if o is not None:
                o.finish()
        return total


# --------------------------------------------------------------------------- the fast path


class _Plan:
    """What `Loss._fast` calls a kernel with, for one (mode, shape, dtype): the kernel, the
    sizes, strides and scales, the shape and dtype each argument must have, and the absent
    inputs' defaults (read-only 0-d arrays, their addresses taken once: the from_buffer cdata
    keeps each alive). Immutable once made: one loss object may be called from many threads
    at once."""

    __slots__ = ("fn", "sizes", "strides", "expect", "slots", "tail", "vshape", "shape", "dtype",
                 "reduction", "grads", "wanted", "rows")

    @classmethod
    def make(cls, loss, mode, shape, dtype):
        ndim = len(shape)
        if dtype not in _DTYPES or not ndim or 0 in shape or loss.batch_axis not in (0, -ndim):
            return None  # _run's general path: other layouts, empty arrays
        self = cls()
        ffi = loss._ffi
        self.fn = loss._kernel(f"{mode}_{dtype.name}")  # optional inputs at their defaults
        self.rows = loss._rows
        self.shape, self.dtype, self.reduction = shape, dtype, loss.reduction
        nb = shape[0]
        if self.rows:  # (sample, row, class) with the class axis last (or every non-batch axis)
            if loss.axis is not None and (ndim < 2 or loss.axis not in (-1, ndim - 1)):
                return None
            nc = math.prod(shape[1:]) if loss.axis is None else shape[-1]
            nf = math.prod(shape[1:]) // nc  # (no size is 0 here)
            self.sizes = (nb, nf, nc)
            full, per_row = (nf * nc, nc, 1), (nf, 1 if nf > 1 else 0)
            row_shape = (nb,) if loss.axis is None else shape[:-1]
        else:
            nf = math.prod(shape) // nb
            self.sizes = (nb, nf)
            full = (nf, 1 if nf > 1 else 0)
        self.strides = full
        expect, self.slots = {}, []  # per input: its position in the call, or its default
        for inp in loss._inputs:
            kind = loss._kinds[inp["name"]] if self.rows else "full"
            if inp["default"] is None:
                position = loss._required.index(inp["name"])
                if kind in ("full", "row"):
                    self.slots.append((position, full))
                    expect[position] = (shape, dtype)
                else:
                    self.slots.append((position, per_row))
                    expect[position] = (row_shape, np.dtype(np.int64) if kind == "index" else dtype)
            else:
                d = np.full((), inp["default"], np.int64 if kind == "index" else dtype)
                d.flags.writeable = False
                self.slots.append((ffi.from_buffer(d), (0,) * (3 if kind == "row" else 2)))
        self.expect = [expect[i] for i in range(len(loss._required))]
        sw = np.full((), 1.0, dtype)
        sw.flags.writeable = False
        vscale, gscale = loss._scales(nb, nf)
        self.tail = [ffi.from_buffer(sw), 0, 0, *loss.params.values(), vscale, gscale]
        self.vshape = (nb,)
        wanted = loss._wrt
        if "g" not in mode:
            self.grads = ()
        elif self.rows:  # a row kernel skips the gradients it is given no buffer for
            self.grads = tuple(n in wanted for n in loss._diff)
        else:  # an elementwise kernel writes every gradient
            self.grads = (True,) * len(loss._diff)
        self.wanted = [i for i, n in enumerate(loss._diff) if n in wanted]
        return self

    def _buffer(self, given, shape, args):
        """A caller's output buffer this plan may write as it is, or None (then _run takes the
        call, and says what is wrong with the buffer if anything is)."""
        if given.__class__ is not np.ndarray or given.dtype is not self.dtype or given.shape != shape \
                or not given.flags.c_contiguous or not given.flags.writeable:
            return None
        for a in args:
            if np.may_share_memory(given, a):
                return None
        return given

    def run(self, loss, args, want_value, out=None, grad_out=None):
        if out is not None:
            if self.reduction != "none" or self._buffer(out, self.vshape, args) is None:
                return None
        if grad_out is not None:
            if len(self.wanted) != 1 or self._buffer(grad_out, self.shape, args) is None \
                    or (out is not None and np.may_share_memory(out, grad_out)):
                return None
        ffi = loss._ffi
        addr = ffi.from_buffer
        call = [get_num_threads(), *self.sizes]
        for slot, strides in self.slots:
            if slot.__class__ is int:
                call.append(addr(args[slot]))
            else:
                call.append(slot)  # an absent input's default
            call += strides
        call += self.tail
        vout = None
        if want_value and self.reduction == "none":
            vout = np.empty(self.vshape, self.dtype) if out is None else out
            call += (addr(vout), 1)
        else:
            call += (ffi.NULL, 0)
        if self.rows:
            status = ffi.new("int64_t[4]")
            call.append(status)
        grads = []
        for k, given in enumerate(self.grads):
            if given:
                g = grad_out if grad_out is not None and k == self.wanted[0] else np.empty(self.shape, self.dtype)
                grads.append(g)
                call.append(addr(g))
                call += self.strides
            else:
                grads.append(None)
                call += (ffi.NULL, 0, 0, 0)
        total = self.fn(*call)
        if self.rows and status[0] != 0:
            return None  # a bad class index: _run calls again and says where
        if vout is not None:
            value = vout
        elif want_value:
            value = self.dtype.type(total / self.sizes[0] if self.reduction == "mean" else total)
        else:
            value = None
        if not grads:
            return value, None
        if len(self.wanted) == 1:
            return value, grads[self.wanted[0]]
        return value, tuple(grads[i] for i in self.wanted)


# --------------------------------------------------------------------------- row layout


class _RowLayout:
    """Where the rows of a row loss are: the prediction's batch axis, class axis (or every
    non-batch axis when axis is None) and the rows in between, and the kernel's views."""

    def __init__(self, who, name, shape, batch_axis, axis):
        self.who, self.shape = who, tuple(shape)
        ndim = len(shape)
        if ndim == 0:
            raise ValueError(f"{who}: {name} must have a batch axis, got a 0-d array")
        if not -ndim <= batch_axis < ndim:
            raise ValueError(f"{who}: batch_axis={batch_axis} is out of range for {name} of shape {shape}")
        self.bax = batch_axis % ndim
        if axis is None:
            self.axis = None
            self.nc = math.prod(n for i, n in enumerate(shape) if i != self.bax)
            self.rows_shape = (shape[self.bax],)
            self.rows_bax = 0
        else:
            if ndim < 2 or not -ndim <= axis < ndim:
                raise ValueError(f"{who}: axis={axis} is out of range for {name} of shape {shape} "
                                 "(it needs a batch axis and a class axis)")
            self.axis = axis % ndim
            if self.axis == self.bax:
                raise ValueError(f"{who}: axis={axis} and batch_axis={batch_axis} are the same axis "
                                 f"of {name} (shape {shape})")
            self.nc = shape[self.axis]
            self.rows_shape = tuple(n for i, n in enumerate(shape) if i != self.axis)
            self.rows_bax = self.bax - (self.bax > self.axis)
        self.nb = shape[self.bax]
        self.nf = math.prod(self.rows_shape) // self.nb if self.nb else \
            math.prod(n for i, n in enumerate(self.rows_shape) if i != self.rows_bax)

    def view3(self, arr):
        """(sample, row, class) view of an array of the prediction's shape, or a copy."""
        if self.axis is None:
            moved = np.moveaxis(arr, self.bax, 0)
        else:
            moved = np.moveaxis(arr, (self.bax, self.axis), (0, -1))
        return moved.reshape(self.nb, self.nf, self.nc)

    def operand3(self, ffi, arr, keep):
        if arr.ndim == 0:  # an absent optional input: its default, stride 0 everywhere
            keep.append(arr)
            return [_address(ffi, arr), 0, 0, 0]
        v = _aligned(self.view3(arr), keep)
        return [_address(ffi, v), *_elem_strides(v)]

    def operand2(self, ffi, arr, keep):
        if arr.ndim == 0:  # an absent optional input: its default, stride 0 everywhere
            keep.append(arr)
            return [_address(ffi, arr), 0, 0]
        v = np.moveaxis(arr, self.rows_bax, 0).reshape(self.nb, self.nf)
        v = _aligned(v, keep)
        return [_address(ffi, v), *_elem_strides(v)]

    def output3(self, ffi, out: "_Out"):
        """The kernel's pointer and strides for a gradient output; a temporary when the
        output's memory cannot be walked as (sample, row, class) in whole elements (the
        kernel's strides count elements: unaligned memory, or a stride that is no multiple
        of the item size, would be written at the wrong addresses)."""
        if self.axis is None:
            moved = np.moveaxis(out.arr, self.bax, 0)
        else:
            moved = np.moveaxis(out.arr, (self.bax, self.axis), (0, -1))
        try:
            if not _whole_elements(out.arr):
                raise ValueError("not walkable in elements")
            v = np.reshape(moved, (self.nb, self.nf, self.nc), copy=False)
        except ValueError:  # written batch-first, copied back by out.finish()
            out.view, out.tmp = moved, np.empty(moved.shape, out.arr.dtype)
            v = out.tmp.reshape(self.nb, self.nf, self.nc)
        return [_address(ffi, v), *_elem_strides(v)]

    def to_rows(self, name, arr):
        """A per-row array broadcast to the rows' shape."""
        full = self.shape
        if arr.ndim == len(full) and self.axis is not None:
            if arr.shape[self.axis] != 1:
                raise ValueError(f"{self.who}: {name} of shape {arr.shape} must have size 1 along the "
                                 f"class axis {self.axis} (or leave that axis out), prediction shape {full}")
            arr = np.squeeze(arr, self.axis)
        elif self.axis is None and arr.ndim == len(full) and arr.ndim > 1:
            others = [n for i, n in enumerate(arr.shape) if i != self.bax]
            if any(n != 1 for n in others):
                raise ValueError(f"{self.who}: {name} of shape {arr.shape} must have one value per "
                                 f"sample (prediction shape {full})")
            arr = np.moveaxis(arr, self.bax, 0).reshape(arr.shape[self.bax])
        return _broadcast(self.who, name, arr, self.rows_shape)

    def bad_index(self, inputs, kinds, arrays, bad, params) -> str:
        """The IndexError message for the kernel's report bad = {sample, row, class}."""
        b, f, value = int(bad[0]), int(bad[1]), int(bad[2])
        others = [n for i, n in enumerate(self.rows_shape) if i != self.rows_bax]
        rest = list(np.unravel_index(f, others)) if others else []
        idx = tuple(rest[:self.rows_bax]) + (b,) + tuple(rest[self.rows_bax:])
        flat = int(np.ravel_multi_index(idx, self.rows_shape)) if self.rows_shape else 0
        names = [i["name"] for i in inputs if kinds.get(i["name"]) == "index"]
        name, given = names[0], None
        for n in names:  # the input whose class at this row is the reported one
            arr, (given, _) = next((arr, orig) for m, arr, orig in arrays if m == n)
            if int(arr[idx]) == value:
                name = n
                break
        if given is not None:  # the position in the label as the caller gave it
            if len(given) == len(self.shape) and self.axis is not None:
                idx = idx[:self.axis] + (0,) + idx[self.axis:]  # the class axis kept, size 1
            else:
                idx = idx[len(idx) - len(given):] if given else ()
            idx = tuple(0 if n == 1 else i for i, n in zip(idx, given))  # broadcast axes
            flat = int(np.ravel_multi_index(idx, given)) if given else 0
        ignore = next((i["ignore"] for i in inputs if i["name"] == name), None)
        hint = f" (and not {params[ignore]:g}, the ignore_index)" if ignore else ""
        where = f"[{', '.join(map(str, idx))}]" if idx else " (0-d)"
        return (f"{self.who}: {name}{where} (flat position {flat}) = {value} is "
                f"outside [0, {self.nc}){hint}")


def _whole_elements(v) -> bool:
    """Whether the kernel can walk `v` with strides in elements: aligned memory and every
    stride a multiple of the item size."""
    return v.flags.aligned and not any(st % v.itemsize for st in v.strides)


def _aligned(v, keep):
    """`v`, or an aligned copy (kept alive in `keep`) if its memory is not element-aligned."""
    if not _whole_elements(v):
        v = np.ascontiguousarray(v)
    keep.append(v)
    return v


def _address(ffi, arr):
    """The address of arr's first element, for a `void *` kernel argument. from_buffer is
    ten times faster than arr.ctypes.data and keeps arr alive, but needs contiguous memory."""
    if arr.flags.c_contiguous:
        return ffi.from_buffer(arr)
    return ffi.cast("void *", arr.ctypes.data)


def _elem_strides(v):
    return [st // v.itemsize for st in v.strides]


def _as_classes(who, name, arr):
    """Class indices as int64: integers as they are, floats only when they hold integers."""
    if arr.dtype.kind == "b":
        raise TypeError(f"{who}: {name} holds class indices: got booleans")
    if arr.dtype.kind == "f":
        bad = ~np.isfinite(arr) | (arr != np.round(arr)) if arr.size else np.zeros(arr.shape, bool)
        if bad.any():
            pos = int(np.flatnonzero(bad)[0])
            raise ValueError(f"{who}: {name} holds class indices, but {name}.flat[{pos}] = "
                             f"{float(arr.flat[pos])!r} is not an integer")
        if arr.size and float(np.abs(arr).max()) >= 2.0**63:  # (2**63 as a float16 would overflow)
            pos = int(np.argmax(np.abs(arr)))
            raise IndexError(f"{who}: {name}.flat[{pos}] = {float(arr.flat[pos])!r} is not a valid class index")
    elif arr.dtype.kind == "u" and arr.size and arr.max() > np.iinfo(np.int64).max:
        pos = int(np.argmax(arr))
        raise IndexError(f"{who}: {name}.flat[{pos}] = {arr.flat[pos]} is not a valid class index")
    return arr.astype(np.int64, copy=False)


# --------------------------------------------------------------------------- array helpers


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_))


def _as_array(x, name, who):
    try:
        return np.asarray(x)
    except Exception as exc:  # ragged lists and the like
        raise TypeError(f"{who}: {name} cannot be read as an array: {exc}") from None


def _native(arr):
    """The array in the machine's byte order (a big-endian file read on x86 works too)."""
    return arr if arr.dtype.isnative else arr.astype(arr.dtype.newbyteorder("="))


def _as_numeric(x, name, dtype, who):
    arr = _as_array(x, name, who)
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"{who}: {name} must hold real numbers, got dtype {arr.dtype}")
    return arr.astype(dtype, copy=False)


def _broadcast(who, name, arr, shape):
    try:
        return np.broadcast_to(arr, shape)
    except ValueError:
        raise ValueError(f"{who}: {name} of shape {arr.shape} does not broadcast to the prediction's "
                         f"shape {shape}") from None


def _collapse(arr, axis):
    """(stride over samples, stride over features) in elements, or None if the non-batch
    axes of `arr` cannot be walked with one stride."""
    if not _whole_elements(arr):
        return None
    item = arr.itemsize
    strides = [s // item for s in arr.strides]
    sb = strides[axis] if arr.ndim else 0
    rest = [(n, s) for i, (n, s) in enumerate(zip(arr.shape, strides)) if i != axis and n != 1]
    if not rest:
        return sb, 0
    for (_, s0), (n1, s1) in zip(rest, rest[1:]):
        if s0 != s1 * n1:
            return None
    return sb, rest[-1][1]


def _operand(ffi, arr, axis, keep: list):
    """(pointer, stride over samples, stride over features) for a read-only operand; any
    copy made is appended to `keep`, which the caller holds until the kernel returns."""
    if arr.ndim == 0:
        if not arr.flags.aligned:
            arr = np.array(arr)
            keep.append(arr)
        return [_address(ffi, arr), 0, 0]
    st = _collapse(arr, axis)
    if st is None:  # unaligned, or a broadcast mixing zero and non-zero feature strides
        arr = np.array(np.moveaxis(arr, axis, 0), order="C")  # a fresh, aligned copy
        keep.append(arr)
        st = _collapse(arr, 0)
    return [_address(ffi, arr), st[0], st[1]]


class _Out:
    """An output array: the user's `out=` buffer or a new one. The kernel writes it in place
    when its non-batch axes can be walked with one stride, else a batch-first temporary that
    finish() copies back."""

    def __init__(self, arr):
        self.arr = arr
        self.tmp = None
        self.view = None

    def operand(self, ffi, axis):
        st = _collapse(self.arr, axis)
        target = self.arr
        if st is None:
            self.view = np.moveaxis(self.arr, axis, 0)
            self.tmp = target = np.empty(self.view.shape, self.arr.dtype)
            st = _collapse(target, 0)
        return [_address(ffi, target), st[0], st[1]]

    def finish(self):
        if self.tmp is not None:
            self.view[...] = self.tmp
            self.tmp = self.view = None


def _output(given, what, shape, dtype, arrays, who, axis) -> _Out:
    if given is None:
        arr = np.empty(shape, dtype)
        if axis is not None and _collapse(arr, axis) is None:  # batch axis inside: allocate batch-first, return a view
            arr = np.moveaxis(np.empty((shape[axis], *np.delete(shape, axis)), dtype), 0, axis)
        return _Out(arr)
    if not isinstance(given, np.ndarray):
        raise TypeError(f"{who}: {what} must be a numpy array, got {type(given).__name__}")
    if given.shape != tuple(shape) or given.dtype != dtype:
        raise ValueError(f"{who}: {what} must have shape {tuple(shape)} and dtype {dtype}, "
                         f"got shape {given.shape} and dtype {given.dtype}")
    if not given.flags.writeable:
        raise ValueError(f"{who}: {what} is read-only")
    if any(st == 0 and n > 1 for st, n in zip(given.strides, given.shape)):
        raise ValueError(f"{who}: {what} has a zero stride: its elements overlap each other")
    if _self_overlapping(given):
        raise ValueError(f"{who}: {what} has strides {given.strides} under which its elements "
                         "overlap each other")
    for name, arr, _ in arrays:
        if np.may_share_memory(given, arr):
            raise ValueError(f"{who}: {what} overlaps the input '{name}'")
    return _Out(given)


def _caller_arrays(bound: dict) -> list:
    """The caller's own input arrays, as (name, array, None): an input cast to pred's dtype is
    a copy, so an output must be checked against the memory the caller gave as well."""
    return [(n, v, None) for n, v in bound.items() if isinstance(v, (np.ndarray, memoryview))]


def _self_overlapping(arr) -> bool:
    """Whether two elements of `arr` share a byte (a view made with as_strided, say): the
    kernel would write them both, and which value is left would depend on its order."""
    dims = sorted((abs(st), n) for st, n in zip(arr.strides, arr.shape) if n > 1)
    if arr.size == 0:
        return False
    reach = arr.itemsize  # bytes spanned by one element, then by the axes of smaller strides
    for st, n in dims:
        if st < reach:
            break
        reach += st * (n - 1)
    else:
        return False  # every axis steps over all the smaller ones: no two elements meet
    offsets = np.zeros((), np.int64)  # strides that interleave: look at every element
    for st, n in zip(arr.strides, arr.shape):
        offsets = np.add.outer(offsets, np.arange(n, dtype=np.int64) * st)
    offsets = np.sort(offsets, axis=None)
    return bool(np.any(np.diff(offsets) < arr.itemsize))


def _check_disjoint(who, outs):
    """The kernel writes every output in one pass: two that share memory would race."""
    outs = [(name, o.arr) for name, o in outs if o is not None]
    for i, (n1, a1) in enumerate(outs):
        for n2, a2 in outs[i + 1:]:
            if np.may_share_memory(a1, a2):
                raise ValueError(f"{who}: {n1} and {n2} share memory")


def _as_tuple(x, n, what, who):
    if x is None:
        return (None,) * n
    if n == 1:
        return (x,)
    if not isinstance(x, (tuple, list)) or len(x) != n:
        raise TypeError(f"{who}: {what} must be {'an array' if n == 1 else f'a tuple of {n} arrays'}")
    return tuple(x)


def _unbroadcast(g, shape):
    """Sum a gradient over the axes its input was broadcast along (like autograd's sum_to_size),
    in double: a float32 sum would add a rounding per term to the kernel's one per element."""
    if g.shape == shape:
        return g
    if math.prod(shape) == g.size:
        return g.reshape(shape)  # the label was reshaped like pred
    lead = g.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(lead + i for i, n in enumerate(shape) if n == 1 and g.shape[lead + i] != 1)
    if not axes:
        return g
    return g.sum(axis=axes, keepdims=True, dtype=np.float64).astype(g.dtype).reshape(shape)
