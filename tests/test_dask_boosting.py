"""Boosting objectives (losscc/boosting.py) on Dask (issue 9, part 4): xgboost.dask.train,
xgboost.dask.DaskXGBRegressor and lightgbm.dask.DaskLGBMRegressor train with losscc's
objectives on the two-worker loopback cluster of tests/conftest.py (`cluster`). The
objectives travel to the workers pickled by reference to the session's build.

References: the libraries' built-in objectives on the same cluster (reg:squarederror,
binary:logistic, LightGBM's regression), started from the same margin, and the same
objective trained on one machine (xgboost.train, lightgbm.LGBMRegressor).

Why the data are what they are:
- every feature takes 40 values (multiples of 0.1 in [-2, 2)), fewer than the libraries'
  bins (256 XGBoost, 255 LightGBM) and each about 200 times (LightGBM's min_data_in_bin is
  3): so the bin boundaries are the same whether one machine or two workers find them.
  With continuous features they are not (XGBoost merges the workers' quantile sketches,
  LightGBM bins from each worker's sample): measured, L2 on 8000 normal rows then differs
  by up to 0.80 (XGBoost) and 0.97 (LightGBM) between Dask and one machine -- other
  splits, not rounding. With the bins fixed, what is left is the order of the histogram
  sums (each worker sums its rows in double, then the workers' sums are added), which
  rounding of the float32 leaf values almost always hides: measured 0.
- the 8000 rows are four blocks, blocks 0 and 2 on one worker and 1 and 3 on the other,
  so both workers train (asserted through XGBoost's worker map).

Network: XGBoost's tracker is given 127.0.0.1 (`coll_cfg=COLL`) in every call. Without
it, XGBoost 3.1 guesses the host's address in C++ (a UDP connect to 10.255.255.255, seen
with strace), which the fixture's Python audit hook cannot see. LightGBM builds its
`machines` list from the workers' addresses (127.0.0.1 here) and connects only there.
(Both libraries' C++ communicators listen on 0.0.0.0 while they train -- they have no
setting for it -- but connect only to 127.0.0.1: strace, connect and bind.)

Hangs: every distributed fit runs in a daemon thread given TIMEOUT seconds (a hang fails
the test and restarts the workers instead of blocking CI); XGBoost's communicator and
tracker and LightGBM's sockets (`time_out`, minutes) have their own timeouts too.
"""

from __future__ import annotations

import inspect
import threading

import numpy as np
import pytest

xgb = pytest.importorskip("xgboost")
lgb = pytest.importorskip("lightgbm")
pytest.importorskip("dask.distributed")
da = pytest.importorskip("dask.array")
dxgb = pytest.importorskip("xgboost.dask")
pytest.importorskip("lightgbm.dask")

# seconds for one test's distributed fits: each takes 0.3-1 s, but the first XGBoost one also
# imports xgboost (scikit-learn, scipy) in both workers, 11-14 s on a loaded two-core machine
TIMEOUT = 60
COLL = xgb.collective.Config(tracker_host_ip="127.0.0.1", timeout=TIMEOUT, tracker_timeout=TIMEOUT)
XGB = {"tree_method": "hist", "max_depth": 4, "eta": 0.3, "base_score": 0.0, "nthread": 1}
ROUNDS = 20
# XGBoost's margins are float32, below 8 in magnitude here (ulp 4.8e-7 up to 8): each of the
# 20 trees adds one rounded leaf value, and one ulp of difference in a gradient (losscc
# rounds (p - y) * w once, XGBoost twice; XGBoost's float32 sigmoid against an exact one)
# moves a leaf by about one ulp -- measured at most 1.2e-6 (5 ulps at 3.2). 1e-5 is 8x that.
ATOL = 1e-5


def _within(client, fn):
    """fn() in a daemon thread; a hang fails the test after TIMEOUT seconds (and restarts
    the workers, so that the fixture's teardown is not stuck behind it)."""
    out = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as exc:  # noqa: B036 -- re-raised in the test's thread
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(TIMEOUT)
    if thread.is_alive():
        try:
            client.restart(timeout=30)
        finally:
            pytest.fail(f"distributed training did not finish in {TIMEOUT} s")
    if "error" in out:
        raise out["error"]
    return out["value"]


def _spread(client, *arrays, blocks=4):
    """Each array as a dask array of `blocks` row blocks, block i held by worker i % 2."""
    workers = sorted(client.scheduler_info()["workers"])
    out = []
    for a in arrays:
        parts = np.array_split(a, blocks)
        futures = [client.scatter(p, workers=[workers[i % len(workers)]]) for i, p in enumerate(parts)]
        out.append(da.concatenate([da.from_delayed(f, shape=p.shape, dtype=p.dtype)
                                   for f, p in zip(futures, parts)]))
    return out


@pytest.fixture(scope="module")
def data(cluster):
    rng = np.random.default_rng(0)
    n = 8000
    X = rng.integers(-20, 20, size=(n, 6)) / 10
    y = 2 * X[:, 0] + np.sin(3 * X[:, 1]) + 0.5 * X[:, 2] * X[:, 3] + 0.1 * rng.normal(size=n)
    w = rng.uniform(0.5, 2.0, size=n)
    yb = (y > 0).astype(np.float64)
    dX, dy, dw, dyb = _spread(cluster, X, y, w, yb)
    return {"X": X, "y": y, "w": w, "yb": yb, "dX": dX, "dy": dy, "dw": dw, "dyb": dyb}


def _margin(client, booster, dX):
    return dxgb.predict(client, booster, dX, output_margin=True).compute()


def _on_both_workers(dtrain):
    assert len(dtrain.worker_map) == 2, f"expected data on both workers: {dtrain.worker_map}"


def test_signatures_and_the_objectives_run_on_the_workers(cluster, losses):
    """The signatures the libraries dispatch on; each worker unpickles the objective (by
    reference to the build) and computes the same derivatives as this process."""
    xobj = losses.HuberLoss(rho=0.5, weight=2.0).xgboost_objective()
    sig = inspect.signature(xobj).parameters
    assert list(sig) == ["y_true", "y_pred", "sample_weight"]  # XGBoost looks for sample_weight
    assert sig["sample_weight"].kind is inspect.Parameter.KEYWORD_ONLY and sig["sample_weight"].default is None
    assert list(inspect.signature(xobj.obj).parameters) == ["predt", "dtrain"]
    lobj = losses.log_cosh().lightgbm_objective()
    assert list(inspect.signature(lobj).parameters) == ["y_true", "y_pred", "weight"]  # exactly three
    rng = np.random.default_rng(1)
    p, y, w = rng.normal(size=50).astype(np.float32), rng.normal(size=50), rng.uniform(0.5, 2, 50)
    here = [xobj(y, p, sample_weight=w), lobj(y, p.astype(np.float64), w)]
    for worker in sorted(cluster.scheduler_info()["workers"]):
        there = [cluster.submit(xobj, y, p, sample_weight=w, workers=[worker], pure=False).result(TIMEOUT),
                 cluster.submit(lobj, y, p.astype(np.float64), w, workers=[worker], pure=False).result(TIMEOUT)]
        for (g0, h0), (g1, h1) in zip(here, there):
            assert g1.dtype == g0.dtype
            np.testing.assert_array_equal(g1, g0)
            np.testing.assert_array_equal(h1, h0)


def test_xgboost_dask_train_l2_matches_reg_squarederror(cluster, losses, data):
    """Gluon's L2 is 0.5 * (p - y)^2 times its `weight` (1 by default): gradient p - y,
    second derivative 1, reg:squarederror's. For a custom objective XGBoost starts from
    base_score itself (0.5 when unset: it estimates base_score only for its own
    objectives), so both get base_score=0. Measured: equal bits; and equal bits to
    xgboost.train on one machine (the bins are the same, see the module's doc)."""
    X, y, dX, dy = data["X"], data["y"], data["dX"], data["dy"]
    obj = losses.L2Loss().xgboost_objective()

    def fit():
        dtrain = dxgb.DaskDMatrix(cluster, dX, dy)
        _on_both_workers(dtrain)
        builtin = dxgb.train(cluster, {**XGB, "objective": "reg:squarederror"}, dtrain, ROUNDS, coll_cfg=COLL)
        ours = dxgb.train(cluster, XGB, dtrain, ROUNDS, obj=obj.obj, coll_cfg=COLL)
        return _margin(cluster, builtin["booster"], dX), _margin(cluster, ours["booster"], dX)

    builtin, ours = _within(cluster, fit)
    np.testing.assert_allclose(ours, builtin, rtol=0, atol=ATOL)
    local = xgb.train(XGB, xgb.DMatrix(X, label=y), ROUNDS, obj=obj.obj).predict(xgb.DMatrix(X), output_margin=True)
    np.testing.assert_allclose(ours, local, rtol=0, atol=ATOL)
    assert np.mean((ours - y) ** 2) < 0.1 * np.mean(y ** 2)  # it learned (0.036 measured)


def test_xgboost_dask_train_sigmoid_bce_matches_binary_logistic(cluster, losses, data):
    """Compared on margins. binary:logistic's base_score is a probability: 0.5 is margin
    0, which for the custom objective is base_score=0. Measured max |difference| 9.5e-7 to
    1.2e-6 over runs (margins up to 6.7; 5 ulps of float32 at 3.2): XGBoost's float32
    sigmoid against losscc's exact one rounded once."""
    dX, dyb = data["dX"], data["dyb"]
    obj = losses.SigmoidBCELoss(from_sigmoid=False).xgboost_objective()

    def fit():
        dtrain = dxgb.DaskDMatrix(cluster, dX, dyb)
        _on_both_workers(dtrain)
        builtin = dxgb.train(cluster, {**XGB, "objective": "binary:logistic", "base_score": 0.5}, dtrain, ROUNDS,
                             coll_cfg=COLL)
        ours = dxgb.train(cluster, XGB, dtrain, ROUNDS, obj=obj.obj, coll_cfg=COLL)
        return _margin(cluster, builtin["booster"], dX), _margin(cluster, ours["booster"], dX)

    builtin, ours = _within(cluster, fit)
    np.testing.assert_allclose(ours, builtin, rtol=0, atol=ATOL)
    assert np.mean((ours > 0) == (data["yb"] > 0)) > 0.9  # it learned (0.955 measured)


def test_dask_xgb_regressor_with_sample_weights(cluster, losses, data):
    """The scikit-learn form on Dask, weighted: XGBoost calls obj(y_true, y_pred,
    sample_weight=...) on each worker (it refuses an objective without sample_weight when
    there are weights). Against the built-in objective on Dask (measured max |difference|
    4.8e-7 to 9.5e-7 over runs: XGBoost rounds (p - y) * w twice in float32, losscc
    once) and against xgboost.XGBRegressor on one machine (measured: equal bits)."""
    X, y, w = data["X"], data["y"], data["w"]
    obj = losses.L2Loss().xgboost_objective()
    kw = {"n_estimators": ROUNDS, "max_depth": 4, "learning_rate": 0.3, "base_score": 0.0, "tree_method": "hist",
          "n_jobs": 1}

    def fit():
        out = []
        for objective in ("reg:squarederror", obj):
            model = dxgb.DaskXGBRegressor(objective=objective, coll_cfg=COLL, **kw)
            model.client = cluster
            model.fit(data["dX"], data["dy"], sample_weight=data["dw"])
            out.append(model.predict(data["dX"], output_margin=True).compute())
        return out

    builtin, ours = _within(cluster, fit)
    np.testing.assert_allclose(ours, builtin, rtol=0, atol=ATOL)
    local = xgb.XGBRegressor(objective=obj, **kw).fit(X, y, sample_weight=w).predict(X, output_margin=True)
    np.testing.assert_allclose(ours, local, rtol=0, atol=ATOL)


def test_xgboost_dask_log_cosh_learns_and_matches_one_machine(cluster, losses, data):
    """A loss XGBoost lacks. Its second derivative sech^2 vanishes far from the label, so
    a Newton step -G / (H + lambda) over a leaf of many far samples overshoots (without a
    cap the loss grows here: 3.4 after 20 rounds from 1.5); max_delta_step, XGBoost's cap
    on a leaf's step, is the remedy. Against xgboost.train on one machine with the same
    objective: measured equal bits (the bins are the same; the workers' histogram sums
    could round differently, which ATOL allows)."""
    X, y, dX, dy = data["X"], data["y"], data["dX"], data["dy"]
    obj = losses.log_cosh().xgboost_objective()
    params = {**XGB, "max_delta_step": 2.0}

    def fit():
        dtrain = dxgb.DaskDMatrix(cluster, dX, dy)
        _on_both_workers(dtrain)
        return _margin(cluster, dxgb.train(cluster, params, dtrain, ROUNDS, obj=obj.obj, coll_cfg=COLL)["booster"], dX)

    ours = _within(cluster, fit)
    local = xgb.train(params, xgb.DMatrix(X, label=y), ROUNDS, obj=obj.obj).predict(xgb.DMatrix(X), output_margin=True)
    np.testing.assert_allclose(ours, local, rtol=0, atol=ATOL)
    start = np.mean(np.log(np.cosh(y)))  # the loss at margin 0: 1.52
    assert np.mean(np.log(np.cosh(ours - y))) < 0.1 * start  # 0.057 measured


@pytest.mark.filterwarnings("ignore:Parameter n_jobs will be ignored:UserWarning")  # Dask sets the threads
def test_lightgbm_dask_l2_matches_one_machine_and_regression(cluster, losses, data):
    """DaskLGBMRegressor(objective=obj), weighted: LightGBM calls obj(y_true, y_pred,
    weight) on each worker. Data-parallel (tree_learner 'data', Dask's default: each worker
    builds histograms of its rows, the workers sum them); Dask sets num_threads to the
    workers' one thread. A custom objective starts from margin 0; the built-in regression
    does too with boost_from_average=False.

    Against the built-in on Dask and against lightgbm.LGBMRegressor on one machine with the
    same objective: measured equal bits both (LightGBM rounds the gradients to float32
    either way, and (p - y) * w is computed in double by both). Tolerance 1e-7 absolute
    (margins up to 5.3): the histogram sums' order. min_child_samples=1: LightGBM's
    min_data_in_leaf gate counts a leaf's rows from its hessian sum (round(hessian *
    num_data / sum_hessian), exact only when every row's hessian is the same); with weights
    the hessians differ, and at the default gate of 20 the Dask and one-machine trees split
    differently -- measured up to 0.29 apart, equal bits with the gate off or unweighted."""
    X, y, w = data["X"], data["y"], data["w"]
    obj = losses.L2Loss().lightgbm_objective()
    kw = {"n_estimators": ROUNDS, "num_leaves": 7, "learning_rate": 0.3, "boost_from_average": False,
          "min_child_samples": 1, "deterministic": True, "verbose": -1,
          "time_out": 1}  # time_out: LightGBM's sockets, in minutes

    def fit():
        out = []
        for objective in (obj, "regression"):
            model = lgb.DaskLGBMRegressor(client=cluster, objective=objective, tree_learner="data", **kw)
            model.fit(data["dX"], data["dy"], sample_weight=data["dw"])
            out.append(model.predict(data["dX"], raw_score=True).compute())
        return out

    ours, builtin = _within(cluster, fit)
    np.testing.assert_allclose(ours, builtin, rtol=0, atol=1e-7)
    local = lgb.LGBMRegressor(objective=obj, n_jobs=1, **kw).fit(X, y, sample_weight=w).predict(X, raw_score=True)
    np.testing.assert_allclose(ours, local, rtol=0, atol=1e-7)
    assert np.mean((ours - y) ** 2) < 0.1 * np.mean(y ** 2)  # it learned (0.035 measured)
