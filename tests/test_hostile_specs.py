"""Hostile specs that are legal: they must build, and build correctly.

tests/test_bad_specs.py holds the hostile specs that are refused. These are the ones that get
through, on purpose: names spelled like C keywords, C library and prelude identifiers, and
names whose prefixed or suffixed C spellings could meet (int and x_int, y and y_L); text
(summary, doc, reference, the docs of inputs, params and variants) full of what would end a
Python string or a C comment or start a jinja2 tag; a spec folder whose name holds a
backslash and a line break before the '/', which a C compiler splices into '*/'. One build of
two small losses, then: both compile (so no C comment was ended early), the generated
__init__.py parses, kernels.c keeps every payload inside its comments, each docstring holds
the spec's text exactly, and both losses compute what their formulas say.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess

import numpy as np
import pytest

import losscc
from losscc.build import build
from losscc.derive import derive
from losscc.export import export
from losscc.spec import parse_spec

# Everything that would break out of a string or comment if written into generated code
# as is. The summary is one line (it is also a line of the package's docstring).
SUMMARY = (r'''Quotes """ and ''' + "'''" + r''', \""" escaped, */ and /* in C, // and ??/ too, '''
           r'''{{ 7 * 7 }} and {% raw %}, # no comment, \n \x00 \N{BULLET} \u0041 as text; ends in \\''')
DOC = (r'''Breaks out of nothing: """ ''' + "'''" + r''' \ \\ \" \' and "''' + "\n"
       "*/ system(\"touch CANARY\"); /* -- ??/\n"
       "{{ lipsum.__globals__ }} {% for x in range(9) %}{{ x }}{% endfor %} {# jinja comment #}\n"
       "Tab\there, non-ASCII: é 中文 🙂, and a last backslash \\")
REFERENCE = '"""; __import__("os").system("touch CANARY"); """'
PARAM_DOC = '*/ #include "hostile.h" static int x = system("touch CANARY"); /*'
VARIANT_DOC = "{{ 7 * 7 }}' \"\"\" \\"
INPUT_DOC = "'''\"\"\"\\"


def _yaml(text: str) -> str:
    """A YAML double-quoted scalar holding `text` exactly (JSON's escapes are YAML's)."""
    import json

    return json.dumps(text, ensure_ascii=False)


NAMES_SPEC = f"""\
# A loss named like a C type, aliases like C keywords; inputs and params named like C
# keywords, math.h macros and losscc's own prelude functions; let names like C statements.
name: double
aliases: [static, main]
summary: {_yaml(SUMMARY)}
reference: {_yaml(REFERENCE)}
doc: {_yaml(DOC)}
inputs:
  int: {{doc: {_yaml(INPUT_DOC)}}}
  x_int: {{}}
  lcc_exp: {{}}
params:
  NAN: {{default: 0.5, doc: {_yaml(PARAM_DOC)}}}
  errno: {{default: 2.0}}
variants:
  struct: {{values: [signed, unsigned], default: signed, doc: {_yaml(VARIANT_DOC)}}}
let:
  goto: int - x_int * lcc_exp
  register: goto * goto
loss: where(struct == 'signed', errno * register, NAN * sqrt(register + 1))
"""

# A row loss whose names meet the lane arrays of the row kernels (templates/rows.c.j2): y_L
# and s_L before y and s; and two class-index inputs, each gathered.
ROWS_SPEC = """\
name: goto
summary: Two class indices and per-row scalars named to meet the lane arrays.
reference: none
inputs:
  pred: {row: true}
  y_L: {index_into: pred}
  y: {index_into: pred}
  s_L: {}
  s: {}
loss: logsumexp(pred) - pred[y] - pred[y_L] + s * s_L
"""


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    # Folders 'specs *' and ' #error comment ended *\<newline>': the spec's path, written into
    # a C comment, holds '*/' and '*\<newline>/', which a C compiler splices into '*/'.
    folder = root / "specs */ #error comment ended *\\\n"
    folder.mkdir(parents=True)
    (folder / "double.yaml").write_text(NAMES_SPEC, encoding="utf-8")
    (folder / "goto.yaml").write_text(ROWS_SPEC, encoding="utf-8")
    report = build([folder], out=root / "out", name="hostile_losses", log=lambda *a: None)
    return report.path, losscc.load(report.path), folder


def test_the_spec_text_is_what_the_spec_says():
    spec = parse_spec(NAMES_SPEC)
    assert (spec.summary, spec.doc, spec.reference) == (SUMMARY, DOC, REFERENCE)
    assert spec.params[0].doc == PARAM_DOC and spec.variants[0].doc == VARIANT_DOC
    assert spec.inputs[0].doc == INPUT_DOC


def test_generated_python_parses_and_lists_each_summary(hostile):
    path, _, _ = hostile
    tree = ast.parse((path / "__init__.py").read_text(encoding="utf-8"))
    doc = ast.get_docstring(tree, clean=False)
    assert "    double (static, main): " + SUMMARY + "\n" in doc
    assert "    goto: Two class indices" in doc
    # the module holds its docstring, an import and one call: nothing a summary added
    assert [type(n).__name__ for n in tree.body] == ["Expr", "ImportFrom", "Expr"]


def test_payloads_stay_in_c_comments(hostile):
    path, _, folder = hostile
    c = (path / "kernels.c").read_text(encoding="utf-8")
    assert str(folder) not in c  # the path's line break was not written as one
    code = c.replace("\\\n", "")  # what the compiler sees: lines spliced first ...
    code = re.sub(r"/\*.*?\*/", " ", code, flags=re.S)  # ... then comments removed
    code = re.sub(r"//[^\n]*", " ", code)
    for payload in ("#error", "comment ended", "CANARY", "system(", "hostile.h"):
        assert payload not in code


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
def test_exported_header_keeps_the_summary_in_its_comment(hostile, tmp_path):
    _, _, folder = hostile
    h, _ = export([folder], out=tmp_path, name="hostile", log=lambda *a: None)
    text = h.read_text(encoding="utf-8")
    assert "/* ---- double (static, main): Quotes" in text
    subprocess.run(["cc", "-std=c99", "-fsyntax-only", "-x", "c", str(h)], check=True, capture_output=True)


def test_docstrings_hold_the_spec_text_exactly(hostile):
    _, losses, _ = hostile
    assert losses.static is losses.double is losses.main is losses.LOSSES["double"]
    doc = losses.double.__doc__
    assert doc.startswith(SUMMARY + "\n\n" + DOC + "\n\n")
    assert "\nReference: " + REFERENCE in doc
    assert f"    int (differentiable): {INPUT_DOC}\n" in doc
    assert f"    NAN = 0.5: {PARAM_DOC}\n" in doc
    assert f"    struct in ['signed', 'unsigned'], default 'signed': {VARIANT_DOC}\n" in doc


@pytest.mark.parametrize("struct", ["signed", "unsigned"])
def test_the_c_keyword_loss_computes_its_formula(hostile, struct):
    _, losses, _ = hostile
    rng = np.random.default_rng(7)
    a, b, c = (rng.normal(size=(5, 3)) for _ in range(3))
    loss = losses.double(NAN=0.25, errno=3.0, struct=struct)
    value, grad = loss.value_and_grad(a, b, c)
    e = a - b * c
    if struct == "signed":
        want, dwant = 3.0 * e * e, 6.0 * e
    else:
        want, dwant = 0.25 * np.sqrt(e * e + 1), 0.25 * e / np.sqrt(e * e + 1)
    np.testing.assert_allclose(value, want.mean(axis=1), rtol=1e-13)
    np.testing.assert_allclose(grad, dwant / 3, rtol=1e-13)  # the per-sample mean's gradient
    assert np.array_equal(loss(int=a, x_int=b, lcc_exp=c), value)  # C keywords as keywords


@pytest.mark.parametrize("nc", [5, 300])  # short rows run in vector lanes, long ones do not
def test_the_lane_named_row_loss_computes_its_formula(hostile, nc):
    _, losses, _ = hostile
    rng = np.random.default_rng(nc)
    nb = 37
    pred = rng.normal(size=(nb, nc))
    y_L, y = rng.integers(0, nc, nb), rng.integers(0, nc, nb)
    s_L, s = rng.normal(size=nb), rng.normal(size=nb)
    value, grad = losses.goto().value_and_grad(pred, y_L, y, s_L, s)
    m = pred.max(axis=1, keepdims=True)
    lse = (m + np.log(np.exp(pred - m).sum(axis=1, keepdims=True)))[:, 0]
    rows = np.arange(nb)
    np.testing.assert_allclose(value, lse - pred[rows, y] - pred[rows, y_L] + s * s_L, rtol=1e-12, atol=1e-12)
    want = np.exp(pred - lse[:, None])
    np.add.at(want, (rows, y), -1.0)
    np.add.at(want, (rows, y_L), -1.0)
    np.testing.assert_allclose(grad, want, rtol=1e-12, atol=1e-14)


HEADER = "name: demo\nsummary: A demo loss.\nreference: none\ninputs:\n  pred: {}\n  label: {}\n"


@pytest.mark.parametrize("loss, check", [
    # exponents composed past the literal limit of 64: sympy folds them, C calls pow()
    ("((((pred**64)**64)**64)**64)", lambda v, x: v.value == x**16777216),
    # 99 nested square roots: a root chain stays small however deep
    ("sqrt(" * 99 + "pred" + ")" * 99, lambda v, x: v.value == x**(sympy_rational(1, 2**99))),
    # a 300-digit integer: under the 400 digits allowed and within double
    ("pred * " + "9" * 300, lambda v, x: v.grads[0] == 10**300 - 1),
], ids=["pow_tower", "sqrt_chain", "big_integer"])
def test_accepted_exhaustion_specs_derive_quickly(loss, check):
    sym = derive(parse_spec(HEADER + f"loss: {loss}\n"))
    x = sym.symbols["pred"]
    assert check(sym.variants[0], x)


def sympy_rational(p, q):
    import sympy

    return sympy.Rational(p, q)
