"""Spec stage: load a YAML loss spec, keep every node's location, validate it into a LossSpec.

Only plain YAML is accepted: no tags, no anchors or aliases, no merge keys, no duplicate keys,
and a bounded amount of it (bytes, nesting, nodes, and how many inputs, params, lets and
variant combinations). Text holds no control characters but tab and newline. Every error
is a SpecError whose message starts with ``file:line:col:``.
"""

from __future__ import annotations

import hashlib
import keyword
import math
import re
from dataclasses import replace
from pathlib import Path

import yaml

from .errors import SpecError
from .ir import (Domain, ExampleSpec, Formula, InputSpec, Loc, LossSpec, ParamSpec, VariantSpec,
                 bound_error)

MAX_SPEC_BYTES = 256 * 1024
MAX_YAML_DEPTH = 20  # nesting of mappings and lists; a spec needs 4
# YAML values, lists and mappings: PyYAML reads some 20000 a second, and the largest spec
# holds under 150, so a refusal comes within a second of the start.
MAX_YAML_NODES = 5000
# What a spec may declare: each is work per kernel (C arguments, a struct field, a gradient)
# or per variant combination (every combination is derived and compiled on its own).
MAX_NAME_LENGTH = 64
MAX_INPUTS = 16
MAX_PARAMS = 32
MAX_LETS = 100
MAX_VARIANT_COMBOS = 16
# Names the built package itself defines (runtime.bind_package), beside the losses.
PACKAGE_NAMES = frozenset({"LOSSES"})
# Characters refused in any spec text: control characters but tab and newline (a terminal
# obeys them: \r and ANSI escapes can hide text in a docstring or a message), lone
# surrogates (not UTF-8: no file can hold them) and the bidirectional controls of "Trojan
# Source" (text that displays in another order than it reads).
_BAD_CHAR = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff\u061c\u200e\u200f"
                       "\u202a-\u202e\u2066-\u2069]")

# Names the runtime gives every loss; a spec may not reuse them.
RESERVED = frozenset(
    {"weight", "batch_axis", "axis", "reduction", "sample_weight", "out", "grad_out", "hess_out",
     "wrt", "self"}
)
TOP_KEYS = ("name", "aliases", "summary", "reference", "doc", "inputs", "params", "variants",
            "positional", "axis", "let", "loss", "examples", "accuracy", "plot")
DEFAULT_ACCURACY = 4.0  # ulps of the true result, for every value and gradient (issue 4)
COMMON_ARGS = ("weight", "batch_axis")  # constructor arguments every loss has
_STR_TAG = "tag:yaml.org,2002:str"
_SCALAR_TAGS = {
    _STR_TAG, "tag:yaml.org,2002:int", "tag:yaml.org,2002:float",
    "tag:yaml.org,2002:bool", "tag:yaml.org,2002:null",
}


def spec_files(paths) -> list[Path]:
    """The spec files named by `paths`: files as given, folders by their *.yaml / *.yml."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted([*p.glob("*.yaml"), *p.glob("*.yml")])
            if not found:
                raise SpecError(None, f"{p}: no *.yaml spec files in this folder")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise SpecError(None, f"{p}: no such spec file or folder")
    return files


def load_spec(path) -> LossSpec:
    """Read and validate one spec file."""
    path = Path(path)
    label = str(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise SpecError(None, f"{label}: cannot read spec: {exc.strerror}") from None
    if len(raw) > MAX_SPEC_BYTES:
        raise SpecError(Loc(label, 1, 1), f"spec is {len(raw)} bytes, more than the {MAX_SPEC_BYTES} allowed")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        col = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise SpecError(Loc(label, line, col), f"spec is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    return parse_spec(text, label, hashlib.sha256(raw).hexdigest())


def parse_spec(text: str, label: str = "<spec>", source_hash: str | None = None) -> LossSpec:
    """Validate spec text; `label` is the file name used in messages."""
    source_hash = source_hash or hashlib.sha256(text.encode()).hexdigest()
    root = _compose(text, label)
    return _Validator(label, text).spec(root, source_hash)


# ------------------------------------------------------------------------------ YAML


def _compose(text: str, label: str) -> yaml.Node:
    """The YAML node tree, after one streaming pass that refuses what specs never need:
    anchors and aliases (billion laughs), explicit tags (!!python/...), deep nesting."""
    try:
        depth = nodes = 0
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            where = _loc(label, event.start_mark)
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
                raise SpecError(where, "YAML anchors and aliases are not allowed in specs")
            if getattr(event, "tag", None) is not None:
                raise SpecError(where, f"YAML tag {_show(event.tag)} is not allowed in specs")
            if isinstance(event, (yaml.ScalarEvent, yaml.CollectionStartEvent)):
                nodes += 1
                if nodes > MAX_YAML_NODES:
                    raise SpecError(where, f"spec has more than {MAX_YAML_NODES} YAML nodes "
                                           "(values, lists and mappings)")
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > MAX_YAML_DEPTH:
                    raise SpecError(where, f"YAML nests deeper than {MAX_YAML_DEPTH} levels")
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context
        if exc.context and exc.problem and exc.problem.startswith("but "):  # the second half of a sentence
            problem = f"{exc.context}, {exc.problem}"
        raise SpecError(_loc(label, mark), f"invalid YAML: {problem}") from None
    except yaml.YAMLError as exc:
        raise SpecError(Loc(label, 1, 1), f"invalid YAML: {exc}") from None
    if root is None:
        raise SpecError(Loc(label, 1, 1), "spec is empty")
    return root


def _loc(label: str, mark) -> Loc:
    return Loc(label, mark.line + 1, mark.column + 1) if mark is not None else Loc(label, 1, 1)


class _Validator:
    def __init__(self, label: str, text: str):
        self.label = label
        self.lines = text.splitlines()

    # -- helpers ------------------------------------------------------------

    def loc(self, node) -> Loc:
        return _loc(self.label, node.start_mark)

    def fail(self, node, message: str):
        raise SpecError(self.loc(node), message)

    def mapping(self, node, what: str) -> dict:
        """A mapping node as {key: (key_node, value_node)}, refusing duplicate and non-string keys."""
        if not isinstance(node, yaml.MappingNode):
            self.fail(node, f"{what} must be a mapping, got {_kind(node)}")
        out: dict = {}
        for knode, vnode in node.value:
            if knode.tag == "tag:yaml.org,2002:merge":
                self.fail(knode, "YAML merge keys (<<) are not allowed in specs")
            if not (isinstance(knode, yaml.ScalarNode) and knode.tag == _STR_TAG):
                self.fail(knode, f"keys of {what} must be plain names, got {_kind(knode)}")
            if knode.value in out:
                first = self.loc(out[knode.value][0])
                self.fail(knode, f"duplicate key {_show(knode.value)} in {what} (first at line {first.line})")
            out[knode.value] = (knode, vnode)
        return out

    def scalar(self, node, what: str):
        if not isinstance(node, yaml.ScalarNode):
            self.fail(node, f"{what} must be a single value, got {_kind(node)}")
        if node.tag == "tag:yaml.org,2002:timestamp":
            self.fail(node, f"{what} reads as a date; quote it if it is text")
        if node.tag not in _SCALAR_TAGS:  # cannot happen after _compose; kept as a guard
            self.fail(node, f"{what}: YAML tag '{node.tag}' is not allowed in specs")
        return yaml.SafeLoader("").construct_object(node)

    def string(self, node, what: str) -> str:
        value = self.scalar(node, what)
        if not isinstance(value, str):
            self.fail(node, f"{what} must be text, got {_show(value)}")
        bad = _BAD_CHAR.search(value)
        if bad:
            ch = bad.group()
            kind = ("a lone surrogate (not valid Unicode)" if "\ud800" <= ch <= "\udfff" else
                    "a bidirectional control" if ch > "\x9f" else "a control character")
            self.fail(node, f"{what} contains U+{ord(ch):04X}, {kind}: only tab and newline "
                            "may be used in spec text")
        return value

    def number(self, node, what: str) -> float:
        value = self.scalar(node, what)
        if isinstance(value, str) and node.style is None:
            # YAML 1.1 reads 1e-12 (no dot) as text; an unquoted number is meant as a number.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(node, f"{what} must be a number, got {_show(value)}")
        value = float(value)
        if not math.isfinite(value):
            self.fail(node, f"{what} must be finite, got {value!r}")
        return value

    def boolean(self, node, what: str) -> bool:
        value = self.scalar(node, what)
        if not isinstance(value, bool):
            self.fail(node, f"{what} must be true or false, got {_show(value)}")
        return value

    def identifier(self, node, what: str) -> str:
        name = self.string(node, what)
        if len(name) > MAX_NAME_LENGTH:
            self.fail(node, f"{what} {_show(name)} is {len(name)} characters long, more than the "
                            f"{MAX_NAME_LENGTH} allowed")
        if not (name.isascii() and name.isidentifier()) or keyword.iskeyword(name) or name.startswith("_"):
            foreign = next((ch for ch in name if not ch.isascii()), None)
            why = f" ({foreign!r} is U+{ord(foreign):04X}, not ASCII)" if foreign else ""
            self.fail(node, f"{what} {_show(name)} must be an ASCII Python identifier, not a keyword, "
                            f"not starting with '_'{why}")
        return name

    def loss_name(self, node, what: str) -> str:
        """The loss's name or an alias: a module attribute of the built package; the name
        also names the kernels, lcc_<name>__<variant>__<mode>, where '__' separates."""
        name = self.identifier(node, what)
        if name in PACKAGE_NAMES:
            self.fail(node, f"{what} '{name}' is reserved: the built package lists its losses under it")
        if what == "name" and "__" in name:
            self.fail(node, f"name '{name}' contains '__', which separates the parts of kernel names "
                            "(lcc_<name>__<variant>__<mode>)")
        return name

    def check_keys(self, items: dict, allowed, what: str):
        known = set(allowed)
        for key, (knode, _) in items.items():
            if key not in known:
                self.fail(knode, f"unknown key {_show(key)} in {what} (allowed: {', '.join(allowed)})")

    def formula(self, node, what: str) -> Formula:
        text = self.string(node, what)
        if not text.strip():
            self.fail(node, f"{what} is empty")
        positions = self.positions(text, node)
        first = next((p for p in positions if p is not None), None)
        loc = Loc(self.label, *first) if first else self.loc(node)
        return Formula(text=text, loc=loc, positions=positions)

    def positions(self, text: str, node) -> tuple:
        """The file (line, col) of every non-space character of a scalar's value, found by
        walking the source in step with the value: right for plain, quoted, literal (|)
        and folded (>) styles alike, whatever the indentation."""
        line, col = node.start_mark.line, node.start_mark.column
        quoted = node.style in ("'", '"')
        if quoted:
            col += 1
        elif node.style in ("|", ">"):
            line, col = line + 1, 0
        out = []
        for ch in text:
            if ch.isspace():
                out.append(None)
                continue
            found = None
            while line < len(self.lines) and found is None:
                src = self.lines[line]
                if col >= len(src):
                    line, col = line + 1, 0
                elif src[col] == ch:
                    found = (line + 1, col + 1)
                    col += 1
                elif src[col].isspace():
                    col += 1
                elif quoted and src[col] == "\\":
                    col += 2  # an escape such as \n stands for a space-like character
                else:
                    break  # the source no longer matches (an unusual escape): stop mapping
            out.append(found)
            if found is None:
                break
        return tuple(out)

    # -- sections -----------------------------------------------------------

    def spec(self, root, source_hash: str) -> LossSpec:
        top = self.mapping(root, "the spec")
        self.check_keys(top, TOP_KEYS, "the spec")
        for key in ("name", "summary", "reference", "inputs", "loss"):
            if key not in top:
                self.fail(root, f"missing required key '{key}'")
        name = self.loss_name(top["name"][1], "name")
        aliases, alias_locs = (), ()
        if "aliases" in top:
            node = top["aliases"][1]
            if not isinstance(node, yaml.SequenceNode):
                self.fail(node, f"aliases must be a list of names, got {_kind(node)}")
            aliases = tuple(self.loss_name(n, "alias") for n in node.value)
            alias_locs = tuple(self.loc(n) for n in node.value)
            for i, (alias, where) in enumerate(zip(aliases, alias_locs)):
                if alias == name:
                    raise SpecError(where, f"alias '{alias}' is the loss's own name")
                if alias in aliases[:i]:
                    raise SpecError(where, f"alias '{alias}' is listed twice")
        summary = self.string(top["summary"][1], "summary").strip()
        reference = self.string(top["reference"][1], "reference").strip()
        doc = self.string(top["doc"][1], "doc").strip() if "doc" in top else ""
        inputs = self.inputs(top["inputs"][1])
        params = self.params(top["params"][1]) if "params" in top else ()
        variants = self.variants(top["variants"][1]) if "variants" in top else ()
        is_row = any(i.row or i.index_into for i in inputs)
        self.check_row_inputs(inputs, params)
        common = ("axis", *COMMON_ARGS) if is_row else COMMON_ARGS
        positional = (*(p.name for p in params), *(v.name for v in variants), *common)
        if "positional" in top:
            positional = self.positional(top["positional"][1], params, variants, common)
        axis = -1
        if "axis" in top:
            if not is_row:
                self.fail(top["axis"][0], "axis is for row losses (an input with row: true)")
            axis = self.axis(top["axis"][1])
        let = ()
        if "let" in top:
            items = self.mapping(top["let"][1], "let")
            if len(items) > MAX_LETS:
                self.fail(list(items.values())[MAX_LETS][0], f"more than {MAX_LETS} let definitions")
            let = tuple((self.identifier(k, "let name"), self.formula(v, f"let '{k.value}'"))
                        for k, v in items.values())
        self.check_names(inputs, params, variants, let)
        loss = self.formula(top["loss"][1], "loss")
        examples = ()
        if "examples" in top:
            examples = self.examples(top["examples"][1], inputs, params, variants)
        inputs = tuple(self.domain(i, variants) for i in inputs)
        accuracy, conditioned, when, reason = DEFAULT_ACCURACY, False, (), ""
        if "accuracy" in top:
            accuracy, conditioned, when, reason = self.accuracy(top["accuracy"][1], variants)
        plot = self.plot(top["plot"][1], inputs) if "plot" in top else ()
        return LossSpec(
            name=name, path=self.label, loc=self.loc(top["name"][1]), summary=summary,
            reference=reference, doc=doc, aliases=aliases, inputs=inputs, params=params,
            variants=variants, let=let, loss=loss, examples=examples, source_hash=source_hash,
            positional=positional, alias_locs=alias_locs, axis=axis, accuracy=accuracy,
            accuracy_reason=reason, accuracy_conditioned=conditioned, accuracy_conditioned_when=when,
            plot=plot,
        )

    def accuracy(self, node, variants) -> tuple:
        """accuracy: {ulps: N, conditioned: true, reason: why}: a looser bound than the default
        (more ulps, or ulps of the formula's conditioning rather than of the result), with its
        reason. `conditioned` may instead name the variant values where it holds:
        {from_sigmoid: true}. Returns (ulps, conditioned, when, reason)."""
        fields = self.options(node, "accuracy", ("ulps", "conditioned", "reason"))
        if ("ulps" not in fields and "conditioned" not in fields) or "reason" not in fields:
            self.fail(node, "accuracy needs 'ulps' (the bound) or 'conditioned: true', and "
                            f"'reason' (why the default {DEFAULT_ACCURACY:g} ulps cannot hold)")
        ulps = DEFAULT_ACCURACY
        if "ulps" in fields:
            ulps = self.number(fields["ulps"][1], "accuracy ulps")
            if not ulps >= 1:
                self.fail(fields["ulps"][1], f"accuracy ulps must be >= 1, got {ulps!r}")
        conditioned, when = False, ()
        if "conditioned" in fields:
            cnode = fields["conditioned"][1]
            if isinstance(cnode, yaml.MappingNode):
                if not cnode.value:
                    self.fail(cnode, "accuracy conditioned: an empty mapping; say true, or the "
                                     "variant values where it holds, e.g. {from_sigmoid: true}")
                conditioned, when = True, self.variant_values(cnode, variants, "accuracy conditioned")
            else:
                conditioned = self.boolean(cnode, "accuracy conditioned")
        if not conditioned and "ulps" not in fields:
            self.fail(node, "accuracy with 'conditioned: false' and no 'ulps' changes nothing: "
                            "drop it, or give 'ulps'")
        reason = self.string(fields["reason"][1], "accuracy reason").strip()
        if not reason:
            self.fail(fields["reason"][1], "accuracy reason is empty: say why the bound is looser")
        return ulps, conditioned, when, reason

    def variant_values(self, node, variants, what: str) -> tuple:
        """{variant: value, ...} -> ((name, value), ...), each a declared variant and value."""
        out = []
        for knode, vnode in node.value:
            name = self.scalar(knode, what)
            if any(n == name for n, _ in out):
                self.fail(knode, f"{what}: duplicate key '{name}'")
            variant = next((v for v in variants if v.name == name), None)
            if variant is None:
                self.fail(knode, f"{what}: '{name}' is not a variant "
                                 f"(variants: {', '.join(v.name for v in variants) or 'none'})")
            raw = self.scalar(vnode, what)
            value = next((v for v in variant.values if str(v).lower() == str(raw).lower()), None)
            if value is None:
                self.fail(vnode, f"{what}: {_show(raw)} is not a value of variant '{name}' "
                                 f"(values: {', '.join(map(str, variant.values))})")
            out.append((name, value))
        return tuple(out)

    def domain(self, inp: InputSpec, variants) -> InputSpec:
        """The input's `domain:` (kept aside by inputs()), parsed now that variants are known."""
        node = self._domain_nodes.get(inp.name)
        if node is None:
            return inp
        return self.domain_of(inp, node, variants)

    def domain_of(self, inp: InputSpec, node, variants) -> InputSpec:
        if not isinstance(node, yaml.MappingNode):
            return replace(inp, domain=self.domain_text(node, f"domain of input '{inp.name}'", inp))
        items = {}  # variant values (true/false too) as keys: not plain names, so not mapping()
        for knode, vnode in node.value:
            key = str(self.scalar(knode, f"domain of input '{inp.name}'")).lower()
            if key in items:
                self.fail(knode, f"duplicate key '{key}' in the domain of input '{inp.name}'")
            items[key] = (knode, vnode)
        if "by" not in items:
            self.fail(node, f"domain of input '{inp.name}': a mapping names a variant with 'by' and "
                            "gives a domain per value, e.g. {by: from_sigmoid, true: '[0, 1]', false: real}")
        vname = self.scalar(items["by"][1], "domain by")
        variant = next((v for v in variants if v.name == vname), None)
        if variant is None:
            self.fail(items["by"][1], f"domain of input '{inp.name}': by '{vname}' is not a variant "
                                      f"(variants: {', '.join(v.name for v in variants) or 'none'})")
        cases = {}
        for key, (knode, vnode) in items.items():
            if key == "by":
                continue
            value = next((v for v in variant.values if str(v).lower() == str(key).lower()), None)
            if value is None:
                self.fail(knode, f"domain of input '{inp.name}': {_show(key)} is not a value of variant "
                                 f"'{vname}' (values: {', '.join(map(str, variant.values))})")
            cases[value] = self.domain_text(vnode, f"domain of input '{inp.name}' for {vname}={key}", inp)
        missing = [str(v) for v in variant.values if v not in cases]
        if missing:
            self.fail(node, f"domain of input '{inp.name}': no domain for {vname} = {', '.join(missing)}")
        return replace(inp, domain_by=(vname, tuple(cases.items())))

    def domain_text(self, node, what: str, inp: InputSpec) -> Domain:
        if isinstance(node, yaml.SequenceNode):  # [0, 1] unquoted: YAML's list, a closed interval
            if len(node.value) != 2:
                self.fail(node, f"{what}: a list is a closed interval [lo, hi] of two numbers")
            lo, hi = (self.number(n, what) for n in node.value)
            text = f"[{lo!r}, {hi!r}]"
        else:
            text = self.string(node, what)
        try:
            domain = parse_domain(text)
        except ValueError as exc:
            self.fail(node, f"{what}: {exc}")
        if domain.simplex and not (inp.row or inp.index_into):
            self.fail(node, f"{what}: simplex is for row inputs (row: true)")
        return domain

    def axis(self, node):
        value = self.scalar(node, "axis")
        if value == "all":
            return None
        if not isinstance(value, int) or isinstance(value, bool):
            self.fail(node, f"axis must be an int or 'all' (every non-batch axis), got {_show(value)}")
        return value

    def positional(self, node, params, variants, common) -> tuple:
        if not isinstance(node, yaml.SequenceNode):
            self.fail(node, f"positional must be a list of names, got {_kind(node)}")
        allowed = (*(p.name for p in params), *(v.name for v in variants), *common)
        names: dict = {}
        known = set(allowed)
        for n in node.value:
            name = self.string(n, "positional")
            if name not in known:
                self.fail(n, f"positional: {_show(name)} is not a constructor argument (allowed: {', '.join(allowed)})")
            if name in names:
                self.fail(n, f"positional: '{name}' is listed twice")
            names[name] = None
        return tuple(names)

    def inputs(self, node) -> tuple:
        self._domain_nodes = {}
        items = self.mapping(node, "inputs")
        if not items:
            self.fail(node, "inputs must list at least the prediction")
        if len(items) > MAX_INPUTS:
            self.fail(list(items.values())[MAX_INPUTS][0], f"more than {MAX_INPUTS} inputs")
        out = []
        for i, (name, (knode, vnode)) in enumerate(items.items()):
            self.identifier(knode, "input name")
            fields = self.options(vnode, f"input '{name}'", ("differentiable", "default", "row",
                                                             "index_into", "ignore", "domain", "doc"))
            if "domain" in fields:
                self._domain_nodes[name] = fields["domain"][1]
            differentiable, optional_grad = i == 0, False
            if "differentiable" in fields:
                dnode = fields["differentiable"][1]
                if self.scalar(dnode, "differentiable") == "optional":
                    differentiable = optional_grad = True
                else:
                    differentiable = self.boolean(dnode, "differentiable (true, false or optional)")
            if i == 0 and (not differentiable or optional_grad):
                self.fail(knode, f"the first input '{name}' is the prediction and must be differentiable")
            default = self.number(fields["default"][1], f"default of input '{name}'") \
                if "default" in fields else None
            if i == 0 and default is not None:
                self.fail(fields["default"][0], f"the prediction '{name}' cannot have a default")
            doc = self.string(fields["doc"][1], "doc") if "doc" in fields else ""
            row = self.boolean(fields["row"][1], "row") if "row" in fields else False
            index_into = self.identifier(fields["index_into"][1], "index_into") \
                if "index_into" in fields else None
            ignore = self.identifier(fields["ignore"][1], "ignore") if "ignore" in fields else None
            if ignore and not index_into:
                self.fail(fields["ignore"][0], "ignore is for class-index inputs (index_into: ...)")
            out.append(InputSpec(name, self.loc(knode), differentiable, default, doc, row, index_into,
                                 ignore, optional_grad))
        optional = [i for i in out if i.default is not None]
        if any(i.default is None for i in out[out.index(optional[0]):]) if optional else False:
            bad = next(i for i in out[out.index(optional[0]):] if i.default is None)
            raise SpecError(bad.loc, f"input '{bad.name}' has no default but follows an optional input")
        return tuple(out)

    def check_row_inputs(self, inputs, params):
        """Row losses: the prediction is a row, class indices point at a row input, the
        ignored class is a param, and only row inputs are differentiable."""
        if not any(i.row or i.index_into for i in inputs):
            return
        rows = {i.name for i in inputs if i.row}
        if not inputs[0].row:
            raise SpecError(inputs[0].loc, f"the prediction '{inputs[0].name}' of a row loss must "
                                           "have row: true")
        for inp in inputs:
            if inp.index_into and inp.index_into not in rows:
                raise SpecError(inp.loc, f"input '{inp.name}': index_into '{inp.index_into}' is not "
                                         f"a row input (rows: {', '.join(sorted(rows))})")
            if inp.index_into and inp.row:
                raise SpecError(inp.loc, f"input '{inp.name}' has both row and index_into")
            if inp.ignore and inp.ignore not in {p.name for p in params}:
                raise SpecError(inp.loc, f"input '{inp.name}': ignore '{inp.ignore}' is not a param")
            if inp.differentiable and not (inp.row or inp.index_into):
                raise SpecError(inp.loc, f"input '{inp.name}': only row inputs of a row loss can be "
                                         "differentiable")

    def options(self, node, what: str, allowed) -> dict:
        if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null":
            return {}
        items = self.mapping(node, what)
        self.check_keys(items, allowed, what)
        return items

    def params(self, node) -> tuple:
        out = []
        items = self.mapping(node, "params")
        if len(items) > MAX_PARAMS:
            self.fail(list(items.values())[MAX_PARAMS][0], f"more than {MAX_PARAMS} params")
        for name, (knode, vnode) in items.items():
            self.identifier(knode, "parameter name")
            fields = self.options(vnode, f"param '{name}'", ("default", "min", "max", "gt", "lt", "doc"))
            if "default" not in fields:
                self.fail(knode, f"param '{name}' needs a default")
            num = {k: self.number(fields[k][1], f"{k} of param '{name}'")
                   for k in ("default", "min", "max", "gt", "lt") if k in fields}
            p = ParamSpec(name, self.loc(knode), num["default"], num.get("min"), num.get("max"),
                          num.get("gt"), num.get("lt"),
                          self.string(fields["doc"][1], "doc") if "doc" in fields else "")
            broken = bound_error(p.default, p.min, p.max, p.gt, p.lt)
            if broken:
                self.fail(fields["default"][1], f"default of param '{name}': {broken}")
            out.append(p)
        return tuple(out)

    def variants(self, node) -> tuple:
        out = []
        combos = 1
        for name, (knode, vnode) in self.mapping(node, "variants").items():
            self.identifier(knode, "variant name")
            fields = self.options(vnode, f"variant '{name}'", ("values", "default", "doc"))
            if "values" not in fields or "default" not in fields:
                self.fail(knode, f"variant '{name}' needs 'values' and 'default'")
            vals_node = fields["values"][1]
            if not isinstance(vals_node, yaml.SequenceNode) or not vals_node.value:
                self.fail(vals_node, f"values of variant '{name}' must be a non-empty list")
            combos *= len(vals_node.value)
            if combos > MAX_VARIANT_COMBOS:
                self.fail(vals_node, f"variant '{name}' brings the combinations of variant values to "
                                     f"{combos}, more than the {MAX_VARIANT_COMBOS} allowed (each is "
                                     "derived and compiled on its own)")
            values, lowered = [], set()
            for v in vals_node.value:
                val = self.scalar(v, f"value of variant '{name}'")
                if not isinstance(val, (bool, str)) or (isinstance(val, str) and not (val.isascii() and val.isidentifier())):
                    self.fail(v, f"values of variant '{name}' must be true/false or ASCII names, got {_show(val)}")
                if isinstance(val, str) and "__" in val:
                    self.fail(v, f"value '{val}' of variant '{name}' contains '__', which separates the "
                                 "parts of kernel names (lcc_<name>__<variant>__<mode>)")
                if str(val).lower() in lowered:
                    self.fail(v, f"value {val!r} repeated in variant '{name}' (values name kernels: "
                                 "case does not count)")
                values.append(val)
                lowered.add(str(val).lower())
            if len({type(v) for v in values}) > 1:
                self.fail(vals_node, f"values of variant '{name}' must be all booleans or all names")
            default = self.scalar(fields["default"][1], f"default of variant '{name}'")
            if default not in values or type(default) is not type(values[0]):
                self.fail(fields["default"][1], f"default {_show(default)} of variant '{name}' is not one of {values}")
            doc = self.string(fields["doc"][1], "doc") if "doc" in fields else ""
            out.append(VariantSpec(name, self.loc(knode), tuple(values), default, doc))
        return tuple(out)

    def check_names(self, inputs, params, variants, let):
        seen: dict = {}
        for kind, items in (("input", inputs), ("param", params), ("variant", variants)):
            for item in items:
                self.claim(seen, item.name, kind, item.loc)
        for lname, formula in let:
            self.claim(seen, lname, "let", formula.loc)

    def claim(self, seen: dict, name: str, kind: str, loc: Loc):
        if name in RESERVED:
            raise SpecError(loc, f"{kind} name '{name}' is reserved by the runtime "
                                 f"(reserved: {', '.join(sorted(RESERVED))})")
        if name in seen:
            raise SpecError(loc, f"{kind} name '{name}' is already used by {seen[name]}")
        seen[name] = f"the {kind} at line {loc.line}"

    def plot(self, node, inputs) -> tuple:
        """plot: {pred: [x, 0], label: 0}: the inputs `losscc plot` draws the loss at, x
        marking the one element that runs over [-5, 5) (of a differentiable input: its
        gradient is the second curve); a list is a row. Returns ((name, value), ...), value a
        number, "x", or a tuple of them."""
        items = self.mapping(node, "plot")
        by_name = {i.name: i for i in inputs}
        self.check_keys(items, list(by_name), "plot")
        out, varied = [], []
        for name, (_, vnode) in items.items():
            inp = by_name[name]
            cells = vnode.value if isinstance(vnode, yaml.SequenceNode) else None
            if (cells is not None) != inp.row:
                self.fail(vnode, f"plot {name}: " + ("a row input takes a list (a row)" if inp.row
                                                     else "a list is a row, for row inputs only"))
            value = []
            for cell in cells if cells is not None else [vnode]:
                if isinstance(cell, yaml.ScalarNode) and cell.value == "x" and cell.style is None:
                    if not inp.differentiable:
                        self.fail(cell, f"plot {name}: x must mark an element of a differentiable input "
                                        f"(its gradient is drawn)")
                    varied.append(cell)
                    value.append("x")
                else:
                    value.append(self.number(cell, f"plot {name}"))
            if cells is not None and not value:
                self.fail(vnode, f"plot {name} is an empty list")
            out.append((name, tuple(value) if cells is not None else value[0]))
        if len(varied) != 1:
            self.fail(varied[1] if varied else node, "plot: exactly one x must mark the element that varies "
                                                     f"(found {len(varied)})")
        missing = [i.name for i in inputs if i.default is None and i.name not in items]
        if missing:
            self.fail(node, f"plot needs a value for {', '.join(missing)}")
        return tuple(out)

    def examples(self, node, inputs, params, variants) -> tuple:
        if not isinstance(node, yaml.SequenceNode):
            self.fail(node, f"examples must be a list, got {_kind(node)}")
        input_names = [i.name for i in inputs]
        allowed = [*input_names, *(p.name for p in params), *(v.name for v in variants), "loss", "grad"]
        out = []
        for ex in node.value:
            items = self.mapping(ex, "an example")
            self.check_keys(items, allowed, "an example")
            for req in ["loss", *(i.name for i in inputs if i.default is None)]:
                if req not in items:
                    self.fail(ex, f"example needs '{req}'")
            vals = {}
            for key, (_, vnode) in items.items():
                variant = next((v for v in variants if v.name == key), None)
                if variant is not None:
                    val = self.scalar(vnode, f"example {key}")
                    if val not in variant.values or type(val) is not type(variant.values[0]):
                        self.fail(vnode, f"example {key}: {_show(val)} is not one of {list(variant.values)}")
                    vals[key] = val
                elif isinstance(vnode, yaml.SequenceNode):  # a row of a row loss
                    if not any(i.row for i in inputs):
                        self.fail(vnode, f"example {key}: a list is a row, for row losses only")
                    vals[key] = tuple(self.number(n, f"example {key}") for n in vnode.value)
                    if not vals[key]:
                        self.fail(vnode, f"example {key} is an empty list")
                else:
                    vals[key] = self.number(vnode, f"example {key}")
            out.append(ExampleSpec(
                loc=self.loc(ex),
                inputs={k: v for k, v in vals.items() if k in input_names},
                options={k: v for k, v in vals.items() if k not in input_names and k not in ("loss", "grad")},
                loss=vals["loss"], grad=vals.get("grad"),
            ))
        return tuple(out)


_INTERVAL = re.compile(r"^\s*([\[(])\s*([^,\s]+)\s*,\s*([^,\s]+)\s*([\])])\s*$")


def parse_domain(text: str) -> Domain:
    """A Domain from its spec text, or ValueError saying what is wrong."""
    t = text.strip()
    if t == "real":
        return Domain("real")
    if t == "simplex":
        return Domain("simplex", 0.0, 1.0, False, False, simplex=True)
    if t.startswith("{") and t.endswith("}"):
        items = [x.strip() for x in t[1:-1].split(",")]
        try:
            values = tuple(float(x) for x in items)
        except ValueError:
            raise ValueError(f"{_show(text)}: a set lists numbers, e.g. {{-1, 1}}") from None
        if not all(math.isfinite(v) for v in values) or len(set(values)) != len(values):
            raise ValueError(f"{_show(text)}: a set lists distinct finite numbers")
        return Domain(t, min(values), max(values), False, False, values=values)
    m = _INTERVAL.match(t)
    if not m:
        raise ValueError(f"{_show(text)} is not a domain (real, simplex, an interval like [0, 1] or "
                         "(0, inf), or a set like {-1, 1})")
    lo_b, lo_s, hi_s, hi_b = m.groups()
    try:
        lo, hi = float(lo_s), float(hi_s)
    except ValueError:
        raise ValueError(f"{_show(text)}: interval bounds must be numbers or inf") from None
    if math.isnan(lo) or math.isnan(hi) or not lo < hi:
        raise ValueError(f"{_show(text)}: the lower bound must be below the upper one")
    if (lo == -math.inf and lo_b == "[") or (hi == math.inf and hi_b == "]"):
        raise ValueError(f"{_show(text)}: an infinite bound is open: write (-inf or inf)")
    return Domain(t, lo, hi, lo_b == "(", hi_b == ")")


def _kind(node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    return _show(node.value)


def _show(value, limit: int = 60) -> str:
    """repr(value) for a message: escaped (a spec's control characters never reach the
    terminal) and cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
