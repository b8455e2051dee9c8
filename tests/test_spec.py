"""The spec stage on good specs: what load_spec/parse_spec return, and where things are."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from losscc.build import _check_unique, build
from losscc.derive import derive
from losscc.errors import SpecError
from losscc.ir import Loc
from losscc.spec import load_spec, parse_spec, spec_files

from conftest import SPECS

CATALOGUE = sorted(SPECS.glob("*.yaml"))

# Line numbers on the left are the file's, for reading the expected locations below.
DEMO = """\
name: demo
aliases: [DemoLoss]
summary: A demo loss.
reference: none
inputs:
  pred: {}
  label: {doc: the target}
  w: {default: 1.0}
params:
  rho: {default: 1.0, gt: 0}
  eps:
    default: 1e-12
    min: 0
variants:
  fmt: {values: [signed, binary], default: signed}
  flag: {values: [false, true], default: false}
let:
  e: pred - label
  z: "where(fmt == 'signed', e, -e)"
loss: rho * z**2 * w + eps
examples:
  - {pred: 1.0, label: 0.0, loss: 1.0}
  - {pred: 1e-3, label: 0, fmt: binary, flag: true, rho: 2, loss: 2.5, grad: 2.0}
"""


@pytest.fixture(scope="module")
def demo():
    return parse_spec(DEMO, "demo.yaml")


# ---------------------------------------------------------------------------- the catalogue


@pytest.mark.parametrize("path", CATALOGUE, ids=lambda p: p.name)
def test_every_catalogue_spec_loads(path):
    spec = load_spec(path)
    assert spec.name == path.stem
    assert spec.path == str(path)
    assert spec.loc == Loc(str(path), 1, 7)  # 'name: ' is 6 characters
    assert spec.source_hash == hashlib.sha256(path.read_bytes()).hexdigest()
    assert spec.pred is spec.inputs[0] and spec.pred.differentiable and spec.pred.default is None
    assert spec.summary and spec.reference and spec.loss.text.strip()
    assert spec.examples, "every catalogue loss carries hand-checked examples"


def test_catalogue_names_and_aliases_are_unique():
    specs = [load_spec(p) for p in CATALOGUE]
    _check_unique(specs)
    assert spec_files([SPECS]) == CATALOGUE


def test_huber_locations():
    path = str(SPECS / "huber.yaml")
    spec = load_spec(path)
    assert [(i.name, i.loc) for i in spec.inputs] == [("pred", Loc(path, 8, 3)), ("label", Loc(path, 9, 3))]
    (rho,) = spec.params
    assert (rho.name, rho.loc, rho.default, rho.gt, rho.min) == ("rho", Loc(path, 11, 3), 1.0, 0.0, None)
    # 'loss: |' on line 13: the formula starts on line 14, at the block's indentation
    assert spec.loss.loc == Loc(path, 14, 3)
    assert spec.loss.text.startswith("where(abs(label - pred) > rho,\n")
    assert [e.loc for e in spec.examples] == [Loc(path, 19, 5), Loc(path, 21, 5), Loc(path, 23, 5)]
    assert spec.examples[2].options == {"rho": 0.5}
    assert spec.examples[2].inputs == {"pred": 0.8, "label": 1.0}


# ---------------------------------------------------------------------------- a full spec


def test_demo_locations(demo):
    f = "demo.yaml"
    assert demo.loc == Loc(f, 1, 7)
    assert [(i.name, i.loc) for i in demo.inputs] == [
        ("pred", Loc(f, 6, 3)), ("label", Loc(f, 7, 3)), ("w", Loc(f, 8, 3))]
    # a param's loc is its key, whether its fields are a flow mapping or a block mapping
    assert [(p.name, p.loc) for p in demo.params] == [("rho", Loc(f, 10, 3)), ("eps", Loc(f, 11, 3))]
    assert [(v.name, v.loc) for v in demo.variants] == [("fmt", Loc(f, 15, 3)), ("flag", Loc(f, 16, 3))]
    (e_name, e), (z_name, z) = demo.let
    assert (e_name, e.text, e.loc) == ("e", "pred - label", Loc(f, 18, 6))
    # a quoted formula starts after the quote: '  z: "' is 6 characters
    assert (z_name, z.text, z.loc) == ("z", "where(fmt == 'signed', e, -e)", Loc(f, 19, 7))
    assert (demo.loss.text, demo.loss.loc) == ("rho * z**2 * w + eps", Loc(f, 20, 7))
    assert demo.loss.positions[0] == (20, 7) and demo.loss.positions[-1] == (20, 26)
    assert [e.loc for e in demo.examples] == [Loc(f, 22, 5), Loc(f, 23, 5)]


def test_demo_values(demo):
    assert demo.aliases == ("DemoLoss",)
    assert [(i.differentiable, i.default, i.doc) for i in demo.inputs] == [
        (True, None, ""), (False, None, "the target"), (False, 1.0, "")]
    rho, eps = demo.params
    assert (rho.default, rho.gt, rho.min, rho.max, rho.lt) == (1.0, 0.0, None, None, None)
    assert (eps.default, eps.min) == (1e-12, 0.0)
    assert all(type(v) is float for v in (rho.default, rho.gt, eps.default, eps.min))
    fmt, flag = demo.variants
    assert (fmt.values, fmt.default) == (("signed", "binary"), "signed")
    assert (flag.values, flag.default) == ((False, True), False)
    assert demo.positional == ("rho", "eps", "fmt", "flag", "weight", "batch_axis")
    ex0, ex1 = demo.examples
    assert (ex0.inputs, ex0.options, ex0.loss, ex0.grad) == ({"pred": 1.0, "label": 0.0}, {}, 1.0, None)
    assert ex1.inputs == {"pred": 1e-3, "label": 0.0}
    assert ex1.options == {"fmt": "binary", "flag": True, "rho": 2.0}
    assert (ex1.loss, ex1.grad) == (2.5, 2.0)
    assert demo.source_hash == hashlib.sha256(DEMO.encode()).hexdigest()


def test_parse_spec_default_label():
    with pytest.raises(SpecError) as exc:
        parse_spec("name: demo\n")
    assert str(exc.value) == "<spec>:1:1: missing required key 'summary'"


def test_null_input_options_mean_defaults():
    spec = parse_spec("name: d\nsummary: s\nreference: r\ninputs:\n  pred:\n  label:\nloss: pred\n", "n.yaml")
    assert [(i.name, i.differentiable, i.default) for i in spec.inputs] == [
        ("pred", True, None), ("label", False, None)]


# ---------------------------------------------------------------------------- numbers

NUMBER_SPEC = "name: d\nsummary: s\nreference: r\ninputs:\n  pred: {}\nparams:\n  eps: {default: %s}\nloss: pred\n"


@pytest.mark.parametrize("text, value", [
    ("1e-12", 1e-12),  # YAML 1.1 reads this (no dot) as text; losscc reads it as the number
    ("1E-12", 1e-12),
    ("1e+3", 1000.0),
    ("1.0e-8", 1e-8),  # a YAML 1.1 float
    ("3", 3.0),
    ("-0.5", -0.5),
    ("1_000", 1000.0),  # a YAML 1.1 int
])
def test_numbers(text, value):
    (eps,) = parse_spec(NUMBER_SPEC % text, "n.yaml").params
    assert eps.default == value and type(eps.default) is float


@pytest.mark.parametrize("text, message", [
    # '  eps: {default: ': the value is column 18 of line 7
    ("'1e-12'", "n.yaml:7:18: default of param 'eps' must be a number, got '1e-12'"),  # quoted: text
    ("one", "n.yaml:7:18: default of param 'eps' must be a number, got 'one'"),
    ("true", "n.yaml:7:18: default of param 'eps' must be a number, got True"),
    (".inf", "n.yaml:7:18: default of param 'eps' must be finite, got inf"),
    ("nan", "n.yaml:7:18: default of param 'eps' must be finite, got nan"),
    ("[1]", "n.yaml:7:18: default of param 'eps' must be a single value, got a list"),
])
def test_not_numbers(text, message):
    with pytest.raises(SpecError) as exc:
        parse_spec(NUMBER_SPEC % text, "n.yaml")
    assert str(exc.value) == message


# ---------------------------------------------------------------------------- block scalars

BLOCK_HEAD = "name: d\nsummary: s\nreference: r\ninputs:\n  pred: {}\n  label: {}\n"  # 6 lines


def _derive_error(text: str) -> str:
    spec = parse_spec(text, "b.yaml")  # the spec stage accepts the formula text
    with pytest.raises(SpecError) as exc:
        derive(spec)
    return str(exc.value)


def test_block_scalar_line_starts():
    spec = parse_spec(BLOCK_HEAD + "loss: |\n  exp(pred)\n\n  + label\n", "b.yaml")
    assert spec.loss.text == "exp(pred)\n\n+ label\n"
    assert spec.loss.loc == Loc("b.yaml", 8, 3)
    assert spec.loss.positions[0] == (8, 3)                      # 'e' of exp
    assert spec.loss.positions[spec.loss.text.index("+")] == (10, 3)


def test_syntax_error_on_line_2_of_a_literal_block():
    # line 7 'loss: |', line 8 '  exp(pred) +', line 9 '  label - * pred': the '*' is column 11
    text = BLOCK_HEAD + "loss: |\n  exp(pred) +\n  label - * pred\n"
    assert _derive_error(text) == "b.yaml:9:11: loss: syntax error: invalid syntax"


def test_error_after_a_blank_line_of_a_literal_block():
    text = BLOCK_HEAD + "loss: |\n  exp(pred)\n\n  + expp(label)\n"
    assert _derive_error(text).startswith("b.yaml:10:5: loss: unknown function 'expp' (known: ")


def test_error_in_a_stripped_block_with_deeper_indentation():
    text = BLOCK_HEAD + "loss: |-\n    exp(pred)\n    + expp(label)\n"
    assert _derive_error(text).startswith("b.yaml:9:7: loss: unknown function 'expp' (known: ")


def test_error_in_a_block_let():
    text = BLOCK_HEAD + "let:\n  e: |\n    pred -\n    lable\nloss: e**2\n"
    assert _derive_error(text) == "b.yaml:10:5: let 'e': unknown name 'lable' (known: E, label, pi, pred)"


@pytest.mark.parametrize("loss, where", [
    # huber.yaml's shape: the continuation is aligned under 'where(' - 'expp' is column 9
    ("loss: |\n  where(pred > 0,\n        expp(pred), 0)\n", "9:9"),
    ("loss: |2\n    exp(pred)\n    + expp(label)\n", "9:7"),  # explicit indentation indicator
    ("loss: >\n  exp(pred)\n  + expp(label)\n", "9:5"),  # folded
    ("loss: exp(pred)\n  + expp(label)\n", "8:5"),  # plain, over two lines
])
def test_error_location_in_multi_line_formulas(loss, where):
    assert _derive_error(BLOCK_HEAD + loss).startswith(f"b.yaml:{where}: loss: unknown function 'expp'")


# ---------------------------------------------------------------------------- variant combinations


def test_variant_combos_order():
    # The first variant varies slowest, each in its listed order.
    spec = parse_spec(BLOCK_HEAD + "variants:\n  a: {values: [x, y, z], default: x}\n"
                      "  b: {values: [true, false], default: true}\nloss: pred\n", "v.yaml")
    assert spec.variant_combos() == [
        {"a": "x", "b": True}, {"a": "x", "b": False},
        {"a": "y", "b": True}, {"a": "y", "b": False},
        {"a": "z", "b": True}, {"a": "z", "b": False},
    ]


def test_variant_combos_of_the_catalogue():
    assert load_spec(SPECS / "l2.yaml").variant_combos() == [{}]
    assert load_spec(SPECS / "sigmoid_bce.yaml").variant_combos() == [
        {"from_sigmoid": False}, {"from_sigmoid": True}]
    assert load_spec(SPECS / "poisson_nll.yaml").variant_combos() == [
        {"from_logits": True, "compute_full": False}, {"from_logits": True, "compute_full": True},
        {"from_logits": False, "compute_full": False}, {"from_logits": False, "compute_full": True},
    ]


# ---------------------------------------------------------------------------- other spec rules

RULES_HEAD = "name: demo\nsummary: A demo loss.\nreference: none\n"  # 3 lines


@pytest.mark.parametrize("body, message", [
    ("inputs:\n  pred: {differentiable: false}\nloss: pred\n",
     "5:3: the first input 'pred' is the prediction and must be differentiable"),
    ("inputs:\n  pred: {default: 1.0}\nloss: pred\n", "5:10: the prediction 'pred' cannot have a default"),
    ("inputs:\n  pred: {}\n  w: {default: 1.0}\n  label: {}\nloss: pred\n",
     "7:3: input 'label' has no default but follows an optional input"),
    ("inputs: {}\nloss: pred\n", "4:9: inputs must list at least the prediction"),
    ("aliases: [Demo, Demo]\ninputs:\n  pred: {}\nloss: pred\n", "4:17: alias 'Demo' is listed twice"),
    ("inputs:\n  pred: {}\nvariants:\n  v: {values: [a, true], default: a}\nloss: pred\n",
     "7:15: values of variant 'v' must be all booleans or all names"),
    ("inputs:\n  pred: {}\nvariants:\n  v: {values: [a, a], default: a}\nloss: pred\n",
     "7:19: value 'a' repeated in variant 'v' (values name kernels: case does not count)"),
    # kernel names lower-case the values, so values that differ only in case would collide
    ("inputs:\n  pred: {}\nvariants:\n  v: {values: [Signed, signed], default: signed}\nloss: pred\n",
     "7:24: value 'signed' repeated in variant 'v' (values name kernels: case does not count)"),
    ("inputs:\n  pred: {}\nvariants:\n  v: {values: [true, false], default: 'true'}\nloss: pred\n",
     "7:39: default 'true' of variant 'v' is not one of [True, False]"),
    ("inputs:\n  pred: {}\npositional: [weight, weight]\nloss: pred\n", "6:22: positional: 'weight' is listed twice"),
    ("inputs:\n  pred: {}\nloss: '  '\n", "6:7: loss is empty"),
    ("inputs:\n  pred: {}\nvariants:\n  v: {values: [a, b], default: a}\nloss: pred\n"
     "examples:\n  - {pred: 1.0, v: c, loss: 1.0}\n", "10:20: example v: 'c' is not one of ['a', 'b']"),
    ("inputs:\n  pred: {}\nloss: pred\nexamples:\n  - {pred: 1.0, pred: 2.0, loss: 1.0}\n",
     "8:17: duplicate key 'pred' in an example (first at line 8)"),
    # plot: which inputs `losscc plot` fixes, x marking the one element that varies
    ("inputs:\n  pred: {}\n  label: {differentiable: true}\nloss: pred\nplot: {pred: x, label: x}\n",
     "8:24: plot: exactly one x must mark the element that varies (found 2)"),
    ("inputs:\n  pred: {}\n  label: {}\nloss: pred\nplot: {pred: 1, label: 0}\n",
     "8:7: plot: exactly one x must mark the element that varies (found 0)"),
    ("inputs:\n  pred: {}\n  label: {}\nloss: pred\nplot: {pred: 0, label: x}\n",
     "8:24: plot label: x must mark an element of a differentiable input (its gradient is drawn)"),
    ("inputs:\n  pred: {}\n  label: {}\nloss: pred\nplot: {pred: [x, 1], label: 0}\n",
     "8:14: plot pred: a list is a row, for row inputs only"),
    ("inputs:\n  pred: {}\n  label: {}\nloss: pred\nplot: {pred: x}\n", "8:7: plot needs a value for label"),
    ("inputs:\n  pred: {}\nloss: pred\nplot: {pred: x, lable: 0}\n",
     "7:17: unknown key 'lable' in plot (allowed: pred)"),
    ("inputs:\n  pred: {}\n  label: {}\nloss: pred\nplot: {pred: x, label: one}\n",
     "8:24: plot label must be a number, got 'one'"),
])
def test_other_spec_rules(body, message):
    with pytest.raises(SpecError) as exc:
        parse_spec(RULES_HEAD + body, "r.yaml")
    assert str(exc.value) == "r.yaml:" + message


# ---------------------------------------------------------------------------- across files


def _two_specs(tmp_path: Path, second: str) -> tuple[Path, Path]:
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    shutil.copy(SPECS / "l2.yaml", a)
    b.write_text(second)
    return a, b


def test_duplicate_loss_name_across_files_names_the_second_file(tmp_path):
    a, b = _two_specs(tmp_path, (SPECS / "l2.yaml").read_text())
    out = tmp_path / "out"
    with pytest.raises(SpecError) as exc:
        build([a, b], out=out, log=lambda *_: None)
    assert str(exc.value) == f"{b}:1:7: loss name 'l2' is already used by {a} (l2)"
    assert not out.exists()  # refused before anything is written


def test_a_name_equal_to_an_earlier_alias_is_a_duplicate(tmp_path):
    a, b = _two_specs(tmp_path, (SPECS / "l1.yaml").read_text().replace("name: l1", "name: L2Loss", 1))
    with pytest.raises(SpecError) as exc:
        _check_unique([load_spec(a), load_spec(b)])
    assert str(exc.value) == f"{b}:1:7: loss name 'L2Loss' is already used by {a} (l2)"


def test_a_duplicate_alias_is_located_at_the_alias(tmp_path):
    # b.yaml is l1.yaml with 'aliases: [L2Loss]': the alias is column 11 of line 2
    a, b = _two_specs(tmp_path, (SPECS / "l1.yaml").read_text().replace("[L1Loss]", "[L2Loss]", 1))
    with pytest.raises(SpecError) as exc:
        _check_unique([load_spec(a), load_spec(b)])
    assert str(exc.value) == f"{b}:2:11: loss name 'L2Loss' is already used by {a} (l2)"
