"""Where the templates are, and the hashes the build cache keys on (no heavy imports)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .errors import BuildError


def templates_dir() -> Path:
    """templates/ at the top of a source checkout, or losscc/templates in an installed wheel."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "templates", here / "templates"):
        if (candidate / "elementwise.c.j2").is_file():
            return candidate
    raise BuildError(f"losscc templates not found next to {here}: reinstall losscc")


def templates_hash() -> str:
    h = hashlib.sha256()
    for p in sorted(templates_dir().glob("*.j2")):
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


# The modules whose code decides what a build produces (the runtime and CLI do not).
_COMPILER_MODULES = ("ir.py", "spec.py", "expr.py", "functions.py", "stabilize.py", "rows.py",
                     "derive.py", "codegen.py", "build.py", "resources.py", "errors.py")


def compiler_hash() -> str:
    """Hash of the compiler stages' source, so an edited losscc never reuses a stale build."""
    here = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for name in _COMPILER_MODULES:
        h.update(name.encode() + b"\0" + (here / name).read_bytes())
    return h.hexdigest()


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes (the manifest records one per executable file of a build)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
