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


@pytest.fixture(scope="session")
def cluster():
    """A Dask client on a two-worker LocalCluster -- two worker processes, one thread each,
    everything on 127.0.0.1 (tests/loopback.py records any socket opened elsewhere, here and
    in the workers, and the fixture fails the session's last user if one was). Skipped where
    dask.distributed is not installed (the extra losscc[dask])."""
    distributed = pytest.importorskip("dask.distributed")
    import loopback

    loopback.install()
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=None, worker_dashboard_address=None) as lc, \
            distributed.Client(lc) as client:
        pids = client.run(loopback.install)
        assert len(pids) == 2 and len(set(pids.values())) == 2, f"expected two worker processes: {pids}"
        yield client
        seen = {w: s for w, s in client.run(loopback.outside).items() if s}
        seen.update({"this process": loopback.outside()} if loopback.outside() else {})
    assert not seen, f"sockets opened to addresses other than loopback: {seen}"
