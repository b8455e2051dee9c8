"""Shared fixtures: the catalogue in specs/ built once per test session into a temp folder."""

from __future__ import annotations

from pathlib import Path

import pytest

import losscc
from losscc.build import build

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "specs"


@pytest.fixture(scope="session")
def built(tmp_path_factory) -> Path:
    """Path of the package built from specs/ (a fresh build, independent of ./build)."""
    out = tmp_path_factory.mktemp("build")
    report = build([SPECS], out=out, name="losses_under_test", log=lambda *a: None)
    return report.path


@pytest.fixture(scope="session")
def losses(built):
    """The loaded module: losses.L2Loss, losses.huber, ..."""
    return losscc.load(built)
