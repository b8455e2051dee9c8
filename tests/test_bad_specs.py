"""Broken and malicious specs: each is refused with one exact, located message, runs no code,
and fails fast, in process and through the CLI.

The corpus is tests/bad_specs/*.yaml (one problem per file) plus a few generated here (too big
to commit). Every expected message below was worked out by hand from the file: LINE:COL is
1-based and points at the offending character. Every spec runs in a sandbox (a temp copy of
tests/bad_specs as the working directory), so `touch CANARY` would create <sandbox>/CANARY,
which the tests check never exists. Through the CLI each refusal must come within TIME_LIMIT
seconds and MEMORY_LIMIT of peak memory (the process's own peak RSS: see _CLI).

Hostile specs that are refused here have accepted counterparts (C keywords as names, docs full
of quotes, backslashes and comment ends) in tests/test_hostile_specs.py, which builds them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from losscc import codegen, expr as expr_stage, spec as spec_stage
from losscc.codegen import generate
from losscc.derive import derive
from losscc.errors import BuildError, SpecError
from losscc.spec import load_spec

ROOT = Path(__file__).resolve().parent.parent
REL = "tests/bad_specs"  # as given on the command line, so messages start with it
TIME_LIMIT = 5.0  # seconds for one refusal
HARD_TIMEOUT = 6.0  # a subprocess still running after this is killed (and the test fails)
# Peak memory of one refusal through the CLI. Measured: at most 71 MiB for every case here
# (the interpreter with sympy loaded is some 60); before the limits, 30 boolean variants took
# 20 GiB and a 40-deep let chain or 99 nested exp never finished.
MEMORY_LIMIT = 512 * 2**20

# By hand from losscc/expr.py FUNCTIONS, sorted as Python sorts str (capitals first).
KNOWN_FUNCTIONS = ("Abs, Max, Min, Piecewise, abs, clip, cosh, exp, expm1, log, log1p, log_cosh, log_sigmoid, "
                   "max, min, relu, sigmoid, sign, softplus, sqrt, square, tanh, where")
TOP_KEYS = "name, aliases, summary, reference, doc, inputs, params, variants, positional, axis, let, loss, examples, accuracy, plot"
RESERVED = "axis, batch_axis, grad_out, hess_out, out, reduction, sample_weight, self, weight, wrt"
IDENT = "must be an ASCII Python identifier, not a keyword, not starting with '_'"
OS_SYSTEM_TAG = "tag:yaml.org,2002:python/object/apply:os.system"
KERNEL_SEP = "which separates the parts of kernel names (lcc_<name>__<variant>__<mode>)"
TEXT_ONLY = "only tab and newline may be used in spec text"
COST_HINT = "(a let counts once per use; nested functions and long products grow fastest)"


@dataclass(frozen=True)
class Case:
    stage: str  # "spec": load_spec refuses it; "expr": load_spec accepts it, derive refuses it;
    #            "gen": derive accepts it, codegen refuses it (a BuildError)
    message: str | re.Pattern  # after "tests/bad_specs/<file>:"; a str is compared exactly
    bug: str | None = None  # a losscc bug: the case is xfail(strict=True) with this reason
    isolate: bool = False  # may hang the interpreter: run in a killable subprocess


def spec(message, **kw):
    return Case("spec", message, **kw)


def expr(message, **kw):
    return Case("expr", message, **kw)


def gen(message, **kw):
    return Case("gen", message, **kw)


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
    # The canonical billion laughs at the top level: 'lol1: &lol1 [...]', the anchor is column 7
    "yaml_billion_laughs.yaml": spec("1:7: YAML anchors and aliases are not allowed in specs"),
    # 'doc: *undefined': an alias alone (no anchor anywhere) is refused as such, at column 6
    "yaml_alias.yaml": spec("7:6: YAML anchors and aliases are not allowed in specs"),
    "yaml_merge_key.yaml": spec("7:1: YAML merge keys (<<) are not allowed in specs"),
    # 'loss: !!python/name:os.system': the tagged scalar starts at column 7
    "yaml_python_name.yaml": spec("7:7: YAML tag 'tag:yaml.org,2002:python/name:os.system' is not allowed in specs"),
    # 'doc: !!python/module:os', and the safe-looking tags below: the tag is column 6
    "yaml_python_module.yaml": spec("7:6: YAML tag 'tag:yaml.org,2002:python/module:os' is not allowed in specs"),
    "yaml_binary.yaml": spec("7:6: YAML tag 'tag:yaml.org,2002:binary' is not allowed in specs"),
    "yaml_set.yaml": spec("7:6: YAML tag 'tag:yaml.org,2002:set' is not allowed in specs"),
    "yaml_timestamp_tag.yaml": spec("7:6: YAML tag 'tag:yaml.org,2002:timestamp' is not allowed in specs"),
    "yaml_custom_tag.yaml": spec("7:6: YAML tag '!foo' is not allowed in specs"),
    # '%TAG !py! tag:yaml.org,2002:python/object/apply:' then '---': line 4 is
    # 'summary: !py!os.system [...]', the tag expands to os.system's, at column 10
    "yaml_tag_directive.yaml": spec(f"4:10: YAML tag '{OS_SYSTEM_TAG}' is not allowed in specs"),
    "yaml_verbatim_tag.yaml": spec(f"7:6: YAML tag '{OS_SYSTEM_TAG}' is not allowed in specs"),
    # a payload in a second document is refused too (line 9, after '---' on line 8) ...
    "yaml_second_document.yaml": spec(f"9:7: YAML tag '{OS_SYSTEM_TAG}' is not allowed in specs"),
    # ... and a plain second document at its '---'
    "yaml_second_document_plain.yaml": spec(
        "8:1: invalid YAML: expected a single document in the stream, but found another document"),
    # 'summary: 2001-12-14' unquoted: YAML's implicit timestamp, at column 10
    "yaml_implicit_date.yaml": spec("2:10: summary reads as a date; quote it if it is text"),
    # '? [loss, doc]': a list as a key, at column 3
    "yaml_complex_key.yaml": spec("7:3: keys of the spec must be plain names, got a list"),
    # ------------------------------------------------------------------ names
    "name_not_identifier.yaml": spec(f"1:7: name 'my-loss' {IDENT}"),
    "name_keyword.yaml": spec(f"6:3: input name 'lambda' {IDENT}"),
    "name_dunder.yaml": spec(f"8:3: let name '__class__' {IDENT}"),
    "reserved_weight.yaml": spec(f"8:3: param name 'weight' is reserved by the runtime (reserved: {RESERVED})"),
    "reserved_sample_weight.yaml": spec(
        f"6:3: input name 'sample_weight' is reserved by the runtime (reserved: {RESERVED})"),
    "name_clash.yaml": spec("8:3: param name 'label' is already used by the input at line 6"),
    "name_return.yaml": spec(f"1:7: name 'return' {IDENT}"),
    # name: '"; system("touch CANARY"); //' -- quoted, at column 7; shown as its repr
    "name_c_injection.yaml": spec(f"""1:7: name '"; system("touch CANARY"); //' {IDENT}"""),
    # '  pr\u00ebd: {}' (an e with diaeresis) and 'd\u0435mo' (a Cyrillic e): the character is named
    "name_non_ascii.yaml": spec(f"5:3: input name 'pr\u00ebd' {IDENT} ('\u00eb' is U+00EB, not ASCII)"),
    "name_homoglyph.yaml": spec(f"1:7: name 'd\u0435mo' {IDENT} ('\u0435' is U+0435, not ASCII)"),
    "name_double_underscore.yaml": spec(f"1:7: name 'demo__base' contains '__', {KERNEL_SEP}"),
    # 'aliases: [LOSSES]': the generated package's own attribute; the alias is column 11
    "name_package_attribute.yaml": spec(
        "2:11: alias 'LOSSES' is reserved: the built package lists its losses under it"),
    # 100 a's: shown as the repr cut to 60 characters (the quote, 56 a's, '...')
    "name_too_long.yaml": spec(f"1:7: name '{'a' * 56}... is 100 characters long, more than the 64 allowed"),
    # an input named exp: refused where the math is read (line 6 is '  exp: {}')
    "name_builtin_function.yaml": expr("6:3: 'exp' is the name of a built-in function; rename it"),
    # '  fmt: {values: [plain, ...]}': the second value is column 25
    "variant_value_comment_end.yaml": spec(
        """8:25: values of variant 'fmt' must be true/false or ASCII names, got '*/ system("touch CANARY"); /*'"""),
    "variant_value_quotes.yaml": spec(
        """8:25: values of variant 'fmt' must be true/false or ASCII names, got 'a"b\\\\c\\'d'"""),
    # '  a: {values: [p, p__b_q], ...}': with b's values q__b_r, r both combinations would name
    # kernels lcc_demo__a_p__b_q__b_r__...; 'p__b_q' is column 19
    "variant_value_double_underscore.yaml": spec(f"8:19: value 'p__b_q' of variant 'a' contains '__', {KERNEL_SEP}"),
    # ------------------------------------------------------------------ text: docs and summaries
    # escapes in double quotes make what no file shows; located at the scalar (its quote)
    "doc_nul.yaml": spec(f"2:10: summary contains U+0000, a control character: {TEXT_ONLY}"),
    "doc_carriage_return.yaml": spec(f"2:10: summary contains U+000D, a control character: {TEXT_ONLY}"),
    "doc_ansi_escape.yaml": spec(f"7:6: doc contains U+001B, a control character: {TEXT_ONLY}"),
    "doc_bidi_override.yaml": spec(f"7:6: doc contains U+202E, a bidirectional control: {TEXT_ONLY}"),
    "doc_lone_surrogate.yaml": spec(
        f"3:12: reference contains U+D800, a lone surrogate (not valid Unicode): {TEXT_ONLY}"),
    # '  pred: {doc: "\a"}': an input's doc, the quote at column 15
    "doc_input_bell.yaml": spec(f"5:15: doc contains U+0007, a control character: {TEXT_ONLY}"),
    # ------------------------------------------------------------------ how much a spec may declare
    # line 5 is pred, x1..x16 are lines 6-21: x16 is the 17th input
    "too_many_inputs.yaml": spec("21:3: more than 16 inputs"),
    # 'params:' is line 7, p1..p33 lines 8-40
    "too_many_params.yaml": spec("40:3: more than 32 params"),
    # 'let:' is line 7, a1..a101 lines 8-108
    "too_many_lets.yaml": spec("108:3: more than 100 let definitions"),
    # 30 boolean variants (2**30 combinations); v5 (line 12) brings them past 16: its list is
    # column 16 of '  v5: {values: [true, false], ...}'
    "variant_combinations.yaml": spec(
        "12:16: variant 'v5' brings the combinations of variant values to 32, more than the 16 allowed "
        "(each is derived and compiled on its own)"),
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
    "expr_eval_call.yaml": expr(f"7:7: loss: unknown function 'eval' (known: {KNOWN_FUNCTIONS})"),
    "expr_getattr.yaml": expr(f"7:7: loss: unknown function 'getattr' (known: {KNOWN_FUNCTIONS})"),
    # ().__class__.__base__.__subclasses__(): the called attribute starts at the formula's start
    "expr_subclasses.yaml": expr("7:7: loss: attribute access is not allowed in a loss expression"),
    "expr_builtins_name.yaml": expr("7:7: loss: unknown name '__builtins__' (known: E, label, pi, pred)"),
    # 'loss: exp(p for p in ...)': Python puts the generator at the call's '(', column 10
    "expr_generator.yaml": expr("7:10: loss: a generator is not allowed in a loss expression"),
    # 'loss: (p := pred) * p': the assignment is inside the parentheses, column 8
    "expr_walrus.yaml": expr("7:8: loss: an assignment expression is not allowed in a loss expression"),
    # 'loss: max(*pred, label)': the '*' is column 11
    "expr_starred.yaml": expr("7:11: loss: a starred argument is not allowed in a loss expression"),
    "expr_await.yaml": expr("7:7: loss: await is not allowed in a loss expression"),
    # the formula is a Python string holding a payload: text, never run; after the YAML '"', column 8
    "expr_text_payload.yaml": expr(
        "7:8: loss: must be a number-valued expression, not text, a variant or a condition"),
    # 'loss: |' then '  pred' and '  import os': a statement, refused at 'import' (line 9, column 3)
    "expr_statement.yaml": expr("9:3: loss: syntax error: invalid syntax"),
    # 'loss: \uff50red**2': Python would read the fullwidth p as 'pred' (NFKC); column 7
    "expr_fullwidth_name.yaml": expr("7:7: loss: character '\uff50' (U+FF50) is not ASCII: formulas are written in ASCII"),
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
    # ------------------------------------------------------------------ expressions: exhaustion
    # Estimated before any derivative is taken (expr.formula_cost; the sizes below are its
    # numbers, not worked out by hand); a let is counted per use.
    # a_k = a_(k-1)*a_(k-1) + a_(k-1), 40 deep (2**40 nodes as a tree): a0 is line 8, so a6
    # (the first whose second derivative is estimated at more than 10000) is line 14, column 7
    "expr_let_blowup.yaml": expr(
        f"14:7: let 'a6': too complex to differentiate: its second derivative would have about 10719 "
        f"parts, more than the 10000 allowed {COST_HINT}"),
    # exp(exp(...(pred))) 40 deep, and a product of 20 tanh (took minutes to differentiate)
    "expr_nested_exp.yaml": expr(
        f"7:7: loss: too complex to differentiate: its second derivative would have about 26321 parts, "
        f"more than the 10000 allowed {COST_HINT}"),
    "expr_tanh_product.yaml": expr(
        f"7:7: loss: too complex to differentiate: its second derivative would have about 19020 parts, "
        f"more than the 10000 allowed {COST_HINT}"),
    # where(c1, a1, where(c2, ...)) 60 deep: two pieces per where
    "expr_where_chain.yaml": expr(
        "7:7: loss: has 120 Piecewise pieces (where, if-else, Piecewise; a let counts once per use), "
        "more than the 100 allowed"),
    "row_nested_reductions.yaml": expr(
        "7:7: loss: reductions nest 4 deep, more than the 3 allowed (softmax and log_softmax hold one each)"),
    # eight log_softmax rows summed: the estimates pass, the C does not (1:7 is the loss's name;
    # the size is codegen's)
    "row_huge_kernels.yaml": gen(re.compile(
        r"1:7: demo: the C of variant 'base' is \d+ KiB, more than the 192 KiB allowed "
        r"\(a C compiler would take minutes\): simplify the formula")),
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
    # A very long line: a 200000-character name, shown cut to 60 characters
    "gen_long_name.yaml": (
        ("name: " + "a" * 200_000 + HEADER[len("name: demo"):] + "loss: pred\n").encode(),
        spec(f"1:7: name '{'a' * 56}... is 200000 characters long, more than the 64 allowed")),
    # Many keys: 'doc: {k0000: 0, k0001: 0, ...}', 3000 of them. Nodes are counted in document
    # order: the spec's mapping, 6 scalars and 2 mappings to 'label: {}' (13), 'doc' (14), its
    # mapping (15), then key and value per entry; the 5001st is the value of entry
    # (5001 - 16) // 2 = 2492. An entry 'kNNNN: 0, ' is 10 characters from column 7 ('doc: {'
    # is 6), its value 7 in: 7 + 10 * 2492 + 7
    "gen_many_keys.yaml": (
        (HEADER + "doc: {" + ", ".join(f"k{i:04d}: 0" for i in range(3000)) + "}\nloss: pred\n").encode(),
        spec("7:24934: spec has more than 5000 YAML nodes (values, lists and mappings)")),
    # Piecewise((pred*k, pred < k), ..., (pred, True)): 12 ast nodes a pair, 5 for the last, 4 for
    # the call, so 415 pairs are the most under the 5000 parts: 416 pieces
    "gen_wide_piecewise.yaml": (
        (HEADER + "loss: Piecewise(" + ", ".join(f"(pred*{k}, pred < {k})" for k in range(1, 416))
         + ", (pred, True))\n").encode(),
        expr("7:7: loss: has 416 Piecewise pieces (where, if-else, Piecewise; a let counts once per use), "
             "more than the 100 allowed")),
    # 'loss: pred * 99...9': 500 digits from column 14, refused before Python converts them
    "gen_big_integer.yaml": (
        (HEADER + "loss: pred * " + "9" * 500 + "\n").encode(),
        expr("7:14: loss: number has 500 digits, more than the 400 allowed")),
    # 10**310 has 311 digits (allowed) but no double: the constant is shown to 6 digits
    "gen_constant_overflow.yaml": (
        (HEADER + "loss: pred * 1" + "0" * 310 + "\n").encode(),
        expr("7:14: loss: constant 1.00000E+310 is beyond the range of double")),
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
    for name in ("python_tag.yaml", "python_tag_scalar.yaml", "expr_import_os.yaml", "expr_eval_call.yaml",
                 "expr_text_payload.yaml", "name_c_injection.yaml", "variant_value_comment_end.yaml",
                 "yaml_tag_directive.yaml", "yaml_verbatim_tag.yaml", "yaml_second_document.yaml"):
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
    if case.stage == "gen":  # the spec and the math are accepted: the C would be too big
        symbolic = derive(load_spec(path))
        with pytest.raises(BuildError) as exc:
            generate(symbolic)
        assert time.perf_counter() - t0 < TIME_LIMIT
        _assert_message(str(exc.value), name, case)
        return
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


# `python -m losscc.cli ...`, which writes its own peak RSS to $LOSSCC_TEST_PEAK as it exits.
# Not os.wait4's ru_maxrss: on Linux a child's starts at its parent's high-water mark (fork and
# exec keep it), so under a pytest that has built losses it measures pytest. VmHWM is the
# high-water mark of the memory the process has had since its exec.
_CLI = """
import atexit, os, re, resource, runpy, sys

def peak():
    try:
        with open("/proc/self/status") as f:
            found = int(re.search(r"VmHWM:\\s+(\\d+) kB", f.read())[1]) * 1024
    except (OSError, TypeError):  # no /proc (macOS: ru_maxrss in bytes, and not inherited)
        found = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with open(os.environ["LOSSCC_TEST_PEAK"], "w") as f:
        f.write(str(found))

atexit.register(peak)
sys.argv[0] = "losscc"
runpy.run_module("losscc.cli", run_name="__main__", alter_sys=True)
"""


@dataclass
class CliRun:
    returncode: int
    stdout: str
    stderr: str
    peak: int  # bytes: the process's peak resident memory


def _run_cli(sandbox: Path, name: str):
    """`losscc build` on one spec: (CliRun, or None if killed after HARD_TIMEOUT; seconds)."""
    out = sandbox / "out" / name.replace(".", "_")
    peak_file = sandbox / "out" / (name.replace(".", "_") + ".peak")
    peak_file.parent.mkdir(exist_ok=True)
    cmd = [sys.executable, "-c", _CLI, "build", f"{REL}/{name}", "--out", str(out)]
    with tempfile.TemporaryFile() as stdout, tempfile.TemporaryFile() as stderr:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=sandbox, env=dict(_env(), LOSSCC_TEST_PEAK=str(peak_file)),
                                stdout=stdout, stderr=stderr)
        try:
            proc.wait(timeout=HARD_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return None, time.perf_counter() - t0
        elapsed = time.perf_counter() - t0
        stdout.seek(0)
        stderr.seek(0)
        return CliRun(proc.returncode, stdout.read().decode(), stderr.read().decode(),
                      int(peak_file.read_text())), elapsed


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
    assert run.peak < MEMORY_LIMIT, f"peak memory {run.peak / 2**20:.0f} MiB"
    assert not (sandbox / "CANARY").exists(), "a spec ran code"


def test_the_documented_limits():
    # README.md states these numbers (the spec language, hostile specs): change both together.
    assert (spec_stage.MAX_SPEC_BYTES, spec_stage.MAX_YAML_DEPTH, spec_stage.MAX_YAML_NODES) == (256 * 1024, 20, 5000)
    assert (spec_stage.MAX_NAME_LENGTH, spec_stage.MAX_INPUTS, spec_stage.MAX_PARAMS, spec_stage.MAX_LETS,
            spec_stage.MAX_VARIANT_COMBOS) == (64, 16, 32, 100, 16)
    assert (expr_stage.MAX_NODES, expr_stage.MAX_DEPTH, expr_stage.MAX_POWER, expr_stage.MAX_DIGITS) == (5000, 100, 64, 400)
    assert (expr_stage.MAX_DERIVATIVE_PARTS, expr_stage.MAX_ROW_GRADIENT_PARTS, expr_stage.MAX_REDUCTION_DEPTH,
            expr_stage.MAX_PIECES) == (10000, 2500, 3, 100)
    assert codegen.MAX_UNIT_CHARS == 192 * 1024
    assert (TIME_LIMIT, MEMORY_LIMIT) == (5.0, 512 * 2**20)
