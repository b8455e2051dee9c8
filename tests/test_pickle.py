"""Pickling by reference (issue 9, part 1): a loss pickles as plain data -- its build's path
and cache key, its name and constructor arguments -- and unpickles in another process by
loading that build once; a moved or rebuilt build is a clear error. The adapters pickle
through the loss they hold."""

from __future__ import annotations

import copy
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

import losscc
from losscc.runtime import unpickle_loss

from conftest import ROOT

# Unpickles argv[1]'s losses in a fresh interpreter, calls each on argv[2]'s inputs, and
# writes their value and gradient to argv[3]; and says whether sympy was ever imported.
_CHILD = r"""
import pickle, sys, numpy as np
losses = pickle.load(open(sys.argv[1], "rb"))
inputs = pickle.load(open(sys.argv[2], "rb"))
out = [loss.value_and_grad(*args) for loss, args in zip(losses, inputs)]
pickle.dump(out, open(sys.argv[3], "wb"))
print("sympy" in sys.modules, "jinja2" in sys.modules)
"""


def _env():
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))


def _child(tmp_path, losses, inputs):
    (tmp_path / "l.pkl").write_bytes(pickle.dumps(losses))
    (tmp_path / "x.pkl").write_bytes(pickle.dumps(inputs))
    return subprocess.run([sys.executable, "-c", _CHILD, tmp_path / "l.pkl", tmp_path / "x.pkl", tmp_path / "o.pkl"],
                          capture_output=True, text=True, env=_env(), timeout=120)


def _cases(losses):
    rng = np.random.default_rng(5)
    x, c = rng.standard_normal((64, 10)), rng.integers(0, 10, 64)
    p, y = rng.standard_normal(1000), rng.standard_normal(1000)
    return [
        (losses.SoftmaxCrossEntropyLoss(label_smoothing=0.1, reduction="mean"), (x, c)),
        (losses.HuberLoss(rho=0.5, weight=2.0, batch_axis=0), (p, y)),
        (losses.SigmoidBCELoss(from_sigmoid=False), (p, (y > 0).astype(np.float64))),
        (losses.log_cosh(scale=2.0), (p.astype(np.float32), y.astype(np.float32))),
    ]


def test_a_pickled_loss_gives_the_same_bits_in_a_fresh_process_without_sympy(losses, tmp_path):
    cases = _cases(losses)
    run = _child(tmp_path, [c[0] for c in cases], [c[1] for c in cases])
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["False", "False"]  # the worker runs no compiler stage
    for (loss, args), (v, g) in zip(cases, pickle.loads((tmp_path / "o.pkl").read_bytes())):
        v0, g0 = loss.value_and_grad(*args)
        assert np.asarray(v).dtype == np.asarray(v0).dtype
        np.testing.assert_array_equal(v, v0)
        np.testing.assert_array_equal(g, g0)


def test_pickles_are_small_plain_data_and_unpickle_to_an_equal_loss(losses):
    for loss, args in _cases(losses):
        data = pickle.dumps(loss)
        assert len(data) < 1024
        assert b"cffi" not in data and b"_cffi_backend" not in data
        again = pickle.loads(data)
        assert type(again) is type(loss)  # the build is loaded once: the same classes
        assert again._arguments() == loss._arguments()
        np.testing.assert_array_equal(again(*args), loss(*args))


def test_dask_tokens_are_deterministic(losses):
    huber = losses.HuberLoss(rho=0.5)
    assert huber.__dask_tokenize__() == copy.copy(huber).__dask_tokenize__()
    assert huber.__dask_tokenize__() == pickle.loads(pickle.dumps(huber)).__dask_tokenize__()
    assert huber.__dask_tokenize__() != losses.HuberLoss(rho=0.6).__dask_tokenize__()


def test_adapters_pickle_through_their_loss(losses):
    obj = losses.log_cosh().xgboost_objective()
    again = pickle.loads(pickle.dumps(obj))
    y, p = np.zeros(5), np.linspace(-1, 1, 5)
    np.testing.assert_array_equal(np.asarray(again(y, p)), np.asarray(obj(y, p)))
    lgb = pickle.loads(pickle.dumps(losses.L2Loss().lightgbm_objective()))
    np.testing.assert_array_equal(np.asarray(lgb(y, p, None)), np.asarray(losses.L2Loss().lightgbm_objective()(y, p, None)))


class _PickledLoss:
    """What a loss's pickle holds (Loss.__reduce__), made by hand to name any path."""

    def __init__(self, *state):
        self.state = state

    def __reduce__(self):
        return unpickle_loss, self.state


def test_a_moved_build_is_a_clear_error_in_the_worker(losses, tmp_path):
    l2 = losses.L2Loss()
    key = l2._build["cache_key"]
    path = str(tmp_path / "moved" / "losses")
    (tmp_path / "l.pkl").write_bytes(pickle.dumps(_PickledLoss(path, key, "l2", l2._arguments())))
    run = subprocess.run([sys.executable, "-c", "import pickle, sys; pickle.load(open(sys.argv[1], 'rb'))",
                          tmp_path / "l.pkl"], capture_output=True, text=True, env=_env())
    assert run.returncode == 1
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("losscc.errors.LoadError: cannot unpickle a losscc loss on host ")
    for part in (f"the build {path} (cache key {key[:16]}...) is not usable here", "not a losscc build",
                 "a shared file system", "UploadDirectory", "`losscc build` on the worker"):
        assert part in last, last


def test_another_build_at_the_path_is_a_clear_error(built):
    path = str(built)
    key = losscc.load(built)._manifest["cache_key"]
    with pytest.raises(losscc.LoadError) as exc:
        unpickle_loss(path, "0" * 64, "l2", {})
    assert f"the build at {path} has cache key {key[:16]}..., the loss was pickled from 0000000000000000..." \
        in str(exc.value)


def test_the_torch_module_pickles_through_its_loss(losses):
    torch = pytest.importorskip("torch")
    module = losses.HuberLoss(rho=0.5).torch()
    again = pickle.loads(pickle.dumps(module))
    p, y = torch.linspace(-2, 2, 7, dtype=torch.float64), torch.zeros(7, dtype=torch.float64)
    assert torch.equal(again(p, y), module(p, y))
