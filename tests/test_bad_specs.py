"""Broken and malicious specs: each is refused with one exact, located message, runs no code,
and fails fast, in process and through the CLI.

The corpus is tests/bad_specs/*.yaml (one problem per file) plus a few generated here (too big
to commit). Every expected message below was worked out by hand from the file: LINE:COL is
1-based and points at the offending character. Every spec runs in a sandbox (a temp copy of
tests/bad_specs as the working directory), so `touch CANARY` would create <sandbox>/CANARY,
which the tests check never exists.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from losscc.derive import derive
from losscc.errors import SpecError
from losscc.spec import load_spec

ROOT = Path(__file__).resolve().parent.parent
REL = "tests/bad_specs"  # as given on the command line, so messages start with it
TIME_LIMIT = 5.0  # seconds for one refusal
HARD_TIMEOUT = 6.0  # a subprocess still running after this is killed (and the test fails)

# By hand from losscc/expr.py FUNCTIONS, sorted as Python sorts str (capitals first).
KNOWN_FUNCTIONS = ("Abs, Max, Min, Piecewise, abs, clip, cosh, exp, expm1, log, log1p, log_cosh, log_sigmoid, "
                   "max, min, relu, sigmoid, sign, softplus, sqrt, square, tanh, where")
TOP_KEYS = "name, aliases, summary, reference, doc, inputs, params, variants, positional, axis, let, loss, examples, accuracy, plot"
RESERVED = "axis, batch_axis, grad_out, hess_out, out, reduction, sample_weight, self, weight, wrt"
IDENT = "must be an ASCII Python identifier, not a keyword, not starting with '_'"
OS_SYSTEM_TAG = "tag:yaml.org,2002:python/object/apply:os.system"


@dataclass(frozen=True)
class Case:
    stage: str  # "spec": load_spec refuses it; "expr": load_spec accepts it, derive refuses it
    message: str | re.Pattern  # after "tests/bad_specs/<file>:"; a str is compared exactly
    bug: str | None = None  # a losscc bug: the case is xfail(strict=True) with this reason
    isolate: bool = False  # may hang the interpreter: run in a killable subprocess


def spec(message, **kw):
    return Case("spec", message, **kw)


def expr(message, **kw):
    return Case("expr", message, **kw)


CASES = {
    # ------------------------------------------------------------------ YAML and structure
    # line 6 ' label: {}' is indented by one space, under the block mapping of 'inputs'
    "invalid_yaml.yaml": spec("6:2: invalid YAML: expected <block end>, but found '<block mapping start>'"),
    "empty.yaml": spec("1:1: spec is empty"),
    "not_a_mapping.yaml": spec("1:1: the spec must be a mapping, got a list"),
    "missing_key.yaml": spec("1:1: missing required key 'reference'"),
    "unknown_key_typo.yaml": spec(f"7:1: unknown key 'loos' in the spec (allowed: {TOP_KEYS})"),
    "duplicate_key.yaml": spec("8:1: duplicate key 'loss' in the spec (first at line 7)"),
    # '  a: &a [...]': the first anchor, at column 6; the refusal comes before any expansion
    "yaml_anchor.yaml": spec("8:6: YAML anchors and aliases are not allowed in specs"),
    # tags are refused while streaming, before any node is built: on a list, a scalar, a mapping
    "python_tag.yaml": spec(f"2:10: YAML tag '{OS_SYSTEM_TAG}' is not allowed in specs"),
    "python_tag_scalar.yaml": spec(f"7:7: YAML tag '{OS_SYSTEM_TAG}' is not allowed in specs"),
    "python_tag_mapping.yaml": spec(f"4:9: YAML tag '{OS_SYSTEM_TAG}' is not allowed in specs"),
    # ------------------------------------------------------------------ names
    "name_not_identifier.yaml": spec(f"1:7: name 'my-loss' {IDENT}"),
    "name_keyword.yaml": spec(f"6:3: input name 'lambda' {IDENT}"),
    "name_dunder.yaml": spec(f"8:3: let name '__class__' {IDENT}"),
    "reserved_weight.yaml": spec(f"8:3: param name 'weight' is reserved by the runtime (reserved: {RESERVED})"),
    "reserved_sample_weight.yaml": spec(
        f"6:3: input name 'sample_weight' is reserved by the runtime (reserved: {RESERVED})"),
    "name_clash.yaml": spec("8:3: param name 'label' is already used by the input at line 6"),
    # ------------------------------------------------------------------ params, variants, positional
    "param_no_default.yaml": spec("8:3: param 'rho' needs a default"),
    # '  rho: {default: 0, gt: 0}': the 0 after 'default: ' is column 18
    "param_default_out_of_bounds.yaml": spec("8:18: default of param 'rho': must be > 0, got 0.0"),
    # '  fmt: {values: [signed, binary], default: singed}': 'singed' is column 44
    "variant_default_not_value.yaml": spec(
        "8:44: default 'singed' of variant 'fmt' is not one of ['signed', 'binary']"),
    # 'positional: [rho, margin]': 'margin' is column 19
    "positional_unknown.yaml": spec(
        "9:19: positional: 'margin' is not a constructor argument (allowed: rho, weight, batch_axis)"),
    # ------------------------------------------------------------------ examples
    # '  - {pred: 1.0, label: 2.0, loss: 1.0, gard: -2.0}': 'gard' is column 40
    "example_unknown_key.yaml": spec("9:40: unknown key 'gard' in an example (allowed: pred, label, loss, grad)"),
    "example_missing_loss.yaml": spec("9:5: example needs 'loss'"),
    "example_text_number.yaml": spec("9:12: example pred must be a number, got 'one'"),
    # ------------------------------------------------------------------ expressions: code injection
    # 'loss: ' is 6 characters, so a plain formula on line 7 starts at column 7
    # __import__('os').system(...): the called thing is an attribute, refused as such
    "expr_import_os.yaml": expr("7:7: loss: attribute access is not allowed in a loss expression"),
    "expr_import_call.yaml": expr(f"7:7: loss: unknown function '__import__' (known: {KNOWN_FUNCTIONS})"),
    "expr_dunder_attribute.yaml": expr("7:7: loss: attribute access is not allowed in a loss expression"),
    # 'loss: "lambda: pred"': quoted, so the formula starts after the quote, at column 8
    "expr_lambda.yaml": expr("7:8: loss: a lambda is not allowed in a loss expression"),
    # 'loss: exp([p for p in (pred, label)])': '[' is column 11
    "expr_list_comprehension.yaml": expr("7:11: loss: a comprehension is not allowed in a loss expression"),
    "expr_fstring.yaml": expr("7:7: loss: an f-string is not allowed in a loss expression"),
    "expr_subscript.yaml": expr("7:7: loss: indexing (x[label]) is for row losses (an input with row: true)"),
    # ------------------------------------------------------------------ expressions: names and calls
    "unknown_function.yaml": expr(f"7:7: loss: unknown function 'expp' (known: {KNOWN_FUNCTIONS})"),
    # 'loss: (pred - lable)**2': 'lable' is column 15
    "unknown_name.yaml": expr("7:15: loss: unknown name 'lable' (known: E, label, pi, pred)"),
    # '  e: pred - lable': 'lable' is column 13 of line 8, and the message names the let
    "let_unknown_name.yaml": expr("8:13: let 'e': unknown name 'lable' (known: E, label, pi, pred)"),
    "wrong_arity.yaml": expr("7:7: loss: clip() takes 3 arguments, got 2"),
    "keyword_argument.yaml": expr("7:7: loss: log() takes no keyword arguments"),
    # ------------------------------------------------------------------ expressions: numbers
    # 'loss: pred**1000000': the exponent is column 13
    "huge_power.yaml": expr("7:13: loss: exponent 1000000 is beyond +-64"),
    # 'loss: pred * ((((9**64)**64)**64)**64)': 9**64 = 1.18e61 is fine, (9**64)**64 is refused
    # before it is computed; that '(' is column 17
    "power_tower.yaml": expr(
        "7:17: loss: constant 1.17902e+61**64 is beyond the range of double", isolate=True),
    "division_by_zero.yaml": expr("7:7: loss: undefined value (a division by zero or a log of 0)"),
    # 'loss: pred * 1e400': the literal is column 14
    "non_finite_number.yaml": expr("7:14: loss: number is beyond the range of double"),
    # ------------------------------------------------------------------ expressions: syntax
    # 'loss: pred - * label': the '*' is column 14
    "syntax_error.yaml": expr("7:14: loss: syntax error: invalid syntax"),
    # 'loss: (pred - label))**2': the extra ')' is column 21
    "syntax_error_unmatched_paren.yaml": expr("7:21: loss: syntax error: unmatched ')'"),
    # ------------------------------------------------------------------ expressions: kinds
    # 'loss: (pred > label) * pred': the comparison starts at column 8, inside the parentheses
    "condition_as_number.yaml": expr("7:8: loss: a condition or text is used where a number is expected"),
    # 'loss: where(pred - label, ...)': the first argument is column 13
    "number_as_condition.yaml": expr(
        "7:13: loss: a number is used where a condition is expected (compare it, e.g. x > 0)"),
    # 'loss: Piecewise((pred, pred > 0), (label, pred <= 0))': the last pair is column 35
    "piecewise_no_true.yaml": expr("7:35: loss: the last Piecewise pair must have the condition True"),
    # 'loss: where(fmt == 'singed', ...)': the misspelled text is column 20 (line 9)
    "variant_misspelled.yaml": expr(
        "9:20: loss: 'singed' is not a value of variant 'fmt' (values: 'signed', 'binary')"),
    # 150 unary minuses: the formula's node at depth 101 is the 102nd '-', column 7 + 101
    "deep_nesting.yaml": expr("7:108: loss: expression nests deeper than 100 levels "
                              "(a chain of n operators counts as n levels: split it with let)"),
}

HEADER = "name: demo\nsummary: A demo loss.\nreference: none\ninputs:\n  pred: {}\n  label: {}\n"

# Too big to commit: written into the sandbox by the fixture. name -> (bytes, Case)
GENERATED = {
    # Python allows 200 nested parentheses; expr.py's wrapper takes one, so the 200th '(' of
    # the formula (index 199, column 7 + 199) is the one refused.
    "gen_deep_parentheses.yaml": (
        (HEADER + "loss: " + "(" * 5000 + "pred" + ")" * 5000 + "\n").encode(),
        expr("7:207: loss: syntax error: too many nested parentheses")),
    # Python allows 200 levels and points at the 201st '(': 'exp(' is 4 characters, so that
    # '(' is at column 7 + 4 * 200 + 3 (the same rule puts the plain parentheses' at 7 + 200)
    "gen_deep_calls.yaml": (
        (HEADER + "loss: " + "exp(" * 5000 + "pred" + ")" * 5000 + "\n").encode(),
        expr("7:810: loss: syntax error: too many nested parentheses")),
    # Python's ast construction itself runs out of recursion: reported at the formula's start
    "gen_deep_unary.yaml": (
        (HEADER + "loss: " + "-" * 5000 + "pred\n").encode(),
        expr("7:7: loss: expression is too long or too deeply nested for the parser")),
    # max(pred, ..., pred), 3000 arguments, is shallow but big. ast.walk counts Expression,
    # Call, Name 'max' and its Load context, then a Name and a Load per argument: 4 + 2 * 3000.
    "gen_wide_call.yaml": (
        (HEADER + "loss: max(" + ", ".join(["pred"] * 3000) + ")\n").encode(),
        expr("7:7: loss: expression has 6004 parts, more than the 5000 allowed")),
    "gen_deep_yaml.yaml": (
        (HEADER + "doc: " + "[" * 1000 + "]" * 1000 + "\nloss: pred\n").encode(),
        # refused while streaming: the spec's mapping is level 1, so the 20th '[' is level 21;
        # 'doc: ' is 5 characters, so that '[' is column 6 + 19
        spec("7:25: YAML nests deeper than 20 levels")),
    "gen_oversized.yaml": (
        (HEADER + "doc: " + "x" * 300_000 + "\nloss: pred\n").encode(),
        # HEADER is 80 bytes, "doc: " 5, the x's 300000, "\nloss: pred\n" 12
        spec("1:1: spec is 300097 bytes, more than the 262144 allowed")),
    # 'd\xe9mo': byte 7 (0-based) is the Latin-1 e-acute, not valid UTF-8
    "gen_not_utf8.yaml": (
        b"name: d\xe9mo\n" + HEADER.encode()[len("name: demo\n"):] + b"loss: pred\n",
        # located at that byte: line 1, column 8
        spec("1:8: spec is not UTF-8 text (invalid continuation byte at byte 7)")),
}

ALL = {**CASES, **{name: case for name, (_, case) in GENERATED.items()}}


def _params():
    out = []
    for name, case in ALL.items():
        marks = [pytest.mark.xfail(strict=True, reason=case.bug)] if case.bug else []
        out.append(pytest.param(name, marks=marks, id=name))
    return out


def _expected(name: str, case: Case):
    return f"{REL}/{name}:" + case.message if isinstance(case.message, str) else \
        re.compile(re.escape(f"{REL}/{name}:") + case.message.pattern)


def _assert_message(actual: str, name: str, case: Case):
    expected = _expected(name, case)
    if isinstance(expected, str):
        assert actual == expected
    else:
        assert expected.fullmatch(actual), f"{actual!r} does not match {expected.pattern!r}"


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory) -> Path:
    """A working directory holding a copy of tests/bad_specs plus the generated specs."""
    root = tmp_path_factory.mktemp("sandbox")
    shutil.copytree(ROOT / REL, root / REL)
    for name, (data, _) in GENERATED.items():
        (root / REL / name).write_bytes(data)
    return root


@pytest.fixture
def in_sandbox(sandbox, monkeypatch):
    monkeypatch.chdir(sandbox)
    canary = sandbox / "CANARY"
    assert not canary.exists()
    yield sandbox
    assert not canary.exists(), "a spec ran code"


def test_the_corpus_and_the_table_agree():
    on_disk = {p.name for p in (ROOT / REL).iterdir()}
    assert on_disk == set(CASES)
    assert not set(GENERATED) & on_disk
    assert len(CASES) >= 30


def test_malicious_specs_really_ask_to_touch_the_canary():
    # Guard for the CANARY checks: the payloads are there, so "no CANARY" means "not run".
    for name in ("python_tag.yaml", "python_tag_scalar.yaml", "expr_import_os.yaml"):
        assert "touch CANARY" in (ROOT / REL / name).read_text()
    assert "!!python/object/apply:os.system" in (ROOT / REL / "python_tag.yaml").read_text()
    assert "__import__('os').system" in (ROOT / REL / "expr_import_os.yaml").read_text()


_ISOLATED = """
import sys
from losscc.derive import derive
from losscc.errors import SpecError
from losscc.spec import load_spec
try:
    derive(load_spec(sys.argv[1]))
except SpecError as exc:
    print("SpecError:", exc)
else:
    print("accepted")
"""


def _env():
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))


@pytest.mark.parametrize("name", _params())
def test_refused_in_process(name, in_sandbox):
    case = ALL[name]
    path = f"{REL}/{name}"
    if case.isolate:  # might hang: same check, in a subprocess that can be killed
        t0 = time.perf_counter()
        try:
            run = subprocess.run([sys.executable, "-c", _ISOLATED, path], cwd=in_sandbox, env=_env(),
                                 capture_output=True, text=True, timeout=HARD_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{name}: still running after {HARD_TIMEOUT} s")
        assert time.perf_counter() - t0 < TIME_LIMIT
        assert run.stdout.startswith("SpecError: "), run.stdout + run.stderr
        _assert_message(run.stdout[len("SpecError: "):].rstrip("\n"), name, case)
        return
    t0 = time.perf_counter()
    if case.stage == "expr":
        loaded = load_spec(path)  # the spec stage accepts it: the problem is in the math
    with pytest.raises(SpecError) as exc:
        load_spec(path) if case.stage == "spec" else derive(loaded)
    assert time.perf_counter() - t0 < TIME_LIMIT
    _assert_message(str(exc.value), name, case)
    # The location is also on the exception, for tools.
    m = re.match(r"(\d+):(\d+): ", case.message if isinstance(case.message, str) else "")
    if m:
        assert (exc.value.loc.file, exc.value.loc.line, exc.value.loc.col) == (path, int(m[1]), int(m[2]))


# ---------------------------------------------------------------------------- through the CLI


def _run_cli(sandbox: Path, name: str):
    out = sandbox / "out" / name.replace(".", "_")
    cmd = [sys.executable, "-m", "losscc.cli", "build", f"{REL}/{name}", "--out", str(out)]
    t0 = time.perf_counter()
    try:
        run = subprocess.run(cmd, cwd=sandbox, env=_env(), capture_output=True, text=True,
                             timeout=HARD_TIMEOUT)
    except subprocess.TimeoutExpired:
        run = None
    return run, time.perf_counter() - t0


@pytest.fixture(scope="module")
def cli_runs(sandbox):
    """Every spec through `losscc build`, two at a time (each is its own interpreter)."""
    pool = ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 2)))
    futures = {name: pool.submit(_run_cli, sandbox, name) for name in ALL}
    yield futures
    pool.shutdown(wait=True)


@pytest.mark.parametrize("name", _params())
def test_refused_by_the_cli(name, cli_runs, sandbox):
    run, elapsed = cli_runs[name].result()
    assert run is not None, f"still running after {HARD_TIMEOUT} s"
    assert "Traceback" not in run.stderr, run.stderr
    assert run.returncode == 1, run.stdout + run.stderr
    assert run.stdout == ""
    lines = run.stderr.splitlines()
    assert len(lines) == 1 and run.stderr.endswith("\n"), run.stderr
    assert lines[0].startswith("losscc: error: ")
    _assert_message(lines[0][len("losscc: error: "):], name, ALL[name])
    assert elapsed < TIME_LIMIT
    assert not (sandbox / "CANARY").exists(), "a spec ran code"
