"""Build stage: specs -> derived, generated and compiled module under build/<name>/.

Incremental: the module's cache key hashes every spec, the templates, the compiler flags, the
source of losscc's compiler stages and the versions of sympy, cffi and the Python ABI; an
unchanged rebuild does nothing.
Each loss's generated C is cached on its own (build/.cache/), so editing one spec re-derives
only that spec. Atomic: every build compiles into a fresh folder .<name>-<key>-<nonce>/ and
publishes it by swapping the symlink <name> -> that folder with one rename, so a failed,
killed or concurrent build never leaves a broken module behind. The folder published
before stays until the next build (a process may be importing from it); older ones go.
Concurrent builds share the caches but never depend on another build's files staying
there: each build hard-links the cached objects it uses into its own work folder first,
so another build may evict them (a build evicts every object of its module it did not
use) and nothing is lost but a cache hit. The manifest records each executable file's
SHA-256, checked on load (runtime._manifest), so a corrupted build is an error, not a crash.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__
from .errors import BuildError, SpecError
from .ir import MANIFEST_FORMAT, KernelSource, LossSpec, manifest_checksum
from .resources import compiler_hash, file_sha256, templates_hash, usable_cores
from .spec import load_spec, spec_files

# Flags that keep IEEE values: -fno-math-errno and -fno-trapping-math only drop errno and
# floating-point exception flags (nothing reads them), which lets GCC if-convert branches
# and vectorize; -std=c99 keeps fp contraction off (the compensated sums rely on it).
# -fopenmp-simd: `omp simd` loops may vectorize their sums (no OpenMP runtime is linked);
# -fno-tree-pre: partial redundancy elimination otherwise moves lcc_exp's table loads under
# a condition (the clamp of its argument), and GCC cannot vectorize a masked gather: without it,
# no `omp simd` loop that calls exp vectorized. -pthread: lcc_run's threads.
CFLAGS = ("-O2", "-std=c99", "-fno-math-errno", "-fno-trapping-math", "-fno-tree-pre", "-fopenmp-simd",
          "-pthread")
LDFLAGS = ("-pthread",)
MANIFEST = "manifest.json"
STALE_SECONDS = 60  # an unused build folder older than this is removed by the next build
UNUSED_DERIVATION_SECONDS = 7 * 86400  # a cached derivation of a loss not built for a week goes


@dataclass
class BuildReport:
    path: Path
    cache_key: str
    status: str  # "built" or "up to date"
    # per loss, in spec order: name, status ('derived', 'cached' or 'up to date'), variants,
    # kernels, derive_seconds, objects compiled / cached, compile_seconds (compiler time)
    losses: list = field(default_factory=list)
    seconds: float = 0.0

    def table(self) -> str:
        """The losses, their kernels and timings, one row each (what `losscc build` ends with)."""
        rows = [("loss", "variants", "kernels", "derive", "compile")]
        for r in self.losses:
            derive = f"{r['derive_seconds']:.2f} s" if r["status"] == "derived" else r["status"]
            compile_ = (f"{r['compile_seconds']:.1f} s ({r['objects_compiled']} obj)" if r["objects_compiled"]
                        else "cached" if r["objects_cached"] else "up to date")
            rows.append((r["name"], str(r["variants"]), str(r["kernels"]), derive, compile_))
        widths = [max(len(row[i]) for row in rows) for i in range(5)]
        return "\n".join("  " + row[0].ljust(widths[0]) + "".join(f"  {c:>{w}}" for c, w in zip(row[1:], widths[1:]))
                         for row in rows)

    def to_json(self) -> dict:
        return {"path": str(self.path), "status": self.status, "cache_key": self.cache_key,
                "seconds": round(self.seconds, 3), "losses": self.losses}


def build(paths, out="build", name="losses", force=False, log=print, verbose=False) -> BuildReport:
    """Build every spec under `paths` into the package out/name; returns what happened."""
    try:
        return _build(paths, Path(out), name, force, log, verbose)
    except OSError as exc:  # a read-only folder, a full disk: say which file, not a traceback
        where = exc.filename or out
        raise BuildError(f"cannot build under {where}: {exc.strerror or exc}") from None


def _build(paths, out: Path, name: str, force: bool, log, verbose: bool) -> BuildReport:
    if not (name.isascii() and name.isidentifier()) or name.startswith("_"):
        raise BuildError(f"--name '{name}' must be an ASCII Python identifier not starting with '_'")
    t0 = time.perf_counter()
    specs = [load_spec(f) for f in spec_files(paths)]
    _check_unique(specs)
    target = out / name
    manifest = _read_manifest(target)
    if manifest is None and target.exists() and not target.is_symlink():
        raise BuildError(f"{target} exists and is not a losscc build: choose another --out or "
                         "--name, or remove it")
    key = cache_key(specs)
    report = BuildReport(path=target, cache_key=key, status="up to date")
    if not force and manifest is not None and manifest.get("cache_key") == key \
            and (target / manifest.get("extension", "")).is_file():
        built = {m["spec"]: m for m in manifest.get("losses", [])}
        for s in specs:
            log(f"  {s.name}: up to date")
            meta = built.get(s.path, {})
            kernels = meta.get("kernels", {}).values()
            report.losses.append(_record(s.name, "up to date", len(kernels), sum(
                len(k.get("names", {})) + len((k.get("plain") or {}).get("names", {})) for k in kernels)))
        report.seconds = time.perf_counter() - t0
        log(f"{target}: up to date ({_plural(len(specs), 'loss')}, {report.seconds:.2f} s)")
        return report

    out.mkdir(parents=True, exist_ok=True)
    lock = threading.Lock()  # progress lines come from the compiling threads too

    def say(text):
        with lock:
            log(text)

    work = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-{os.getpid()}-", dir=out))  # this build's own files
    objects = _Objects(out / ".cache" / "obj" / name, work / "obj", force, say)
    t1 = time.perf_counter()
    try:  # each loss compiles on the other cores while the next one is derived
        sources = []
        for s in specs:
            t = time.perf_counter()
            source, status = _generate_cached(s, out / ".cache", force, say, verbose)
            sources.append(source)
            report.losses.append(_record(s.name, status, len(source.meta["kernels"]), source.cdef.count(";"),
                                         time.perf_counter() - t))
            objects.submit(sources[-1], report.losses[-1])
        folder = _compile(sources, out, name, key, objects.wait(), work)
        objects.evict_unused()
    finally:
        objects.close()
        shutil.rmtree(work, ignore_errors=True)
    n_kernels = sum(s.cdef.count(";") for s in sources)
    log(f"  compiled {n_kernels} kernels in {time.perf_counter() - t1:.1f} s, derivations included "
        f"({objects.fresh} of {_plural(len(sources), 'loss')} recompiled)")
    previous = _publish(folder, target)
    _remove_stale(out, name, keep={folder.name, previous}, losses={s.name for s in specs})
    report.status = "built"
    report.seconds = time.perf_counter() - t0
    log(report.table())
    log(f"{target}: built {_plural(len(specs), 'loss')} in {report.seconds:.1f} s")
    return report


def _record(name, status, variants, kernels, derive_seconds=0.0) -> dict:
    """One loss's line of the build report (BuildReport.losses)."""
    return {"name": name, "status": status, "variants": variants, "kernels": kernels,
            "derive_seconds": round(derive_seconds, 3), "objects_compiled": 0, "objects_cached": 0,
            "compile_seconds": 0.0}


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "es" if word.endswith("s") else "s")


def cache_key(specs: list[LossSpec]) -> str:
    h = hashlib.sha256()
    # setuptools compiles with the CC and *FLAGS of the environment: they change the kernels
    env = [f"{v}={os.environ.get(v, '')}" for v in ("CC", "CFLAGS", "CPPFLAGS", "LDFLAGS")]
    for part in (__version__, compiler_hash(), _version("sympy"), _version("cffi"),
                 sysconfig.get_config_var("EXT_SUFFIX"), sysconfig.get_config_var("CC"), *env,
                 " ".join(CFLAGS + LDFLAGS), templates_hash()):
        h.update(str(part).encode() + b"\0")
    for s in specs:
        h.update(f"{s.path}\0{s.source_hash}\0".encode())
    return h.hexdigest()


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


def _check_unique(specs):
    seen: dict = {}
    for s in specs:
        for n, loc in ((s.name, s.loc), *zip(s.aliases, s.alias_locs)):
            if n in seen:
                raise SpecError(loc, f"loss name '{n}' is already used by {seen[n]}")
            seen[n] = f"{s.path} ({s.name})"


def _generate_cached(spec: LossSpec, cache: Path, force: bool, log, verbose=False) -> tuple:
    """(KernelSource, 'derived' or 'cached'): derive and generate one loss, or reuse the cached
    result for the same spec bytes."""
    h = hashlib.sha256(f"{__version__}\0{compiler_hash()}\0{_version('sympy')}\0{templates_hash()}\0"
                       f"{spec.path}\0{spec.source_hash}".encode()).hexdigest()
    entry = cache / f"{spec.name}-{h[:24]}.json"
    for stale in cache.glob(f"{spec.name}-*.json"):  # older derivations of this loss ('-' is
        if stale != entry:                             # never in a loss name)
            with contextlib.suppress(OSError):
                stale.unlink()
    if not force and entry.is_file():
        try:
            data = json.loads(entry.read_text())
            with contextlib.suppress(OSError):
                os.utime(entry)  # in use: _remove_stale keeps it
            log(f"  {spec.name}: cached")
            return KernelSource(**data), "cached"
        except (OSError, ValueError, TypeError):
            pass  # a broken cache entry is simply rebuilt
    t = time.perf_counter()
    from .codegen import generate
    from .derive import derive

    source = generate(derive(spec))
    log(f"  {spec.name}: derived ({time.perf_counter() - t:.2f} s)")
    if verbose:
        for key, k in source.meta["kernels"].items():
            log(f"    [{key}] d/d{spec.pred.name}: {k['gradient'][0]}")
            log(f"    [{key}] d2/d{spec.pred.name}2: {k['hessian']}")
    cache.mkdir(parents=True, exist_ok=True)
    _write_atomic(entry, json.dumps(source.__dict__))
    return source, "derived"


def _compile(sources, out: Path, name: str, key: str, objects: list[Path], work: Path) -> Path:
    """Link the objects into a fresh hidden folder and return it, complete, or raise BuildError.

    Each loss is its own translation unit (the prelude and its kernels), compiled to an
    object file by the C compiler directly, all of them at once on every core, and cached
    under out/.cache/obj/<name> by a hash of its source and the compiler command: editing one spec
    recompiles one object. cffi then compiles only its small wrapper and links the objects.
    """
    import cffi

    from .codegen import module_source, template_env

    c_source, cdef = module_source(sources, name, key)
    final = out / f".{name}-{key[:16]}-{work.name.rsplit('-', 1)[-1]}"  # unique per build
    ffi = cffi.FFI()
    try:
        ffi.cdef(cdef)
    except (cffi.CDefError, cffi.FFIError) as exc:
        raise BuildError(f"internal: generated cffi declarations are invalid: {exc}") from None
    # the wrapper sees the kernels' prototypes only; their code is in the objects
    # (-O0 -g0: argument conversion only, which Python's own -O3 -g takes seconds over)
    ffi.set_source(f"{name}._kernels", "#include <stdint.h>\n" + cdef,
                   extra_objects=[str(o.resolve()) for o in objects],
                   extra_compile_args=["-O0", "-g0"], extra_link_args=list(LDFLAGS))
    with _captured_stderr() as err:
        try:
            so = Path(ffi.compile(tmpdir=str(work / "cffi"), verbose=False))
        except Exception as exc:  # distutils/setuptools CompileError, LinkError, VerificationError
            raise BuildError(f"C compiler failed: {_first_error(err.read()) or exc}") from None
    pkg = work / "pkg"
    pkg.mkdir()
    shutil.copy2(so, pkg / so.name)
    (pkg / "kernels.c").write_text(c_source)
    (pkg / "__init__.py").write_text(template_env().get_template("package.py.j2").render(
        name=name, version=__version__, cache_key=key, losses=[s.meta for s in sources]))
    manifest = {
        "format": MANIFEST_FORMAT, "losscc_version": __version__, "module": name, "cache_key": key,
        "extension": so.name, "python": sysconfig.get_config_var("EXT_SUFFIX"),
        # what load checks before it runs anything of the build
        "files": {f: file_sha256(pkg / f) for f in ("__init__.py", so.name)},
        "losses": [s.meta for s in sources],
    }
    manifest["checksum"] = manifest_checksum(manifest)
    (pkg / MANIFEST).write_text(json.dumps(manifest, indent=1))
    os.rename(pkg, final)
    return final


def compiler_command() -> list[str]:
    """The C compiler and flags for a kernel object: $CC (else Python's), position-independent
    code, CFLAGS, then $CPPFLAGS and $CFLAGS from the environment (as setuptools adds them)."""
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    pic = sysconfig.get_config_var("CCSHARED") or "-fPIC"
    return [*shlex.split(cc), *shlex.split(pic), *CFLAGS,
            *shlex.split(os.environ.get("CPPFLAGS", "")), *shlex.split(os.environ.get("CFLAGS", ""))]


class _Objects:
    """One object file per loss variant: from the cache, or compiled on a pool of threads
    (each runs the C compiler in a subprocess) as soon as the loss is generated.

    `cache` holds one module's objects, shared by every build of it; `own` is this build's
    folder, where each object it uses is hard-linked (copied where links are not possible)
    before the link step, so a concurrent build evicting it from the cache takes nothing away.
    An object another module built into the same folder has cached (the same source and
    compiler command: `losscc check` after `losscc build`, say) is linked into this module's
    cache rather than compiled again; each module evicts only its own links.
    """

    def __init__(self, cache: Path, own: Path, force: bool = False, log=lambda text: None):
        from concurrent.futures import ThreadPoolExecutor

        self.cache, self.own, self.force, self.cmd, self.log = cache, own, force, compiler_command(), log
        self.pool = ThreadPoolExecutor(max_workers=usable_cores())
        self.items: list = []  # (this build's object path, future or None), in spec order
        self.used: set = set()  # names of the cached objects this build uses
        self.fresh = 0

    def submit(self, source: KernelSource, record: dict):
        """Queue the loss's objects: one per variant (KernelSource.c_parts); `record` (its
        line of the build report) gets their count and compiler time, and a progress line is
        logged when the last of them is done."""
        from .codegen import object_source

        self.cache.mkdir(parents=True, exist_ok=True)
        self.own.mkdir(parents=True, exist_ok=True)
        objs, futures = [], []
        for i, part in enumerate(source.c_parts or (source.c_source,)):
            text = object_source(dataclasses.replace(source, c_source=part))
            h = hashlib.sha256("\0".join([*self.cmd, text]).encode()).hexdigest()[:24]
            obj, own = self.cache / f"{source.name}-{i}-{h}.o", self.own / f"{source.name}-{i}.o"
            future = None
            if self.force or not (_pin(obj, own) or (self._borrow(obj) and _pin(obj, own))):
                future = self.pool.submit(_compile_object, self.cmd, source, text, obj, own)
                futures.append(future)
            objs.append(own)
            self.items.append((own, future))
            self.used.add(obj.name)
        record["objects_cached"] = len(objs) - len(futures)
        record["objects_compiled"] = len(futures)
        left = [len(futures)]
        lock = threading.Lock()

        def done(future):
            error, seconds = future.result()
            with lock:
                record["compile_seconds"] = round(record["compile_seconds"] + seconds, 3)
                left[0] -= 1
                last = left[0] == 0
            if last and not error:
                self.log(f"  {source.name}: compiled {_plural(len(futures), 'object')} "
                         f"({record['compile_seconds']:.1f} s of compiler time)")

        for future in futures:
            future.add_done_callback(done)
        self.fresh += bool(futures)

    def _borrow(self, obj: Path) -> bool:
        """Link `obj` into this module's cache from another module's, if one has it."""
        return any(_pin(other, obj) for other in self.cache.parent.glob(f"*/{obj.name}")
                   if other.parent != self.cache)

    def evict_unused(self):
        """Remove the module's cached objects this build did not use (older versions of its
        losses, removed losses) and compiler leftovers of killed builds."""
        now = time.time()
        old_layout = self.cache.parent.glob("*.o")  # every module's objects in one folder
        for p in [*self.cache.iterdir(), *old_layout]:
            with contextlib.suppress(OSError):
                if p.name.startswith("."):  # a compile in progress, or left by a killed build
                    if _abandoned(p, now):
                        p.unlink()
                elif p.name not in self.used:
                    p.unlink()

    def wait(self) -> list[Path]:
        """Every object, or BuildError with the first failure in spec order."""
        errors = [f.result()[0] for _, f in self.items if f is not None]
        first = next((e for e in errors if e), None)
        if first:
            raise BuildError(first)
        return [obj for obj, _ in self.items]

    def close(self):
        self.pool.shutdown(wait=True, cancel_futures=True)


def _pin(obj: Path, own: Path) -> bool:
    """Link the cached object `obj` to `own` (this build's copy); False if it is not cached."""
    try:
        os.link(obj, own)
    except FileNotFoundError:
        return False
    except FileExistsError:  # (a concurrent build put the same object there first)
        return True
    except OSError:  # no hard links on this file system: a copy holds it as well
        try:
            shutil.copyfile(obj, own)
        except FileNotFoundError:
            return False
    return True


def _compile_object(cmd, source, text: str, obj: Path, own: Path) -> tuple:
    """Compile one loss's translation unit into the cache at `obj` and this build's `own`:
    (None, or the error message naming its spec or the file that could not be written; the
    compiler's seconds). It runs on a pool thread, so it returns its errors, never raises."""
    src = obj.with_name(f".{obj.stem}.{os.getpid()}.{threading.get_ident()}.c")
    tmp = src.with_suffix(".o")
    t = time.perf_counter()
    try:
        src.write_text(text)
        try:
            run = subprocess.run([*cmd, "-c", str(src), "-o", str(tmp)], capture_output=True, text=True)
        except OSError as exc:  # no such compiler
            return f"C compiler failed: cannot run {cmd[0]}: {exc.strerror or exc}", 0.0
        if run.returncode != 0:
            first = _first_error(run.stderr) or run.stderr.strip() or f"exit status {run.returncode}"
            return (f"C compiler failed on the kernels of {source.meta['spec']} ({source.name}): {first}",
                    time.perf_counter() - t)
        if not _pin(tmp, own):
            return f"C compiler failed on the kernels of {source.meta['spec']} ({source.name}): no object file", 0.0
        os.replace(tmp, obj)
        return None, time.perf_counter() - t
    except OSError as exc:  # a full disk, a read-only cache
        return f"cannot build under {exc.filename or obj.parent}: {exc.strerror or exc}", time.perf_counter() - t
    finally:
        for f in (src, tmp):
            with contextlib.suppress(OSError):
                f.unlink()


def _first_error(stderr: str) -> str:
    """The compiler's first line that reports an error, or ''. collect2's summary ("ld returned
    1 exit status") is the last resort: the linker's own line says why ("final link failed:
    No space left on device")."""
    lines = [ln.strip() for ln in stderr.splitlines() if re.search(r"error|failed", ln, re.IGNORECASE)]
    return next((ln for ln in lines if not ln.startswith("collect2:")), lines[0] if lines else "")


def _publish(folder: Path, target: Path) -> str | None:
    """Point `target` at `folder` with one atomic rename of a symlink; returns the name of
    the folder it pointed at before."""
    previous = os.readlink(target) if target.is_symlink() else None
    link = target.parent / f".{target.name}.link-{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        link.unlink()
    os.symlink(folder.name, link)
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target, ignore_errors=True)  # an older build copied here as a folder (it has a manifest)
    os.replace(link, target)
    return previous


def _remove_stale(out: Path, name: str, keep: set, losses: set = frozenset()):
    """Remove build folders and leftovers of killed builds: all but `keep`, once abandoned
    (younger ones, or a running build's, may be in use right now); and the
    derivations of losses not in `losses` (removed ones; another module's, if several share
    the folder) unused for UNUSED_DERIVATION_SECONDS."""
    now = time.time()
    for p in (out / ".cache").glob("*.json"):
        with contextlib.suppress(OSError):
            if p.name.split("-")[0] not in losses and now - p.stat().st_mtime > UNUSED_DERIVATION_SECONDS:
                p.unlink()
    for pattern in (f".{name}-*", f".{name}.tmp-*", f".{name}.link-*", ".cache/.*.tmp"):
        for p in out.glob(pattern):
            try:
                if p.name not in keep and _abandoned(p, now):
                    if p.is_symlink() or not p.is_dir():
                        p.unlink()
                    else:
                        shutil.rmtree(p, ignore_errors=True)
            except OSError:
                pass


def _abandoned(p: Path, now: float) -> bool:
    """Whether a build's temporary file or folder is left over: older than STALE_SECONDS and,
    where its name carries the process id of its build (.losses.tmp-PID-*, .losses.link-PID,
    .OBJECT.PID.THREAD.c), that process is gone (a long build's files can be old)."""
    if now - p.lstat().st_mtime <= STALE_SECONDS:
        return False
    m = re.search(r"\.(?:tmp|link)-(\d+)|\.(\d+)\.\d+\.(?:c|o|tmp)$", p.name)
    if m is None:
        return True
    try:
        os.kill(int(m[1] or m[2]), 0)
    except ProcessLookupError:
        return True
    except (OSError, OverflowError):  # another user's process: alive
        return False
    return False


def _read_manifest(target: Path):
    try:
        return json.loads((target / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _write_atomic(path: Path, text: str):
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@contextlib.contextmanager
def _captured_stderr():
    """Capture what the C compiler writes to file descriptor 2 (cffi does not collect it)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            reader = _Reader(tmp)
            yield reader
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


class _Reader:
    def __init__(self, f):
        self.f = f

    def read(self) -> str:
        self.f.flush()
        self.f.seek(0)
        return self.f.read().decode("utf-8", "replace")
