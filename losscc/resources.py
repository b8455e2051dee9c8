"""Where the templates are, and their hash for the build cache (no heavy imports)."""

from __future__ import annotations

import hashlib
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
