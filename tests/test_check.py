"""`losscc check`: the interval truth, the ulp measure, input domains, and the check itself
over the catalogue (a reduced sweep; the full one is `losscc check specs/ --samples 10000`)."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import textwrap

import mpmath
import numpy as np
import pytest
import sympy

from conftest import ROOT, SPECS
from losscc.check import (DTYPES, Accuracy, _compiled, _Conditioning, _elementwise_points, _error,
                          _params, _row_points, _variant_key, _varying, check, summary_table, ulps)
from losscc.errors import SpecError
from losscc.spec import load_spec, parse_domain, parse_spec
from losscc.truth import compile_interval, condition, resolve

F64 = float(np.finfo(np.float64).max)
x, y = sympy.symbols("x y", real=True)


def truth(expr, *args, limit=F64, slack=0.0):
    return resolve(compile_interval(expr, (x, y)[:len(args)]), list(args), limit, slack)


# --------------------------------------------------------------------------- the truth


def test_interval_truth_sees_what_fixed_precision_loses():
    # log(1 + exp(-700)) at 30 digits with point arithmetic is exactly 0; the interval is
    # [0, 2e-31], not narrow, so the precision rises. Expected: mpmath at 1000 digits.
    with mpmath.workdps(30):
        assert mpmath.log(1 + mpmath.exp(-700)) == 0
    t = truth(sympy.log(1 + sympy.exp(x)) - sympy.log(1 + sympy.exp(x - 1)) * 0, -700.0)
    with mpmath.workdps(1000):
        want = mpmath.log(1 + mpmath.exp(-700))
    assert abs(t.value / want - 1) < mpmath.mpf(2) ** -64
    # (1 + x) - 1 at x = 1e-300: a cancellation only more digits resolve
    one_plus_x_minus_1 = sympy.Add(sympy.Add(1, x, evaluate=False), -1, evaluate=False)
    t = truth(one_plus_x_minus_1, 1e-300)
    assert t.value == mpmath.mpf(1e-300) and t.digits >= 250


def test_truth_branches_ties_and_undefined_points():
    relu = sympy.Piecewise((x - y, x > y), (0, True))
    assert truth(relu, 3.0, 3.0).value == 0  # exact tie: decided, not Undecided forever
    assert truth(relu, 3.0, 2.0).value == 1
    assert mpmath.isnan(truth(sympy.log(x), -1.0).value)  # no real value
    assert mpmath.isnan(truth(1 / x, 0.0).value)
    assert truth(sympy.exp(x), 1000.0).value == mpmath.inf  # beyond every float: the float is inf
    # a comparison within the dtype's rounding is fragile: alt is the other side's value
    t = truth(relu, 1.0 + 2**-52, 1.0, slack=2.0**-50)
    assert t.fragile and t.alt == 0 and t.value == 2.0**-52


def test_truth_of_the_written_formula_not_the_stable_one(tmp_path):
    # softplus written naively and as the node: the same truth, to the last digit
    from losscc.functions import Softplus
    a = truth(sympy.log(1 + sympy.exp(x)), 30.0).value
    b = truth(Softplus(x), 30.0).value
    assert a == b
    with mpmath.workdps(50):
        assert abs(a / mpmath.log1p(mpmath.exp(30)) - 1) <= mpmath.mpf(2) ** -64  # the truth's promise


# --------------------------------------------------------------------------- ulps


def test_ulps_of_the_true_result():
    assert ulps(1.0, mpmath.mpf(1), np.float64) == 0
    assert ulps(1.0 + 2**-52, mpmath.mpf(1), np.float64) == 1
    assert ulps(1.0, mpmath.mpf(1) + mpmath.mpf(2) ** -24, np.float32) == 0.5
    # subnormals: the ulp is the smallest subnormal
    assert ulps(0.0, mpmath.mpf(2) ** -1074 * 3, np.float64) == 3
    # non-finite for a finite truth is an infinite error; overflow of the truth expects inf
    assert ulps(math.inf, mpmath.mpf(1), np.float64) == math.inf
    assert ulps(math.nan, mpmath.mpf(1), np.float64) == math.inf
    assert ulps(math.inf, mpmath.mpf(10) ** 400, np.float64) == 0
    assert ulps(math.inf, mpmath.mpf(4e38), np.float32) == 0
    assert ulps(F64, mpmath.mpf(10) ** 400, np.float64) == math.inf


# --------------------------------------------------------------------------- domains


@pytest.mark.parametrize("text,inside,outside", [
    ("real", [0.0, -1e308, 1e308], [math.inf, math.nan]),
    ("[0, 1]", [0.0, 1.0, 0.5], [-1e-300, 1.0000001]),
    ("(0, inf)", [1e-300, 1e308], [0.0, -1.0, math.inf]),
    ("(-inf, 0]", [0.0, -5.0], [1e-300]),
    ("{-1, 1}", [-1.0, 1.0], [0.0, 0.5]),
])
def test_domain_text(text, inside, outside):
    d = parse_domain(text)
    assert all(d.contains(v) for v in inside)
    assert not any(d.contains(v) for v in outside)


BASE = """\
name: t
summary: s
reference: r
variants:
  v: {values: [false, true], default: false}
inputs:
  pred: {}
  label: {domain: DOMAIN}
loss: (pred - label)**2
"""


@pytest.mark.parametrize("domain,message", [
    ('"[1, 0]"', "t.yaml:8:19: domain of input 'label': '[1, 0]': the lower bound must be below the upper one"),
    ('"[0, inf]"', "t.yaml:8:19: domain of input 'label': '[0, inf]': an infinite bound is open"),
    ("bananas", "t.yaml:8:19: domain of input 'label': 'bananas' is not a domain"),
    ("simplex", "t.yaml:8:19: domain of input 'label': simplex is for row inputs"),
    ("{by: w, true: real, false: real}", "t.yaml:8:24: domain of input 'label': by 'w' is not a variant"),
    ("{by: v, true: real}", "t.yaml:8:19: domain of input 'label': no domain for v = False"),
    ("{by: v, true: real, false: real, maybe: real}", "'maybe' is not a value of variant 'v'"),
    ("[0, 1, 2]", "a list is a closed interval [lo, hi] of two numbers"),
    ("{by: v, true: simplex, false: real}",  # the value is named, not the mapping
     "t.yaml:8:33: domain of input 'label' for v=true: simplex is for row inputs"),
])
def test_bad_domains_name_the_place(domain, message):
    with pytest.raises(SpecError) as exc:
        parse_spec(BASE.replace("DOMAIN", domain), "t.yaml")
    assert message in str(exc.value)


def test_domains_by_variant_and_the_docstring(losses):
    spec = parse_spec(BASE.replace("DOMAIN", '{by: v, true: "[0, 1]", false: "{-1, 1}"}'), "t.yaml")
    label = spec.inputs[1]
    assert label.domain_for({"v": True}).text == "[0, 1]"
    assert label.domain_for({"v": False}).values == (-1.0, 1.0)
    doc = losses.SigmoidBCELoss.__doc__
    assert "label in [0, 1]" in doc and "pred (differentiable) in real if from_sigmoid=false; [0, 1] if from_sigmoid=true" in doc
    assert "Domains are not checked" in doc


def test_the_index_label_docstring_gives_its_domain_to_the_row_form(losses):
    doc = losses.SoftmaxCrossEntropyLoss.__doc__
    assert "label (class indices, or a row in simplex where the variant uses it whole)" in doc


def test_every_sweep_point_is_inside_its_domain(losses):
    # after the cast to the dtype too: {-1, 1}, [0, 1] and (0, inf) must survive float32
    rng = np.random.default_rng(1)
    for path in sorted(SPECS.glob("*.yaml")):
        spec = load_spec(path)
        cls = losses.LOSSES[spec.name]
        for options in spec.variant_combos():
            kinds = cls._meta["kernels"][_variant_key(cls, options)]["kinds"]
            for dtype in DTYPES:
                for params in _params(spec, rng):
                    if spec.is_row:
                        arrays = _row_points(spec, options, kinds, dtype, 100, 3, rng)
                    else:
                        arrays = _elementwise_points(spec, options, dtype, 200, rng, params)
                    for inp in spec.inputs:
                        if inp.name not in arrays or kinds.get(inp.name) == "index":
                            continue
                        domain = inp.domain_for(options)
                        values = np.ravel(arrays[inp.name])
                        assert values.dtype == dtype
                        bad = [float(v) for v in values if not domain.contains(float(v))]
                        assert not bad, (spec.name, options, inp.name, np.dtype(dtype).name, bad[:3])


def test_cli_refuses_a_negative_seed():
    run = subprocess.run([sys.executable, "-m", "losscc.cli", "check", str(SPECS), "--seed", "-1"],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 2 and "argument --seed: must be at least 0, got -1" in run.stderr


def test_accuracy_key_needs_a_reason():
    text = BASE.replace("DOMAIN", "real") + "accuracy: {ulps: 8}\n"
    with pytest.raises(SpecError, match=r"t.yaml:10:11: accuracy needs 'ulps' \(the bound\) or "
                                        r"'conditioned: true', and 'reason'"):
        parse_spec(text, "t.yaml")
    spec = parse_spec(BASE.replace("DOMAIN", "real") + "accuracy: {ulps: 8, reason: because}\n", "t.yaml")
    assert (spec.accuracy, spec.accuracy_reason, spec.accuracy_conditioned) == (8.0, "because", False)
    spec = parse_spec(BASE.replace("DOMAIN", "real") + "accuracy: {conditioned: true, reason: x}\n", "t.yaml")
    assert (spec.accuracy, spec.accuracy_conditioned) == (4.0, True)
    spec = parse_spec(BASE.replace("DOMAIN", "real") + "accuracy: {conditioned: {v: true}, reason: x}\n", "t.yaml")
    assert spec.accuracy_conditioned_when == (("v", True),)
    assert spec.conditioned_for({"v": True}) and not spec.conditioned_for({"v": False})
    with pytest.raises(SpecError, match=r"t.yaml:10:26: accuracy conditioned: 'w' is not a variant"):
        parse_spec(BASE.replace("DOMAIN", "real") + "accuracy: {conditioned: {w: true}, reason: x}\n", "t.yaml")
    with pytest.raises(SpecError, match=r"t.yaml:10:29: accuracy conditioned: 'maybe' is not a value of variant 'v'"):
        parse_spec(BASE.replace("DOMAIN", "real") + "accuracy: {conditioned: {v: maybe}, reason: x}\n", "t.yaml")
    for text, message in [("{conditioned: false, reason: x}", "t.yaml:10:11: accuracy with 'conditioned: false'"),
                          ("{conditioned: {}, reason: x}", "t.yaml:10:25: accuracy conditioned: an empty mapping"),
                          ("{conditioned: {v: true, v: false}, reason: x}",
                           "t.yaml:10:35: accuracy conditioned: duplicate key 'v'")]:
        with pytest.raises(SpecError, match=re.escape(message)):
            parse_spec(BASE.replace("DOMAIN", "real") + f"accuracy: {text}\n", "t.yaml")
    with pytest.raises(SpecError, match=r"t.yaml:10:25: accuracy conditioned must be true or false, got 1"):
        parse_spec(BASE.replace("DOMAIN", "real") + "accuracy: {conditioned: 1, reason: x}\n", "t.yaml")


def test_outside_the_domain_is_the_written_formula(losses):
    # The documented policy: domains are not checked. A probability above 1 in the
    # from_sigmoid BCE makes log(1 - p + eps) the log of a negative: NaN, as written.
    loss = losses.SigmoidBCELoss(from_sigmoid=True)
    with np.errstate(invalid="ignore"):
        value = loss(np.array([1.5]), np.array([0.0]))
    assert np.isnan(value).all()


# --------------------------------------------------------------------------- the check


@pytest.fixture(scope="module")
def catalogue(built):
    """losscc check over specs/ with a reduced sweep (seeded: the same points every run),
    built beside the session's build (its module, losscc_check, reuses the cached derivations)."""
    return {r.name: r for r in check([SPECS], samples=40, out=built.parent, log=lambda *a: None)}


# Every built-in loss meets the 4-ulp bound (or its declared conditioned bound) at this sweep.
MEETS_BOUND = ["cosine_embedding", "hinge", "huber", "kl_div", "l1", "l2", "log_cosh", "logistic",
               "poisson_nll", "sigmoid_bce", "softmax_cross_entropy", "softmax_focal", "squared_hinge",
               "triplet"]


def test_every_builtin_is_checked(catalogue):
    assert sorted(catalogue) == sorted(MEETS_BOUND)


@pytest.mark.parametrize("name", MEETS_BOUND)
def test_examples_and_finite_differences_hold(catalogue, name):
    r = catalogue[name]
    assert r.examples and all(ok for _, _, ok, _ in r.examples), r.examples
    assert r.fd and all(ok for *_, ok in r.fd), r.fd


@pytest.mark.parametrize("name", MEETS_BOUND)
def test_builtin_meets_the_bound(catalogue, name):
    r = catalogue[name]
    assert r.ok, r.failures
    assert {dtype for dtype, _ in r.accuracy} == {"float64", "float32"}
    assert all(a.errors for a in r.accuracy.values())


NAIVE = textwrap.dedent("""\
    name: naive_logistic
    summary: The logistic loss written the textbook way.
    reference: a user's spec
    inputs:
      pred: {}
      label: {domain: "{-1, 1}"}
    loss: log(1 + exp(-label * pred))
    """)
HYPOT = textwrap.dedent("""\
    name: hypot_loss
    summary: A distance written naively.
    reference: a user's spec
    inputs:
      pred: {}
      label: {}
    loss: sqrt(pred**2 + label**2)
    """)


def test_a_naive_user_spec_passes_because_the_compiler_stabilized_it(tmp_path):
    (tmp_path / "naive.yaml").write_text(NAIVE)
    [r] = check([tmp_path / "naive.yaml"], samples=150, out=tmp_path / "b", log=lambda *a: None)
    assert r.ok, r.failures
    assert max(a.max for a in r.accuracy.values()) <= 4


def test_cli_fails_naming_loss_output_dtype_and_input(tmp_path):
    (tmp_path / "hypot.yaml").write_text(HYPOT)
    (tmp_path / "naive.yaml").write_text(NAIVE)
    run = subprocess.run([sys.executable, "-m", "losscc.cli", "check", str(tmp_path), "--samples", "60",
                          "--out", str(tmp_path / "b"), "--json", str(tmp_path / "r.json")],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 1, run.stderr
    # pred**2 overflows long before the true distance does
    assert "losscc: check failed: hypot_loss: value (float64): inf ulps > 4 at {" in run.stderr
    assert "naive_logistic" not in run.stderr
    assert "naive_logistic" in run.stdout and "FAILED" in run.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["ok"] is False
    by_name = {r["name"]: r for r in report["losses"]}
    assert by_name["naive_logistic"]["ok"] is True
    worst = next(a for a in by_name["hypot_loss"]["accuracy"]
                 if a["dtype"] == "float64" and a["output"] == "value")
    assert worst["max_ulps"] == "inf" and set(worst["worst"]["inputs"]) == {"pred", "label"}


# --------------------------------------------------------------------------- conditioned bound


def test_condition_is_the_sensitivity_to_each_inputs_rounding():
    # sum_i |x_i df/dx_i|, by hand: x - y -> |x| + |y|; x*y -> 2|xy|; only the inputs in vary
    f = compile_interval(x - y, (x, y))
    assert abs(condition(f, [1.0, 1 - 2.0**-30], (0, 1)) - (2 - 2.0**-30)) < 1e-25
    assert abs(condition(f, [1.0, 1 - 2.0**-30], (1,)) - (1 - 2.0**-30)) < 1e-25
    assert abs(condition(compile_interval(x * y, (x, y)), [3.0, -5.0], (0, 1)) - 30) < 1e-25
    # undefined at the point: nan (the strict measure stands)
    assert mpmath.isnan(condition(compile_interval(sympy.log(x), (x,)), [-1.0], (0,)))


def test_condition_at_a_kink_excuses_nothing():
    # relu'(x - y) = H(x - y) at x = y (triplet's gradient on its kink): a forward step lands
    # on the other side, so the "slope" is the jump divided by the step; the two steps
    # disagree and condition says nan. relu itself has a one-sided slope there: no jump.
    step = compile_interval(sympy.Piecewise((1, x > y), (0, True)), (x, y))
    assert mpmath.isnan(condition(step, [1.0, 1.0], (0, 1)))
    relu = compile_interval(sympy.Max(x - y, 0), (x, y))
    assert condition(relu, [1.0, 1.0], (0, 1)) == 1  # the step in x: slope 1 * |x|
    assert abs(condition(relu, [2.0, 1.0], (0, 1)) - 3) < 1e-25  # smooth there: |x| + |y|


def test_condition_at_a_minimum_is_the_measured_movement():
    # (x - y)**2 at x = y = 3: every slope is 0, but inputs rounded by u (both ways) move it
    # by (3u + 3u)**2 = 36 u**2: per unit of rounding, 36 u. A jump within u of the point
    # (x > y at x = y(1 + 2^-52)) scales with no power of u and excuses nothing.
    u = 2.0**-53
    sq = compile_interval((x - y)**2, (x, y))
    assert mpmath.isnan(condition(sq, [3.0, 3.0], (0, 1)))  # slopes alone: O(step), no agreement
    assert abs(condition(sq, [3.0, 3.0], (0, 1), u) / (36 * u) - 1) < 1e-6
    step = compile_interval(sympy.Piecewise((1, x > y), (0, True)), (x, y))
    assert condition(step, [1.0 + 2.0**-52, 1.0], (0, 1), u) == 0
    assert mpmath.isnan(condition(step, [1.0, 1.0], (0, 1), u))


def test_a_discrete_label_carries_no_rounding():
    # cosine's label is in {-1, 1}: moving it by an ulp would jump to the "any other label"
    # branch. Its symbol is x_label (a scalar input), the row elements input1__j.
    spec = load_spec(SPECS / "cosine_embedding.yaml")
    args, _ = _compiled(spec, {}, 2, {"input1": "row", "input2": "row", "label": "scalar"},
                        ["input1", "input2"])
    names = [a.name for a in args]
    assert [names[i] for i in _varying(spec, {}, args)] == [
        "input1__0", "input1__1", "input2__0", "input2__1", "p_margin", "p_epsilon"]


def _measured(expr, point, computed):
    fn = compile_interval(expr, (x, y))
    t = resolve(fn, point, F64, 0.0)
    stat = Accuracy("value", "float64")
    strict = _error(computed, t, np.float64, Accuracy("value", "float64"))
    conditioned = _error(computed, t, np.float64, stat, _Conditioning(fn, point, (0, 1), 4.0, np.float64))
    return strict, conditioned, stat.conditioned


def test_the_conditioned_bound_excuses_only_what_the_inputs_rounding_would_cause():
    # p**2 - l**2 at p = 1e8 + 1, l = 1e8: p*p rounds (it needs 54 bits), an error of ~1 in a
    # result of 2e8 + 1: millions of ulps of the result, but rounding p or l alone moves the
    # formula by ~4e16 * 2^-53, so within 1 ulp of the conditioning.
    p, q = 1e8 + 1, 1e8
    strict, conditioned, counted = _measured(x**2 - y**2, [p, q], p * p - q * q)
    assert strict > 1e6 and conditioned <= 1 and counted == 1
    # exp(p) - exp(l) near 1e-3: exp's own rounding (1e-16 absolute) is far beyond what the
    # inputs' rounding moves it (|p e^p| + |l e^l| ~ 2e-3, times 2^-53): not excused.
    p, q = 1e-3 + 1e-12, 1e-3
    strict, conditioned, counted = _measured(sympy.exp(x) - sympy.exp(y), [p, q], math.exp(p) - math.exp(q))
    assert conditioned > 4 and counted == 0 and strict > conditioned


SQUARES = textwrap.dedent("""\
    name: squares
    summary: A difference of squares, ill-conditioned where pred ~ label.
    reference: a test
    inputs:
      pred: {domain: "[-1000, 1000]"}
      label: {domain: "[-1000, 1000]"}
    loss: pred**2 - label**2
    """)


def test_a_conditioned_spec_passes_where_the_strict_bound_cannot(tmp_path):
    (tmp_path / "strict").mkdir()
    (tmp_path / "strict" / "squares.yaml").write_text(SQUARES)
    [r] = check([tmp_path / "strict"], samples=40, out=tmp_path / "b1", log=lambda *a: None)
    assert not r.ok and "value (float64)" in r.failures[0]
    (tmp_path / "cond").mkdir()
    (tmp_path / "cond" / "squares.yaml").write_text(
        SQUARES + "accuracy: {conditioned: true, reason: the two squares cancel}\n")
    [r] = check([tmp_path / "cond"], samples=40, out=tmp_path / "b2", log=lambda *a: None)
    assert r.ok, r.failures
    assert sum(a.conditioned for a in r.accuracy.values()) > 0
    table = summary_table([r])
    assert "     4c  ok" in table and "c: in ulps of max(|true result|" in table
    assert r.to_json()["bound_conditioned"] is True


# --------------------------------------------------------------------------- review regressions


def test_rational_powers_and_precision_state_are_kept():
    from mpmath import iv
    t = truth(x ** sympy.Rational(3, 2), 2.0)  # crashed: the exponent was not compiled
    with mpmath.workdps(40):
        assert abs(t.value / mpmath.sqrt(8) - 1) < 1e-18
    before = iv.dps
    truth(sympy.log(1 + sympy.exp(x)), -700.0)  # needs many digits
    assert iv.dps == before  # resolve restores the global interval precision


def test_ulps_at_the_float32_overflow_threshold():
    # max32 + half an ulp rounds to inf; just below it rounds to max32 (about 0.5 ulp away)
    max32 = float(np.finfo(np.float32).max)
    with mpmath.workprec(200):
        just_below = mpmath.mpf(max32) + mpmath.ldexp(1, 127 - 24) - mpmath.ldexp(1, 60)
    assert ulps(max32, just_below, np.float32) < 0.51
    assert ulps(math.inf, just_below, np.float32) == math.inf


def test_finite_differences_fail_on_a_nan_gradient():
    from losscc.check import LossCheck, _fd_compare
    from losscc.ir import REAL
    r = LossCheck("t", "t", 4.0, "")
    xs = np.linspace(-1, 1, 8)
    _fd_compare(r, "d/dpred", lambda v: v**2, xs, np.full(8, np.nan), REAL)
    assert r.fd[-1][-1] is False
    _fd_compare(r, "d/dpred", lambda v: v**2, xs, 2 * xs, REAL)
    assert r.fd[-1][-1] is True
